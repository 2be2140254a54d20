"""Pretrains every baseline on Fashion-MNIST with one budget and tabulates kNN and probe.

Each method runs from its ``configs/<method>.py:fashion_mnist`` (same backbone, batch, seed
and epochs for all; the budget is overridden with ``--epochs``) through the ``ssljax train``
command, one after the other so that the runs do not share the cores, and its
``results.json`` (weighted kNN k=200 t=0.1 on the encoder's L2-normalised features, offline
linear probe with a held-out split) is collected into a Markdown table and a JSON record.

  python benchmarks/fashion_mnist_table.py --epochs 4 [--methods simclr,moco,...] \
      [--workdir runs/table] [--json benchmarks/results/fashion_mnist_table.json] \
      [--markdown docs/results_fashion_mnist.md] [--collect-only]

A workdir that already holds finished results is not retrained (delete it to rerun), so an
interrupted sweep resumes where it stopped.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

METHODS = ("simclr", "moco", "byol", "swav", "barlow_twins", "npid", "dino")


def _cpu_name() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _train(method: str, workdir: str, epochs: float, seed: int) -> float:
  """Runs ``ssljax train`` for `method`; returns the wall time in seconds."""
  path = os.path.join("configs", f"{method}.py")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} not found: every method in --methods needs a config "
                            f"with a Fashion-MNIST recipe")
  config = f"{path}:fashion_mnist"
  command = [sys.executable, "-m", "ssljax.cli", "train", "--config", config,
             "--workdir", workdir, f"--config.train.epochs={epochs}", f"--config.seed={seed}",
             "--config.train.progress_bar=False"]
  print("+", " ".join(command), flush=True)
  started = time.time()
  subprocess.run(command, check=True)
  return time.time() - started


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--methods", default=",".join(METHODS))
  parser.add_argument("--epochs", type=float, default=4.0)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--workdir", default="runs/table")
  parser.add_argument("--json", default="benchmarks/results/fashion_mnist_table.json")
  parser.add_argument("--markdown", default="docs/results_fashion_mnist.md")
  parser.add_argument("--collect-only", action="store_true",
                      help="only tabulate the results already in --workdir")
  args = parser.parse_args()

  rows = []
  for method in args.methods.split(","):
    workdir = os.path.join(args.workdir, method)
    results_path = os.path.join(workdir, "results.json")
    wall = None
    if not os.path.exists(results_path) and not args.collect_only:
      wall = _train(method, workdir, args.epochs, args.seed)
    if not os.path.exists(results_path):
      print(f"{method}: no results in {workdir}, skipped", flush=True)
      continue
    with open(results_path, encoding="utf-8") as f:
      results = json.load(f)
    timing_path = os.path.join(workdir, "wall_seconds.json")
    if wall is not None:
      with open(timing_path, "w", encoding="utf-8") as f:
        json.dump({"wall_seconds": wall}, f)
    elif os.path.exists(timing_path):
      with open(timing_path, encoding="utf-8") as f:
        wall = json.load(f)["wall_seconds"]
    rows.append({
        "method": method,
        "config": f"configs/{method}.py:fashion_mnist",
        "epochs": results.get("epochs"),
        "seed": results.get("seed"),
        "knn_top1": results.get("knn/top1"),
        "linear_probe_top1": results.get("linear_probe/top1"),
        "linear_probe_holdout_top1": results.get("linear_probe/holdout_top1"),
        "pretrain_seconds": results.get("pretrain_seconds_this_session"),
        "wall_seconds": wall,
        "date": results.get("date"),
        "devices": results.get("devices"),
    })

  machine = f"{_cpu_name()}, {os.cpu_count()} cores"
  record = {"epochs": args.epochs, "seed": args.seed, "machine": machine,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "rows": rows}
  os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)

  def fmt(value, spec):
    return "-" if value is None else format(value, spec)

  lines = ["| method | config | epochs | kNN top-1 (k=200, t=0.1) | linear probe top-1 | "
           "train + eval wall (s) |", "|---|---|---|---|---|---|"]
  for row in rows:
    lines.append(f"| {row['method']} | `{row['config']}` | {fmt(row['epochs'], '.0f')} | "
                 f"{fmt(row['knn_top1'], '.4f')} | {fmt(row['linear_probe_top1'], '.4f')} | "
                 f"{fmt(row['wall_seconds'], '.0f')} |")
  table = "\n".join(lines)
  print(table)
  print(f"machine: {machine}; seed {args.seed}; JSON: {args.json}")
  if args.markdown:
    os.makedirs(os.path.dirname(args.markdown) or ".", exist_ok=True)
    with open(args.markdown, "w", encoding="utf-8") as f:
      f.write(f"<!-- written by benchmarks/fashion_mnist_table.py on {record['date']} -->\n")
      f.write(table + "\n")


if __name__ == "__main__":
  main()
