"""Pure per-image augmentation ops.

Every random op has the form ``op(key, image, **params) -> image`` and acts on ONE image:
a float32 array ``[H, W, C]`` with values in [0, 1] and C in {1, 3}; the result is again
float32 in [0, 1]. Parameters are keyword-only. There is no Python control flow on traced
values, so the ops run under ``jax.jit`` and ``jax.vmap`` (one key per example) and are
compiled into the train step. Shapes (the crop output size, the blur kernel size) and the
crop's aspect-ratio range are static; the other numeric parameters (probabilities, jitter
magnitudes, crop scale, blur sigma, solarize threshold) may be traced values.

The semantics follow torchvision's transforms (the pipelines of SimCLR, MoCo v2, BYOL, SwAV
and the ISSL code): the sampling of ``RandomResizedCrop``, the random sub-op order of
``ColorJitter``, ``RandomGrayscale`` keeping the channel count, ``GaussianBlur`` and
``RandomSolarize``. Deliberate differences, all due to working on float images on device:
nothing is quantised back to uint8 between ops, and the solarize threshold is a float.

Grayscale images (C == 1) go through the same code: colour jitter reduces to brightness and
contrast, and grayscale conversion is the identity.

The deterministic helpers (``rgb_to_hsv``, ``adjust_brightness``, ...) are exported too; they
are the building blocks of the random ops and are useful on their own.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

# ITU-R BT.601 luma weights, as PIL's ``convert('L')`` (torchvision's tensor path uses
# 0.2989 for red; the difference is below uint8 resolution).
LUMA_WEIGHTS = (0.299, 0.587, 0.114)

# torchvision's RandomResizedCrop tries this many (area, ratio) draws before falling back.
_CROP_ATTEMPTS = 10


def _check_image(image: jax.Array) -> int:
  """Returns the channel count of an ``[H, W, C]`` image, C in {1, 3}, or raises."""
  if image.ndim != 3 or image.shape[-1] not in (1, 3):
    raise ValueError(
        "expected one image of shape [height, width, channels] with 1 or 3 channels, got "
        f"{image.dtype} {list(image.shape)}")
  return image.shape[-1]


def to_float(image: jax.Array) -> jax.Array:
  """Converts uint8 pixels to float32 in [0, 1]: ``x / 255`` (any shape)."""
  return jnp.asarray(image).astype(jnp.float32) / 255.0


# ---------------------------------------------------------------- random resized crop


def _center_crop_box(height: int, width: int,
                     ratio: Sequence[float]) -> tuple[int, int, int, int]:
  """torchvision's fallback box: the image's aspect ratio clamped into ``ratio``.

  The whole image is kept along its limiting side; the box is centred (offsets floored).
  """
  image_ratio = width / height
  if image_ratio < min(ratio):
    w = width
    h = int(round(w / min(ratio)))
  elif image_ratio > max(ratio):
    h = height
    w = int(round(h * max(ratio)))
  else:
    h, w = height, width
  return (height - h) // 2, (width - w) // 2, h, w


def sample_crop_box(
    key: jax.Array,
    height: int,
    width: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """Samples a crop box ``(top, left, h, w)`` (int32 scalars) as torchvision does.

  Each attempt draws an area ``A = height * width * U(scale)`` and an aspect ratio
  ``r = exp(U(log ratio))`` and sets ``w = round(sqrt(A r))``, ``h = round(sqrt(A / r))``
  (round half to even, like Python's ``round``); it is valid when ``0 < w <= width`` and
  ``0 < h <= height``. The 10 attempts are drawn at once and the first valid one is kept,
  which has the same distribution as torchvision's sequential loop. The offsets are uniform
  over the valid integer positions (``floor(u * (height - h + 1))``, u ~ U[0, 1)). When no
  attempt is valid the box is torchvision's centre-crop fallback (``_center_crop_box``).
  All random numbers come from one ``jax.random.uniform`` call (cheaper to compile and run
  than one call per quantity).

  Args:
    key: PRNG key.
    height, width: static image size.
    scale: area fraction range (may be traced).
    ratio: static aspect-ratio (width / height) range.
  """
  # One draw for everything: 10 area fractions, 10 log ratios, 2 offsets.
  u = jax.random.uniform(key, (2 * _CROP_ATTEMPTS + 2,))
  area = height * width * (scale[0] + (scale[1] - scale[0]) * u[:_CROP_ATTEMPTS])
  log_low, log_high = jnp.log(ratio[0]), jnp.log(ratio[1])
  aspect = jnp.exp(log_low + (log_high - log_low) * u[_CROP_ATTEMPTS:2 * _CROP_ATTEMPTS])
  ws = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  hs = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  valid = (ws > 0) & (ws <= width) & (hs > 0) & (hs <= height)
  first = jnp.argmax(valid)  # Index of the first True (0 when none is).
  found = valid[first]
  fb_top, fb_left, fb_h, fb_w = _center_crop_box(height, width, ratio)
  h = jnp.where(found, hs[first], fb_h)
  w = jnp.where(found, ws[first], fb_w)

  def offset(fraction: jax.Array, free: jax.Array) -> jax.Array:
    """Uniform integer in [0, free]: floor(fraction (free + 1)), guarded against rounding up."""
    return jnp.minimum(jnp.floor(fraction * (free + 1)).astype(jnp.int32), free)

  top = jnp.where(found, offset(u[-2], height - h), fb_top)
  left = jnp.where(found, offset(u[-1], width - w), fb_left)
  return top, left, h, w


def _crop_resize_weights(start: jax.Array, length: jax.Array, in_size: int,
                         out_size: int) -> jax.Array:
  """``[out_size, in_size]`` antialiased bilinear weights resizing ``[start, start+length)``.

  PIL / torchvision (antialias=True) resampling with the triangle kernel: output pixel ``o``
  has centre ``c_o = start + (o + 1/2) * length / out_size`` in input coordinates (pixel
  ``i`` has centre ``i + 1/2``); its weights are ``max(0, 1 - |c_o - (i + 1/2)| / s)`` with
  ``s = max(1, length / out_size)`` (the kernel widens when downscaling), restricted to
  pixels inside the crop and normalised to sum to one. Restricting to the crop makes this
  exactly crop-then-resize, which ``jax.image.scale_and_translate`` is not (its kernel also
  reads the pixels just outside the box).
  """
  step = length.astype(jnp.float32) / out_size
  centers = start + (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * step
  pixels = jnp.arange(in_size)
  support = jnp.maximum(step, 1.0)
  weights = jnp.maximum(0.0, 1.0 - jnp.abs(centers[:, None] - (pixels + 0.5)) / support)
  inside = (pixels >= start) & (pixels < start + length)
  weights = jnp.where(inside[None, :], weights, 0.0)
  return weights / jnp.sum(weights, axis=1, keepdims=True)


def random_resized_crop(
    key: jax.Array,
    image: jax.Array,
    *,
    size: int,
    scale: Sequence[float] = (0.08, 1.0),
    ratio: Sequence[float] = (3.0 / 4.0, 4.0 / 3.0),
) -> jax.Array:
  """torchvision ``RandomResizedCrop(size, scale, ratio)`` with bilinear antialiased resize.

  The box comes from ``sample_crop_box``; the crop is resized to ``[size, size, C]`` by the
  separable weights of ``_crop_resize_weights`` (the PIL / torchvision antialias=True
  bilinear filter), computed at full float32 precision (no bf16 matmul passes on TPU). A
  full-image box resized to the image's own size returns the image exactly. Bilinear is
  torchvision's default; the ISSL TinyImageNet pipeline asks for bicubic, which this does
  not offer.
  """
  _check_image(image)
  height, width, _ = image.shape
  top, left, h, w = sample_crop_box(key, height, width, scale, ratio)
  rows = _crop_resize_weights(top, h, height, size)
  cols = _crop_resize_weights(left, w, width, size)
  out = jnp.einsum("oh,hwc,pw->opc", rows, image, cols, precision=lax.Precision.HIGHEST)
  return jnp.clip(out, 0.0, 1.0)


# ---------------------------------------------------------------- flip


def horizontal_flip(key: jax.Array, image: jax.Array, *, prob: float = 0.5) -> jax.Array:
  """Mirrors the width axis with probability ``prob`` (torchvision RandomHorizontalFlip)."""
  _check_image(image)
  return jnp.where(jax.random.bernoulli(key, prob), image[:, ::-1, :], image)


# ---------------------------------------------------------------- colour


def luma(image: jax.Array) -> jax.Array:
  """``[H, W, 1]`` luma ``0.299 R + 0.587 G + 0.114 B``; a 1-channel image is returned as is."""
  if _check_image(image) == 1:
    return image
  return jnp.sum(image * jnp.asarray(LUMA_WEIGHTS, image.dtype), axis=-1, keepdims=True)


def rgb_to_hsv(image: jax.Array) -> jax.Array:
  """RGB ``[..., 3]`` in [0, 1] to HSV ``[..., 3]`` in [0, 1] (hue as a fraction of a turn).

  ``V = max``, ``S = (max - min) / max`` (0 for black), and the hue is the position on the
  hexagon: ``(G - B) / d`` when red is largest, ``2 + (B - R) / d`` for green,
  ``4 + (R - G) / d`` for blue (``d = max - min``), divided by 6 and taken mod 1; grays get
  hue 0. Ties go to red, then green, as in ``colorsys`` and torchvision.
  """
  r, g, b = image[..., 0], image[..., 1], image[..., 2]
  value = jnp.max(image, axis=-1)
  spread = value - jnp.min(image, axis=-1)
  saturation = jnp.where(value > 0, spread / jnp.where(value > 0, value, 1.0), 0.0)
  safe_spread = jnp.where(spread > 0, spread, 1.0)
  sector = jnp.where(
      value == r, (g - b) / safe_spread,
      jnp.where(value == g, 2.0 + (b - r) / safe_spread, 4.0 + (r - g) / safe_spread))
  hue = jnp.where(spread > 0, jnp.mod(sector / 6.0, 1.0), 0.0)
  return jnp.stack([hue, saturation, value], axis=-1)


def hsv_to_rgb(image: jax.Array) -> jax.Array:
  """HSV ``[..., 3]`` in [0, 1] back to RGB, the inverse of ``rgb_to_hsv``.

  Channel ``n`` (5 for R, 3 for G, 1 for B) is ``V - V S clip(min(k, 4 - k), 0, 1)`` with
  ``k = (n + 6 H) mod 6``: the piecewise-linear hexagon written without sector branches.
  """
  hue, saturation, value = image[..., 0:1], image[..., 1:2], image[..., 2:3]
  k = jnp.mod(jnp.asarray([5.0, 3.0, 1.0], image.dtype) + 6.0 * hue, 6.0)
  return value - value * saturation * jnp.clip(jnp.minimum(k, 4.0 - k), 0.0, 1.0)


def adjust_brightness(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """``clip(factor * x, 0, 1)`` (torchvision: blend with black)."""
  return jnp.clip(factor * image, 0.0, 1.0)


def adjust_contrast(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """``clip(factor * x + (1 - factor) * m, 0, 1)``, m the mean luma of the whole image.

  torchvision and PIL take the mean of the grayscale image (quantised to uint8 there).
  """
  mean = jnp.mean(luma(image))
  return jnp.clip(factor * image + (1.0 - factor) * mean, 0.0, 1.0)


def adjust_saturation(image: jax.Array, factor: jax.Array | float) -> jax.Array:
  """``clip(factor * x + (1 - factor) * luma(x), 0, 1)``; the identity on 1 channel."""
  if _check_image(image) == 1:
    return image
  return jnp.clip(factor * image + (1.0 - factor) * luma(image), 0.0, 1.0)


def adjust_hue(image: jax.Array, shift: jax.Array | float) -> jax.Array:
  """Rotates the hue by ``shift`` turns (in [-0.5, 0.5]): ``H -> (H + shift) mod 1`` in HSV.

  A shift of exactly 0 returns the image bit for bit (skipping the HSV round trip's float
  error); 1-channel images are returned unchanged.
  """
  if _check_image(image) == 1:
    return image
  hsv = rgb_to_hsv(image)
  hsv = hsv.at[..., 0].set(jnp.mod(hsv[..., 0] + shift, 1.0))
  shifted = jnp.clip(hsv_to_rgb(hsv), 0.0, 1.0)
  return jnp.where(shift == 0, image, shifted)


JITTER_ADJUSTMENTS = (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue)


def sample_jitter_params(
    key: jax.Array, brightness: float, contrast: float, saturation: float, hue: float
) -> tuple[jax.Array, jax.Array]:
  """Samples ``(order, factors)`` for one colour jitter (torchvision ``ColorJitter.get_params``).

  Returns:
    order: int32 ``[4]``, a uniformly random permutation of the indices of
      ``JITTER_ADJUSTMENTS`` (0 brightness, 1 contrast, 2 saturation, 3 hue).
    factors: float32 ``[4]``: brightness ``~ U[max(0, 1 - b), 1 + b]``, contrast
      ``~ U[max(0, 1 - c), 1 + c]``, saturation ``~ U[max(0, 1 - s), 1 + s]``, hue shift
      ``~ U[-h, h]``. A parameter of 0 gives factor 1 (shift 0) exactly.
  """
  u = jax.random.uniform(key, (8,))
  spreads = jnp.asarray([brightness, contrast, saturation, hue], jnp.float32)
  low = jnp.concatenate([jnp.maximum(0.0, 1.0 - spreads[:3]), -spreads[3:]])
  high = jnp.concatenate([1.0 + spreads[:3], spreads[3:]])
  # Ranking 4 i.i.d. uniforms gives a uniformly random permutation.
  return jnp.argsort(u[4:]).astype(jnp.int32), low + (high - low) * u[:4]


def color_jitter(
    key: jax.Array,
    image: jax.Array,
    *,
    brightness: float,
    contrast: float,
    saturation: float,
    hue: float,
    prob: float = 0.8,
) -> jax.Array:
  """torchvision ``RandomApply([ColorJitter(b, c, s, h)], p=prob)``.

  With ``apply_key, params_key = jax.random.split(key)``, ``(order, factors) =
  sample_jitter_params(params_key, ...)``: the adjustments ``JITTER_ADJUSTMENTS[order[i]]``
  are applied for i = 0..3 (a fresh random order per call), each clipping to [0, 1]; the
  result is kept with probability ``prob`` (``bernoulli(apply_key, prob)``). A parameter of
  0 makes that adjustment the identity exactly. On 1-channel images saturation and hue are
  identities, so the jitter reduces to brightness and contrast.

  At each position all four adjustments are computed and one is selected
  (``lax.select_n``). Under ``vmap`` this is what ``lax.switch`` turns into anyway, and
  ``lax.switch`` itself fails in jax 0.10 on batch-sharded inputs under ``jit`` when a
  branch closes over a constant array ("Resource axis ... not found in mesh: ()").
  """
  _check_image(image)
  apply_key, params_key = jax.random.split(key)
  order, factors = sample_jitter_params(params_key, brightness, contrast, saturation, hue)
  # An adjustment whose magnitude is a Python 0 (or saturation/hue of a 1-channel image) is
  # the identity: pass the image through instead of computing it (same result, less work).
  one_channel = image.shape[-1] == 1
  identity = [_is_static_zero(m) or (one_channel and i >= 2)
              for i, m in enumerate((brightness, contrast, saturation, hue))]
  jittered = image
  for position in range(len(JITTER_ADJUSTMENTS)):
    candidates = [jittered if identity[i] else fn(jittered, factors[i])
                  for i, fn in enumerate(JITTER_ADJUSTMENTS)]
    jittered = lax.select_n(order[position], *candidates)
  return jnp.where(jax.random.bernoulli(apply_key, prob), jittered, image)


def _is_static_zero(value) -> bool:
  """True for a Python (not traced) number equal to 0."""
  return isinstance(value, (int, float)) and value == 0


def to_grayscale(key: jax.Array, image: jax.Array, *, prob: float) -> jax.Array:
  """torchvision ``RandomGrayscale(p=prob)``: with probability ``prob`` every channel becomes
  the luma ``0.299 R + 0.587 G + 0.114 B`` (3 channels stay 3); identity on 1 channel."""
  if _check_image(image) == 1:
    return image
  gray = jnp.broadcast_to(luma(image), image.shape)
  return jnp.where(jax.random.bernoulli(key, prob), gray, image)


# ---------------------------------------------------------------- blur, solarize


def default_blur_kernel_size(side: int) -> int:
  """The odd integer nearest 10% of ``side``, at least 3 (SimCLR: 23 for 224, 9 for 96)."""
  return max(3, 2 * int(0.1 * side / 2) + 1)


def _blur_axis(image: jax.Array, taps: jax.Array, axis: int) -> jax.Array:
  """Correlates ``image`` with the odd-length ``taps`` along ``axis``, reflect padding."""
  radius = taps.shape[0] // 2
  pad = [(0, 0)] * image.ndim
  pad[axis] = (radius, radius)
  padded = jnp.pad(image, pad, mode="reflect")
  n = image.shape[axis]
  return sum(taps[j] * lax.slice_in_dim(padded, j, j + n, axis=axis)
             for j in range(taps.shape[0]))


def gaussian_blur(
    key: jax.Array,
    image: jax.Array,
    *,
    prob: float,
    sigma: Sequence[float] = (0.1, 2.0),
    kernel_size: int | None = None,
) -> jax.Array:
  """torchvision ``RandomApply([GaussianBlur(kernel_size, sigma)], p=prob)``.

  ``sigma ~ U(sigma)``; taps ``exp(-x^2 / (2 sigma^2))`` at ``x = -(k-1)/2 .. (k-1)/2``,
  normalised; separable (rows then columns) with reflect padding (torch's 'reflect', the
  edge pixel not repeated). ``kernel_size`` (odd) defaults per axis to
  ``default_blur_kernel_size`` of that side. This is torchvision's GaussianBlur, not PIL's
  box-filter approximation used by some MoCo v2 / BYOL pipelines.
  """
  _check_image(image)
  apply_u, sigma_u = jax.random.uniform(key, (2,))
  std = sigma[0] + (sigma[1] - sigma[0]) * sigma_u
  blurred = image
  for axis in (0, 1):
    size = kernel_size or default_blur_kernel_size(image.shape[axis])
    if size % 2 != 1:
      raise ValueError(f"gaussian_blur kernel_size must be odd, got {size}")
    x = jnp.arange(size, dtype=jnp.float32) - (size - 1) / 2
    taps = jnp.exp(-0.5 * jnp.square(x / std))
    blurred = _blur_axis(blurred, taps / jnp.sum(taps), axis)
  blurred = jnp.clip(blurred, 0.0, 1.0)
  return jnp.where(apply_u < prob, blurred, image)


def solarize(key: jax.Array, image: jax.Array, *, prob: float,
             threshold: float = 0.5) -> jax.Array:
  """torchvision ``RandomSolarize(threshold, p=prob)``: ``x -> 1 - x`` where ``x >= threshold``.

  On uint8 images the usual threshold is 128, i.e. 0.502 here; 0.5 is the float convention.
  """
  _check_image(image)
  solarized = jnp.where(image >= threshold, 1.0 - image, image)
  return jnp.where(jax.random.bernoulli(key, prob), solarized, image)


# ---------------------------------------------------------------- erasing

# torchvision's RandomErasing tries this many (area, ratio) draws before leaving the image as is.
_ERASE_ATTEMPTS = 10


def random_erasing(key: jax.Array, image: jax.Array, *, prob: float,
                   scale: tuple[float, float] = (0.02, 0.33),
                   ratio: tuple[float, float] = (0.3, 3.3),
                   value: Sequence[float] | float = 0.0) -> jax.Array:
  """torchvision ``RandomErasing(p=prob, scale, ratio, value)`` (Zhong et al. 2020): a
  rectangle of the image is set to `value`.

  With probability `prob`: up to 10 draws of an area ``A U(scale)`` (A = H W) and an aspect
  ratio ``exp(U(log ratio))`` give ``h = round(sqrt(area ratio))`` and ``w = round(sqrt(area
  / ratio))``; the first draw with ``h < H`` and ``w < W`` is placed at a uniform top-left
  corner ``(i, j)`` in ``[0, H - h] x [0, W - w]`` and ``[i, i + h) x [j, j + w)`` is filled.
  When no draw fits the image is returned unchanged, as torchvision does. torchvision erases
  after ``Normalize``, so its ``value = 0`` is the dataset mean; on these [0, 1] images pass
  the mean itself (one number, or one per channel).
  """
  channels = _check_image(image)
  height, width = image.shape[0], image.shape[1]
  apply_key, area_key, ratio_key, row_key, col_key = jax.random.split(key, 5)
  area = height * width * jax.random.uniform(
      area_key, (_ERASE_ATTEMPTS,), minval=scale[0], maxval=scale[1])
  log_ratio = jax.random.uniform(ratio_key, (_ERASE_ATTEMPTS,),
                                 minval=jnp.log(ratio[0]), maxval=jnp.log(ratio[1]))
  aspect = jnp.exp(log_ratio)
  h_all = jnp.round(jnp.sqrt(area * aspect)).astype(jnp.int32)
  w_all = jnp.round(jnp.sqrt(area / aspect)).astype(jnp.int32)
  fits = (h_all < height) & (w_all < width)
  first = jnp.argmax(fits)  # the first draw that fits (0 when none does; then `fits` is off)
  h, w = h_all[first], w_all[first]
  top = jax.random.randint(row_key, (), 0, height - h + 1)
  left = jax.random.randint(col_key, (), 0, width - w + 1)
  rows = jnp.arange(height)[:, None, None]
  cols = jnp.arange(width)[None, :, None]
  inside = (rows >= top) & (rows < top + h) & (cols >= left) & (cols < left + w)
  erase = jax.random.bernoulli(apply_key, prob) & fits[first] & inside
  fill = jnp.broadcast_to(jnp.asarray(value, jnp.float32), (channels,))
  return jnp.where(erase, fill, image)
