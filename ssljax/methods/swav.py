"""SwAV (Caron et al. 2020): swapped prediction of Sinkhorn cluster codes, multi-crop, queue.

Follows ``main_swav.py`` of the official code (facebookresearch/swav) as UOTA forks it
(ssl-codelab/uota ``main_uota.py``, ``train``):

* Network: encoder -> projector (Linear - BN - ReLU - Linear, ``proj_hidden_dim`` ->
  ``proj_dim``) -> L2 normalisation -> prototypes. The prototypes are a plain
  ``[num_prototypes, proj_dim]`` array ``params['prototypes']`` (a bias-free linear layer),
  scores ``s = z C^T``. The official code re-normalises the prototype rows in place before
  every forward pass; here they are initialised with unit rows and ``post_update``
  re-normalises them after every optimiser step, which is the same (the loss never sees
  un-normalised prototypes, and no normalisation Jacobian enters the gradient).
* Multi-crop: views are grouped into runs of consecutive views with the same resolution
  (the 'multicrop' policy gives 2 global crops, then the small ones); each run goes through
  the encoder in one concatenated forward pass, then all crops go through the projector
  together (the official ``src/resnet50.py`` ``forward`` does exactly this), so BatchNorm sees them
  together.
* Codes: for each assignment crop c (``crops_for_assign``, the global crops) the codes are
  ``sinkhorn(s_c)`` (float32, no gradient, normalised over the global batch with
  ``axis_name``). Loss: ``ssljax.losses.swav`` (Caron et al. 2020, Sec. 3.1).
* Prototypes are frozen (no gradient, no weight decay, no update) for the first
  ``round(freeze_prototypes_epochs * steps_per_epoch)`` steps via ``Method.update_mask``
  (official: ``freeze_prototypes_niters``, gradient set to None).
* Queue (``queue_size > 0``): ``method_state['queue']`` ``[A, queue_size, proj_dim]`` holds,
  for each of the A assignment crops, the latest normalised projections of the global batch,
  and ``method_state['queue_pointer']`` the ring-buffer write position. From step
  ``round(queue_start_epoch * steps_per_epoch)`` on, every step writes the current global
  batch (``all_gather``, global row order) into it *after* its codes are computed. The queue
  joins the codes once its last row is non-zero, i.e. once it has been filled completely
  (official ``use_the_queue``; the ring buffer is written from row 0 on, so its last row is
  written by the fill that completes it): the queue's scores against the current prototypes
  are then put before the batch's scores, Sinkhorn runs on both, and only the batch's codes
  are kept. The queue is replicated; under ``axis_name`` each device feeds its own slice of
  the queue rows to the distributed Sinkhorn, so every queue row enters once, as on one
  device. Deviations from the official per-GPU queue (local rows, shifted rather than a ring
  buffer): none in the result, because Sinkhorn treats its samples as a set (the codes of a
  sample do not depend on the order of the others).

Sample-count rule. Sinkhorn gives every prototype the mass 1/K and every sample the mass 1/B
(B samples, K prototypes). With B >= K a sample can receive a single prototype; with B < K each
sample's unit mass is spread over at least K / B prototypes, so the codes cannot become
confident and the swapped prediction learns little (the reason SwAV adds a queue for small
batches). The builder therefore raises an error when the samples Sinkhorn will ever see are
fewer than the prototypes: ``train.batch_size < num_prototypes`` without a queue (unless
``allow_soft_codes``, for recipes that run so: the official UOTA run), or
``queue_size + train.batch_size < num_prototypes`` with one. With a queue that starts later
(or while it fills) the codes come from the batch alone, softer when B < K; this is what the
official code and solo-learn's CIFAR recipe (B = 256, K = 3000, queue from epoch 50) do.

Stages: ``features`` (one encoder forward per run of equal-resolution views), ``embed`` gives
``'projection'`` (normalised projections) and ``'scores'`` (prototype scores) per view; the
objective's terms are `ssljax.losses.swav_terms` (view j as the predicted side, codes
unweighted), the form the official UOTA code (``main_uota.py``) weights. ``head_layers``
ends with the prototype scores.

Config: ``method.swav.{temperature, epsilon, sinkhorn_iters, num_prototypes, proj_hidden_dim,
proj_dim, queue_size, queue_start_epoch, freeze_prototypes_epochs, crops_for_assign}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssljax.losses import gather_rows, l2_normalize, sinkhorn, swav as swav_loss, swav_terms
from ssljax.methods.base import (Method, Objective, RunInfo, apply_module, chain_head_layers,
                                 encoder_features, init_module, online_encoder_variables,
                                 register)
from ssljax.methods.common import check_queue_length, fifo_enqueue
from ssljax.models import MLPHead, build_encoder, compute_dtype

def init_prototypes(key: jax.Array, num_prototypes: int, dim: int) -> jax.Array:
  """``[num_prototypes, dim]`` Gaussian rows scaled to unit norm."""
  return l2_normalize(jax.random.normal(key, (num_prototypes, dim), jnp.float32))


def check_swav_config(hp: ml_collections.ConfigDict, global_batch: int) -> None:
  """Raises a readable ValueError for SwAV settings that cannot work (module docstring)."""
  if hp.num_prototypes < 1:
    raise ValueError(f"swav: method.swav.num_prototypes must be >= 1, got {hp.num_prototypes}")
  crops = tuple(hp.crops_for_assign)
  if not crops or len(set(crops)) != len(crops) or min(crops) < 0:
    raise ValueError(f"swav: method.swav.crops_for_assign must be distinct view indices "
                     f">= 0, got {crops}")
  if hp.queue_size == 0:
    if global_batch < hp.num_prototypes and not hp.allow_soft_codes:
      raise ValueError(
          f"swav: the global batch (train.batch_size = {global_batch}) is smaller than "
          f"method.swav.num_prototypes = {hp.num_prototypes} and there is no queue "
          f"(method.swav.queue_size = 0). Sinkhorn gives each prototype the mass 1/K and "
          f"each sample 1/B, so with fewer samples than prototypes no sample can be "
          f"assigned to one prototype; use a larger batch, fewer prototypes, or a queue "
          f"with queue_size + batch_size >= num_prototypes (or, to reproduce a recipe that "
          f"runs so, --config.method.swav.allow_soft_codes=True)")
    return
  check_queue_length("swav", hp.queue_size, global_batch, "method.swav.queue_size")
  if hp.queue_size + global_batch < hp.num_prototypes:
    raise ValueError(
        f"swav: the queue plus the global batch (method.swav.queue_size = {hp.queue_size} + "
        f"train.batch_size = {global_batch}) hold fewer samples than "
        f"method.swav.num_prototypes = {hp.num_prototypes}. Sinkhorn gives each prototype "
        f"the mass 1/K and each sample 1/B, so with fewer samples than prototypes no sample "
        f"can be assigned to one prototype; use a longer queue or fewer prototypes")


def _local_rows(rows: jax.Array, axis_name: str | None) -> jax.Array:
  """This device's equal share of replicated `rows` (all of them without an axis)."""
  if axis_name is None:
    return rows
  num_devices = jax.lax.axis_size(axis_name)
  if rows.shape[0] % num_devices:
    raise ValueError(f"swav: the queue ({rows.shape[0]} rows) must split evenly over the "
                     f"{num_devices} devices")
  share = rows.shape[0] // num_devices
  return jax.lax.dynamic_slice_in_dim(rows, jax.lax.axis_index(axis_name) * share, share)


