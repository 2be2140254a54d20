"""Mesh and multi-host set-up.

ssljax runs data parallel on one mesh axis, ``data``, spanning every device of every host.
Parameters and optimiser state are replicated; batches are split along ``data``. On a
multi-host system (TPU pod, SLURM GPU cluster) call `initialize_distributed` before anything
touches JAX devices; each host then reads its own shard of every global batch.

``ssljax train`` / ``ssljax eval`` call it when asked (`distributed_settings`: the flags
``--distributed``, ``--coordinator_address``, ``--num_processes``, ``--process_id``,
``--distributed_timeout``, or the environment variables of `ENV_VARS`). Without explicit
values, ``jax.distributed`` detects the cluster itself (Cloud TPU pod VMs, SLURM, Open MPI,
Kubernetes). A process that cannot reach the coordinator, or a coordinator that does not see
every process within the timeout, ends with a message saying what to check instead of
JAX's own abort (``DEADLINE_EXCEEDED``) or a hang.
"""

from __future__ import annotations

import dataclasses
import errno
import os
import socket
import sys
import threading
import time
from collections.abc import Mapping

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"

# Environment variables read when the matching flag is not given (flags win).
ENV_VARS = {
    "distributed": "SSLJAX_DISTRIBUTED",            # 1/true/yes/auto: on; 0/false/no/off: off
    "coordinator_address": "SSLJAX_COORDINATOR_ADDRESS",  # HOST:PORT of process 0
    "num_processes": "SSLJAX_NUM_PROCESSES",
    "process_id": "SSLJAX_PROCESS_ID",
    "timeout": "SSLJAX_DISTRIBUTED_TIMEOUT",        # seconds to wait for every process
    # Comma-separated local accelerator ids this process drives (e.g. 0,1,2,3 for one
    # process per node with 4 GPUs). Unset: JAX's default, which under SLURM and Open MPI is
    # the one GPU of the task's local rank (one process per GPU), elsewhere every device.
    "local_device_ids": "SSLJAX_LOCAL_DEVICE_IDS",
}
DEFAULT_TIMEOUT_S = 300  # jax.distributed's own default initialization_timeout
# Exit code of a process whose start-up rendezvous failed (EX_UNAVAILABLE of sysexits.h).
EXIT_RENDEZVOUS_FAILED = 69


MESH_DEVICE_ORDERS = ("devices", "topology")


def make_mesh(devices=None, *, device_order: str = "devices") -> Mesh:
  """A one-axis ``('data',)`` mesh over `devices` (default: every device of every host).

  `device_order` (``config.train.mesh_device_order``) is the order of the devices along the
  axis: ``'devices'`` keeps ``jax.devices()``'s order; ``'topology'`` takes
  ``jax.experimental.mesh_utils.create_device_mesh``'s, which on TPU follows the physical
  interconnect (the order collectives such as the all-gather of contrastive negatives run
  around) and elsewhere is the given order. A topology order must leave each process's devices
  one contiguous block of the axis, in process order, because host ``p`` loads rows
  ``[p n, (p + 1) n)`` of every global batch (`ssljax.data.HostLoader`); one that interleaves
  processes is refused rather than silently reordering the batch.

  Raises:
    ValueError: an unknown `device_order`, or an order that interleaves processes.
  """
  devices = list(jax.devices() if devices is None else devices)
  if device_order == "devices":
    ordered = np.asarray(devices)
  elif device_order == "topology":
    from jax.experimental import mesh_utils
    ordered = np.asarray(mesh_utils.create_device_mesh((len(devices),), devices=devices))
    ordered = ordered.reshape(-1)
    check_process_blocks(list(ordered), device_order)
  else:
    raise ValueError(f"train.mesh_device_order must be one of {MESH_DEVICE_ORDERS}, got "
                     f"{device_order!r}")
  return Mesh(ordered, (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))


