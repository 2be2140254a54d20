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

The step body (gradients, optimiser update(s), method state) is `gradient_update` unless the
method brings its own (``Method.update``, an `UpdateFn`); augmentation before it and the guard
and metric averaging after it are the same for both.

Non-finite guard: if the loss, the gradient or the updated parameters are not finite, the
step leaves the state as it was and records the step in ``nonfinite_step``; every later
step is then a no-op. The host reads ``nonfinite_step`` at its logging and checkpoint points,
so detection needs no per-step synchronisation and a checkpoint of a non-finite state is never
written.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Protocol

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
  """Initialises a state from example views of `image_shape` (pure; jit it with shardings).

  The example views and the method's parameters draw from independent keys.
  """
  rng = jax.random.PRNGKey(seed)
  init_key, run_key = jax.random.split(rng)
  images = jnp.zeros((2, *image_shape), jnp.uint8)
  keys = jax.random.split(jax.random.fold_in(init_key, _VIEW_KEY_SALT), 2)
  views = policy(keys, images)
  params, method_state = method.init(init_key, views)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    method_state=method_state, rng=run_key,
                    nonfinite_step=jnp.full((), -1, jnp.int32))


_VIEW_KEY_SALT = 0x76696577  # 'view': the example views' key, apart from method.init's


class UpdateOutput(NamedTuple):
  """What a step body returns (the default body or a method's own, `UpdateFn`).

  Attributes:
    params, opt_state, method_state: the new state's parts.
    loss: this device's loss value (the step averages it over devices).
    grads: the gradient the update used, averaged over devices (for ``train/grad_norm`` and
      the non-finite guard).
    metrics: this device's scalars (the step averages them and prefixes ``train/``).
  """

  params: PyTree
  opt_state: PyTree
  method_state: PyTree
  loss: jax.Array
  grads: PyTree
  metrics: dict[str, jax.Array]


class UpdateFn(Protocol):
  """A method's own step body: ``Method.update``.

  Called once per step on one device's rows, with the state as it is before the step, the
  augmented `batch` (see ``ssljax.methods.base``), the step's `key` for the method's own
  randomness, the data `axis_name` (None on one device without a mesh), the optimiser `tx`
  (built with the method's parameter groups) and the learning-rate `schedule`. It returns
  `UpdateOutput`. Its gradients must be averaged over `axis_name` (``mean_over``) before an
  optimiser uses them, and frozen leaves (``method.update_mask``) are its own business
  (`masked_update` does what the default body does). The step then applies the non-finite
  guard, advances ``state.step`` and averages the metrics over devices, as for the default
  body.
  """

  def __call__(self, state: TrainState, batch: dict[str, Any], *, key: jax.Array,
               axis_name: str | None, tx: optax.GradientTransformation,
               schedule: optax.Schedule) -> UpdateOutput:
    ...


def mean_over(tree: PyTree, axis_name: str | None) -> PyTree:
  """``pmean`` over `axis_name` (the tree itself without an axis)."""
  return jax.lax.pmean(tree, axis_name) if axis_name else tree


def average_batch_stats(method_state: PyTree, axis_name: str | None) -> PyTree:
  """Per-device BN statistics (no sync) averaged into one copy, as the default body keeps."""
  if "batch_stats" in method_state:
    return {**method_state, "batch_stats": mean_over(method_state["batch_stats"], axis_name)}
  return method_state


def masked_update(method: Method, tx: optax.GradientTransformation, grads: PyTree,
                  opt_state: PyTree, params: PyTree, step: jax.Array
                  ) -> tuple[PyTree, PyTree, PyTree]:
  """One optimiser update that honours ``method.update_mask``; ``(params, opt_state, grads)``.

  Frozen leaves get a zero gradient, no update, and keep their optimiser state. The returned
  `grads` are the masked gradients.
  """
  mask = method.update_mask(params, step) if method.update_mask else None
  if mask is not None:
    grads = _apply_mask(mask, grads)
  updates, new_opt_state = tx.update(grads, opt_state, params)
  if mask is not None:
    updates = _apply_mask(mask, updates)
    new_opt_state = _keep_frozen_opt_state(mask, new_opt_state, opt_state, params)
  return optax.apply_updates(params, updates), new_opt_state, grads


def gradient_update(method: Method) -> UpdateFn:
  """The default step body: one ``value_and_grad`` of ``method.loss``, ``pmean`` of the
  gradient (and of unsynchronised BN statistics), one masked optimiser update, then
  ``method.post_update``."""

  def update(state, batch, *, key, axis_name, tx, schedule):
    del schedule
    grad_fn = jax.value_and_grad(method.loss, has_aux=True)
    (loss, (metrics, method_state)), grads = grad_fn(
        state.params, state.method_state, batch, key=key, step=state.step,
        axis_name=axis_name)
    grads = mean_over(grads, axis_name)
    method_state = average_batch_stats(method_state, axis_name)
    params, opt_state, grads = masked_update(method, tx, grads, state.opt_state, state.params,
                                             state.step)
    params, method_state = method.post_update(params, method_state, step=state.step)
    return UpdateOutput(params, opt_state, method_state, loss, grads, metrics)

  return update


