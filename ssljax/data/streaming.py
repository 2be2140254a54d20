"""Streaming input for ImageNet-scale data: records read, decoded and pre-cropped on demand.

The in-memory sources (`ssljax.data.sources`) hold a whole split as one uint8 array, which
ImageNet (1.28M images of varying size) cannot afford on a host. A `StreamingSource` holds only
the index of a split: file paths and labels for an image folder, or a TFDS random-access
``data_source`` (ArrayRecord) for a prepared TFDS dataset such as ``imagenet2012``. Each example
is read and decoded when a batch needs it and pre-cropped on the host to
``data.image_size`` x ``data.image_size`` uint8, so every batch has one shape and the device
augmentation inside the compiled step is unchanged (DESIGN.md, principle 2).

Why grain rather than a hand-written loader: `StreamingLoader` is a ``grain.MapDataset`` whose
element ``s`` is this host's rows of global batch ``s``; grain supplies the parts that are easy
to get subtly wrong by hand:

  * read threads (``grain.ReadOptions``) and worker processes (``IterDataset.mp_prefetch``)
    that decode ahead of the train step without the GIL serialising them, while returning the
    elements in index order, so the batches do not depend on the worker or thread count;
  * a random-access, deterministic view of TFDS ArrayRecord files (``tfds.data_source`` is
    written for grain) that reads any record without scanning a shard;
  * iterators with explicit checkpointable state and clean shutdown of workers.

tf.data through TFDS would need TensorFlow on every host (ssljax does not otherwise depend on
it) and its deterministic, resumable order costs a checkpoint of the iterator. grain is a
regular dependency rather than an extra: it adds only small pure-Python packages next to
ArrayRecord, which TFDS already requires, and has wheels for CPython 3.11-3.14 on Linux and
macOS, so an optional extra would only add an install step and an error path.

Order, sharding and position. The order is `ssljax.data.pipeline`'s: global batch ``s`` is slice
``s % steps_per_epoch`` of the permutation of epoch ``s // steps_per_epoch`` seeded by
``(seed, epoch)``, and host ``p`` of ``P`` reads only rows ``[p * n, (p + 1) * n)`` of it
(``n = global_batch / P``), as `HostLoader` does. This plays the role of
``grain.sharding.ShardByJaxProcess``: the hosts read disjoint records that together cover the
epoch, but the global batch stays a function of ``(seed, step)`` alone, so a run resumed on a
pod of another size, or the one- and two-process runs of the multi-host test, see the same
data. Because element ``s`` of the grain dataset is a pure function of ``(seed, s, p, P)``, the
grain iterator's position *is* the step: a loader built with ``start_step = s`` (the
``position`` every checkpoint's meta already stores) yields exactly the batches an
uninterrupted run yields from ``s`` on, and no grain iterator state needs saving.

Pre-crop. Example ``i`` of epoch ``e`` gets a random-resized-crop box drawn by
``np.random.default_rng((seed, e, i, 1))`` with the procedure of torchvision's
``RandomResizedCrop.get_params`` (ten tries of an area fraction uniform in
``data.precrop_scale`` and a log-uniform aspect ratio in ``data.precrop_ratio``; if none fits,
the largest centre crop whose aspect is clamped to that range), cropped and resized with
Pillow's bilinear filter to ``data.image_size``. The default ``precrop_scale = (1.0, 1.0)``
keeps the whole image (the fallback box, which is the whole image whenever its aspect lies in
``precrop_ratio``): an area fraction the device's crop takes of the pre-crop is then the same
fraction of the original image, so a method's crop-scale range means what its paper says; a
smaller lower bound adds host-side randomness at the cost of compounding with the device crop.
Evaluation images (`StreamingSource.get`) are resized so the shorter side is
``data.image_size`` and centre-cropped, as the in-memory image folder source does.
"""

from __future__ import annotations

import concurrent.futures
import logging
import math
import os
import threading
from collections.abc import Sequence
from typing import Any

import ml_collections
import numpy as np

from ssljax.data.sources import (IMAGE_EXTENSIONS, _read_examples, _unprepared_data_source,
                                 list_image_folder, resize_centre_crop)
from ssljax.train.paths import BucketPathError, check_bucket, check_reachable, is_local

log = logging.getLogger(__name__)

STREAMING_SOURCES = ("tfds_stream", "folder_stream")
# Stream tag appended to the pre-crop seed, so its draws never coincide with the epoch
# permutation's ``default_rng((seed, epoch))``.
_PRECROP_STREAM = 1


