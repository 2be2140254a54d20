"""Building add-ons: functions from a `Method` to a `Method` that wrap its stages.

What an add-on can reach (``ssljax.methods.base`` describes the stages):

* the backbone features, before the heads: wrap ``features`` (MetaMask's mask multiplies
  them), in training and in inference mode;
* a head of its own on the features and a loss on it: wrap ``embed`` to add an embedding and
  ``objective`` to add a term to the value (CLD's group branch);
* the per-(view, image) terms of a decomposing objective: `weight_terms` (UOTA);
* the whole step: ``Method.update`` (MetaMask's meta-step, ``ssljax.train.step.UpdateFn``);
* parameters of its own: `add_params_entry` keeps them under ``params[entry]``, next to the
  base method's ``params['encoder']`` etc., so the optimiser trains them in the same step
  (with their own `ParamGroup` if given) and checkpoints save them.

Distributed caveat for add-ons that transform the base loss: a base loss returns a per-device
value whose mean over devices is the global loss (a share for SimCLR, the whole value for
Barlow Twins; see ``ssljax.losses``). A transformation that is affine in that value (a weight
and an offset, a weighted sum of per-(view, image) terms) keeps that convention; a non-linear
one (squaring the loss, say) does not, because the mean of squares is not the square of the
mean.

``tests/methods/test_addons.py`` has a worked example of each.
"""

from __future__ import annotations

import dataclasses
import zlib
from typing import Any, Callable

import jax

from ssljax.methods.base import Method, Objective, ParamGroup, reduce_terms

PyTree = Any
WeightFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def add_params_entry(method: Method, entry: str, *,
                     init: Callable[[jax.Array, tuple[jax.Array, ...]], PyTree],
                     group: ParamGroup | None = None) -> Method:
  """`method` with trained parameters of an add-on under ``params[entry]``.

  The returned method (named ``'<base name>+<entry>'``):

  * ``init(key, views)`` calls the base init with the same `key` (the base parameters are
    exactly the base method's) and ``init(fold_in(key, crc32(entry)), views)`` for the entry;
  * every stage, ``post_update``, ``update_mask`` and ``eval_variables`` of the base method
    sees the base parameters only (without the entry); the entry is always trained and
    passes through ``post_update`` unchanged;
  * `group`, if given, is the entry's `ParamGroup` (its own optimiser settings).

  The add-on then wraps stages of the returned method with functions that read
  ``params[entry]`` and call the base stages with the full ``params`` (the entry is dropped
  before they run).

  Raises:
    ValueError: (from ``init``) the base parameters already hold `entry`.
  """
  entry_salt = zlib.crc32(entry.encode())

  def base_params(params: PyTree) -> PyTree:
    return {k: v for k, v in params.items() if k != entry}

  def wrapped_init(key, views):
    params, method_state = method.init(key, views)
    if entry in params:
      raise ValueError(f"add-on entry {entry!r} is already a key of the params of "
                       f"{method.name!r}: {sorted(params)}")
    return {**params, entry: init(jax.random.fold_in(key, entry_salt), views)}, method_state

  def strip(stage):
    return lambda params, *args, **kwargs: stage(base_params(params), *args, **kwargs)

  def post_update(params, method_state, *, step):
    new_params, method_state = method.post_update(base_params(params), method_state,
                                                  step=step)
    return {**new_params, entry: params[entry]}, method_state

  def update_mask(params, step):
    base = base_params(params)
    base_mask = method.update_mask(base, step)
    if not isinstance(base_mask, dict):  # one flag for the whole base tree
      base_mask = {k: base_mask for k in base}
    return {**base_mask, entry: True}

  groups = dict(method.param_groups)
  if group is not None:
    groups[entry] = group
  return dataclasses.replace(
      method, name=f"{method.name}+{entry}", init=wrapped_init,
      features=strip(method.features), embed=strip(method.embed),
      objective=strip(method.objective), head_layers=strip(method.head_layers),
      post_update=post_update, eval_variables=strip(method.eval_variables),
      update_mask=update_mask if method.update_mask is not None else None,
      param_groups=groups)


def weight_terms(method: Method, weights: WeightFn, *, addon: str) -> Method:
  """`method` with its objective's per-(view, image) terms weighted: UOTA's mechanism.

  ``weights(params, method_state, outputs, batch, *, step, axis_name) -> (w, metrics)`` gives
  ``w`` of the terms' shape ``[V, n]`` (this device's rows; mean 1 over the global batch keeps
  the loss's scale). The new value is ``sum_v mean_i w[v, i] * terms[v, i]`` with ``w``
  under stop-gradient (`ssljax.methods.base.reduce_terms`); metrics, state and everything else
  are the base objective's. Affine in the terms, so the per-device convention holds.

  Raises:
    ValueError: the base objective does not decompose (``method.decomposes`` is False, e.g.
      Barlow Twins), naming the add-on and the method.
  """
  if not method.decomposes:
    raise ValueError(
        f"add-on {addon!r} weights per-(view, image) loss terms, but the objective of "
        f"{method.name!r} does not decompose into such terms (its loss is a function of "
        f"batch statistics); use {addon!r} with a method whose loss does, e.g. swav, simclr "
        f"or byol")

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    out = method.objective(params, method_state, outputs, batch, key=key, step=step,
                           axis_name=axis_name)
    w, metrics = weights(params, method_state, outputs, batch, step=step,
                         axis_name=axis_name)
    terms = out.terms()
    value = reduce_terms(terms, w)
    # The unweighted loss from the same terms (equal to out.value by the terms' contract), so
    # the base loss is not evaluated a second time just for this metric.
    unweighted = jax.lax.stop_gradient(reduce_terms(terms))
    return Objective(value, lambda: w * terms, {**out.metrics, **metrics,
                                                "unweighted_loss": unweighted},
                     out.method_state)

  return dataclasses.replace(method, name=f"{method.name}+{addon}", objective=objective)

