"""Pure loss functions: arrays in, ``(loss, metrics)`` out, optional ``axis_name``.

Importable on their own (``from ssljax.losses import nt_xent``); no Flax, no hidden state.
One module per family:

  contrastive   nt_xent / multiview_nt_xent (SimCLR), moco_infonce (MoCo),
                npid / npid_softmax / npid_nce (NPID)
  redundancy    barlow_twins
  clustering    sinkhorn, swav (SwAV; per-view terms for view weighting)
  distillation  byol_regression (BYOL), dino (DINO) and its centre update
"""

from ssljax.losses.clustering import sinkhorn, swav, swav_terms
from ssljax.losses.contrastive import (gather_rows, l2_normalize, moco_infonce,
                                       multiview_nt_xent, npid, npid_nce, npid_nce_log_z,
                                       npid_softmax, nt_xent)
from ssljax.losses.distillation import byol_regression, dino, dino_center_update
from ssljax.losses.redundancy import barlow_twins, batch_standardize

__all__ = [
    "barlow_twins", "batch_standardize", "byol_regression", "dino", "dino_center_update",
    "gather_rows", "l2_normalize", "moco_infonce", "multiview_nt_xent",
    "npid", "npid_nce", "npid_nce_log_z",
    "npid_softmax", "nt_xent", "sinkhorn", "swav", "swav_terms",
]
