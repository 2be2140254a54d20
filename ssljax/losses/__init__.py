"""Pure loss functions: arrays in, ``(loss, metrics)`` out, optional ``axis_name``.

Importable on their own (``from ssljax.losses import nt_xent``); no Flax, no hidden state.
One module per family:

  contrastive   nt_xent / multiview_nt_xent (SimCLR), moco_infonce (MoCo),
                npid / npid_softmax / npid_nce (NPID)
  redundancy    barlow_twins
  clustering    sinkhorn, swav (SwAV); batch_kmeans, cld (CLD)
  distillation  byol_regression (BYOL), dino (DINO) and its centre update
  issl          cissl and dissl (asymmetric student / teacher heads, Dubois et al. 2022)
  view weights  uota_view_weights (UOTA's closed form), uota_precision_weights and
                uota_gaussian_nll (its learned Gaussian view model)

Per-(view, image) terms, for add-ons that weight them (UOTA): ``multiview_nt_xent_terms``,
``moco_infonce_terms``, ``npid_terms``, ``swav_terms``, ``byol_terms``, ``dino_terms``,
``cissl_terms``, each the named loss before its reduction. ``barlow_twins`` does not
decompose (its loss is a function of batch statistics), nor does ``dissl`` (its marginal
entropy).
"""

from ssljax.losses.clustering import batch_kmeans, cld, cld_terms, sinkhorn, swav, swav_terms
from ssljax.losses.contrastive import (gather_rows, l2_normalize, moco_infonce,
                                       moco_infonce_terms, multiview_nt_xent,
                                       multiview_nt_xent_terms, npid, npid_nce, npid_nce_log_z,
                                       npid_softmax, npid_terms, nt_xent)
from ssljax.losses.distillation import (byol_regression, byol_terms, dino, dino_center_update,
                                        dino_terms)
from ssljax.losses.issl import cissl, cissl_terms, dissl
from ssljax.losses.redundancy import barlow_twins, batch_standardize
from ssljax.losses.uota import (uota_gaussian_nll, uota_precision_weights, uota_second_moment,
                                uota_view_weights)

__all__ = [
    "barlow_twins", "batch_kmeans", "batch_standardize", "byol_regression", "byol_terms", "cld",
    "cissl", "cissl_terms", "cld_terms", "dino", "dino_center_update", "dino_terms", "dissl",
    "gather_rows", "l2_normalize",
    "moco_infonce", "moco_infonce_terms", "multiview_nt_xent", "multiview_nt_xent_terms",
    "npid", "npid_nce", "npid_nce_log_z", "npid_softmax", "npid_terms", "nt_xent", "sinkhorn",
    "swav", "swav_terms", "uota_gaussian_nll", "uota_precision_weights", "uota_second_moment",
    "uota_view_weights",
]
