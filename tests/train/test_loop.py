"""The trainer end to end: CLI, checkpoint/resume equivalence, and bad-input messages."""

import io
import json
import logging
import os
import re

import jax
import numpy as np
import pytest

from ssljax import cli, data
from ssljax.train import loop
from ssljax.train.checkpoint import Checkpointer
from tests.util import tiny_config

CONFIG_FILE = '''
import sys
sys.path.insert(0, {root!r})
from tests.util import tiny_config

def get_config():
  return tiny_config({data_dir!r})
'''


def _write_config_file(tmp_path) -> str:
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  data_dir = tmp_path / "data"
  data_dir.mkdir()
  path = tmp_path / "tiny_config.py"
  path.write_text(CONFIG_FILE.format(root=root, data_dir=str(data_dir)))
  return str(path)


def _final_params(workdir, config):
  ckpt = Checkpointer(str(workdir))
  step = ckpt.latest_step()
  mesh = loop.make_mesh()
  source = data.build_source(config.data, config.data.train_split)
  spe, total = loop.run_length(config, len(source))
  _, init, _ = loop.build_state_and_step(config, mesh, tuple(source.image_shape), spe, total,
                                         len(source))
  state, meta = ckpt.restore(step, jax.eval_shape(init))
  ckpt.close()
  return step, jax.device_get(state), meta


def test_cli_trains_checkpoints_resumes_and_evaluates(tmp_path, capsys, caplog):
  config_path = _write_config_file(tmp_path)
  workdir = tmp_path / "run"
  caplog.set_level(logging.INFO, logger="ssljax.train.loop")
  # The bar is asked for, but stderr is captured (not a terminal): log lines, no bar.
  assert cli.main(["ssljax", "train", "--config", config_path, "--workdir", str(workdir),
                   "--config.train.eval_every_steps=3",
                   "--config.train.progress_bar=True"]) == 0
  captured = capsys.readouterr()
  printed = json.loads(captured.out)
  assert "\r" not in captured.err and "step/s" not in captured.err
  lines = [r.getMessage() for r in caplog.records if r.name == "ssljax.train.loop"]
  progress = [l for l in lines if l.startswith("step ")]
  assert [l.split("/")[0] for l in progress] == ["step 2", "step 4", "step 6"]
  assert re.fullmatch(r"step 6/6 \(epoch 1\.50 of 1\.50\): loss \d+\.\d{4}, \d+ images/s, "
                      r"ETA 0:00:00", progress[-1]), progress[-1]
  monitors = [l for l in lines if l.startswith("kNN monitor")]
  assert [l.split(" (")[0] for l in monitors] == ["kNN monitor at step 3",
                                                  "kNN monitor at step 6"]
  assert all(re.search(r": knn_top1 [01]\.\d{4} \(\d+\.\d s\)$", l) for l in monitors)
  assert printed["steps"] == 6 and 0.0 <= printed["knn/top1"] <= 1.0
  results = json.loads((workdir / "results.json").read_text())
  assert results["knn/top1"] == printed["knn/top1"] and "linear_probe/top1" in results
  assert results["method"] == "simclr" and results["seed"] == 0
  assert (workdir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
  records = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if "train/loss" in r] == [2, 4, 6]
  assert [r["step"] for r in records if "monitor/knn_top1" in r] == [3, 6]
  assert all(r["monitor/seconds"] > 0 for r in records if "monitor/knn_top1" in r)
  assert sorted(Checkpointer(str(workdir)).all_steps()) == [3, 6]
  assert any(f.startswith("events") for f in os.listdir(workdir / "tensorboard"))

  # Training again on a finished workdir resumes at the end: no new steps, same results.
  assert cli.main(["ssljax", "train", "--config", config_path, "--workdir", str(workdir)]) == 0
  again = json.loads(capsys.readouterr().out)
  assert again["steps"] == 6 and again["knn/top1"] == pytest.approx(printed["knn/top1"])

  # `eval` restores the checkpoint with the saved config; overrides apply.
  assert cli.main(["ssljax", "eval", "--workdir", str(workdir), "--config.eval.knn_k=3",
                   "--config.eval.linear_probe=False"]) == 0
  evaluated = json.loads(capsys.readouterr().out)
  assert evaluated["steps"] == 6 and "linear_probe/top1" not in evaluated
  # results.json keeps the probe of `train` (re-run once: one entry) beside the new kNN.
  merged = json.loads((workdir / "results.json").read_text())
  assert merged["linear_probe/top1"] == pytest.approx(results["linear_probe/top1"])
  assert [(e["options"], "linear_probe/top1" in e["results"])
          for e in merged["evaluations"]] == [
              ({}, True), ({"eval.knn_k": 3, "eval.linear_probe": False}, False)]
  assert merged["evaluations"][1]["results"]["knn/top1"] == evaluated["knn/top1"]

  # The MLP probe on a workdir whose config.json predates its keys: they take their defaults,
  # the overrides apply, and the entry records what changed from the run's config.
  stored = json.loads((workdir / "config.json").read_text())
  for key in [k for k in stored["eval"] if k.startswith("mlp_probe")]:
    del stored["eval"][key]
  (workdir / "config.json").write_text(json.dumps(stored))
  assert cli.main(["ssljax", "eval", "--workdir", str(workdir), "--config.eval.mlp_probe=True",
                   "--config.eval.linear_probe=False", "--config.eval.mlp_probe_epochs=2",
                   "--config.eval.mlp_probe_hidden_dims=(8,)"]) == 0
  evaluated = json.loads(capsys.readouterr().out)
  assert 0.0 <= evaluated["mlp_probe/top1"] <= 1.0 and "linear_probe/top1" not in evaluated
  assert evaluated["mlp_probe/best_lr"] in (0.01, 0.1)
  assert evaluated["mlp_probe/best_weight_decay"] in (1e-5, 1e-4)
  merged = json.loads((workdir / "results.json").read_text())
  assert merged["evaluations"][2]["options"] == {
      "eval.linear_probe": False, "eval.mlp_probe": True, "eval.mlp_probe_epochs": 2,
      "eval.mlp_probe_hidden_dims": [8]}
  assert merged["evaluations"][2]["results"]["mlp_probe/top1"] == evaluated["mlp_probe/top1"]
  assert merged["linear_probe/top1"] == pytest.approx(results["linear_probe/top1"])


