"""Projection / prediction heads.

`MLPHead` covers the projector and predictor shapes of the methods' official code:
  * SimCLR (solo-learn): Linear(d -> 2048) - BN - ReLU - Linear(-> 256)
  * SimCLR (original) / MetaMask / ISSL: the same with a BN after the last layer too
  * BYOL projector and predictor: Linear(-> 4096) - BN - ReLU - Linear(-> 256)
  * Barlow Twins: (Linear without bias - BN - ReLU) x 2 - Linear without bias
Hidden layers are always Linear - BN - ReLU. The last layer is Linear, optionally followed by
a BatchNorm (``last_bn``, affine or not). ``num_layers = 1`` is a single linear map.

`NormLinear` and `NormMLP` are CLD's normalised (cosine) heads.

`DINOHead` is DINO's projection head: an MLP with GELU down to a bottleneck, an L2
normalisation, and a weight-normalised linear layer with unit-norm weights (`UnitNormDense`),
in the official DINO layout or in the layout of the DINO baseline of the DISSL/CISSL code.

`ISSLHead` is the student / teacher head of CISSL and DISSL: optional Linear-BN-ReLU hidden
layers, then a full-rank or low-rank (Linear-BN-Linear) output map, optionally a final BN.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from ssljax.losses.contrastive import l2_normalize


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


def _l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  """Row-wise x / max(||x||, 1e-12) in float32 (torch.nn.functional.normalize)."""
  return l2_normalize(x.astype(jnp.float32)).astype(x.dtype)


class UnitNormDense(nn.Module):
  """A bias-free linear layer whose weight vectors have unit norm: ``y = x (V / ||V||)``.

  The kernel ``V`` is ``[in, out]`` and each output unit's column is divided by its L2 norm
  in every forward pass, with the gradient flowing through the normalisation. This is
  ``torch.nn.utils.weight_norm`` with the gain g fixed at 1 (DINO's ``norm_last_layer``):
  for unit-norm inputs the outputs are cosine similarities in [-1, 1].

  Attributes:
    features: number of outputs.
    dtype: computation dtype (the kernel is stored in float32).
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (x.shape[-1], self.features), jnp.float32)
    unit = kernel / jnp.linalg.norm(kernel, axis=0, keepdims=True)
    return x.astype(self.dtype) @ unit.astype(self.dtype)


class DINOHead(nn.Module):
  """DINO's head: MLP with GELU -> bottleneck -> L2-normalise -> unit-norm linear layer.

  ``num_layers`` linear layers map the input to ``bottleneck_dim``: ``num_layers - 1`` hidden
  layers Linear(-> hidden_dim) [- BN] - GELU, then the bottleneck Linear(-> bottleneck_dim)
  with no BN or activation after it. The features are L2-normalised and a `UnitNormDense`
  layer named ``last_layer`` (bias-free, unit-norm weight vectors, the layer DINO freezes in
  its first epoch) gives the ``out_dim`` outputs. Linear layers are initialised with a normal
  of std 0.02 truncated at 2 std, biases with 0 (DINO's init; the ISSL code uses its own
  initialisers, so only the architecture, not the initial weights, follows it).

  Two layouts appear in the reference code:
    * official DINO (Caron et al. 2021) and solo-learn: ``num_layers=3``, ``use_bn=False``
      (ResNet runs), ``use_bias=True``, normalisation *after* the bottleneck;
    * the DINO baseline of the DISSL/CISSL code (issl/architectures/basic.py
      ``MLP`` with ``FlattenCosine``): ``num_layers=2`` (z -> 1024 -> 256), ``use_bn=True``,
      ``use_bias=False``, and ``normalize_before_bottleneck=True``: that code normalises the
      hidden features and then applies the bottleneck and the unit-norm layer as one
      low-rank map, so its outputs are not bounded by 1.

  Attributes:
    hidden_dim: width of the hidden layers.
    bottleneck_dim: width of the bottleneck.
    out_dim: outputs of the unit-norm layer (DINO's K).
    num_layers: linear layers before ``last_layer``, the bottleneck included (>= 1).
    use_bn: BatchNorm after each hidden linear layer.
    use_bias: biases in the hidden and bottleneck linear layers.
    normalize_before_bottleneck: L2-normalise the input of the bottleneck layer instead of
      its output.
    bn_momentum: Flax BN decay of running statistics.
    axis_name: named axis for synchronised BN statistics.
    dtype: computation dtype; the output is float32.
  """

  hidden_dim: int
  bottleneck_dim: int
  out_dim: int
  num_layers: int = 3
  use_bn: bool = False
  use_bias: bool = True
  normalize_before_bottleneck: bool = False
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    if self.num_layers < 1:
      raise ValueError(f"DINOHead needs num_layers >= 1, got {self.num_layers}")
    init = nn.initializers.truncated_normal(stddev=0.02)

    def dense(features: int, name: str) -> nn.Dense:
      return nn.Dense(features, use_bias=self.use_bias, kernel_init=init, dtype=self.dtype,
                      name=name)

    x = x.astype(self.dtype)
    for i in range(self.num_layers - 1):
      x = dense(self.hidden_dim, f"dense{i + 1}")(x)
      if self.use_bn:
        x = nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                         epsilon=1e-5, dtype=self.dtype,
                         axis_name=self.axis_name if train else None, name=f"bn{i + 1}")(x)
      x = nn.gelu(x, approximate=False)
    if self.normalize_before_bottleneck:
      x = _l2_normalize(x)
    x = dense(self.bottleneck_dim, f"dense{self.num_layers}")(x)
    if not self.normalize_before_bottleneck:
      x = _l2_normalize(x)
    x = UnitNormDense(self.out_dim, dtype=self.dtype, name="last_layer")(x)
    return x.astype(jnp.float32)


