"""Shared test fixtures: a tiny labelled dataset on disk and a config sized for seconds."""

from __future__ import annotations

import functools
import os
import re
import shlex
from typing import Sequence

import ml_collections
import numpy as np

from ssljax.config import default_config, lock

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name: str):
  """The module benchmarks/<name>.py (not a package), registered in ``sys.modules`` as `name`
  so that what it pickles or imports by name resolves."""
  import importlib.util
  import sys
  path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                      "benchmarks", f"{name}.py")
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module
  spec.loader.exec_module(module)
  return module


def readme_text() -> str:
  """The repository's README.md."""
  with open(os.path.join(REPO_ROOT, "README.md"), encoding="utf-8") as f:
    return f.read()


def readme_command(command: str, *, section: str | None = None,
                   containing: str = "") -> list[str]:
  """The argv of the one README command ``ssljax <command> ...`` that holds `containing`.

  A command is a code line or a code span starting with ``ssljax <command> ``; backslash
  continuations are joined first. With `section`, only the part under the heading
  ``## <section>`` (up to the next ``## ``) is searched. Fails unless exactly one matches.
  """
  text = readme_text()
  if section is not None:
    heading = f"\n## {section}"
    assert heading in text, f"README.md has no section {section!r}"
    text = text.split(heading, 1)[1].split("\n## ", 1)[0]
  text = text.replace("\\\n", " ")
  found = [c for c in re.findall(rf"(?:^|`)(ssljax {command} [^`\n]*)", text, flags=re.M)
           if containing in c]
  assert len(found) == 1, found
  return shlex.split(found[0])


