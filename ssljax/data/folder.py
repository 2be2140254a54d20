"""Reads what the ``folder`` preset leaves open from the image folder itself.

``ssljax train --config configs/<method>.py:folder --config.data.data_dir=DIR`` runs a method's
recipe on images laid out as

  DIR/train/<class>/<image>   labelled: one subfolder per class (label = sorted position)
  DIR/train/<image>           unlabelled: pretraining only, evaluation is skipped
  DIR/test/<class>/<image>    optional: the same class folders as train/, for kNN and the probe

The preset (`ssljax.config.set_image_folder`) sets the keys the folder decides to "from the
folder": ``data.image_size``, ``data.channels`` and ``data.num_classes`` to 0, ``data.mean`` and
``data.std`` to ``()``, ``augment.crop_size`` and ``augment.small_crop_size`` to 0.
`resolve_config` fills them in before the trainer validates the config and writes its workdir,
so ``<workdir>/config.json`` holds the values used, and ``ssljax eval`` and a resumed run use
those same values:

  data.num_classes     the class subfolders of DIR/train (0: unlabelled)
  data.channels        1 when every image of DIR/train is grayscale (PIL modes 1, L, LA, I, F),
                       else 3
  data.image_size      the smallest shorter side among the images of DIR/train (the source
                       resizes each image's shorter side to it and centre-crops a square)
  data.mean, data.std  per-channel statistics of [0, 1] pixels of ``data.stats_examples``
                       train images drawn with ``seed``, decoded as training decodes them
  augment.crop_size        data.image_size
  augment.small_crop_size  data.image_size // 2

A key set explicitly (e.g. ``--config.data.image_size=64``) is kept; only the open ones are
read from the folder. Crop sizes left at 0 mean the image size (and half of it) for any source.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import os

import ml_collections
import numpy as np

from ssljax.data.sources import IMAGE_EXTENSIONS, _decode_image, list_image_folder

log = logging.getLogger(__name__)

# PIL modes whose pixels are one value (decoded as one channel).
GRAYSCALE_MODES = ("1", "L", "LA", "I", "F")
# Keys of the ``data`` section the folder decides when they are left open (0 or ()).
FOLDER_KEYS = ("image_size", "channels", "num_classes", "mean", "std")

LAYOUT = ("lay the images out as DIR/train/<class>/<image> (labelled) or DIR/train/<image> "
          "(unlabelled), with an optional DIR/test/<class>/<image> of the same classes for "
          "evaluation, and pass --config.data.data_dir=DIR")


@dataclasses.dataclass(frozen=True)
class FolderDescription:
  """What an image folder's train split shows without decoding its pixels.

  Attributes:
    train_dir: the train split's folder.
    test_dir: the test split's folder, or None when there is none.
    class_names: the class subfolders of ``train_dir`` in label order; () when unlabelled.
    paths: every image file of the train split, sorted as the source loads them.
    channels: 1 when every image is grayscale, else 3.
    image_size: the smallest shorter side among the images.
    largest_size: the largest ``(width, height)`` (by area), for the log.
  """

  train_dir: str
  test_dir: str | None
  class_names: tuple[str, ...]
  paths: tuple[str, ...]
  channels: int
  image_size: int
  largest_size: tuple[int, int]


def _is_grayscale_mode(mode: str) -> bool:
  return mode in GRAYSCALE_MODES or mode.startswith("I;16")


def _check_test_split(test_dir: str, train_dir: str, class_names: list[str]) -> None:
  """Refuses a test split whose class folders are not the train split's, or hold no image."""
  test_classes, _, labels = list_image_folder(test_dir)
  if test_classes != class_names:
    raise ValueError(
        f"the class folders of {test_dir!r} ({', '.join(test_classes) or 'none'}) differ from "
        f"those of {train_dir!r} ({', '.join(class_names)}); a label is the position of its "
        f"class folder in sorted order, so both splits need the same class folders")
  counts = np.bincount(labels, minlength=len(class_names))
  empty = [os.path.join(test_dir, name) for name, count in zip(class_names, counts)
           if count == 0]
  if empty:
    raise ValueError(
        f"test class folder {', '.join(map(repr, empty[:3]))}"
        f"{f' and {len(empty) - 3} more' if len(empty) > 3 else ''} holds no image files "
        f"({', '.join(IMAGE_EXTENSIONS)}); put each class's test images in its folder, or "
        f"remove {test_dir!r} to train without evaluation")


