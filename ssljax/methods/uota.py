"""UOTA as an add-on: view weights on the per-(view, image) terms of any multi-view method.

UOTA (Wang et al., NeurIPS 2021, Sec. 3; official ``ssl-codelab/uota``, ``main_uota.py`` and
``src/uota.py``) multiplies the loss term of every (image i, predicted view j) by a weight
``w_ji`` that is small for views whose embedding lies far from their image's centre (the mean
of the global views) relative to the batch's spread of such deviations: out-of-distribution
crops are arbitrated down (``ssljax.losses.uota`` has the equations). The base method's
objective must decompose into per-(view, image) terms (``Method.decomposes``): SwAV (the
official setting, weights on the predicted side, codes unweighted), SimCLR's multi-view NT-Xent
(weights per anchor) and BYOL over every view (weights on the online prediction's view), as the
paper's generalisation proposes. Barlow Twins is refused.

Weights come from the base method's ``'projection'`` embeddings (``method.uota.embedding``),
L2-normalised and under stop-gradient: SwAV's normalised projections, SimCLR's projections,
BYOL's online projector outputs (not the predictor's, Sec. 3.3 of the paper's BYOL variant).

Modes (``method.uota.mode``):

* ``'closed_form'`` (faithful): the official per-step estimate, a second moment shared by
  every view of the global batch, recomputed from each batch.
* ``'learned'``: the Gaussian view model lives in the parameter pytree, ``params['uota'] =
  {'log_diag': [d], 'lower': [d, d]}``, the Cholesky factor L of the precision ``P = L L^T``
  (diagonal ``exp(log_diag)``, so P is always positive definite). The add-on adds
  ``uota_gaussian_nll`` of the stop-gradient deviations to the loss, so the same optimiser
  step fits L by maximum likelihood, in its own parameter group (``optimizer``; no weight
  decay, no LARS trust ratio), and the weights use P in place of ``Sigma^{-1}``. The group's
  peak rate is ``learning_rate`` itself, not a fraction of the run's (a LARS rate of 3.0 is
  far too fast for Adam on L), following the shape of the run's schedule (warm-up, cosine);
  ``learning_rate = None`` uses ``lr_scale`` x the run's rate instead. The likelihood carries
  the ridge ``(ridge / 2) tr(P)``, so its fixed point on a stationary view distribution is the
  closed form's precision with ``eps = ridge``; without it the fit drives the precision to
  infinity along directions the (early, near low-rank) deviations do not span. It starts at
  ``P = I / init_scale**2`` and is fitted from step 0, so that it is close to the batch
  statistics by the switch-on. Adam at 1e-3 was too slow for that on the Fashion-MNIST recipe
  (936 steps: the weights' range 0.61-1.07 at step 650, against 0.35-1.38 for the closed
  form), hence 1e-2.

Switch-on: the weights apply from step ``round(start_fraction * total_steps)`` (official: half
of training, ``epoch_uota_starts`` 100 of 200); before that they are 1 and the run is the base
method. The official learning-rate restart at the switch is the ``optim.restart_fraction``
option (``ssljax.train.optim``), set to the same fraction in the faithful configs.

Metrics: ``uota_active``, the weights' ``uota_w_min/max/std``, the mean weight of the global
views (``uota_w_global``), of the other views (``uota_w_local``, 0 with no local views) and of
each view ``v`` (``uota_w_view<v>``: with ``augment.num_ood_crops`` the last views are the
out-of-distribution ones); the closed form also ``uota_ridge``, the ridge its second moment
got (``eps`` unless Sigma was too ill-conditioned for float32 and it was raised, see
``uota_view_weights``' ``max_condition``); learned mode also ``uota_nll``.

Config: ``method.uota.{mode, temperature, num_global_views, eps, max_condition, start_fraction,
embedding, optimizer, learning_rate, lr_scale, ridge, init_scale}``.
"""

from __future__ import annotations

import dataclasses
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssljax.losses import l2_normalize
from ssljax.losses.uota import (precision_from_cholesky, uota_deviations, uota_gaussian_nll,
                                uota_precision_weights, uota_view_weights)
from ssljax.methods.addons import add_params_entry, weight_terms
from ssljax.methods.base import Method, ParamGroup, RunInfo, register_addon
from ssljax.parallel import DATA_AXIS
from ssljax.train.optim import peak_learning_rate

_MODES = ("closed_form", "learned")


