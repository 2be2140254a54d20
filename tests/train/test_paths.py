"""Workdirs through etils.epath (ssljax.train.paths): a local path and a stand-in gs://
bucket (epath's own test double, mapped onto a temporary directory and refusing appends like
an object store) go through the same config, metrics and results code."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from etils import epath
from etils.epath import testing as epath_testing

from ssljax import data
from ssljax.cli import main as cli_main
from ssljax.config import default_config
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


# ------------------------------------------------------------ a bucket that does not answer


@pytest.fixture
def silent_bucket(monkeypatch):
  """gs:// with its package 'installed' and every listing blocked until the test ends (a
  store that keeps retrying); yields how many listings were asked."""
  monkeypatch.setitem(paths._PACKAGES, "gs", ("os",))
  monkeypatch.setattr(paths, "_REACHED", set())
  monkeypatch.setenv(paths.BUCKET_TIMEOUT_ENV, "0.5")
  release, asked = threading.Event(), []

  def blocked(original, path):
    del original
    asked.append(os.fspath(path))
    release.wait(30)  # bounded: a test that blocks here by mistake fails, it does not hang
    return False

  with epath_testing.mock_epath(exists=blocked):
    yield asked
    release.set()


def test_a_bucket_workdir_that_does_not_answer_stops_at_the_deadline(silent_bucket):
  start = time.perf_counter()
  with pytest.raises(paths.WorkdirError, match=r"--workdir 'gs://bucket/run': no answer from "
                     r"Cloud Storage \(storage.googleapis.com\) within 0.5 s; check that this "
                     r"host can reach it, that it has credentials.*raise SSLJAX_BUCKET_TIMEOUT"):
    paths.workdir_path("gs://bucket/run")
  assert 0.5 <= time.perf_counter() - start < 5
  assert silent_bucket == ["gs://bucket/run"]


def test_the_cli_reports_a_silent_bucket_before_any_work(silent_bucket, capsys):
  with pytest.raises(SystemExit, match=r"--workdir 'gs://bucket/run': no answer .* within "
                     r"0.5 s"):
    cli_main(["ssljax", "train", "--config", "configs/simclr.py:fashion_mnist",
              "--workdir", "gs://bucket/run"])
  assert silent_bucket == ["gs://bucket/run"]  # asked once, then nothing else was tried


@pytest.mark.parametrize("source", ["tfds_stream", "tfds"])
def test_a_bucket_data_dir_that_does_not_answer_names_the_setting(silent_bucket, source):
  c = default_config()
  c.data.update(dict(source=source, name="imagenet2012", data_dir="gs://bucket/tfds",
                     image_size=8, channels=3, num_classes=1000))
  with pytest.raises(paths.BucketPathError, match=r"data\.data_dir 'gs://bucket/tfds': no "
                     r"answer .* within 0.5 s"):
    data.build_source(c.data, "train")
  # The training loop turns it into its data error (exit 1 with the message, no traceback).
  with pytest.raises(loop.DataSourceError, match=r"data\.data_dir 'gs://bucket/tfds': no answer"):
    loop._build_source(c, "train")


def test_a_bucket_that_refuses_the_request_names_the_cause(monkeypatch):
  monkeypatch.setitem(paths._PACKAGES, "gs", ("os",))
  monkeypatch.setattr(paths, "_REACHED", set())
  monkeypatch.setenv("STORAGE_EMULATOR_HOST", "http://localhost:9")
  asked = []

  def refused(original, path):
    del original
    asked.append(os.fspath(path))
    raise ConnectionRefusedError("Cannot connect to host localhost:9")

  with epath_testing.mock_epath(exists=refused):
    with pytest.raises(paths.WorkdirError, match=r"--workdir 'gs://bucket/run' cannot be read "
                       r"from the emulator at STORAGE_EMULATOR_HOST=http://localhost:9 "
                       r"\(ConnectionRefusedError: Cannot connect to host localhost:9\); "
                       r"check that") as raised:
      paths.workdir_path("gs://bucket/run")
    assert isinstance(raised.value.__cause__, ConnectionRefusedError)
    with pytest.raises(paths.WorkdirError):  # a failed path is asked again, not remembered
      paths.workdir_path("gs://bucket/run")
  assert asked == ["gs://bucket/run"] * 2


def test_a_bucket_that_answers_is_asked_once_per_process(tmp_path, monkeypatch):
  monkeypatch.setitem(paths._PACKAGES, "gs", ("os",))
  monkeypatch.setattr(paths, "_REACHED", set())
  asked = []

  def answers(original, path):
    del original
    asked.append(os.fspath(path))
    return False  # a new workdir: not there yet, which is fine

  with epath_testing.mock_epath(exists=answers):
    for _ in range(3):
      assert os.fspath(paths.workdir_path("gs://bucket/run")) == "gs://bucket/run"
    paths.check_reachable(str(tmp_path), "--workdir")  # local paths are not asked
  assert asked == ["gs://bucket/run"]


@pytest.mark.parametrize("value", ["soon", "0", "-3", "inf", "1e12"])
def test_a_bad_bucket_timeout_names_the_variable(monkeypatch, value):
  monkeypatch.setattr(paths, "_REACHED", set())
  monkeypatch.setenv(paths.BUCKET_TIMEOUT_ENV, value)
  with pytest.raises(paths.BucketPathError, match=rf"SSLJAX_BUCKET_TIMEOUT='{value}': give the "
                     r"seconds .* positive number up to 86400 \(default 60\)"):
    paths.check_reachable("gs://bucket/run", "--workdir")


_CLOSED_PORT_PROBE = """
import sys, time
sys.path.insert(0, {root!r})
from ssljax.train import paths
start = time.perf_counter()
try:
  paths.check_reachable("gs://ssljax-closed-port/run", "--workdir", paths.WorkdirError,
                        timeout_s=1.5)