def _unit_columns_init(key, shape, dtype=jnp.float32):
  """The official NormedLinear init: U(-1, 1), then each output column scaled to unit norm."""
  w = jax.random.uniform(key, shape, dtype, -1.0, 1.0)
  return w / jnp.linalg.norm(w, axis=0, keepdims=True)


class NormLinear(nn.Module):
  """CLD's normalised (cosine) projection head (CLD paper Sec. 3.3; official
  models/resnet_cifar.py ``NormedLinear``).

  ``y_j = (x / ||x||) . (W_{:, j} / ||W_{:, j}||)`` for ``x`` ``[n, in]`` and ``W`` ``[in,
  out]``, no bias: each output is the cosine similarity of the input with a weight column, in
  [-1, 1]. The normalisations are part of the forward pass (the gradient goes through them);
  W starts uniform in [-1, 1] with unit-norm columns, as the official init.

  Attributes:
    features: number of outputs.
    dtype: computation dtype (the kernel is stored in float32); the output is float32.
  """

  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    del train  # no BatchNorm or dropout
    kernel = self.param("kernel", _unit_columns_init, (x.shape[-1], self.features),
                        jnp.float32)
    unit = kernel / jnp.maximum(jnp.linalg.norm(kernel, axis=0, keepdims=True), 1e-12)
    x = l2_normalize(x.astype(jnp.float32)).astype(self.dtype)
    return (x @ unit.astype(self.dtype)).astype(jnp.float32)


class NormMLP(nn.Module):
  """CLD's "NormMLP" head: Linear(-> hidden_dim) - ReLU - `NormLinear`(-> out_dim) (CLD paper
  Sec. 3.3; official models/ResNet.py with ``--mlp --normlinear``).

  The official ImageNet model shares the Linear - ReLU layer between the instance and the
  group branch and forks two NormLinear heads from it; as a head of its own (CLD's group
  branch here) the hidden layer belongs to this head.

  Attributes:
    hidden_dim: width of the hidden layer.
    out_dim: output width.
    dtype: computation dtype; the output is float32.
  """

  hidden_dim: int
  out_dim: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    x = nn.Dense(self.hidden_dim, dtype=self.dtype, name="dense1")(x.astype(self.dtype))
    return NormLinear(self.out_dim, dtype=self.dtype, name="norm_linear")(nn.relu(x), train)


class ISSLHead(nn.Module):
  """The student and teacher heads of the CISSL / DISSL code (Dubois et al. 2022; official
  issl/architectures/basic.py ``MLP`` and ``Linear``, issl/losses/contrastive.py and
  dissl.py).

  Layers, in order:
    * per entry of ``hidden_dims``: Linear without bias - BN - ReLU (the official ``MLP``
      drops the bias before a BN);
    * ``bottleneck_dim > 0``: a low-rank output map, Linear(-> bottleneck_dim, no bias) - BN -
      Linear(-> out_dim, bias) (the official ``Linear`` with ``bottleneck_size``; still
      linear in its input, BN being affine at test time); else one Linear(-> out_dim, bias);
    * ``out_bn``: BN after the output (the contrastive heads of the official code end with
      ``BatchNorm1d(out_dim)``).

  CISSL: student ``hidden_dims=(), out_dim=128, out_bn=True`` (linear probe shape), teacher
  ``hidden_dims=(1024,), out_dim=128, out_bn=True``. DISSL: student ``hidden_dims=(),
  bottleneck_dim=512, out_dim=C``, teacher ``hidden_dims=(1024,), bottleneck_dim=512,
  out_dim=C``. The ``_mlp`` variants use ``hidden_dims=(2048, 2048)`` on both heads.

  Init (official ``init_std_modules``): Linear weights normal with std 0.02 (PyTorch's
  ``trunc_normal_(std=0.02)`` truncates at +-2 in absolute value, i.e. at 100 std, so it is a
  plain normal), biases 0, BN scale 1 and bias 0. All BNs are affine (PyTorch's default).

  Attributes:
    hidden_dims: widths of the hidden layers (empty: a linear head).
    out_dim: output width.
    bottleneck_dim: rank of the low-rank output map; 0 for a full-rank Linear.
    out_bn: BatchNorm after the output.
    bn_momentum: Flax BN decay of running statistics.
    axis_name: named axis for synchronised BN statistics.
    dtype: computation dtype; the output is float32.
  """

  hidden_dims: tuple[int, ...]
  out_dim: int
  bottleneck_dim: int = 0
  out_bn: bool = False
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    init = nn.initializers.normal(stddev=0.02)

    def dense(features: int, name: str, use_bias: bool) -> nn.Dense:
      return nn.Dense(features, use_bias=use_bias, kernel_init=init, dtype=self.dtype,
                      name=name)

    def norm(name: str) -> nn.BatchNorm:
      return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum,
                          epsilon=1e-5, dtype=self.dtype,
                          axis_name=self.axis_name if train else None, name=name)

    x = x.astype(self.dtype)
    for i, width in enumerate(self.hidden_dims):
      x = nn.relu(norm(f"bn{i + 1}")(dense(width, f"dense{i + 1}", False)(x)))
    if self.bottleneck_dim:
      x = norm("bottleneck_bn")(dense(self.bottleneck_dim, "bottleneck", False)(x))
    x = dense(self.out_dim, "out", True)(x)
    if self.out_bn:
      x = norm("out_bn")(x)
    return x.astype(jnp.float32)
