"""Tests for ssljax.data.sources: every loader on tiny files written here, plus the real
Debian Fashion-MNIST files when installed."""

from __future__ import annotations

import gzip
import io
import json
import os
import pickle
import shutil
import struct
import tarfile

import numpy as np
import pytest

from ssljax.config import FASHION_MNIST_DIR, default_config
from ssljax.data import sources
from ssljax.data.sources import (
    ArrayOnlyUnpickler,
    ArraySource,
    build_source,
    load_arrays,
    load_cifar,
    load_fashion_mnist_idx,
    load_image_folder,
    load_tfds,
    read_idx,
)
from tests.util import REPO_ROOT, png_bytes, readme_command

# ----------------------------------------------------------------------------- helpers


def _idx_bytes(array: np.ndarray) -> bytes:
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(np.uint8).tobytes()


def _write_idx(path, array: np.ndarray, gz: bool) -> None:
  data = _idx_bytes(array)
  if gz:
    path = f"{path}.gz"
    data = gzip.compress(data)
  with open(path, "wb") as f:
    f.write(data)


def _write_fashion_mnist(directory, n_train=6, n_test=4, size=28, gz=True):
  rng = np.random.default_rng(0)
  arrays = {}
  for prefix, n in (("train", n_train), ("t10k", n_test)):
    images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    _write_idx(os.path.join(directory, f"{prefix}-images-idx3-ubyte"), images, gz)
    _write_idx(os.path.join(directory, f"{prefix}-labels-idx1-ubyte"), labels, gz)
    arrays[prefix] = (images, labels)
  return arrays


class _Py2Pickler(pickle._Pickler):  # pylint: disable=protected-access
  """Writes pickles the way Python 2 / numpy 1.x wrote the official CIFAR batches: every
  string as a Python 2 ``str`` opcode (bytes under ``encoding='bytes'``) and the array
  rebuilt through ``numpy.core.multiarray._reconstruct``."""

  dispatch = dict(pickle._Pickler.dispatch)  # pylint: disable=protected-access

  def save_py2_str(self, obj):
    data = obj.encode("latin1") if isinstance(obj, str) else obj
    if len(data) < 256:
      self.write(pickle.SHORT_BINSTRING + bytes([len(data)]) + data)
    else:
      self.write(pickle.BINSTRING + struct.pack("<i", len(data)) + data)
    self.memoize(obj)

  dispatch[str] = save_py2_str
  dispatch[bytes] = save_py2_str

  def save_global(self, obj, name=None):
    name = name or obj.__name__
    module = "numpy.core.multiarray" if name == "_reconstruct" else obj.__module__
    self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode())
    self.memoize(obj)


def _py2_pickle(obj) -> bytes:
  buf = io.BytesIO()
  _Py2Pickler(buf, protocol=2).dump(obj)
  return buf.getvalue()


def _cifar_images(n: int, offset: int) -> np.ndarray:
  """[n, 32, 32, 3] uint8 with distinct content per example."""
  rng = np.random.default_rng(offset)
  return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def _cifar_rows(images_hwc: np.ndarray) -> np.ndarray:
  """The official storage: one row of 3072 = 1024 R, 1024 G, 1024 B values."""
  return images_hwc.transpose(0, 3, 1, 2).reshape(len(images_hwc), 3072)


def _write_cifar(root, name: str, per_file: int = 3, py2: bool = True):
  """Writes a tiny CIFAR folder; returns {split: (images_hwc, labels)}."""
  if name == "cifar10":
    folder = root / "cifar-10-batches-py"
    files = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    label_key = "labels"
  else:
    folder = root / "cifar-100-python"
    files = {"train": ["train"], "test": ["test"]}
    label_key = "fine_labels"
  folder.mkdir(parents=True)
  expected, offset = {}, 0
  for split, names in files.items():
    all_images, all_labels = [], []
    for fname in names:
      images = _cifar_images(per_file, offset)
      # A pixel with a known position: example 0, row 1, column 2, green channel.
      images[0, 1, 2] = (11, 222, 33)
      labels = [(offset + i) % 7 for i in range(per_file)]
      offset += per_file
      batch = {"data": _cifar_rows(images), label_key: labels, "batch_label": fname}
      if name == "cifar100":
        batch["coarse_labels"] = [0] * per_file
      if py2:
        payload = _py2_pickle({k.encode(): v for k, v in batch.items()})
      else:
        payload = pickle.dumps(batch, protocol=4)
      (folder / fname).write_bytes(payload)
      all_images.append(images)
      all_labels.extend(labels)
    expected[split] = (np.concatenate(all_images), np.asarray(all_labels))
  return folder, expected


