"""Pure loss functions: arrays in, ``(loss, metrics)`` out, optional ``axis_name``.

Importable on their own (``from ssljax.losses import nt_xent``); no Flax, no hidden state.
"""

from ssljax.losses.contrastive import gather_rows, l2_normalize, nt_xent

__all__ = ["nt_xent", "l2_normalize", "gather_rows"]
