"""Data sources: whole datasets held on the host as uint8 arrays.

Every loader returns an :class:`ArraySource`: images uint8 ``[N, H, W, C]`` with ``C`` in
{1, 3} and labels int32 ``[N]`` (-1 for an unlabelled example). Sources never augment;
augmentation runs later, on device, inside the compiled train step.

Loaders:
  load_fashion_mnist_idx  the four IDX files of Fashion-MNIST (gzipped or not)
  load_cifar              the CIFAR-10/100 "python version" archives, read without
                          executing pickled code
  load_image_folder       a class-per-subdirectory tree or a flat folder of image files
  load_arrays             an .npz file with ``images`` and optional ``labels``
  load_tfds               a TFDS dataset (array_record without TensorFlow; tfrecord with it)
  build_source            picks one of the above from the ``data`` config section, or a
                          streaming source (`ssljax.data.streaming`) that holds no pixels
"""

from __future__ import annotations

import dataclasses
import gzip
import importlib
import importlib.util
import io
import logging
import os
import pickle
import tarfile
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, BinaryIO

import ml_collections
import numpy as np

from ssljax.train.paths import check_bucket, check_reachable

if TYPE_CHECKING:
  from ssljax.data.streaming import StreamingSource

FASHION_MNIST_REPO = "https://github.com/zalandoresearch/fashion-mnist"
CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar.html"
IMAGE_EXTENSIONS = (
    ".bmp", ".gif", ".jpeg", ".jpg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")
SOURCE_NAMES = ("fashion_mnist_idx", "tfds", "cifar", "image_folder", "arrays", "tfds_stream",
                "folder_stream")


# ------------------------------------------------------------------------- ArraySource