def build_swav(config: ml_collections.ConfigDict, axis_name: str | None,
               run: RunInfo) -> Method:
  """The SwAV method from ``config.method.swav`` (errors on an invalid setting)."""
  hp = config.method.swav
  check_swav_config(hp, config.train.batch_size)
  crops = tuple(int(c) for c in hp.crops_for_assign)
  freeze_steps = int(round(hp.freeze_prototypes_epochs * run.steps_per_epoch))
  queue_start_step = int(round(hp.queue_start_epoch * run.steps_per_epoch))
  encoder = build_encoder(config, axis_name=axis_name)
  projector = MLPHead(
      hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim, num_layers=2,
      bn_momentum=config.model.bn_momentum,
      axis_name=axis_name if config.model.sync_batchnorm else None,
      dtype=compute_dtype(config.train.compute_dtype))

  def init(key, views):
    k_enc, k_proj, k_proto = jax.random.split(key, 3)
    enc_params, enc_stats = init_module(encoder, k_enc, views[0])
    h = encoder.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    proj_params, proj_stats = init_module(projector, k_proj, h)
    params = {"encoder": enc_params, "projector": proj_params,
              "prototypes": init_prototypes(k_proto, hp.num_prototypes, hp.proj_dim)}
    state = {"batch_stats": {"encoder": enc_stats, "projector": proj_stats}}
    if hp.queue_size:
      state["queue"] = jnp.zeros((len(crops), hp.queue_size, hp.proj_dim), jnp.float32)
      state["queue_pointer"] = jnp.zeros((), jnp.int32)
    return params, state

  def embed(params, method_state, features, views, *, step):
    """Normalised projections and prototype scores of every view."""
    del step
    if len(views) <= max(crops) or len(views) < 2:
      raise ValueError(f"swav: method.swav.crops_for_assign = {crops} needs at least "
                       f"{max(max(crops) + 1, 2)} views, got {len(views)}")
    stats = method_state["batch_stats"]
    z, proj_stats = apply_module(projector, params["projector"], stats["projector"],
                                 jnp.concatenate(features, axis=0))
    z = tuple(jnp.split(l2_normalize(z.astype(jnp.float32)), len(features), axis=0))
    scores = tuple(zv @ params["prototypes"].T for zv in z)
    new_state = {**method_state, "batch_stats": {**stats, "projector": proj_stats}}
    return {"projection": z, "scores": scores}, new_state

  def codes_with_queue(scores, queue, prototypes, axis_name):
    """Codes of the batch rows, from Sinkhorn over this device's queue share + its batch."""
    queue_scores = _local_rows(queue, axis_name) @ jax.lax.stop_gradient(prototypes).T
    both = jnp.concatenate([queue_scores, scores], axis=0)
    codes = sinkhorn(both, epsilon=hp.epsilon, num_iters=hp.sinkhorn_iters,
                     axis_name=axis_name)
    return codes[queue_scores.shape[0]:]

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del batch, key
    z, scores = outputs.embeddings["projection"], outputs.embeddings["scores"]
    prototypes = params["prototypes"]
    new_state = dict(method_state)
    metrics = {}

    plain = lambda s: sinkhorn(s, epsilon=hp.epsilon, num_iters=hp.sinkhorn_iters,
                               axis_name=axis_name)
    if hp.queue_size:
      queue, pointer = method_state["queue"], method_state["queue_pointer"]
      use_queue = jnp.any(queue[:, -1] != 0)
      codes = [jax.lax.cond(use_queue,
                            lambda s, q: codes_with_queue(s, q, prototypes, axis_name),
                            lambda s, q: plain(s), jax.lax.stop_gradient(scores[c]),
                            queue[i])
               for i, c in enumerate(crops)]
      fill = step >= queue_start_step
      filled = [fifo_enqueue(queue[i], pointer,
                             gather_rows(jax.lax.stop_gradient(z[c]), axis_name)[0])
                for i, c in enumerate(crops)]
      new_state["queue"] = jnp.where(fill, jnp.stack([q for q, _ in filled]), queue)
      new_state["queue_pointer"] = jnp.where(fill, filled[0][1], pointer)
      metrics["queue_used"] = use_queue.astype(jnp.float32)
    else:
      codes = [plain(scores[c]) for c in crops]

    value, loss_metrics = swav_loss(scores, codes, temperature=hp.temperature,
                                    crops_for_assign=crops)
    terms = lambda: swav_terms(scores, codes, temperature=hp.temperature,
                               crops_for_assign=crops)
    return Objective(value, terms, {**loss_metrics, **metrics}, new_state)

  def post_update(params, method_state, *, step):
    del step
    return {**params, "prototypes": l2_normalize(params["prototypes"])}, method_state

  def update_mask(params, step):
    return {**{module: jnp.bool_(True) for module in params},
            "prototypes": step >= freeze_steps}

  def head_layers(params, method_state, features):
    layers = projector_layers(params, method_state, features)
    z = l2_normalize(layers["projector/output"].astype(jnp.float32))
    layers["prototypes/output"] = z @ params["prototypes"].T
    return layers

  projector_layers = chain_head_layers([("projector", projector)])
  return Method(name="swav", encoder=encoder, init=init,
                features=encoder_features(encoder, per_view=False), embed=embed,
                objective=objective, head_layers=head_layers, post_update=post_update,
                eval_variables=online_encoder_variables, num_views=max(2, max(crops) + 1),
                update_mask=update_mask if freeze_steps > 0 else None)


