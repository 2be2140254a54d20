"""The data mesh's device order (config.train.mesh_device_order) and its process-block check."""

import dataclasses

import jax
import numpy as np
import pytest

from ssljax.parallel import DATA_AXIS, check_process_blocks, make_mesh


@dataclasses.dataclass(frozen=True)
class _FakeDevice:
  id: int
  process_index: int


def test_default_order_is_jax_devices_and_topology_covers_every_device_once():
  devices = jax.devices()
  mesh = make_mesh()
  assert mesh.axis_names == (DATA_AXIS,)
  assert list(mesh.devices) == list(devices)
  reversed_mesh = make_mesh(devices[::-1], device_order="topology")
  assert sorted(d.id for d in reversed_mesh.devices) == sorted(d.id for d in devices)
  assert reversed_mesh.devices.shape == (len(devices),)


def test_topology_mesh_gives_the_same_sum_as_the_default_one():
  # The order changes where rows live, not what a data-parallel reduction computes.
  x = np.arange(8 * len(jax.devices()), dtype=np.float32)
  total = []
  for order in ("devices", "topology"):
    mesh = make_mesh(jax.devices()[::-1], device_order=order)
    sharded = jax.device_put(x, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        DATA_AXIS)))
    total.append(float(jax.jit(lambda v: v.sum())(sharded)))
  assert total[0] == total[1] == float(x.sum())


def test_an_unknown_order_names_the_key_and_the_choices():
  with pytest.raises(ValueError, match=r"train.mesh_device_order must be one of .*'topology'"):
    make_mesh(device_order="ring")


def test_processes_must_own_contiguous_blocks_in_process_order():
  contiguous = [_FakeDevice(i, i // 4) for i in range(8)]
  check_process_blocks(contiguous)
  interleaved = [_FakeDevice(i, i % 2) for i in range(8)]
  with pytest.raises(ValueError, match=r"mesh_device_order=devices"):
    check_process_blocks(interleaved, "topology")
  swapped = contiguous[4:] + contiguous[:4]  # process 1's block first
  with pytest.raises(ValueError, match=r"processes \[1, 0\]"):
    check_process_blocks(swapped, "topology")


def test_the_trainer_rejects_an_unknown_order_before_writing(tmp_path):
  from ssljax.train import loop
  from tests.util import tiny_config, write_tiny_dataset
  write_tiny_dataset(str(tmp_path))
  config = tiny_config(str(tmp_path), method="simclr")
  config.train.mesh_device_order = "ring"
  with pytest.raises(loop.ConfigError, match="mesh_device_order"):
    loop.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run" / "checkpoints").exists()
