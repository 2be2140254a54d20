"""Tests for ssljax.data.folder: what the `folder` preset reads from an image folder, and the
preset itself from every configs/<method>.py file."""

from __future__ import annotations

import glob
import os

import numpy as np
import pytest

from ssljax.config import (IMAGE_FOLDER, config_dataset, default_config, load_config, lock,
                           set_image_folder)
from ssljax.data import build_source
from ssljax.data.folder import (FOLDER_KEYS, channel_statistics, describe_image_folder,
                                open_keys, resolve_config)
from ssljax.eval.evaluate import skip_reason
from tests.util import readme_command

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _save(path, array) -> None:
  from PIL import Image

  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array).save(path)


def _folder_config(data_dir) -> object:
  c = lock(default_config())
  set_image_folder(c)
  c.data.data_dir = str(data_dir)
  return c


def _labelled_rgb(root, splits=("train", "test")) -> None:
  """Two classes of RGB images of different sizes; the smallest shorter side is 10."""
  rng = np.random.default_rng(0)
  shapes = {"cat": [(12, 16), (10, 30)], "ant": [(14, 14), (20, 11)]}  # (H, W)
  for split in splits:
    for name, sizes in shapes.items():
      for i, (h, w) in enumerate(sizes):
        _save(str(root / split / name / f"{i}.png"), rng.integers(0, 256, (h, w, 3), np.uint8))


def test_describe_labelled_colour_folder(tmp_path):
  _labelled_rgb(tmp_path)
  found = describe_image_folder(str(tmp_path))
  assert found.class_names == ("ant", "cat")
  assert found.channels == 3 and found.image_size == 10 and found.largest_size == (30, 10)
  assert found.test_dir == str(tmp_path / "test")
  assert [os.path.relpath(p, tmp_path) for p in found.paths] == [
      "train/ant/0.png", "train/ant/1.png", "train/cat/0.png", "train/cat/1.png"]


def test_describe_grayscale_and_unlabelled(tmp_path):
  for i in range(3):
    _save(str(tmp_path / "train" / f"{i}.png"), np.full((9, 12), 40 * i, np.uint8))
  found = describe_image_folder(str(tmp_path))
  assert (found.class_names, found.channels, found.image_size) == ((), 1, 9)
  assert found.test_dir is None
  # One colour image among grayscale ones makes the folder RGB.
  _save(str(tmp_path / "train" / "3.png"), np.zeros((9, 9, 3), np.uint8))
  assert describe_image_folder(str(tmp_path)).channels == 3


def test_channel_statistics_by_hand(tmp_path):
  # Half black and half white pixels: mean 0.5 and standard deviation 0.5 in every channel.
  black_white = np.zeros((4, 4, 3), np.uint8)
  black_white[:, :2] = 255
  red = np.zeros((4, 4, 3), np.uint8)
  red[..., 0] = 255
  red[0, 0] = (0, 51, 102)
  paths = [str(tmp_path / "a.png"), str(tmp_path / "b.png")]
  _save(paths[0], black_white)
  _save(paths[1], red)
  mean, std = channel_statistics(paths[:1], image_size=4, channels=3, num_examples=10, seed=0)
  assert mean == (0.5, 0.5, 0.5) and std == (0.5, 0.5, 0.5)
  # Both images: channel 0 has 16 + 8 - 1 white pixels of 32, channel 1 has 8 white pixels
  # and one at 0.2, channel 2 has 8 white pixels and one at 0.4.
  mean, std = channel_statistics(paths, image_size=4, channels=3, num_examples=2, seed=0)
  expected_mean = np.array([23 / 32, (8 + 0.2) / 32, (8 + 0.4) / 32])
  expected_sq = np.array([23 / 32, (8 + 0.04) / 32, (8 + 0.16) / 32])
  np.testing.assert_allclose(mean, expected_mean, atol=5e-5)
  np.testing.assert_allclose(std, np.sqrt(expected_sq - expected_mean ** 2), atol=5e-5)


