"""Host input pipeline: deterministic batch order, per-host slices, prefetch, mesh placement.

The order of examples is a pure function of ``(num_examples, global_batch, seed, step)``:
epoch ``e = step // steps_per_epoch`` visits a permutation of ``range(N)`` seeded by
``(seed, e)``, cut into ``N // global_batch`` batches (the remainder is dropped). A run
that resumes at step ``s`` therefore sees exactly the batches an uninterrupted run sees
from ``s`` on; the checkpoint only needs to store ``HostLoader.position``.

With several hosts, host ``p`` of ``P`` loads rows ``[p * B / P, (p + 1) * B / P)`` of each
global batch ``B``; :func:`to_global_array` then assembles the per-host rows into one
``jax.Array`` sharded over the mesh, in host order.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import queue
import threading
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ssljax.data.sources import ArraySource


def _check_sampling_args(num_examples: int, global_batch: int, seed: int) -> None:
  if global_batch < 1:
    raise ValueError(f"global_batch must be >= 1, got {global_batch}.")
  if global_batch > num_examples:
    raise ValueError(
        f"global_batch {global_batch} is larger than the dataset ({num_examples} "
        "examples), so an epoch holds no full batch; lower train.batch_size.")
  if seed < 0:
    raise ValueError(f"seed must be >= 0, got {seed}.")


def _epoch_permutation(num_examples: int, seed: int, epoch: int) -> np.ndarray:
  return np.random.default_rng((seed, epoch)).permutation(num_examples)


def global_batch_indices(num_examples: int, global_batch: int, seed: int,
                         step: int) -> np.ndarray:
  """Returns the dataset indices of global batch number `step` (counted from 0).

  Epoch ``step // (num_examples // global_batch)`` is the permutation
  ``np.random.default_rng((seed, epoch)).permutation(num_examples)``; the batch is its
  slice number ``step % steps_per_epoch``. The trailing ``num_examples % global_batch``
  examples of each permutation are dropped.

  Returns:
    int64 ``[global_batch]``, distinct within an epoch.
  """
  return EpochSampler(num_examples, global_batch, seed).batch_indices(step)


@dataclasses.dataclass
class EpochSampler:
  """:func:`global_batch_indices` with the current epoch's permutation cached.

  Not thread-safe: each thread needs its own sampler.
  """

  num_examples: int
  global_batch: int
  seed: int
  _cached: tuple[int, np.ndarray] | None = dataclasses.field(
      default=None, init=False, repr=False)

  def __post_init__(self):
    _check_sampling_args(self.num_examples, self.global_batch, self.seed)

  @property
  def steps_per_epoch(self) -> int:
    """Full global batches per epoch, ``num_examples // global_batch``."""
    return self.num_examples // self.global_batch

  def batch_indices(self, step: int) -> np.ndarray:
    """int64 ``[global_batch]`` dataset indices of global batch `step` (>= 0)."""
    if step < 0:
      raise ValueError(f"step must be >= 0, got {step}.")
    epoch, offset = divmod(step, self.steps_per_epoch)
    if self._cached is None or self._cached[0] != epoch:
      self._cached = (epoch, _epoch_permutation(self.num_examples, self.seed, epoch))
    start = offset * self.global_batch
    return self._cached[1][start:start + self.global_batch]


@dataclasses.dataclass(frozen=True)
class _Failure:
  """Carries an exception from the producer thread to the consumer."""

  error: BaseException


