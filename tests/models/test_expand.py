"""The DISSL/CISSL in-backbone dimension expansion (BottleneckExpand) and the 3x3 stem with
max-pool: shapes, the residual tiling, init, and the config keys."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.config import default_config
from ssljax.models import PRESETS, BottleneckExpand, ResNet, build_encoder

_KEY = jax.random.key(0)
_NORM = functools.partial(nn.BatchNorm, use_running_average=True, epsilon=1e-5)


def test_block_output_shape_and_residual_tiling():
  block = BottleneckExpand(out_channels=12, hidden=5, norm=_NORM)
  x = jnp.asarray(np.random.default_rng(0).uniform(size=(2, 3, 3, 4)), jnp.float32)
  variables = block.init(_KEY, x)
  assert block.apply(variables, x).shape == (2, 3, 3, 12)
  assert variables["params"]["conv1"]["kernel"].shape == (1, 1, 4, 5)
  assert variables["params"]["conv2"]["kernel"].shape == (3, 3, 5, 5)
  assert variables["params"]["conv3"]["kernel"].shape == (1, 1, 5, 12)
  # With the last BN's scale and bias at 0 the block is relu(tile(x)): output channel k is
  # input channel k mod 4, i.e. [x, x, x] along channels. Non-negative x (it follows a ReLU
  # in the ResNet) comes out unchanged.
  params = jax.tree.map(jnp.asarray, variables["params"])
  params["bn3"] = {"scale": jnp.zeros(12), "bias": jnp.zeros(12)}
  y = block.apply({**variables, "params": params}, x)
  np.testing.assert_allclose(y, jnp.concatenate([x, x, x], axis=-1), rtol=1e-6)
  for k in range(12):
    np.testing.assert_array_equal(y[..., k], x[..., k % 4])


def test_block_without_residual_when_shrinking_and_error_on_a_non_multiple():
  x = jnp.ones((1, 2, 2, 8))
  shrink = BottleneckExpand(out_channels=4, hidden=3, norm=_NORM)
  variables = shrink.init(_KEY, x)
  params = dict(variables["params"])
  params["bn3"] = {"scale": jnp.zeros(4), "bias": jnp.zeros(4)}
  np.testing.assert_array_equal(shrink.apply({**variables, "params": params}, x), 0.0)
  with pytest.raises(ValueError, match="not a multiple of the 8 input channels"):
    BottleneckExpand(out_channels=12, hidden=3, norm=_NORM).init(_KEY, x)


def test_block_init_is_the_official_one():
  block = BottleneckExpand(out_channels=512, hidden=256, norm=_NORM)
  p = block.init(_KEY, jnp.zeros((1, 4, 4, 128)))["params"]
  # conv1: normal with std 1/sqrt(hidden); conv2/conv3: variance 1.2924 / fan_in.
  np.testing.assert_allclose(np.std(p["conv1"]["kernel"]), 256 ** -0.5, rtol=0.05)
  np.testing.assert_allclose(np.std(p["conv2"]["kernel"]),
                             np.sqrt(1.2924 / (9 * 256)), rtol=0.05)
  np.testing.assert_allclose(np.std(p["conv3"]["kernel"]), np.sqrt(1.2924 / 256), rtol=0.05)
  np.testing.assert_array_equal(p["bn3"]["scale"], 1.0)


def test_resnet18_plus_dim_has_2048_features_from_the_block():
  preset = PRESETS["resnet18"]
  model = ResNet(stage_sizes=preset.stage_sizes, stage_widths=preset.stage_widths,
                 block=preset.block, stem_width=preset.stem_width, expand_features=2048,
                 expand_bottleneck=512, stem_pool=True)
  assert model.num_features == 2048
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(functools.partial(model.init, train=False), _KEY, x)
  assert set(variables["params"]["expand"]) == {"conv1", "bn1", "conv2", "bn2", "conv3",
                                                "bn3"}
  assert "expand_conv" not in variables["params"]
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert out.shape == (2, 2048)
  # The max-pool after the 3x3 stem halves the resolution the stages see: 64 px ends at 4x4
  # (torchvision's TinyImageNet-sized ResNet-18 of the ISSL code), 8x8 without it.
  _, state = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros((2, 64, 64, 3)), train=False,
                            capture_intermediates=True, mutable=["intermediates"]), variables)
  last = state["intermediates"]["stage4_block2"]["__call__"][0]
  assert last.shape[1:3] == (4, 4)


def test_config_keys_reach_the_encoder():
  config = default_config("dissl")
  assert (config.model.expand_bottleneck, config.model.stem_pool) == (0, False)
  config.model.expand_features = 256
  config.model.expand_bottleneck = 64
  config.model.stem_pool = True
  encoder = build_encoder(config)
  assert (encoder.expand_features, encoder.expand_bottleneck, encoder.stem_pool) == (256, 64,
                                                                                     True)
  x = jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32)
  variables = jax.eval_shape(functools.partial(encoder.init, train=False), _KEY, x)
  assert "expand" in variables["params"]
  assert jax.eval_shape(functools.partial(encoder.apply, train=False), variables,
                        x).shape == (2, 256)
