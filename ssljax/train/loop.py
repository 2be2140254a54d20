"""The trainer: mesh, input, init, step, checkpoint, evaluators, loop — in that order.

`train(config, workdir)` pretrains ``config.method.name`` and then evaluates the encoder
(`ssljax.eval.evaluate`). Running it again on the same workdir resumes from the latest
checkpoint (the input position and RNG are part of it, so the continuation equals an
uninterrupted run); a run that already finished goes straight to evaluation.

Nothing is written to the workdir before the config is validated (`ssljax.train.validate`),
including, on resume, its compatibility with the workdir's ``config.json``. A damaged newest
checkpoint is set aside and the newest intact one resumed (`Checkpointer.restore_latest_intact`);
``metrics.jsonl`` is cut back to the resumed step. SIGTERM (preemption) checkpoints the step
in progress once and exits with 143; on multi-host runs the hosts stop at the step orbax's
preemption sync point agrees on.

Multi-host (``jax.distributed`` started by ``ssljax train --distributed ...``, see
`ssljax.parallel`): every process runs this same function on the same workdir; each loads its
rows of every global batch, all take part in checkpointing (orbax writes the shared arrays
once), and only process 0 writes ``config.json``, metrics, plots and ``results.json``.

Progress: ``train.progress_bar`` shows a tqdm bar only when stderr is a terminal. Otherwise
(``progress_bar=False``, a log file, ``nohup``, a cluster job) process 0 logs one line every
``train.log_every_steps`` steps (step, epoch, loss, images/s, ETA). Each periodic kNN monitor
result is logged (or written above the bar).
"""

from __future__ import annotations

import functools
import logging
import signal
import sys
import time
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from ssljax import augment, data
from ssljax.config import check_method_sections, config_from_json, config_to_json
from ssljax.data.folder import resolve_config as resolve_folder_config
from ssljax.eval import evaluate
from ssljax.methods import RunInfo, build_method
from ssljax.parallel import (DATA_AXIS, check_batch_divisible, data_sharded, make_mesh,
                             replicated)
from ssljax.train.checkpoint import Checkpointer
from ssljax.train.metrics import FINAL_EVALUATION_KEYS, MetricWriter
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.paths import BucketPathError, workdir_path
from ssljax.train.step import (TrainState, compile_train_step, init_train_state,
                               make_per_device_step)
from ssljax.train.validate import ConfigError, check_resume_compatible, validate_config

log = logging.getLogger(__name__)


class DataSourceError(FileNotFoundError):
  """The run's data cannot be found or reached (a missing dataset, split or data directory,
  a bucket without its filesystem package or that does not answer); the message names the
  fix."""


def _build_source(config: ml_collections.ConfigDict, split: str):
  try:
    return data.build_source(config.data, split)
  except (FileNotFoundError, BucketPathError) as e:
    raise DataSourceError(str(e)) from None


class NonFiniteLossError(RuntimeError):
  """Raised when the loss or gradient stops being finite; the last good checkpoint is kept."""


def run_length(config: ml_collections.ConfigDict, num_examples: int) -> tuple[int, int]:
  """(steps_per_epoch, total_steps) for `num_examples` training images."""
  batch = config.train.batch_size
  steps_per_epoch = num_examples // batch
  if steps_per_epoch == 0:
    raise ValueError(f"train.batch_size = {batch} is larger than the training set "
                     f"({num_examples} images); lower --config.train.batch_size")
  total = config.train.num_steps or int(round(config.train.epochs * steps_per_epoch))
  if total <= 0:
    raise ValueError("the run has no steps: set train.epochs > 0 or train.num_steps > 0")
  return steps_per_epoch, total


def _upgraded(text: str) -> str:
  """A stored config.json as this version writes it (older ones hold every method's section)."""
  try:
    return config_to_json(config_from_json(text))
  except (KeyError, ValueError, TypeError):
    return text


def _save_config(config: ml_collections.ConfigDict, workdir: str) -> None:
  directory = workdir_path(workdir)
  path = directory / "config.json"
  text = config_to_json(config)
  if path.exists():
    previous = path.read_text(encoding="utf-8")
    if previous != text and _upgraded(previous) != text:
      log.warning("config differs from the one this workdir was started with; the saved "
                  "%s is kept as config.previous.json", path)
      (directory / "config.previous.json").write_text(previous, encoding="utf-8")
  path.write_text(text, encoding="utf-8")


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = workdir_path(workdir) / "config.json"
  if not path.exists():
    raise FileNotFoundError(f"{path} not found: {workdir} is not an ssljax workdir (run "
                            f"`ssljax train --config ... --workdir {workdir}` first)")
  return config_from_json(path.read_text(encoding="utf-8"))