class _Terminal(io.StringIO):
  def isatty(self):
    return True


def test_progress_bar_only_on_a_terminal_and_the_lines_it_logs_otherwise():
  assert loop.use_progress_bar(True, _Terminal())
  assert not loop.use_progress_bar(False, _Terminal())
  assert not loop.use_progress_bar(True, io.StringIO())  # a log file, a pipe
  assert not loop.use_progress_bar(True, object())  # a stream without isatty
  means = {"train/loss": 4.56789, "train/images_per_sec": 3951.6}
  assert loop.progress_line(50, 2340, 234, means, seconds_per_step=0.25) == (
      "step 50/2340 (epoch 0.21 of 10.00): loss 4.5679, 3952 images/s, ETA 0:09:32")
  assert loop.progress_line(1, 100000, 1000, means, 0.5).endswith("ETA 13:53:20")
  assert loop.monitor_line(936, 234, {"monitor/knn_top1": np.float32(0.7712)}, 12.34) == (
      "kNN monitor at step 936 (epoch 4.00): knn_top1 0.7712 (12.3 s)")


def _method_config(directory: str, method: str):
  """The tiny config running `method` ('name' or 'name+add-on'), with its state sized for
  16-image batches."""
  method, *addons = method.split("+")
  config = tiny_config(directory, method=method, addons=tuple(addons))
  if method == "moco":  # EMA key encoder + a queue of 4 symmetric steps
    config.method.moco.queue_size = 128
    config.method.moco.proj_hidden_dim, config.method.moco.proj_dim = 16, 8
  elif method == "npid":  # memory bank over the 64 training images
    config.method.npid.proj_dim = 8
  elif method == "swav":  # queue filled from step 0 and used from step 2; frozen prototypes
    hp = config.method.swav
    hp.num_prototypes, hp.queue_size, hp.queue_start_epoch = 8, 32, 0.0
    hp.freeze_prototypes_epochs = 0.5
    hp.proj_hidden_dim, hp.proj_dim = 16, 8
  if "uota" in addons:  # the learned view model (its own Adam group), on from step 3 of 6
    config.method.uota.mode = "learned"
    config.method.uota.temperature = 4.0
  return config