def check_process_blocks(devices, device_order: str = "devices") -> None:
  """Raises unless the processes' devices form contiguous blocks along the axis, in order."""
  owners = [int(d.process_index) for d in devices]
  blocks = [p for i, p in enumerate(owners) if i == 0 or p != owners[i - 1]]
  if blocks != sorted(set(owners)):
    raise ValueError(
        f"train.mesh_device_order = {device_order!r} puts the devices of processes "
        f"{blocks} along the data axis in that order, but every process must own one "
        f"contiguous block of the axis, in process order (each host loads its own rows of "
        f"every global batch); use --config.train.mesh_device_order=devices")


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def data_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_processes_divide_batch(global_batch: int, num_processes: int) -> None:
  """Raises if `num_processes` hosts cannot each load the same number of rows of a batch."""
  if num_processes > 1 and global_batch % num_processes:
    fit = max(num_processes, global_batch // num_processes * num_processes)
    raise ValueError(
        f"train.batch_size = {global_batch} is not divisible by the number of processes "
        f"({num_processes}): every process loads an equal share of each global batch. Choose "
        f"a multiple of {num_processes}, e.g. --config.train.batch_size={fit}, or run "
        f"another number of processes")


def check_batch_divisible(global_batch: int, mesh: Mesh) -> None:
  """Raises if the global batch cannot be split evenly over devices and hosts."""
  devices, hosts = mesh.size, jax.process_count()
  check_processes_divide_batch(global_batch, hosts)
  if global_batch % devices:
    raise ValueError(
        f"train.batch_size = {global_batch} is not divisible by the number of devices "
        f"({devices}); choose a multiple of {devices}, e.g. "
        f"--config.train.batch_size={max(devices, global_batch // devices * devices)}")


class DistributedSetupError(RuntimeError):
  """The distributed settings are inconsistent, or the processes could not connect."""


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
  """How (and whether) to call ``jax.distributed.initialize``.

  ``enabled`` without an address means auto-detection by JAX (TPU pod, SLURM, Open MPI,
  Kubernetes); with ``coordinator_address`` all three of address, ``num_processes`` and
  ``process_id`` are given.
  """

  enabled: bool = False
  coordinator_address: str | None = None
  num_processes: int | None = None
  process_id: int | None = None
  timeout_s: int = DEFAULT_TIMEOUT_S
  local_device_ids: tuple[int, ...] | None = None

  @property
  def explicit(self) -> bool:
    return self.coordinator_address is not None


_TRUE = ("1", "true", "yes", "on", "auto")
_FALSE = ("0", "false", "no", "off", "")


def distributed_settings(*, distributed: bool | None = None,
                         coordinator_address: str | None = None,
                         num_processes: int | None = None, process_id: int | None = None,
                         timeout_s: int | None = None, local_device_ids: str | None = None,
                         environ: Mapping[str, str] | None = None) -> DistributedSettings:
  """The settings from the flags' values (None: not given), else from `ENV_VARS`.

  Giving a coordinator address turns distribution on. Raises `DistributedSetupError` for
  an incomplete or inconsistent explicit set-up, naming what to add.
  """
  env = os.environ if environ is None else environ

  def from_env(key, value, parse):
    if value is not None:
      return value
    text = env.get(ENV_VARS[key])
    if text is None:
      return None
    try:
      return parse(text.strip())
    except ValueError:
      raise DistributedSetupError(f"{ENV_VARS[key]}={text!r} is not a valid value") from None

  def parse_bool(text):
    if text.lower() in _TRUE:
      return True
    if text.lower() in _FALSE:
      return False
    raise ValueError(text)

  distributed = from_env("distributed", distributed, parse_bool)
  coordinator_address = from_env("coordinator_address", coordinator_address, str) or None
  num_processes = from_env("num_processes", num_processes, int)
  process_id = from_env("process_id", process_id, int)
  timeout_s = from_env("timeout", timeout_s, int)
  timeout_s = DEFAULT_TIMEOUT_S if timeout_s is None else timeout_s
  local_device_ids = from_env("local_device_ids", local_device_ids, str)
  if local_device_ids is not None:
    try:
      local_device_ids = tuple(int(i) for i in str(local_device_ids).split(",") if i.strip())
    except ValueError:
      raise DistributedSetupError(f"--local_device_ids must be comma-separated integers "
                                  f"(e.g. 0,1,2,3), got {local_device_ids!r}") from None
  if timeout_s < 1:
    raise DistributedSetupError(f"--distributed_timeout must be >= 1 second, got {timeout_s}")
  given = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
           "--process_id": process_id}
  if distributed is False:
    if any(v is not None for v in given.values()):
      raise DistributedSetupError(
          "distribution is switched off (--nodistributed or SSLJAX_DISTRIBUTED=0) but "
          f"{', '.join(k for k, v in given.items() if v is not None)} is given; drop one")
    return DistributedSettings(timeout_s=timeout_s)
  if all(v is None for v in given.values()):
    return DistributedSettings(enabled=bool(distributed), timeout_s=timeout_s,
                               local_device_ids=local_device_ids)
  missing = [k for k, v in given.items() if v is None]
  if missing:
    raise DistributedSetupError(
        f"an explicit multi-process set-up needs --coordinator_address HOST:PORT, "
        f"--num_processes N and --process_id I (or {ENV_VARS['coordinator_address']}, "
        f"{ENV_VARS['num_processes']}, {ENV_VARS['process_id']}); missing: "
        f"{', '.join(missing)}. On a TPU pod or under SLURM give only --distributed and "
        f"JAX detects the rest")
  host, _, port = coordinator_address.rpartition(":")
  if not host or not port.isdigit():
    raise DistributedSetupError(f"--coordinator_address must be HOST:PORT (process 0's host "
                                f"and a free port, e.g. 10.0.0.2:12345), got "
                                f"{coordinator_address!r}")
  if num_processes < 1:
    raise DistributedSetupError(f"--num_processes must be >= 1, got {num_processes}")
  if not 0 <= process_id < num_processes:
    raise DistributedSetupError(
        f"--process_id must be in 0..{num_processes - 1} for --num_processes "
        f"{num_processes}, got {process_id}; give each process its own id, 0 on the "
        f"coordinator's host")
  return DistributedSettings(True, coordinator_address, num_processes, process_id, timeout_s,
                             local_device_ids)


