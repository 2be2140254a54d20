"""Flax Linen backbones and heads."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp
import ml_collections

from ssljax.models.heads import MLPHead
from ssljax.models.resnet import PRESETS, BasicBlock, Bottleneck, BottleneckExpand, ResNet

__all__ = ["MLPHead", "ResNet", "BasicBlock", "Bottleneck", "BottleneckExpand", "PRESETS",
           "build_encoder", "compute_dtype", "resolve_compute_dtype"]

_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def resolve_compute_dtype(name: str) -> str:
  """``train.compute_dtype`` as 'float32' or 'bfloat16'.

  'auto' (the default) is 'bfloat16' where JAX's default backend is a GPU or TPU, whose
  matrix units run bf16 at several times their float32 rate, and 'float32' on a CPU, where
  XLA has no fast bf16 convolutions. Parameters, optimiser state and the losses' reductions
  stay float32 in every case; only the networks' activations take this dtype.
  """
  if name == "auto":
    import jax
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"
  if name not in _DTYPES:
    raise ValueError(f"train.compute_dtype must be 'auto' or one of {sorted(_DTYPES)}, "
                     f"got {name!r}")
  return name


def compute_dtype(name: str) -> Any:
  """Maps ``train.compute_dtype`` ('auto', 'float32' or 'bfloat16') to a dtype."""
  return _DTYPES[resolve_compute_dtype(name)]


def build_encoder(config: ml_collections.ConfigDict, *, axis_name: str | None = None) -> ResNet:
  """Builds the encoder named by ``config.model.encoder`` for ``config.data``'s images.

  ``axis_name`` enables synchronised BatchNorm over that named axis when
  ``config.model.sync_batchnorm`` is set.
  """
  name = config.model.encoder
  if name not in PRESETS:
    raise ValueError(f"model.encoder must be one of {sorted(PRESETS)}, got {name!r}")
  if len(config.data.mean) != config.data.channels or len(config.data.std) != config.data.channels:
    raise ValueError(
        f"data.mean {tuple(config.data.mean)} and data.std {tuple(config.data.std)} need one "
        f"value per channel (data.channels = {config.data.channels})")
  preset = PRESETS[name]
  return ResNet(
      stage_sizes=preset.stage_sizes,
      stage_widths=preset.stage_widths,
      block=preset.block,
      stem_width=preset.stem_width,
      width=config.model.width,
      cifar_stem=config.model.cifar_stem,
      stem_stride=preset.stem_stride,
      zero_init_residual=config.model.zero_init_residual,
      expand_features=config.model.expand_features,
      expand_bottleneck=config.model.expand_bottleneck,
      stem_pool=config.model.stem_pool,
      output_bn=config.model.output_bn,
      bn_momentum=config.model.bn_momentum,
      axis_name=axis_name if config.model.sync_batchnorm else None,
      dtype=compute_dtype(config.train.compute_dtype),
      input_mean=tuple(config.data.mean),
      input_std=tuple(config.data.std),
  )