def _tar_gz(folder, archive_path):
  with tarfile.open(archive_path, "w:gz") as tar:
    tar.add(folder, arcname=folder.name)


def _save_image(path, array):
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


# ----------------------------------------------------------------------------- ArraySource


def test_array_source_get_and_properties():
  images = np.arange(5 * 2 * 3 * 1, dtype=np.uint8).reshape(5, 2, 3, 1)
  source = ArraySource(images, np.array([0, 1, 2, 3, 4], np.int32))
  assert len(source) == 5 and source.image_shape == (2, 3, 1) and source.has_labels
  batch = source.get(np.array([4, 0, 4]))
  np.testing.assert_array_equal(batch["image"], images[[4, 0, 4]])
  np.testing.assert_array_equal(batch["label"], [4, 0, 4])
  assert batch["image"].dtype == np.uint8 and batch["label"].dtype == np.int32
  assert not ArraySource(images, np.array([0, -1, 2, 3, 4], np.int32)).has_labels


@pytest.mark.parametrize("images, labels, message", [
    (np.zeros((4, 8, 8), np.uint8), np.zeros(4, np.int32), r"\[N, H, W, 1\]"),
    (np.zeros((4, 8, 8, 3), np.float32), np.zeros(4, np.int32), r"convert to uint8"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(5, np.int32), r"must have shape \[N\]"),
    (np.zeros((4, 8, 8, 2), np.uint8), np.zeros(4, np.int32), r"1 \(grayscale\) or 3"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.zeros(4, np.int64), r"int32"),
    (np.zeros((4, 8, 8, 3), np.uint8), np.full(4, -2, np.int32), r"-1"),
])
def test_array_source_rejects_bad_arrays(images, labels, message):
  with pytest.raises(ValueError, match=message):
    ArraySource(images, labels)


# ----------------------------------------------------------------------------- IDX


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_idx_round_trip(tmp_path, gz):
  written = _write_fashion_mnist(tmp_path, gz=gz)
  for split, prefix in (("train", "train"), ("test", "t10k")):
    source = load_fashion_mnist_idx(str(tmp_path), split)
    images, labels = written[prefix]
    assert source.images.shape == images.shape + (1,)
    np.testing.assert_array_equal(source.images[..., 0], images)
    np.testing.assert_array_equal(source.labels, labels)
    assert source.images.dtype == np.uint8 and source.labels.dtype == np.int32


def test_read_idx_other_dtype(tmp_path):
  array = (np.arange(6).reshape(2, 3) - 3).astype(">i4")
  header = bytes([0, 0, 0x0C, 2]) + struct.pack(">2I", 2, 3)
  (tmp_path / "x.idx").write_bytes(header + array.tobytes())
  np.testing.assert_array_equal(read_idx(str(tmp_path / "x.idx")), array)


def test_idx_corrupt_magic_and_truncation(tmp_path):
  _write_fashion_mnist(tmp_path, gz=False)
  path = tmp_path / "train-images-idx3-ubyte"
  data = bytearray(path.read_bytes())
  data[0] = 0x7F
  path.write_bytes(bytes(data))
  with pytest.raises(ValueError, match="bad magic number"):
    load_fashion_mnist_idx(str(tmp_path), "train")
  data[0] = 0
  path.write_bytes(bytes(data[:-5]))
  with pytest.raises(ValueError, match="truncated"):
    load_fashion_mnist_idx(str(tmp_path), "train")
  (tmp_path / "t10k-images-idx3-ubyte").write_bytes(gzip.compress(bytes(data))[:-8])
  with pytest.raises(ValueError, match="cannot be decompressed"):
    load_fashion_mnist_idx(str(tmp_path), "test")