def _split_address(address: str) -> tuple[str, int]:
  host, _, port = address.rpartition(":")
  return host.strip("[]"), int(port)


def _wait_for_coordinator(address: str, deadline: float, process_id: int) -> None:
  """Polls the coordinator's port until it accepts a connection or `deadline` passes."""
  host, port = _split_address(address)
  last = None
  while True:
    try:
      socket.getaddrinfo(host, port)
    except socket.gaierror as e:
      raise DistributedSetupError(
          f"process {process_id}: the coordinator host {host!r} of --coordinator_address "
          f"{address} cannot be resolved ({e.strerror}); give process 0's host name or IP "
          f"address as this host sees it") from None
    try:
      with socket.create_connection((host, port), timeout=min(2.0, max(deadline - time.time(),
                                                                          0.1))):
        return
    except OSError as e:
      last = e.strerror or str(e)
    if time.time() >= deadline:
      raise DistributedSetupError(
          f"process {process_id}: the coordinator at {address} could not be reached within "
          f"the timeout ({last}). Start process 0 (--process_id 0) on that host, check that "
          f"the address and port are the ones it uses and that no firewall blocks the port, "
          f"or raise --distributed_timeout if process 0 starts later")
    time.sleep(0.25)


def _check_port_free(address: str) -> None:
  """Process 0 binds the coordinator's port; a port in use is named before JAX aborts."""
  _, port = _split_address(address)
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      if e.errno == errno.EADDRINUSE:
        raise DistributedSetupError(
            f"process 0: port {port} of --coordinator_address {address} is already in use on "
            f"this host (another run?); choose a free port for every process") from None


