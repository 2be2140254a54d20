"""Tests for ssljax.augment.policies: policies from the config, strength, batch semantics."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.augment import policies
from ssljax.config import default_config

# These tests are bound by XLA compile time; LLVM's optimisation level changes how fast the
# CPU code runs, not what it computes, so it is turned off here.
quick_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

SIZE = 16  # Side of the stored test images.
B = 8  # Batch size.


def _config(**overrides):
  """The schema's augment section on 16x16 images, with ``overrides`` applied."""
  cfg = default_config().augment
  cfg.crop_size = SIZE
  cfg.small_crop_size = 8
  for name, value in overrides.items():
    setattr(cfg, name, value)
  return cfg


def _images(channels: int, n: int = B, seed: int = 0) -> np.ndarray:
  rng = np.random.default_rng(seed)
  return rng.integers(0, 256, size=(n, SIZE, SIZE, channels), dtype=np.uint8)


def _keys(n: int = B, seed: int = 0) -> jax.Array:
  return jax.random.split(jax.random.key(seed), n)


def _spec(**overrides) -> policies.ViewSpec:
  return dataclasses.replace(policies.build_policy(_config()).views[0], **overrides)


# ---------------------------------------------------------------- building from the config


def test_simclr_and_moco_v2_are_two_views_with_the_config_values():
  cfg = _config(blur_prob=0.5, solarize_prob=0.1)
  policy = policies.build_policy(cfg)
  assert policy.num_views == 2 and policy.view_sizes == (SIZE, SIZE)
  expected = policies.ViewSpec(
      crop_size=SIZE, crop_scale=tuple(cfg.crop_scale), crop_ratio=tuple(cfg.crop_ratio),
      flip_prob=cfg.flip_prob, jitter=tuple(cfg.jitter), jitter_prob=cfg.jitter_prob,
      grayscale_prob=cfg.grayscale_prob, blur_prob=0.5, blur_sigma=tuple(cfg.blur_sigma),
      solarize_prob=0.1)
  assert policy.views == (expected, expected)
  cfg.policy = "moco_v2"
  assert policies.build_policy(cfg) == policy


def test_byol_views_are_asymmetric():
  views = policies.build_policy(_config(policy="byol", blur_prob=0.5)).views
  assert [(v.blur_prob, v.solarize_prob) for v in views] == [(1.0, 0.0), (0.1, 0.2)]
  views = policies.build_policy(_config(policy="byol", byol_blur_probs=(0.0, 0.0),
                                        byol_solarize_probs=(0.0, 0.3))).views
  assert [(v.blur_prob, v.solarize_prob) for v in views] == [(0.0, 0.0), (0.0, 0.3)]
  with pytest.raises(ValueError, match=r"augment.byol_solarize_probs must be a probability"):
    policies.build_policy(_config(policy="byol", byol_solarize_probs=(0.0, 1.5)))
  with pytest.raises(ValueError, match=r"one probability per view \(2\)"):
    policies.build_policy(_config(policy="byol", byol_blur_probs=(1.0,)))


def test_num_views_for_symmetric_policies():
  policy = policies.build_policy(_config(num_views=3))
  assert policy.num_views == 3 and len(set(policy.views)) == 1
  with pytest.raises(ValueError, match="augment.num_views must be >= 2, got 1"):
    policies.build_policy(_config(num_views=1))


def test_multicrop_views():
  policy = policies.build_policy(_config(policy="multicrop", num_small_crops=3))
  assert policy.num_views == 5
  assert policy.view_sizes == (SIZE, SIZE, 8, 8, 8)
  assert all(v.crop_scale == (0.05, 0.4) for v in policy.views[2:])
  assert policy.views[0].crop_scale == (0.08, 1.0)


