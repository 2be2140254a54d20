"""Building add-ons: functions from a `Method` to a `Method` (DESIGN principle 5).

An add-on that learns something of its own (UOTA's view-weight model, a learned loss weight)
keeps it as one more entry of the parameter pytree, next to the base method's
``params['encoder']`` etc., so the optimiser trains it with the same step and checkpoints
save it with the rest. `add_params_entry` does the bookkeeping that every such add-on needs:
the base method's functions keep seeing exactly the parameters they created, and the add-on
sees its entry. Add-ons that change the networks themselves (MetaMask's mask inside the
forward pass) wrap `Method.init` and `Method.loss` directly instead.

Distributed caveat for add-ons that transform the base loss: a base loss returns a per-device
value whose mean over devices is the global loss (a share for SimCLR, the whole value for
Barlow Twins; see ``ssljax.losses``). A transformation that is affine in that value (a weight
and an offset, as in uncertainty weighting) keeps that convention; a non-linear one (squaring
the loss, say) does not, because the mean of squares is not the square of the mean.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable, Protocol

import jax

from ssljax.methods.base import LossOutput, Method

PyTree = Any


class AddonLossFn(Protocol):
  """``(entry, base_params, method_state, batch, *, key, step, axis_name) -> LossOutput``.

  `entry` is the add-on's parameter subtree and `base_params` the base method's parameters
  (without the entry); the add-on calls the base method's loss itself, with any arguments it
  likes, and returns the combined ``(loss, (metrics, new_method_state))``.
  """

  def __call__(self, entry: PyTree, base_params: PyTree, method_state: PyTree,
               batch: dict[str, Any], *, key: jax.Array, step: jax.Array,
               axis_name: str | None) -> LossOutput:
    ...


def add_params_entry(method: Method, entry: str, *,
                     init: Callable[[jax.Array, tuple[jax.Array, ...]], PyTree],
                     loss: AddonLossFn) -> Method:
  """`method` plus trained parameters under ``params[entry]`` and the add-on's `loss`.

  The returned method (named ``'<base name>+<entry>'``):

  * ``init(key, views)`` calls the base init with the same `key` (the base parameters are
    exactly the base method's) and ``init(fold_in(key, crc32(entry)), views)`` for the entry;
  * ``loss`` is `loss` with ``params`` split into the entry and the base parameters;
  * ``post_update``, ``update_mask`` and ``eval_variables`` are the base method's, applied to
    the base parameters only; the entry is always trained and passes through ``post_update``
    unchanged.

  Args:
    method: the base method.
    entry: the new top-level key of ``params``.
    init: ``(key, views) -> entry parameters``.
    loss: see `AddonLossFn`.

  Returns:
    The wrapped method (``method.init`` raises ValueError when the base parameters already
    hold `entry`).
  """
  entry_salt = zlib.crc32(entry.encode())

  def split(params: PyTree) -> tuple[PyTree, PyTree]:
    return params[entry], {k: v for k, v in params.items() if k != entry}

  def wrapped_init(key, views):
    params, method_state = method.init(key, views)
    if entry in params:
      raise ValueError(f"add-on entry {entry!r} is already a key of the params of "
                       f"{method.name!r}: {sorted(params)}")
    return {**params, entry: init(jax.random.fold_in(key, entry_salt), views)}, method_state

  def wrapped_loss(params, method_state, batch, *, key, step, axis_name):
    own, base_params = split(params)
    return loss(own, base_params, method_state, batch, key=key, step=step,
                axis_name=axis_name)

  def post_update(params, method_state, *, step):
    own, base_params = split(params)
    base_params, method_state = method.post_update(base_params, method_state, step=step)
    return {**base_params, entry: own}, method_state

  def update_mask(params, step):
    base_params = split(params)[1]
    base_mask = method.update_mask(base_params, step)
    if not isinstance(base_mask, dict):  # one flag for the whole base tree
      base_mask = {k: base_mask for k in base_params}
    return {**base_mask, entry: True}

  def eval_variables(params, method_state):
    return method.eval_variables(split(params)[1], method_state)

  return dataclasses.replace(
      method, name=f"{method.name}+{entry}", init=wrapped_init, loss=wrapped_loss,
      post_update=post_update, eval_variables=eval_variables,
      update_mask=update_mask if method.update_mask is not None else None)