def _stored_resume_config(workdir: str) -> ml_collections.ConfigDict | None:
  """The stored config of `workdir` if it holds a checkpoint to resume, else None."""
  directory = workdir_path(workdir)
  steps = directory / "checkpoints"
  if not (steps.is_dir() and any(p.name.isdigit() for p in steps.iterdir())):
    return None
  path = directory / "config.json"
  if not path.exists():
    return None
  text = path.read_text(encoding="utf-8")
  try:
    return config_from_json(text)
  except (KeyError, ValueError, TypeError) as e:
    raise ConfigError(f"{path} cannot be read as an ssljax config ({e}); it was written by "
                      f"another ssljax version or edited. Use a new --workdir.") from e


class _StopRequest:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps.

  Single process: a Python SIGTERM handler sets the flag. Multi-host (``jax.distributed``):
  JAX's preemption notifier receives SIGTERM, and `should_stop` asks orbax's preemption sync
  point, which is true on every host at the same step, so all hosts save that step and stop
  together instead of one host waiting forever in a collective of the others.
  """

  def __init__(self, ckpt: Checkpointer):
    self.requested = False
    self._previous = None
    self._ckpt = ckpt
    self._multihost = jax.process_count() > 1

  def __enter__(self):
    if self._multihost:
      return self
    try:
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread: no signal handling
      self._previous = None
    return self

  def should_stop(self, step: int) -> bool:
    if self._multihost and not self.requested:
      self.requested = self._ckpt.reached_preemption(step)
    return self.requested

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def build_state_and_step(config, mesh, image_shape, steps_per_epoch, total_steps,
                         num_examples=None, *, training: bool = False):
  """The method, its policy, the abstract and initialiser of the state, and the step.

  `training`: built to train on `mesh` (the method may check per-device sizes against it);
  evaluation, export and analysis restore states on whatever devices they have.
  """
  method = build_method(config, axis_name=DATA_AXIS,
                        run=RunInfo(steps_per_epoch=steps_per_epoch, total_steps=total_steps,
                                    num_examples=num_examples,
                                    data_devices=mesh.size if training else None))
  policy = augment.build_policy(config.augment, config.data.mean)
  if policy.num_views < method.num_views:
    raise ValueError(f"method {method.name!r} needs {method.num_views} views but augment."
                     f"policy {config.augment.policy!r} makes {policy.num_views}")
  schedule = build_schedule(config.optim, global_batch=config.train.batch_size,
                            total_steps=total_steps, steps_per_epoch=steps_per_epoch)
  tx = build_optimizer(config.optim, schedule, method.param_groups)
  init = jax.jit(functools.partial(init_train_state, method, tx, policy, image_shape,
                                   config.seed), out_shardings=replicated(mesh))
  step = compile_train_step(make_per_device_step(method, tx, policy, schedule), mesh)
  return method, init, step


def _raise_nonfinite(step: int, ckpt: Checkpointer, hint: str = "") -> None:
  """Stops the run naming the step, the last good checkpoint and (`hint`) the method's cause."""
  last = ckpt.latest_step()
  where = f"step {last} in {ckpt.directory}" if last is not None else "none was written yet"
  raise NonFiniteLossError(
      f"the loss or gradient became non-finite at step {step}. Training stopped; the state "
      f"was frozen at the last finite step and not checkpointed (last good checkpoint: "
      f"{where}). Try a lower --config.optim.lr, --config.optim.grad_clip_norm=1.0, or "
      f"--config.train.compute_dtype=float32.{' ' + hint if hint else ''}")


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Pretrains, checkpoints, evaluates; returns the evaluation results.

  The image-folder preset's open keys (``ssljax.data.folder``) are filled in first, from the
  workdir's config on resume, else from the folder; ``config.json`` stores the values used.
  Evaluation is skipped, with the reason logged and in ``results.json``, when
  ``eval.enabled`` is False or the data cannot be evaluated (`evaluate.skip_reason`). A
  streaming source (`ssljax.data.streaming`) is evaluated, monitor and final evaluation alike,
  on subsets of ``eval.monitor_train_examples`` / ``eval.monitor_test_examples`` images read a
  batch at a time; with either at 0 (a whole split) it is skipped with a reason naming them.

  Raises:
    ConfigError: the config is invalid (also when the method, its augmentation policy or
      optimiser refuses it while being built) or cannot resume the workdir's checkpoint
      (nothing was written).
    CheckpointMismatchError, NoIntactCheckpointError: see `Checkpointer`.
    CheckpointSaveError: a checkpoint could not be written (training stopped).
    WorkdirError: a bucket workdir (gs://) without its filesystem package, or one that does
      not answer within $SSLJAX_BUCKET_TIMEOUT seconds.
    DataSourceError: the training data cannot be found or reached.
  """
  check_method_sections(config)
  workdir_path(workdir)  # a gs:// workdir without gcsfs, or unreachable, fails here first
  stored = _stored_resume_config(workdir)
  try:  # the image-folder preset's open keys: from the checkpoint's config, else the folder
    config = resolve_folder_config(config, stored)
  except (ValueError, OSError) as e:
    raise ConfigError(f"{e} (nothing was written)") from None
  validate_config(config)
  if stored is not None:
    check_resume_compatible(stored, config, workdir)
  started = time.time()

  # ------------------------------------------------------------------ mesh
  try:
    mesh = _mesh(config)
    check_batch_divisible(config.train.batch_size, mesh)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  log.info("devices: %d x %s, processes: %d (this is process %d, %d local devices)",
           jax.device_count(), jax.devices()[0].platform, jax.process_count(),
           jax.process_index(), jax.local_device_count())

  # ------------------------------------------------------------------ input
  train_source = _build_source(config, config.data.train_split)
  steps_per_epoch, total_steps = run_length(config, len(train_source))
  image_shape = tuple(train_source.image_shape)

  # ------------------------------------------------------------------ init / restore
  try:  # a method builder's own checks of its config section (SimCLR's positives, CLD, UOTA)
    method, init, step_fn = build_state_and_step(config, mesh, image_shape, steps_per_epoch,
                                                 total_steps, len(train_source),
                                                 training=True)
  except ValueError as e:
    raise ConfigError(f"{e} (nothing was written)") from None
  workdir_path(workdir).mkdir(parents=True, exist_ok=True)
  ckpt = Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
  restored = ckpt.restore_latest_intact(jax.eval_shape(init))
  if jax.process_index() == 0:  # one writer; every process saves its part of checkpoints
    _save_config(config, workdir)
  if restored is None:
    state = init()
  else:
    latest, state, meta = restored
    log.info("resumed from step %d (input position %d)", latest, meta["position"])
  start_step = int(state.step)

  writer = MetricWriter(workdir, resume_step=start_step)
  try:  # closed on every exit: an open TensorBoard writer's exit hook fails on Python 3.12
    monitor = (evaluate.knn_monitor(config, method, mesh, train_source=train_source)
               if config.train.eval_every_steps else None)
    if start_step < total_steps:
      try:
        state = _loop(config, state, step_fn, train_source, mesh, ckpt, writer, monitor,
                      start_step, total_steps, steps_per_epoch,
                      nonfinite_hint=method.nonfinite_hint)
      finally:
        ckpt.wait()
    pretrain_seconds = time.time() - started

    # ---------------------------------------------------------------- evaluators
    results = evaluate.evaluate_state(config, method, state, mesh, train_source=train_source,
                                      workdir=workdir)
    results.update({"steps": int(state.step), "epochs": int(state.step) / steps_per_epoch,
                    "pretrain_seconds_this_session": pretrain_seconds,
                    "total_seconds_this_session": time.time() - started})
    for key in sorted(FINAL_EVALUATION_KEYS):
      if key in results:
        writer.write(int(state.step), {key: results[key]})
  finally:
    writer.close()
  ckpt.close()
  results.update(evaluate.addon_reports(config, method, state, workdir,
                                        train_source=train_source))
  evaluate.write_results(config, workdir, results)
  return results


def _mesh(config: ml_collections.ConfigDict):
  """The run's data mesh (``train.mesh_device_order``; a workdir config from before the key
  existed gets the default order)."""
  return make_mesh(device_order=config.train.get("mesh_device_order", "devices"))


def _host_loader(config: ml_collections.ConfigDict, source, start_step: int, total_steps: int):
  """The loader of this host's rows: `StreamingLoader` for a streaming source (grain workers
  decode and pre-crop), else `HostLoader`; both derive every batch from (seed, step)."""
  common = dict(global_batch=config.train.batch_size, seed=config.seed, start_step=start_step,
                process_index=jax.process_index(), process_count=jax.process_count(),
                prefetch=config.data.prefetch)
  if isinstance(source, data.StreamingSource):
    return data.StreamingLoader(source, end_step=total_steps,
                                workers=config.data.stream_workers,
                                threads=config.data.stream_threads, **common)
  return data.HostLoader(source, **common)


def use_progress_bar(progress_bar: bool, stream) -> bool:
  """The interactive bar only on a terminal: in a log file its carriage-return updates pile
  up, so off a TTY (``nohup``, clusters, pods) the loop logs one line per
  ``train.log_every_steps`` instead."""
  isatty = getattr(stream, "isatty", None)
  return bool(progress_bar) and callable(isatty) and bool(isatty())


def _clock(seconds: float) -> str:
  seconds = max(int(round(seconds)), 0)
  return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def progress_line(step: int, total_steps: int, steps_per_epoch: int,
                  means: dict[str, float], seconds_per_step: float) -> str:
  """One log line of training progress: step, epoch, loss, images/s and the ETA.

  The ETA assumes the remaining steps run at the last window's pace (periodic kNN monitors
  excluded; the first window includes compilation, so its ETA is high).
  """
  eta = (total_steps - step) * seconds_per_step
  return (f"step {step}/{total_steps} (epoch {step / steps_per_epoch:.2f} of "
          f"{total_steps / steps_per_epoch:.2f}): loss {means['train/loss']:.4f}, "
          f"{means['train/images_per_sec']:.0f} images/s, ETA {_clock(eta)}")


def monitor_line(step: int, steps_per_epoch: int, record: dict[str, Any],
                 seconds: float) -> str:
  """The periodic kNN monitor's result as one line."""
  values = ", ".join(f"{key.removeprefix('monitor/')} {float(value):.4f}"
                     for key, value in sorted(record.items()))
  return (f"kNN monitor at step {step} (epoch {step / steps_per_epoch:.2f}): {values} "
          f"({seconds:.1f} s)")