def make_per_device_step(method: Method, tx: optax.GradientTransformation, policy: Callable,
                         schedule: optax.Schedule, *, axis_name: str | None = DATA_AXIS):
  """Returns ``step(state, images, index, label) -> (state, metrics)`` for one device's rows.

  `images` is uint8 ``[n, H, W, C]``; `index` and `label` are int32 ``[n]``. The body is
  ``method.update`` if the method has one, else `gradient_update`. All returned metrics are
  averaged over `axis_name` (so they are the same on every device).

  The per-device losses follow the convention of ``ssljax.losses`` (the mean over devices of
  values and gradients is the global one), which holds under ``shard_map(check_vma=False)``
  and ``pmap``; under ``check_vma=True`` the gradients of replicated parameters through
  gathered negatives would be counted once per device, so the step refuses to be traced there.
  """
  body = method.update or gradient_update(method)

  def step_fn(state: TrainState, images: jax.Array, index: jax.Array, label: jax.Array):
    _refuse_varying_types(images, axis_name)
    n = images.shape[0]
    step_key = jax.random.fold_in(state.rng, state.step)
    aug_key, loss_key = jax.random.split(step_key)
    offset = jax.lax.axis_index(axis_name) * n if axis_name else 0
    positions = offset + jnp.arange(n)
    keys = jax.vmap(lambda i: jax.random.fold_in(aug_key, i))(positions)
    views = policy(keys, images)
    batch = {"views": views, "index": index, "label": label}

    out = body(state, batch, key=loss_key, axis_name=axis_name, tx=tx, schedule=schedule)
    loss = mean_over(out.loss, axis_name)
    grad_norm = optax.tree.norm(out.grads)
    param_norm = optax.tree.norm(out.params)
    finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & jnp.isfinite(param_norm)
    ok = finite & (state.nonfinite_step < 0)
    updated = state.replace(step=state.step + 1, params=out.params, opt_state=out.opt_state,
                            method_state=out.method_state)
    # An element-wise select, which XLA fuses into the (donated) output buffers: returning
    # one of the two states with lax.cond instead needs more memory, not less (XLA CPU's
    # estimate for a ResNet-18 BYOL step: 739 vs 727 MiB; benchmarks/guard_memory.py).
    new_state = jax.tree.map(lambda new, old: jnp.where(ok, new, old), updated, state)
    new_state = new_state.replace(nonfinite_step=jnp.where(
        state.nonfinite_step >= 0, state.nonfinite_step, jnp.where(finite, -1, state.step)))

    metrics = {f"train/{k}": mean_over(v, axis_name) for k, v in out.metrics.items()}
    metrics.update({
        "train/loss": loss,
        "train/lr": schedule(state.step),
        "train/grad_norm": grad_norm,
        "train/param_norm": param_norm,
    })
    return new_state, metrics

  return step_fn


def _refuse_varying_types(images: jax.Array, axis_name: str | None) -> None:
  """Raises if the step is traced under ``shard_map(check_vma=True)`` (see the step)."""
  if axis_name is None:
    return
  aval = jax.typeof(images)
  varying = getattr(aval, "vma", None)  # jax 0.7-0.9; 0.10 moved it to manual_axis_type
  if varying is None:
    varying = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
  if axis_name in varying:
    raise ValueError(
        "the ssljax train step runs under shard_map(check_vma=False) or pmap: its losses "
        "return per-device values whose pmean is the global loss (ssljax.losses), which "
        "check_vma=True would differentiate differently (gradients of replicated parameters "
        "summed over devices). Use ssljax.train.step.compile_train_step, or pass "
        "check_vma=False to jax.shard_map")


def _apply_mask(mask: PyTree, tree: PyTree) -> PyTree:
  """Zeroes the leaves of `tree` whose entry in `mask` (a tree prefix of bools) is False."""
  return jax.tree.map(
      lambda keep, sub: jax.tree.map(lambda x: jnp.where(keep, x, jnp.zeros_like(x)), sub),
      mask, tree)


def _keep_frozen_opt_state(mask: PyTree, new: PyTree, old: PyTree, params: PyTree) -> PyTree:
  """Frozen leaves keep their optimiser state too (momentum, Adam moments).

  PyTorch skips parameters whose gradient is None, so weight decay does not build up in their
  momentum while they are frozen. Every part of the optax state shaped like `params` is
  selected leaf by leaf; other parts (step counts) are taken from the new state. Under
  parameter groups (``optax.multi_transform``) a group's state is shaped like `params` with
  ``optax.MaskedNode`` in place of the other groups' leaves; those are kept as they are.
  """
  treedef = jax.tree.structure(params)
  is_masked = lambda x: isinstance(x, optax.MaskedNode)

  def params_like(node) -> bool:
    return jax.tree.structure(node, is_leaf=is_masked) == treedef

  # One flag per parameter leaf, in the leaf order of `params`.
  flags = jax.tree.leaves(jax.tree.map(lambda keep, sub: jax.tree.map(lambda _: keep, sub),
                                       mask, params))

  def select(new_node, old_node):
    if not params_like(new_node):
      return new_node
    new_leaves, node_def = jax.tree.flatten(new_node, is_leaf=is_masked)
    old_leaves = jax.tree.leaves(old_node, is_leaf=is_masked)
    return jax.tree.unflatten(node_def, [
        a if is_masked(a) else jnp.where(keep, a, b)
        for keep, a, b in zip(flags, new_leaves, old_leaves)])

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