# ------------------------------------------------------------------------- pre-crop


def precrop_box(width: int, height: int, rng: np.random.Generator, *,
                scale: tuple[float, float], ratio: tuple[float, float]
                ) -> tuple[int, int, int, int]:
  """A random-resized-crop box ``(left, top, box_width, box_height)`` inside the image.

  torchvision's ``RandomResizedCrop.get_params``: up to ten tries of an area
  ``A * U(scale)`` and an aspect ratio ``exp(U(log ratio))``; the first box of
  ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))`` that fits is placed uniformly.
  Otherwise the centre crop of the whole image with its aspect clamped to `ratio`.
  """
  area = width * height
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  for _ in range(10):
    target = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target * aspect)))
    h = int(round(math.sqrt(target / aspect)))
    if 0 < w <= width and 0 < h <= height:
      left = int(rng.integers(0, width - w + 1))
      top = int(rng.integers(0, height - h + 1))
      return left, top, w, h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  return (width - w) // 2, (height - h) // 2, w, h


def precrop(image: Any, box: tuple[int, int, int, int], size: int, channels: int) -> np.ndarray:
  """Crops `box` of a PIL image and resizes it (bilinear) to uint8 ``[size, size, channels]``."""
  from PIL import Image  # Lazy: only image sources need Pillow.

  image = image.convert("L" if channels == 1 else "RGB")
  left, top, w, h = box
  image = image.resize((size, size), Image.Resampling.BILINEAR,
                       box=(left, top, left + w, top + h))
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if channels == 1 else array


# ------------------------------------------------------------------------- records


class FolderRecords:
  """The image files of a class-per-subfolder tree, opened one at a time.

  The listing and labels are `ssljax.data.sources.list_image_folder`'s, so a label is the
  same class folder's position as for the in-memory ``image_folder`` source.
  """

  def __init__(self, directory: str, *, labelled: bool = True):
    self.directory = directory
    self.class_names, paths, self.labels = list_image_folder(
        directory, labelled=labelled,
        fix="move those into a class folder (ImageNet's layout is DIR/train/<wnid>/*.JPEG)")
    self.paths = tuple(paths)

  def __len__(self) -> int:
    return len(self.paths)

  def read(self, indices: Sequence[int]) -> list[tuple[Any, int]]:
    """``(PIL image, label)`` of each index (the pixels are decoded on first use)."""
    from PIL import Image

    out = []
    for i in indices:
      try:
        image = Image.open(self.paths[i])
        image.load()
      except OSError as e:
        raise OSError(f"{self.paths[i]}: cannot decode this image ({e}); the file is truncated "
                      f"or not an image. Replace or delete it.") from e
      out.append((image, int(self.labels[i])))
    return out


class TfdsRecords:
  """The examples of a TFDS random-access ``data_source`` (ArrayRecord), read on demand."""

  def __init__(self, data_source: Any, *, name: str, image_key: str = "image",
               label_key: str | None = "label"):
    self.data_source = data_source
    self.name = name
    self.image_key = image_key
    self.label_key = label_key

  def __len__(self) -> int:
    return len(self.data_source)

  def read(self, indices: Sequence[int]) -> list[tuple[Any, int]]:
    from PIL import Image

    out = []
    for index, example in zip(indices, _read_examples(self.data_source, list(indices))):
      image = np.asarray(example[self.image_key])
      if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
      if image.dtype != np.uint8 or image.ndim not in (2, 3):
        raise ValueError(f"TFDS dataset {self.name!r}: example {index} has image "
                         f"{image.dtype} {image.shape}; a streaming source needs uint8 "
                         f"[H, W] or [H, W, C] images")
      label = int(example[self.label_key]) if self.label_key is not None else -1
      out.append((Image.fromarray(image), label))
    return out


# ------------------------------------------------------------------------- source