# Methods whose state goes beyond parameters and BN statistics: the checkpoint must carry
# their EMA weights, queues, pointers and memory banks for a resume to be exact. Plain SwAV
# runs with -m slow (suite time): swav+uota carries its queue and prototypes and more.
@pytest.mark.parametrize("method", ["simclr", "moco", "npid",
                                    pytest.param("swav", marks=pytest.mark.slow), "swav+uota"])
def test_interrupted_run_resumes_to_the_uninterrupted_result(tmp_path, monkeypatch, method):
  config = _method_config(str(tmp_path), method)
  config.eval.linear_probe = False
  # Evaluation reads the state, never changes it; only UOTA's evaluation report is checked here.
  config.eval.enabled = "uota" in method
  loop.train(config, str(tmp_path / "straight"))
  _, straight, _ = _final_params(tmp_path / "straight", config)

  # Interrupt the second run after 4 batches (Ctrl-C): it must checkpoint step 4 and stop.
  real_next = data.HostLoader.__next__
  calls = {"n": 0}

  def interrupting_next(self):
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt
    return real_next(self)

  monkeypatch.setattr(data.HostLoader, "__next__", interrupting_next)
  with pytest.raises(KeyboardInterrupt):
    loop.train(config, str(tmp_path / "resumed"))
  step, _, meta = _final_params(tmp_path / "resumed", config)
  assert step == 4 and meta["position"] == 4
  monkeypatch.setattr(data.HostLoader, "__next__", real_next)

  loop.train(config, str(tmp_path / "resumed"))
  step, resumed, _ = _final_params(tmp_path / "resumed", config)
  assert step == 6
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(a, b), resumed, straight)
  if "uota" in method:  # its evaluation report: the weight plot and its statistics
    results = json.loads((tmp_path / "straight" / "results.json").read_text())
    assert (tmp_path / "straight" / "uota_weights_step6.png").read_bytes()[:4] == b"\x89PNG"
    assert 0 < results["uota/w_min"] <= 1.0 <= results["uota/w_max"]


def test_nonfinite_loss_stops_names_the_step_and_keeps_good_checkpoints(tmp_path):
  config = tiny_config(str(tmp_path))
  config.optim.name = "sgd"
  config.optim.lr = 1e35
  config.optim.warmup_epochs = 0.0
  config.train.checkpoint_every_steps = 1
  config.train.log_every_steps = 2
  with pytest.raises(loop.NonFiniteLossError, match=r"non-finite at step \d+") as info:
    loop.train(config, str(tmp_path / "run"))
  assert "last good checkpoint" in str(info.value)
  ckpt = Checkpointer(str(tmp_path / "run"))
  for step in ckpt.all_steps():
    _, state, _ = _final_params(tmp_path / "run", config)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.params)), step


def test_batch_not_divisible_by_devices_is_a_clear_error(tmp_path):
  config = tiny_config(str(tmp_path))
  config.train.batch_size = 12
  with pytest.raises(ValueError, match=r"batch_size = 12 is not divisible by the number of "
                     r"devices \(8\).*batch_size=8"):
    loop.train(config, str(tmp_path / "run"))


def test_missing_dataset_says_how_to_get_it(tmp_path):
  config = tiny_config(str(tmp_path))
  config.data.source = "fashion_mnist_idx"
  config.data.data_dir = str(tmp_path / "nowhere")
  with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
    loop.train(config, str(tmp_path / "run"))


def test_wrong_image_shape_names_the_config_keys(tmp_path):
  config = tiny_config(str(tmp_path))
  config.data.image_size = 32
  with pytest.raises(ValueError, match="image_size"):
    loop.train(config, str(tmp_path / "run"))


def test_cli_rejects_unknown_config_key(tmp_path):
  config_path = _write_config_file(tmp_path)
  with pytest.raises(SystemExit, match=r"unknown config key 'optim\.lrr'.*Valid keys of "
                     r"config\.optim: .*\blr\b"):
    cli.main(["ssljax", "train", "--config", config_path, "--workdir", str(tmp_path / "w"),
              "--config.optim.lrr=0.3"])