@dataclasses.dataclass(frozen=True, eq=False)
class ArraySource:
  """A dataset held in host memory.

  Attributes:
    images: uint8 ``[N, H, W, C]`` with ``C`` in {1, 3}, pixel values in [0, 255].
    labels: int32 ``[N]``; class indices >= 0, or -1 for unlabelled examples.
  """

  images: np.ndarray
  labels: np.ndarray

  def __post_init__(self):
    images, labels = self.images, self.labels
    if not isinstance(images, np.ndarray):
      raise TypeError(
          f"images must be a numpy array, got {type(images).__name__}; "
          "convert with np.asarray(images).")
    if images.ndim != 4:
      hint = ""
      if images.ndim == 3:
        hint = (" Grayscale images must carry an explicit channel axis: give "
                "[N, H, W, 1], e.g. images[..., None].")
      raise ValueError(
          f"images must have shape [N, H, W, C], got rank {images.ndim} with shape "
          f"{images.shape}.{hint}")
    if images.dtype != np.uint8:
      raise ValueError(
          f"images must be uint8, got {images.dtype}; convert to uint8 with values "
          "in [0, 255] (for float images in [0, 1]: "
          "np.round(images * 255).clip(0, 255).astype(np.uint8)).")
    if images.shape[-1] not in (1, 3):
      raise ValueError(
          f"images must have 1 (grayscale) or 3 (RGB) channels in the last axis, got "
          f"shape {images.shape}; channels-first data must be transposed to [N, H, W, C] "
          "and RGBA converted to RGB.")
    if images.shape[0] == 0:
      raise ValueError("images is empty: a source needs at least one example.")
    if not isinstance(labels, np.ndarray) or labels.dtype != np.int32:
      dtype = getattr(labels, "dtype", type(labels).__name__)
      raise ValueError(
          f"labels must be an int32 numpy array, got {dtype}; convert with "
          "np.asarray(labels, dtype=np.int32) (use -1 for unlabelled examples).")
    if labels.shape != (images.shape[0],):
      raise ValueError(
          f"labels must have shape [N] = ({images.shape[0]},) to match images "
          f"{images.shape}, got {labels.shape}.")
    if labels.min() < -1:
      raise ValueError(
          f"labels must be class indices >= 0 or -1 (unlabelled), found {labels.min()}.")

  def __len__(self) -> int:
    return self.images.shape[0]

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of every image."""
    return tuple(self.images.shape[1:])

  @property
  def has_labels(self) -> bool:
    """True when every example has a class label (no -1 entries)."""
    return bool(self.labels.min() >= 0)

  def get(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    """Gathers examples by index.

    Args:
      indices: integer ``[B]`` indices into the dataset.

    Returns:
      ``{'image': uint8 [B, H, W, C], 'label': int32 [B]}`` (copies, in the order given).
    """
    indices = np.asarray(indices)
    return {"image": self.images[indices], "label": self.labels[indices]}


def _unlabelled(num_examples: int) -> np.ndarray:
  return np.full((num_examples,), -1, dtype=np.int32)


# ------------------------------------------------------------------------- IDX files

# IDX type codes (third byte of the magic number) -> big-endian numpy dtype.
_IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def _read_maybe_gzipped(path: str) -> bytes:
  """Returns the bytes of `path`, gunzipped when it starts with the gzip magic."""
  with open(path, "rb") as f:
    data = f.read()
  if data[:2] != b"\x1f\x8b":
    return data
  try:
    return gzip.decompress(data)
  except (OSError, EOFError) as e:
    raise ValueError(
        f"{path} looks gzipped but cannot be decompressed ({e}); the file is corrupt or "
        "truncated, download it again.") from e


def read_idx(path: str) -> np.ndarray:
  """Reads one IDX file (the MNIST/Fashion-MNIST container), gzipped or not.

  Format: a 4-byte magic ``00 00 <type> <ndim>``, then ``ndim`` big-endian uint32
  dimension sizes, then the row-major payload of that many elements.

  Returns:
    An array of the stored shape, in native byte order (uint8 for (Fashion-)MNIST).

  Raises:
    ValueError: on a bad magic number, an unknown type code, or a payload whose size does
      not match the header.
  """
  data = _read_maybe_gzipped(path)
  if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
    raise ValueError(
        f"{path} is not an IDX file: bad magic number {data[:4].hex() or '(empty)'} "
        "(expected 0000<type><ndim> with type in "
        f"{', '.join(f'{t:02x}' for t in _IDX_DTYPES)}). The file is corrupt or not "
        "the file named; download it again.")
  dtype, ndim = _IDX_DTYPES[data[2]], data[3]
  header_size = 4 + 4 * ndim
  if ndim == 0 or len(data) < header_size:
    raise ValueError(f"{path}: IDX header is truncated or declares {ndim} dimensions.")
  shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
  expected = int(np.prod(shape)) * dtype.itemsize
  if len(data) - header_size != expected:
    raise ValueError(
        f"{path}: the IDX header declares shape {shape} ({expected} payload bytes) but "
        f"the file holds {len(data) - header_size}; it is corrupt or truncated, download "
        "it again.")
  array = np.frombuffer(data, dtype, offset=header_size).reshape(shape)
  return array.astype(dtype.newbyteorder("="))


def _fashion_mnist_missing_message(directory: str, missing: list[str]) -> str:
  listing = "\n".join(f"  {p}[.gz]" for p in missing)
  return (
      f"Fashion-MNIST IDX files not found in {directory!r}. Missing:\n{listing}\n"
      "To get them, either\n"
      "  * on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist\n"
      "    (installs them to /usr/share/datasets/fashion-mnist, the default "
      "data.data_dir), or\n"
      "  * download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
      "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
      f"{FASHION_MNIST_REPO} (folder data/fashion) into a directory DIR and pass "
      "--config.data.data_dir=DIR.")


def load_fashion_mnist_idx(directory: str, split: str) -> ArraySource:
  """Loads Fashion-MNIST (or MNIST) from its IDX files.

  Reads ``{prefix}-images-idx3-ubyte`` and ``{prefix}-labels-idx1-ubyte``, each optionally
  with a ``.gz`` suffix, where ``prefix`` is ``train`` or ``t10k`` (for ``split='test'``).

  Args:
    directory: folder holding the files.
    split: ``'train'`` (60000 examples) or ``'test'`` (10000).

  Returns:
    images uint8 ``[N, 28, 28, 1]``, labels int32 ``[N]`` in [0, 10).

  Raises:
    FileNotFoundError: listing the missing files and how to obtain them.
    ValueError: on an unknown split or a corrupt file.
  """
  prefixes = {"train": "train", "test": "t10k"}
  if split not in prefixes:
    raise ValueError(
        f"Fashion-MNIST has splits 'train' and 'test', got {split!r}; set "
        "data.train_split / data.test_split accordingly.")
  paths, missing = {}, []
  for kind, stem in (("images", "images-idx3-ubyte"), ("labels", "labels-idx1-ubyte")):
    base = os.path.join(directory, f"{prefixes[split]}-{stem}")
    found = [p for p in (base + ".gz", base) if os.path.isfile(p)]
    if found:
      paths[kind] = found[0]
    else:
      missing.append(base)
  if missing:
    raise FileNotFoundError(_fashion_mnist_missing_message(directory, missing))
  images, labels = read_idx(paths["images"]), read_idx(paths["labels"])
  if images.ndim != 3 or images.dtype != np.uint8:
    raise ValueError(
        f"{paths['images']}: expected uint8 images [N, H, W], got {images.dtype} "
        f"{images.shape}; is it an images file?")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise ValueError(
        f"{paths['labels']}: expected {images.shape[0]} labels [N] to match "
        f"{paths['images']}, got shape {labels.shape}.")
  logging.info("Loaded Fashion-MNIST %s: %s from %s", split, images.shape, directory)
  return ArraySource(images[..., None], labels.astype(np.int32))


# ------------------------------------------------------------------------- CIFAR


def _numpy_reconstruct() -> Callable[..., np.ndarray]:
  try:
    multiarray = importlib.import_module("numpy._core.multiarray")  # numpy >= 2
  except ImportError:
    multiarray = importlib.import_module("numpy.core.multiarray")  # numpy 1.x
  return multiarray._reconstruct  # pylint: disable=protected-access


# The only globals a CIFAR pickle references: the three pieces numpy uses to rebuild a
# plain ndarray (written as `numpy.core.multiarray` by numpy 1.x, `numpy._core...` by 2.x).
# `_reconstruct(ndarray, shape, typecode)` allocates an empty array, `dtype(...)` a dtype;
# both then receive their contents through `__setstate__`, which runs no user code.
_ALLOWED_PICKLE_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct,
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
}


class ArrayOnlyUnpickler(pickle.Unpickler):
  """An unpickler that builds only builtin containers, scalars and plain numpy arrays.

  Any other global (functions, classes, ``os.system``, ``builtins.eval``, ...) is refused
  before it is looked up, so a malicious pickle cannot run code. Loads with
  ``encoding='bytes'`` like the official CIFAR loader, so Python 2 strings become bytes.
  """

  def __init__(self, file: BinaryIO, *, origin: str):
    super().__init__(file, encoding="bytes")
    self._origin = origin

  def find_class(self, module: str, name: str) -> Any:
    allowed = _ALLOWED_PICKLE_GLOBALS.get((module, name))
    if allowed is None:
      raise pickle.UnpicklingError(
          f"{self._origin}: refusing to load the global '{module}.{name}'; only plain "
          "numpy arrays, builtin containers and scalars are accepted. This file is not "
          "a genuine CIFAR batch (download it again from the official site).")
    return allowed()


@dataclasses.dataclass(frozen=True)
class _CifarLayout:
  folder: str  # Folder inside the official archive.
  archive: str  # File name of the official archive.
  files: Mapping[str, tuple[str, ...]]  # split -> batch files.
  label_key: str


_CIFAR_LAYOUTS = {
    "cifar10": _CifarLayout(
        folder="cifar-10-batches-py",
        archive="cifar-10-python.tar.gz",
        files={"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
               "test": ("test_batch",)},
        label_key="labels"),
    "cifar100": _CifarLayout(
        folder="cifar-100-python",
        archive="cifar-100-python.tar.gz",
        files={"train": ("train",), "test": ("test",)},
        label_key="fine_labels"),
}


def _lookup(batch: Mapping[Any, Any], key: str, origin: str) -> Any:
  """Reads `key` from a CIFAR dict whose keys are bytes (Python 2 pickles) or str."""
  for k in (key.encode(), key):
    if k in batch:
      return batch[k]
  raise ValueError(
      f"{origin}: no '{key}' entry (keys: {sorted(map(str, batch))}); not a CIFAR batch "
      "of the expected kind (check data.name: 'cifar10' vs 'cifar100').")


def _decode_cifar_batch(
    file: BinaryIO, origin: str, label_key: str) -> tuple[np.ndarray, np.ndarray]:
  batch = ArrayOnlyUnpickler(file, origin=origin).load()
  if not isinstance(batch, dict):
    raise ValueError(f"{origin}: expected a dict, got {type(batch).__name__}.")
  data = _lookup(batch, "data", origin)
  labels = np.asarray(_lookup(batch, label_key, origin))
  if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2
          and data.shape[1] == 3 * 32 * 32):
    raise ValueError(
        f"{origin}: 'data' must be uint8 [N, 3072], got "
        f"{getattr(data, 'dtype', type(data).__name__)} {getattr(data, 'shape', '')}.")
  if labels.shape != (data.shape[0],) or labels.dtype.kind not in "iu":
    raise ValueError(
        f"{origin}: '{label_key}' must hold {data.shape[0]} integers, got "
        f"{labels.dtype} {labels.shape}.")
  # Rows are channel-major (1024 R, then G, then B values, each row-major 32 x 32).
  images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
  return np.ascontiguousarray(images), labels.astype(np.int32)


def _cifar_missing_message(path: str, name: str, layout: _CifarLayout,
                           missing: Iterable[str]) -> str:
  return (
      f"{name} files not found at {path!r} (missing: {', '.join(missing)}). Pass as "
      f"data.data_dir either the extracted '{layout.folder}' folder, its parent, or the "
      f"'{layout.archive}' archive itself; the 'CIFAR python version' archive is at "
      f"{CIFAR_URL}.")


def load_cifar(directory: str, name: str, split: str) -> ArraySource:
  """Loads CIFAR-10 or CIFAR-100 from the official "python version" files.

  `directory` may be the extracted folder (``cifar-10-batches-py`` holding
  ``data_batch_1..5`` and ``test_batch``; ``cifar-100-python`` holding ``train`` and
  ``test``), a folder containing that folder or the official ``.tar.gz``, or the
  ``.tar.gz`` file itself (read in place, nothing is extracted). Batches are unpickled
  with :class:`ArrayOnlyUnpickler`, so no code stored in the files can run.

  Args:
    directory: see above.
    name: ``'cifar10'`` (labels from ``labels``) or ``'cifar100'`` (``fine_labels``).
    split: ``'train'`` (50000 examples) or ``'test'`` (10000).

  Returns:
    images uint8 ``[N, 32, 32, 3]`` (HWC, converted from the stored CHW rows), labels
    int32 ``[N]``.
  """
  if name not in _CIFAR_LAYOUTS:
    raise ValueError(
        f"Unknown CIFAR variant {name!r}; set data.name to one of "
        f"{sorted(_CIFAR_LAYOUTS)}.")
  layout = _CIFAR_LAYOUTS[name]
  if split not in layout.files:
    raise ValueError(
        f"{name} has splits {sorted(layout.files)}, got {split!r}; set "
        "data.train_split / data.test_split accordingly.")
  wanted = layout.files[split]
  if os.path.isdir(directory):
    for candidate in (directory, os.path.join(directory, layout.folder)):
      if all(os.path.isfile(os.path.join(candidate, f)) for f in wanted):
        parts = []
        for f in wanted:
          with open(os.path.join(candidate, f), "rb") as fh:
            parts.append(_decode_cifar_batch(fh, os.path.join(candidate, f),
                                             layout.label_key))
        return _concatenate_cifar(parts, name, split, candidate)
    archive = os.path.join(directory, layout.archive)
    if not os.path.isfile(archive):
      raise FileNotFoundError(_cifar_missing_message(directory, name, layout, wanted))
  elif os.path.isfile(directory):
    archive = directory
  else:
    raise FileNotFoundError(_cifar_missing_message(directory, name, layout, wanted))
  return _load_cifar_archive(archive, name, split, layout)


def _load_cifar_archive(archive: str, name: str, split: str,
                        layout: _CifarLayout) -> ArraySource:
  wanted = layout.files[split]
  try:
    tar = tarfile.open(archive, "r:*")
  except tarfile.TarError as e:
    raise ValueError(f"{archive} is not a readable tar archive ({e}).") from e
  with tar:
    members = {os.path.basename(m.name): m for m in tar.getmembers() if m.isfile()}
    missing = [f for f in wanted if f not in members]
    if missing:
      raise FileNotFoundError(_cifar_missing_message(archive, name, layout, missing))
    parts = []
    for f in wanted:
      with tar.extractfile(members[f]) as fh:
        parts.append(_decode_cifar_batch(io.BytesIO(fh.read()),
                                         f"{archive}:{members[f].name}", layout.label_key))
  return _concatenate_cifar(parts, name, split, archive)


def _concatenate_cifar(parts: list[tuple[np.ndarray, np.ndarray]], name: str, split: str,
                       origin: str) -> ArraySource:
  images = np.concatenate([p[0] for p in parts])
  labels = np.concatenate([p[1] for p in parts])
  logging.info("Loaded %s %s: %s from %s", name, split, images.shape, origin)
  return ArraySource(images, labels)


# ------------------------------------------------------------------------- image folder


def _list_images(directory: str) -> list[str]:
  """All image files under `directory` (recursively), sorted by path."""
  found = []
  for root, dirs, files in os.walk(directory):
    dirs.sort()
    found.extend(os.path.join(root, f) for f in sorted(files)
                 if f.lower().endswith(IMAGE_EXTENSIONS))
  return found


def list_image_folder(directory: str, *, labelled: bool = True,
                      fix: str = "move the images into class folders, or all class folders' "
                                 "images up for unlabelled data"
                      ) -> tuple[list[str], list[str], np.ndarray]:
  """The class folders, image files and labels of `directory`, without decoding an image.

  The one listing of an image folder: `load_image_folder` loads what it lists and
  `ssljax.data.folder.describe_image_folder` reads the headers of the same files, so a label
  is the same class folder's position in both.

  Args:
    directory: an existing folder.
    labelled: whether its subfolders name classes.
    fix: what the error for images mixed with class folders tells the user to do.

  Returns:
    ``(class_names, paths, labels)``: the subfolders of `directory` sorted by name (none
    when unlabelled), every image file (sorted by class, then by path; the
    whole tree when unlabelled) and int32 labels, the class folder's position in
    `class_names` (-1 for every image when unlabelled).

  Raises:
    ValueError: with ``labelled``, images at the top level next to class folders.
  """
  entries = sorted(os.listdir(directory))
  class_names = [e for e in entries if os.path.isdir(os.path.join(directory, e))]
  if not (labelled and class_names):
    paths = _list_images(directory)
    return [], paths, _unlabelled(len(paths))
  loose = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
  if loose:
    raise ValueError(f"{directory!r} mixes class folders ({', '.join(class_names[:3])}) with "
                     f"images at its top level (e.g. {loose[0]!r}); {fix}")
  paths, labels = [], []
  for label, class_name in enumerate(class_names):
    class_paths = _list_images(os.path.join(directory, class_name))
    paths.extend(class_paths)
    labels.extend([label] * len(class_paths))
  return class_names, paths, np.asarray(labels, dtype=np.int32)


def _decode_image(path: str, image_size: int | None, channels: int) -> np.ndarray:
  """The image at `path` as uint8 ``[s, s, channels]`` (resized and centre-cropped to s).

  Raises:
    OSError: naming `path`, when Pillow cannot read it (truncated or not an image).
  """
  try:
    return _decode_image_unchecked(path, image_size, channels)
  except OSError as e:  # Pillow's messages ("image file is truncated") omit the file
    raise OSError(f"{path}: cannot decode this image ({e}); the file is truncated or not an "
                  f"image. Replace or delete it.") from e


def _decode_image_unchecked(path: str, image_size: int | None, channels: int) -> np.ndarray:
  from PIL import Image  # Lazy: only this source needs Pillow.

  with Image.open(path) as img:
    return resize_centre_crop(img, image_size, channels)


def resize_centre_crop(img: Any, image_size: int | None, channels: int, *,
                       resize_side: int | None = None) -> np.ndarray:
  """A PIL image as uint8 ``[s, s, channels]``: shorter side resized (bilinear) to
  `resize_side` (default ``s = image_size``), then the centre ``s`` x ``s`` square (ImageNet's
  evaluation views are ``resize_side = 256`` for ``s = 224``); converted only when
  `image_size` is None."""
  from PIL import Image

  img = img.convert("L" if channels == 1 else "RGB")
  if image_size is not None:
    side = image_size if resize_side is None else resize_side
    if side < image_size:
      raise ValueError(f"resize_side {side} is below the crop size {image_size}")
    width, height = img.size
    scale = side / min(width, height)
    new_w = max(side, round(width * scale))
    new_h = max(side, round(height * scale))
    if (new_w, new_h) != (width, height):
      img = img.resize((new_w, new_h), Image.Resampling.BILINEAR)
    left, top = (new_w - image_size) // 2, (new_h - image_size) // 2
    img = img.crop((left, top, left + image_size, top + image_size))
  array = np.asarray(img, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


def load_image_folder(directory: str, *, image_size: int | None = None,
                      channels: int = 3, labelled: bool = True) -> ArraySource:
  """Loads every image file under `directory` into memory, decoded with Pillow.

  Layouts:
    * class per subdirectory (``directory/<class>/**/<file>``), with ``labelled=True``:
      label = index of the class folder in sorted order;
    * a flat folder of images (no subdirectories): unlabelled, labels -1;
    * ``labelled=False``: every image in the tree, labels -1.

  Args:
    directory: root folder.
    image_size: when given, each image is resized (bilinear) so that its shorter side is
      ``image_size`` and then center-cropped to ``image_size x image_size``; when None,
      all images must already have identical sizes.
    channels: 1 (decoded as grayscale) or 3 (RGB; alpha is dropped).
    labelled: whether subdirectories name classes.

  Returns:
    images uint8 ``[N, H, W, channels]`` (files sorted by path), labels int32 ``[N]``.
  """
  if channels not in (1, 3):
    raise ValueError(f"channels must be 1 or 3, got {channels}.")
  if not os.path.isdir(directory):
    raise FileNotFoundError(f"Image folder {directory!r} does not exist.")
  class_names, paths, label_array = list_image_folder(
      directory, labelled=labelled,
      fix="move those into a class folder, or pass labelled=False to ignore the class structure")
  if not paths:
    raise FileNotFoundError(
        f"No image files ({', '.join(IMAGE_EXTENSIONS)}) found under {directory!r}.")
  images = [_decode_image(paths[0], image_size, channels)]
  for path in paths[1:]:
    image = _decode_image(path, image_size, channels)
    if image.shape != images[0].shape:
      raise ValueError(
          f"{path} has size {image.shape[1]}x{image.shape[0]} (WxH) but {paths[0]} has "
          f"{images[0].shape[1]}x{images[0].shape[0]}; images of different sizes need "
          "image_size=S (resize the shorter side to S, then center-crop S x S).")
    images.append(image)
  logging.info("Loaded %d images (%d classes) from %s", len(paths), len(class_names),
               directory)
  return ArraySource(np.stack(images), label_array)


# ------------------------------------------------------------------------- arrays


def load_arrays(path: str) -> ArraySource:
  """Loads an ``.npz`` file holding ``images`` (uint8 ``[N, H, W, C]``) and optionally
  ``labels`` (integers ``[N]``; missing means unlabelled, -1). Pickled objects are refused.
  """
  with np.load(path, allow_pickle=False) as npz:
    if "images" not in npz.files:
      raise ValueError(
          f"{path} has no 'images' array (found: {npz.files}); save with "
          "np.savez(path, images=..., labels=...).")
    images = npz["images"]
    labels = npz["labels"] if "labels" in npz.files else None
  if labels is None:
    labels = _unlabelled(images.shape[0] if images.ndim else 0)
  elif labels.dtype.kind not in "iu":
    raise ValueError(f"{path}: 'labels' must be integers, got {labels.dtype}.")
  logging.info("Loaded arrays %s from %s", images.shape, path)
  return ArraySource(images, labels.astype(np.int32))


# ------------------------------------------------------------------------- TFDS


def _tensorflow_available() -> bool:
  return importlib.util.find_spec("tensorflow") is not None


def _caused_by_missing_tensorflow(error: BaseException | None) -> bool:
  """Whether `error`, or an exception it was raised from, failed to import TensorFlow."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, ModuleNotFoundError) and error.name == "tensorflow":
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False


