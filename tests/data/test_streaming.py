"""Streaming sources (ssljax.data.streaming): a folder of generated JPEGs and TFDS's mocked
imagenet2012, read through grain; host sharding, the pre-crop, exact resume, bad input."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image

from ssljax import data
from ssljax.config import default_config
from ssljax.data import streaming
from ssljax.data.pipeline import global_batch_indices

NUM_CLASSES, PER_CLASS = 3, 100  # 300 images of 40 x 32 (W x H)
SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  """DIR/train/<wnid>/<i>.JPEG, ImageNet's train layout; each image a noisy class colour."""
  root = tmp_path_factory.mktemp("imagenet_like")
  rng = np.random.default_rng(0)
  for c in range(NUM_CLASSES):
    directory = root / "train" / f"n{c:08d}"
    directory.mkdir(parents=True)
    for i in range(PER_CLASS):
      pixels = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
      Image.fromarray(pixels).save(directory / f"n{c:08d}_{i}.JPEG", quality=90)
  return str(root)


def _data_config(folder: str, **overrides):
  c = default_config()
  c.data.source = "folder_stream"
  c.data.data_dir = folder
  c.data.image_size = SIZE
  c.data.channels = 3
  c.data.num_classes = NUM_CLASSES
  c.data.precrop_scale = (0.2, 1.0)
  for key, value in overrides.items():
    c.data[key] = value
  return c.data


def _batches(source, count: int, **kwargs) -> list[dict]:
  kwargs.setdefault("threads", 2)
  with data.StreamingLoader(source, global_batch=60, seed=3, **kwargs) as loader:
    return [next(loader) for _ in range(count)]


def _equal(a: dict, b: dict) -> bool:
  return a["step"] == b["step"] and all(
      np.array_equal(a[k], b[k]) for k in ("image", "label", "index"))


# ------------------------------------------------------------------------- pre-crop


def test_precrop_box_fallbacks_are_centre_crops_of_clamped_aspect():
  rng = np.random.default_rng(0)
  ratio = (3 / 4, 4 / 3)
  # scale (1, 1): no box of the whole area fits unless its aspect is the image's.
  assert streaming.precrop_box(40, 32, rng, scale=(1, 1), ratio=ratio) == (0, 0, 40, 32)
  # 100 x 20 (aspect 5): height 20, width round(20 * 4/3) = 27, left (100 - 27) // 2 = 36.
  assert streaming.precrop_box(100, 20, rng, scale=(1, 1), ratio=ratio) == (36, 0, 27, 20)
  assert streaming.precrop_box(20, 100, rng, scale=(1, 1), ratio=ratio) == (0, 36, 20, 27)


def test_random_precrop_boxes_lie_inside_with_the_asked_area():
  rng = np.random.default_rng(1)
  areas = []
  for _ in range(300):
    left, top, w, h = streaming.precrop_box(400, 300, rng, scale=(0.2, 0.5), ratio=(0.75, 4 / 3))
    assert 0 <= left and left + w <= 400 and 0 <= top and top + h <= 300
    areas.append(w * h / (400 * 300))
    assert 0.74 <= w / h <= 1.34
  assert 0.19 < min(areas) and max(areas) < 0.51 and np.ptp(areas) > 0.2


def test_precrop_of_the_whole_image_is_a_bilinear_resize(folder):
  path = os.path.join(folder, "train", "n00000001", "n00000001_7.JPEG")
  with Image.open(path) as image:
    got = streaming.precrop(image, (0, 0, 40, 32), SIZE, 3)
    want = np.asarray(image.convert("RGB").resize((SIZE, SIZE), Image.Resampling.BILINEAR))
    gray = streaming.precrop(image, (8, 4, 20, 20), SIZE, 1)
  assert got.dtype == np.uint8 and got.shape == (SIZE, SIZE, 3)
  np.testing.assert_array_equal(got, want)
  assert gray.shape == (SIZE, SIZE, 1)


def test_train_examples_depend_only_on_seed_epoch_and_index(folder):
  source = data.build_source(_data_config(folder), "train")
  indices = np.array([5, 150, 299])
  images, labels = source.train_examples(indices, seed=0, epoch=0)
  assert images.shape == (3, SIZE, SIZE, 3) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels, [0, 1, 2])  # class folders in sorted order
  again, _ = source.train_examples(indices[::-1], seed=0, epoch=0)
  np.testing.assert_array_equal(again, images[::-1])  # not the position in the batch
  for other in (source.train_examples(indices, seed=0, epoch=1)[0],
                source.train_examples(indices, seed=1, epoch=0)[0]):
    assert all(not np.array_equal(a, b) for a, b in zip(other, images))


