"""Fault injection: bad configs, incompatible resumes, damaged checkpoints, failed saves, SIGTERM.

Each bad input must be refused before anything is written; a damaged newest checkpoint must be
bypassed for the previous one with its exact values; a failed save and a SIGTERM must end the
process within a bounded time with their exit codes (74 and 143). The failed save and SIGTERM
run ``ssljax train`` in a subprocess (a failed save leaves orbax threads that would keep an
interpreter alive; SIGTERM needs a process to signal).
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from ssljax import cli
from ssljax.train import loop
from ssljax.train.checkpoint import (Checkpointer, CheckpointMismatchError,
                                     NoIntactCheckpointError)
from ssljax.train.metrics import MetricWriter
from ssljax.train.validate import ConfigError
from tests.util import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CONFIG_FILE = '''
import sys
sys.path.insert(0, {root!r})
from tests.util import tiny_config

def get_config(method="simclr"):
  return tiny_config({data_dir!r}, method=method)
'''


def _snapshot(directory) -> dict[str, tuple[int, int]]:
  """Every file under `directory` with its size and modification time."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      stat = os.stat(path)
      out[os.path.relpath(path, directory)] = (stat.st_size, stat.st_mtime_ns)
  return out


# ----------------------------------------------------------------------------- bad configs


@pytest.mark.parametrize("key, value, message", [
    ("optim.lr", -0.1, r"optim\.lr = -0\.1 must be a finite number >= 0"),
    ("optim.lr", float("nan"), r"optim\.lr = nan must be a finite number"),
    ("train.batch_size", 0, r"train\.batch_size = 0 must be an integer >= 1"),
    ("train.log_every_steps", 0, r"train\.log_every_steps = 0 .*log_every_steps=50"),
    ("train.checkpoint_every_steps", 0, r"train\.checkpoint_every_steps = 0 must be"),
    ("train.keep_checkpoints", 0, r"train\.keep_checkpoints = 0 .*delete every one"),
    ("data.mean", (0.5, 0.5, 0.5), r"data\.mean = \(0\.5, 0\.5, 0\.5\) needs one finite "
     r"number per channel \(data\.channels = 1\)"),
    ("data.std", (0.0,), r"data\.std = \(0\.0,\) must be > 0 for every channel"),
    ("data.channels", 0, r"data\.channels = 0 must be 1 \(grayscale\) or 3 \(RGB\); 0 means "
     r"'from the folder' only with data\.source='image_folder'"),
    ("data.image_size", 0, r"data\.image_size = 0 must be an integer >= 1 .*only with "
     r"data\.source='image_folder'"),
    ("data.num_classes", -1, r"data\.num_classes = -1 must be an integer >= 0 \(0: unlabelled"),
    ("augment.crop_size", -2, r"augment\.crop_size = -2 must be an integer >= 1"),
])
def test_invalid_config_is_refused_before_anything_is_written(tmp_path, key, value, message):
  config = tiny_config(str(tmp_path))
  section, name = key.split(".")
  config[section][name] = value
  with pytest.raises(ConfigError, match=message):
    loop.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_batch_not_divisible_by_devices_writes_nothing(tmp_path, num_devices):
  config = tiny_config(str(tmp_path))
  config.train.batch_size = num_devices + 4
  with pytest.raises(ValueError, match="not divisible by the number of devices"):
    loop.train(config, str(tmp_path / "run"))
  assert not (tmp_path / "run").exists()


def test_cli_reports_every_invalid_key_without_a_traceback(tmp_path):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  config_path = tmp_path / "tiny.py"
  config_path.write_text(CONFIG_FILE.format(root=ROOT, data_dir=str(data_dir)))
  with pytest.raises(SystemExit, match=r"(?s)ssljax train: invalid config.*optim\.lr = -1\.0"
                     r".*train\.log_every_steps = 0"):
    cli.main(["ssljax", "train", "--config", str(config_path), "--workdir",
              str(tmp_path / "run"), "--config.optim.lr=-1.0",
              "--config.train.log_every_steps=0"])
  assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("overrides, message", [
    (["--config.data.source=fashion_mnist_idx", "--config.data.data_dir={missing}"],
     r"(?s)ssljax train: Fashion-MNIST IDX files not found in .*apt-get install"),
    (["--config.data.source=folder_stream", "--config.data.data_dir=gs://bucket/images"],
     r"ssljax train: data\.source='folder_stream' reads image files from a local \(or "
     r"mounted\) directory.*gcsfuse"),
], ids=["missing_dataset", "folder_stream_bucket"])
def test_cli_reports_unreachable_data_in_one_line_and_writes_nothing(tmp_path, overrides,
                                                                     message):
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  config_path = tmp_path / "tiny.py"
  config_path.write_text(CONFIG_FILE.format(root=ROOT, data_dir=str(data_dir)))
  overrides = [o.format(missing=tmp_path / "nowhere") for o in overrides]
  with pytest.raises(SystemExit, match=message):
    cli.main(["ssljax", "train", "--config", str(config_path), "--workdir",
              str(tmp_path / "run"), *overrides])
  assert not (tmp_path / "run").exists()