def load_tfds(name: str, split: str, *, data_dir: str | None = None,
              download: bool = False, image_key: str = "image",
              label_key: str = "label") -> ArraySource:
  """Loads a TFDS split into memory.

  A split prepared in the ``array_record`` format is read through TFDS's random-access
  data source, which needs no TensorFlow (images are decoded with Pillow). A split
  prepared as ``tfrecord`` (the TFDS default) is read with ``tf.data`` and therefore
  needs TensorFlow. With ``download=True`` a missing dataset is downloaded and prepared
  as array_record; TFDS encodes numpy images with TensorFlow while preparing, so for most
  image datasets preparation itself needs TensorFlow.

  The whole split is materialised, which suits Fashion-MNIST/CIFAR/STL-sized data;
  ImageNet-scale data needs a streaming source instead.

  Args:
    name: TFDS name, optionally with config/version (``'cifar10'``, ``'mnist:3.*.*'``).
    split: TFDS split expression (``'train'``, ``'test[:10%]'``).
    data_dir: TFDS data directory; None uses ``TFDS_DATA_DIR`` or ~/tensorflow_datasets.
    download: allow downloading and preparing when the dataset is not prepared.
    image_key: feature holding ``[H, W, C]`` uint8 images.
    label_key: feature holding the class label; when absent, labels are -1.

  Returns:
    images uint8 ``[N, H, W, C]``, labels int32 ``[N]``.

  Raises:
    BucketPathError: a bucket data_dir without its filesystem package, or one that does not
      answer within ``$SSLJAX_BUCKET_TIMEOUT`` seconds (`ssljax.train.paths.check_reachable`).
  """
  import tensorflow_datasets as tfds  # Lazy: heavy import, only this source needs it.

  if data_dir:  # a bucket: its package, then an answer within the deadline
    check_bucket(data_dir, "data.data_dir")
    check_reachable(data_dir, "data.data_dir")
  builder = tfds.builder(name, data_dir=data_dir)
  unprepared_source = None
  if not builder.is_prepared():
    if download:
      builder = _prepare_array_record(tfds, name, data_dir)
    else:
      unprepared_source = _unprepared_data_source(builder, name, split, data_dir)
  features = builder.info.features
  if image_key not in features:
    raise ValueError(
        f"TFDS dataset {name!r} has no feature {image_key!r} (features: "
        f"{sorted(features)}).")
  has_label = label_key in features
  random_access = {f.value for f in tfds.core.FileFormat.with_random_access()}
  formats = {f.value for f in builder.info.available_file_formats()}
  if unprepared_source is not None or formats & random_access:
    examples = (unprepared_source if unprepared_source is not None
                else builder.as_data_source(split=split))
    images, labels = _materialise_data_source(examples, name, image_key,
                                              label_key if has_label else None)
  else:
    if not _tensorflow_available():
      raise RuntimeError(
          f"TFDS dataset {name!r} in {builder.data_dir!r} is stored as "
          f"{' / '.join(sorted(formats))}, which can only be read with TensorFlow, and "
          "TensorFlow is not installed. Either pip install tensorflow, or re-prepare the "
          "dataset in the random-access format: "
          f"tfds.builder({name!r}, data_dir=..., file_format='array_record')"
          ".download_and_prepare().")
    arrays = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    images = np.asarray(arrays[image_key])
    labels = np.asarray(arrays[label_key]) if has_label else None
  if labels is None:
    labels = _unlabelled(images.shape[0])
  logging.info("Loaded TFDS %s[%s]: %s from %s", name, split, images.shape,
               builder.data_dir)
  return ArraySource(images, labels.astype(np.int32))


