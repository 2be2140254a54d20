"""Tests for ssljax.data.pipeline: batch order, resumption, host slices, prefetch errors
and placement on an 8-device mesh."""

from __future__ import annotations

import itertools
import threading

import jax
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

from ssljax.data import ArraySource, EpochSampler, HostLoader, global_batch_indices
from ssljax.data import to_global_array


def _source(n: int = 53) -> ArraySource:
  # Image i is filled with i % 256 in channel 0 and i // 256 in channel 1.
  images = np.zeros((n, 2, 2, 3), np.uint8)
  images[..., 0] = (np.arange(n) % 256)[:, None, None]
  images[..., 1] = (np.arange(n) // 256)[:, None, None]
  return ArraySource(images, (np.arange(n) % 5).astype(np.int32))


def _take(loader: HostLoader, count: int) -> list[dict]:
  return list(itertools.islice(loader, count))


# ----------------------------------------------------------------------------- sampling


def test_each_epoch_is_a_permutation():
  n, b = 103, 10
  sampler = EpochSampler(n, b, seed=3)
  assert sampler.steps_per_epoch == 10
  epochs = []
  for epoch in range(3):
    steps = range(epoch * 10, (epoch + 1) * 10)
    indices = np.concatenate([global_batch_indices(n, b, 3, s) for s in steps])
    assert indices.shape == (100,) and len(np.unique(indices)) == 100
    assert indices.min() >= 0 and indices.max() < n
    np.testing.assert_array_equal(
        indices, np.concatenate([sampler.batch_indices(s) for s in steps]))
    epochs.append(indices)
  assert not np.array_equal(epochs[0], epochs[1])
  assert not np.array_equal(epochs[1], epochs[2])


def test_batches_are_a_pure_function_of_seed_and_step():
  np.testing.assert_array_equal(global_batch_indices(50, 8, 1, 17),
                                global_batch_indices(50, 8, 1, 17))
  assert not np.array_equal(global_batch_indices(50, 8, 1, 17),
                            global_batch_indices(50, 8, 2, 17))
  assert global_batch_indices(50, 8, 1, 17).shape == (8,)


def test_sampler_rejects_bad_arguments():
  with pytest.raises(ValueError, match="larger than the dataset"):
    global_batch_indices(10, 11, 0, 0)
  with pytest.raises(ValueError, match="step must be >= 0"):
    global_batch_indices(10, 5, 0, -1)


# ----------------------------------------------------------------------------- HostLoader


def test_loader_batches_match_the_source():
  source = _source()
  with HostLoader(source, global_batch=8, seed=0, start_step=0) as loader:
    assert loader.steps_per_epoch == 6 and loader.position == 0
    for step, batch in enumerate(_take(loader, 14)):
      assert batch["step"] == step
      assert batch["image"].shape == (8, 2, 2, 3) and batch["image"].dtype == np.uint8
      assert batch["label"].dtype == np.int32 and batch["index"].dtype == np.int32
      np.testing.assert_array_equal(batch["index"], global_batch_indices(53, 8, 0, step))
      np.testing.assert_array_equal(batch["image"], source.images[batch["index"]])
      np.testing.assert_array_equal(batch["label"], source.labels[batch["index"]])
    assert loader.position == 14


@pytest.mark.parametrize("resume_at", [1, 6, 13])
def test_resuming_reproduces_the_uninterrupted_run(resume_at):
  source = _source()
  with HostLoader(source, global_batch=8, seed=5, start_step=0, prefetch=3) as loader:
    uninterrupted = _take(loader, 20)
  with HostLoader(source, global_batch=8, seed=5, start_step=0) as loader:
    _take(loader, resume_at)
    position = loader.position  # What a checkpoint stores.
  assert position == resume_at
  with HostLoader(source, global_batch=8, seed=5, start_step=position) as loader:
    resumed = _take(loader, 20 - resume_at)
  for expected, got in zip(uninterrupted[resume_at:], resumed, strict=True):
    assert expected["step"] == got["step"]
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(expected[key], got[key])


def test_two_hosts_split_each_global_batch():
  source = _source()
  loaders = [HostLoader(source, global_batch=12, seed=2, start_step=4, process_index=p,
                        process_count=p_count)
             for p, p_count in ((0, 1), (0, 2), (1, 2))]
  try:
    single, host0, host1 = (_take(loader, 6) for loader in loaders)
  finally:
    for loader in loaders:
      loader.close()
  for whole, first, second in zip(single, host0, host1):
    assert first["image"].shape[0] == second["image"].shape[0] == 6
    assert not set(first["index"]) & set(second["index"])
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), whole[key])