def test_cli_reports_a_method_builder_refusal_in_one_line(tmp_path):
  # SimCLR's builder refuses an unknown positives form: `ssljax train` says so in one line
  # with exit status 1, as for any config error, without a traceback or a workdir.
  import subprocess
  import sys

  config_path = _write_config_file(tmp_path)
  root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  workdir = tmp_path / "w"
  done = subprocess.run(
      [sys.executable, "-m", "ssljax.cli", "train", "--config", config_path,
       "--workdir", str(workdir), "--config.method.simclr.positives=bogus"],
      capture_output=True, text=True, timeout=300, cwd=root,
      env={**os.environ, "JAX_PLATFORMS": "cpu"}, check=False)
  assert done.returncode == 1, done.stderr
  assert "Traceback" not in done.stderr
  assert done.stderr.strip().splitlines()[-1] == (
      "ssljax train: method.simclr.positives must be one of ('mean_log', 'log_sum'), got "
      "'bogus'; e.g. --config.method.simclr.positives=log_sum (nothing was written)")
  assert not workdir.exists()


def test_eval_and_export_report_a_method_builder_refusal(tmp_path):
  # The same refusal as an override to `ssljax eval` / `export`: a ConfigError (which the CLI
  # prints as one line), raised before any checkpoint is read or file written.
  from ssljax.export import export_encoder
  from ssljax.train.validate import ConfigError
  config = tiny_config(str(tmp_path))
  config.method.simclr.positives = "bogus"
  message = r"positives must be one of \('mean_log', 'log_sum'\), got 'bogus'.*nothing was"
  with pytest.raises(ConfigError, match=message):
    loop.evaluate_workdir(str(tmp_path / "w"), config)
  with pytest.raises(ConfigError, match=message):
    export_encoder(str(tmp_path / "w"), str(tmp_path / "out"), config)
  assert not (tmp_path / "w").exists() and not (tmp_path / "out").exists()


def test_eval_without_checkpoint_is_a_clear_error(tmp_path):
  with pytest.raises(FileNotFoundError, match="not an ssljax workdir"):
    loop.evaluate_workdir(str(tmp_path))


def test_the_trainer_gives_parameter_groups_their_own_optimiser(tmp_path):
  # UOTA's learned view model asks for Adam at its own rate (method.uota.learning_rate) while
  # the rest trains with the run's SGD: after one step at a constant schedule, Adam has moved
  # every coordinate of params['uota'] with a non-zero gradient by its rate (its first update
  # is lr * g / |g|), which plain SGD at 0.1 would not.
  config = tiny_config(str(tmp_path), method="simclr", addons=("uota",))
  config.method.uota.mode = "learned"
  config.method.uota.learning_rate = 1e-3
  config.optim.name = "sgd"
  config.optim.schedule = "constant"
  mesh = loop.make_mesh()
  _, init, step = loop.build_state_and_step(config, mesh, (16, 16, 1), 4, 6, 64)
  state = init()
  before = jax.device_get(state.params)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 255, size=(16, 16, 16, 1), dtype=np.uint8)
  state, _ = step(state, images, np.arange(16, dtype=np.int32), np.zeros(16, np.int32))
  after = jax.device_get(state.params)
  moved = np.abs(after["uota"]["log_diag"] - before["uota"]["log_diag"])
  np.testing.assert_allclose(moved, 1e-3, rtol=1e-2)
  encoder_moved = max(float(np.abs(a - b).max()) for a, b in zip(
      jax.tree.leaves(after["encoder"]), jax.tree.leaves(before["encoder"])))
  assert encoder_moved > 0


# ----------------------------------------------------------------------------- image folders

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The SimCLR recipe made tiny: 4 steps of 8 images, a quarter-width encoder, no expansion.
TINY_FOLDER_RUN = [
    "--config.model.expand_features=0", "--config.model.width=0.25",
    "--config.method.simclr.proj_hidden_dim=16", "--config.method.simclr.proj_dim=8",
    "--config.train.batch_size=8", "--config.train.num_steps=4",
    "--config.train.log_every_steps=2", "--config.train.checkpoint_every_steps=2",
    "--config.train.eval_every_steps=2", "--config.train.progress_bar=False",
    "--config.eval.batch_size=8", "--config.eval.precise_bn_examples=0"]