def test_metrics_are_cut_back_to_the_resumed_step(tmp_path):
  path = tmp_path / "metrics.jsonl"
  lines = [{"step": 2, "train/loss": 1.0}, {"step": 4, "train/loss": 0.9},
           {"step": 4, "monitor/knn_top1": 0.5}, {"step": 6, "train/loss": 0.8},
           {"step": 6, "knn/top1": 0.6}]
  path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 8, "tr')
  writer = MetricWriter(str(tmp_path), tensorboard=False, resume_step=4)
  writer.write(6, {"train/loss": 0.7})
  writer.close()
  records = [json.loads(l) for l in path.read_text().splitlines()]
  assert records == lines[:3] + [{"step": 6, "train/loss": 0.7}]
  # A finished run resumed at its last step drops only that step's final-evaluation records.
  MetricWriter(str(tmp_path), tensorboard=False, resume_step=6).close()
  assert [json.loads(l) for l in path.read_text().splitlines()] == records
  # A session killed before its first checkpoint starts again from step 0: nothing is kept.
  MetricWriter(str(tmp_path), tensorboard=False, resume_step=0).close()
  assert path.read_text() == ""


def test_a_failed_run_closes_its_metric_writer(tmp_path, monkeypatch):
  # An open TensorBoard writer's exit hook prints "can't create new thread at interpreter
  # shutdown" on Python 3.12 after the run's own error; the loop closes it on every exit.
  closed = []
  original_close = MetricWriter.close

  def close(self):
    closed.append(self)
    original_close(self)

  def failing_loop(*args, **kwargs):
    raise RuntimeError("loop failed")

  monkeypatch.setattr(MetricWriter, "close", close)
  monkeypatch.setattr(loop, "_loop", failing_loop)
  with pytest.raises(RuntimeError, match="loop failed"):
    loop.train(tiny_config(str(tmp_path)), str(tmp_path / "run"))
  assert len(closed) == 1 and closed[0]._tb is None and closed[0]._jsonl is None
  closed[0].close()  # idempotent
  with pytest.raises(RuntimeError, match="MetricWriter.write after close"):
    closed[0].write(1, {"train/loss": 1.0})


