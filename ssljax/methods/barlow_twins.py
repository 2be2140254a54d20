"""Barlow Twins (Zbontar et al. 2021, Sec. 2): encoder + projector trained to decorrelate.

As in facebookresearch/barlowtwins ``main.py``:

* projector: ``(Linear without bias -> BN -> ReLU) x (proj_layers - 1)`` then a final Linear
  without bias and no BN (``proj_bias`` adds biases, as solo-learn's CIFAR projector has);
* each view goes through encoder and projector in its own forward pass (``y1`` and ``y2``
  separately), so every BatchNorm normalises each view with that view's statistics and
  updates its running statistics twice per step, view a first (``BarlowTwins.forward``);
* loss: `ssljax.losses.barlow_twins` on the two projections (batch standardisation and the
  cross-correlation over the global batch, the official code's synchronised BN and
  ``all_reduce``), times ``scale_loss`` (1 officially; solo-learn's CIFAR recipe uses 0.1).
  ``unbiased_std`` selects MetaMask's standardisation (jiangmengli/MetaMask ``loss.py``).

With ``model.sync_batchnorm`` and ``axis_name`` set, the network's BatchNorm statistics span
the global batch too (the official code converts every BN to SyncBatchNorm). Evaluation uses
the online encoder. No state beyond BatchNorm statistics.

Stages: ``features`` of views 0 and 1, ``embed`` gives ``'projection'`` per view. The objective
does not decompose into per-(view, image) terms (it is a function of the batch's
cross-correlation matrix), so ``Method.decomposes`` is False and add-ons that weight terms
refuse Barlow Twins.

Config: ``method.barlow_twins.{lambda_offdiag, scale_loss, unbiased_std, proj_hidden_dim,
proj_dim, proj_layers, proj_bias}``.
"""

from __future__ import annotations

import jax
import ml_collections

from ssljax.losses import barlow_twins as barlow_twins_loss
from ssljax.methods.base import (Method, Objective, RunInfo, apply_module, chain_head_layers,
                                 encoder_features, init_module, keep_state,
                                 online_encoder_variables, register)
from ssljax.models import MLPHead, build_encoder, compute_dtype


def build_projector(config: ml_collections.ConfigDict,
                    axis_name: str | None) -> MLPHead:
  """The official projector: bias-free Linear-BN-ReLU blocks, then a bias-free Linear."""
  hp = config.method.barlow_twins
  return MLPHead(
      hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim, num_layers=hp.proj_layers,
      use_bias=hp.proj_bias, last_bn=False, bn_momentum=config.model.bn_momentum,
      axis_name=axis_name if config.model.sync_batchnorm else None,
      dtype=compute_dtype(config.train.compute_dtype))


def default_section() -> ml_collections.ConfigDict:
  """``config.method.barlow_twins`` with its defaults."""
  s = ml_collections.ConfigDict()
  # Barlow Twins. Defaults: the official ImageNet loss (main.py); solo-learn CIFAR sizes.
  s.lambda_offdiag = 0.0051
  s.scale_loss = 1.0  # Multiplies the loss (solo-learn CIFAR: 0.1).
  s.unbiased_std = False  # MetaMask's standardisation (its loss.py).
  s.proj_hidden_dim = 2048
  s.proj_dim = 2048
  s.proj_layers = 3
  # Biases in the projector's linear layers (official code: none; solo-learn CIFAR: yes).
  s.proj_bias = False
  return s


@register("barlow_twins", config=default_section)
def barlow_twins(config: ml_collections.ConfigDict, axis_name: str | None,
                 run: RunInfo) -> Method:
  """Builds Barlow Twins from ``config.method.barlow_twins``.

  Raises:
    ValueError: ``proj_layers`` < 1, ``lambda_offdiag`` < 0 or ``scale_loss`` <= 0.
  """
  del run  # no schedule of its own
  hp = config.method.barlow_twins
  if hp.proj_layers < 1:
    raise ValueError(f"method.barlow_twins.proj_layers must be >= 1, got {hp.proj_layers}")
  if hp.lambda_offdiag < 0:
    raise ValueError(f"method.barlow_twins.lambda_offdiag must be >= 0, got "
                     f"{hp.lambda_offdiag}")
  if hp.scale_loss <= 0:
    raise ValueError(f"method.barlow_twins.scale_loss must be > 0, got {hp.scale_loss}")
  encoder = build_encoder(config, axis_name=axis_name)
  projector = build_projector(config, axis_name)

  def init(key, views):
    k_enc, k_proj = jax.random.split(key)
    enc_params, enc_stats = init_module(encoder, k_enc, views[0])
    h = encoder.apply({"params": enc_params, "batch_stats": enc_stats}, views[0], train=False)
    proj_params, proj_stats = init_module(projector, k_proj, h)
    return ({"encoder": enc_params, "projector": proj_params},
            {"batch_stats": {"encoder": enc_stats, "projector": proj_stats}})

  def embed(params, method_state, features, views, *, step):
    del views, step
    stats = method_state["batch_stats"]["projector"]
    projections = []
    for h in features:
      z, stats = apply_module(projector, params["projector"], stats, h)
      projections.append(z)
    new_state = {**method_state,
                 "batch_stats": {**method_state["batch_stats"], "projector": stats}}
    return {"projection": tuple(projections)}, new_state

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    del params, batch, key, step
    value, metrics = barlow_twins_loss(*outputs.embeddings["projection"],
                                       lambda_offdiag=hp.lambda_offdiag,
                                       unbiased_std=hp.unbiased_std, axis_name=axis_name)
    return Objective(hp.scale_loss * value, None, metrics, method_state)

  return Method(name="barlow_twins", encoder=encoder, init=init,
                features=encoder_features(encoder, per_view=True,
                                          views_used=lambda num_views: (0, 1)),
                embed=embed, objective=objective,
                head_layers=chain_head_layers([("projector", projector)]),
                post_update=keep_state, eval_variables=online_encoder_variables, num_views=2,
                decomposes=False)