def test_loader_rejects_bad_arguments():
  with pytest.raises(ValueError, match="divisible by 3"):
    HostLoader(_source(), global_batch=8, seed=0, process_count=3)
  with pytest.raises(ValueError, match="process_index"):
    HostLoader(_source(), global_batch=8, seed=0, process_index=2, process_count=2)
  with pytest.raises(ValueError, match="larger than the dataset"):
    HostLoader(_source(10), global_batch=16, seed=0)


class _FailingSource:
  """Delegates to an ArraySource but fails on its `fail_at`-th read."""

  def __init__(self, source: ArraySource, fail_at: int):
    self._source, self._fail_at, self.reads = source, fail_at, 0

  def __len__(self) -> int:
    return len(self._source)

  def get(self, indices):
    self.reads += 1
    if self.reads == self._fail_at:
      raise OSError("disk went away")
    return self._source.get(indices)


def test_prefetch_thread_error_reaches_the_consumer():
  loader = HostLoader(_FailingSource(_source(), fail_at=3), global_batch=8, seed=0)
  try:
    assert [b["step"] for b in _take(loader, 2)] == [0, 1]
    with pytest.raises(OSError, match="disk went away"):
      next(loader)
    with pytest.raises(OSError, match="disk went away"):  # Stays failed.
      next(loader)
    assert loader.position == 2
  finally:
    loader.close()


def test_close_stops_the_thread():
  before = set(threading.enumerate())
  loader = HostLoader(_source(), global_batch=8, seed=0, prefetch=1)
  started = [t for t in set(threading.enumerate()) - before if t.name == "ssljax-host-loader"]
  assert len(started) == 1 and started[0].daemon
  next(loader)
  loader.close()
  loader.close()
  assert not started[0].is_alive()
  with pytest.raises(RuntimeError, match="closed"):
    next(loader)


# ----------------------------------------------------------------------------- mesh


def test_to_global_array_shards_over_eight_devices(num_devices):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  host_batch = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
  array = to_global_array(host_batch, mesh, PartitionSpec("data"))
  assert array.shape == (16, 3) and array.dtype == np.int32
  np.testing.assert_array_equal(np.asarray(array), host_batch)
  shards = sorted(array.addressable_shards, key=lambda s: s.index[0].start)
  assert len(shards) == num_devices
  for i, shard in enumerate(shards):
    np.testing.assert_array_equal(np.asarray(shard.data), host_batch[2 * i:2 * i + 2])
  images = _source(16).images
  image_array = to_global_array(images, mesh, PartitionSpec("data"))
  assert image_array.dtype == np.uint8 and image_array.shape == (16, 2, 2, 3)
  replicated = to_global_array(host_batch[:3], mesh, PartitionSpec())
  np.testing.assert_array_equal(np.asarray(replicated), host_batch[:3])


def test_to_global_array_divisibility_error():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  with pytest.raises(ValueError) as info:
    to_global_array(np.zeros((12, 3), np.float32), mesh, PartitionSpec("data"))
  message = str(info.value)
  assert "12 rows" in message and "8 local devices" in message
  assert "choose train.batch_size divisible by 8 devices" in message


def test_to_global_array_two_dimensional_mesh():
  mesh = Mesh(np.array(jax.devices()).reshape(4, 2), ("data", "model"))
  host_batch = np.arange(8, dtype=np.float32)[:, None] * np.ones((1, 2), np.float32)
  array = to_global_array(host_batch, mesh, PartitionSpec("data"))
  np.testing.assert_array_equal(np.asarray(array), host_batch)
  with pytest.raises(ValueError, match="divisible by 4 devices"):
    to_global_array(host_batch[:6], mesh, PartitionSpec("data"))
