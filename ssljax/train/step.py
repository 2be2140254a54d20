"""The train state and the one compiled data-parallel train step.

`make_per_device_step` returns the step as per-device code with explicit collectives over a
named axis: augmentation on the device's uint8 rows, the method loss, ``pmean`` of gradients,
the optax update and the method's post-update. `compile_train_step` runs it with ``jax.jit``
over a ``Mesh`` whose single axis ``data`` spans every device, via ``jax.shard_map``;
`pmap_train_step` runs the very same function under ``jax.pmap`` (a test checks both give the
same state).

Randomness: the key of step ``s`` is ``fold_in(state.rng, s)``; the augmentation key of the
row at position ``i`` of the *global* batch is ``fold_in(aug_key, i)``. A row therefore gets
the same views whatever the number of devices, so a run is reproducible across device counts.

Non-finite guard: if the loss, the gradient or the updated parameters are not finite, the
step leaves the state as it was and records the step in ``nonfinite_step``; every later
step is then a no-op. The host reads ``nonfinite_step`` at its logging and checkpoint points,
so detection needs no per-step synchronisation and a checkpoint of a non-finite state is never
written.
"""

from __future__ import annotations

from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.methods.base import Method
from ssljax.parallel import DATA_AXIS

PyTree = Any


@flax.struct.dataclass
class TrainState:
  """Everything a run carries from one step to the next (a pytree).

  Attributes:
    step: number of completed optimiser steps (int32 scalar).
    params: trained parameters.
    opt_state: optax state.
    method_state: BN statistics, EMA weights, queues, banks (see `ssljax.methods.base`).
    rng: base PRNG key data (uint32 [2]); step keys are derived by folding in the step.
    nonfinite_step: -1 while every step was finite, else the first step whose loss or
      gradient was not finite (the state is frozen from there).
  """

  step: jax.Array
  params: PyTree
  opt_state: PyTree
  method_state: PyTree
  rng: jax.Array
  nonfinite_step: jax.Array


def init_train_state(method: Method, tx: optax.GradientTransformation, policy: Callable,
                     image_shape: tuple[int, int, int], seed: int) -> TrainState:
  """Initialises a state from example views of `image_shape` (pure; jit it with shardings)."""
  rng = jax.random.PRNGKey(seed)
  init_key, run_key = jax.random.split(rng)
  images = jnp.zeros((2, *image_shape), jnp.uint8)
  keys = jax.random.split(init_key, 2)
  views = policy(keys, images)
  params, method_state = method.init(init_key, views)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    method_state=method_state, rng=run_key,
                    nonfinite_step=jnp.full((), -1, jnp.int32))


def make_per_device_step(method: Method, tx: optax.GradientTransformation, policy: Callable,
                         schedule: optax.Schedule, *, axis_name: str | None = DATA_AXIS):
  """Returns ``step(state, images, index, label) -> (state, metrics)`` for one device's rows.

  `images` is uint8 ``[n, H, W, C]``; `index` and `label` are int32 ``[n]``. All returned
  metrics are averaged over `axis_name` (so they are the same on every device).
  """

  def mean(x):
    return jax.lax.pmean(x, axis_name) if axis_name else x

  def step_fn(state: TrainState, images: jax.Array, index: jax.Array, label: jax.Array):
    n = images.shape[0]
    step_key = jax.random.fold_in(state.rng, state.step)
    aug_key, loss_key = jax.random.split(step_key)
    offset = jax.lax.axis_index(axis_name) * n if axis_name else 0
    positions = offset + jnp.arange(n)
    keys = jax.vmap(lambda i: jax.random.fold_in(aug_key, i))(positions)
    views = policy(keys, images)
    batch = {"views": views, "index": index, "label": label}

    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    (loss, (metrics, method_state)), grads = grad_fn(
        state.params, state.method_state, batch, key=loss_key, step=state.step,
        axis_name=axis_name)
    grads = mean(grads)
    if "batch_stats" in method_state:  # per-device BN (no sync): keep one average copy
      method_state = {**method_state, "batch_stats": mean(method_state["batch_stats"])}
    mask = method.update_mask(state.params, state.step) if method.update_mask else None
    if mask is not None:
      grads = _apply_mask(mask, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if mask is not None:
      updates = _apply_mask(mask, updates)
      opt_state = _keep_frozen_opt_state(mask, opt_state, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    params, method_state = method.post_update(params, method_state, step=state.step)

    loss = mean(loss)
    grad_norm = optax.tree.norm(grads)
    param_norm = optax.tree.norm(params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    ok = finite & (state.nonfinite_step < 0)
    updated = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            method_state=method_state)
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated, state)
    new_state = new_state.replace(nonfinite_step=jnp.where(
        state.nonfinite_step >= 0, state.nonfinite_step, jnp.where(finite, -1, state.step)))

    metrics = {f"train/{k}": mean(v) for k, v in metrics.items()}
    metrics.update({
        "train/loss": loss,
        "train/lr": schedule(state.step),
        "train/grad_norm": grad_norm,
        "train/param_norm": param_norm,
    })
    return new_state, metrics

  return step_fn


def _apply_mask(mask: PyTree, tree: PyTree) -> PyTree:
  """Zeroes the leaves of `tree` whose entry in `mask` (a tree prefix of bools) is False."""
  return jax.tree.map(
      lambda keep, sub: jax.tree.map(lambda x: jnp.where(keep, x, jnp.zeros_like(x)), sub),
      mask, tree)


def _keep_frozen_opt_state(mask: PyTree, new: PyTree, old: PyTree, params: PyTree) -> PyTree:
  """Frozen leaves keep their optimiser state too (momentum, Adam moments).

  PyTorch skips parameters whose gradient is None, so weight decay does not build up in their
  momentum while they are frozen. Every part of the optax state shaped like `params` is
  selected leaf by leaf; other parts (step counts) are taken from the new state.
  """
  treedef = jax.tree.structure(params)

  def params_like(node) -> bool:
    return jax.tree.structure(node) == treedef

  def select(new_node, old_node):
    if not params_like(new_node):
      return new_node
    return jax.tree.map(
        lambda keep, n, o: jax.tree.map(lambda a, b: jnp.where(keep, a, b), n, o),
        mask, new_node, old_node)

  return jax.tree.map(select, new, old, is_leaf=params_like)


def compile_train_step(per_device_step: Callable, mesh: Mesh) -> Callable:
  """``jit(shard_map(step))`` over `mesh`: state replicated, batch split along ``data``.

  The state argument is donated, so its buffers are reused for the new state.
  """
  sharded = jax.shard_map(per_device_step, mesh=mesh,
                          in_specs=(P(), P(DATA_AXIS), P(DATA_AXIS), P(DATA_AXIS)),
                          out_specs=(P(), P()), check_vma=False)
  return jax.jit(sharded, donate_argnums=(0,))


def pmap_train_step(per_device_step: Callable) -> Callable:
  """The same per-device step under ``jax.pmap``: inputs ``[devices, n, ...]``, state broadcast."""
  return jax.pmap(per_device_step, axis_name=DATA_AXIS, in_axes=(None, 0, 0, 0))