def test_fashion_mnist_missing_files_message(tmp_path):
  _write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 28, 28), np.uint8), True)
  with pytest.raises(FileNotFoundError) as info:
    load_fashion_mnist_idx(str(tmp_path), "train")
  message = str(info.value)
  assert "apt-get install dataset-fashion-mnist" in message
  assert "--config.data.data_dir" in message
  assert "zalandoresearch/fashion-mnist" in message
  assert str(tmp_path / "train-labels-idx1-ubyte") in message
  assert "train-images-idx3-ubyte[" not in message  # That one exists.


@pytest.mark.skipif(
    not os.path.isfile(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist():
  train = load_fashion_mnist_idx(FASHION_MNIST_DIR, "train")
  assert train.images.shape == (60000, 28, 28, 1) and train.images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(train.labels), np.full(10, 6000))
  test = load_fashion_mnist_idx(FASHION_MNIST_DIR, "test")
  assert test.images.shape == (10000, 28, 28, 1)
  np.testing.assert_array_equal(np.bincount(test.labels), np.full(10, 1000))


# ----------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("form", ["folder", "parent", "archive_file", "archive_in_dir"])
def test_cifar_forms(tmp_path, name, form):
  folder, expected = _write_cifar(tmp_path / "src", name)
  archive_name = {"cifar10": "cifar-10-python.tar.gz",
                  "cifar100": "cifar-100-python.tar.gz"}[name]
  if form == "folder":
    path = folder
  elif form == "parent":
    path = folder.parent
  else:
    (tmp_path / "dl").mkdir()
    _tar_gz(folder, tmp_path / "dl" / archive_name)
    path = tmp_path / "dl" / archive_name if form == "archive_file" else tmp_path / "dl"
  for split in ("train", "test"):
    source = load_cifar(str(path), name, split)
    images, labels = expected[split]
    assert source.images.shape == images.shape and source.images.dtype == np.uint8
    np.testing.assert_array_equal(source.images, images)
    np.testing.assert_array_equal(source.labels, labels)
  assert tuple(load_cifar(str(path), name, "train").images[0, 1, 2]) == (11, 222, 33)


def test_cifar_modern_pickles(tmp_path):
  """Batches re-saved by Python 3 / numpy 2 (str keys, numpy._core) load too."""
  folder, expected = _write_cifar(tmp_path, "cifar100", py2=False)
  source = load_cifar(str(folder), "cifar100", "train")
  np.testing.assert_array_equal(source.images, expected["train"][0])


def test_cifar_missing_and_wrong_variant(tmp_path):
  with pytest.raises(FileNotFoundError, match="cifar-10-python.tar.gz"):
    load_cifar(str(tmp_path), "cifar10", "train")
  folder, _ = _write_cifar(tmp_path, "cifar10")
  with pytest.raises(ValueError, match="data.name"):
    load_cifar(str(tmp_path), "cifar1000", "train")
  shutil.copy(folder / "test_batch", folder / "test")
  shutil.copy(folder / "test_batch", folder / "train")
  with pytest.raises(ValueError, match="fine_labels"):
    load_cifar(str(folder), "cifar100", "test")


class _RunsShell:

  def __init__(self, command):
    self.command = command

  def __reduce__(self):
    return os.system, (self.command,)


class _RunsEval:

  def __reduce__(self):
    return eval, ("1 + 1",)


@pytest.mark.parametrize("in_archive", [False, True])
def test_cifar_malicious_pickle_refused(tmp_path, in_archive):
  folder, _ = _write_cifar(tmp_path / "src", "cifar10")
  marker = tmp_path / "pwned"
  payload = {"data": _RunsShell(f"touch {marker}"), "labels": [0]}
  (folder / "test_batch").write_bytes(pickle.dumps(payload, protocol=4))
  path = folder
  if in_archive:
    path = tmp_path / "cifar-10-python.tar.gz"
    _tar_gz(folder, path)
  with pytest.raises(pickle.UnpicklingError, match=r"refusing.*system"):
    load_cifar(str(path), "cifar10", "test")
  assert not marker.exists()


@pytest.mark.parametrize("obj, refused", [
    (_RunsEval(), "builtins.eval"),
    (np.load, "numpy.load"),
    (np.float64(1.0), "numpy"),  # Scalars are not needed by CIFAR and not allowed.
    (np.array([_RunsShell("true")], dtype=object), "system"),  # Inside an object array.
])
def test_array_only_unpickler_refuses_other_globals(obj, refused):
  data = pickle.dumps(obj, protocol=4)
  with pytest.raises(pickle.UnpicklingError, match=refused):
    ArrayOnlyUnpickler(io.BytesIO(data), origin="test").load()


def test_array_only_unpickler_accepts_plain_arrays():
  array = np.arange(24, dtype=np.uint8).reshape(2, 3, 4)
  for data in (_py2_pickle({"a": array}), pickle.dumps({b"a": array}, protocol=4)):
    loaded = ArrayOnlyUnpickler(io.BytesIO(data), origin="test").load()
    np.testing.assert_array_equal(loaded[b"a"], array)


# ----------------------------------------------------------------------------- image folder


def test_image_folder_labelled(tmp_path):
  rng = np.random.default_rng(0)
  arrays = {}
  for cls in ("cat", "ant"):
    for i in range(2):
      arrays[(cls, i)] = rng.integers(0, 256, (6, 5, 3), dtype=np.uint8)
      _save_image(str(tmp_path / cls / f"{i}.png"), arrays[(cls, i)])
  source = load_image_folder(str(tmp_path))
  assert source.images.shape == (4, 6, 5, 3)
  np.testing.assert_array_equal(source.labels, [0, 0, 1, 1])  # 'ant' sorts first.
  np.testing.assert_array_equal(source.images[2], arrays[("cat", 0)])
  unlabelled = load_image_folder(str(tmp_path), labelled=False)
  np.testing.assert_array_equal(unlabelled.labels, [-1] * 4)
  np.testing.assert_array_equal(unlabelled.images, source.images)


def test_image_folder_flat_grayscale(tmp_path):
  image = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
  _save_image(str(tmp_path / "a.png"), image)
  _save_image(str(tmp_path / "b.png"), image[::-1])
  source = load_image_folder(str(tmp_path), channels=1)
  assert source.images.shape == (2, 3, 4, 1) and not source.has_labels
  np.testing.assert_array_equal(source.images[1, ..., 0], image[::-1])


def test_image_folder_mixed_sizes(tmp_path):
  _save_image(str(tmp_path / "a.png"), np.zeros((8, 8, 3), np.uint8))
  wide = np.zeros((8, 16, 3), np.uint8)  # H=8, W=16: the center crop keeps columns 4..11.
  wide[:, 4:8] = 255
  _save_image(str(tmp_path / "b.png"), wide)
  _save_image(str(tmp_path / "c.png"), np.full((16, 16, 3), 100, np.uint8))
  with pytest.raises(ValueError, match=r"b\.png.*image_size"):
    load_image_folder(str(tmp_path))
  source = load_image_folder(str(tmp_path), image_size=8)
  assert source.images.shape == (3, 8, 8, 3)
  np.testing.assert_array_equal(source.images[1, :, :4], 255)
  np.testing.assert_array_equal(source.images[1, :, 4:], 0)
  np.testing.assert_array_equal(source.images[2], 100)  # Resized 16 -> 8.


def test_image_folder_errors(tmp_path):
  with pytest.raises(FileNotFoundError, match="No image files"):
    load_image_folder(str(tmp_path))
  _save_image(str(tmp_path / "cls" / "a.png"), np.zeros((4, 4, 3), np.uint8))
  _save_image(str(tmp_path / "loose.png"), np.zeros((4, 4, 3), np.uint8))
  with pytest.raises(ValueError, match="loose.png.*labelled=False"):
    load_image_folder(str(tmp_path))


def test_image_folder_truncated_png_names_the_file(tmp_path):
  rng = np.random.default_rng(0)
  for name in ("a.png", "b.png"):
    _save_image(str(tmp_path / name), rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
  data = (tmp_path / "b.png").read_bytes()
  (tmp_path / "b.png").write_bytes(data[:len(data) // 2])
  with pytest.raises(OSError, match=r"b\.png: cannot decode this image \(.*truncated.*"
                     r"Replace or delete it"):
    load_image_folder(str(tmp_path), labelled=False)


# ----------------------------------------------------------------------------- arrays


def test_load_arrays(tmp_path):
  images = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 3), dtype=np.uint8)
  np.savez(tmp_path / "l.npz", images=images, labels=np.arange(5))
  np.savez(tmp_path / "u.npz", images=images)
  labelled = load_arrays(str(tmp_path / "l.npz"))
  np.testing.assert_array_equal(labelled.images, images)
  np.testing.assert_array_equal(labelled.labels, np.arange(5))
  assert labelled.labels.dtype == np.int32
  np.testing.assert_array_equal(load_arrays(str(tmp_path / "u.npz")).labels, [-1] * 5)
  np.savez(tmp_path / "g.npz", images=images[..., 0])
  with pytest.raises(ValueError, match=r"\[N, H, W, 1\]"):
    load_arrays(str(tmp_path / "g.npz"))
  np.savez(tmp_path / "n.npz", pictures=images)
  with pytest.raises(ValueError, match="no 'images'"):
    load_arrays(str(tmp_path / "n.npz"))


# ----------------------------------------------------------------------------- TFDS
#
# `tfds.testing.mock_data` replaces every builder's data_dir, so "is it prepared?" and the
# file formats cannot be checked under it: the tests of those prepare real array_record
# datasets on disk (TFDS writes array_record without TensorFlow when examples carry
# already-encoded PNG bytes). The mock_data tests check that a user's tests can mock ssljax's
# TFDS input.

tfds = pytest.importorskip("tensorflow_datasets")


class _FashionMnistLookalike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Same name, version and features as TFDS's fashion_mnist; example i is all i's."""

  __module__ = "ssljax_tfds_test"
  name = "fashion_mnist"
  VERSION = tfds.core.Version("3.0.1")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(28, 28, 1)),
        "label": tfds.features.ClassLabel(num_classes=10)}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(12), "test": self._generate_examples(5)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": png_bytes(np.full((28, 28), i, np.uint8)), "label": i % 10}


class SsljaxTestPngImages(tfds.core.GeneratorBasedBuilder):
  """Registered (so `download=True` can prepare it); needs no network or TensorFlow."""

  # A top-level module name makes TFDS skip its package-resource lookup of the builder's
  # code path, which needs the `importlib_resources` backport.
  __module__ = "ssljax_tfds_test"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(6, 6, 3))}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"image": png_bytes(np.full((6, 6, 3), 10 * i, np.uint8))}


class SsljaxTestNumpyImages(tfds.core.GeneratorBasedBuilder):
  """Yields numpy images, which TFDS can only encode with TensorFlow."""

  __module__ = "ssljax_tfds_test"
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(6, 6, 3))}))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples()}

  def _generate_examples(self):
    yield 0, {"image": np.zeros((6, 6, 3), np.uint8)}


@pytest.fixture(scope="module")
def tfds_dir(tmp_path_factory):
  tfds.disable_progress_bar()
  data_dir = tmp_path_factory.mktemp("tfds")
  _FashionMnistLookalike(data_dir=str(data_dir),
                         file_format="array_record").download_and_prepare()
  return data_dir


def test_tfds_array_record_without_tensorflow(tfds_dir):
  source = load_tfds("fashion_mnist", "train", data_dir=str(tfds_dir))
  assert source.images.shape == (12, 28, 28, 1) and source.images.dtype == np.uint8
  # Each image is constant; its value is the example number, its label that number % 10.
  values = source.images[:, 0, 0, 0]
  np.testing.assert_array_equal(np.sort(values), np.arange(12))
  np.testing.assert_array_equal(source.labels, values % 10)
  assert (source.images == values[:, None, None, None]).all()
  assert len(load_tfds("fashion_mnist", "test[:3]", data_dir=str(tfds_dir))) == 3
  unlabelled = load_tfds("fashion_mnist", "test", data_dir=str(tfds_dir),
                         label_key="no_such_feature")
  assert not unlabelled.has_labels


def test_tfds_not_prepared_message(tmp_path):
  with pytest.raises(FileNotFoundError) as info:
    load_tfds("fashion_mnist", "train", data_dir=str(tmp_path))
  message = str(info.value)
  assert str(tmp_path) in message and "TFDS_DATA_DIR" in message
  assert "--config.data.download=True" in message


def test_tfds_download_prepares_array_record(tmp_path):
  source = load_tfds("ssljax_test_png_images", "train", data_dir=str(tmp_path),
                     download=True)
  np.testing.assert_array_equal(np.sort(source.images[:, 0, 0, 0]), [0, 10, 20])
  np.testing.assert_array_equal(source.labels, [-1, -1, -1])


@pytest.mark.skipif(sources._tensorflow_available(), reason="TensorFlow is installed")
def test_tfds_preparing_numpy_images_needs_tensorflow(tmp_path):
  with pytest.raises(RuntimeError, match="pip install tensorflow"):
    load_tfds("ssljax_test_numpy_images", "train", data_dir=str(tmp_path), download=True)


@pytest.mark.skipif(sources._tensorflow_available(), reason="TensorFlow is installed")
def test_tfds_tfrecord_needs_tensorflow(tfds_dir, tmp_path):
  version_dir = tmp_path / "fashion_mnist" / "3.0.1"
  shutil.copytree(tfds_dir / "fashion_mnist" / "3.0.1", version_dir)
  info_path = version_dir / "dataset_info.json"
  info = json.loads(info_path.read_text())
  info["fileFormat"] = "tfrecord"
  info_path.write_text(json.dumps(info))
  for path in version_dir.glob("*.array_record-*"):
    path.rename(str(path).replace(".array_record-", ".tfrecord-"))
  with pytest.raises(RuntimeError) as error:
    load_tfds("fashion_mnist", "train", data_dir=str(tmp_path))
  assert "pip install tensorflow" in str(error.value)
  assert "file_format='array_record'" in str(error.value)


def _mocked_examples(name: str, split: str) -> list[dict]:
  """The examples `tfds.testing.mock_data` serves for `name`, read through TFDS itself."""
  examples = tfds.data_source(name, split=split)
  return [examples[i] for i in range(len(examples))]


def test_tfds_under_mock_data():
  with tfds.testing.mock_data(num_examples=7):
    expected = _mocked_examples("fashion_mnist", "train")
    source = load_tfds("fashion_mnist", "train")
    # With download=True TFDS's (mocked) preparation runs first; the examples are the same.
    prepared = load_tfds("fashion_mnist", "train", data_dir="/nonexistent", download=True)
  assert source.images.shape == (7, 28, 28, 1) and source.images.dtype == np.uint8
  np.testing.assert_array_equal(source.images, np.stack([e["image"] for e in expected]))
  np.testing.assert_array_equal(source.labels, [e["label"] for e in expected])
  assert source.labels.dtype == np.int32 and source.has_labels
  assert source.images.std() > 0  # random images, not a blank default
  np.testing.assert_array_equal(prepared.images, source.images)
  np.testing.assert_array_equal(prepared.labels, source.labels)


def test_tfds_mock_data_policy_errors_are_reported_as_not_prepared():
  # USE_FILES needs the dataset's metadata files, which TFDS ships for few datasets.
  with tfds.testing.mock_data(policy=tfds.testing.MockPolicy.USE_FILES):
    with pytest.raises(FileNotFoundError, match="not prepared") as info:
      load_tfds("fashion_mnist", "train")
  assert "metadata" in str(info.value.__cause__)


def _readme_tfds_command() -> list[str]:
  """The argv of the README's `ssljax train ... --config.data.source=tfds` command."""
  argv = readme_command("train", containing="--config.data.source=tfds")
  return [os.path.join(REPO_ROOT, a) if a.startswith("configs/") else a for a in argv]


def test_readme_tfds_command_reads_mock_data(tmp_path):
  from ssljax import cli

  argv = _readme_tfds_command()
  argv = [a.replace("DATA_DIR", str(tmp_path)) for a in argv]
  assert argv[:2] == ["ssljax", "train"]
  config = cli._parse([argv[0]] + argv[2:], "train").config  # as cli.main() passes them
  assert (config.data.source, config.data.name) == ("tfds", "mnist")
  assert tuple(config.data.mean) == (0.1307,) and tuple(config.data.std) == (0.3081,)
  with tfds.testing.mock_data(num_examples=5):
    for split in (config.data.train_split, config.data.test_split):
      loaded = build_source(config.data, split)  # checks size, channels and classes
      assert loaded.image_shape == (28, 28, 1) and len(loaded) == 5


# ----------------------------------------------------------------------------- build_source


def _data_config(**overrides):
  data = default_config().data
  for key, value in overrides.items():
    data[key] = value
  return data


def test_build_source_dispatch(tmp_path, tfds_dir):
  (tmp_path / "idx").mkdir()
  _write_fashion_mnist(tmp_path / "idx")
  assert len(build_source(_data_config(data_dir=str(tmp_path / "idx")), "train")) == 6

  _write_cifar(tmp_path / "c", "cifar10")
  cifar = _data_config(source="cifar", name="cifar10", data_dir=str(tmp_path / "c"),
                       image_size=32, channels=3)
  assert build_source(cifar, "test").image_shape == (32, 32, 3)

  for split in ("train", "test"):
    _save_image(str(tmp_path / "f" / split / "a" / "0.png"), np.zeros((40, 30, 3), np.uint8))
    _save_image(str(tmp_path / "f" / split / "b" / "0.png"), np.zeros((28, 28, 3), np.uint8))
  folder = _data_config(source="image_folder", data_dir=str(tmp_path / "f"), channels=3)
  loaded = build_source(folder, "test")
  assert loaded.image_shape == (28, 28, 3)
  np.testing.assert_array_equal(loaded.labels, [0, 1])
  with pytest.raises(FileNotFoundError, match="<data_dir>/<split>"):
    build_source(folder, "validation")

  (tmp_path / "npz").mkdir()
  np.savez(tmp_path / "npz" / "train.npz", images=np.zeros((3, 28, 28, 1), np.uint8))
  arrays = _data_config(source="arrays", data_dir=str(tmp_path / "npz"))
  assert not build_source(arrays, "train").has_labels
  by_pattern = _data_config(source="arrays", data_dir=str(tmp_path / "npz" / "{split}.npz"))
  assert len(build_source(by_pattern, "train")) == 3

  tfds_config = _data_config(source="tfds", name="fashion_mnist", data_dir=str(tfds_dir))
  assert len(build_source(tfds_config, "test")) == 5


def test_build_source_errors(tmp_path):
  with pytest.raises(ValueError, match="fashion_mnist_idx, tfds, cifar, image_folder"):
    build_source(_data_config(source="mnist_csv"), "train")
  _write_fashion_mnist(tmp_path)
  with pytest.raises(ValueError) as info:
    build_source(_data_config(data_dir=str(tmp_path), image_size=32, channels=3), "train")
  message = str(info.value)
  assert "(28, 28, 1)" in message and "(32, 32, 3)" in message
  assert "data.image_size" in message and "data.channels" in message
  with pytest.raises(ValueError, match="data.num_classes"):
    build_source(_data_config(data_dir=str(tmp_path), num_classes=4), "train")


# ------------------------------------------------------------------- long-tailed subset


def _balanced(num_classes=10, per_class=50, seed=0):
  rng = np.random.default_rng(seed)
  labels = rng.permutation(np.repeat(np.arange(num_classes), per_class)).astype(np.int32)
  images = np.arange(len(labels), dtype=np.int64)[:, None, None, None] % 256
  images = np.broadcast_to(images, (len(labels), 2, 2, 1)).astype(np.uint8)
  return sources.ArraySource(np.ascontiguousarray(images), labels), labels


def test_long_tailed_subset_is_the_cifar_lt_construction():
  source, labels = _balanced()
  lt = sources.long_tailed_subset(source, ratio=10.0, num_classes=10)
  # n_c = int(50 * 10 ** (-c / 9)): 50, 38, 29, 23, 17, 13, 10, 7, 5, 5 (int() truncates).
  expected = [int(50 * 10.0 ** (-c / 9)) for c in range(10)]
  assert expected[0] == 50 and expected[-1] == 5
  np.testing.assert_array_equal(np.bincount(lt.labels, minlength=10), expected)
  # The LDAM code's selection: RandomState(0) shuffles each class's indices in label order.
  rs = np.random.RandomState(0)
  chosen = []
  for c, count in enumerate(expected):
    members = np.flatnonzero(labels == c)
    rs.shuffle(members)
    chosen.extend(members[:count])
  index = np.sort(chosen)
  np.testing.assert_array_equal(lt.labels, labels[index])
  np.testing.assert_array_equal(lt.images, source.images[index])
  again = sources.long_tailed_subset(source, ratio=10.0, num_classes=10)
  np.testing.assert_array_equal(again.images, lt.images)  # deterministic
  assert len(sources.long_tailed_subset(source, ratio=1.0, num_classes=10)) == len(source)


def test_long_tailed_subset_bad_inputs():
  source, _ = _balanced()
  with pytest.raises(ValueError, match="data.imbalance must be >= 1"):
    sources.long_tailed_subset(source, ratio=0.5, num_classes=10)
  unlabelled = sources.ArraySource(source.images, np.full(len(source), -1, np.int32))
  with pytest.raises(ValueError, match="labelled"):
    sources.long_tailed_subset(unlabelled, ratio=10.0, num_classes=10)
  # A class with fewer images than n_c keeps all it has (the LDAM code's slice).
  lopsided = sources.ArraySource(source.images, np.where(source.labels == 1, 0, source.labels)
                                 .astype(np.int32))
  counts = np.bincount(sources.long_tailed_subset(lopsided, ratio=10.0, num_classes=10).labels,
                       minlength=10)
  assert counts[0] == 50 and counts[1] == 0 and counts[2] == 29

def test_imbalance_option_changes_the_train_split_only(tmp_path):
  from tests.util import write_tiny_dataset
  write_tiny_dataset(str(tmp_path), num_train=400, num_test=40, num_classes=4)
  config = default_config("simclr")
  config.data.source, config.data.data_dir = "arrays", str(tmp_path)
  config.data.image_size, config.data.num_classes = 16, 4
  train, test = build_source(config.data, "train"), build_source(config.data, "test")
  config.data.imbalance = 4.0
  lt_train, lt_test = build_source(config.data, "train"), build_source(config.data, "test")
  np.testing.assert_array_equal(lt_test.labels, test.labels)
  counts = np.bincount(lt_train.labels, minlength=4)
  available = np.bincount(train.labels, minlength=4)
  np.testing.assert_array_equal(
      counts, [min(int(100 * 4.0 ** (-c / 3)), available[c]) for c in range(4)])
  assert len(lt_train) < len(train)