def _prepare_array_record(tfds: Any, name: str, data_dir: str | None) -> Any:
  """Downloads and prepares `name` in the array_record format; returns its builder."""
  builder = tfds.builder(name, data_dir=data_dir, file_format="array_record")
  try:
    builder.download_and_prepare()
  except Exception as e:
    if not _caused_by_missing_tensorflow(e):
      raise
    raise RuntimeError(
        f"Preparing TFDS dataset {name!r} needs TensorFlow, which is not installed: "
        "TFDS encodes the images with it while writing most datasets. Install it "
        "(pip install tensorflow), prepare the dataset once elsewhere with "
        "file_format='array_record' and point data.data_dir at it, or use a local "
        "source (data.source='fashion_mnist_idx' or 'cifar' with the raw files).") from e
  return builder


def _unprepared_data_source(builder: Any, name: str, split: str,
                            data_dir: str | None) -> Any:
  """The random-access source TFDS serves for a builder whose data_dir holds no prepared data.

  On disk that fails, and the error says where to point ``data.data_dir``. It succeeds when
  TFDS serves the examples from elsewhere: under ``tfds.testing.mock_data`` every builder's
  data_dir is replaced by one that does not exist (so ``is_prepared()`` is False) and random
  examples are generated from the dataset's features.
  """
  try:
    return builder.as_data_source(split=split)
  except Exception as e:  # TFDS raises NotImplementedError, KeyError or ValueError here.
    raise FileNotFoundError(
        f"TFDS dataset {name!r} is not prepared: looked in {builder.data_dir!r} "
        f"(data_dir={data_dir!r}; None means $TFDS_DATA_DIR or ~/tensorflow_datasets). "
        "Point --config.data.data_dir (or TFDS_DATA_DIR) at the directory holding the "
        "prepared dataset, or allow preparing it with --config.data.download=True.") from e


