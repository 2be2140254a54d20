"""View policies: how each training view of an image is drawn, built from ``config.augment``.

A ``ViewSpec`` holds the parameters of one view; ``augment_view`` draws that view from one
uint8 image with the torchvision/SimCLR op order

  to_float -> random_resized_crop -> horizontal_flip -> color_jitter -> to_grayscale
  -> gaussian_blur -> solarize (-> random_erasing, off unless augment.erasing_prob > 0),

each op with its own subkey. A ``Policy`` is a tuple of view specs; calling it on a batch of
per-example keys and uint8 images returns one float32 array per view, computed with
``jax.vmap`` inside whatever ``jit`` encloses it. View ``v`` of an example uses
``fold_in(key, v)``, so views are independent of each other and each is a deterministic
function of (key, view index).

Strength. ``build_policy`` applies ``augment.strength = s >= 0`` to every view:

  * crop scale ``(lo, hi) -> (min(hi, lo / s), hi)`` (``lo = hi`` at s = 0: with the usual
    ``hi = 1`` the crop lower bound is ``min(1, lo / s)`` and s = 0 means no crop);
  * colour jitter ``(b, c, sat, h) -> (b s, c s, sat s, min(0.5, h s))``;
  * grayscale probability ``-> min(1, p s)``.

Flip, blur and solarize are not scaled, nor is the jitter probability. s = 1 leaves the config
values unchanged. With the config values crop_scale = (0.2, 1), jitter = (0.4, 0.4, 0.4, 0.1),
jitter_prob = 0.8, grayscale_prob = 0.1 this is exactly the convention of the DISSL/CISSL code
(crop lower bound 0.2/s clipped to 1, jitter (0.4s, 0.4s, 0.4s, 0.1s) with p = 0.8, grayscale
0.1s; YannDubs/Invariant-Self-Supervised-Learning ``utils/data/augmentations/simclr.py``).
ssljax's choice: this one ``strength`` knob for every policy, because the geometry analysis
sweeps augmentation strength and needs one scale that means the same for every method.

Grayscale datasets (C = 1) use the same policies: colour jitter reduces to brightness and
contrast, grayscale conversion is the identity, and the views keep one channel.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections

from ssljax.augment import ops

POLICIES = ("simclr", "moco_v2", "byol", "multicrop")
# Random erasing draws from fold_in(key, this), not from the split of the other ops.
_ERASING_STREAM = 7

def _check_prob(name: str, value: float) -> None:
  if not 0.0 <= value <= 1.0:
    raise ValueError(f"{name} must be a probability in [0, 1], got {value}")


def _check_range(name: str, value: tuple[float, float], low: float, high: float) -> None:
  if len(value) != 2 or not low <= value[0] <= value[1] <= high:
    raise ValueError(f"{name} must be (lower, upper) with {low} <= lower <= upper <= {high}, "
                     f"got {value}")


@dataclasses.dataclass(frozen=True)
class ViewSpec:
  """Parameters of one view; every field is required (they come from the config).

  Attributes:
    crop_size: output height = width of the view.
    crop_scale: area-fraction range of the random resized crop, within (0, 1].
    crop_ratio: aspect-ratio (width / height) range of the crop.
    flip_prob: probability of a horizontal flip.
    jitter: colour-jitter (brightness, contrast, saturation, hue); hue <= 0.5.
    jitter_prob: probability of applying the colour jitter.
    grayscale_prob: probability of converting to grayscale.
    blur_prob: probability of a Gaussian blur.
    blur_sigma: range of the blur's standard deviation, in pixels.
    solarize_prob: probability of solarizing (threshold 0.5).
    erasing_prob: probability of erasing a rectangle (torchvision RandomErasing; 0: off).
    erasing_scale: area-fraction range of the erased rectangle.
    erasing_ratio: aspect-ratio range of the erased rectangle.
    erasing_value: the fill, one value or one per channel, in [0, 1] (the dataset mean is
      torchvision's 0 after Normalize).
  """

  crop_size: int
  crop_scale: tuple[float, float]
  crop_ratio: tuple[float, float]
  flip_prob: float
  jitter: tuple[float, float, float, float]
  jitter_prob: float
  grayscale_prob: float
  blur_prob: float
  blur_sigma: tuple[float, float]
  solarize_prob: float
  erasing_prob: float = 0.0
  erasing_scale: tuple[float, float] = (0.02, 0.33)
  erasing_ratio: tuple[float, float] = (0.3, 3.3)
  erasing_value: tuple[float, ...] = (0.0,)

  def __post_init__(self):
    # Tuples of floats whatever sequences came in, so specs are hashable (a Policy can be a
    # jit static argument or cache key) and compare equal by value.
    for name in ("crop_scale", "crop_ratio", "jitter", "blur_sigma", "erasing_scale",
                 "erasing_ratio", "erasing_value"):
      object.__setattr__(self, name, tuple(float(v) for v in getattr(self, name)))
    if self.crop_size <= 0:
      raise ValueError(f"crop_size must be positive, got {self.crop_size}")
    if self.crop_scale[0] <= 0:
      raise ValueError(f"crop_scale lower bound must be positive, got {self.crop_scale}")
    _check_range("crop_scale", self.crop_scale, 0.0, 1.0)
    if self.crop_ratio[0] <= 0:
      raise ValueError(f"crop_ratio must be positive, got {self.crop_ratio}")
    _check_range("crop_ratio", self.crop_ratio, 0.0, math.inf)
    if len(self.jitter) != 4 or min(self.jitter) < 0 or self.jitter[3] > 0.5:
      raise ValueError("jitter must be 4 non-negative numbers (brightness, contrast, "
                       f"saturation, hue) with hue <= 0.5, got {self.jitter}")
    _check_range("blur_sigma", self.blur_sigma, 0.0, math.inf)
    for name in ("flip_prob", "jitter_prob", "grayscale_prob", "blur_prob", "solarize_prob",
                 "erasing_prob"):
      _check_prob(name, getattr(self, name))
    if self.erasing_prob > 0:
      if not 0 < self.erasing_scale[0] <= self.erasing_scale[1] < 1:
        raise ValueError(f"erasing_scale must satisfy 0 < low <= high < 1, got "
                         f"{self.erasing_scale}")
      if not 0 < self.erasing_ratio[0] <= self.erasing_ratio[1]:
        raise ValueError(f"erasing_ratio must be positive and ordered, got "
                         f"{self.erasing_ratio}")
      if len(self.erasing_value) not in (1, 3) or not all(
          0 <= v <= 1 for v in self.erasing_value):
        raise ValueError(f"erasing_value must be one value or one per channel, each in "
                         f"[0, 1], got {self.erasing_value}")


def scale_strength(spec: ViewSpec, strength: float) -> ViewSpec:
  """Applies the strength knob ``s`` to one view (see the module docstring).

  ``crop_scale (lo, hi) -> (min(hi, lo / s), hi)``; jitter ``(b, c, sat, h) -> (b s, c s,
  sat s, min(0.5, h s))``; ``grayscale_prob -> min(1, p s)``; everything else unchanged.
  s = 1 returns equal values; s = 0 gives crop scale (hi, hi), no jitter and no grayscale.
  """
  if not strength >= 0:
    raise ValueError(f"augment.strength must be a number >= 0, got {strength}")
  low, high = spec.crop_scale
  low = high if strength == 0 else min(high, low / strength)
  b, c, s, h = spec.jitter
  return dataclasses.replace(
      spec,
      crop_scale=(low, high),
      jitter=(b * strength, c * strength, s * strength, min(0.5, h * strength)),
      grayscale_prob=min(1.0, spec.grayscale_prob * strength),
  )


def _check_uint8_images(images: jax.Array, batched: bool) -> None:
  """Raises a ValueError unless ``images`` are uint8 ``[(batch,) H, W, C]``, C in {1, 3}."""
  rank = 4 if batched else 3
  layout = "[batch, height, width, channels]" if batched else "[height, width, channels]"
  if images.dtype != jnp.uint8 or images.ndim != rank or images.shape[-1] not in (1, 3):
    raise ValueError(
        f"expected uint8 images of shape {layout} with 1 or 3 channels, got "
        f"{images.dtype} {list(images.shape)}")


def augment_view(key: jax.Array, image: jax.Array, spec: ViewSpec) -> jax.Array:
  """Draws one view: uint8 ``[H, W, C]`` -> float32 ``[crop_size, crop_size, C]`` in [0, 1].

  to_float -> random_resized_crop -> horizontal_flip -> color_jitter -> to_grayscale ->
  gaussian_blur -> solarize, each with its own subkey of ``key``. An op that the spec turns
  off statically (probability 0, all-zero jitter, grayscale of a 1-channel image) is not
  traced at all: the output is the same, and the compiled step is smaller and faster.
  """
  image = jnp.asarray(image)
  _check_uint8_images(image, batched=False)
  crop_key, flip_key, jitter_key, gray_key, blur_key, solarize_key = jax.random.split(key, 6)
  b, c, s, h = spec.jitter
  x = ops.to_float(image)
  x = ops.random_resized_crop(
      crop_key, x, size=spec.crop_size, scale=spec.crop_scale, ratio=spec.crop_ratio)
  if spec.flip_prob > 0:
    x = ops.horizontal_flip(flip_key, x, prob=spec.flip_prob)
  if spec.jitter_prob > 0 and any(v > 0 for v in (b, c, s, h)):
    x = ops.color_jitter(
        jitter_key, x, brightness=b, contrast=c, saturation=s, hue=h, prob=spec.jitter_prob)
  if spec.grayscale_prob > 0 and image.shape[-1] == 3:
    x = ops.to_grayscale(gray_key, x, prob=spec.grayscale_prob)
  if spec.blur_prob > 0:
    x = ops.gaussian_blur(blur_key, x, prob=spec.blur_prob, sigma=spec.blur_sigma)
  if spec.solarize_prob > 0:
    x = ops.solarize(solarize_key, x, prob=spec.solarize_prob)
  if spec.erasing_prob > 0:  # its own stream: the other ops' draws are unchanged by it
    if len(spec.erasing_value) not in (1, image.shape[-1]):
      raise ValueError(f"erasing_value has {len(spec.erasing_value)} values for images with "
                       f"{image.shape[-1]} channels")
    x = ops.random_erasing(jax.random.fold_in(key, _ERASING_STREAM), x,
                           prob=spec.erasing_prob, scale=spec.erasing_scale,
                           ratio=spec.erasing_ratio, value=spec.erasing_value)
  return x


@dataclasses.dataclass(frozen=True)
class Policy:
  """A tuple of view specs; calling it draws every view of every example in a batch."""

  views: tuple[ViewSpec, ...]

  def __post_init__(self):
    object.__setattr__(self, "views", tuple(self.views))
    if not self.views:
      raise ValueError("a Policy needs at least one view")

  @property
  def num_views(self) -> int:
    return len(self.views)

  @property
  def view_sizes(self) -> tuple[int, ...]:
    return tuple(spec.crop_size for spec in self.views)

  def __call__(self, keys: jax.Array, images: jax.Array) -> tuple[jax.Array, ...]:
    """Augments a batch.

    Args:
      keys: one PRNG key per example, as ``jax.random.split`` returns them: typed keys
        ``[B]`` (``jax.random.key``) or raw uint32 keys ``[B, 2]`` (``jax.random.PRNGKey``).
      images: uint8 ``[B, H, W, C]``, C in {1, 3}.

    Returns:
      One float32 array ``[B, size_v, size_v, C]`` in [0, 1] per view ``v``; view ``v`` of
      example ``i`` is ``augment_view(fold_in(keys[i], v), images[i], views[v])``.
    """
    images = jnp.asarray(images)
    _check_uint8_images(images, batched=True)
    keys = jnp.asarray(keys)
    if not jnp.issubdtype(keys.dtype, jax.dtypes.prng_key):
      keys = jax.random.wrap_key_data(keys)
    if keys.shape != images.shape[:1]:
      raise ValueError(f"expected one PRNG key per image ({images.shape[0]}), got keys of "
                       f"shape {list(keys.shape)}")

    def draw(index: int, spec: ViewSpec) -> jax.Array:
      one = lambda key, image: augment_view(jax.random.fold_in(key, index), image, spec)
      return jax.vmap(one)(keys, images)

    return tuple(draw(index, spec) for index, spec in enumerate(self.views))


def _erasing(cfg: ml_collections.ConfigDict, data_mean) -> dict:
  """The ViewSpec erasing fields from ``config.augment`` (none while erasing is off)."""
  prob = float(cfg.erasing_prob)
  if prob == 0:
    return {}
  value = tuple(cfg.erasing_value) or tuple(data_mean or ())
  if not value:
    raise ValueError("augment.erasing_prob > 0 needs a fill: set augment.erasing_value (in "
                     "[0, 1], e.g. the dataset mean) or build the policy with the data mean")
  return dict(erasing_prob=prob, erasing_scale=tuple(cfg.erasing_scale),
              erasing_ratio=tuple(cfg.erasing_ratio), erasing_value=value)


def build_policy(augment_config: ml_collections.ConfigDict,
                 data_mean: tuple[float, ...] | None = None) -> Policy:
  """Builds the ``augment.policy`` named in the config, with ``augment.strength`` applied.

  Every policy can end each view with random erasing (``augment.erasing_prob`` > 0, e.g. the
  MoCo + CLD CIFAR-10 recipe's ``--erasing``): ``erasing_value`` is the fill, and when it is
  empty, `data_mean` (``config.data.mean``), which is what torchvision's default 0 after
  ``Normalize`` means.

  * ``'simclr'``: ``num_views`` (>= 2) views with the config values (SimCLR, Chen et al.
    2020); a third view is what MoCo + CLD's 3-view option consumes.
  * ``'moco_v2'``: the same symmetric views (MoCo v2's numbers are in its config file).
  * ``'byol'``: two asymmetric views (Grill et al. 2020): views 1 and 2 take their blur and
    solarize probabilities from ``byol_blur_probs`` and ``byol_solarize_probs`` (paper:
    (1.0, 0.1) and (0.0, 0.2)) instead of ``blur_prob`` and ``solarize_prob``.
  * ``'multicrop'``: two global views plus ``num_small_crops`` views of size
    ``small_crop_size`` cropped with ``small_crop_scale`` (SwAV, Caron et al. 2020); the
    small views share every other setting. The last ``num_ood_crops`` of them are
    out-of-distribution on purpose: tiny crops (area ``ood_crop_scale``, e.g. 0.5-2% of the
    image) that mostly miss the object, for measuring how a method and UOTA's view weights
    react to such views as their share grows.

  Raises:
    ValueError: unknown policy name, negative strength or invalid view parameters.
  """
  cfg = augment_config
  if cfg.policy not in POLICIES:
    raise ValueError(f"unknown augment.policy {cfg.policy!r}; known policies: "
                     f"{', '.join(POLICIES)}")
  base = ViewSpec(
      crop_size=int(cfg.crop_size),
      crop_scale=cfg.crop_scale,
      crop_ratio=cfg.crop_ratio,
      flip_prob=float(cfg.flip_prob),
      jitter=cfg.jitter,
      jitter_prob=float(cfg.jitter_prob),
      grayscale_prob=float(cfg.grayscale_prob),
      blur_prob=float(cfg.blur_prob),
      blur_sigma=cfg.blur_sigma,
      solarize_prob=float(cfg.solarize_prob),
      **_erasing(cfg, data_mean),
  )
  if int(cfg.num_views) < 2:
    raise ValueError(f"augment.num_views must be >= 2, got {cfg.num_views}")
  views = [base] * int(cfg.num_views) if cfg.policy in ("simclr", "moco_v2") else [base, base]
  if cfg.policy == "byol":
    for name in ("byol_blur_probs", "byol_solarize_probs"):
      if len(cfg[name]) != 2:
        raise ValueError(f"augment.{name} must hold one probability per view (2), got "
                         f"{cfg[name]}")
      for p in cfg[name]:
        _check_prob(f"augment.{name}", float(p))
    views = [
        dataclasses.replace(base, blur_prob=float(blur), solarize_prob=float(solar))
        for blur, solar in zip(cfg.byol_blur_probs, cfg.byol_solarize_probs)
    ]
  elif cfg.policy == "multicrop":
    if cfg.num_small_crops < 0:
      raise ValueError(f"augment.num_small_crops must be >= 0, got {cfg.num_small_crops}")
    if not 0 <= cfg.num_ood_crops <= cfg.num_small_crops:
      raise ValueError(f"augment.num_ood_crops must be between 0 and augment.num_small_crops "
                       f"({cfg.num_small_crops}), got {cfg.num_ood_crops}")
    small = dataclasses.replace(
        base,
        crop_size=int(cfg.small_crop_size),
        crop_scale=cfg.small_crop_scale)
    tiny = dataclasses.replace(small, crop_scale=cfg.ood_crop_scale)
    num_ood = int(cfg.num_ood_crops)
    views += [small] * (int(cfg.num_small_crops) - num_ood) + [tiny] * num_ood
  strength = float(cfg.strength)
  return Policy(tuple(scale_strength(spec, strength) for spec in views))