def test_eval_views_are_the_in_memory_folder_decode(folder):
  source = data.build_source(_data_config(folder), "train")
  memory = data.load_image_folder(os.path.join(folder, "train"), image_size=SIZE)
  got = source.get(np.array([0, 123, 299]))
  np.testing.assert_array_equal(got["image"], memory.images[[0, 123, 299]])
  np.testing.assert_array_equal(got["label"], memory.labels[[0, 123, 299]])
  # Decoded by several threads, each filling its own rows: the same arrays in the same order.
  picked = np.array([299, 5, 123, 0, 17, 42, 250])
  source.eval_threads = 1
  one = source.get(picked)
  source.eval_threads = 3
  three = source.get(picked)
  np.testing.assert_array_equal(three["image"], one["image"])
  np.testing.assert_array_equal(three["label"], memory.labels[picked])


def test_eval_threads_come_from_the_streaming_keys(folder):
  config = _data_config(folder)
  config.stream_workers, config.stream_threads = 0, 1
  assert data.build_source(config, "train").eval_threads == 1
  config.stream_workers, config.stream_threads = 64, 4
  assert data.build_source(config, "train").eval_threads == len(os.sched_getaffinity(0))
  source = data.build_source(config, "train")
  with pytest.raises(ValueError, match="data.stream_threads = 0 must be an integer >= 1"):
    type(source)(source.records, image_size=8, channels=3, eval_threads=0)


# ------------------------------------------------------------------------- order and sharding


