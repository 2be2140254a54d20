"""Optimisers and learning-rate schedules built from ``config.optim``.

They follow the PyTorch code each method's numbers come from: coupled L2 weight decay
(``torch.optim.SGD`` / ``Adam`` add ``wd * theta`` to the gradient), LARS as in
facebookresearch/barlowtwins ``main.py``, and each repository's warmup and cosine.

* ``sgd``: PyTorch SGD semantics, coupled L2: the update direction is g + wd * theta, then
  (Nesterov) momentum, then the learning rate: ``add_decayed_weights -> trace -> lr``.
* ``lars``: LARS as in the Barlow Twins / BYOL PyTorch code: g + wd * theta, scaled by the
  trust ratio eta * ||theta|| / ||g + wd * theta||, then momentum, then the learning rate.
  With ``lars_exclude_bias_and_norm`` parameters of rank <= 1 (biases, BatchNorm scales and
  offsets) get neither weight decay nor the trust ratio.
* ``adam``: Adam with coupled L2 (torch.optim.Adam's weight_decay); ``adamw`` decoupled.
  Both count Adam's steps per parameter leaf (`scale_by_adam_per_leaf`), so a layer frozen
  for a while starts its bias correction when it starts training, as in PyTorch.

Schedules: ``warmup_cosine`` ramps linearly from ``lr * warmup_init_fraction`` to the peak
over ``warmup_epochs`` and then follows a half cosine to ``lr * final_lr_fraction`` at the last
step; ``constant``. ``restart_fraction`` > 0 reproduces the official UOTA code's restart
(``main_uota.py`` rebuilds its cosine at the switch-on epoch with twice the base rate): from
step ``round(restart_fraction * total_steps)`` on, the same cosine (same progress) runs from a
peak of ``restart_peak_scale`` x the peak, so the rate jumps up (x2 at mid-training) and decays
to the same end. The peak is ``lr * global_batch / base_batch_size`` (linear scaling).

``warmup_cosine_per_epoch`` is the schedule of the DISSL/CISSL code (pl_bolts
``LinearWarmupCosineAnnealingLR`` stepped once per epoch): constant within an epoch, for epoch
``e = step // steps_per_epoch`` with W = ``warmup_epochs`` (whole) and E epochs in the run,
``start + (peak - start) e / max(W - 1, 1)`` for e < W (the first epoch runs at ``start``, 0
by default, and the peak comes at epoch W - 1), then ``end + (peak - end) (1 + cos(pi (e - W) /
(E - W))) / 2``.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

_OPTIMIZERS = ("sgd", "lars", "adam", "adamw")


def peak_learning_rate(optim: ml_collections.ConfigDict, global_batch: int) -> float:
  return optim.lr * global_batch / optim.base_batch_size


def build_schedule(optim: ml_collections.ConfigDict, *, global_batch: int, total_steps: int,
                   steps_per_epoch: int) -> optax.Schedule:
  """The learning rate as a function of the step."""
  peak = peak_learning_rate(optim, global_batch)
  if optim.schedule == "constant":
    return optax.constant_schedule(peak)
  if optim.schedule == "warmup_cosine_per_epoch":
    return _per_epoch_warmup_cosine(optim, peak, total_steps, steps_per_epoch)
  if optim.schedule != "warmup_cosine":
    raise ValueError(f"optim.schedule must be 'warmup_cosine_per_epoch', 'warmup_cosine' or "
                     f"'constant', got {optim.schedule!r}")
  warmup = int(round(optim.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  start, end = peak * optim.warmup_init_fraction, peak * optim.final_lr_fraction

  restart = int(round(optim.restart_fraction * total_steps)) if optim.restart_fraction else -1
  if optim.restart_fraction < 0 or optim.restart_fraction >= 1:
    raise ValueError(f"optim.restart_fraction must be in [0, 1), got {optim.restart_fraction}")

  def schedule(step):
    step = jnp.asarray(step, jnp.float32)
    ramp = start + (peak - start) * step / max(warmup, 1)
    progress = jnp.clip((step - warmup) / max(total_steps - warmup, 1), 0.0, 1.0)
    top = peak if restart < 0 else jnp.where(step >= restart, optim.restart_peak_scale * peak,
                                             peak)
    cosine = end + (top - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(step < warmup, ramp, cosine)

  return schedule


def _per_epoch_warmup_cosine(optim: ml_collections.ConfigDict, peak: float, total_steps: int,
                             steps_per_epoch: int) -> optax.Schedule:
  """``warmup_cosine_per_epoch`` (see the module docstring)."""
  warmup = optim.warmup_epochs
  if warmup < 0 or float(warmup) != int(warmup):
    raise ValueError("optim.warmup_epochs must be a whole number of epochs >= 0 for "
                     f"optim.schedule='warmup_cosine_per_epoch', got {warmup}")
  if optim.restart_fraction:
    raise ValueError("optim.restart_fraction is not supported with "
                     "optim.schedule='warmup_cosine_per_epoch'")
  warmup = int(warmup)
  epochs = max(-(-total_steps // max(steps_per_epoch, 1)), 1)  # the epochs the run enters
  start, end = peak * optim.warmup_init_fraction, peak * optim.final_lr_fraction

  def schedule(step):
    epoch = (jnp.asarray(step, jnp.int32) // max(steps_per_epoch, 1)).astype(jnp.float32)
    ramp = start + (peak - start) * epoch / max(warmup - 1, 1)
    progress = jnp.clip((epoch - warmup) / max(epochs - warmup, 1), 0.0, 1.0)
    cosine = end + (peak - end) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    return jnp.where(epoch < warmup, ramp, cosine)

  return schedule


def _decay_mask(params, exclude_low_rank: bool):
  return jax.tree.map(lambda p: (p.ndim > 1) if exclude_low_rank else True, params)


class PerLeafAdamState(NamedTuple):
  """Adam moments with one step count per parameter leaf (shaped like the parameters)."""

  count: Any
  mu: Any
  nu: Any


def scale_by_adam_per_leaf(b1: float = 0.9, b2: float = 0.999,
                           eps: float = 1e-8) -> optax.GradientTransformation:
  """``optax.scale_by_adam`` with a step count per parameter leaf.

  Without freezing it gives exactly Adam's update. The per-leaf count matters for layers
  that a method freezes for a while (``Method.update_mask``): the train step keeps their
  whole optimiser state, count included, so when they start training their bias correction
  starts at step 1, as PyTorch's Adam does (its state is created at a parameter's first
  gradient). With one global count the first updates of such a layer would be mis-scaled
  (about 1.4x too large one epoch of 234 steps after the start, 0.58x after 4 steps).
  """

  def init(params):
    zeros = jax.tree.map(jnp.zeros_like, params)
    counts = jax.tree.map(lambda _: jnp.zeros((), jnp.int32), params)
    return PerLeafAdamState(count=counts, mu=zeros, nu=jax.tree.map(jnp.zeros_like, params))

  def update(updates, state, params=None):
    del params
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, updates)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, updates)
    count = jax.tree.map(lambda c: c + 1, state.count)

    def scaled(m, v, c):
      t = c.astype(m.dtype)
      return (m / (1 - b1 ** t)) / (jnp.sqrt(v / (1 - b2 ** t)) + eps)

    return (jax.tree.map(scaled, mu, nu, count),
            PerLeafAdamState(count=count, mu=mu, nu=nu))

  return optax.GradientTransformation(init, update)


def build_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule,
                    param_groups: Mapping[str, Any] | None = None
                    ) -> optax.GradientTransformation:
  """An optax transformation for ``optim.name`` driven by `schedule`.

  `param_groups` (``Method.param_groups``: top-level ``params`` entry -> `ParamGroup`) gives
  entries their own optimiser settings; every other entry uses `optim`. Without groups the
  transformation is the plain chain below; with groups it is an ``optax.multi_transform``
  whose labels are the top-level entries (``'default'`` for the rest).

  Raises:
    ValueError: an unknown optimiser name or a negative setting (naming the group).
  """
  if not param_groups:
    return _single_optimizer(optim, schedule)
  transforms = {"default": _single_optimizer(optim, schedule)}
  for entry, group in param_groups.items():
    if entry == "default":
      raise ValueError("'default' cannot name a parameter group (it labels every entry "
                       "without a group)")
    transforms[entry] = _single_optimizer(_group_settings(optim, entry, group),
                                          _scaled(schedule, group.lr_scale),
                                          clip_value=group.clip_value or 0.0)

  def labels(params):
    missing = sorted(set(param_groups) - set(params))
    if missing:
      raise ValueError(f"parameter groups {missing} name no top-level params entry; the "
                       f"entries are {sorted(params)}")
    return {name: jax.tree.map(lambda _, label=(name if name in param_groups else "default"):
                               label, subtree) for name, subtree in params.items()}

  return optax.multi_transform(transforms, labels)


def _group_settings(optim: ml_collections.ConfigDict, entry: str,
                    group: Any) -> ml_collections.ConfigDict:
  """`optim` with the group's overrides (a copy; the run's config is not touched)."""
  settings = ml_collections.ConfigDict(optim.to_dict())
  for key in ("optimizer", "weight_decay", "momentum"):
    value = getattr(group, key)
    if value is None:
      continue
    if key != "optimizer" and value < 0:
      raise ValueError(f"parameter group {entry!r}: {key} must be >= 0, got {value}")
    settings["name" if key == "optimizer" else key] = value
  if group.lr_scale < 0:
    raise ValueError(f"parameter group {entry!r}: lr_scale must be >= 0, got {group.lr_scale}")
  if settings.name not in _OPTIMIZERS:
    raise ValueError(f"parameter group {entry!r}: optimizer must be one of {_OPTIMIZERS}, got "
                     f"{settings.name!r}")
  return settings


def _scaled(schedule: optax.Schedule, scale: float) -> optax.Schedule:
  return schedule if scale == 1.0 else (lambda step: scale * schedule(step))


def _single_optimizer(optim: ml_collections.ConfigDict, schedule: optax.Schedule, *,
                      clip_value: float = 0.0) -> optax.GradientTransformation:
  """The chain of one optimiser (see the module docstring); `clip_value` > 0 clips first."""
  if optim.name not in _OPTIMIZERS:
    raise ValueError(f"optim.name must be one of {_OPTIMIZERS}, got {optim.name!r}")
  exclude = optim.lars_exclude_bias_and_norm
  parts = []
  clip_value = clip_value or optim.grad_clip_value
  if clip_value > 0:
    parts.append(optax.clip(clip_value))
  if optim.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(optim.grad_clip_norm))
  adam = scale_by_adam_per_leaf(b1=optim.b1, b2=optim.b2, eps=optim.eps)
  if optim.name == "adamw":  # decoupled decay: optax.adamw's order, per-leaf counts
    parts += [adam, optax.add_decayed_weights(optim.weight_decay,
                                              mask=lambda p: _decay_mask(p, exclude)),
              optax.scale_by_learning_rate(schedule)]
    return optax.chain(*parts)
  if optim.weight_decay > 0:
    mask = (lambda p: _decay_mask(p, exclude)) if optim.name == "lars" else None
    parts.append(optax.add_decayed_weights(optim.weight_decay, mask=mask))
  if optim.name == "sgd":
    parts += [optax.trace(decay=optim.momentum, nesterov=optim.nesterov),
              optax.scale_by_learning_rate(schedule)]
  elif optim.name == "lars":
    trust = optax.scale_by_trust_ratio(trust_coefficient=optim.lars_eta)
    if exclude:
      trust = optax.masked(trust, lambda p: _decay_mask(p, True))
    parts += [trust, optax.trace(decay=optim.momentum, nesterov=optim.nesterov),
              optax.scale_by_learning_rate(schedule)]
  else:  # adam with coupled L2
    parts += [adam, optax.scale_by_learning_rate(schedule)]
  return optax.chain(*parts)
