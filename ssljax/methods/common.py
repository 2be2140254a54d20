"""Building blocks that several methods share: EMA teachers, momentum schedules, FIFO queues,
forward passes over a list of views.

All functions are pure and work on pytrees or arrays inside the compiled step.
"""

from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssljax.methods.base import apply_module

PyTree = Any


def ema_update(target: PyTree, online: PyTree, momentum: jax.Array | float) -> PyTree:
  """``target <- m * target + (1 - m) * online`` leaf by leaf (MoCo / BYOL / DINO teachers)."""
  return jax.tree.map(lambda t, o: momentum * t + (1.0 - momentum) * o, target, online)


def cosine_ema_momentum(step: jax.Array, total_steps: int, base: float,
                        final: float = 1.0) -> jax.Array:
  """BYOL's schedule: ``final - (final - base) * (cos(pi * step / total) + 1) / 2``.

  Rises from `base` at step 0 to `final` at `total_steps` (BYOL, Grill et al. 2020, Sec. 3.2;
  deepmind-research ``byol/utils/schedules.py`` ``target_ema``).
  """
  progress = jnp.clip(step.astype(jnp.float32) / max(total_steps, 1), 0.0, 1.0)
  return final - (final - base) * (jnp.cos(jnp.pi * progress) + 1.0) / 2.0


def fifo_enqueue(queue: jax.Array, pointer: jax.Array, rows: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
  """Writes `rows` into the ring buffer `queue` at `pointer`; returns (queue, new pointer).

  The oldest rows are overwritten first. ``len(queue)`` must be a multiple of ``len(rows)``
  (the builders check it with a readable error), so a write never wraps around.
  """
  size, n = queue.shape[0], rows.shape[0]
  if size % n:
    raise ValueError(f"queue length {size} is not a multiple of the rows enqueued per step "
                     f"({n})")
  queue = jax.lax.dynamic_update_slice_in_dim(queue, rows.astype(queue.dtype), pointer, axis=0)
  return queue, (pointer + n) % size


def check_queue_length(name: str, queue_size: int, global_batch: int, key: str) -> None:
  """Raises a readable error unless `queue_size` is a positive multiple of `global_batch`."""
  if queue_size <= 0 or queue_size % global_batch:
    lower = max(global_batch, queue_size // global_batch * global_batch)
    raise ValueError(
        f"{name}: {key} = {queue_size} must be a positive multiple of the global batch "
        f"(train.batch_size = {global_batch}), because each step enqueues the whole global "
        f"batch; use e.g. --config.{key}={lower}")


def apply_to_views(module: nn.Module, params: PyTree, batch_stats: PyTree,
                   inputs: Sequence[jax.Array], *, per_view: bool
                   ) -> tuple[list[jax.Array], PyTree]:
  """Applies `module` in training mode to a list of views; returns (outputs, batch_stats).

  ``per_view=True``: one forward per view, in order, each normalised by its own BN batch
  statistics; the running statistics are updated view after view (as a PyTorch module called
  once per view). ``per_view=False``: consecutive views of equal shape are concatenated into
  one forward (BN over all of them; views of another resolution form the next forward, as
  DINO's multi-crop wrapper does). Every view has the same number of rows.
  """
  groups: list[list[jax.Array]] = []
  for x in inputs:
    if not per_view and groups and groups[-1][0].shape == x.shape:
      groups[-1].append(x)
    else:
      groups.append([x])
  outputs = []
  for group in groups:
    out, batch_stats = apply_module(module, params, batch_stats, jnp.concatenate(group, 0))
    outputs.extend(jnp.split(out, len(group), axis=0))
  return outputs, batch_stats


def check_ema_momenta(name: str, base: float, final: float) -> None:
  """Raises a readable error unless 0 <= base <= final <= 1."""
  if not 0.0 <= base <= final <= 1.0:
    raise ValueError(f"method.{name}.ema_momentum ({base}) and ema_momentum_final ({final}) "
                     f"must satisfy 0 <= ema_momentum <= ema_momentum_final <= 1")
