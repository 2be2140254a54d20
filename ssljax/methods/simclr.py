"""SimCLR (Chen et al. 2020): encoder + MLP projector trained with NT-Xent (SPEC 6.1).

Both views go through the networks in one concatenated forward pass, so BatchNorm sees the
two views together (SPEC 8.5; the original SimCLR and the ISSL code do this). With
``axis_name`` set, BN statistics and the NT-Xent negatives span the global batch (SimCLR's
cross-replica BN and negatives).

More than two views (``augment.num_views > 2``, or the ``'multicrop'`` policy's small crops):
every view the policy makes is used, the loss is `multiview_nt_xent` (each other view of the
same image is a positive), the encoder runs once per resolution on the concatenated views of
that resolution and the projector once on all of them (as solo-learn's multi-crop SimCLR).
With two views this is exactly the two-view method above.

Config: ``method.simclr.{temperature, proj_hidden_dim, proj_dim, proj_layers, proj_last_bn}``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections

from ssljax.losses import multiview_nt_xent
from ssljax.methods.base import (Method, RunInfo, apply_module, init_module, keep_state,
                                 online_encoder_variables, register)
from ssljax.methods.common import apply_to_views
from ssljax.models import MLPHead, build_encoder, compute_dtype


def build_projector(config: ml_collections.ConfigDict, hp: ml_collections.ConfigDict,
                    axis_name: str | None) -> MLPHead:
  return MLPHead(
      hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim, num_layers=hp.proj_layers,
      last_bn=hp.proj_last_bn, bn_momentum=config.model.bn_momentum,
      axis_name=axis_name if config.model.sync_batchnorm else None,
      dtype=compute_dtype(config.train.compute_dtype))


@register("simclr")
def simclr(config: ml_collections.ConfigDict, axis_name: str | None, run: RunInfo) -> Method:
  del run  # SimCLR has no schedule of its own
  hp = config.method.simclr
  encoder = build_encoder(config, axis_name=axis_name)
  projector = build_projector(config, hp, axis_name)

  def init(key, views):
    k_enc, k_proj = jax.random.split(key)
    enc_params, enc_stats = init_module(encoder, k_enc, views[0])
    h = encoder.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    proj_params, proj_stats = init_module(projector, k_proj, h)
    return ({"encoder": enc_params, "projector": proj_params},
            {"batch_stats": {"encoder": enc_stats, "projector": proj_stats}})

  def loss(params, method_state, batch, *, key, step, axis_name):
    del key, step
    views = list(batch["views"])
    stats = method_state["batch_stats"]
    h, enc_stats = apply_to_views(encoder, params["encoder"], stats["encoder"], views,
                                  per_view=False)
    z, proj_stats = apply_module(projector, params["projector"], stats["projector"],
                                 jnp.concatenate(h, axis=0))
    value, metrics = multiview_nt_xent(jnp.split(z, len(views), axis=0),
                                       temperature=hp.temperature, axis_name=axis_name)
    new_state = {**method_state,
                 "batch_stats": {"encoder": enc_stats, "projector": proj_stats}}
    return value, (metrics, new_state)

  return Method(name="simclr", encoder=encoder, init=init, loss=loss, post_update=keep_state,
                eval_variables=online_encoder_variables, num_views=2)