def describe_image_folder(data_dir: str, train_split: str = "train",
                          test_split: str = "test") -> FolderDescription:
  """Lists the train split of `data_dir` and reads every image's header (size and mode).

  Raises:
    ValueError: `data_dir` is empty, images and class folders are mixed at the top of the
      train split, or the test split's class folders differ from the train split's or one
      of them holds no image.
    FileNotFoundError: the train split is missing or holds no image files.
    OSError: naming the file, when an image header cannot be read.
  """
  from PIL import Image  # Lazy: only image folders need Pillow.

  if not data_dir:
    raise ValueError(f"the folder preset reads the images from data.data_dir, which is empty; "
                     f"{LAYOUT}")
  train_dir = os.path.join(data_dir, train_split)
  if not os.path.isdir(train_dir):
    raise FileNotFoundError(f"image folder {data_dir!r} has no {train_split}/ folder "
                            f"({train_dir!r} does not exist); {LAYOUT}")
  class_names, paths, _ = list_image_folder(train_dir)
  if not paths:
    raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under "
                            f"{train_dir!r}; {LAYOUT}")

  grayscale, shorter, largest = True, math.inf, (0, 0)
  for path in paths:
    try:
      with Image.open(path) as image:
        (width, height), mode = image.size, image.mode
    except OSError as e:
      raise OSError(f"{path}: cannot read this image ({e}); replace or delete it") from e
    grayscale = grayscale and _is_grayscale_mode(mode)
    shorter = min(shorter, width, height)
    if width * height > largest[0] * largest[1]:
      largest = (width, height)

  test_dir = os.path.join(data_dir, test_split)
  if not os.path.isdir(test_dir):
    test_dir = None
  elif class_names:
    _check_test_split(test_dir, train_dir, class_names)
  return FolderDescription(train_dir=train_dir, test_dir=test_dir,
                           class_names=tuple(class_names), paths=tuple(paths),
                           channels=1 if grayscale else 3, image_size=int(shorter),
                           largest_size=largest)


def channel_statistics(paths: tuple[str, ...] | list[str], *, image_size: int, channels: int,
                       num_examples: int, seed: int) -> tuple[tuple[float, ...],
                                                              tuple[float, ...]]:
  """Per-channel mean and standard deviation of [0, 1] pixels of a seeded sample of images.

  ``min(num_examples, len(paths))`` files are drawn without replacement by
  ``np.random.default_rng(seed)`` and decoded as the image-folder source decodes them (shorter
  side resized to `image_size`, centre-cropped, `channels` channels). Over the ``M`` pixels of
  channel c, ``mean_c = sum(x) / M`` and ``std_c = sqrt(sum(x^2) / M - mean_c^2)`` (the
  population deviation), rounded to 4 decimals as the dataset presets store them.

  Raises:
    ValueError: `num_examples` < 1, or a channel is constant over the sample (std 0).
  """
  if num_examples < 1:
    raise ValueError(f"data.stats_examples = {num_examples} must be >= 1 (images sampled to "
                     f"compute data.mean and data.std)")
  count = min(num_examples, len(paths))
  chosen = np.sort(np.random.default_rng(seed).choice(len(paths), size=count, replace=False))
  total = np.zeros((channels,), np.float64)
  squares = np.zeros((channels,), np.float64)
  for i in chosen:
    pixels = _decode_image(paths[i], image_size, channels).reshape(-1, channels) / 255.0
    total += pixels.sum(axis=0)
    squares += np.square(pixels).sum(axis=0)
  pixel_count = count * image_size * image_size
  mean = total / pixel_count
  std = np.sqrt(np.maximum(squares / pixel_count - np.square(mean), 0.0))
  mean, std = tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std)
  if min(std) <= 0:
    raise ValueError(f"the {count} images sampled from the image folder have a constant "
                     f"channel (std {std}); set --config.data.std (and data.mean) by hand")
  return mean, std


