"""Augmentations: pure per-image ops and the view policies built from ``config.augment``.

``ops`` holds ``op(key, image, **params) -> image`` functions on one float32 ``[H, W, C]``
image (and the deterministic adjustments they are built from); ``policies`` composes them
into views and applies them to a uint8 batch with ``jax.vmap``, one key per example, with
the ``strength`` knob. Each module's docstring states the exact semantics.
"""

from ssljax.augment.ops import (
    JITTER_ADJUSTMENTS,
    LUMA_WEIGHTS,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    color_jitter,
    default_blur_kernel_size,
    gaussian_blur,
    horizontal_flip,
    hsv_to_rgb,
    luma,
    random_resized_crop,
    rgb_to_hsv,
    sample_crop_box,
    sample_jitter_params,
    solarize,
    to_float,
    to_grayscale,
)
from ssljax.augment.policies import (
    POLICIES,
    Policy,
    ViewSpec,
    augment_view,
    build_policy,
    scale_strength,
)

__all__ = [
    "JITTER_ADJUSTMENTS",
    "LUMA_WEIGHTS",
    "POLICIES",
    "Policy",
    "ViewSpec",
    "adjust_brightness",
    "adjust_contrast",
    "adjust_hue",
    "adjust_saturation",
    "augment_view",
    "build_policy",
    "color_jitter",
    "default_blur_kernel_size",
    "gaussian_blur",
    "horizontal_flip",
    "hsv_to_rgb",
    "luma",
    "random_resized_crop",
    "rgb_to_hsv",
    "sample_crop_box",
    "sample_jitter_params",
    "scale_strength",
    "solarize",
    "to_float",
    "to_grayscale",
]
