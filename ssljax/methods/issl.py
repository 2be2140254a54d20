"""CISSL and DISSL (Dubois, Hashimoto, Ermon, Liang, "Improving Self-Supervised Learning by
Characterizing Idealized Representations", NeurIPS 2022), as the official code implements
them (YannDubs/Invariant-Self-Supervised-Learning: issl/losses/contrastive.py,
issl/losses/dissl.py, config/decodability/{cissl,dissl}.yaml, config/representor/*_mlp.yaml).

Both methods put two different heads on the encoder output z: a *student* head with the
architecture of the downstream probe (linear, or an MLP for the ``_mlp`` variants) and an
expressive *teacher* head. There is no EMA network and no predictor: both heads and the
encoder are trained by one gradient, and both views go through the encoder and each head in
one concatenated forward (BN statistics over both views, as the official code).

CISSL (``method.cissl``): student Linear(z -> 128) - BN, teacher Linear(z -> 1024, no bias) -
BN - ReLU - Linear(-> 128) - BN; loss `ssljax.losses.cissl` with temperature 0.07: each
student output contrasted against every teacher output of the (global) batch, with the
teacher outputs of both views of its own image as the two positives of weight 1/2.

DISSL (``method.dissl``): student = low-rank linear map Linear(z -> 512, no bias) - BN -
Linear(-> C); teacher = Linear(z -> 1024, no bias) - BN - ReLU - Linear(-> 512, no bias) - BN
- Linear(-> C); C = 16384; loss `ssljax.losses.dissl` (teacher temperature 0.5, student 1.0,
lambda 2.3, beta 0.8), no stop-gradient, marginal over this device's batch (official) unless
``global_marginal``.

Heads are `ssljax.models.heads.ISSLHead` (Linear weights normal std 0.02, biases 0). The
``_mlp`` variants of the official code (``cissl_mlp``, ``dissl_mlp``: the probe is an MLP, so
the student becomes one) set ``student_hidden_dims = teacher_hidden_dims = (2048, 2048)``
and keep the other settings (DISSL keeps its low-rank output map on both heads).

Both evaluate the trained encoder. The recipe's optimiser (Adam 2e-3, weight decay 1e-6,
gradients clipped element-wise at 2) is ``config.optim`` (``grad_clip_value``), set by
``configs/cissl.py`` and ``configs/dissl.py``.

Config: ``method.cissl.{temperature, out_dim, student_hidden_dims, teacher_hidden_dims}``;
``method.dissl.{num_classes, teacher_temperature, student_temperature, lambda_maximality,
beta_det_inv, bottleneck_dim, student_hidden_dims, teacher_hidden_dims, global_marginal}``.
"""

from __future__ import annotations

import collections

import jax
import jax.numpy as jnp
import ml_collections

from ssljax.losses import cissl as cissl_loss
from ssljax.losses import cissl_terms
from ssljax.losses import dissl as dissl_loss
from ssljax.methods.base import (Method, Objective, RunInfo, apply_module, encoder_features,
                                 init_module, keep_state, layer_outputs,
                                 online_encoder_variables, register)
from ssljax.models import build_encoder, compute_dtype
from ssljax.models.heads import ISSLHead

_HEADS = ("student", "teacher")


def _dims(name: str, value) -> tuple[int, ...]:
  dims = tuple(int(d) for d in value)
  if any(d < 1 for d in dims):
    raise ValueError(f"{name} must be positive widths, got {tuple(value)}")
  return dims


def _asymmetric_method(name: str, config: ml_collections.ConfigDict, axis_name: str | None,
                       heads: dict[str, ISSLHead], objective, *, decomposes: bool) -> Method:
  """The shared record: encoder, a student and a teacher head on the same features."""
  encoder = build_encoder(config, axis_name=axis_name)

  def init(key, views):
    k_enc, k_student, k_teacher = jax.random.split(key, 3)
    enc_params, enc_stats = init_module(encoder, k_enc, views[0])
    h = encoder.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    params, stats = {"encoder": enc_params}, {"encoder": enc_stats}
    for head, k in zip(_HEADS, (k_student, k_teacher)):
      params[head], stats[head] = init_module(heads[head], k, h)
    return params, {"batch_stats": stats}

  def embed(params, method_state, features, views, *, step):
    del views, step
    if len(features) != 2:
      raise ValueError(f"{name} uses exactly 2 views per image (the official code's two "
                       f"crops), got {len(features)}")
    stats = dict(method_state["batch_stats"])
    z = jnp.concatenate(features, axis=0)
    out = {}
    for head in _HEADS:
      y, stats[head] = apply_module(heads[head], params[head], stats[head], z)
      out[head] = tuple(jnp.split(y, 2, axis=0))
    return out, {**method_state, "batch_stats": stats}

  def head_layers(params, method_state, features):
    # Both heads read the encoder features (they are parallel, not chained).
    x = jnp.concatenate(features, axis=0)
    result = collections.OrderedDict(encoder=x)
    for head in _HEADS:
      variables = {"params": params[head],
                   "batch_stats": method_state["batch_stats"][head]}
      result.update(layer_outputs(heads[head], variables, x, head)[1])
    return result

  return Method(name=name, encoder=encoder, init=init,
                features=encoder_features(encoder, per_view=False), embed=embed,
                objective=objective, head_layers=head_layers, post_update=keep_state,
                eval_variables=online_encoder_variables, num_views=2, decomposes=decomposes)


