"""BYOL (Grill et al. 2020, Sec. 3.1): an online network regresses an EMA target network.

Online: encoder -> projector -> predictor (both MLPs Linear-BN-ReLU-Linear); target: encoder
-> projector, an exponential moving average of the online weights kept in
``method_state['target']`` with its own BatchNorm statistics under
``method_state['batch_stats']['target_encoder' / 'target_projector']`` (its own forward in
training mode, as deepmind-research ``byol/byol_experiment.py`` runs the target network).
For views v1, v2 with predictions p and target projections t,

    L = byol_regression(p_1, sg(t_2)) + byol_regression(p_2, sg(t_1)),

the sum of the two batch means (the DeepMind code sums the two per-example regressions and
then averages over the batch; solo-learn sums two batch means: the same scale, in [0, 8]).
After the optimiser step the target moves towards the online weights with
``tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2`` (``cosine_ema_momentum`` from
``ema_momentum`` to ``ema_momentum_final`` over ``run.total_steps``).

Forward passes: the DeepMind code (``apply_once_fn`` per view) and solo-learn (one
``base_training_step`` per crop) send each view through the networks separately, so BatchNorm
normalises each view with its own batch statistics and the running statistics are updated view
after view. That is the default (``per_view_forward = True``); ``False`` concatenates the two
views into one forward (BN over both views, as SimCLR here). With ``axis_name`` and
``model.sync_batchnorm`` the statistics span the global batch (BYOL's cross-replica BN).

Deliberate deviation: the DeepMind code initialises the target from its own random seed (its
comment: no significant difference); here, as in solo-learn, the target starts as a copy of
the online network.

More than two views (multi-crop): the online network sees every view and the target the first
two; the loss sums ``byol_regression(p_v, t_g)`` over every target view g and every other view
v, as solo-learn's multi-crop BYOL. Stages: ``features`` (online encoder), ``embed`` gives
``'projection'``, ``'prediction'`` (per view) and ``'target'`` (first two views, stop-gradient);
the terms are `ssljax.losses.byol_terms`.

Evaluation uses the online encoder. Config: ``method.byol.{proj_hidden_dim, proj_dim,
pred_hidden_dim, ema_momentum, ema_momentum_final, per_view_forward}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssljax.losses import byol_regression, byol_terms
from ssljax.methods.base import (Method, Objective, RunInfo, chain_head_layers,
                                 encoder_features, init_module, online_encoder_variables,
                                 register)
from ssljax.methods.common import (apply_to_views, check_ema_momenta, cosine_ema_momentum,
                                   ema_update)
from ssljax.models import MLPHead, build_encoder, compute_dtype

# The target network sees the first two views (the global crops of a multi-crop policy).
_NUM_TARGET_VIEWS = 2


def default_section() -> ml_collections.ConfigDict:
  """``config.method.byol`` with its defaults."""
  s = ml_collections.ConfigDict()
  # BYOL. Defaults: solo-learn CIFAR, byol.yaml (projector 4096 -> 256, predictor 4096).
  s.proj_hidden_dim = 4096
  s.proj_dim = 256
  s.pred_hidden_dim = 4096
  # Target EMA momentum: cosine from `ema_momentum` to `ema_momentum_final` over the run.
  s.ema_momentum = 0.99
  s.ema_momentum_final = 1.0
  # True: each view goes through the networks on its own, so BN statistics are per view (the
  # DeepMind and solo-learn code); False: one forward of both views concatenated.
  s.per_view_forward = True
  return s


@register("byol", config=default_section)
def byol(config: ml_collections.ConfigDict, axis_name: str | None, run: RunInfo) -> Method:
  hp = config.method.byol
  check_ema_momenta("byol", hp.ema_momentum, hp.ema_momentum_final)
  for key in ("proj_hidden_dim", "proj_dim", "pred_hidden_dim"):
    if hp[key] < 1:
      raise ValueError(f"method.byol.{key} must be >= 1, got {hp[key]}")
  encoder = build_encoder(config, axis_name=axis_name)

  def mlp(hidden_dim: int) -> MLPHead:
    return MLPHead(hidden_dim=hidden_dim, out_dim=hp.proj_dim, num_layers=2,
                   bn_momentum=config.model.bn_momentum,
                   axis_name=axis_name if config.model.sync_batchnorm else None,
                   dtype=compute_dtype(config.train.compute_dtype))

  projector, predictor = mlp(hp.proj_hidden_dim), mlp(hp.pred_hidden_dim)

  def momentum(step: jax.Array) -> jax.Array:
    return cosine_ema_momentum(step, run.total_steps, hp.ema_momentum, hp.ema_momentum_final)

  def init(key, views):
    k_enc, k_proj, k_pred = jax.random.split(key, 3)
    enc_params, enc_stats = init_module(encoder, k_enc, views[0])
    h = encoder.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    proj_params, proj_stats = init_module(projector, k_proj, h)
    z = projector.apply({"params": proj_params, "batch_stats": proj_stats}, h, train=False)
    pred_params, pred_stats = init_module(predictor, k_pred, z)
    params = {"encoder": enc_params, "projector": proj_params, "predictor": pred_params}
    # The target starts as a copy (own buffers, so a donated state never aliases them).
    target = jax.tree.map(jnp.copy, {"encoder": enc_params, "projector": proj_params})
    stats = {"encoder": enc_stats, "projector": proj_stats, "predictor": pred_stats,
             "target_encoder": jax.tree.map(jnp.copy, enc_stats),
             "target_projector": jax.tree.map(jnp.copy, proj_stats)}
    return params, {"batch_stats": stats, "target": target}

  def embed(params, method_state, features, views, *, step):
    del step
    stats = dict(method_state["batch_stats"])
    target = method_state["target"]
    per_view = hp.per_view_forward
    z, stats["projector"] = apply_to_views(projector, params["projector"], stats["projector"],
                                           features, per_view=per_view)
    p, stats["predictor"] = apply_to_views(predictor, params["predictor"], stats["predictor"],
                                           z, per_view=per_view)
    th, stats["target_encoder"] = apply_to_views(
        encoder, target["encoder"], stats["target_encoder"], views[:_NUM_TARGET_VIEWS],
        per_view=per_view)
    t, stats["target_projector"] = apply_to_views(
        projector, target["projector"], stats["target_projector"], th, per_view=per_view)
    t = tuple(jax.lax.stop_gradient(x) for x in t)
    embeddings = {"projection": tuple(z), "prediction": tuple(p), "target": t}
    return embeddings, {**method_state, "batch_stats": stats}

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del params, batch, key, axis_name  # per-row loss: each device's mean
    p, t = outputs.embeddings["prediction"], outputs.embeddings["target"]
    pairs = [byol_regression(p[v], t[g]) for v in range(len(p)) for g in range(len(t))
             if g != v]
    value = sum(loss for loss, _ in pairs)
    metrics = {"cosine": sum(m["cosine"] for _, m in pairs) / len(pairs),
               "ema_momentum": momentum(step)}
    return Objective(value, lambda: byol_terms(p, t)[0], metrics, method_state)

  def post_update(params, method_state, *, step):
    online = {"encoder": params["encoder"], "projector": params["projector"]}
    target = ema_update(method_state["target"], online, momentum(step))
    return params, {**method_state, "target": target}

  return Method(name="byol", encoder=encoder, init=init,
                features=encoder_features(encoder, per_view=hp.per_view_forward),
                embed=embed, objective=objective,
                head_layers=chain_head_layers([("projector", projector),
                                               ("predictor", predictor)]),
                post_update=post_update, eval_variables=online_encoder_variables, num_views=2)
