"""Mesh and multi-host set-up.

ssljax runs data parallel on one mesh axis, ``data``, spanning every device of every host.
Parameters and optimiser state are replicated; batches are split along ``data``. On a
multi-host system (TPU pod, SLURM GPU cluster) call `initialize_distributed` before anything
touches JAX devices; each host then reads its own shard of every global batch.
"""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """A one-axis ``('data',)`` mesh over `devices` (default: every device of every host)."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  """Raises if the global batch cannot be split evenly over devices and hosts."""
  devices, hosts = mesh.size, jax.process_count()
  if global_batch % devices:
    raise ValueError(
        f"train.batch_size = {global_batch} is not divisible by the number of devices "
        f"({devices}); choose a multiple of {devices}, e.g. "
        f"--config.train.batch_size={max(devices, global_batch // devices * devices)}")
  if global_batch % hosts:
    raise ValueError(f"train.batch_size = {global_batch} is not divisible by the number of "
                     f"hosts ({hosts})")


def initialize_distributed(coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> None:
  """Connects the hosts of a multi-host run (no-op arguments are auto-detected on TPU/SLURM)."""
  jax.distributed.initialize(coordinator_address=coordinator_address,
                             num_processes=num_processes, process_id=process_id)