def default_section() -> ml_collections.ConfigDict:
  """``config.method.uota`` with its defaults (the official ImageNet run's values)."""
  s = ml_collections.ConfigDict()
  s.mode = "closed_form"  # 'closed_form' (official, per-batch) | 'learned' (params['uota']).
  s.temperature = 350.0  # tau of u = delta^T P delta / tau; official 350 at d = 128 (~ d).
  s.num_global_views = 2  # The image's centre is the mean of these first views.
  s.eps = 1e-8  # Ridge on the closed form's second moment.
  # Above this (estimated) condition number of Sigma the ridge is raised to eps + tr(M) /
  # max_condition, M the deviations' second moment: float32 cannot solve Sigma as it is
  # (uota_view_weights; logged as uota_ridge). None or inf (=inf on the command line): never,
  # the official behaviour.
  s.max_condition = 1e5
  s.start_fraction = 0.5  # Weights apply from this fraction of the run on (official 0.5).
  s.embedding = "projection"  # The base method's embedding the weights are computed from.
  # Learned mode: the view model's parameter group and its initial scale (P = I / scale^2).
  s.optimizer = "adam"
  s.learning_rate = 1e-2  # The group's peak rate (schedule shape of the run); None: lr_scale.
  s.lr_scale = 0.05  # x the run's learning-rate schedule, used when learning_rate is None.
  s.ridge = 1e-4  # (ridge / 2) tr(P) in the likelihood: P <= 1 / ridge.
  s.init_scale = 0.1
  return s


def _check(hp: ml_collections.ConfigDict, method: Method) -> None:
  if hp.mode not in _MODES:
    raise ValueError(f"method.uota.mode must be one of {_MODES}, got {hp.mode!r}")
  if not hp.temperature > 0:
    raise ValueError(f"method.uota.temperature must be > 0, got {hp.temperature}")
  if not 0.0 <= hp.start_fraction <= 1.0:
    raise ValueError(f"method.uota.start_fraction must be in [0, 1], got {hp.start_fraction}")
  if hp.num_global_views < 1:
    raise ValueError(f"method.uota.num_global_views must be >= 1, got {hp.num_global_views}")
  if hp.get("learning_rate") is not None and not hp.learning_rate > 0:
    raise ValueError(f"method.uota.learning_rate must be > 0 or None, got {hp.learning_rate}")
  if not hp.get("ridge", 0.0) >= 0:
    raise ValueError(f"method.uota.ridge must be >= 0, got {hp.ridge}")
  if hp.max_condition is not None and not hp.max_condition > 1:
    raise ValueError(f"method.uota.max_condition must be > 1 or None, got {hp.max_condition}")
  if not hp.init_scale > 0:
    raise ValueError(f"method.uota.init_scale must be > 0, got {hp.init_scale}")
  if method.num_views < hp.num_global_views:
    raise ValueError(f"uota: {method.name!r} needs {method.num_views} views but "
                     f"method.uota.num_global_views = {hp.num_global_views}")