def default_section() -> ml_collections.ConfigDict:
  """``config.method.swav`` with its defaults."""
  s = ml_collections.ConfigDict()
  # SwAV. Defaults: solo-learn CIFAR, swav.yaml (no multi-crop there; use the 'multicrop'
  # augment policy for 2 global + V local crops).
  s.temperature = 0.1
  s.epsilon = 0.05  # Sinkhorn entropy regularisation.
  s.sinkhorn_iters = 3
  s.num_prototypes = 3000
  s.proj_hidden_dim = 2048
  s.proj_dim = 128
  s.queue_size = 3840  # 0: no queue. A multiple of the global batch.
  s.queue_start_epoch = 50.0  # The queue joins the codes from this epoch.
  s.freeze_prototypes_epochs = 2.0  # Prototypes get no update before this.
  s.crops_for_assign = (0, 1)  # Views whose codes are predicted (global crops).
  # True: accept fewer Sinkhorn samples than prototypes without a queue (soft codes); the
  # official UOTA README run does so (batch 256, 3000 prototypes, no queue).
  s.allow_soft_codes = False
  return s


@register("swav", config=default_section)
def swav(config: ml_collections.ConfigDict, axis_name: str | None, run: RunInfo) -> Method:
  return build_swav(config, axis_name, run)