def _write_unlabelled_folder(root) -> np.ndarray:
  """24 grayscale 16 x 16 PNGs in root/train (no class folders, no test split)."""
  from PIL import Image

  (root / "train").mkdir(parents=True)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 200, size=(24, 16, 16), dtype=np.uint8)
  for i, image in enumerate(images):
    Image.fromarray(image).save(root / "train" / f"{i:02d}.png")
  return images


def test_unlabelled_image_folder_pretrains_and_writes_results(tmp_path, capsys, caplog):
  images = _write_unlabelled_folder(tmp_path / "mine")
  workdir = tmp_path / "run"
  command = ["ssljax", "train", "--config", os.path.join(ROOT, "configs", "simclr.py:folder"),
             f"--config.data.data_dir={tmp_path / 'mine'}", "--workdir", str(workdir),
             *TINY_FOLDER_RUN]
  caplog.set_level(logging.INFO)
  assert cli.main(command) == 0
  assert json.loads(capsys.readouterr().out)["steps"] == 4
  reason = ("the train split 'train' is unlabelled (kNN and the linear probe need a class per "
            "image: for an image folder, one subfolder per class)")
  messages = [r.getMessage() for r in caplog.records]
  assert f"evaluation skipped: {reason}" in messages
  assert f"no periodic kNN monitor: {reason}" in messages
  results = json.loads((workdir / "results.json").read_text())
  assert results["eval/skipped"] == reason and results["steps"] == 4
  assert not any(k.startswith(("knn/", "linear_probe/")) for k in results)
  assert (workdir / "training_curves.png").read_bytes()[:4] == b"\x89PNG"

  # config.json holds what the folder gave: size, one channel, no classes, and the pixel
  # statistics of all 24 images (fewer than data.stats_examples).
  stored = json.loads((workdir / "config.json").read_text())
  assert (stored["data"]["image_size"], stored["data"]["channels"]) == (16, 1)
  assert stored["data"]["num_classes"] == 0 and stored["augment"]["crop_size"] == 16
  pixels = images.astype(np.float64) / 255
  assert stored["data"]["mean"] == [round(pixels.mean(), 4)]
  assert stored["data"]["std"] == [round(pixels.std(), 4)]

  # Rerunning the command with a changed folder resumes with the stored statistics.
  from PIL import Image
  Image.fromarray(np.full((16, 16), 255, np.uint8)).save(tmp_path / "mine" / "train" / "xx.png")
  caplog.clear()
  assert cli.main(command) == 0
  assert json.loads(capsys.readouterr().out)["steps"] == 4
  assert json.loads((workdir / "config.json").read_text())["data"] == stored["data"]
  assert not (workdir / "config.previous.json").exists()

  # `ssljax eval` on the workdir: the same reason, exit 0.
  assert cli.main(["ssljax", "eval", "--workdir", str(workdir)]) == 0
  assert json.loads((workdir / "results.json").read_text())["eval/skipped"] == reason


@pytest.mark.parametrize("override, message", [
    ("--config.data.mean=(0.5, 0.5, 0.5)",
     r"data\.mean = \(0\.5, 0\.5, 0\.5\) needs one finite number per channel "
     r"\(data\.channels = 1\)"),
    ("--config.data.std=(0.2, 0.3)", r"data\.std = \(0\.2, 0\.3\) needs one finite number"),
    ("--config.data.data_dir=", r"data\.data_dir, which is empty; lay the images out as "
     r"DIR/train/<class>/<image>"),
])
def test_image_folder_config_errors_come_before_the_workdir(tmp_path, override, message):
  _write_unlabelled_folder(tmp_path / "mine")
  with pytest.raises(SystemExit, match=r"ssljax train: .*" + message + r".*nothing was written"
                     if "data_dir" in override else r"ssljax train: invalid config \(nothing "
                     r"was written\):\n  .*" + message):
    cli.main(["ssljax", "train", "--config", os.path.join(ROOT, "configs", "simclr.py:folder"),
              f"--config.data.data_dir={tmp_path / 'mine'}", override, "--workdir",
              str(tmp_path / "run"), *TINY_FOLDER_RUN])
  assert not (tmp_path / "run").exists()
