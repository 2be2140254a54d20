"""Tests for ssljax.augment.ops: ranges, determinism, sampling statistics, exact semantics.

The random ops are exercised through a few jitted, vmapped wrappers whose numeric parameters
are traced arguments, so each wrapper compiles once per channel count and the suite stays
fast on CPU.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import matplotlib.colors
import numpy as np
import PIL.Image
import pytest
from scipy import ndimage

from ssljax.augment import ops

# These tests are bound by XLA compile time; LLVM's optimisation level changes how fast the
# CPU code runs, not what it computes, so it is turned off here.
quick_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

rgb_to_hsv = quick_jit(ops.rgb_to_hsv)
hsv_to_rgb = quick_jit(ops.hsv_to_rgb)
adjust_hue = quick_jit(ops.adjust_hue)

SIZE = 16  # Side of the test images.
CROP = 12  # Output side of the crops.
N = 16  # Examples per batch.


def _images(channels: int, n: int = N, seed: int = 0) -> jax.Array:
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.uniform(size=(n, SIZE, SIZE, channels)), jnp.float32)


def _keys(n: int = N, seed: int = 0) -> jax.Array:
  return jax.random.split(jax.random.key(seed), n)


def _batched(op, **static):
  """jit(vmap(op)) over (keys, images); the params dict is traced and shared by the batch."""

  def one(key, image, params):
    return op(key, image, **static, **params)

  return quick_jit(jax.vmap(one, in_axes=(0, 0, None)))


crop = _batched(ops.random_resized_crop, size=CROP)
flip = _batched(ops.horizontal_flip)
jitter = _batched(ops.color_jitter)
grayscale = _batched(ops.to_grayscale)
blur = _batched(ops.gaussian_blur)
solarize = _batched(ops.solarize)

# Each op with parameters strong enough to reach clipping and every branch.
RANDOM_OPS = {
    "random_resized_crop": (crop, dict(scale=(0.08, 1.0))),
    "horizontal_flip": (flip, dict(prob=0.5)),
    "color_jitter": (jitter, dict(brightness=0.9, contrast=0.9, saturation=0.9, hue=0.5,
                                  prob=0.8)),
    "to_grayscale": (grayscale, dict(prob=0.5)),
    "gaussian_blur": (blur, dict(prob=0.5, sigma=(0.1, 2.0))),
    "solarize": (solarize, dict(prob=0.5, threshold=0.5)),
}
# Ops whose randomness is continuous: distinct keys give distinct outputs.
CONTINUOUS_OPS = ("random_resized_crop", "color_jitter", "gaussian_blur")
# Ops that act with probability `prob` and otherwise return the input.
COIN_OPS = ("horizontal_flip", "to_grayscale", "solarize")


@pytest.mark.parametrize("channels", [1, 3])
@pytest.mark.parametrize("name", sorted(RANDOM_OPS))
def test_random_op_range_dtype_and_determinism(name, channels):
  fn, params = RANDOM_OPS[name]
  images = jnp.broadcast_to(_images(channels, 1), (N, SIZE, SIZE, channels))
  keys = _keys()
  keys = keys.at[1].set(keys[0])  # Examples 0 and 1 share a key.
  out = fn(keys, images, params)
  size = CROP if name == "random_resized_crop" else SIZE
  assert out.shape == (N, size, size, channels)
  assert out.dtype == jnp.float32
  assert float(out.min()) >= 0.0 and float(out.max()) <= 1.0
  np.testing.assert_array_equal(out[0], out[1])
  np.testing.assert_array_equal(out, fn(keys, images, params))
  if name in CONTINUOUS_OPS:
    acted = [i for i in range(2, N)
             if out[i].shape != images[0].shape or not np.array_equal(out[i], images[0])]
    assert len(acted) >= 4
    assert all(not np.allclose(out[i], out[j]) for i, j in itertools.combinations(acted, 2))


@pytest.mark.parametrize("name", COIN_OPS)
def test_coin_ops_act_with_their_probability(name):
  fn, params = RANDOM_OPS[name]
  images = jnp.broadcast_to(_images(3, 1), (N, SIZE, SIZE, 3))
  acted = [not np.array_equal(o, images[0])
           for seed in range(25) for o in fn(_keys(seed=seed), images, params)]
  assert abs(np.mean(acted) - params["prob"]) < 0.08  # 400 draws: 3 sigma = 0.075.
  never = fn(_keys(), images, dict(params, prob=0.0))
  np.testing.assert_array_equal(never, images)


def test_to_float():
  image = jnp.asarray([[[0], [51], [255]]], jnp.uint8)
  out = ops.to_float(image)
  assert out.dtype == jnp.float32
  np.testing.assert_allclose(out[0, :, 0], [0.0, 0.2, 1.0], rtol=1e-7)


# ---------------------------------------------------------------- random resized crop


@functools.cache
def _box_sampler(height: int, width: int, ratio: tuple[float, float]):
  return quick_jit(jax.vmap(
      lambda key, scale: jnp.stack(ops.sample_crop_box(key, height, width, scale, ratio)),
      in_axes=(0, None)))


def _boxes(n, height, width, scale, ratio) -> np.ndarray:
  return np.asarray(_box_sampler(height, width, ratio)(_keys(n), jnp.asarray(scale)))


def test_crop_box_statistics_unclipped_range():
  top, left, h, w = _boxes(2000, 100, 100, (0.3, 0.6), (3 / 4, 4 / 3)).T
  assert np.all((h > 0) & (w > 0) & (top >= 0) & (left >= 0))
  assert np.all((top + h <= 100) & (left + w <= 100))
  # Every attempt is valid here, so the area fraction is ~ U(0.3, 0.6).
  area = h * w / 100**2
  assert abs(area.mean() - 0.45) < 0.01
  assert abs(area.std() - 0.3 / np.sqrt(12)) < 0.01
  # log(w / h) ~ U(log 3/4, log 4/3): mean 0, about 25% in each quarter of the range.
  log_ratio = np.log(w / h)
  assert abs(log_ratio.mean()) < 0.02
  edges = np.linspace(np.log(3 / 4), np.log(4 / 3), 5)
  counts = np.histogram(np.clip(log_ratio, edges[0], edges[-1]), edges)[0] / len(log_ratio)
  np.testing.assert_allclose(counts, 0.25, atol=0.04)
  # Offsets uniform over the valid positions: the relative offset has mean 1/2.
  assert abs(np.mean(top / (100 - h)) - 0.5) < 0.03
  assert abs(np.mean(left / (100 - w)) - 0.5) < 0.03
  assert top.min() == 0 and np.any(top == 100 - h)


def test_crop_box_default_range_inside_a_non_square_image():
  top, left, h, w = _boxes(2000, 20, 30, (0.08, 1.0), (3 / 4, 4 / 3)).T
  assert np.all((h > 0) & (w > 0) & (top >= 0) & (left >= 0))
  assert np.all((top + h <= 20) & (left + w <= 30))
  # Large areas are rejected and retried, so the mean falls below the unclipped 0.54.
  assert 0.3 < np.mean(h * w / 600) < 0.52


@pytest.mark.parametrize(
    "height, width, scale, ratio, expected",
    [
        (100, 60, (0.9, 1.0), (10.0, 20.0), (47, 0, 6, 60)),  # Image too tall for ratio.
        (60, 100, (0.9, 1.0), (0.05, 0.1), (0, 47, 60, 6)),  # Image too wide for ratio.
        (100, 100, (1.0, 1.0), (0.5, 2.0), (0, 0, 100, 100)),  # Whole image.
    ])
def test_crop_box_center_crop_fallback(height, width, scale, ratio, expected):
  boxes = _boxes(50, height, width, scale, ratio)
  np.testing.assert_array_equal(boxes, np.tile(expected, (50, 1)))


def test_crop_of_the_full_image_is_the_image():
  image = _images(3, 1)[0]
  full_crop = functools.partial(ops.random_resized_crop, size=SIZE, scale=(1.0, 1.0),
                                ratio=(1.0, 1.0))
  out = quick_jit(full_crop)(_keys(1)[0], image)
  np.testing.assert_allclose(out, image, atol=1e-6)


def test_crop_matches_pil_crop_then_antialiased_bilinear_resize():
  """Equals PIL's crop followed by ``resize(BILINEAR)`` (torchvision's PIL path), whether
  the crop is downscaled (antialiased) or upscaled."""
  images = _images(1)
  keys = _keys(seed=3)
  out = crop(keys, images, dict(scale=(0.08, 1.0)))
  boxes = _box_sampler(SIZE, SIZE, (3 / 4, 4 / 3))(keys, jnp.asarray((0.08, 1.0)))
  scales = []
  for image, result, (top, left, h, w) in zip(images, out, np.asarray(boxes).tolist()):
    scales.append(max(h, w) / CROP)
    box = PIL.Image.fromarray(np.asarray(image[..., 0])).crop((left, top, left + w, top + h))
    expected = np.asarray(box.resize((CROP, CROP), PIL.Image.Resampling.BILINEAR))
    np.testing.assert_allclose(result[..., 0], expected, atol=2e-5)
  assert min(scales) < 1 < max(scales)


# ---------------------------------------------------------------- flip


def test_horizontal_flip_prob_one_is_the_mirror():
  images = _images(3)
  np.testing.assert_array_equal(flip(_keys(), images, dict(prob=1.0)), images[:, :, ::-1])


# ---------------------------------------------------------------- colour


def _jitter_params(b=0.0, c=0.0, s=0.0, h=0.0, prob=1.0):
  return dict(brightness=b, contrast=c, saturation=s, hue=h, prob=prob)


@pytest.mark.parametrize("channels", [1, 3])
def test_color_jitter_with_zero_parameters_is_exactly_the_identity(channels):
  images = _images(channels)
  np.testing.assert_array_equal(jitter(_keys(), images, _jitter_params()), images)


def test_sample_jitter_params_ranges_and_uniform_order():
  sample = quick_jit(jax.vmap(lambda k: ops.sample_jitter_params(k, 0.4, 1.5, 0.2, 0.1)))
  order, factors = (np.asarray(a) for a in sample(_keys(2400)))
  np.testing.assert_array_equal(np.sort(order, axis=1), np.tile(np.arange(4), (2400, 1)))
  _, counts = np.unique(order, axis=0, return_counts=True)
  assert len(counts) == 24 and counts.min() > 50 and counts.max() < 150  # Expected 100.
  low, high = np.array([0.6, 0.0, 0.8, -0.1]), np.array([1.4, 2.5, 1.2, 0.1])
  assert np.all((factors >= low) & (factors <= high))
  np.testing.assert_allclose(factors.mean(axis=0), (low + high) / 2, atol=0.03)


def _numpy_adjust(image: np.ndarray, index: int, factor: float) -> np.ndarray:
  """Reference adjustments in NumPy (torchvision formulas; matplotlib's HSV conversion)."""
  gray = image @ np.array([0.299, 0.587, 0.114])[:, None]
  if index == 0:
    out = factor * image
  elif index == 1:
    out = factor * image + (1 - factor) * gray.mean()
  elif index == 2:
    out = factor * image + (1 - factor) * gray
  else:
    hsv = matplotlib.colors.rgb_to_hsv(image)
    hsv[..., 0] = (hsv[..., 0] + factor) % 1.0
    out = matplotlib.colors.hsv_to_rgb(hsv)
  return np.clip(out, 0.0, 1.0)


def test_color_jitter_applies_the_sampled_adjustments_in_the_sampled_order():
  params = _jitter_params(0.8, 0.8, 0.8, 0.3)
  images = _images(3, seed=5)
  keys = _keys(seed=7)
  out = jitter(keys, images, params)
  params_keys = jax.vmap(jax.random.split)(keys)[:, 1]
  orders, factors = jax.vmap(lambda k: ops.sample_jitter_params(
      k, params["brightness"], params["contrast"], params["saturation"], params["hue"]))(
          params_keys)
  for image, result, order, factor in zip(np.asarray(images, np.float64), out,
                                          np.asarray(orders), np.asarray(factors)):
    expected = image
    for index in order:
      expected = _numpy_adjust(expected, index, factor[index])
    np.testing.assert_allclose(result, expected, atol=1e-4)
  assert len({tuple(o) for o in np.asarray(orders)}) > 5


def test_brightness_multiplies_and_clips():
  image = jnp.full((4, 4, 3), 0.6, jnp.float32)
  np.testing.assert_allclose(ops.adjust_brightness(image, 1.5), 0.9, rtol=1e-6)
  np.testing.assert_array_equal(ops.adjust_brightness(image, 2.0), 1.0)
  # Through the random op: a constant image stays constant, times b ~ U[0.1, 1.9], clipped.
  images = jnp.full((N, SIZE, SIZE, 3), 0.6, jnp.float32)
  values = []
  for seed in range(4):
    out = np.asarray(jitter(_keys(seed=seed), images, _jitter_params(b=0.9)))
    assert np.all(out == out[:, :1, :1, :1])
    values += list(out[:, 0, 0, 0])
  values = np.asarray(values)
  assert values.min() >= 0.1 * 0.6 - 1e-6 and values.min() < 0.3 * 0.6
  assert np.any(values == 1.0) and np.all(values <= 1.0)


def test_contrast_and_saturation_blend_with_luma():
  image = _images(3, 1, seed=2)[0]
  gray = ops.luma(image)
  np.testing.assert_allclose(ops.adjust_contrast(image, 0.0),
                             jnp.full_like(image, gray.mean()), atol=1e-6)
  np.testing.assert_allclose(ops.adjust_saturation(image, 0.0),
                             jnp.broadcast_to(gray, image.shape), atol=1e-6)
  mono = image[..., :1]
  np.testing.assert_array_equal(ops.adjust_saturation(mono, 0.0), mono)
  np.testing.assert_array_equal(ops.adjust_hue(mono, 0.3), mono)
  np.testing.assert_allclose(ops.adjust_contrast(mono, 0.5), 0.5 * mono + 0.5 * mono.mean(),
                             atol=1e-6)


def test_grayscale_uses_luma_and_keeps_channels():
  images = _images(3)
  out = grayscale(_keys(), images, dict(prob=1.0))
  assert out.shape == images.shape
  expected = 0.299 * images[..., 0] + 0.587 * images[..., 1] + 0.114 * images[..., 2]
  for c in range(3):
    np.testing.assert_allclose(out[..., c], expected, atol=1e-6)
  mono = _images(1)
  np.testing.assert_array_equal(grayscale(_keys(), mono, dict(prob=1.0)), mono)


def test_hsv_known_values_and_round_trip():
  rgb = jnp.asarray([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [0.5, 0.5, 0.5], [0, 0, 0]],
                    jnp.float32)
  hsv = jnp.asarray([[0, 1, 1], [1 / 3, 1, 1], [2 / 3, 1, 1], [1 / 6, 1, 1], [0, 0, 0.5],
                     [0, 0, 0]], jnp.float32)
  np.testing.assert_allclose(rgb_to_hsv(rgb), hsv, atol=1e-6)
  np.testing.assert_allclose(hsv_to_rgb(hsv), rgb, atol=1e-6)
  colours = _images(3, 4, seed=4)
  np.testing.assert_allclose(rgb_to_hsv(colours),
                             matplotlib.colors.rgb_to_hsv(np.asarray(colours)), atol=1e-5)
  np.testing.assert_allclose(hsv_to_rgb(rgb_to_hsv(colours)), colours, atol=1e-5)


def test_hue_shift():
  image = _images(3, 1, seed=6)[0]
  np.testing.assert_array_equal(adjust_hue(image, 0.0), image)
  red = jnp.asarray([[[1.0, 0.0, 0.0]]])
  np.testing.assert_allclose(adjust_hue(red, 1 / 3), [[[0.0, 1.0, 0.0]]], atol=1e-6)
  np.testing.assert_allclose(adjust_hue(red, -1 / 3), [[[0.0, 0.0, 1.0]]], atol=1e-6)
  # A shift keeps saturation and value.
  shifted_hsv, hsv = rgb_to_hsv(adjust_hue(image, 0.25)), rgb_to_hsv(image)
  np.testing.assert_allclose(shifted_hsv[..., 1:], hsv[..., 1:], atol=1e-5)


# ---------------------------------------------------------------- blur, solarize


def test_default_blur_kernel_size():
  sides = (16, 28, 32, 64, 96, 224)
  assert [ops.default_blur_kernel_size(s) for s in sides] == [3, 3, 3, 7, 9, 23]


def test_blur_keeps_constants_and_reduces_noise_variance():
  params = dict(prob=1.0, sigma=(0.5, 2.0))
  constant = jnp.full((N, SIZE, SIZE, 3), 0.3, jnp.float32)
  np.testing.assert_allclose(blur(_keys(), constant, params), constant, atol=1e-6)
  noise = _images(3)
  blurred = blur(_keys(), noise, params)
  assert np.all(np.var(blurred, axis=(1, 2, 3)) < 0.8 * np.var(noise, axis=(1, 2, 3)))


def test_blur_matches_scipy_gaussian_with_reflect_padding():
  image = _images(1, 1, seed=8)[0]
  fixed_blur = functools.partial(ops.gaussian_blur, prob=1.0, sigma=(1.2, 1.2), kernel_size=5)
  out = quick_jit(fixed_blur)(_keys(1)[0], image)
  # scipy's 'mirror' is torch's / NumPy's 'reflect' (edge not repeated); radius 2 = 5 taps.
  expected = ndimage.gaussian_filter(np.asarray(image[..., 0]), 1.2, mode="mirror", radius=2)
  np.testing.assert_allclose(out[..., 0], expected, atol=1e-6)


def test_solarize_threshold_is_exact():
  values = jnp.asarray([0.0, 0.49, 0.5, 0.51, 1.0, 0.3, 0.7, 0.2], jnp.float32)
  images = jnp.broadcast_to(jnp.tile(values, 2)[:, None, None, None], (N, SIZE, SIZE, 1))
  out = solarize(_keys(), images, dict(prob=1.0, threshold=0.5))
  expected = jnp.tile(jnp.asarray([0.0, 0.49, 0.5, 0.49, 0.0, 0.3, 0.3, 0.2]), 2)
  np.testing.assert_allclose(out[:, 0, 0, 0], expected, atol=1e-7)
  out = solarize(_keys(), images, dict(prob=1.0, threshold=0.25))
  expected = jnp.tile(jnp.asarray([0.0, 0.51, 0.5, 0.49, 0.0, 0.7, 0.3, 0.2]), 2)
  np.testing.assert_allclose(out[:, 0, 0, 0], expected, atol=1e-7)


def test_ops_reject_bad_image_shapes():
  key = _keys(1)[0]
  with pytest.raises(ValueError, match=r"1 or 3 channels, got float32 \[4, 4, 2\]"):
    ops.color_jitter(key, jnp.zeros((4, 4, 2)), **_jitter_params())
  with pytest.raises(ValueError, match=r"got float32 \[4, 4\]"):
    ops.horizontal_flip(key, jnp.zeros((4, 4)))


# ---------------------------------------------------------------- random erasing

erase = _batched(ops.random_erasing)


def _torchvision_erasing_boxes(rng, count, height, width, scale, ratio):
  """torchvision RandomErasing.get_params's (h, w), in numpy; (0, 0) when no draw fits."""
  boxes = []
  for _ in range(count):
    box = (0, 0)
    for _ in range(10):
      area = height * width * rng.uniform(*scale)
      aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
      h, w = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
      if h < height and w < width:
        box = (h, w)
        break
    boxes.append(box)
  return np.asarray(boxes)


def test_random_erasing_fills_one_rectangle_drawn_as_torchvision_draws_it():
  n, value = 512, (0.25, 0.5, 0.75)
  images = _images(3, n=n)
  out = np.asarray(erase(_keys(n), images, {"prob": 1.0, "value": value}))
  changed = np.any(out != np.asarray(images), axis=-1)
  boxes = []
  for i in range(n):
    rows, cols = np.nonzero(changed[i])
    h, w = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert changed[i].sum() == h * w  # one filled rectangle, nothing else touched
    np.testing.assert_array_equal(out[i][changed[i]], np.broadcast_to(value, (h * w, 3)))
    boxes.append((h, w))
  boxes = np.asarray(boxes)
  assert boxes.max() < SIZE
  reference = _torchvision_erasing_boxes(np.random.default_rng(0), 20000, SIZE, SIZE,
                                         (0.02, 0.33), (0.3, 3.3))
  # Same distribution of sides: means within 4 standard errors of torchvision's procedure.
  for side in (0, 1):
    stderr = reference[:, side].std() / np.sqrt(n)
    assert abs(boxes[:, side].mean() - reference[:, side].mean()) < 4 * stderr, side
  # The corner is uniform over [0, H - h] x [0, W - w]: every edge is reached, and the mean
  # top / left offset is (H - h) / 2 on average, within 4 standard errors.
  assert changed[:, 0, :].any() and changed[:, -1, :].any()
  assert changed[:, :, 0].any() and changed[:, :, -1].any()
  for axis, side in ((1, 0), (0, 1)):  # rows: any pixel in the row; offset = first such row
    hit = changed.any(axis=axis + 1)
    offset = hit.argmax(axis=1)
    slack = SIZE - boxes[:, side]
    assert abs(np.mean(offset - slack / 2)) < 4 * np.std(offset - slack / 2) / np.sqrt(n)


def test_random_erasing_probability_and_a_box_that_never_fits():
  images = _images(1)
  keys = _keys()
  np.testing.assert_array_equal(erase(keys, images, {"prob": 0.0, "value": 0.5}), images)
  # Aspect 3-3.3 at 90-95% of the area needs h ~ 27 > 16 rows: no draw fits, nothing changes.
  never = _batched(ops.random_erasing, scale=(0.9, 0.95), ratio=(3.0, 3.3))
  np.testing.assert_array_equal(never(keys, images, {"prob": 1.0, "value": 0.5}), images)
  half = np.asarray(erase(_keys(256, seed=3), _images(1, n=256), {"prob": 0.5, "value": 2.0}))
  erased = np.mean(np.any(half == 2.0, axis=(1, 2, 3)))
  assert 0.4 < erased < 0.6
