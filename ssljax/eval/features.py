"""Frozen-encoder feature extraction for the kNN and linear-probe evaluations.

The kNN and linear-probe protocols run on features of un-augmented images computed by
the frozen encoder in eval mode (BatchNorm with running statistics). This module turns a pure
``apply_fn(variables, x) -> [b, D]`` into features of a whole uint8 image array:

  features[i] = apply_fn(variables, images[i] / 255)

Images travel to the device as uint8 (four times less traffic than float32) and are converted
to float32 in [0, 1] inside the compiled function. One function is compiled for a fixed batch
size; the last batch is zero-padded and the padded rows are dropped. With a mesh, every batch
is split over its ``data`` axis and the variables are replicated. A mesh may span several
processes (multi-host): every process then passes the same images, copies only the rows of its
own devices, and receives all features back (an all-gather over processes).

Images too many to hold (a streaming source's ImageNet split) come as `StreamedImages`: a
count and a function that reads the images at given positions. Extraction then reads one batch
at a time, so the host holds one batch of images and the [N, D] features, never the N images.
On a mesh that spans several processes, each process reads (decodes) only the rows of the batch
that its own devices hold, so a pod's hosts share the decoding of an evaluation split instead
of each decoding all of it; the features are all-gathered as for an array. A record that cannot
be decoded then fails only the host that reads it, and the others wait for it in the next
all-gather until JAX's distributed runtime ends them (how soon was not measured here).

The compiled function is cached per ``(apply_fn, mesh)``: a training run's periodic kNN
monitor, which passes the same ``apply_fn`` each time, compiles once rather than at every call.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssljax.data.pipeline import to_global_array

ApplyFn = Callable[[Any, jax.Array], jax.Array]


@dataclasses.dataclass(frozen=True)
class StreamedImages:
  """`count` images read on demand, e.g. a subset of a `ssljax.data.StreamingSource`.

  Attributes:
    count: how many images there are (``len``).
    read: ``read(positions)`` -> uint8 ``[len(positions), H, W, C]``, the images at those
      positions in ``[0, count)``, in the order given (all of one shape).
    sync: optional collective, called on every process after `extract_features` over a mesh
      that spans several processes, where each process read only its own devices' rows; it
      completes what `read` records per row on the side (a streamed split's labels) with the
      other processes' rows.
  """

  count: int
  read: Callable[[np.ndarray], np.ndarray]
  sync: Callable[[], None] | None = None

  def __len__(self) -> int:
    return self.count

  def rows(self, start: int, stop: int) -> np.ndarray:
    """The uint8 images at positions ``[start, min(stop, count))``."""
    images = self.read(np.arange(start, min(stop, self.count)))
    chex.assert_rank(images, 4)
    chex.assert_type(images, np.uint8)
    return images

  def __getitem__(self, positions: np.ndarray) -> StreamedImages:
    """The images at an array of `positions`, still read on demand (as ``array[positions]``
    selects rows of an in-memory split)."""
    positions = np.asarray(positions)
    return StreamedImages(len(positions), lambda p: self.read(positions[p]), self.sync)


Images = np.ndarray | StreamedImages


def image_rows(images: Images, start: int, stop: int) -> np.ndarray:
  """Rows ``[start, stop)`` of an array, or read from `StreamedImages`."""
  if isinstance(images, StreamedImages):
    return images.rows(start, stop)
  return images[start:stop]


def _batch_shardings(mesh: Mesh | None) -> tuple[Any, Any]:
  """(variables sharding, batch sharding); both None without a mesh (default device)."""
  if mesh is None:
    return None, None
  if tuple(mesh.axis_names) != ("data",):
    raise ValueError(f"extract_features needs a mesh with the single axis 'data', got axes "
                     f"{tuple(mesh.axis_names)}")
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


class LocalRows:
  """Reads only this process's rows of each batch of `StreamedImages` on a multi-process mesh.

  ``P('data')`` gives each device a contiguous block of a batch's rows; this process reads the
  blocks of its own devices (padding rows past the end are zeros) and assembles the global
  batch from them, which holds the same values as ``device_put`` of the whole batch would.
  """

  def __init__(self, images: StreamedImages, batch_size: int, sharding: NamedSharding):
    self.images, self.sharding = images, sharding
    blocks = sorted(index[0].indices(batch_size)[:2] for index in
                    sharding.addressable_devices_indices_map((batch_size,)).values())
    self.rows = np.concatenate([np.arange(start, stop) for start, stop in blocks])
    self.image_shape: tuple[int, ...] | None = None

  def read(self, start: int) -> np.ndarray:
    """This process's rows of the batch at `start`, in `self.rows` order (zeros past the end)."""
    positions = start + self.rows
    real = positions[positions < len(self.images)]
    if len(real):
      local = self.images.read(real)
      chex.assert_rank(local, 4)
      chex.assert_type(local, np.uint8)
      self.image_shape = local.shape[1:]
    else:
      if self.image_shape is None:  # only padding here, in the only batch: learn the shape
        self.image_shape = self.images.read(np.zeros((1,), np.int64)).shape[1:]
      local = np.zeros((0, *self.image_shape), np.uint8)
    if len(real) < len(positions):
      padding = np.zeros((len(positions) - len(real), *local.shape[1:]), np.uint8)
      local = np.concatenate([local, padding])
    return local

  def global_batch(self, local: np.ndarray) -> jax.Array:
    """The global batch from this process's rows (`read`'s output), as the train loader's."""
    return to_global_array(local, self.sharding.mesh, self.sharding.spec)


def batch_reader(images: Images, batch_size: int, sharding: NamedSharding | None
                 ) -> tuple[Callable[[int], np.ndarray], Callable[[np.ndarray], jax.Array]]:
  """``(read, put)``: ``read(start)`` is the host side of the batch of `batch_size` images at
  `start` (zero-padded past the end) and ``put`` makes it the batch sharded by `sharding`
  (None: the default device). `StreamedImages` on a mesh that spans several processes are read
  only in this process's rows (`LocalRows`); everything else is read whole."""
  if (isinstance(images, StreamedImages) and sharding is not None
      and sharding.mesh.is_multi_process):
    local = LocalRows(images, batch_size, sharding)
    return local.read, local.global_batch

  def read(start: int) -> np.ndarray:
    batch = image_rows(images, start, start + batch_size)
    if batch.shape[0] < batch_size:
      padding = np.zeros((batch_size - batch.shape[0], *batch.shape[1:]), np.uint8)
      batch = np.concatenate([batch, padding])
    return batch

  return read, lambda batch: jax.device_put(batch, sharding)


def _to_host(features: jax.Array) -> np.ndarray:
  """The whole (global) array on this host, gathering other processes' rows if needed."""
  if features.is_fully_addressable:
    return np.asarray(features)
  return np.asarray(multihost_utils.process_allgather(features, tiled=True))


def _build_features_fn(apply_fn: ApplyFn, mesh: Mesh | None) -> Callable[..., jax.Array]:
  """``jit`` of ``(variables, uint8 batch) -> float32 features`` for `apply_fn` on `mesh`."""
  variables_sharding, batch_sharding = _batch_shardings(mesh)

  def features_of_batch(variables: Any, batch: jax.Array) -> jax.Array:
    out = apply_fn(variables, batch.astype(jnp.float32) / 255.0)
    chex.assert_rank(out, 2)
    chex.assert_axis_dimension(out, 0, batch.shape[0])
    return out.astype(jnp.float32)

  if mesh is None:
    return jax.jit(features_of_batch)
  return jax.jit(features_of_batch, in_shardings=(variables_sharding, batch_sharding),
                 out_shardings=batch_sharding)


_cached_features_fn = functools.lru_cache(maxsize=16)(_build_features_fn)


def _compiled_features(apply_fn: ApplyFn, mesh: Mesh | None) -> Callable[..., jax.Array]:
  """`_build_features_fn`, reused while `apply_fn` and `mesh` are the same (hashable) objects."""
  try:
    return _cached_features_fn(apply_fn, mesh)
  except TypeError:  # an unhashable callable: compile for this call only
    return _build_features_fn(apply_fn, mesh)


def extract_features(apply_fn: ApplyFn, variables: Any, images: Images, *,
                     batch_size: int, mesh: Mesh | None = None) -> np.ndarray:
  """Features of every image under a frozen encoder: ``apply_fn(variables, images / 255)``.

  Args:
    apply_fn: pure function ``(variables, x) -> [b, D]`` with ``x`` float32 in [0, 1] of shape
      [b, H, W, C]; the caller closes over eval-mode settings (e.g. ``train=False``).
    variables: the encoder's variable pytree (parameters and batch statistics).
    images: uint8 array [N, H, W, C], N >= 1, or `StreamedImages` of N >= 1 images, read one
      batch at a time (the host then holds one batch of images, not N).
    batch_size: images per compiled call. The last batch is zero-padded to this size.
    mesh: optional ``Mesh`` with the one axis ``'data'``. Each batch is sharded as
      ``P('data')`` (so ``batch_size`` must be divisible by ``mesh.size``) and the variables
      are replicated. Without it everything runs on the default device. If the mesh spans
      several processes, all of them must call this with the same arguments.

  Returns:
    float32 array [N, D] on the host (on every host), row i the feature of ``images[i]``.

  Transfers overlap with compute: batch i + 1 is copied and dispatched before the result of
  batch i is pulled back to the host, and `StreamedImages` are read one batch ahead in a
  background thread.
  """
  if not isinstance(images, StreamedImages):
    chex.assert_rank(images, 4)
    chex.assert_type(images, np.uint8)
  num_images = len(images)
  if num_images == 0:
    raise ValueError("extract_features got an empty image array")
  if batch_size < 1:
    raise ValueError(f"batch_size must be >= 1, got {batch_size}")
  variables_sharding, batch_sharding = _batch_shardings(mesh)
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {mesh.size} devices of "
                     "the mesh's 'data' axis")

  compiled = _compiled_features(apply_fn, mesh)
  variables = jax.device_put(variables, variables_sharding)

  results: list[np.ndarray] = []
  pending: jax.Array | None = None
  streamed = isinstance(images, StreamedImages)
  # Streamed images are read one batch ahead in a background thread, so that the host's
  # decoding of batch i + 1 overlaps the device's work on batch i.
  reader = concurrent.futures.ThreadPoolExecutor(1) if streamed else None
  read, to_device = batch_reader(images, batch_size, batch_sharding)
  try:
    ahead = reader.submit(read, 0) if reader else None
    for start in range(0, num_images, batch_size):
      if reader:
        batch = ahead.result()
        if start + batch_size < num_images:
          ahead = reader.submit(read, start + batch_size)
      else:
        batch = read(start)
      out = compiled(variables, to_device(batch))
      if pending is not None:
        results.append(_to_host(pending))
      pending = out
    results.append(_to_host(pending))
  finally:
    if reader:
      reader.shutdown(cancel_futures=True)
  if streamed and images.sync is not None and mesh is not None and mesh.is_multi_process:
    images.sync()  # each process read only its own rows (`batch_reader`)
  return np.concatenate(results)[:num_images]
