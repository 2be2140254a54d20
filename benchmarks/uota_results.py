"""UOTA against its base methods on Fashion-MNIST at equal budgets: kNN, linear probe, weights.

Runs each (config, seed) of the comparison with ``ssljax train`` from its own workdir, one
after another (a finished workdir is read, not rerun, so the script resumes a half-done
comparison), then prints a table and writes JSON:

  python benchmarks/uota_results.py [--runs swav_base,swav_uota,...] [--seeds 0 1]
      [--root runs/uota] [--json benchmarks/results/uota_results.json] [-- EXTRA OVERRIDES]

The arms (configs/*_uota.py, see their docstrings; every arm of one method shares views,
budget and schedule, and differs only in the add-on):

  swav_base       configs/swav_uota.py:fashion_mnist_base      multi-crop SwAV
  swav_uota       configs/swav_uota.py:fashion_mnist           + UOTA, closed form
  swav_learned    configs/swav_uota.py:fashion_mnist_learned   + UOTA, learned view model
  simclr_base     configs/simclr_uota.py:fashion_mnist_base    multi-crop SimCLR
  simclr_uota     configs/simclr_uota.py:fashion_mnist         + UOTA
  byol_base       configs/byol_uota.py:fashion_mnist_base      multi-crop BYOL
  byol_uota       configs/byol_uota.py:fashion_mnist           + UOTA

Reported per run: kNN top-1 (k = 200, t = 0.1) and linear-probe top-1 from results.json, wall
time, and for UOTA runs the last logged weight statistics (min, max, std, mean of the global
and of the small crops, and of each view: with ``augment.num_ood_crops`` among the overrides,
the last views are the out-of-distribution ones).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARMS = {
    "swav_base": "configs/swav_uota.py:fashion_mnist_base",
    "swav_uota": "configs/swav_uota.py:fashion_mnist",
    "swav_learned": "configs/swav_uota.py:fashion_mnist_learned",
    "simclr_base": "configs/simclr_uota.py:fashion_mnist_base",
    "simclr_uota": "configs/simclr_uota.py:fashion_mnist",
    "byol_base": "configs/byol_uota.py:fashion_mnist_base",
    "byol_uota": "configs/byol_uota.py:fashion_mnist",
}


def _last_weights(workdir: str) -> dict[str, float]:
  last: dict[str, float] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return last
  with open(path) as f:
    for line in f:
      record = json.loads(line)
      for key, value in record.items():
        if key.startswith("train/uota_w"):  # the summary statistics and every view's mean
          last[key[len("train/"):]] = value
  return last


def run_arm(arm: str, seed: int, root: str, extra: list[str]) -> dict:
  workdir = os.path.join(root, f"{arm}_s{seed}")
  results_path = os.path.join(workdir, "results.json")
  seconds = None
  if not os.path.exists(results_path):
    command = [sys.executable, "-m", "ssljax.cli", "train", "--config", ARMS[arm],
               "--workdir", workdir, f"--config.seed={seed}",
               "--config.train.progress_bar=False", *extra]
    print("running:", " ".join(command[1:]), flush=True)
    start = time.time()
    subprocess.run(command, cwd=REPO_ROOT, check=True)
    seconds = time.time() - start
  with open(results_path) as f:
    results = json.load(f)
  return {"arm": arm, "config": ARMS[arm], "seed": seed, "workdir": workdir,
          "knn_top1": results.get("knn/top1"), "probe_top1": results.get("linear_probe/top1"),
          "wall_seconds": seconds, **_last_weights(workdir)}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--runs", default="swav_base,swav_uota,swav_learned,simclr_base,"
                                        "simclr_uota,byol_base,byol_uota")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--root", default="runs/uota")
  parser.add_argument("--json", default="benchmarks/results/uota_results.json")
  parser.add_argument("extra", nargs="*", help="overrides passed to every run (after --)")
  args = parser.parse_args()
  arms = args.runs.split(",")
  unknown = sorted(set(arms) - set(ARMS))
  if unknown:
    raise SystemExit(f"unknown arms {unknown}; valid: {', '.join(ARMS)}")
  rows = []
  for seed in args.seeds:
    for arm in arms:
      rows.append(run_arm(arm, seed, os.path.join(REPO_ROOT, args.root), args.extra))
      if args.json:
        _write(args, rows)
  print(f"\n{'arm':14s} {'seed':>4s} {'kNN':>7s} {'probe':>7s} {'w_min':>6s} {'w_max':>6s} "
        f"{'w_glob':>6s} {'w_loc':>6s}")
  for row in rows:
    w = lambda k: f"{row[k]:6.3f}" if k in row else "     -"
    probe = f"{row['probe_top1']:7.4f}" if row["probe_top1"] is not None else "      -"
    print(f"{row['arm']:14s} {row['seed']:4d} {row['knn_top1']:7.4f} {probe} "
          f"{w('uota_w_min')} {w('uota_w_max')} {w('uota_w_global')} {w('uota_w_local')}")
  print()
  for arm in arms:
    knn = [r["knn_top1"] for r in rows if r["arm"] == arm]
    probe = [r["probe_top1"] for r in rows if r["arm"] == arm and r["probe_top1"] is not None]
    line = f"{arm:14s} mean kNN {statistics.mean(knn):.4f}"
    if probe:
      line += f", probe {statistics.mean(probe):.4f}"
    print(line + f" over seeds {args.seeds}")


def _write(args, rows) -> None:
  record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "python": platform.python_version(), "overrides": args.extra, "rows": rows}
  path = os.path.join(REPO_ROOT, args.json)
  with open(path, "w") as f:
    json.dump(record, f, indent=2)


if __name__ == "__main__":
  main()
