r"""Step time of a two-process run (jax.distributed over gloo, 2 CPU devices per process) over
the one-process run with the same 4 devices, on the default job's model and batch.

  python benchmarks/multiprocess_step.py [--steps 40] [--set KEY=VALUE ...]
      [--out benchmarks/results/multiprocess_step.json]

Both runs are `ssljax train` subprocesses on the same generated data (2,048 class-blob images of
28x28x1, tests/util.py's generator; the recipe of configs/simclr.py:fashion_mnist otherwise:
resnet_tiny + 512-wide expansion, batch 256, LARS), one after the other. images/s is the
trainer's own train/images_per_sec, averaged over the windows of `log_every_steps` after the
first (which holds compilation). Both processes of the two-process run share this machine's
cores, so the ratio measures the cost of the cross-process collectives and of two Python
processes, not a speed-up.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

_JSON_CONFIG = """
from ssljax.config import config_from_json


def get_config(path):
  with open(path, encoding="utf-8") as f:
    return config_from_json(f.read())
"""


def _config(directory: str, steps: int, log_every: int) -> str:
  from ssljax.config import config_to_json, load_config
  from tests.util import write_tiny_dataset
  write_tiny_dataset(directory, num_train=2048, num_test=256, size=28)
  c = load_config(os.path.join(_REPO, "configs", "simclr.py") + ":fashion_mnist")
  with c.unlocked():
    c.data.source = "arrays"
    c.data.name = "blobs"
    c.data.data_dir = directory
    c.data.train_split, c.data.test_split = "train", "test"
    c.data.num_classes = 4
    c.train.num_steps = steps
    c.train.log_every_steps = log_every
    c.train.checkpoint_every_steps = steps
    c.train.eval_every_steps = 0
    c.train.progress_bar = False
    c.eval.linear_probe = False
    c.eval.plots = False
  path = os.path.join(directory, "config.json")
  with open(path, "w", encoding="utf-8") as f:
    f.write(config_to_json(c))
  with open(os.path.join(directory, "json_config.py"), "w", encoding="utf-8") as f:
    f.write(_JSON_CONFIG)
  return f"{os.path.join(directory, 'json_config.py')}:{path}"


def _run(config: str, workdir: str, processes: int, devices_per_process: int,
         overrides: list[str]) -> dict:
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": _REPO,
         "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices_per_process}"}
  base = [sys.executable, "-m", "ssljax.cli", "train", "--config", config, "--workdir", workdir,
          *(f"--config.{o}" for o in overrides)]
  if processes > 1:
    with socket.socket() as s:
      s.bind(("localhost", 0))
      port = s.getsockname()[1]
    commands = [base + ["--coordinator_address", f"localhost:{port}", "--num_processes",
                        str(processes), "--process_id", str(i)] for i in range(processes)]
  else:
    commands = [base]
  started = time.time()
  procs = [subprocess.Popen(c, env=env, cwd=_REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True) for c in commands]
  for p in procs:
    _, err = p.communicate()
    if p.returncode:
      raise SystemExit(f"{' '.join(p.args)} failed ({p.returncode}):\n{err[-3000:]}")
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    windows = [json.loads(line) for line in f]
  rates = [w["train/images_per_sec"] for w in windows if "train/images_per_sec" in w][1:]
  return {"processes": processes, "devices_per_process": devices_per_process,
          "images_per_sec_windows": rates,
          "images_per_sec": sum(rates) / len(rates),
          "wall_seconds": time.time() - started}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--steps", type=int, default=40)
  parser.add_argument("--log-every", type=int, default=10)
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="a config override for both runs, e.g. model.sync_batchnorm=False")
  parser.add_argument("--out", default=os.path.join(_REPO, "benchmarks", "results",
                                                    "multiprocess_step.json"))
  args = parser.parse_args()
  with tempfile.TemporaryDirectory(prefix="ssljax-mp-") as tmp:
    config = _config(tmp, args.steps, args.log_every)
    one = _run(config, os.path.join(tmp, "one"), 1, 4, args.set)
    two = _run(config, os.path.join(tmp, "two"), 2, 2, args.set)
  with open("/proc/loadavg", encoding="utf-8") as f:
    load = f.read().split()[:3]
  record = {
      "what": "ssljax train step, 2 processes x 2 CPU devices (gloo) vs 1 process x 4 devices",
      "one_process": one, "two_processes": two,
      "step_time_ratio_two_over_one": one["images_per_sec"] / two["images_per_sec"],
      "overrides": args.set, "batch_size": 256, "steps": args.steps, "log_every_steps": args.log_every,
      "machine": f"{platform.node()}, {os.cpu_count()} cores, load average {' '.join(load)}",
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }
  os.makedirs(os.path.dirname(args.out), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)
  print(json.dumps(record, indent=2))


if __name__ == "__main__":
  main()
