"""ResNet encoders (Flax Linen) with CIFAR and ImageNet stems.

The encoder maps float images in [0, 1], shape ``[B, H, W, C]``, to pooled features
``[B, D]``. It standardises its input itself with the dataset mean/std it was built with, so
train-time views, evaluation images and exported checkpoints can never disagree on the
normalisation.

Variants (the official code's: CLD ``models/resnet_cifar.py``, lightly 1.0.8
``lightly/models/resnet.py`` for MetaMask, ISSL ``issl/architectures/cnn.py``, torchvision):
  * CIFAR stem: 3x3 conv, stride 1, no max-pool (CLD, MetaMask, solo-learn CIFAR recipes);
  * ImageNet stem: 7x7 conv stride 2, BN, ReLU, 3x3 max-pool stride 2 (torchvision);
  * ``resnet_small`` / ``resnet_tiny``: a 3x3 stride-2 stem and three stages of one
    BasicBlock each, widths 32/64/128 (small) or 16/32/64 (tiny) times the width multiplier.
    Sized for minutes-long CPU runs on 28x28 images: the stride-2 stem makes every stage run
    at 14x14 or below, which costs ~4x less than a stride-1 stem on XLA's CPU convolutions
    (see benchmarks/).

BatchNorm follows PyTorch's defaults (eps 1e-5, running-stat decay 0.9 = torch momentum 0.1).
With ``axis_name`` set, training-mode BN averages its statistics over that named axis
(synchronised BN across devices); it must then run inside ``shard_map``/``pmap``.
``zero_init_residual`` zero-initialises the scale of the last BN of each block, so every
residual block starts as the identity (Goyal et al.; used by Barlow Twins).

Wider representations before pooling (``expand_features``): a 1x1 conv + BN + ReLU, or with
``expand_bottleneck`` the residual `BottleneckExpand` block of the DISSL/CISSL code (the
"+ dim." ResNet-18 with 2048 features).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

ModuleDef = Any

_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")  # torchvision kaiming


def _last_bn_init(zero_init_residual: bool):
  return nn.initializers.zeros if zero_init_residual else nn.initializers.ones


def _add_shortcut(x: jnp.ndarray, y: jnp.ndarray, conv: ModuleDef, norm: ModuleDef,
                  strides: int) -> jnp.ndarray:
  """relu(shortcut(x) + y); the shortcut is a strided 1x1 conv + BN when shapes differ.

  Called from inside a block's compact ``__call__``, so the submodules belong to the block.
  """
  if x.shape != y.shape:
    x = conv(y.shape[-1], (1, 1), (strides, strides), name="shortcut_conv")(x)
    x = norm(name="shortcut_bn")(x)
  return nn.relu(x + y)


class BasicBlock(nn.Module):
  """Two 3x3 convolutions with a residual connection (expansion 1)."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool

  expansion = 1

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, (3, 3), name="conv2")(y)
    y = self.norm(name="bn2", scale_init=_last_bn_init(self.zero_init_residual))(y)
    return _add_shortcut(x, y, self.conv, self.norm, self.strides)