def test_channel_statistics_sample_is_seeded(tmp_path):
  paths = []
  for i in range(6):
    image = np.zeros((4, 4), np.uint8)
    image[:2] = 40 * (i + 1)
    paths.append(str(tmp_path / f"{i}.png"))
    _save(paths[-1], image)
  per_image = {round(20 * (i + 1) / 255, 4) for i in range(6)}
  means = [channel_statistics(paths, image_size=4, channels=1, num_examples=1, seed=s)[0][0]
           for s in range(8)]
  assert set(means) <= per_image and len(set(means)) > 1  # one image, chosen by the seed
  assert means == [channel_statistics(paths, image_size=4, channels=1, num_examples=1,
                                      seed=s)[0][0] for s in range(8)]
  with pytest.raises(ValueError, match=r"data\.stats_examples = 0 must be >= 1"):
    channel_statistics(paths, image_size=4, channels=1, num_examples=0, seed=0)
  flat = str(tmp_path / "flat.png")
  _save(flat, np.full((4, 4), 7, np.uint8))
  with pytest.raises(ValueError, match=r"constant channel.*--config\.data\.std"):
    channel_statistics([flat], image_size=4, channels=1, num_examples=1, seed=0)


def test_resolve_fills_the_open_keys_and_keeps_the_given_ones(tmp_path):
  _labelled_rgb(tmp_path)
  c = _folder_config(tmp_path)
  assert open_keys(c) == [f"data.{k}" for k in FOLDER_KEYS]
  resolved = resolve_config(c)
  assert c.data.image_size == 0 and c.data.mean == ()  # the caller's config is untouched
  d = resolved.data
  assert (d.image_size, d.channels, d.num_classes) == (10, 3, 2)
  assert (resolved.augment.crop_size, resolved.augment.small_crop_size) == (10, 5)
  paths = sorted(glob.glob(str(tmp_path / "train" / "*" / "*.png")))
  assert (d.mean, d.std) == channel_statistics(paths, image_size=10, channels=3,
                                               num_examples=1000, seed=0)
  assert len(d.mean) == len(d.std) == 3 and all(0 < v < 1 for v in d.mean + d.std)
  assert open_keys(resolved) == [] and resolve_config(resolved) is resolved
  # The source then loads exactly what the config says.
  train = build_source(resolved.data, "train")
  assert train.image_shape == (10, 10, 3) and list(train.labels) == [0, 0, 1, 1]

  # A key given explicitly is kept; the statistics follow it.
  c.data.image_size = 8
  c.data.std = (0.25, 0.25, 0.25)
  kept = resolve_config(c)
  assert (kept.data.image_size, kept.augment.crop_size, kept.data.std) == (8, 8, (0.25,) * 3)
  assert kept.data.mean == channel_statistics(paths, image_size=8, channels=3,
                                              num_examples=1000, seed=0)[0]


def test_resolve_on_resume_takes_the_stored_values(tmp_path):
  _labelled_rgb(tmp_path)
  c = _folder_config(tmp_path)
  stored = resolve_config(c)
  stored.data.mean, stored.data.std = (0.1, 0.2, 0.3), (0.4, 0.5, 0.6)  # as if the folder
  resumed = resolve_config(c, stored)                                    # had changed
  assert resumed.data.mean == (0.1, 0.2, 0.3) and resumed.data.std == (0.4, 0.5, 0.6)
  assert (resumed.data.image_size, resumed.data.num_classes) == (10, 2)


def test_resolve_leaves_other_sources_alone(tmp_path):
  c = lock(default_config())
  assert open_keys(c) == [] and resolve_config(c) is c
  c.augment.crop_size = 0  # 0 means the image size for any source
  assert resolve_config(c).augment.crop_size == c.data.image_size == 28


