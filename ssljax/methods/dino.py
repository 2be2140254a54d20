"""DINO (Caron et al. 2021) as the DISSL/CISSL code implements it.

That code (YannDubs/Invariant-Self-Supervised-Learning: ``issl/losses/dino.py``,
``config/decodability/dino.yaml``, the head in ``issl/architectures/basic.py``) is the DINO
baseline of the DISSL/CISSL paper's Table 1 (Dubois et al. 2022).

Student: encoder + `DINOHead` (trained, ``params``). Teacher: an EMA copy of both, in
``method_state['teacher']``, with its own BN statistics (``batch_stats['teacher_encoder' /
'teacher_head']``, own forward in training mode). The student sees every view (multi-crop:
``views[0:2]`` global, ``views[2:]`` small crops from the 'multicrop' policy); the teacher sees
the two global views. With teacher outputs g and student outputs s,

    L = dino(s, g, center, tau_s, tau_t(step)),

the mean over (teacher view t, student view s != t) pairs of CE(softmax((g_t - c_t) / tau_t),
log_softmax(s_s / tau_s)) (``ssljax.losses.dino``). Faithful to the ISSL code
(issl/losses/dino.py, config/decodability/dino.yaml) with these defaults:

* head z -> 1024 (BN, GELU) -> L2-normalise -> bottleneck 256 -> unit-norm layer to
  K = 1000 (the ISSL ``FlattenCosine`` normalises *before* its bottleneck);
* teacher temperature ``linspace(0.04, 0.07, W)[epoch]`` for the first W = 50 epochs, then
  0.07 (``teacher_temperature_schedule``; per epoch, as both the ISSL and DINO code index it);
  student temperature 0.1;
* centre: zeros ``[K]``, momentum 0.9. The ISSL code updates the centre inside each of its two
  asymmetric terms, so the pair (student view 0, teacher view 1) uses the incoming centre c,
  the centre then moves to c' = update(c, teacher view 1), the pair (student view 1, teacher
  view 0) uses c', and the step ends with update(c', teacher view 0)
  (``sequential_center = True``). Official DINO (``False``): both pairs use c and the step
  ends with one update from the mean over both global views;
* teacher EMA momentum cosine from 0.996 to 1 over the run (the ISSL ``MAWeightUpdate``);
* the unit-norm last layer gets no gradient and no update during the first
  ``freeze_last_layer_epochs`` (1) epochs (``Method.update_mask``; the ISSL code sets its
  gradient to None, so PyTorch's optimiser skips it);
* both views go through each network in one concatenated forward (BN over both views);
* evaluation uses the student encoder, as the ISSL code represents data with its online
  encoder (``eval_teacher = False``; official DINO evaluates the teacher).

Deliberate deviation: the ISSL code builds its teacher head as a new instance (weight norm
cannot be deep-copied) and then re-runs its initialisers over the loss module, so its teacher
does not start as an exact copy of the student; here the teacher starts as a copy of the
student, as in official DINO.

Config: ``method.dino.*`` (see ``ssljax/config.py``); the official DINO / solo-learn layout is
``proj_layers=3, proj_bn=False, proj_bias=True, normalize_before_bottleneck=False,
sequential_center=False``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssljax.losses import dino as dino_loss
from ssljax.losses import dino_center_update, dino_terms
from ssljax.methods.base import (Method, Objective, RunInfo, chain_head_layers,
                                 encoder_features, init_module, online_encoder_variables,
                                 register)
from ssljax.methods.common import (apply_to_views, check_ema_momenta, cosine_ema_momentum,
                                   ema_update)
from ssljax.models import build_encoder, compute_dtype
from ssljax.models.heads import DINOHead


def teacher_temperature_schedule(step: jax.Array, *, steps_per_epoch: int, warmup: float,
                                 final: float, warmup_epochs: int) -> jax.Array:
  """DINO's teacher temperature: ``linspace(warmup, final, W)[epoch]``, then ``final``.

  ``epoch = step // steps_per_epoch``; for epochs ``e < W`` the value is
  ``warmup + (final - warmup) e / (W - 1)`` (``warmup`` when W = 1), so the last warm-up epoch
  already uses ``final``; from epoch W on it is ``final`` (W = 0: always ``final``). This is
  the per-epoch array of the official DINO and ISSL code.
  """
  epoch = jnp.asarray(step, jnp.int32) // max(steps_per_epoch, 1)
  ramp = warmup + (final - warmup) * epoch.astype(jnp.float32) / max(warmup_epochs - 1, 1)
  return jnp.where(epoch < warmup_epochs, ramp, final).astype(jnp.float32)


def _check_config(hp: ml_collections.ConfigDict) -> None:
  check_ema_momenta("dino", hp.ema_momentum, hp.ema_momentum_final)
  for key in ("student_temperature", "teacher_temperature", "teacher_temperature_warmup"):
    if not hp[key] > 0:
      raise ValueError(f"method.dino.{key} must be > 0, got {hp[key]}")
  warmup = hp.teacher_temperature_warmup_epochs
  if warmup < 0 or float(warmup) != int(warmup):
    raise ValueError("method.dino.teacher_temperature_warmup_epochs must be a whole number "
                     f"of epochs >= 0 (the schedule is per epoch), got {warmup}")
  if not 0.0 <= hp.center_momentum <= 1.0:
    raise ValueError(f"method.dino.center_momentum must be in [0, 1], got "
                     f"{hp.center_momentum}")
  if hp.freeze_last_layer_epochs < 0:
    raise ValueError("method.dino.freeze_last_layer_epochs must be >= 0, got "
                     f"{hp.freeze_last_layer_epochs}")
  for key in ("proj_layers", "proj_hidden_dim", "bottleneck_dim", "out_dim"):
    if hp[key] < 1:
      raise ValueError(f"method.dino.{key} must be >= 1, got {hp[key]}")


def default_section() -> ml_collections.ConfigDict:
  """``config.method.dino`` with its defaults."""
  s = ml_collections.ConfigDict()
  # DINO as in the DISSL/CISSL repository (issl/losses/dino.py, config/decodability/dino.yaml).
  s.proj_hidden_dim = 1024
  s.bottleneck_dim = 256
  s.out_dim = 1000  # Outputs of the weight-normalised last layer.
  s.student_temperature = 0.1
  s.teacher_temperature = 0.07
  s.teacher_temperature_warmup = 0.04  # Linear warm-up from this value ...
  s.teacher_temperature_warmup_epochs = 50.0  # ... over these epochs.
  s.center_momentum = 0.9
  s.ema_momentum = 0.996
  s.ema_momentum_final = 1.0
  s.freeze_last_layer_epochs = 1.0
  # Head layout (DINOHead); defaults: issl/architectures/basic.py. Official DINO / solo-learn:
  # proj_layers 3, proj_bn False, proj_bias True, normalize_before_bottleneck False.
  s.proj_layers = 2  # Linear layers before the unit-norm one, bottleneck included.
  s.proj_bn = True  # BN after each hidden linear layer.
  s.proj_bias = False  # Biases in the hidden and bottleneck linear layers.
  s.normalize_before_bottleneck = True  # ISSL: L2-normalise before the bottleneck.
  # True (ISSL code): the centre is updated after each of the two view pairs, so the second
  # pair is centred with the centre already moved by the first pair's teacher batch mean.
  # False (official DINO): one update per step with the mean over both global views.
  s.sequential_center = True
  # True: one forward per view (solo-learn); False: views of equal resolution concatenated in
  # one forward, the head applied once to all views (official DINO, ISSL code).
  s.per_view_forward = False
  # Evaluate the teacher encoder (official DINO) instead of the student (ISSL, solo-learn).
  s.eval_teacher = False
  return s


@register("dino", config=default_section)
def dino(config: ml_collections.ConfigDict, axis_name: str | None, run: RunInfo) -> Method:
  hp = config.method.dino
  _check_config(hp)
  encoder = build_encoder(config, axis_name=axis_name)
  head = DINOHead(
      hidden_dim=hp.proj_hidden_dim, bottleneck_dim=hp.bottleneck_dim, out_dim=hp.out_dim,
      num_layers=hp.proj_layers, use_bn=hp.proj_bn, use_bias=hp.proj_bias,
      normalize_before_bottleneck=hp.normalize_before_bottleneck,
      bn_momentum=config.model.bn_momentum,
      axis_name=axis_name if config.model.sync_batchnorm else None,
      dtype=compute_dtype(config.train.compute_dtype))
  frozen_steps = int(round(hp.freeze_last_layer_epochs * run.steps_per_epoch))

  def momentum(step):
    return cosine_ema_momentum(step, run.total_steps, hp.ema_momentum, hp.ema_momentum_final)

  def temperature(step):
    return teacher_temperature_schedule(
        step, steps_per_epoch=run.steps_per_epoch, warmup=hp.teacher_temperature_warmup,
        final=hp.teacher_temperature, warmup_epochs=int(hp.teacher_temperature_warmup_epochs))

  def init(key, views):
    k_enc, k_head = jax.random.split(key)
    enc_params, enc_stats = init_module(encoder, k_enc, views[0])
    h = encoder.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    head_params, head_stats = init_module(head, k_head, h)
    params = {"encoder": enc_params, "head": head_params}
    # The teacher starts as a copy (own buffers, so a donated state never aliases them).
    copy = lambda tree: jax.tree.map(jnp.copy, tree)
    stats = {"encoder": enc_stats, "head": head_stats, "teacher_encoder": copy(enc_stats),
             "teacher_head": copy(head_stats)}
    return params, {"batch_stats": stats, "teacher": copy(params),
                    "center": jnp.zeros((hp.out_dim,), jnp.float32)}

  def embed(params, method_state, features, views, *, step):
    del step
    if len(views) < 2:
      raise ValueError(f"dino needs at least 2 views (2 global crops), got {len(views)}")
    stats = dict(method_state["batch_stats"])
    teacher = method_state["teacher"]
    per_view = hp.per_view_forward
    s, stats["head"] = apply_to_views(head, params["head"], stats["head"], features,
                                      per_view=per_view)
    th, stats["teacher_encoder"] = apply_to_views(encoder, teacher["encoder"],
                                                  stats["teacher_encoder"], views[:2],
                                                  per_view=per_view)
    g, stats["teacher_head"] = apply_to_views(head, teacher["head"], stats["teacher_head"], th,
                                              per_view=per_view)
    g = tuple(jax.lax.stop_gradient(x) for x in g)
    return {"student": tuple(s), "teacher": g}, {**method_state, "batch_stats": stats}

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del params, batch, key
    s = jnp.stack(outputs.embeddings["student"])
    g = jnp.stack(outputs.embeddings["teacher"])
    center = method_state["center"]
    if hp.sequential_center:
      moved = dino_center_update(center, g[1], momentum=hp.center_momentum,
                                 axis_name=axis_name)
      centers = jnp.stack([moved, center])  # teacher view 0 meets the moved centre
      new_center = dino_center_update(moved, g[0], momentum=hp.center_momentum,
                                      axis_name=axis_name)
    else:
      centers = center
      new_center = dino_center_update(center, g, momentum=hp.center_momentum,
                                      axis_name=axis_name)
    tau_t = temperature(step)
    value, metrics = dino_loss(s, g, center=centers, student_temperature=hp.student_temperature,
                               teacher_temperature=tau_t, axis_name=axis_name)
    terms = lambda: dino_terms(s, g, center=centers,
                               student_temperature=hp.student_temperature,
                               teacher_temperature=tau_t)
    metrics = {**metrics, "teacher_temperature": tau_t, "ema_momentum": momentum(step)}
    return Objective(value, terms, metrics, {**method_state, "center": new_center})

  def post_update(params, method_state, *, step):
    online = {"encoder": params["encoder"], "head": params["head"]}
    teacher = ema_update(method_state["teacher"], online, momentum(step))
    return params, {**method_state, "teacher": teacher}

  def update_mask(params, step):
    train_last = jnp.asarray(step) >= frozen_steps
    head_mask = {name: train_last if name == "last_layer" else jnp.asarray(True)
                 for name in params["head"]}
    return {"encoder": jnp.asarray(True), "head": head_mask}

  def eval_variables(params, method_state):
    if not hp.eval_teacher:
      return online_encoder_variables(params, method_state)
    return {"params": method_state["teacher"]["encoder"],
            "batch_stats": method_state["batch_stats"]["teacher_encoder"]}

  return Method(name="dino", encoder=encoder, init=init,
                features=encoder_features(encoder, per_view=hp.per_view_forward),
                embed=embed, objective=objective,
                head_layers=chain_head_layers([("head", head)]), post_update=post_update,
                eval_variables=eval_variables, num_views=2,
                update_mask=update_mask if frozen_steps > 0 else None)