def with_uota(method: Method, hp: ml_collections.ConfigDict, run: RunInfo, *,
              run_peak_lr: float | None = None) -> Method:
  """`method` with UOTA's view weights on its per-(view, image) terms (module docstring).

  ``run_peak_lr`` is the run's peak learning rate, which turns the learned mode's absolute
  ``learning_rate`` into its parameter group's ``lr_scale`` (without it, ``lr_scale``).

  Raises:
    ValueError: an invalid setting, or a base objective without per-(view, image) terms.
  """
  _check(hp, method)
  start_step = int(round(hp.start_fraction * run.total_steps))
  learned = hp.mode == "learned"

  def embeddings(outputs):
    return _embeddings(hp, outputs, method.name)

  def weights(params, method_state, outputs, batch, *, step, axis_name):
    del method_state, batch
    w, ridge = view_weights(hp, params, outputs, axis_name=axis_name, method_name=method.name,
                            return_ridge=True)
    active = jnp.asarray(step) >= start_step
    applied = jnp.where(active, w, jnp.ones_like(w))
    metrics = _weight_metrics(w, active, hp.num_global_views, axis_name)
    if ridge is not None:
      metrics["uota_ridge"] = ridge
    return applied, metrics

  base = method
  if learned:
    dim_of = lambda views: _embedding_dim(method, views, hp.embedding)
    base = add_params_entry(
        method, "uota",
        init=lambda key, views: {
            "log_diag": jnp.full((dim_of(views),), -jnp.log(hp.init_scale), jnp.float32),
            "lower": jnp.zeros((dim_of(views), dim_of(views)), jnp.float32)},
        group=ParamGroup(optimizer=hp.optimizer, lr_scale=_lr_scale(hp, run_peak_lr),
                         weight_decay=0.0))
  weighted = dataclasses.replace(weight_terms(base, weights, addon="uota"),
                                 name=f"{method.name}+uota")
  if not learned:
    if hp.max_condition is None or hp.max_condition == float("inf"):  # the official estimator
      weighted = dataclasses.replace(weighted, nonfinite_hint=(
          "UOTA's official estimator is on (method.uota.max_condition None or inf): when the "
          "view embeddings collapse onto a few directions, the float32 Cholesky factor of "
          "their second moment is NaN; --config.method.uota.max_condition=1e5 raises the "
          "ridge on such batches."))
    return weighted

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    out = weighted.objective(params, method_state, outputs, batch, key=key, step=step,
                             axis_name=axis_name)
    delta = uota_deviations(embeddings(outputs), num_global_views=hp.num_global_views)
    nll = uota_gaussian_nll(params["uota"]["log_diag"], params["uota"]["lower"], delta,
                            ridge=hp.get("ridge", 0.0))
    return out._replace(value=out.value + nll, terms=None,
                        metrics={**out.metrics, "uota_nll": nll})

  return dataclasses.replace(weighted, objective=objective, decomposes=False)


def _lr_scale(hp: ml_collections.ConfigDict, run_peak_lr: float | None) -> float:
  if hp.get("learning_rate") is None or run_peak_lr is None:
    return hp.lr_scale
  if not run_peak_lr > 0:
    raise ValueError(f"uota: the run's peak learning rate must be > 0 to scale "
                     f"method.uota.learning_rate, got {run_peak_lr}")
  return hp.learning_rate / run_peak_lr


def _embeddings(hp: ml_collections.ConfigDict, outputs, method_name: str) -> jax.Array:
  """The weighted embedding of every view, ``[V, n, d]``, float32, unit norm, stop-gradient."""
  if hp.embedding not in outputs.embeddings:
    raise ValueError(f"uota: method.uota.embedding = {hp.embedding!r} is not an embedding of "
                     f"{method_name!r}; it has {sorted(outputs.embeddings)}")
  z = jnp.stack([x.astype(jnp.float32) for x in outputs.embeddings[hp.embedding]])
  return l2_normalize(jax.lax.stop_gradient(z))


def view_weights(hp: ml_collections.ConfigDict, params, outputs, *,
                 axis_name: str | None = None, method_name: str = "the method",
                 return_ridge: bool = False):
  """UOTA's weights ``[V, n]`` of a forward pass's `outputs` (before the switch-on gate).

  Closed form from the batch, or, in learned mode, from ``params['uota']``. With
  `return_ridge`, also the closed form's ridge (raised above ``eps`` when Sigma is too
  ill-conditioned for float32, `uota_view_weights`), None in learned mode.
  """
  z = _embeddings(hp, outputs, method_name)
  if hp.mode == "learned":
    entry = params["uota"]
    precision = precision_from_cholesky(entry["log_diag"], entry["lower"])
    w = uota_precision_weights(uota_deviations(z, num_global_views=hp.num_global_views),
                               precision, temperature=hp.temperature, axis_name=axis_name)
    return (w, None) if return_ridge else w
  return uota_view_weights(z, temperature=hp.temperature, num_global_views=hp.num_global_views,
                           eps=hp.eps, max_condition=hp.max_condition,
                           axis_name=axis_name, return_ridge=return_ridge)


def _embedding_dim(method: Method, views, name: str) -> int:
  """Width of `method`'s embedding `name` (shapes only)."""
  params, state = jax.eval_shape(method.init, jax.random.key(0), views)
  # A training-mode forward of a method that synchronises BN over the data axis: bind the
  # axis (size 1) with vmap, since init runs outside the step's shard_map.
  forward = jax.vmap(lambda p, s, v: method.forward(p, s, {"views": v}, step=jnp.int32(0)),
                     in_axes=(None, None, 0), axis_name=DATA_AXIS)
  outputs, _ = jax.eval_shape(forward, params, state, tuple(v[None] for v in views))
  if name not in outputs.embeddings:
    raise ValueError(f"uota: method.uota.embedding = {name!r} is not an embedding of "
                     f"{method.name!r}; it has {sorted(outputs.embeddings)}")
  return outputs.embeddings[name][0].shape[-1]