@pytest.mark.parametrize("layout, message", [
    ("no_data_dir", r"data\.data_dir, which is empty; lay the images out as DIR/train/"),
    ("no_train", r"has no train/ folder .*does not exist\); lay the images out"),
    ("no_images", r"no image files \(\.bmp.* under .*train"),
    ("loose", r"mixes class folders \(a\) with images at its top level \(e\.g\. 'x\.png'\)"),
    ("test_classes", r"class folders of .*test' \(a, c\) differ from those of .*train' \(a, b\)"),
    ("empty_test_class", r"test class folder '.*test/b' holds no image files \(\.bmp.*put each "
                         r"class's test images in its folder, or remove '.*test'"),
])
def test_resolve_errors_name_the_problem_and_the_layout(tmp_path, layout, message):
  image = np.zeros((4, 4), np.uint8)
  if layout == "no_images":
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "notes.txt").write_text("not an image")
  elif layout == "loose":
    _save(str(tmp_path / "train" / "a" / "0.png"), image)
    _save(str(tmp_path / "train" / "x.png"), image)
  elif layout == "test_classes":
    for split, classes in (("train", "ab"), ("test", "ac")):
      for name in classes:
        _save(str(tmp_path / split / name / "0.png"), image)
  elif layout == "empty_test_class":  # test/b/ exists (the names agree) but holds no image
    for split in ("train", "test"):
      _save(str(tmp_path / split / "a" / "0.png"), image)
    _save(str(tmp_path / "train" / "b" / "0.png"), image)
    (tmp_path / "test" / "b").mkdir()
    (tmp_path / "test" / "b" / "notes.txt").write_text("not an image")
  c = _folder_config("" if layout == "no_data_dir" else tmp_path)
  with pytest.raises((ValueError, FileNotFoundError), match=message):
    resolve_config(c)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))),
                         ids=os.path.basename)
def test_every_config_file_takes_the_folder_argument(path):
  c = load_config(f"{path}:{IMAGE_FOLDER}")
  default = load_config(path)
  assert (c.data.source, c.data.name, c.data.data_dir) == ("image_folder", "folder", "")
  assert open_keys(c) == [f"data.{k}" for k in FOLDER_KEYS]
  assert c.augment.crop_size == c.augment.small_crop_size == 0
  # Everything else is the file's default recipe.
  assert c.method.to_dict() == default.method.to_dict()
  assert c.optim.to_dict() == default.optim.to_dict()
  assert c.model.to_dict() == default.model.to_dict()


def test_get_config_itself_points_to_load_config_for_the_folder():
  with pytest.raises(ValueError, match=r"applied by ssljax\.config\.load_config.*"
                     r"set_image_folder"):
    config_dataset("folder")
  with pytest.raises(ValueError, match=r"valid datasets: fashion_mnist, .*or 'folder'"):
    config_dataset("mnist")


def test_skip_reason_says_why_evaluation_cannot_run(tmp_path):
  _labelled_rgb(tmp_path, splits=("train",))
  c = resolve_config(_folder_config(tmp_path))
  train = build_source(c.data, "train")
  assert skip_reason(c, train) == (
      f"the image folder has no test split ({tmp_path / 'test'} does not exist; add it with "
      f"the train split's class folders to evaluate)")
  _labelled_rgb(tmp_path, splits=("test",))
  assert skip_reason(c, train) is None
  assert skip_reason(c, train, build_source(c.data, "test")) is None
  c.eval.enabled = False
  assert skip_reason(c, train) == "eval.enabled is False"
  c.eval.enabled = True
  unlabelled = type(train)(train.images, np.full(len(train), -1, np.int32))
  assert "train split 'train' is unlabelled" in skip_reason(c, unlabelled)
  assert skip_reason(c, train, unlabelled) == "the test split 'test' is unlabelled"


def test_the_readme_command_reads_the_folder(tmp_path, monkeypatch):
  from ssljax import cli

  argv = [a.replace("DIR", str(tmp_path))
          for a in readme_command("train", section="Your own images")]
  assert argv[:2] == ["ssljax", "train"] and "configs/simclr.py:folder" in argv
  _labelled_rgb(tmp_path)
  monkeypatch.chdir(ROOT)  # the README's commands run from the repository root
  flags = cli._parse([argv[0]] + argv[2:], "train")
  assert flags.workdir == "runs/simclr_mine"
  resolved = resolve_config(flags.config)
  d = resolved.data
  assert (d.source, d.data_dir, d.image_size, d.channels, d.num_classes) == (
      "image_folder", str(tmp_path), 10, 3, 2)
  assert resolved.train.batch_size == 64 and len(d.mean) == len(d.std) == 3


def test_train_help_names_the_folder_argument():
  from ssljax import cli

  text = " ".join(cli.TRAIN_HELP.split())
  assert ("ARG folder (any config): your own images, DIR/train/<class>/<image> with "
          "--config.data.data_dir=DIR") in text
  assert os.path.exists(os.path.join(ROOT, "ssljax", "data", "folder.py"))