def test_out_of_distribution_crops_are_the_last_small_crops_and_tiny():
  # Crops only (no colour jitter or grayscale, which do not move the crop): one compile.
  policy = policies.build_policy(_config(policy="multicrop", num_small_crops=4,
                                         num_ood_crops=2, ood_crop_scale=(0.01, 0.02),
                                         jitter_prob=0.0, grayscale_prob=0.0))
  assert [v.crop_scale for v in policy.views[2:]] == [(0.05, 0.4)] * 2 + [(0.01, 0.02)] * 2
  assert policy.view_sizes == (SIZE, SIZE, 8, 8, 8, 8)
  # A tiny crop covers at most 2% of the image: an image with a bright quarter and a dark
  # rest gives tiny crops that are (almost) uniform, where ordinary small crops mix both.
  image = np.zeros((1, SIZE, SIZE, 1), np.uint8)
  image[0, :SIZE // 2, :SIZE // 2] = 255
  keys = jax.random.split(jax.random.key(1), 16)
  views = compiled(policy)(keys, np.repeat(image, 16, axis=0))
  spread = [float(jnp.mean(jnp.max(v, axis=(1, 2, 3)) - jnp.min(v, axis=(1, 2, 3))))
            for v in views[2:]]
  assert max(spread[2:]) < min(spread[:2]), spread
  with pytest.raises(ValueError, match="augment.num_ood_crops must be between 0 and "
                                       "augment.num_small_crops \\(1\\), got 2"):
    policies.build_policy(_config(policy="multicrop", num_small_crops=1, num_ood_crops=2))


def test_unknown_policy_lists_the_known_ones():
  with pytest.raises(ValueError, match="unknown augment.policy 'swav'.*simclr, moco_v2, byol"):
    policies.build_policy(_config(policy="swav"))


def test_invalid_view_parameters_are_rejected():
  with pytest.raises(ValueError, match="flip_prob must be a probability"):
    _spec(flip_prob=1.5)
  with pytest.raises(ValueError, match="crop_scale"):
    _spec(crop_scale=(0.8, 0.2))
  with pytest.raises(ValueError, match="hue <= 0.5"):
    _spec(jitter=(0.4, 0.4, 0.4, 0.6))


def test_view_spec_stores_tuples_of_floats():
  spec = _spec(crop_scale=[0.5, 1], blur_sigma=np.array([0.1, 2.0]))
  assert spec.crop_scale == (0.5, 1.0) and isinstance(spec.blur_sigma, tuple)
  assert hash(policies.Policy([spec])) == hash(policies.Policy((_spec(crop_scale=(0.5, 1.0)),)))
  with pytest.raises(ValueError, match="at least one view"):
    policies.Policy(())


# ---------------------------------------------------------------- strength


def test_strength_one_leaves_the_config_values():
  cfg = _config(crop_scale=(0.2, 1.0), grayscale_prob=0.1)
  assert policies.build_policy(cfg) == policies.build_policy(_config(
      crop_scale=(0.2, 1.0), grayscale_prob=0.1, strength=1.0))
  view = policies.build_policy(cfg).views[0]
  assert view.crop_scale == (0.2, 1.0) and view.jitter == (0.4, 0.4, 0.4, 0.1)
  assert view.grayscale_prob == 0.1


@pytest.mark.parametrize(
    "strength, crop_scale, jitter, grayscale_prob",
    [
        # DISSL convention: crop (0.2 / s, 1), jitter (0.4s, 0.4s, 0.4s, 0.1s), grayscale 0.1s.
        (0.5, (0.4, 1.0), (0.2, 0.2, 0.2, 0.05), 0.05),
        (0.25, (0.8, 1.0), (0.1, 0.1, 0.1, 0.025), 0.025),
        (0.1, (1.0, 1.0), (0.04, 0.04, 0.04, 0.01), 0.01),  # Lower bound clipped to 1.
        (2.0, (0.1, 1.0), (0.8, 0.8, 0.8, 0.2), 0.2),
        (20.0, (0.01, 1.0), (8.0, 8.0, 8.0, 0.5), 1.0),  # Hue and probability capped.
        (0.0, (1.0, 1.0), (0.0, 0.0, 0.0, 0.0), 0.0),  # No crop, no colour change.
    ])
def test_strength_follows_the_dissl_convention(strength, crop_scale, jitter, grayscale_prob):
  cfg = _config(crop_scale=(0.2, 1.0), grayscale_prob=0.1, blur_prob=0.5, solarize_prob=0.2,
                strength=strength)
  for view in policies.build_policy(cfg).views:
    np.testing.assert_allclose(view.crop_scale, crop_scale, rtol=1e-12)
    np.testing.assert_allclose(view.jitter, jitter, rtol=1e-12)
    np.testing.assert_allclose(view.grayscale_prob, grayscale_prob, rtol=1e-12)
    # Not scaled: flip, jitter probability, blur, solarize, aspect ratio.
    assert (view.flip_prob, view.jitter_prob, view.blur_prob, view.solarize_prob) == (
        0.5, 0.8, 0.5, 0.2)
    assert view.crop_ratio == tuple(cfg.crop_ratio)


def test_strength_on_small_crops_keeps_the_upper_bound():
  cfg = _config(policy="multicrop", num_small_crops=2, strength=0.1)
  small = policies.build_policy(cfg).views[-1]
  assert small.crop_scale == (0.4, 0.4)  # min(upper, 0.05 / 0.1).


def test_negative_strength_is_an_error():
  with pytest.raises(ValueError, match="strength must be a number >= 0, got -0.5"):
    policies.build_policy(_config(strength=-0.5))


# ---------------------------------------------------------------- applying a policy

# quick_jit(policy) per distinct policy (policies are hashable), so tests share compilations.
compiled = functools.cache(quick_jit)


@pytest.mark.parametrize(
    "name, channels", [("multicrop", 1), ("multicrop", 3), ("byol", 3)])
def test_policy_shapes_range_determinism(name, channels):
  policy = policies.build_policy(_config(policy=name, num_small_crops=2, blur_prob=0.5,
                                         solarize_prob=0.2))
  images = _images(channels)
  keys = _keys()
  views = compiled(policy)(keys, images)
  assert len(views) == policy.num_views
  for view, size in zip(views, policy.view_sizes):
    assert view.shape == (B, size, size, channels) and view.dtype == jnp.float32
    assert float(view.min()) >= 0.0 and float(view.max()) <= 1.0
  for view, repeat in zip(views, compiled(policy)(keys, images)):
    np.testing.assert_array_equal(view, repeat)
  for view, other in zip(views, compiled(policy)(_keys(seed=1), images)):
    assert all(not np.allclose(a, b) for a, b in zip(view, other))
  # The two global views of an example differ from each other.
  assert all(not np.allclose(a, b) for a, b in zip(views[0], views[1]))


def test_policy_view_is_augment_view_with_the_folded_key():
  policy = policies.build_policy(_config(policy="byol", num_small_crops=2, blur_prob=0.5,
                                         solarize_prob=0.2))
  images = _images(3)
  keys = _keys()
  view = compiled(policy)(keys, images)[1]
  draw = quick_jit(jax.vmap(functools.partial(policies.augment_view, spec=policy.views[1])))
  np.testing.assert_allclose(view, draw(jax.vmap(jax.random.fold_in, (0, None))(keys, 1),
                                        images), atol=1e-6)


def test_raw_keys_and_batch_sharded_inputs_give_the_same_views(num_devices):
  policy = policies.Policy((_spec(crop_size=8),))
  images = _images(1, n=num_devices)
  keys = _keys(num_devices)
  expected = compiled(policy)(keys, images)[0]
  raw = compiled(policy)(jax.random.split(jax.random.PRNGKey(0), num_devices), images)[0]
  np.testing.assert_array_equal(raw, expected)
  # On a batch sharded over the mesh, under jit and per device under shard_map.
  mesh = jax.make_mesh((num_devices,), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.P("data"))
  keys, images = jax.device_put((keys, images), sharding)
  np.testing.assert_allclose(compiled(policy)(keys, images)[0], expected, atol=1e-5)
  per_device = jax.shard_map(policy, mesh=mesh, in_specs=jax.P("data"), out_specs=jax.P("data"))
  np.testing.assert_allclose(quick_jit(per_device)(keys, images)[0], expected, atol=1e-5)


def test_strength_zero_keeps_the_image():
  policy = policies.build_policy(_config(strength=0.0, flip_prob=0.0))
  images = _images(3)
  for view in compiled(policy)(_keys(), images):
    np.testing.assert_allclose(view, images / 255.0, atol=1e-6)


def test_bad_inputs_have_clear_errors():
  policy = policies.build_policy(_config())
  keys = _keys()
  with pytest.raises(ValueError, match=r"expected uint8 images of shape \[batch, height, width, "
                     r"channels\] with 1 or 3 channels, got float32 \[8, 16, 16, 1\]"):
    policy(keys, _images(1).astype(np.float32))
  with pytest.raises(ValueError, match=r"got uint8 \[8, 16, 16\]"):
    policy(keys, _images(1)[..., 0])
  with pytest.raises(ValueError, match=r"got uint8 \[8, 16, 16, 2\]"):
    policy(keys, np.concatenate([_images(1)] * 2, axis=-1))
  with pytest.raises(ValueError, match=r"one PRNG key per image \(8\), got keys of shape \[4\]"):
    policy(_keys(4), _images(1))
  with pytest.raises(ValueError, match=r"expected uint8 images of shape \[height, width"):
    policies.augment_view(keys[0], _images(1)[0].astype(np.float32), policy.views[0])


# ---------------------------------------------------------------- random erasing


def test_erasing_ends_each_view_with_a_rectangle_of_the_data_mean():
  # MoCo + CLD's CIFAR-10 recipe ends every view with torchvision's RandomErasing(p=1).
  plain = policies.build_policy(_config(num_views=3))
  erasing = policies.build_policy(_config(num_views=3, erasing_prob=1.0), (0.3, 0.4, 0.5))
  assert erasing.views[0].erasing_value == (0.3, 0.4, 0.5)
  images, keys = _images(3), _keys()
  for before, after in zip(quick_jit(plain)(keys, images), quick_jit(erasing)(keys, images)):
    before, after = np.asarray(before), np.asarray(after)
    changed = np.any(before != after, axis=-1)
    assert changed.any(axis=(1, 2)).all()  # 16 x 16 views: a rectangle always fits
    # The other ops drew the same crops and colours: outside the rectangle nothing moved.
    fill = np.asarray((0.3, 0.4, 0.5), np.float32)
    np.testing.assert_array_equal(after[changed], np.broadcast_to(fill, after[changed].shape))
  given = policies.build_policy(_config(erasing_prob=1.0, erasing_value=(0.0,)), (0.3,))
  assert given.views[0].erasing_value == (0.0,)  # an explicit fill wins over the mean


def test_erasing_errors_name_the_setting():
  with pytest.raises(ValueError, match="erasing_prob > 0 needs a fill: set augment."
                                       "erasing_value"):
    policies.build_policy(_config(erasing_prob=1.0))
  with pytest.raises(ValueError, match="erasing_scale must satisfy 0 < low <= high < 1"):
    policies.build_policy(_config(erasing_prob=1.0, erasing_scale=(0.2, 1.0)), (0.5,))
  with pytest.raises(ValueError, match="erasing_prob must be a probability in"):
    policies.build_policy(_config(erasing_prob=1.5), (0.5,))
  with pytest.raises(ValueError, match="erasing_value has 3 values for images with 1 "
                                       "channels"):
    policies.build_policy(_config(erasing_prob=1.0), (0.1, 0.2, 0.3))(_keys(), _images(1))


def test_the_moco_cld_cifar10_recipe_erases():
  from ssljax.config import load_config
  assert load_config("moco_cld:cifar10").augment.erasing_prob == 1.0
  assert load_config("moco_cld:cifar100").augment.erasing_prob == 0.0
  assert load_config("moco:cifar10").augment.erasing_prob == 0.0
