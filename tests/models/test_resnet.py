"""ResNet encoders: shapes and parameter counts, stems, zero-init, BN, dtype, sync BN."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.config import default_config
from ssljax.models import PRESETS, BasicBlock, Bottleneck, ResNet, build_encoder
from tests.util import init_with_numpy_kernels

_KEY = jax.random.key(0)


def _preset_resnet(name: str, **kwargs) -> ResNet:
  preset = PRESETS[name]
  return ResNet(stage_sizes=preset.stage_sizes, stage_widths=preset.stage_widths,
                block=preset.block, stem_width=preset.stem_width,
                stem_stride=preset.stem_stride, **kwargs)


def _abstract_variables(model: nn.Module, image_shape: tuple[int, ...]):
  x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  return jax.eval_shape(functools.partial(model.init, train=False), _KEY, x)


def _variables(module: nn.Module, *args, seed: int = 0, **kwargs):
  """``module.init`` values with NumPy kernels (see `tests.util.init_with_numpy_kernels`)."""
  return init_with_numpy_kernels(functools.partial(module.init, **kwargs), _KEY, *args,
                                 seed=seed)


def _num_params(tree) -> int:
  return sum(int(np.prod(leaf.shape)) for leaf in jax.tree.leaves(tree))


def _images(shape, seed=0):
  return jnp.asarray(np.random.default_rng(seed).uniform(size=shape), jnp.float32)


def _encoder_config(encoder: str, **model):
  c = default_config()
  c.model.encoder = encoder
  for key, value in model.items():
    c.model[key] = value
  return c


@pytest.mark.parametrize("name, features", [("resnet_tiny", 64), ("resnet_small", 128),
                                            ("resnet18", 512), ("resnet34", 512),
                                            ("resnet50", 2048)])
def test_every_preset_gives_pooled_features(name, features):
  assert set(PRESETS) == {"resnet_tiny", "resnet_small", "resnet18", "resnet34", "resnet50"}
  model = _preset_resnet(name)
  assert model.num_features == features
  variables = _abstract_variables(model, (1, 32, 32, 3))
  x = jax.ShapeDtypeStruct((3, 32, 32, 3), jnp.float32)
  out = jax.eval_shape(functools.partial(model.apply, train=False), variables, x)
  assert out.shape == (3, features) and out.dtype == jnp.float32


@pytest.mark.parametrize("encoder, cifar_stem, expected", [
    # torchvision resnet18 without fc: 11,689,512 - 513,000 = 11,176,512. The CIFAR stem swaps
    # the 7x7x3x64 stem kernel (9,408) for a 3x3x3x64 one (1,728): 7,680 fewer.
    ("resnet18", False, 11_176_512),
    ("resnet18", True, 11_168_832),
    ("resnet34", False, 21_284_672),  # 21,797,672 - 513,000
    ("resnet50", False, 23_508_032),  # 25,557,032 - 2,049,000
])
def test_parameter_counts_match_torchvision(encoder, cifar_stem, expected):
  config = _encoder_config(encoder, cifar_stem=cifar_stem)
  config.data.channels = 3
  config.data.mean = (0.485, 0.456, 0.406)
  config.data.std = (0.229, 0.224, 0.225)
  variables = _abstract_variables(build_encoder(config), (1, 224, 224, 3))
  assert _num_params(variables["params"]) == expected
  # One running mean and variance per BatchNorm channel, i.e. one per BN scale parameter.
  bn_scales = [leaf for path, leaf in jax.tree_util.tree_leaves_with_path(variables["params"])
               if path[-1].key == "scale"]
  assert _num_params(variables["batch_stats"]) == 2 * _num_params(bn_scales)


def _intermediate_shapes(model: ResNet, image_shape):
  variables = _abstract_variables(model, image_shape)
  x = jax.ShapeDtypeStruct(image_shape, jnp.float32)
  _, state = jax.eval_shape(
      functools.partial(model.apply, train=False, capture_intermediates=True,
                        mutable=["intermediates"]), variables, x)
  return {name: value["__call__"][0].shape for name, value in state["intermediates"].items()
          if name != "__call__"}


def test_stride_two_stem_of_the_small_presets_halves_the_resolution():
  for name, stem, widths in (("resnet_tiny", 16, (16, 32, 64)),
                             ("resnet_small", 32, (32, 64, 128))):
    shapes = _intermediate_shapes(_preset_resnet(name), (2, 28, 28, 1))
    assert shapes["stem_conv"] == (2, 14, 14, stem)
    assert shapes["stage1_block1"] == (2, 14, 14, widths[0])
    assert shapes["stage2_block1"] == (2, 7, 7, widths[1])
    assert shapes["stage3_block1"] == (2, 4, 4, widths[2])
  cifar = _intermediate_shapes(_preset_resnet("resnet18"), (2, 32, 32, 3))
  assert cifar["stem_conv"] == (2, 32, 32, 64)
  assert cifar["stage1_block2"] == (2, 32, 32, 64)
  assert cifar["stage4_block2"] == (2, 4, 4, 512)


def test_imagenet_stem_downsamples_by_four_before_the_first_stage():
  shapes = _intermediate_shapes(_preset_resnet("resnet50", cifar_stem=False),
                                (1, 224, 224, 3))
  assert shapes["stem_conv"] == (1, 112, 112, 64)
  assert shapes["stage1_block1"] == (1, 56, 56, 256)  # after the 3x3/2 max-pool
  assert shapes["stage2_block1"] == (1, 28, 28, 512)
  assert shapes["stage4_block3"] == (1, 7, 7, 2048)


def test_width_multiplier_scales_every_channel_count():
  model = _preset_resnet("resnet18", width=0.5)
  assert model.num_features == 256
  params = _abstract_variables(model, (1, 16, 16, 3))["params"]
  assert params["stem_conv"]["kernel"].shape == (3, 3, 3, 32)
  assert params["stage1_block1"]["conv2"]["kernel"].shape == (3, 3, 32, 32)
  assert params["stage2_block1"]["shortcut_conv"]["kernel"].shape == (1, 1, 32, 64)
  assert params["stage4_block2"]["bn2"]["scale"].shape == (256,)
  full = _num_params(_abstract_variables(_preset_resnet("resnet18"), (1, 16, 16, 3))["params"])
  # Convolutions dominate and scale with width^2.
  assert 0.24 < _num_params(params) / full < 0.26


def _small_resnet(**kwargs) -> ResNet:
  """Two BasicBlock stages: enough to exercise the stem, both shortcut kinds and pooling."""
  return ResNet(stage_sizes=(1, 1), stage_widths=(8, 16), block=BasicBlock, stem_width=8,
                **kwargs)


def _jit_apply(model: nn.Module, **kwargs):
  return jax.jit(functools.partial(model.apply, **kwargs))


def _block_parts():
  conv = functools.partial(nn.Conv, use_bias=False, padding="SAME")
  norm = functools.partial(nn.BatchNorm, use_running_average=False, momentum=0.9,
                           epsilon=1e-5)
  return conv, norm


@pytest.mark.parametrize("block, features, channels", [(BasicBlock, 4, 4),
                                                       (Bottleneck, 2, 8)])
def test_zero_init_residual_block_is_relu_of_its_input(block, features, channels):
  conv, norm = _block_parts()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 5, 5, channels)), jnp.float32)
  for zero_init in (True, False):
    module = block(features=features, strides=1, conv=conv, norm=norm,
                   zero_init_residual=zero_init)
    out, _ = _jit_apply(module, mutable=["batch_stats"])(_variables(module, x), x)
    assert out.shape == x.shape
    if zero_init:
      np.testing.assert_array_equal(out, jax.nn.relu(x))
    else:
      assert not np.allclose(out, jax.nn.relu(x), atol=1e-3)


def test_zero_init_residual_zeroes_exactly_the_last_bn_scale_of_each_block():
  for block, last in ((BasicBlock, "bn2"), (Bottleneck, "bn3")):
    for zero_init in (True, False):
      model = ResNet(stage_sizes=(2, 1), stage_widths=(4, 8), block=block, stem_width=8,
                     zero_init_residual=zero_init)
      params = _variables(model, jnp.zeros((1, 8, 8, 3)), train=False)["params"]
      blocks = {k: v for k, v in params.items() if k.startswith("stage")}
      assert sorted(blocks) == ["stage1_block1", "stage1_block2", "stage2_block1"]
      for name, block_params in blocks.items():
        norms = [k for k in block_params if k.startswith("bn") or k.endswith("_bn")]
        assert last in norms and ("shortcut_bn" in norms) == (name != "stage1_block2")
        for bn in norms:
          expected = 0.0 if zero_init and bn == last else 1.0
          np.testing.assert_array_equal(block_params[bn]["scale"], expected,
                                        err_msg=f"{name}/{bn}")
      np.testing.assert_array_equal(params["stem_bn"]["scale"], 1.0)


def test_zero_init_identity_blocks_pass_features_through_in_the_network():
  model = ResNet(stage_sizes=(2, 2), stage_widths=(8, 16), block=BasicBlock, stem_width=8,
                 zero_init_residual=True)
  x = _images((4, 8, 8, 3))
  variables = _variables(model, x, train=False)
  _, state = _jit_apply(model, train=True, capture_intermediates=True,
                        mutable=["intermediates", "batch_stats"])(variables, x)
  acts = {k: v["__call__"][0] for k, v in state["intermediates"].items() if k != "__call__"}
  # stageN_block2 has an identity shortcut and a post-ReLU input: it is the identity at init.
  for stage in (1, 2):
    np.testing.assert_array_equal(acts[f"stage{stage}_block2"], acts[f"stage{stage}_block1"])
  # stage2_block1 changes shape, so its projection shortcut is not the identity.
  assert acts["stage2_block1"].shape == (4, 4, 4, 16)


def test_input_is_standardised_with_the_dataset_statistics():
  mean, std = (0.5, 0.3, 0.1), (0.2, 0.4, 0.25)
  normalising = _small_resnet(input_mean=mean, input_std=std)
  plain = _small_resnet()
  x = _images((3, 8, 8, 3))
  variables = _variables(normalising, x, train=False)
  standardised = (x - jnp.asarray(mean)) / jnp.asarray(std)
  out = _jit_apply(normalising, train=False)(variables, x)
  plain_apply = _jit_apply(plain, train=False)
  np.testing.assert_allclose(out, plain_apply(variables, standardised), rtol=1e-5, atol=1e-6)
  assert not np.allclose(out, plain_apply(variables, x), atol=1e-3)


def test_train_mode_updates_running_stats_with_torch_momentum_and_eval_mode_does_not():
  model = _small_resnet()
  x = _images((6, 8, 8, 1))
  other = x.at[1:].set(_images((5, 8, 8, 1), seed=1))  # same first row
  variables = _variables(model, x, train=False)
  train_apply = _jit_apply(model, train=True, capture_intermediates=True,
                           mutable=["batch_stats", "intermediates"])
  out, state = train_apply(variables, x)
  stem_out = state["intermediates"]["stem_conv"]["__call__"][0]
  new_stats = state["batch_stats"]
  # Running mean starts at 0 and moves 10% towards the batch mean (PyTorch momentum 0.1).
  np.testing.assert_allclose(new_stats["stem_bn"]["mean"], 0.1 * jnp.mean(stem_out, (0, 1, 2)),
                             rtol=1e-5, atol=1e-7)
  for old, new in zip(jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(new_stats)):
    assert not np.allclose(old, new)
  # Training-mode BN normalises with the batch: changing other rows changes row 0.
  assert not np.allclose(train_apply(variables, other)[0][0], out[0], atol=1e-4)

  eval_apply = _jit_apply(model, train=False, mutable=["batch_stats"])
  eval_out, eval_state = eval_apply(variables, x)
  jax.tree.map(np.testing.assert_array_equal, eval_state["batch_stats"],
               variables["batch_stats"])
  # Eval mode uses the running stats only: every row is computed independently.
  np.testing.assert_array_equal(eval_apply(variables, other)[0][0], eval_out[0])


def test_bfloat16_computes_in_bfloat16_with_float32_params_and_features():
  x = _images((4, 8, 8, 1))
  bf16 = _small_resnet(dtype=jnp.bfloat16)
  variables = _variables(bf16, x, train=False)
  assert jax.tree.map(lambda leaf: leaf.dtype, jax.eval_shape(
      functools.partial(bf16.init, train=False), _KEY, x)) == jax.tree.map(
          lambda _: jnp.dtype(jnp.float32), variables)
  out, state = _jit_apply(bf16, train=False, capture_intermediates=True,
                          mutable=["intermediates"])(variables, x)
  assert out.dtype == jnp.float32
  assert state["intermediates"]["stem_conv"]["__call__"][0].dtype == jnp.bfloat16
  reference = _jit_apply(_small_resnet(), train=False)(variables, x)
  np.testing.assert_allclose(out, reference, rtol=0.05,
                             atol=0.05 * float(jnp.abs(reference).max()))


def test_rejects_images_without_a_batch_axis():
  model = _preset_resnet("resnet_tiny")
  with pytest.raises(ValueError, match="batch, height, width, channels"):
    model.init(_KEY, jnp.zeros((8, 8, 1)), train=False)


def test_build_encoder_reads_the_config():
  config = _encoder_config("resnet_small", width=0.5, zero_init_residual=True,
                           bn_momentum=0.99, sync_batchnorm=True, output_bn=True)
  config.train.compute_dtype = "bfloat16"
  encoder = build_encoder(config, axis_name="data")
  assert (encoder.stage_sizes, encoder.stage_widths, encoder.stem_stride) == (
      (1, 1, 1), (32, 64, 128), 2)
  assert encoder.num_features == 64
  assert encoder.zero_init_residual and encoder.bn_momentum == 0.99 and encoder.output_bn
  assert encoder.axis_name == "data" and encoder.dtype == jnp.bfloat16
  assert encoder.input_mean == tuple(config.data.mean)
  assert encoder.input_std == tuple(config.data.std)
  config.model.sync_batchnorm = False
  assert build_encoder(config, axis_name="data").axis_name is None


def test_build_encoder_errors():
  config = _encoder_config("resnet99")
  with pytest.raises(ValueError, match="resnet99") as error:
    build_encoder(config)
  for name in PRESETS:
    assert name in str(error.value)
  config = _encoder_config("resnet_tiny")
  config.data.channels = 3  # mean/std still have one value
  with pytest.raises(ValueError, match="one value per channel"):
    build_encoder(config)
  config = _encoder_config("resnet_tiny")
  config.train.compute_dtype = "float16"
  with pytest.raises(ValueError, match="compute_dtype"):
    build_encoder(config)


def test_sync_batchnorm_over_devices_equals_single_device_batch(num_devices):
  synced = _small_resnet(axis_name="data", input_mean=(0.3,), input_std=(0.2,))
  local = _small_resnet(input_mean=(0.3,), input_std=(0.2,))
  x = _images((2 * num_devices, 8, 8, 1), seed=3)
  variables = _variables(local, x, train=False)

  def forward(model, variables, x):
    out, state = model.apply(variables, x, train=True, mutable=["batch_stats"])
    return out, state["batch_stats"]

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(functools.partial(forward, synced), mesh=mesh,
                                  in_specs=(P(), P("data")), out_specs=(P("data"), P()),
                                  check_vma=False))
  out, stats = sharded(variables, x)
  ref_out, ref_stats = jax.jit(functools.partial(forward, local))(variables, x)
  np.testing.assert_allclose(out, ref_out, rtol=1e-4, atol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), stats,
               ref_stats)
  # Without synchronisation each device would normalise with its own two rows.
  unsynced = jax.jit(jax.shard_map(functools.partial(forward, local), mesh=mesh,
                                   in_specs=(P(), P("data")), out_specs=(P("data"), P("data")),
                                   check_vma=False))
  assert not np.allclose(unsynced(variables, x)[0], ref_out, atol=1e-3)


def test_expand_features_adds_a_wide_1x1_layer_before_pooling():
  model = _preset_resnet("resnet_tiny", expand_features=96)
  assert model.num_features == 96
  variables = _abstract_variables(model, (2, 28, 28, 1))
  params = variables["params"]
  assert params["expand_conv"]["kernel"].shape == (1, 1, 64, 96)
  assert params["expand_bn"]["scale"].shape == (96,)
  out = jax.eval_shape(lambda v, x: model.apply(v, x, train=False), variables,
                       jax.ShapeDtypeStruct((2, 28, 28, 1), jnp.float32))
  assert out.shape == (2, 96)
  plain = _abstract_variables(_preset_resnet("resnet_tiny"), (2, 28, 28, 1))
  assert _num_params(params) - _num_params(plain["params"]) == 64 * 96 + 2 * 96


def test_output_bn_standardises_each_feature_without_parameters():
  model = _preset_resnet("resnet_tiny", expand_features=32, output_bn=True)
  plain = _preset_resnet("resnet_tiny", expand_features=32)
  x = jax.random.uniform(jax.random.key(0), (64, 12, 12, 1))
  variables = model.init(jax.random.key(1), x, train=False)
  # No scale or bias: the same parameters as without it, one more set of statistics.
  plain_vars = plain.init(jax.random.key(1), x, train=False)
  assert jax.tree.structure(variables["params"]) == jax.tree.structure(plain_vars["params"])
  assert variables["batch_stats"]["output_bn"]["mean"].shape == (32,)
  # Training mode: the pooled features standardised over the batch, by hand.
  pooled = plain.apply(plain_vars, x, train=True, mutable=["batch_stats"])[0]
  out, updated = model.apply(variables, x, train=True, mutable=["batch_stats"])
  expected = (pooled - pooled.mean(0)) / jnp.sqrt(pooled.var(0) + 1e-5)
  np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4)
  assert bool(jnp.any(out < 0))  # centred, unlike the ReLU'd pooled features
  # Eval mode uses the (updated) running statistics, not the batch's.
  stats = updated["batch_stats"]["output_bn"]
  eval_out = model.apply({**variables, "batch_stats": updated["batch_stats"]}, x, train=False)
  eval_pooled = plain.apply({**plain_vars, "batch_stats": {
      k: v for k, v in updated["batch_stats"].items() if k != "output_bn"}}, x, train=False)
  np.testing.assert_allclose(
      eval_out, (eval_pooled - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5),
      rtol=1e-4, atol=1e-4)