def _watchdog(settings: DistributedSettings, seconds: float) -> threading.Timer:
  """Ends the process with a message if the rendezvous has not finished in `seconds`.

  ``jax.distributed.initialize`` aborts the interpreter (a C++ fatal error, no exception)
  when its timeout passes; this fires shortly before it, so the user reads what to check.
  """
  who = (f"process {settings.process_id} of {settings.num_processes}" if settings.explicit
         else "this process")
  where = (f"the coordinator at {settings.coordinator_address}" if settings.explicit
           else "the auto-detected coordinator")

  def fire():
    print(f"ssljax: {who} waited {seconds:.0f} s (--distributed_timeout) for every process "
          f"to join {where} and gave up. Check that all processes were started with the "
          f"same --coordinator_address and --num_processes and distinct --process_id "
          f"values, and that each can reach process 0's host and port; raise "
          f"--distributed_timeout if the processes start far apart.", file=sys.stderr,
          flush=True)
    os._exit(EXIT_RENDEZVOUS_FAILED)

  timer = threading.Timer(seconds, fire)
  timer.daemon = True
  return timer


def initialize_distributed(settings: DistributedSettings | None = None, *,
                           coordinator_address: str | None = None,
                           num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
  """Connects the processes of a multi-host run; True if ``jax.distributed`` was started.

  `settings` (see `distributed_settings`) says whether and how; without it, the keyword
  arguments are explicit values (all None: auto-detection on TPU pods and SLURM). Must run
  before anything touches JAX devices. On CPU the cross-process collectives use gloo.

  Raises:
    DistributedSetupError: no cluster was detected and no address was given, the coordinator
      cannot be reached, its port is taken, or JAX's backend is already running. A
      rendezvous that does not complete within ``settings.timeout_s`` ends the process with
      exit code `EXIT_RENDEZVOUS_FAILED` and a message.
  """
  if settings is None:
    settings = DistributedSettings(
        True, coordinator_address, num_processes, process_id) if coordinator_address else (
        DistributedSettings(True))
  if not settings.enabled:
    return False
  try:  # CPU multi-process runs need a collectives implementation; GPU/TPU ignore it
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  except (AttributeError, ValueError):
    pass
  deadline = time.time() + settings.timeout_s
  if settings.explicit:
    if settings.process_id == 0:
      _check_port_free(settings.coordinator_address)
    else:
      _wait_for_coordinator(settings.coordinator_address, deadline, settings.process_id)
  # JAX's own timeout a little later than the watchdog, which then speaks first.
  timer = _watchdog(settings, max(deadline - time.time(), 1.0))
  timer.start()
  try:
    jax.distributed.initialize(
        coordinator_address=settings.coordinator_address,
        num_processes=settings.num_processes, process_id=settings.process_id,
        local_device_ids=(list(settings.local_device_ids)
                          if settings.local_device_ids is not None else None),
        initialization_timeout=settings.timeout_s + 30)
  except ValueError as e:
    if settings.explicit:
      raise DistributedSetupError(f"jax.distributed.initialize refused the settings: {e}"
                                  ) from e
    raise DistributedSetupError(
        f"--distributed (or SSLJAX_DISTRIBUTED) asks for a multi-process run, but no cluster "
        f"was detected ({e}): auto-detection covers Cloud TPU pod VMs, SLURM jobs (srun), "
        f"Open MPI and Kubernetes. Elsewhere give --coordinator_address HOST:PORT "
        f"--num_processes N --process_id I on every process") from e
  except RuntimeError as e:
    raise DistributedSetupError(
        f"jax.distributed.initialize failed: {e}. It must run before anything uses JAX "
        f"devices, once per process") from e
  finally:
    timer.cancel()
  return True