def test_batches_follow_the_in_memory_pipelines_order(folder):
  source = data.build_source(_data_config(folder), "train")
  batches = _batches(source, 6)
  assert [b["step"] for b in batches] == list(range(6))
  for b in batches:
    np.testing.assert_array_equal(b["index"], global_batch_indices(300, 60, 3, b["step"]))
    np.testing.assert_array_equal(b["label"], b["index"] // PER_CLASS)
    assert b["image"].shape == (60, SIZE, SIZE, 3) and b["image"].dtype == np.uint8


def test_two_hosts_read_disjoint_rows_that_cover_the_epoch_and_form_the_global_batch(folder):
  source = data.build_source(_data_config(folder), "train")
  whole = _batches(source, 5)  # one epoch: 300 // 60 steps
  hosts = [_batches(source, 5, process_index=p, process_count=2) for p in (0, 1)]
  seen = [np.concatenate([b["index"] for b in host]) for host in hosts]
  assert len(np.intersect1d(seen[0], seen[1])) == 0
  np.testing.assert_array_equal(np.sort(np.concatenate(seen)), np.arange(300))
  for step in range(5):
    for key in ("image", "label", "index"):
      np.testing.assert_array_equal(
          np.concatenate([hosts[0][step][key], hosts[1][step][key]]), whole[step][key])


def test_resume_from_the_saved_position_gives_the_uninterrupted_batches(folder):
  source = data.build_source(_data_config(folder), "train")
  uninterrupted = _batches(source, 8)  # crosses the epoch boundary at step 5
  with data.StreamingLoader(source, global_batch=60, seed=3, threads=2) as loader:
    for _ in range(3):
      next(loader)
    position = loader.position
  assert position == 3
  rebuilt = data.build_source(_data_config(folder), "train")
  resumed = _batches(rebuilt, 5, start_step=position, threads=1)
  assert all(_equal(a, b) for a, b in zip(resumed, uninterrupted[3:]))


def test_worker_processes_give_the_same_batches(folder):
  source = data.build_source(_data_config(folder), "train")
  in_process = _batches(source, 3, start_step=4)
  workers = _batches(source, 3, start_step=4, workers=2, threads=1)
  assert all(_equal(a, b) for a, b in zip(workers, in_process))


def test_end_step_ends_the_stream(folder):
  source = data.build_source(_data_config(folder), "train")
  with data.StreamingLoader(source, global_batch=60, seed=0, start_step=2, end_step=4) as loader:
    assert [b["step"] for b in loader] == [2, 3]


# ------------------------------------------------------------------------- TFDS


def test_tfds_imagenet2012_streams_from_mock_data(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  c = default_config()
  c.data.update(dict(source="tfds_stream", name="imagenet2012", data_dir=str(tmp_path),
                     image_size=8, channels=3, num_classes=1000, precrop_scale=(0.3, 1.0)))
  with tfds.testing.mock_data(num_examples=40):
    source = data.build_source(c.data, "train")
    assert len(source) == 40 and source.has_labels
    examples = tfds.data_source("imagenet2012", split="train", data_dir=str(tmp_path))
    shapes = {examples[i]["image"].shape for i in range(40)}
    assert len(shapes) > 1  # mock images vary in size; the pre-crop gives one shape
    with data.StreamingLoader(source, global_batch=8, seed=0, threads=2) as loader:
      batches = [next(loader) for _ in range(7)]
    with data.StreamingLoader(source, global_batch=8, seed=0, start_step=4) as loader:
      resumed = [next(loader) for _ in range(3)]
    evaluation = source.get(np.arange(3))
  for b in batches:
    assert b["image"].shape == (8, 8, 8, 3) and b["image"].dtype == np.uint8
    np.testing.assert_array_equal(b["label"], [examples[int(i)]["label"] for i in b["index"]])
    assert ((0 <= b["label"]) & (b["label"] < 1000)).all()
  assert all(_equal(a, b) for a, b in zip(resumed, batches[4:]))
  assert evaluation["image"].shape == (3, 8, 8, 3)


def test_unprepared_tfds_dataset_names_the_fix(tmp_path):
  c = default_config()
  c.data.update(dict(source="tfds_stream", name="imagenet2012", data_dir=str(tmp_path),
                     image_size=8, channels=3, num_classes=1000))
  with pytest.raises(FileNotFoundError, match=r"not prepared.*never downloads.*"
                     r"--file_format=array_record.*--config\.data\.data_dir=DIR"):
    data.build_source(c.data, "train")


def test_a_bucket_data_dir_without_its_filesystem_package_names_it(tmp_path, monkeypatch):
  from ssljax.train import paths
  monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
  c = default_config()
  c.data.update(dict(source="tfds_stream", name="imagenet2012", data_dir="gs://bucket/tfds",
                     image_size=8, channels=3, num_classes=1000))
  with pytest.raises(paths.BucketPathError, match=r"data\.data_dir 'gs://bucket/tfds' needs the "
                     r"gs:// filesystem package: pip install gcsfs"):
    data.build_source(c.data, "train")


def test_a_folder_stream_from_a_bucket_says_to_mount_it(folder):
  with pytest.raises(ValueError, match=r"local \(or mounted\) directory, not 'gs://b/imagenet'.*"
                     r"gcsfuse.*data\.source='tfds_stream'"):
    data.build_source(_data_config(folder, data_dir="gs://b/imagenet"), "train")


# ------------------------------------------------------------------------- wiring, bad input


def test_the_trainer_picks_the_streaming_loader_and_evaluates_subsets(folder):
  from ssljax.eval import evaluate
  from ssljax.train import loop

  c = default_config()
  c.data.update(dict(_data_config(folder)))
  c.data.stream_workers = 0
  c.train.batch_size = 60
  source = data.build_source(c.data, "train")
  loader = loop._host_loader(c, source, start_step=2, total_steps=3)
  try:
    assert isinstance(loader, data.StreamingLoader) and next(loader)["step"] == 2
    with pytest.raises(StopIteration):
      next(loader)
  finally:
    loader.close()
  # The default monitor subsets (10000 / 2000) are positive, so the stream is evaluated on them;
  # a whole split (0) is skipped with the keys to set.
  assert evaluate.skip_reason(c, source) is None
  c.eval.monitor_train_examples = 0
  assert "eval.monitor_train_examples" in evaluate.skip_reason(c, source)


@pytest.mark.parametrize("override, error, message", [
    (dict(data_dir="/nonexistent/imagenet"), FileNotFoundError,
     r"data\.data_dir = '/nonexistent/imagenet' is not a directory on this host.*"
     r"DIR/train/<wnid>/\*\.JPEG"),
    (dict(num_classes=2), ValueError, r"3 class folders.*--config\.data\.num_classes=3"),
    (dict(precrop_scale=(0.5, 0.2)), ValueError, r"data\.precrop_scale.*0 < min <= max <= 1"),
    (dict(precrop_ratio=(0.0, 1.0)), ValueError, r"data\.precrop_ratio"),
    (dict(imbalance=10.0), ValueError, r"data\.imbalance.*not available for streaming"),
])
def test_bad_config_is_a_clear_error(folder, override, error, message):
  with pytest.raises(error, match=message):
    data.build_source(_data_config(folder, **override), "train")


def test_missing_split_names_the_folder(folder):
  with pytest.raises(FileNotFoundError, match=r"reads split 'test' from .*test'.*does not "
                     r"exist on this host"):
    data.build_source(_data_config(folder), "test")


def test_bad_loader_arguments(folder):
  source = data.build_source(_data_config(folder), "train")
  with pytest.raises(ValueError, match=r"global batch \(60\) must split evenly over the 7"):
    data.StreamingLoader(source, global_batch=60, seed=0, process_count=7)
  with pytest.raises(ValueError, match=r"global_batch 301 must lie in \[1, 300\]"):
    data.StreamingLoader(source, global_batch=301, seed=0)
  with pytest.raises(ValueError, match=r"data\.stream_workers = -1 must be >= 0"):
    data.StreamingLoader(source, global_batch=60, seed=0, workers=-1)


def test_truncated_jpeg_names_the_file(tmp_path):
  directory = tmp_path / "train" / "n0"
  directory.mkdir(parents=True)
  for i in range(4):
    Image.new("RGB", (20, 20), (i * 60, 0, 0)).save(directory / f"{i}.JPEG")
  with open(directory / "2.JPEG", "rb") as f:
    head = f.read(100)
  (directory / "2.JPEG").write_bytes(head)
  c = default_config()
  c.data.update(dict(source="folder_stream", data_dir=str(tmp_path), image_size=8, channels=3,
                     num_classes=1))
  source = data.build_source(c.data, "train")
  with pytest.raises(OSError, match=r"2\.JPEG: cannot decode this image"):
    source.train_examples(np.arange(4), seed=0, epoch=0)
