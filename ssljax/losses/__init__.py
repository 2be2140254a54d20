"""Pure loss functions: arrays in, ``(loss, metrics)`` out, optional ``axis_name``.

Importable on their own (``from ssljax.losses import nt_xent``); no Flax, no hidden state.
One module per family; each line below re-exports one family's public functions.
"""

from ssljax.losses.contrastive import (gather_rows, l2_normalize, moco_infonce, npid,  # noqa: F401
                                       npid_nce, npid_nce_log_z, npid_softmax, nt_xent)
from ssljax.losses.redundancy import barlow_twins, batch_standardize  # noqa: F401
from ssljax.losses.clustering import sinkhorn, swav, swav_terms  # noqa: F401
from ssljax.losses.distillation import byol_regression, dino, dino_center_update  # noqa: F401