# ----------------------------------------------------------------------------- resume


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny SimCLR workdir as training leaves it (config.json, checkpoints of steps 3 and 6;
  the states are the initial one and its values + 1, which skips compiling the train step) and
  the state of step 3 on the host."""
  directory = tmp_path_factory.mktemp("faults")
  config = tiny_config(str(directory))
  workdir = directory / "run"
  os.makedirs(workdir)
  loop._save_config(config, str(workdir))
  mesh = loop.make_mesh()
  _, init, _ = loop.build_state_and_step(config, mesh, (16, 16, 1), 4, 6, 64)
  step3 = init()
  step6 = jax.tree.map(lambda x: x + 1 if x.dtype == np.float32 else x, step3)
  ckpt = Checkpointer(str(workdir))
  for step, state in ((3, step3), (6, step6)):
    ckpt.save(step, state, {"position": step, "epoch": step / 4, "steps_per_epoch": 4})
  ckpt.close()
  return config, workdir, jax.device_get(step3)


def _copy(workdir, tmp_path):
  target = tmp_path / "copy"
  shutil.copytree(workdir, target)
  return target


@pytest.mark.parametrize("change, keys", [
    ("method", ["method.name: 'simclr' in the checkpoint, 'moco' now", "method.moco.queue_size"]),
    ("width", ["model.width: 0.25 in the checkpoint, 0.5 now"]),
])
def test_incompatible_resume_names_the_keys_and_leaves_the_workdir_untouched(
    trained, tmp_path, change, keys):
  _, workdir, _ = trained
  other = tiny_config(str(tmp_path), method="moco" if change == "method" else "simclr")
  if change == "width":
    other.model.width = 0.5
  before = _snapshot(workdir)
  with pytest.raises(ConfigError, match="cannot resume it") as info:
    loop.train(other, str(workdir))
  for key in keys:
    assert key in str(info.value)
  assert _snapshot(workdir) == before


def test_resume_with_another_batch_size_needs_the_flag(trained, tmp_path):
  config, workdir, _ = trained
  other = tiny_config(str(tmp_path))
  other.train.batch_size = 32
  before = _snapshot(workdir)
  with pytest.raises(ConfigError, match=r"train\.batch_size: 16 in the checkpoint.*"
                     r"allow_batch_size_change=True"):
    loop.train(other, str(workdir))
  assert _snapshot(workdir) == before


def test_checkpoint_of_another_shape_is_a_mismatch_not_damage(trained, tmp_path):
  config, workdir, _ = trained
  copy = _copy(workdir, tmp_path)
  other = tiny_config(str(tmp_path))
  other.method.simclr.proj_dim = 4
  with pytest.raises(CheckpointMismatchError, match=r"(?s)arrays differ.*projector.*\(16, 8\) in "
                     r"the checkpoint, \(16, 4\) in this config"):
    loop.restore_latest(str(copy), other)
  assert sorted(Checkpointer(str(copy)).all_steps()) == [3, 6]  # nothing set aside


def _state_data_files(workdir, step: int) -> list[str]:
  """The data files the step's process wrote (`state/ocdbt.process_*/d/`), which hold the
  arrays; the merged B-tree under `state/d/` is left intact, so the damage is to the arrays.
  Which of these files hold live data and which only superseded B-tree nodes differs from run
  to run (the writer threads' timing decides), so the damage goes to all of them: damaging the
  largest one alone hit an unread file on CI."""
  files = [os.path.join(root, name)
           for root, _, names in os.walk(os.path.join(workdir, "checkpoints", str(step), "state"))
           for name in names
           if os.path.basename(root) == "d" and
           os.path.basename(os.path.dirname(root)).startswith("ocdbt.process_")]
  assert files, f"no OCDBT process data files under step {step}"
  return files


def _damage_all(damage, files) -> None:
  for path in files:
    damage(path)


def _truncate(path: str) -> None:
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)


def _flip(path: str) -> None:
  with open(path, "r+b") as f:
    f.seek(os.path.getsize(path) // 2)
    block = bytearray(f.read(64))
    f.seek(os.path.getsize(path) // 2)
    f.write(bytes(b ^ 0xFF for b in block))


def _garble_one_array(path: str) -> None:
  """Makes the first array's stored checksum disagree with its data: what a flip inside raw
  array bytes does, which TensorStore reads back without complaint (garbage values)."""
  sums_path = os.path.join(os.path.dirname(os.path.dirname(path)), "checksums", "metadata")
  with open(sums_path) as f:
    sums = json.load(f)
  first = sorted(sums)[0]
  sums[first] = sums[first].replace("sha256:", "sha256:0")
  with open(sums_path, "w") as f:
    json.dump(sums, f)


def _read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def _data_file(workdir, step: int) -> str:
  """Any file of the step's state (the damage functions find their own target from it)."""
  return os.path.join(workdir, "checkpoints", str(step), "state", "_METADATA")


@pytest.fixture
def collect_failed_reads():
  """A read of a damaged checkpoint that fails leaves orbax's per-array read coroutines
  unfinished, and each reports its error when the garbage collector finalises it: in whichever
  later test that happens to be (87 warnings on a BYOL test in one full run). They are collected
  here, at the end of the test that damaged the files, whose warning filter drops them."""
  yield
  gc.collect()


_IGNORE_FAILED_READS = pytest.mark.filterwarnings(
    "ignore::pytest.PytestUnraisableExceptionWarning")


@_IGNORE_FAILED_READS
@pytest.mark.usefixtures("collect_failed_reads")
@pytest.mark.parametrize("damage, reason", [
    (lambda w: _damage_all(_truncate, _state_data_files(w, 6)), "it cannot be read"),
    # Reads fail (a broken compressed chunk) or return garbage that the checksums catch.
    (lambda w: _damage_all(_flip, _state_data_files(w, 6)), "is damaged: "),
    (lambda w: _garble_one_array(_data_file(w, 6)),
     "arrays differ from the checksums written with it"),
], ids=["truncated", "bit_flipped", "wrong_values"])
def test_damaged_newest_checkpoint_falls_back_to_the_previous_one(trained, tmp_path, caplog,
                                                                  damage, reason):
  config, workdir, step3 = trained
  copy = _copy(workdir, tmp_path)
  damage(copy)
  with caplog.at_level(logging.WARNING):
    run = loop.restore_latest(str(copy), config)
  assert run.step == 3
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(run.state), step3)
  assert f"checkpoint step 6 in {copy}/checkpoints is damaged: " in caplog.text
  assert reason in caplog.text
  assert os.listdir(copy / "checkpoints-damaged") == ["6"]
  assert sorted(Checkpointer(str(copy)).all_steps()) == [3]


@_IGNORE_FAILED_READS
@pytest.mark.usefixtures("collect_failed_reads")
def test_no_intact_checkpoint_says_so(trained, tmp_path):
  config, workdir, _ = trained
  copy = _copy(workdir, tmp_path)
  _damage_all(_truncate, _state_data_files(copy, 6))
  _damage_all(_flip, _state_data_files(copy, 3))
  with pytest.raises(NoIntactCheckpointError, match=r"(?s)no intact checkpoint.*step 6: .*"
                     r"step 3: "):
    loop.restore_latest(str(copy), config)