def open_keys(config: ml_collections.ConfigDict) -> list[str]:
  """The keys of `config` left for the folder to decide (``data.<key>`` of `FOLDER_KEYS` at 0
  or ``()``); empty unless ``data.source`` is 'image_folder'."""
  if config.data.source != "image_folder":
    return []
  return [f"data.{k}" for k in FOLDER_KEYS if config.data[k] in (0, ())]


def resolve_config(config: ml_collections.ConfigDict,
                   stored: ml_collections.ConfigDict | None = None
                   ) -> ml_collections.ConfigDict:
  """`config` with the keys it leaves open filled in (a copy; `config` itself is unchanged).

  With `stored` (the config of the workdir's checkpoint, on resume) the open keys take its
  values, so a resumed run normalises exactly as before even if the folder has changed.
  Otherwise they are read from the folder (`describe_image_folder`, `channel_statistics`),
  see the module docstring. Then ``augment.crop_size`` 0 becomes ``data.image_size`` and
  ``augment.small_crop_size`` 0 becomes half of it.

  Raises:
    ValueError, FileNotFoundError, OSError: the folder cannot give the open keys (the
      message names the problem and the expected layout).
  """
  keys = open_keys(config)
  crops_open = config.augment.crop_size == 0 or config.augment.small_crop_size == 0
  if not keys and not crops_open:
    return config
  config = copy.deepcopy(config)
  data = config.data
  if keys and stored is not None and stored.data.source == "image_folder":
    for key in keys:
      data[key.split(".", 1)[1]] = stored.data[key.split(".", 1)[1]]
    log.info("image folder: %s as stored in the workdir's config.json",
             ", ".join(f"{k} = {data[k.split('.', 1)[1]]}" for k in keys))
  elif keys:
    _resolve_from_folder(config, keys)
  if config.augment.crop_size == 0:
    config.augment.crop_size = data.image_size
  if config.augment.small_crop_size == 0:
    config.augment.small_crop_size = max(data.image_size // 2, 1)
  return config


def _resolve_from_folder(config: ml_collections.ConfigDict, keys: list[str]) -> None:
  data = config.data
  found = describe_image_folder(data.data_dir, data.train_split, data.test_split)
  if data.num_classes == 0:
    data.num_classes = len(found.class_names)
  if data.channels == 0:
    data.channels = found.channels
  if data.image_size == 0:
    data.image_size = found.image_size
  if not data.mean or not data.std:
    mean, std = channel_statistics(found.paths, image_size=data.image_size,
                                   channels=data.channels, num_examples=data.stats_examples,
                                   seed=config.seed)
    data.mean = data.mean or mean
    data.std = data.std or std
  classes = (f"{len(found.class_names)} classes ({', '.join(found.class_names[:5])}"
             f"{', ...' if len(found.class_names) > 5 else ''})" if found.class_names
             else "no class folders (unlabelled)")
  log.info("image folder %s: %d images, %s, %s; largest image %dx%d; test split: %s",
           found.train_dir, len(found.paths), classes,
           "grayscale" if found.channels == 1 else "colour", *found.largest_size,
           found.test_dir or "none")
  log.info("image folder: read %s from the folder (statistics of %d images sampled with "
           "seed %d)", ", ".join(f"{k} = {data[k.split('.', 1)[1]]}" for k in keys),
           min(data.stats_examples, len(found.paths)), config.seed)