def _read_examples(examples: Any, keys: list[int]) -> list[Any]:
  """``examples[k]`` for every k of `keys`, in one batched read where the source allows it.

  ``tfds.testing.mock_data`` (TFDS 4.9.10) installs a batched read that fails with a
  TypeError (it is stored unbound on the mocked source); one read per key works there.
  """
  try:
    return examples.__getitems__(keys)
  except TypeError:
    return [examples[k] for k in keys]


def _materialise_data_source(examples: Any, name: str, image_key: str,
                             label_key: str | None,
                             chunk: int = 1024) -> tuple[np.ndarray, np.ndarray | None]:
  """Reads a TFDS random-access source into ``(images [N, H, W, C], labels [N] | None)``."""
  num = len(examples)
  if num == 0:
    raise ValueError(f"TFDS dataset {name!r}: the requested split is empty.")
  images, labels = None, np.zeros((num,), np.int64)
  for start in range(0, num, chunk):
    keys = list(range(start, min(start + chunk, num)))
    for i, example in zip(keys, _read_examples(examples, keys)):
      image = np.asarray(example[image_key])
      if images is None:
        images = np.empty((num, *image.shape), image.dtype)
      if image.shape != images.shape[1:]:
        raise ValueError(
            f"TFDS dataset {name!r}: example {i} has image shape {image.shape}, example 0 "
            f"has {images.shape[1:]}; variable-size datasets need a streaming source "
            "with host-side cropping: --config.data.source=tfds_stream (or folder_stream "
            "for a folder of JPEGs).")
      images[i] = image
      if label_key is not None:
        labels[i] = example[label_key]
  return images, labels if label_key is not None else None