class HostLoader:
  """Iterator over this host's slice of every global batch, prepared in a background thread.

  Each item is a dict:
    image  uint8 ``[global_batch // process_count, H, W, C]``
    label  int32 ``[global_batch // process_count]`` (-1 for unlabelled examples)
    index  int32 ``[global_batch // process_count]``, dataset index of each row
    step   int, the global batch number

  Steps run from `start_step` without end; the caller decides how many to take. A
  background daemon thread keeps up to `prefetch` batches ready; an exception raised
  there is re-raised by the next ``next()``. Call :meth:`close` (or use ``with``) to stop
  the thread.
  """

  def __init__(self, source: ArraySource, *, global_batch: int, seed: int,
               start_step: int = 0, process_index: int = 0, process_count: int = 1,
               prefetch: int = 2):
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(
          f"Need 0 <= process_index < process_count, got process_index={process_index}, "
          f"process_count={process_count}.")
    if global_batch % process_count:
      raise ValueError(
          f"The global batch ({global_batch}) must split evenly over the "
          f"{process_count} hosts; choose train.batch_size divisible by {process_count}.")
    if prefetch < 1:
      raise ValueError(f"prefetch must be >= 1, got {prefetch}.")
    if start_step < 0:
      raise ValueError(f"start_step must be >= 0, got {start_step}.")
    self._source = source
    self._sampler = EpochSampler(len(source), global_batch, seed)
    rows = global_batch // process_count
    self._rows = slice(process_index * rows, (process_index + 1) * rows)
    self._position = start_step
    self._failure: BaseException | None = None
    self._closed = False
    self._queue: queue.Queue[dict[str, Any] | _Failure] = queue.Queue(maxsize=prefetch)
    self._stop = threading.Event()
    self._thread = threading.Thread(
        target=self._produce, args=(start_step,), name="ssljax-host-loader", daemon=True)
    self._thread.start()

  @property
  def position(self) -> int:
    """The step of the next batch ``next()`` returns (what a checkpoint stores)."""
    return self._position

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch (the remainder of each epoch is dropped)."""
    return self._sampler.steps_per_epoch

  def _host_batch(self, step: int) -> dict[str, Any]:
    indices = self._sampler.batch_indices(step)[self._rows]
    examples = self._source.get(indices)
    return {"image": examples["image"], "label": examples["label"],
            "index": indices.astype(np.int32), "step": step}

  def _put(self, item: dict[str, Any] | _Failure) -> bool:
    """Enqueues `item`, giving up (False) once :meth:`close` is called."""
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=0.05)
        return True
      except queue.Full:
        continue
    return False

  def _produce(self, step: int) -> None:
    try:
      while not self._stop.is_set():
        if not self._put(self._host_batch(step)):
          return
        step += 1
    except BaseException as e:  # pylint: disable=broad-except  (handed to the consumer)
      logging.exception("Host loader thread failed at step %d.", step)
      self._put(_Failure(e))

  def __iter__(self) -> HostLoader:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._failure is not None:
      raise self._failure
    if self._closed:
      raise RuntimeError("HostLoader is closed.")
    item = self._queue.get()
    if isinstance(item, _Failure):
      self._failure = item.error
      raise item.error
    self._position = item["step"] + 1
    return item

  def close(self) -> None:
    """Stops the prefetch thread and waits for it to exit. Idempotent."""
    self._closed = True
    self._stop.set()
    while True:
      try:
        self._queue.get_nowait()
      except queue.Empty:
        break
    self._thread.join()

  def __enter__(self) -> HostLoader:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


def to_global_array(host_batch: np.ndarray, mesh: Mesh,
                    partition_spec: PartitionSpec) -> jax.Array:
  """Assembles every host's rows into one global ``jax.Array`` on `mesh`.

  Wraps ``jax.make_array_from_process_local_data``: with the batch axis sharded over
  mesh axes holding ``D`` devices in all, host ``p`` of ``P`` contributes rows
  ``[p * n, (p + 1) * n)`` of the global ``[P * n, ...]`` array, where ``n`` is this
  host's batch, and each of its local devices receives ``P * n / D`` of them.

  Args:
    host_batch: this host's rows, ``[n, ...]``.
    mesh: the device mesh.
    partition_spec: the sharding of the global array, e.g. ``PartitionSpec('data')``.

  Raises:
    ValueError: if the batch axis is sharded and ``n`` does not divide over this host's
      share of the devices.
  """
  host_batch = np.asarray(host_batch)
  batch_axes = partition_spec[0] if len(partition_spec) else None
  if batch_axes is not None:
    batch_axes = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    shards = math.prod(mesh.shape[a] for a in batch_axes)
    local_shards = max(1, shards * len(mesh.local_devices) // mesh.devices.size)
    if host_batch.shape[0] % local_shards:
      raise ValueError(
          f"This host's batch has {host_batch.shape[0]} rows, which do not split evenly "
          f"over its {local_shards} local devices (the batch axis is sharded over mesh "
          f"axes {batch_axes}, {shards} devices in all); choose train.batch_size "
          f"divisible by {shards} devices.")
  return jax.make_array_from_process_local_data(NamedSharding(mesh, partition_spec),
                                                host_batch)