def _weight_metrics(w: jax.Array, active: jax.Array, num_global: int,
                    axis_name: str | None) -> dict[str, jax.Array]:
  """Min, max, std of the (computed) weights over the global batch; global vs local means."""
  lo, hi = jnp.min(w), jnp.max(w)
  mean, mean_sq = jnp.mean(w), jnp.mean(w ** 2)
  if axis_name:
    lo, hi = jax.lax.pmin(lo, axis_name), jax.lax.pmax(hi, axis_name)
    mean, mean_sq = jax.lax.pmean(mean, axis_name), jax.lax.pmean(mean_sq, axis_name)
  local = w[num_global:]
  per_view = {f"uota_w_view{v}": jnp.mean(w[v]) for v in range(w.shape[0])}
  return {"uota_active": active.astype(jnp.float32), "uota_w_min": lo, "uota_w_max": hi,
          "uota_w_std": jnp.sqrt(jnp.maximum(mean_sq - mean ** 2, 0.0)),
          "uota_w_global": jnp.mean(w[:num_global]),
          "uota_w_local": jnp.mean(local) if local.shape[0] else jnp.zeros((), jnp.float32),
          **per_view}


def weight_report(method: Method, config: ml_collections.ConfigDict, state, images, workdir: str,
                  *, step: int, num_shown: int = 8, seed: int = 0) -> dict[str, object]:
  """Draws views of `images` with the run's policy, weights them, and plots the extremes.

  Writes ``<workdir>/uota_weights_step<step>.png``: the `num_shown` lowest- and highest-weighted
  (image, view) crops of the batch with their weights and view index (view 0 and 1 are the
  global crops), the picture that makes UOTA's argument. The weights are those the loss would
  use at a step after the switch-on (closed form from this batch, or the learned model), from
  a training-mode forward of the current parameters whose BN updates are discarded.

  Returns:
    ``{'uota/plot': path, 'uota/w_min', 'uota/w_max', 'uota/w_global', 'uota/w_local'}``.
  """
  from ssljax import augment
  from ssljax.eval.plots import plot_crops

  hp = config.method.uota
  policy = augment.build_policy(config.augment, config.data.mean)
  keys = jax.random.split(jax.random.PRNGKey(seed), images.shape[0])

  def weigh(params, method_state, images):
    views = policy(keys, images)
    outputs, _ = method.forward(params, method_state, {"views": views}, step=jnp.int32(0))
    return views, view_weights(hp, params, outputs, method_name=method.name)

  # The train step's method synchronises BN over the data axis: bind that axis (size 1 here)
  # with vmap, so the forward runs outside the step's shard_map as on one device.
  batched = jax.jit(jax.vmap(weigh, in_axes=(None, None, 0), axis_name=DATA_AXIS))
  views, w = jax.device_get(batched(state.params, state.method_state,
                                    jnp.asarray(images)[None]))
  views, w = tuple(v[0] for v in views), w[0]
  order = np.argsort(w, axis=None)
  picks = [np.unravel_index(i, w.shape) for i in
           list(order[:num_shown]) + list(order[-num_shown:])]
  crops = [views[v][i] for v, i in picks]
  titles = [f"w {w[v, i]:.2f}, view {v}" for v, i in picks]
  path = os.path.join(workdir, f"uota_weights_step{step}.png")
  plot_crops(crops, titles, path, rows=2, suptitle=(
      f"UOTA weights at step {step}: the {num_shown} lowest (top) and highest (bottom) "
      f"of {w.size} crops"))
  num_global = hp.num_global_views
  return {"uota/plot": path, "uota/w_min": float(w.min()), "uota/w_max": float(w.max()),
          "uota/w_global": float(w[:num_global].mean()),
          "uota/w_local": float(w[num_global:].mean()) if w.shape[0] > num_global else 0.0}


@register_addon("uota", config=default_section, report=weight_report)
def uota_addon(method: Method, config: ml_collections.ConfigDict, axis_name: str | None,
               run: RunInfo) -> Method:
  del axis_name
  return with_uota(method, config.method.uota, run,
                   run_peak_lr=peak_learning_rate(config.optim, config.train.batch_size))