class Bottleneck(nn.Module):
  """1x1 -> 3x3 (strided) -> 1x1 convolutions with a residual connection (expansion 4)."""

  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  zero_init_residual: bool

  expansion = 4

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    y = nn.relu(self.norm(name="bn1")(self.conv(self.features, (1, 1), name="conv1")(x)))
    y = self.conv(self.features, (3, 3), (self.strides, self.strides), name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = self.conv(self.features * 4, (1, 1), name="conv3")(y)
    y = self.norm(name="bn3", scale_init=_last_bn_init(self.zero_init_residual))(y)
    return _add_shortcut(x, y, self.conv, self.norm, self.strides)


# The ISSL code's conv init: truncated normal "std = sqrt(1/fan_in) / 0.8796" (the std of a
# standard normal truncated to +-2), but truncated at +-2 in absolute value, so it is a plain
# normal with variance (1 / 0.8796^2) / fan_in.
_issl_conv_init = nn.initializers.variance_scaling(1.0 / 0.87962566103423978 ** 2, "fan_in",
                                                   "normal")


class BottleneckExpand(nn.Module):
  """The DISSL/CISSL code's in-backbone dimension expansion (official
  issl/architectures/cnn.py ``BottleneckExpand``), applied before global average pooling.

  ``y = relu(bn3(conv3(relu(bn2(conv2(relu(bn1(conv1(x)))))))) + tile(x))``: conv1 1x1 to
  ``hidden`` channels, conv2 3x3 (stride 1), conv3 1x1 to ``out_channels``, no biases. The
  residual repeats the input channels ``out_channels / C`` times (channel k is input channel
  k mod C, einops ``'b c h w -> b (tile c) h w'``); when ``out_channels < C`` there is no
  residual (the official non-residual case). Init as the official code: conv1 normal with std
  ``1 / sqrt(hidden)`` (a Johnson-Lindenstrauss projection), conv2 and conv3 `_issl_conv_init`,
  BN scale 1 and bias 0.

  Attributes:
    out_channels: output channels (a multiple of the input channels, or fewer).
    hidden: channels of the two inner convolutions.
    norm: BatchNorm constructor (training mode and axis already bound).
    dtype: computation dtype.
  """

  out_channels: int
  hidden: int
  norm: ModuleDef
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
    channels = x.shape[-1]
    residual = self.out_channels >= channels
    if residual and self.out_channels % channels:
      raise ValueError(f"BottleneckExpand: {self.out_channels} output channels are not a "
                       f"multiple of the {channels} input channels (the residual tiles them)")
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    y = conv(self.hidden, (1, 1), kernel_init=nn.initializers.normal(self.hidden ** -0.5),
             name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = conv(self.hidden, (3, 3), padding=((1, 1), (1, 1)), kernel_init=_issl_conv_init,
             name="conv2")(y)
    y = nn.relu(self.norm(name="bn2")(y))
    y = conv(self.out_channels, (1, 1), kernel_init=_issl_conv_init, name="conv3")(y)
    y = self.norm(name="bn3")(y)
    if residual:
      y = y + jnp.tile(x, (1,) * (x.ndim - 1) + (self.out_channels // channels,))
    return nn.relu(y)


class ResNet(nn.Module):
  """A ResNet trunk with global average pooling; returns ``[B, stage_widths[-1]*expansion]``.

  Attributes:
    stage_sizes: blocks per stage.
    stage_widths: base channel count of each stage (before the width multiplier).
    block: `BasicBlock` or `Bottleneck`.
    stem_width: channels of the stem convolution (before the width multiplier).
    width: width multiplier.
    cifar_stem: 3x3 stem without max-pool if True, else 7x7/2 stem with 3x3/2 max-pool.
    stem_stride: stride of the 3x3 stem (1 for the CIFAR ResNets, 2 for the small presets).
    zero_init_residual: zero-init the last BN scale in each block.
    expand_features: if > 0, a 1x1 convolution + BN + ReLU to this many channels before the
      pooling (a cheap way to a wide representation for the small presets; 0 = none).
    expand_bottleneck: with ``expand_features``, > 0 replaces that 1x1 convolution by a
      `BottleneckExpand` block with this many inner channels (the DISSL/CISSL "+ dim."
      backbone: 512 -> 2048 features with 512 inner channels).
    stem_pool: with the 3x3 stem, a 3x3 stride-2 max-pool after it (the DISSL/CISSL
      ResNet-18 for 50-100 px images, e.g. TinyImageNet).
    output_bn: if True, a BatchNorm without scale or bias on the pooled output: each feature is
      standardised (batch statistics in training, running or re-estimated ones in eval), so
      the representation is centred rather than all-positive after the ReLU, which spreads
      its cosine similarities (a per-feature affine map: a linear probe sees the same
      information).
    bn_momentum: Flax BN decay of running statistics.
    axis_name: named axis for synchronised BN statistics (None: per-device batch).
    dtype: computation dtype (parameters stay float32).
    input_mean, input_std: per-channel statistics of [0, 1] inputs, used to standardise.
  """

  stage_sizes: Sequence[int]
  stage_widths: Sequence[int]
  block: Callable[..., nn.Module]
  stem_width: int = 64
  width: float = 1.0
  cifar_stem: bool = True
  stem_stride: int = 1
  zero_init_residual: bool = False
  expand_features: int = 0
  expand_bottleneck: int = 0
  stem_pool: bool = False
  output_bn: bool = False
  bn_momentum: float = 0.9
  axis_name: str | None = None
  dtype: Any = jnp.float32
  input_mean: Sequence[float] = (0.0,)
  input_std: Sequence[float] = (1.0,)

  @property
  def num_features(self) -> int:
    if self.expand_features:
      return self.expand_features
    return int(round(self.stage_widths[-1] * self.width)) * self.block.expansion

  @nn.compact
  def __call__(self, x: jnp.ndarray, train: bool = True) -> jnp.ndarray:
    if x.ndim != 4:
      raise ValueError(f"ResNet expects images [batch, height, width, channels], got {x.shape}")
    mean = jnp.asarray(self.input_mean, jnp.float32)
    std = jnp.asarray(self.input_std, jnp.float32)
    x = ((x.astype(jnp.float32) - mean) / std).astype(self.dtype)
    base_conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                                  kernel_init=_conv_init)

    def conv(features, kernel_size, strides=(1, 1), padding=None, name=None):
      # torchvision pads k // 2 on every side; Flax's "SAME" would pad stride-2 convolutions
      # asymmetrically (0 before, 1 after), which gives the same shapes but other values.
      if padding is None:
        padding = [(k // 2, k // 2) for k in kernel_size]
      return base_conv(features, kernel_size, strides, padding=padding, name=name)

    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=self.bn_momentum, epsilon=1e-5,
        dtype=self.dtype, axis_name=self.axis_name if train else None)
    stem = int(round(self.stem_width * self.width))
    if self.cifar_stem:
      x = conv(stem, (3, 3), (self.stem_stride, self.stem_stride), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      if self.stem_pool:
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    else:
      x = conv(stem, (7, 7), (2, 2), padding=((3, 3), (3, 3)), name="stem_conv")(x)
      x = nn.relu(norm(name="stem_bn")(x))
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for i, (num_blocks, base) in enumerate(zip(self.stage_sizes, self.stage_widths)):
      features = int(round(base * self.width))
      for j in range(num_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = self.block(features=features, strides=strides, conv=conv, norm=norm,
                       zero_init_residual=self.zero_init_residual,
                       name=f"stage{i + 1}_block{j + 1}")(x)
    if self.expand_features and self.expand_bottleneck:
      x = BottleneckExpand(self.expand_features, self.expand_bottleneck, norm=norm,
                           dtype=self.dtype, name="expand")(x)
    elif self.expand_features:
      x = conv(self.expand_features, (1, 1), name="expand_conv")(x)
      x = nn.relu(norm(name="expand_bn")(x))
    x = jnp.mean(x, axis=(1, 2)).astype(jnp.float32)
    if self.output_bn:
      x = norm(name="output_bn", use_scale=False, use_bias=False, dtype=jnp.float32)(x)
    return x


@dataclasses.dataclass(frozen=True)
class _Preset:
  stage_sizes: tuple[int, ...]
  stage_widths: tuple[int, ...]
  block: type
  stem_width: int
  stem_stride: int = 1


PRESETS: dict[str, _Preset] = {
    "resnet_tiny": _Preset((1, 1, 1), (16, 32, 64), BasicBlock, 16, stem_stride=2),
    "resnet_small": _Preset((1, 1, 1), (32, 64, 128), BasicBlock, 32, stem_stride=2),
    "resnet18": _Preset((2, 2, 2, 2), (64, 128, 256, 512), BasicBlock, 64),
    "resnet34": _Preset((3, 4, 6, 3), (64, 128, 256, 512), BasicBlock, 64),
    "resnet50": _Preset((3, 4, 6, 3), (64, 128, 256, 512), Bottleneck, 64),
}
