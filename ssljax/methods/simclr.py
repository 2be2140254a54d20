"""SimCLR (Chen et al. 2020, Sec. 2.1): encoder + MLP projector trained with NT-Xent.

Both views go through the networks in one concatenated forward pass, so BatchNorm sees the
two views together (the original SimCLR, google-research/simclr ``model.py``, and the ISSL
code, YannDubs/Invariant-Self-Supervised-Learning ``issl/issl.py``, do this). With
``axis_name`` set, BN statistics and the NT-Xent negatives span the global batch (SimCLR's
cross-replica BN and negatives).

More than two views (``augment.num_views > 2``, or the ``'multicrop'`` policy's small crops):
every view the policy makes is used, the loss is `multiview_nt_xent` (each other view of the
same image is a positive), the encoder runs once per resolution on the concatenated views of
that resolution and the projector once on all of them (as solo-learn's multi-crop SimCLR).
``method.simclr.positives`` picks how an anchor's positives combine: ``"mean_log"`` (default,
SupCon's L_out) or ``"log_sum"`` (solo-learn's loss); see `multiview_nt_xent`. With two views
both are exactly the two-view method above.

Config: ``method.simclr.{temperature, positives, proj_hidden_dim, proj_dim, proj_layers,
proj_last_bn}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssljax.losses import multiview_nt_xent, multiview_nt_xent_terms
from ssljax.losses.contrastive import POSITIVE_FORMS
from ssljax.methods.base import (Method, Objective, RunInfo, apply_module, chain_head_layers,
                                 encoder_features, init_module, keep_state,
                                 online_encoder_variables, register)
from ssljax.models import MLPHead, build_encoder, compute_dtype


def build_projector(config: ml_collections.ConfigDict, hp: ml_collections.ConfigDict,
                    axis_name: str | None) -> MLPHead:
  return MLPHead(
      hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim, num_layers=hp.proj_layers,
      last_bn=hp.proj_last_bn, bn_momentum=config.model.bn_momentum,
      axis_name=axis_name if config.model.sync_batchnorm else None,
      dtype=compute_dtype(config.train.compute_dtype))


def default_section() -> ml_collections.ConfigDict:
  """``config.method.simclr`` with its defaults."""
  s = ml_collections.ConfigDict()
  # ---------------------------------------------------------------- method
  s.temperature = 0.2
  s.positives = "mean_log"  # > 2 views: "mean_log" (SupCon L_out) or "log_sum" (solo-learn).
  s.proj_hidden_dim = 512
  s.proj_dim = 128
  s.proj_layers = 2  # Linear layers in the projector (>= 1).
  s.proj_last_bn = False  # BN (non-affine) after the last projector layer.
  return s


@register("simclr", config=default_section)
def simclr(config: ml_collections.ConfigDict, axis_name: str | None, run: RunInfo) -> Method:
  del run  # SimCLR has no schedule of its own
  hp = config.method.simclr
  if hp.positives not in POSITIVE_FORMS:  # here, before the workdir is written
    raise ValueError(f"method.simclr.positives must be one of {POSITIVE_FORMS}, got "
                     f"{hp.positives!r}; e.g. --config.method.simclr.positives=log_sum")
  encoder = build_encoder(config, axis_name=axis_name)
  projector = build_projector(config, hp, axis_name)

  def init(key, views):
    k_enc, k_proj = jax.random.split(key)
    enc_params, enc_stats = init_module(encoder, k_enc, views[0])
    h = encoder.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    proj_params, proj_stats = init_module(projector, k_proj, h)
    return ({"encoder": enc_params, "projector": proj_params},
            {"batch_stats": {"encoder": enc_stats, "projector": proj_stats}})

  def embed(params, method_state, features, views, *, step):
    del views, step
    stats = method_state["batch_stats"]
    z, proj_stats = apply_module(projector, params["projector"], stats["projector"],
                                 jnp.concatenate(features, axis=0))
    new_state = {**method_state, "batch_stats": {**stats, "projector": proj_stats}}
    return {"projection": tuple(jnp.split(z, len(features), axis=0))}, new_state

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del params, batch, key, step
    z = outputs.embeddings["projection"]
    value, metrics = multiview_nt_xent(z, temperature=hp.temperature, positives=hp.positives,
                                       axis_name=axis_name)
    terms = lambda: multiview_nt_xent_terms(z, temperature=hp.temperature,
                                            positives=hp.positives, axis_name=axis_name)[0]
    return Objective(value, terms, metrics, method_state)

  return Method(name="simclr", encoder=encoder, init=init,
                features=encoder_features(encoder, per_view=False), embed=embed,
                objective=objective, head_layers=chain_head_layers([("projector", projector)]),
                post_update=keep_state, eval_variables=online_encoder_variables, num_views=2)