def _head(config, axis_name, **kwargs) -> ISSLHead:
  return ISSLHead(bn_momentum=config.model.bn_momentum,
                  axis_name=axis_name if config.model.sync_batchnorm else None,
                  dtype=compute_dtype(config.train.compute_dtype), **kwargs)


# ------------------------------------------------------------------------------------ CISSL

def cissl_section() -> ml_collections.ConfigDict:
  """``config.method.cissl`` with its defaults (official config/decodability/cissl.yaml)."""
  s = ml_collections.ConfigDict()
  s.temperature = 0.07
  s.out_dim = 128  # Output width of both heads (each ends with a BN).
  # Hidden Linear-BN-ReLU layers. Student () = a linear probe's shape; the cissl_mlp variant
  # sets both to (2048, 2048).
  s.student_hidden_dims = ()
  s.teacher_hidden_dims = (1024,)
  return s


@register("cissl", config=cissl_section)
def cissl(config: ml_collections.ConfigDict, axis_name: str | None, run: RunInfo) -> Method:
  del run  # no schedule of its own
  hp = config.method.cissl
  if not hp.temperature > 0:
    raise ValueError(f"method.cissl.temperature must be > 0, got {hp.temperature}")
  if hp.out_dim < 1:
    raise ValueError(f"method.cissl.out_dim must be >= 1, got {hp.out_dim}")
  heads = {
      "student": _head(config, axis_name, out_dim=hp.out_dim, out_bn=True,
                       hidden_dims=_dims("method.cissl.student_hidden_dims",
                                         hp.student_hidden_dims)),
      "teacher": _head(config, axis_name, out_dim=hp.out_dim, out_bn=True,
                       hidden_dims=_dims("method.cissl.teacher_hidden_dims",
                                         hp.teacher_hidden_dims)),
  }

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del params, batch, key, step
    (s_a, s_b), (t_a, t_b) = outputs.embeddings["student"], outputs.embeddings["teacher"]
    value, metrics = cissl_loss(s_a, s_b, t_a, t_b, temperature=hp.temperature,
                                axis_name=axis_name)
    terms = lambda: cissl_terms(s_a, s_b, t_a, t_b, temperature=hp.temperature,
                                axis_name=axis_name)[0]
    return Objective(value, terms, metrics, method_state)

  return _asymmetric_method("cissl", config, axis_name, heads, objective, decomposes=True)


# ------------------------------------------------------------------------------------ DISSL

def dissl_section() -> ml_collections.ConfigDict:
  """``config.method.dissl`` with its defaults (official config/decodability/dissl.yaml)."""
  s = ml_collections.ConfigDict()
  s.num_classes = 16384  # C, the number of equivalence classes.
  s.teacher_temperature = 0.5
  s.student_temperature = 1.0
  s.lambda_maximality = 2.3  # Official tuning range [1.8, 2.8].
  s.beta_det_inv = 0.8  # Official tuning range [0.4, 1.0].
  s.bottleneck_dim = 512  # Rank of both heads' Linear-BN-Linear output map; 0: full rank.
  # Hidden Linear-BN-ReLU layers; the dissl_mlp variant sets both to (2048, 2048).
  s.student_hidden_dims = ()
  s.teacher_hidden_dims = (1024,)
  # False (official): the marginal entropy over each device's batch; True: the global batch.
  s.global_marginal = False
  return s


@register("dissl", config=dissl_section)
def dissl(config: ml_collections.ConfigDict, axis_name: str | None, run: RunInfo) -> Method:
  del run
  hp = config.method.dissl
  for key in ("teacher_temperature", "student_temperature"):
    if not hp[key] > 0:
      raise ValueError(f"method.dissl.{key} must be > 0, got {hp[key]}")
  for key in ("lambda_maximality", "beta_det_inv"):
    if hp[key] < 0:
      raise ValueError(f"method.dissl.{key} must be >= 0, got {hp[key]}")
  if hp.num_classes < 2:
    raise ValueError(f"method.dissl.num_classes (C) must be >= 2, got {hp.num_classes}")
  if hp.bottleneck_dim < 0:
    raise ValueError(f"method.dissl.bottleneck_dim must be >= 0, got {hp.bottleneck_dim}")
  heads = {
      head: _head(config, axis_name, out_dim=hp.num_classes, bottleneck_dim=hp.bottleneck_dim,
                  hidden_dims=_dims(f"method.dissl.{head}_hidden_dims",
                                    hp[f"{head}_hidden_dims"]))
      for head in _HEADS
  }

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del params, batch, key, step
    (s_a, s_b), (t_a, t_b) = outputs.embeddings["student"], outputs.embeddings["teacher"]
    value, metrics = dissl_loss(
        t_a, t_b, s_a, s_b, teacher_temperature=hp.teacher_temperature,
        student_temperature=hp.student_temperature, lambda_maximality=hp.lambda_maximality,
        beta_det_inv=hp.beta_det_inv, axis_name=axis_name,
        global_marginal=hp.global_marginal)
    return Objective(value, None, metrics, method_state)

  return _asymmetric_method("dissl", config, axis_name, heads, objective, decomposes=False)