# ----------------------------------------------------------------------------- subprocesses

# Runs `ssljax train` after making orbax's creation of the step directories of steps >= 6 fail
# with the errno given (the failure of a full disk or an unwritable directory, inside orbax's
# writer thread, where it hung the process before).
FAILING_SAVE = '''
import errno, os, sys
sys.path.insert(0, {root!r})
from orbax.checkpoint._src.path import atomicity
real = atomicity._create_tmp_directory

async def failing(makedir, tmp_dir, *args, **kwargs):
  parts = str(tmp_dir).split(os.sep)
  step = parts[parts.index("checkpoints") + 1].split(".")[0]
  if step != "3":
    raise OSError({errno_value}, os.strerror({errno_value}), str(tmp_dir))
  return await real(makedir, tmp_dir, *args, **kwargs)

atomicity._create_tmp_directory = failing
from ssljax import cli
sys.exit(cli.main(["ssljax", "train", "--config", {config!r}, "--workdir", {workdir!r},
                   "--config.eval.linear_probe=False", "--config.eval.plots=False"]))
'''


def _env() -> dict[str, str]:
  env = dict(os.environ)
  env.update(JAX_PLATFORMS="cpu", JAX_THREEFRY_PARTITIONABLE="0", TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("XLA_FLAGS", None)  # one device: the subprocesses need no sharding
  return env


def _config_file(tmp_path) -> str:
  data_dir = tmp_path / "data"
  data_dir.mkdir(exist_ok=True)
  path = tmp_path / "tiny.py"
  path.write_text(CONFIG_FILE.format(root=ROOT, data_dir=str(data_dir)))
  tiny_config(str(data_dir))  # writes the dataset
  return str(path)


@pytest.mark.parametrize("errno_name", [
    "EACCES", pytest.param("ENOSPC", marks=pytest.mark.slow)])
def test_failed_save_exits_74_within_bounded_time_keeping_earlier_checkpoints(
    tmp_path, errno_name):
  import errno
  config, workdir = _config_file(tmp_path), str(tmp_path / "run")
  script = FAILING_SAVE.format(root=ROOT, config=config, workdir=workdir,
                               errno_value=getattr(errno, errno_name))
  started = time.time()
  result = subprocess.run([sys.executable, "-c", script], env=_env(), capture_output=True,
                          text=True, timeout=240)
  assert result.returncode == 74, result.stderr[-3000:]
  assert time.time() - started < 240
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("ssljax train: the checkpoint of step 6 could not be written to ")
  assert "MiB free there)" in last
  assert os.strerror(getattr(errno, errno_name)) in last
  assert "latest complete one is step 3" in last
  assert Checkpointer(workdir).all_steps() == [3]


def _sigterm_run(tmp_path, checkpoint_every: int) -> tuple[subprocess.CompletedProcess, str]:
  config, workdir = _config_file(tmp_path), str(tmp_path / "run")
  proc = subprocess.Popen(
      [sys.executable, "-m", "ssljax.cli", "train", "--config", config, "--workdir", workdir,
       "--config.train.num_steps=100000", f"--config.train.checkpoint_every_steps="
       f"{checkpoint_every}", "--config.train.log_every_steps=1"],
      env=_env(), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 200
  metrics = os.path.join(workdir, "metrics.jsonl")
  while time.time() < deadline:  # wait for a few steps to have run
    if os.path.exists(metrics) and len(_read(metrics).splitlines()) >= 3:
      break
    time.sleep(0.2)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), workdir


def _check_sigterm(result, workdir) -> None:
  assert result.returncode == 143, result.stderr[-3000:]
  assert "StepAlreadyExistsError" not in result.stderr
  stopped = [l for l in result.stderr.splitlines() if "SIGTERM received" in l]
  assert len(stopped) == 1, result.stderr[-3000:]
  step = int(stopped[0].split("SIGTERM received at step ")[1].split(":")[0])
  ckpt = Checkpointer(workdir)
  assert ckpt.latest_step() == step
  records = [json.loads(l) for l in _read(os.path.join(workdir, "metrics.jsonl")).splitlines()]
  assert max(r["step"] for r in records) == step


def test_sigterm_with_a_checkpoint_every_step_exits_143_after_one_save(tmp_path):
  _check_sigterm(*_sigterm_run(tmp_path, checkpoint_every=1))


@pytest.mark.slow
def test_sigterm_between_checkpoints_saves_the_current_step(tmp_path):
  _check_sigterm(*_sigterm_run(tmp_path, checkpoint_every=1000))