# ------------------------------------------------------------------------- from config


def _arrays_path(data_dir: str, split: str) -> str:
  """``<dir>/<split>.npz`` for a directory, ``path.format(split=split)`` otherwise."""
  if os.path.isdir(data_dir):
    return os.path.join(data_dir, f"{split}.npz")
  if "{split}" in data_dir:
    return data_dir.format(split=split)
  logging.warning("data.data_dir %s is a single .npz file: it is used for split %r "
                  "(and every other split).", data_dir, split)
  return data_dir


def long_tailed_subset(source: ArraySource, *, ratio: float, num_classes: int,
                       seed: int = 0) -> ArraySource:
  """An exponentially imbalanced subset of a labelled source: the CIFAR-10-LT construction.

  Cui et al. 2019 / Cao et al. 2019 (LDAM-DRW ``imbalance_cifar.py``
  ``IMBALANCECIFAR10.gen_imbalanced_data``), used for CLD's long-tailed experiments (CLD
  paper Sec. 4): with ``n_max = len(source) / num_classes`` (the per-class count of a
  balanced set), class c keeps

      n_c = int(n_max * ratio ** (-c / (num_classes - 1))),   c = 0 .. num_classes - 1,

  so class 0 keeps n_max images and the last class n_max / ratio (ratio = largest / smallest
  class, 100 for CIFAR-10-LT: 5000 ... 50 images). The images kept are the first n_c of the
  class's indices after a shuffle by ``np.random.RandomState(seed)``, class after class in
  label order (the LDAM code's ``np.random.seed(0)`` + ``np.random.shuffle``), so the subset
  is deterministic. A class with fewer than n_c images keeps all of them (the LDAM code's
  slice; CIFAR and Fashion-MNIST are balanced, so it does not arise there). The kept examples
  are returned in their original dataset order.

  Raises:
    ValueError: ratio < 1, fewer than 2 classes, or unlabelled examples.
  """
  if ratio < 1.0:
    raise ValueError(f"data.imbalance must be >= 1 (largest / smallest class), got {ratio}")
  if num_classes < 2:
    raise ValueError(f"a long-tailed split needs >= 2 classes, got data.num_classes = "
                     f"{num_classes}")
  if not source.has_labels:
    raise ValueError("data.imbalance needs a labelled train split (every label >= 0)")
  n_max = len(source) / num_classes
  rng = np.random.RandomState(seed)
  keep = []
  for c in range(num_classes):
    count = int(n_max * ratio ** (-c / (num_classes - 1.0)))
    members = np.flatnonzero(source.labels == c)
    rng.shuffle(members)
    keep.append(members[:count])
  index = np.sort(np.concatenate(keep))
  return ArraySource(source.images[index], source.labels[index])


