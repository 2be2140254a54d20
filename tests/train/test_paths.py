"""Workdirs through etils.epath (ssljax.train.paths): a local path and a stand-in gs://
bucket (epath's own test double, mapped onto a temporary directory and refusing appends like
an object store) go through the same config, metrics and results code."""

from __future__ import annotations

import json
import os

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from ssljax.cli import main as cli_main
from ssljax.eval import evaluate
from ssljax.train import loop, paths
from ssljax.train.metrics import MetricWriter
from tests.util import tiny_config


def test_a_local_workdir_is_made_absolute(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  path = paths.workdir_path("runs/a")
  assert isinstance(path, epath.Path) and os.fspath(path) == str(tmp_path / "runs" / "a")
  assert paths.is_local(path) and not paths.is_local("gs://b/x")


def test_a_bucket_workdir_without_its_package_names_it(capsys, monkeypatch):
  # As on a machine with neither gcsfs nor TensorFlow (the test extra installs gcsfs).
  monkeypatch.setattr(paths.importlib.util, "find_spec", lambda name: None)
  with pytest.raises(paths.WorkdirError, match="pip install gcsfs"):
    paths.workdir_path("gs://bucket/run")
  with pytest.raises(SystemExit, match="needs the gs:// filesystem package: pip install gcsfs"):
    cli_main(["ssljax", "train", "--config", "configs/simclr.py:fashion_mnist",
              "--workdir", "gs://bucket/run"])


def test_an_unknown_scheme_is_named():
  with pytest.raises(paths.WorkdirError, match="unsupported scheme ftp://"):
    paths.workdir_path("ftp://host/run")


@pytest.fixture
def fake_bucket(tmp_path, monkeypatch):
  """gs://bucket/... lands in tmp_path/gcs/bucket/...; appending is refused, as GCS does."""
  root = tmp_path / "gcs"
  opened = []

  def local(path) -> str:
    text = os.fspath(path)
    assert text.startswith("gs://"), text
    return str(root / text[len("gs://"):])

  def mapped(original, path, *args, **kwargs):
    return original(local(path), *args, **kwargs)

  def open_(original, path, mode):
    if "a" in mode:
      raise OSError("object stores cannot append")
    opened.append((os.fspath(path), mode))
    if "w" in mode:  # objects need no parent directories
      os.makedirs(os.path.dirname(local(path)), exist_ok=True)
    return original(local(path), mode)

  monkeypatch.setitem(paths._PACKAGES, "gs", ("os",))  # "installed"
  with epath_testing.mock_epath(open=open_, exists=mapped, isdir=mapped, listdir=mapped,
                                makedirs=mapped, mkdir=mapped, remove=mapped, glob=mapped):
    yield root, opened


def test_config_metrics_and_results_reach_a_bucket_workdir(tmp_path, fake_bucket):
  root, opened = fake_bucket
  workdir = "gs://bucket/run"
  config = tiny_config(str(tmp_path))  # the data stays local; only the workdir is a bucket
  loop._save_config(config, workdir)
  assert loop.load_workdir_config(workdir).to_dict() == config.to_dict()

  writer = MetricWriter(workdir, resume_step=None)
  for step in (2, 4, 6):
    writer.write(step, {"train/loss": 1.0 / step})
  writer.close()
  on_disk = root / "bucket" / "run"
  lines = (on_disk / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [2, 4, 6]
  # A resumed run cuts the records after its checkpoint, rewriting the object.
  MetricWriter(workdir, tensorboard=False, resume_step=4).close()
  lines = (on_disk / "metrics.jsonl").read_text().splitlines()
  assert [json.loads(l)["step"] for l in lines] == [2, 4]
  assert not (on_disk / "tensorboard").exists()

  evaluate.write_results(config, workdir, {"knn/top1": 0.5})
  assert json.loads((on_disk / "results.json").read_text())["knn/top1"] == 0.5
  assert (on_disk / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
  assert all(path.startswith("gs://bucket/run/") for path, _ in opened)


def test_the_same_code_on_a_local_workdir(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(str(tmp_path))
  os.makedirs(workdir)
  loop._save_config(config, workdir)
  writer = MetricWriter(workdir, tensorboard=False)
  writer.write(2, {"train/loss": 0.5})
  writer.write(4, {"train/loss": 0.25})
  writer.close()
  MetricWriter(workdir, tensorboard=False, resume_step=2).close()
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    assert [json.loads(l)["step"] for l in f] == [2]
  evaluate.write_results(config, workdir, {"knn/top1": 0.5})
  assert os.path.exists(os.path.join(workdir, "training_curves.png"))
  assert loop.load_workdir_config(workdir).to_dict() == config.to_dict()