def _loop(config, state: TrainState, step_fn, source, mesh, ckpt: Checkpointer,
          writer: MetricWriter, monitor, start_step: int, total_steps: int,
          steps_per_epoch: int, *, nonfinite_hint: str = "") -> TrainState:
  """Runs steps [start_step, total_steps); checkpoints, logs, monitors."""
  tc = config.train
  loader = _host_loader(config, source, start_step, total_steps)
  sharding = data_sharded(mesh)
  pending: list[dict[str, jax.Array]] = []
  window_start, window_steps, window_excluded = time.time(), 0, 0.0
  bar = None
  chief = jax.process_index() == 0
  if chief and use_progress_bar(tc.progress_bar, sys.stderr):
    from tqdm import tqdm  # deferred: only the interactive bar needs it
    bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
               desc=f"{config.method.name}", file=sys.stderr)
  elif chief and tc.progress_bar:
    log.info("no progress bar: stderr is not a terminal; logging every %d steps",
             tc.log_every_steps)

  def report(line: str) -> None:  # above the bar, else a log line
    if bar is not None:
      bar.write(line, file=sys.stderr)
    elif chief:
      log.info("%s", line)

  def to_device(x):
    return data.to_global_array(x, mesh, sharding.spec)

  saved = {"step": start_step}  # a resumed run's first step is already on disk

  def save(step: int) -> None:
    if step == saved["step"]:
      return
    if int(state.nonfinite_step) >= 0:
      _raise_nonfinite(int(state.nonfinite_step), ckpt, nonfinite_hint)
    ckpt.save(step, state, {"position": step, "epoch": step / steps_per_epoch,
                            "steps_per_epoch": steps_per_epoch})
    saved["step"] = step

  try:
    with _StopRequest(ckpt) as stop:
      for step in range(start_step, total_steps):
        batch = next(loader)
        assert batch["step"] == step, (batch["step"], step)
        state, metrics = step_fn(state, to_device(batch["image"]), to_device(batch["index"]),
                                 to_device(batch["label"]))
        pending.append(metrics)
        window_steps += 1
        done = step + 1
        if done % tc.log_every_steps == 0 or done == total_steps:
          bad = int(state.nonfinite_step)
          if bad >= 0:
            _raise_nonfinite(bad, ckpt, nonfinite_hint)
          means = jax.tree.map(lambda *xs: float(np.mean(jax.device_get(xs))), *pending)
          elapsed = time.time() - window_start - window_excluded
          means["train/images_per_sec"] = window_steps * tc.batch_size / max(elapsed, 1e-9)
          means["train/epoch"] = done / steps_per_epoch
          writer.write(done, means)
          if bar is not None:
            bar.set_postfix(loss=f"{means['train/loss']:.4f}",
                            img_s=f"{means['train/images_per_sec']:.0f}", refresh=False)
          elif chief:
            log.info("%s", progress_line(done, total_steps, steps_per_epoch, means,
                                         seconds_per_step=elapsed / window_steps))
          pending, window_start, window_steps, window_excluded = [], time.time(), 0, 0.0
        if bar is not None:
          bar.update(1)
        if done % tc.checkpoint_every_steps == 0 or done == total_steps:
          save(done)
        if monitor is not None and (done % tc.eval_every_steps == 0):
          jax.block_until_ready(state)  # steps in flight count as training time
          monitor_start = time.time()
          record = monitor(state)
          monitor_seconds = time.time() - monitor_start
          writer.write(done, {**record, "monitor/seconds": monitor_seconds})
          report(monitor_line(done, steps_per_epoch, record, monitor_seconds))
          window_excluded += monitor_seconds  # keep evaluation out of images/s
        if stop.should_stop(done):
          log.warning("SIGTERM received at step %d: %s; exiting with 143", done,
                      "its checkpoint is already written" if saved["step"] == done
                      else "checkpointing it")
          save(done)
          ckpt.wait()
          raise SystemExit(128 + signal.SIGTERM)
  except KeyboardInterrupt:
    done = int(state.step)
    if int(state.nonfinite_step) < 0 and done > start_step:
      log.warning("interrupted: checkpointing step %d", done)
      save(done)
    raise
  finally:
    loader.close()
    if bar is not None:
      bar.close()
  return state


