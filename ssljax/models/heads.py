"""Projection / prediction heads.

`MLPHead` covers the projector and predictor shapes used by the methods in SPEC:
  * SimCLR (solo-learn): Linear(d -> 2048) - BN - ReLU - Linear(-> 256)
  * SimCLR (original) / MetaMask / ISSL: the same with a BN after the last layer too
  * BYOL projector and predictor: Linear(-> 4096) - BN - ReLU - Linear(-> 256)
  * Barlow Twins: (Linear without bias - BN - ReLU) x 2 - Linear without bias
Hidden layers are always Linear - BN - ReLU. The last layer is Linear, optionally followed by
a BatchNorm (``last_bn``, affine or not). ``num_layers = 1`` is a single linear map.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class MLPHead(nn.Module):
  """``num_layers`` linear layers; BN + ReLU after every hidden layer.

  Attributes:
    hidden_dim: width of the hidden layers.
    out_dim: output width.
    num_layers: number of linear layers (>= 1).
    use_bias: biases in the linear layers (hidden layers followed by BN never need them,
      but the PyTorch recipes keep them; Barlow Twins drops them).
    last_bn: BatchNorm after the last linear layer.
    last_bn_affine: whether that final BN has a learned scale and bias.
    bn_momentum: Flax BN decay of running statistics.
    axis_name: named axis for synchronised BN statistics.
    dtype: computation dtype.
  """

  hidden_dim: int
  out_dim: int
  num_layers: int = 2
  use_bias: bool = True
  last_bn: bool = False
  last_bn_affine: bool = False
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    if self.num_layers < 1:
      raise ValueError(f"MLPHead needs num_layers >= 1, got {self.num_layers}")

    def norm(name: str, affine: bool = True) -> nn.BatchNorm:
      return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                          epsilon=1e-5, use_scale=affine, use_bias=affine, dtype=self.dtype,
                          axis_name=self.axis_name if train else None, name=name)

    x = x.astype(self.dtype)
    for i in range(self.num_layers - 1):
      x = nn.Dense(self.hidden_dim, use_bias=self.use_bias, dtype=self.dtype,
                   name=f"dense{i + 1}")(x)
      x = nn.relu(norm(f"bn{i + 1}")(x))
    x = nn.Dense(self.out_dim, use_bias=self.use_bias, dtype=self.dtype,
                 name=f"dense{self.num_layers}")(x)
    if self.last_bn:
      x = norm(f"bn{self.num_layers}", affine=self.last_bn_affine)(x)
    return x.astype(jnp.float32)