except paths.WorkdirError as e:
  print(round(time.perf_counter() - start, 2))
  print(e)
  sys.exit(3)
"""


def test_gcsfs_pointed_at_a_closed_port_stops_at_the_deadline(tmp_path):
  """The real filesystem, in its own process: gcsfs retries a refused connection for about
  100 s; the deadline ends the wait, and the process exits with its error while the probe's
  daemon thread is still retrying."""
  pytest.importorskip("gcsfs")
  with socket.socket() as probe:  # a port nothing listens on
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
  # No GCE metadata probe and a test token: the 1.5 s go to gcsfs's retries, not to auth.
  env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{port}",
         "NO_GCE_CHECK": "True", "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test-token"}
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  result = subprocess.run([sys.executable, "-c", _CLOSED_PORT_PROBE.format(root=root)], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
  assert result.returncode == 3, result.stderr[-2000:]
  seconds, message = result.stdout.strip().split("\n", 1)
  assert 1.5 <= float(seconds) < 10
  assert message.startswith(f"--workdir 'gs://ssljax-closed-port/run': no answer from the "
                            f"emulator at STORAGE_EMULATOR_HOST=http://127.0.0.1:{port} within "
                            f"1.5 s; check that this host can reach it"), message


def test_an_export_to_a_silent_bucket_names_out_before_any_work(silent_bucket, tmp_path):
  from ssljax.export import export_encoder
  # The workdir has no checkpoint: the export directory is checked first.
  with pytest.raises(paths.WorkdirError, match=r"^--out 'gs://bucket/encoder': no answer"):
    export_encoder(str(tmp_path / "no-run"), "gs://bucket/encoder")
  assert silent_bucket == ["gs://bucket/encoder"]


def test_a_store_s_advice_follows_its_scheme(monkeypatch):
  monkeypatch.setitem(paths._PACKAGES, "s3", ("os",))
  monkeypatch.setattr(paths, "_REACHED", set())

  def refused(original, path):
    del original, path
    raise PermissionError("Access Denied")

  with epath_testing.mock_epath(exists=refused):
    with pytest.raises(paths.WorkdirError, match=r"cannot be read from S3 \(PermissionError: "
                       r"Access Denied\); .*the AWS credentials") as raised:
      paths.workdir_path("s3://bucket/run")
  assert "gcloud" not in str(raised.value)


# ---------------------------------------------------------------- a stand-in bucket


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
  monkeypatch.setattr(paths, "_REACHED", set())
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
