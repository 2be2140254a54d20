"""The fault table of issue 14: inject each fault into tiny `ssljax train` runs and count passes.

Every run is ``python -m ssljax.cli train`` on the tiny SimCLR config of `tests.util.tiny_config`
(16 x 16 x 1 blobs, batch 16) in a subprocess, 40 steps with a checkpoint every 10 unless a row
says otherwise. Rows and what passing means:

  unwritable dir     ``chattr +i`` on checkpoints/ once step 10 is saved: exit 74 within
                     120 s, last line names the step and the PermissionError, step 10 intact
  full disk          workdir on a 64 MiB tmpfs filled up once step 10 is saved: exit 74 within
                     120 s, last line names the step, the write error and the free space
                     ("0.0 MiB free"), step 10 intact
  truncated newest   a copy of the finished 40-step run (checkpoints 30 and 40) with the
                     largest data file of step 40 halved, run again: exit 0, a warning names
                     step 40, resumed from 30, final state bit-equal to the uninterrupted run
  bit-flipped newest 64 bytes at a random offset of that file inverted: as above
  SIGTERM            checkpoint every step, SIGTERM after a random 3-10 steps: exit 143, no
                     StepAlreadyExistsError, the latest checkpoint is the step the log names
  kill -9            SIGKILL once a random 8-35 steps are logged (a metric every step), then
                     rerun: final state bit-equal to the uninterrupted run and every step once
                     in metrics.jsonl
  other method       resume the 40-step workdir with the MoCo config: exit 1 naming
                     method.name, workdir byte-for-byte unchanged
  bad config         lr -1, lr nan, batch 0, log/checkpoint interval 0, keep_checkpoints 0 on a
                     fresh workdir: exit 1 naming the key, the workdir not created

  python benchmarks/fault_injection.py [--trials 3] [--root /tmp/ssljax_faults]
      [--out benchmarks/results/fault_injection.json]

Needs root for chattr and mount (those rows are skipped otherwise). Subprocesses share a
persistent JAX compilation cache under --root, so only the first run compiles.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

CONFIG_FILE = '''
import sys
sys.path.insert(0, {root!r})
from tests.util import tiny_config

def get_config(method=None):
  c = tiny_config({data_dir!r}, method=method or "simclr")
  if method == "moco":
    c.method.moco.queue_size, c.method.moco.proj_hidden_dim, c.method.moco.proj_dim = 128, 16, 8
  return c
'''
BASE_FLAGS = ["--config.train.num_steps=40", "--config.train.checkpoint_every_steps=10",
              "--config.train.log_every_steps=5", "--config.eval.linear_probe=False",
              "--config.eval.plots=False"]
BOUND_S = 120


class Bench:
  """Paths, the environment and helpers shared by the rows."""

  def __init__(self, root: str):
    self.root = root
    os.makedirs(root, exist_ok=True)
    data_dir = os.path.join(root, "data")
    os.makedirs(data_dir, exist_ok=True)
    from tests.util import write_tiny_dataset
    write_tiny_dataset(data_dir)
    self.config = os.path.join(root, "tiny.py")
    with open(self.config, "w") as f:
      f.write(CONFIG_FILE.format(root=REPO_ROOT, data_dir=data_dir))
    self.env = dict(os.environ, JAX_PLATFORMS="cpu", TF_CPP_MIN_LOG_LEVEL="3",
                    JAX_COMPILATION_CACHE_DIR=os.path.join(root, "jax_cache"),
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.5")
    self._counter = 0
    self.reference_dir = ""

  def workdir(self, name: str) -> str:
    self._counter += 1
    path = os.path.join(self.root, f"{name}_{self._counter}")
    shutil.rmtree(path, ignore_errors=True)
    return path

  def command(self, workdir: str, *flags: str, config: str | None = None) -> list[str]:
    return [sys.executable, "-m", "ssljax.cli", "train", "--config", config or self.config,
            "--workdir", workdir, *BASE_FLAGS, *flags]

  def run(self, workdir: str, *flags: str, config: str | None = None,
          timeout: float = 600) -> tuple[int, str, float]:
    started = time.time()
    result = subprocess.run(self.command(workdir, *flags, config=config), env=self.env,
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=timeout)
    return result.returncode, result.stderr, time.time() - started

  def start(self, workdir: str, *flags: str) -> subprocess.Popen:
    return subprocess.Popen(self.command(workdir, *flags), env=self.env, cwd=REPO_ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate: Callable[[], bool], proc: subprocess.Popen, timeout: float) -> bool:
  deadline = time.time() + timeout
  while time.time() < deadline and proc.poll() is None:
    if predicate():
      return True
    time.sleep(0.05)
  return False


def _has_step(workdir: str, step: int) -> bool:
  return os.path.isdir(os.path.join(workdir, "checkpoints", str(step)))


def _finish(proc: subprocess.Popen, started: float) -> tuple[int | None, str, float]:
  try:
    _, err = proc.communicate(timeout=BOUND_S)
  except subprocess.TimeoutExpired:
    proc.kill()
    _, err = proc.communicate()
    return None, err, time.time() - started
  return proc.returncode, err, time.time() - started


def _final_state(workdir: str):
  import jax
  from ssljax.train import loop
  run = loop.restore_latest(workdir)
  return run.step, jax.device_get(run.state)


def _equal(a, b) -> bool:
  import jax
  import numpy as np
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _intact(workdir: str, step: int) -> bool:
  """Whether the workdir restores (checksums verified) at `step` or later."""
  from ssljax.train import loop
  try:
    run = loop.restore_latest(workdir)
  except Exception:  # noqa: BLE001  (any failure to restore is a failed row)
    return False
  return run.step >= step


def row_unwritable(bench: Bench, trial: int) -> dict[str, Any]:
  workdir = bench.workdir("unwritable")
  proc = bench.start(workdir)
  ok = _wait_for(lambda: _has_step(workdir, 10), proc, 300)
  subprocess.run(["chattr", "+i", os.path.join(workdir, "checkpoints")], check=True)
  try:
    rc, err, seconds = _finish(proc, time.time())
  finally:
    subprocess.run(["chattr", "-i", os.path.join(workdir, "checkpoints")], check=True)
  last = err.strip().splitlines()[-1] if err.strip() else ""
  passed = (ok and rc == 74 and "could not be written" in last and "PermissionError" in last
            and _intact(workdir, 10))
  return dict(passed=passed, rc=rc, seconds_after_fault=round(seconds, 1), last_line=last)


def row_full_disk(bench: Bench, trial: int) -> dict[str, Any]:
  mount = os.path.join(bench.root, f"disk_{trial}")
  os.makedirs(mount, exist_ok=True)
  subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", mount], check=True)
  try:
    workdir = os.path.join(mount, "run")
    proc = bench.start(workdir)
    ok = _wait_for(lambda: _has_step(workdir, 10), proc, 300)
    with open(os.path.join(mount, "filler"), "wb") as f:
      try:
        while True:
          f.write(b"\0" * (1 << 20))
          f.flush()
      except OSError:
        pass
    rc, err, seconds = _finish(proc, time.time())
    os.remove(os.path.join(mount, "filler"))
    last = err.strip().splitlines()[-1] if err.strip() else ""
    passed = (ok and rc == 74 and "could not be written" in last and "0.0 MiB free" in last
              and ("No space left" in last or "RESOURCE_EXHAUSTED" in last)
              and _intact(workdir, 10))
    return dict(passed=passed, rc=rc, seconds_after_fault=round(seconds, 1), last_line=last,
                stderr_lines=len(err.splitlines()))
  finally:
    subprocess.run(["umount", mount], check=False)


def _damaged_row(bench: Bench, reference, damage: Callable[[str], None],
                 name: str) -> dict[str, Any]:
  workdir = bench.workdir(name)
  shutil.copytree(bench.reference_dir, workdir)
  damage(workdir)
  rc, err, seconds = bench.run(workdir)
  named = "checkpoint step 40" in err and "is damaged" in err
  resumed = "resumed from step 30" in err
  step, state = _final_state(workdir) if rc == 0 else (None, None)
  exact = rc == 0 and step == 40 and _equal(state, reference)
  warning = next((l for l in err.splitlines() if "is damaged" in l), "")
  return dict(passed=rc == 0 and named and resumed and exact, rc=rc, named_damaged=named,
              resumed_from_30=resumed, bit_equal_to_uninterrupted=exact,
              warning=warning[:300], seconds=round(seconds, 1))


def _largest_state_file(workdir: str, step: int) -> str:
  top = os.path.join(workdir, "checkpoints", str(step), "state")
  files = [os.path.join(r, n) for r, _, names in os.walk(top) for n in names
           if f"{os.sep}d{os.sep}" in os.path.join(r, n)]
  return max(files, key=os.path.getsize)


def row_truncated(bench: Bench, trial: int, reference) -> dict[str, Any]:
  def damage(workdir):
    path = _largest_state_file(workdir, 40)
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  return _damaged_row(bench, reference, damage, "truncated")


def row_bit_flipped(bench: Bench, trial: int, reference) -> dict[str, Any]:
  rng = random.Random(trial)

  def damage(workdir):
    path = _largest_state_file(workdir, 40)
    size = os.path.getsize(path)
    offset = rng.randrange(0, max(size - 64, 1))
    with open(path, "r+b") as f:
      f.seek(offset)
      block = bytearray(f.read(64))
      f.seek(offset)
      f.write(bytes(b ^ 0xFF for b in block))
  return _damaged_row(bench, reference, damage, "bit_flipped")


def row_sigterm(bench: Bench, trial: int) -> dict[str, Any]:
  workdir = bench.workdir("sigterm")
  steps = random.Random(trial).randint(3, 10)
  proc = bench.start(workdir, "--config.train.num_steps=100000",
                     "--config.train.checkpoint_every_steps=1", "--config.train.log_every_steps=1")
  metrics = os.path.join(workdir, "metrics.jsonl")
  _wait_for(lambda: os.path.exists(metrics) and
            len(open(metrics).read().splitlines()) >= steps, proc, 300)
  proc.send_signal(signal.SIGTERM)
  rc, err, seconds = _finish(proc, time.time())
  lines = [l for l in err.splitlines() if "SIGTERM received at step" in l]
  step = int(lines[0].split("at step ")[1].split(":")[0]) if len(lines) == 1 else None
  from ssljax.train.checkpoint import Checkpointer
  latest = Checkpointer(workdir).latest_step()
  passed = (rc == 143 and "StepAlreadyExistsError" not in err and step is not None
            and latest == step)
  return dict(passed=passed, rc=rc, stopped_at=step, latest_checkpoint=latest,
              step_already_exists="StepAlreadyExistsError" in err,
              seconds_after_signal=round(seconds, 1))


def row_kill9(bench: Bench, trial: int, reference) -> dict[str, Any]:
  workdir = bench.workdir("kill9")
  proc = bench.start(workdir, "--config.train.log_every_steps=1")
  metrics = os.path.join(workdir, "metrics.jsonl")
  steps = random.Random(trial).randint(8, 35)
  _wait_for(lambda: os.path.exists(metrics) and
            len(open(metrics).read().splitlines()) >= steps, proc, 300)
  proc.kill()
  proc.communicate()
  logged = [json.loads(l)["step"] for l in open(metrics) if "train/loss" in l]
  rc, err, _ = bench.run(workdir, "--config.train.log_every_steps=1")
  step, state = _final_state(workdir) if rc == 0 else (None, None)
  exact = rc == 0 and step == 40 and _equal(state, reference)
  steps = [json.loads(l)["step"] for l in open(metrics) if "train/loss" in l]
  once = steps == sorted(set(steps))
  return dict(passed=exact and once, rc=rc, killed_after_logged_step=max(logged, default=0),
              bit_equal_to_uninterrupted=exact, metrics_steps_once=once)


def _snapshot(directory: str) -> dict[str, tuple[int, int]]:
  out = {}
  for r, _, names in os.walk(directory):
    for n in names:
      st = os.stat(os.path.join(r, n))
      out[os.path.relpath(os.path.join(r, n), directory)] = (st.st_size, st.st_mtime_ns)
  return out


def row_other_method(bench: Bench, trial: int, finished: str) -> dict[str, Any]:
  before = _snapshot(finished)
  rc, err, seconds = bench.run(finished, config=bench.config + ":moco")
  message = [l for l in err.splitlines() if "cannot resume" in l or "method.name:" in l]
  untouched = _snapshot(finished) == before
  passed = rc == 1 and "method.name: 'simclr' in the checkpoint, 'moco' now" in err and untouched
  return dict(passed=passed, rc=rc, workdir_untouched=untouched, seconds=round(seconds, 1),
              message=message)


BAD_CONFIGS = [("optim.lr", "-1.0"), ("optim.lr", "nan"), ("train.batch_size", "0"),
               ("train.log_every_steps", "0"), ("train.checkpoint_every_steps", "0"),
               ("train.keep_checkpoints", "0")]


def row_bad_config(bench: Bench, trial: int) -> dict[str, Any]:
  key, value = BAD_CONFIGS[trial % len(BAD_CONFIGS)]
  workdir = bench.workdir("bad_config")
  rc, err, seconds = bench.run(workdir, f"--config.{key}={value}")
  named = f"{key} = " in err
  passed = rc == 1 and named and not os.path.exists(workdir)
  return dict(passed=passed, rc=rc, key=key, value=value, named=named,
              workdir_created=os.path.exists(workdir), seconds=round(seconds, 1))


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--trials", type=int, default=3)
  parser.add_argument("--root", default="/tmp/ssljax_faults")
  parser.add_argument("--out", default=os.path.join(REPO_ROOT, "benchmarks", "results",
                                                    "fault_injection.json"))
  parser.add_argument("--rows", nargs="*", default=None, help="only these rows")
  args = parser.parse_args()
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  shutil.rmtree(args.root, ignore_errors=True)
  bench = Bench(args.root)
  is_root = os.geteuid() == 0

  started = time.time()
  reference_dir = bench.reference_dir = bench.workdir("reference")
  rc, err, seconds = bench.run(reference_dir)
  assert rc == 0, err[-3000:]
  _, reference = _final_state(reference_dir)
  print(f"reference 40-step run: {seconds:.0f} s", flush=True)

  rows: list[tuple[str, Callable[[int], dict[str, Any]], int]] = [
      ("bad config", lambda t: row_bad_config(bench, t), len(BAD_CONFIGS)),
      ("other method", lambda t: row_other_method(bench, t, reference_dir), args.trials),
      ("SIGTERM, checkpoint every step", lambda t: row_sigterm(bench, t), args.trials),
      ("truncated newest checkpoint", lambda t: row_truncated(bench, t, reference),
       args.trials),
      ("bit-flipped newest checkpoint", lambda t: row_bit_flipped(bench, t, reference),
       args.trials),
      ("kill -9, rerun", lambda t: row_kill9(bench, t, reference), args.trials),
  ]
  if is_root and shutil.which("chattr"):
    rows.append(("unwritable checkpoint dir (chattr +i)", lambda t: row_unwritable(bench, t),
                 args.trials))
  if is_root:
    rows.append(("full disk (tmpfs filled)", lambda t: row_full_disk(bench, t), args.trials))
  if args.rows:
    rows = [r for r in rows if r[0] in args.rows]

  results: dict[str, Any] = {"trials": args.trials, "rows": {}}
  for name, fn, trials in rows:
    outcomes = []
    for t in range(trials):
      try:
        outcomes.append(fn(t))
      except Exception as e:  # noqa: BLE001  (a crash of the harness is a failed trial)
        outcomes.append(dict(passed=False, harness_error=f"{type(e).__name__}: {e}"[:500]))
    results["rows"][name] = dict(passed=sum(o["passed"] for o in outcomes), trials=trials,
                                 outcomes=outcomes)
    print(f"{name:40s} {sum(o['passed'] for o in outcomes)}/{trials}", flush=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(results, f, indent=2)
  results["seconds"] = round(time.time() - started)
  with open(args.out, "w") as f:
    json.dump(results, f, indent=2)
  print("\n| fault | passed |\n| --- | --- |")
  for name, row in results["rows"].items():
    print(f"| {name} | {row['passed']}/{row['trials']} |")


if __name__ == "__main__":
  main()