def tiny_dataset(*, num_train: int = 64, num_test: int = 32, size: int = 16,
                 channels: int = 1, num_classes: int = 4,
                 seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
  """``{'train': (images, labels), 'test': ...}``: uint8 images of class-dependent blobs."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size]

  def make(n):
    labels = rng.integers(0, num_classes, size=n).astype(np.int32)
    images = np.empty((n, size, size, channels), np.uint8)
    for i, y in enumerate(labels):
      cy, cx = (size // 4) * (1 + y % 2) + 2, (size // 4) * (1 + y // 2) + 2
      blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 8.0)
      noisy = 200 * blob[..., None] + rng.normal(0, 10, size=(size, size, channels))
      images[i] = np.clip(noisy, 0, 255).astype(np.uint8)
    return images, labels

  return {split: make(n) for split, n in (("train", num_train), ("test", num_test))}


def write_tiny_dataset(directory: str, **dataset_kwargs) -> tuple[str, str]:
  """Writes the `tiny_dataset` splits as train/test .npz files; returns their paths."""
  paths = []
  for split, (images, labels) in tiny_dataset(**dataset_kwargs).items():
    path = os.path.join(directory, f"{split}.npz")
    np.savez(path, images=images, labels=labels)
    paths.append(path)
  return paths[0], paths[1]


def png_bytes(image: np.ndarray) -> bytes:
  """A uint8 [H, W], [H, W, 1] or [H, W, 3] image encoded as PNG (what TFDS stores, so that it
  prepares a dataset without TensorFlow)."""
  import io

  from PIL import Image

  if image.ndim == 3 and image.shape[-1] == 1:
    image = image[..., 0]
  buffer = io.BytesIO()
  Image.fromarray(image).save(buffer, format="PNG")
  return buffer.getvalue()


TINY_TFDS_NAME = "ssljax_tiny_blobs"


@functools.cache
def tiny_tfds_builder() -> type:
  """The TFDS builder of `tiny_dataset` (default arguments) as `TINY_TFDS_NAME`, registered on
  the first call (TFDS is imported only then). Its examples are PNG bytes, so TFDS prepares it
  as ArrayRecord without TensorFlow."""
  import tensorflow_datasets as tfds

  class SsljaxTinyBlobs(tfds.core.GeneratorBasedBuilder):
    # A top-level module name makes TFDS skip its package-resource lookup of the builder's
    # code path, which needs the `importlib_resources` backport.
    __module__ = "ssljax_tfds_test"
    name = TINY_TFDS_NAME
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
      return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
          "image": tfds.features.Image(shape=(16, 16, 1)),
          "label": tfds.features.ClassLabel(num_classes=4)}))

    def _split_generators(self, dl_manager):
      del dl_manager
      return {split: self._generate_examples(images, labels)
              for split, (images, labels) in tiny_dataset().items()}

    def _generate_examples(self, images, labels):
      for i, (image, label) in enumerate(zip(images, labels)):
        yield i, {"image": png_bytes(image), "label": int(label)}

  return SsljaxTinyBlobs


def write_tiny_tfds(data_dir: str) -> str:
  """Prepares `tiny_tfds_builder`'s dataset as ArrayRecord in `data_dir`; returns its name."""
  import tensorflow_datasets as tfds

  tfds.disable_progress_bar()
  tiny_tfds_builder()(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return TINY_TFDS_NAME


def tiny_config(directory: str, method: str = "simclr", addons: Sequence[str] = (),
                **dataset_kwargs) -> ml_collections.ConfigDict:
  """A complete, locked config for a tiny run of `method` (wrapped by `addons`) on
  `write_tiny_dataset` data.

  The config holds only `method`'s and the add-ons' sections, with their defaults; SimCLR's
  projector is shrunk to 16-8, other methods' sections are left for the caller to size.
  """
  write_tiny_dataset(directory, **dataset_kwargs)
  size = dataset_kwargs.get("size", 16)
  channels = dataset_kwargs.get("channels", 1)
  c = default_config(method, addons)
  c.data.source = "arrays"
  c.data.name = "tiny"
  c.data.data_dir = directory
  c.data.train_split = "train"
  c.data.test_split = "test"
  c.data.image_size = size
  c.data.channels = channels
  c.data.num_classes = dataset_kwargs.get("num_classes", 4)
  c.data.mean = (0.2,) * channels
  c.data.std = (0.3,) * channels
  c.augment.crop_size = size
  c.model.width = 0.25
  if method == "simclr":
    c.method.simclr.proj_hidden_dim = 16
    c.method.simclr.proj_dim = 8
  c.optim.lr = 0.1
  c.train.batch_size = 16
  c.train.num_steps = 6
  c.train.log_every_steps = 2
  c.train.checkpoint_every_steps = 3
  c.train.progress_bar = False
  c.eval.batch_size = 16
  c.eval.knn_k = 5
  c.eval.probe_epochs = 3
  c.eval.probe_batch_size = 16
  c.eval.plots = True
  return lock(c)


def init_with_numpy_kernels(init_fn, *args, seed: int = 0):
  """``init_fn(*args)``, except that weight kernels come from NumPy, He-normal.

  Only leaves named ``kernel`` (conv and dense weights) are replaced; everything else
  (BN variables, biases, prototypes, queues, memory banks) is what `init_fn` makes. Sampling
  conv kernels with XLA costs seconds of compilation per kernel on the CPU build of jax (most
  with partitionable threefry, jax's default); the jitted init returns placeholders for the
  kernels, so XLA drops their sampling and the tests stay fast. Kernels of EMA copies in the
  returned state are drawn independently of the online ones.
  """
  import jax
  import jax.numpy as jnp

  def is_kernel(path) -> bool:
    last = path[-1] if path else None
    return getattr(last, "key", None) == "kernel"

  shapes = jax.eval_shape(init_fn, *args)
  small = jax.jit(lambda *a: jax.tree_util.tree_map_with_path(
      lambda path, x: jnp.zeros(()) if is_kernel(path) else x, init_fn(*a)))(*args)
  rng = np.random.default_rng(seed)

  def fill(path, shape, value):
    if not is_kernel(path):
      return value
    fan_in = int(np.prod(shape.shape[:-1]))
    return jnp.asarray(rng.normal(scale=np.sqrt(2.0 / fan_in), size=shape.shape), jnp.float32)

  return jax.tree_util.tree_map_with_path(fill, shapes, small)


# Heads, queues, banks and prototypes small enough for batches of 16 of the 64 tiny images.
SMALL_METHOD_SIZES = {
    "simclr": {},
    "moco": {"queue_size": 64, "proj_hidden_dim": 16, "proj_dim": 8},
    "byol": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
    "swav": {"num_prototypes": 8, "queue_size": 0, "proj_hidden_dim": 16, "proj_dim": 8},
    "barlow_twins": {"proj_hidden_dim": 16, "proj_dim": 16},
    "npid": {"proj_dim": 8},
    "dino": {"proj_hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 12},
    "cissl": {"out_dim": 8, "teacher_hidden_dims": (16,)},
    "dissl": {"num_classes": 12, "bottleneck_dim": 8, "teacher_hidden_dims": (16,)},
    "metamask": {"bt_hidden_dim": 16, "bt_dim": 16, "cl_hidden_dim": 16, "cl_dim": 8},
}


def small_method_config(directory: str, method: str) -> ml_collections.ConfigDict:
  """`tiny_config` of `method` with its section shrunk by `SMALL_METHOD_SIZES`."""
  config = tiny_config(directory, method=method)
  for key, value in SMALL_METHOD_SIZES[method].items():
    config.method[method][key] = value
  if method == "metamask":  # its meta step is a virtual SGD step: it refuses LARS
    config.optim.name = "sgd"
  return config