class RestoredRun(NamedTuple):
  """A workdir's latest checkpoint, restored with everything needed to evaluate it."""

  config: ml_collections.ConfigDict
  mesh: Any
  method: Any
  state: Any
  train_source: Any
  step: int
  steps_per_epoch: int


def restore_latest(workdir: str, config: ml_collections.ConfigDict | None = None
                   ) -> RestoredRun:
  """Restores the latest checkpoint of `workdir` (the workdir's saved config by default).

  Raises:
    FileNotFoundError: the workdir has no checkpoint yet.
    ConfigError: the method, its policy or optimiser refuses the config (e.g. an override
      given to ``ssljax eval`` or ``export``); nothing was read or written.
  """
  config = config or load_workdir_config(workdir)
  mesh = _mesh(config)
  train_source = _build_source(config, config.data.train_split)
  steps_per_epoch, total_steps = run_length(config, len(train_source))
  try:  # the builders' own checks, as in `train`
    method, init, _ = build_state_and_step(config, mesh, tuple(train_source.image_shape),
                                           steps_per_epoch, total_steps, len(train_source))
  except ValueError as e:
    raise ConfigError(f"{e} (nothing was written)") from None
  directory = workdir_path(workdir) / "checkpoints"
  ckpt = (Checkpointer(workdir, max_to_keep=config.train.keep_checkpoints)
          if directory.is_dir() else None)
  restored = ckpt.restore_latest_intact(jax.eval_shape(init)) if ckpt is not None else None
  if restored is None:
    raise FileNotFoundError(f"no checkpoint in {directory}; train first with "
                            f"`ssljax train --config ... --workdir {workdir}`")
  latest, state, _ = restored
  ckpt.close()
  return RestoredRun(config, mesh, method, state, train_source, latest, steps_per_epoch)


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None
                     ) -> dict[str, Any]:
  """Restores the latest checkpoint of `workdir` and evaluates it (``ssljax eval``)."""
  run = restore_latest(workdir, config)
  results = evaluate.evaluate_state(run.config, run.method, run.state, run.mesh,
                                    train_source=run.train_source, workdir=workdir)
  results.update({"steps": run.step, "epochs": run.step / run.steps_per_epoch})
  results.update(evaluate.addon_reports(run.config, run.method, run.state, workdir,
                                        train_source=run.train_source))
  evaluate.write_results(run.config, workdir, results)
  return results