class StreamingSource:
  """A split that is read, decoded and cropped per example; never held in memory.

  Attributes:
    records: `FolderRecords` or `TfdsRecords`.
    image_size: side of every delivered image (``data.image_size``).
    channels: 1 or 3.
    scale, ratio: the pre-crop box's area-fraction and aspect ranges.
    num_classes: labels lie in ``[0, num_classes)``; 0 when unlabelled.
    eval_threads: threads that read and decode the evaluation views of `get` (the training
      batches are decoded by the loader's own grain threads and workers).
  """

  def __init__(self, records: FolderRecords | TfdsRecords, *, image_size: int, channels: int,
               scale: tuple[float, float] = (1.0, 1.0),
               ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0), num_classes: int = 0,
               eval_threads: int = 1):
    if len(records) == 0:
      raise ValueError("the streaming source's split holds no examples.")
    if not isinstance(image_size, int) or image_size < 1:
      raise ValueError(f"data.image_size = {image_size!r} must be an integer >= 1 (the side "
                       f"of the pre-crop the host delivers)")
    if channels not in (1, 3):
      raise ValueError(f"data.channels = {channels!r} must be 1 or 3")
    scale, ratio = tuple(float(v) for v in scale), tuple(float(v) for v in ratio)
    if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
      raise ValueError(f"data.precrop_scale = {scale} must be (min, max) area fractions with "
                       f"0 < min <= max <= 1; e.g. --config.data.precrop_scale=\"(1.0, 1.0)\"")
    if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
      raise ValueError(f"data.precrop_ratio = {ratio} must be (min, max) aspect ratios with "
                       f"0 < min <= max; e.g. --config.data.precrop_ratio=\"(0.75, 1.3333)\"")
    if not isinstance(eval_threads, int) or eval_threads < 1:
      raise ValueError(f"data.stream_threads = {eval_threads!r} must be an integer >= 1")
    self.records = records
    self.eval_threads = eval_threads
    self.image_size = image_size
    self.channels = channels
    self.scale, self.ratio = scale, ratio
    self.num_classes = num_classes

  def __len__(self) -> int:
    return len(self.records)

  @property
  def image_shape(self) -> tuple[int, int, int]:
    """``(H, W, C)`` of every delivered image."""
    return (self.image_size, self.image_size, self.channels)

  @property
  def has_labels(self) -> bool:
    """True when every example has a class label (a labelled folder, a TFDS label feature)."""
    if isinstance(self.records, FolderRecords):
      return bool(self.records.labels.min() >= 0)
    return self.records.label_key is not None

  def train_examples(self, indices: np.ndarray, *, seed: int,
                     epoch: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-cropped examples: uint8 ``[B, S, S, C]`` and int32 labels ``[B]``.

    Example ``i``'s box is drawn by ``default_rng((seed, epoch, i, 1))``, so it depends on
    nothing but the example, the epoch and the seed.
    """
    images = np.empty((len(indices), *self.image_shape), np.uint8)
    labels = np.empty((len(indices),), np.int32)
    for row, (index, (image, label)) in enumerate(
        zip(indices, self.records.read([int(i) for i in indices]))):
      rng = np.random.default_rng((seed, epoch, int(index), _PRECROP_STREAM))
      box = precrop_box(*image.size, rng, scale=self.scale, ratio=self.ratio)
      images[row] = precrop(image, box, self.image_size, self.channels)
      labels[row] = label
    return images, labels

  def get(self, indices: np.ndarray, *, resize_side: int | None = None
          ) -> dict[str, np.ndarray]:
    """Evaluation views: shorter side resized to `resize_side` (default ``image_size``), then
    the centre ``image_size`` square.

    Returns:
      ``{'image': uint8 [B, S, S, C], 'label': int32 [B]}`` in the order given.
    """
    indices = [int(i) for i in np.asarray(indices).reshape(-1)]
    images = np.empty((len(indices), *self.image_shape), np.uint8)
    labels = np.empty((len(indices),), np.int32)

    def decode(rows: range) -> None:
      for row, (image, label) in zip(rows, self.records.read([indices[r] for r in rows])):
        images[row] = resize_centre_crop(image, self.image_size, self.channels,
                                         resize_side=resize_side)
        labels[row] = label

    threads = min(self.eval_threads, len(indices))
    if threads <= 1:
      decode(range(len(indices)))
    else:  # PIL's decode and resize release the GIL; each thread fills its own rows
      bounds = np.linspace(0, len(indices), threads + 1).astype(int)
      with concurrent.futures.ThreadPoolExecutor(threads) as pool:
        for done in [pool.submit(decode, range(lo, hi)) for lo, hi in zip(bounds, bounds[1:])]:
          done.result()
    return {"image": images, "label": labels}


# ------------------------------------------------------------------------- loader


class _HostBatch:
  """Maps a step to this host's rows of that global batch (the grain map function).

  Picklable for grain's worker processes; each process keeps its own cached permutation,
  guarded by a lock because grain's read threads call it concurrently.
  """

  def __init__(self, source: StreamingSource, *, global_batch: int, seed: int, rows: slice):
    self.source, self.global_batch, self.seed, self.rows = source, global_batch, seed, rows
    self.steps_per_epoch = len(source) // global_batch
    self._lock = threading.Lock()
    self._cached: tuple[int, np.ndarray] | None = None

  def __getstate__(self) -> dict[str, Any]:
    state = dict(self.__dict__)
    state["_lock"], state["_cached"] = None, None
    return state

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.__dict__.update(state)
    self._lock = threading.Lock()

  def _permutation(self, epoch: int) -> np.ndarray:
    with self._lock:
      if self._cached is None or self._cached[0] != epoch:
        self._cached = (epoch, np.random.default_rng((self.seed, epoch)).permutation(
            len(self.source)))
      return self._cached[1]

  def __call__(self, step: int) -> dict[str, Any]:
    epoch, offset = divmod(int(step), self.steps_per_epoch)
    start = offset * self.global_batch
    indices = self._permutation(epoch)[start:start + self.global_batch][self.rows]
    images, labels = self.source.train_examples(indices, seed=self.seed, epoch=epoch)
    return {"image": images, "label": labels, "index": indices.astype(np.int32),
            "step": int(step)}


def _import_grain() -> Any:
  try:
    import grain  # Lazy: only streaming sources need it.
  except ImportError as e:
    raise ImportError("streaming sources (data.source='tfds_stream' / 'folder_stream') need "
                      "grain; pip install 'grain>=0.2.15,<0.3' (a dependency of ssljax: "
                      "reinstall with pip install -e .)") from e
  return grain


def _allow_grain_flags() -> None:
  """Lets grain read its absl flags' defaults when nothing parsed the global flags.

  grain's worker processes read ``--grain_*`` flags from ``absl.flags.FLAGS``, which raises
  when they were never parsed; ``ssljax train`` parses its own `FlagValues`, and tests or
  notebooks none. Marking the global flags parsed keeps every default (and a later parse of
  ``sys.argv`` still works).
  """
  from absl import flags

  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


class StreamingLoader:
  """`HostLoader`'s interface over a grain pipeline of pre-cropped host batches.

  Each item is a dict:
    image  uint8 ``[global_batch // process_count, S, S, C]``
    label  int32 ``[global_batch // process_count]``
    index  int32 dataset indices of the rows
    step   int, the global batch number

  Steps run from `start_step` to `end_step` (None: without end). Batches equal `HostLoader`'s
  indices over the same source for every `workers` and `threads` (see the module docstring).

  Args:
    workers: grain worker processes decoding whole batches (``mp_prefetch``); 0 decodes in
      this process's read threads only.
    threads: grain read threads (per worker process, or in this process when ``workers=0``).
    prefetch: batches buffered ahead (per worker with workers; at least `threads` otherwise).
  """

  def __init__(self, source: StreamingSource, *, global_batch: int, seed: int,
               start_step: int = 0, end_step: int | None = None, process_index: int = 0,
               process_count: int = 1, workers: int = 0, threads: int = 2, prefetch: int = 2):
    grain = _import_grain()
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(
          f"Need 0 <= process_index < process_count, got process_index={process_index}, "
          f"process_count={process_count}.")
    if global_batch % process_count:
      raise ValueError(
          f"The global batch ({global_batch}) must split evenly over the "
          f"{process_count} hosts; choose train.batch_size divisible by {process_count}.")
    if global_batch < 1 or global_batch > len(source):
      raise ValueError(f"global_batch {global_batch} must lie in [1, {len(source)}] (the "
                       f"split's size), so that an epoch holds a full batch; lower "
                       f"train.batch_size.")
    if seed < 0 or start_step < 0:
      raise ValueError(f"seed ({seed}) and start_step ({start_step}) must be >= 0.")
    if workers < 0 or threads < 1 or prefetch < 1:
      raise ValueError(f"data.stream_workers = {workers} must be >= 0, data.stream_threads = "
                       f"{threads} and data.prefetch = {prefetch} >= 1.")
    rows = global_batch // process_count
    self._map = _HostBatch(source, global_batch=global_batch, seed=seed,
                           rows=slice(process_index * rows, (process_index + 1) * rows))
    end = end_step if end_step is not None else start_step + 2**40
    steps = grain.MapDataset.range(start_step, max(end, start_step)).map(self._map)
    dataset = steps.to_iter_dataset(grain.ReadOptions(
        num_threads=threads, prefetch_buffer_size=max(prefetch, threads)))
    if workers:
      _allow_grain_flags()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=workers, per_worker_buffer_size=prefetch))
    self._iterator = iter(dataset)
    self._position = start_step
    self._end = end
    self._closed = False

  @property
  def position(self) -> int:
    """The step of the next batch ``next()`` returns (what a checkpoint stores)."""
    return self._position

  @property
  def steps_per_epoch(self) -> int:
    """Global batches per epoch (the remainder of each epoch is dropped)."""
    return self._map.steps_per_epoch

  def __iter__(self) -> StreamingLoader:
    return self

  def __next__(self) -> dict[str, Any]:
    if self._closed:
      raise RuntimeError("StreamingLoader is closed.")
    item = next(self._iterator)
    self._position = item["step"] + 1
    return item

  def close(self) -> None:
    """Stops grain's read threads and worker processes. Idempotent."""
    if not self._closed:
      self._closed = True
      close = getattr(self._iterator, "close", None)
      if close is not None:
        close()

  def __enter__(self) -> StreamingLoader:
    return self

  def __exit__(self, *exc_info: object) -> None:
    self.close()


# ------------------------------------------------------------------------- from config


def _tfds_records(data: ml_collections.ConfigDict, split: str) -> TfdsRecords:
  import tensorflow_datasets as tfds  # Lazy: heavy import.

  # A bucket data_dir: TFDS reads the dataset's metadata through epath (gcsfs or TensorFlow),
  # and array_record >= 0.8.6 opens gs:// shards itself (older releases cannot:
  # google/array_record#120). Checked first, so a missing package is named, not a listing error,
  # and a bucket that does not answer fails within a deadline, not inside array_record's
  # retries (a reader pointed at an unreachable store waited past 300 s in a test here).
  if data.data_dir:
    check_bucket(data.data_dir, "data.data_dir")
    check_reachable(data.data_dir, "data.data_dir")
  builder = tfds.builder(data.name, data_dir=data.data_dir or None)
  if builder.is_prepared():
    random_access = {f.value for f in tfds.core.FileFormat.with_random_access()}
    formats = {f.value for f in builder.info.available_file_formats()}
    if not formats & random_access:
      raise RuntimeError(
          f"TFDS dataset {data.name!r} in {builder.data_dir!r} is stored as "
          f"{' / '.join(sorted(formats))}, which has no random access, so it cannot be "
          f"streamed; convert it once to ArrayRecord with tfds.builder({data.name!r}, "
          f"data_dir=..., file_format='array_record').download_and_prepare() (or "
          f"`tfds build {data.name} --file_format=array_record`).")
    splits = set(builder.info.splits)
    if split.split("[")[0] not in splits:
      raise ValueError(f"TFDS dataset {data.name!r} in {builder.data_dir!r} has no split "
                       f"{split!r} (splits: {', '.join(sorted(splits))}); set "
                       f"--config.data.train_split / --config.data.test_split.")
    examples = builder.as_data_source(split=split)
  else:
    try:  # succeeds only where TFDS serves unprepared data (tfds.testing.mock_data)
      examples = _unprepared_data_source(builder, data.name, split, data.data_dir or None)
    except FileNotFoundError:
      raise FileNotFoundError(
          f"data.source='tfds_stream': TFDS dataset {data.name!r} is not prepared in "
          f"{builder.data_dir!r} on this host (data.data_dir = {data.data_dir!r}; '' means "
          f"$TFDS_DATA_DIR or ~/tensorflow_datasets), and streaming never downloads. Prepare "
          f"it once as ArrayRecord (`tfds build {data.name} --data_dir=DIR "
          f"--file_format=array_record`; imagenet2012 needs ILSVRC2012_img_train.tar and "
          f"ILSVRC2012_img_val.tar in DIR/downloads/manual) and pass "
          f"--config.data.data_dir=DIR, reachable from every host (a shared disk or gs://)."
      ) from None
  features = builder.info.features
  if "image" not in features:
    raise ValueError(f"TFDS dataset {data.name!r} has no 'image' feature (features: "
                     f"{sorted(features)}).")
  label_key = "label" if "label" in features else None
  if label_key is not None:
    classes = getattr(features["label"], "num_classes", None)
    if classes and classes > data.num_classes:
      raise ValueError(f"TFDS dataset {data.name!r} has {classes} classes but "
                       f"data.num_classes is {data.num_classes}; set "
                       f"--config.data.num_classes={classes}.")
  return TfdsRecords(examples, name=data.name, label_key=label_key)


def _folder_records(data: ml_collections.ConfigDict, split: str) -> FolderRecords:
  folder = os.path.join(data.data_dir, split)
  layout = ("lay the images out as DIR/<split>/<class>/<image> (ImageNet's train layout: "
            "DIR/train/<wnid>/*.JPEG) and pass --config.data.data_dir=DIR")
  if data.data_dir and not is_local(data.data_dir):
    raise BucketPathError(f"data.source='folder_stream' reads image files from a local (or "
                          f"mounted) directory, not {data.data_dir!r}: mount the bucket on "
                          f"every host (e.g. `gcsfuse --implicit-dirs BUCKET /mnt/BUCKET`) "
                          f"and pass the mount point, or store the dataset as TFDS "
                          f"ArrayRecord and use data.source='tfds_stream', whose data_dir may "
                          f"be a gs:// path.")
  if not data.data_dir or not os.path.isdir(data.data_dir):
    raise FileNotFoundError(f"data.source='folder_stream': data.data_dir = {data.data_dir!r} "
                            f"is not a directory on this host; {layout}.")
  if not os.path.isdir(folder):
    raise FileNotFoundError(f"data.source='folder_stream' reads split {split!r} from "
                            f"{folder!r}, which does not exist on this host; {layout}.")
  records = FolderRecords(folder)
  if not len(records):
    raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under "
                            f"{folder!r}; {layout}.")
  if len(records.class_names) > data.num_classes:
    raise ValueError(f"{folder!r} has {len(records.class_names)} class folders but "
                     f"data.num_classes is {data.num_classes}; set "
                     f"--config.data.num_classes={len(records.class_names)}.")
  return records


def _eval_threads(data: ml_collections.ConfigDict) -> int:
  """Threads decoding evaluation views: as many as training's workers x threads decode with
  (evaluation runs while those sit idle), at most one per core."""
  workers = max(1, int(data.get("stream_workers", 0)))
  cores = (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
           else os.cpu_count() or 1)  # the cores this process may use (containers, taskset)
  return max(1, min(workers * int(data.get("stream_threads", 1)), cores))


def build_streaming_source(data: ml_collections.ConfigDict, split: str) -> StreamingSource:
  """The streaming source of split `split` for ``data.source`` in `STREAMING_SOURCES`.

    'tfds_stream'    ``data.name`` (e.g. 'imagenet2012') prepared as ArrayRecord in
                     ``data.data_dir`` ('' : $TFDS_DATA_DIR or ~/tensorflow_datasets),
                     read through ``tfds`` random access; never downloaded.
    'folder_stream'  the image files of ``<data.data_dir>/<split>/<class>/``.

  Both deliver ``data.image_size`` squares with ``data.channels`` channels, pre-cropped with
  ``data.precrop_scale`` / ``data.precrop_ratio``.

  Raises:
    FileNotFoundError: the data directory or split is missing on this host (naming the fix).
    BucketPathError: a bucket data_dir without its filesystem package, or for folder_stream.
    ValueError: a bad split, pre-crop range or class count.
    RuntimeError: a TFDS dataset stored without random access (tfrecord).
  """
  if data.get("imbalance", 0.0):
    raise ValueError("data.imbalance (a long-tailed subset) is not available for streaming "
                     "sources; set --config.data.imbalance=0.0.")
  if data.source == "tfds_stream":
    records = _tfds_records(data, split)
  elif data.source == "folder_stream":
    records = _folder_records(data, split)
  else:
    raise ValueError(f"{data.source!r} is not a streaming source ({', '.join(STREAMING_SOURCES)})")
  source = StreamingSource(records, image_size=data.image_size, channels=data.channels,
                           scale=tuple(data.get("precrop_scale", (1.0, 1.0))),
                           ratio=tuple(data.get("precrop_ratio", (3.0 / 4.0, 4.0 / 3.0))),
                           num_classes=data.num_classes,
                           eval_threads=_eval_threads(data))
  log.info("streaming %s split %r: %d examples, pre-cropped to %s on the host", data.source,
           split, len(source), source.image_shape)
  return source


__all__ = ["STREAMING_SOURCES", "FolderRecords", "StreamingLoader", "StreamingSource",
           "TfdsRecords", "build_streaming_source", "precrop", "precrop_box"]