def build_source(data_config: ml_collections.ConfigDict,
                 split: str) -> ArraySource | StreamingSource:
  """Loads split `split` as configured by the ``data`` config section.

  Dispatches on ``data.source``:
    'fashion_mnist_idx'  IDX files in ``data.data_dir``
    'tfds'               ``data.name`` from ``data.data_dir`` (``data.download`` allowed)
    'cifar'              ``data.name`` in {'cifar10', 'cifar100'} at ``data.data_dir``
    'image_folder'       ``<data.data_dir>/<split>/``, resized + center-cropped to
                         ``data.image_size``, decoded with ``data.channels`` channels
    'arrays'             ``<data.data_dir>/<split>.npz``, or ``data.data_dir`` as a file
                         path (``{split}`` in it is replaced by the split)
    'tfds_stream'        a `StreamingSource` (`ssljax.data.streaming.build_streaming_source`):
    'folder_stream'      examples read and pre-cropped per batch, never loaded whole; it
                         checks its own split and classes and is returned as it is

  Then checks the images against ``(data.image_size, data.image_size, data.channels)``
  and the labels against ``data.num_classes``. With ``data.imbalance`` > 0 the train split
  (``data.train_split``: pretraining, the kNN bank and the linear probe's training set) is
  replaced by its long-tailed subset (`long_tailed_subset`, ratio = ``data.imbalance``); the
  test split stays balanced.
  """
  data = data_config
  source = data.source
  if source in ("tfds_stream", "folder_stream"):
    from ssljax.data.streaming import build_streaming_source  # it imports this module
    return build_streaming_source(data, split)
  if source == "fashion_mnist_idx":
    loaded = load_fashion_mnist_idx(data.data_dir, split)
  elif source == "tfds":
    loaded = load_tfds(data.name, split, data_dir=data.data_dir or None,
                       download=data.download)
  elif source == "cifar":
    loaded = load_cifar(data.data_dir, data.name, split)
  elif source == "image_folder":
    folder = os.path.join(data.data_dir, split)
    if not os.path.isdir(folder):
      raise FileNotFoundError(
          f"data.source='image_folder' reads split {split!r} from {folder!r}, which does "
          "not exist; lay the data out as <data_dir>/<split>/<class>/<image> (or "
          "<data_dir>/<split>/<image> for unlabelled data).")
    loaded = load_image_folder(folder, image_size=data.image_size,
                               channels=data.channels)
  elif source == "arrays":
    loaded = load_arrays(_arrays_path(data.data_dir, split))
  else:
    raise ValueError(
        f"Unknown data.source {source!r}; valid sources: {', '.join(SOURCE_NAMES)}.")

  expected = (data.image_size, data.image_size, data.channels)
  if loaded.image_shape != expected:
    raise ValueError(
        f"The {source} split {split!r} has images of shape {loaded.image_shape} (H, W, C) "
        f"but the config expects {expected} from (data.image_size, data.image_size, "
        f"data.channels); set --config.data.image_size={loaded.image_shape[0]} and "
        f"--config.data.channels={loaded.image_shape[2]} (square images only), or "
        "change the data.")
  max_label = int(loaded.labels.max())
  if max_label >= data.num_classes:
    raise ValueError(
        f"The {source} split {split!r} has label {max_label} but data.num_classes is "
        f"{data.num_classes}; set --config.data.num_classes={max_label + 1}.")
  imbalance = data.get("imbalance", 0.0)
  if imbalance and split == data.train_split:
    loaded = long_tailed_subset(loaded, ratio=imbalance, num_classes=data.num_classes)
  return loaded
