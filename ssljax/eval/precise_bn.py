"""Re-estimated BatchNorm statistics for evaluation ("precise BN", Wu & Johnson 2021).

Training-mode BatchNorm keeps exponential running averages of the statistics of augmented
training views. Evaluation runs on clean, full-size images, whose activations can have other
statistics, most of all when the views are smaller than the images (``augment.crop_size`` below
the image size: objects appear at another scale, the FixRes train/test discrepancy of Touvron
et al. 2019). `precise_batch_stats` replaces the running statistics with the average, over
full batches of clean images, of the statistics training-mode BatchNorm computes on each
batch. Only BatchNorm statistics change, never a parameter, and no label is read; the images
should come from the training split.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ssljax.eval.features import Images, StreamedImages, batch_reader


def _build_statistics_fn(module: nn.Module, mesh: Mesh | None) -> Callable[..., Any]:
  """``jit`` of ``(variables, uint8 batch) -> this batch's BN statistics`` for `module`."""

  def batch_statistics(variables: Any, batch: jax.Array) -> Any:
    _, updated = module.apply(variables, batch.astype(jnp.float32) / 255.0, train=True,
                              mutable=["batch_stats"])
    return updated["batch_stats"]

  if mesh is None:
    return jax.jit(batch_statistics)
  replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
  return jax.jit(batch_statistics, in_shardings=(replicated, split), out_shardings=replicated)


_cached_statistics_fn = functools.lru_cache(maxsize=16)(_build_statistics_fn)


def _compiled_statistics(module: nn.Module, mesh: Mesh | None) -> Callable[..., Any]:
  """`_build_statistics_fn`, compiled once per equal (hashable) module and mesh: a training
  run's periodic kNN monitor re-estimates the statistics without recompiling."""
  try:
    return _cached_statistics_fn(module, mesh)
  except TypeError:  # a module with unhashable fields
    return _build_statistics_fn(module, mesh)


def precise_batch_stats(module: nn.Module, variables: Any, images: Images, *,
                        batch_size: int, mesh: Mesh | None = None) -> Any:
  """`variables` with ``batch_stats`` re-estimated on `images` (see the module docstring).

  Args:
    module: the Flax encoder whose variables these are. It must expose ``bn_momentum`` and
      ``axis_name`` fields (ssljax's ResNet does) and take ``(x, train=...)``.
    variables: ``{'params': ..., 'batch_stats': ...}`` of `module`.
    images: uint8 ``[N, H, W, C]`` clean images (scaled to [0, 1] inside), N >= batch_size,
      or `StreamedImages` of N images, read one batch at a time.
    batch_size: images per batch; BatchNorm statistics are computed over each whole batch
      (over every device of `mesh`) and averaged over the ``N // batch_size`` full batches.
    mesh: optional ``Mesh`` with the one axis ``'data'``; each batch is split over it. On a
      mesh that spans several processes, each process reads only its own devices' rows of
      `StreamedImages` (all must call this with the same arguments).

  Returns:
    A copy of `variables` whose ``batch_stats`` leaves are the averaged batch statistics.

  Raises:
    ValueError: fewer images than one batch, or a module without the BatchNorm fields.
  """
  if not isinstance(images, StreamedImages):
    chex.assert_rank(images, 4)
    chex.assert_type(images, np.uint8)
  if batch_size < 1 or len(images) < batch_size:
    raise ValueError(f"precise BN needs at least one full batch: got {len(images)} images "
                     f"for batch_size {batch_size}")
  if "batch_stats" not in variables:
    return variables
  missing = [f for f in ("bn_momentum", "axis_name") if not hasattr(module, f)]
  if missing:
    raise ValueError(f"precise BN needs an encoder with fields {missing}; "
                     f"{type(module).__name__} has none (set eval.precise_bn_examples = 0)")
  # Momentum 0: the "running" statistics an apply returns are exactly this batch's. No axis
  # name: under jit the batch mean over a sharded batch is already the global mean.
  recalibrating = module.clone(bn_momentum=0.0, axis_name=None)
  if mesh is not None and batch_size % mesh.size:
    raise ValueError(f"batch_size {batch_size} is not divisible by the {mesh.size} devices")
  compiled = _compiled_statistics(recalibrating, mesh)
  split = None
  if mesh is not None:
    replicated, split = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))
    variables = jax.device_put(variables, replicated)
  read, put = batch_reader(images, batch_size, split)  # own rows only on several processes
  num_batches = len(images) // batch_size
  total = None
  for i in range(num_batches):
    stats = compiled(variables, put(read(i * batch_size)))
    total = stats if total is None else jax.tree.map(jnp.add, total, stats)
  return {**variables, "batch_stats": jax.tree.map(lambda t: t / num_batches, total)}
