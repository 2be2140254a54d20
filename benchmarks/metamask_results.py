"""MetaMask against Barlow Twins on Fashion-MNIST: the table of finished workdirs, the official
kNN protocol, and the learned mask.

Run from the repository root after the runs of docs/results.md ("MetaMask"):

  python benchmarks/metamask_results.py [--root runs/metamask] [--arms mm,bt,nometa]
      [--seeds 0 1] [--official-knn] [--plot runs/metamask/mask.png]
      [--json benchmarks/results/metamask_results.json]

Workdirs are ``<root>/<arm>_s<seed>``. Per run: kNN top-1 (k=200, t=0.1) and the linear probe
from ``results.json``, the training wall time, and for MetaMask arms the last logged mask
statistics (``train/mask_*``). ``--official-knn`` adds the official MetaMask monitor's
protocol (k=5, t=1.0, on the evaluation features, which for MetaMask are the masked ones) from
the latest checkpoint. ``--plot`` draws, per MetaMask run, the sorted mask values
``sigmoid(alpha)`` of the latest checkpoint and the mask histogram over training
(``train/mask_hist_k``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

from run_table import finished_runs, metric_series  # noqa: E402  (benchmarks/)

ARMS = ("mm", "bt", "nometa")
MASK_KEYS = ("mask_mean", "mask_min", "mask_max", "mask_below_0.1", "mask_above_0.9",
             "meta_grad_norm")


def _restore(workdir: str):
  import jax

  from ssljax.eval.evaluate import encoder_variables
  from ssljax.train.loop import restore_latest

  run = restore_latest(workdir)
  variables = encoder_variables(run.config, run.method, run.state, run.mesh,
                                run.train_source.images)
  return run, jax.device_get(variables)


def official_knn(run, variables) -> float:
  """kNN top-1 with k=5, t=1.0 (the official MetaMask monitor) on the evaluation features."""
  import numpy as np

  from ssljax import data
  from ssljax.eval.features import extract_features
  from ssljax.eval.knn import knn_accuracy

  apply = lambda v, x: run.method.encoder.apply(v, x, train=False)
  test = data.build_source(run.config.data, run.config.data.test_split)
  bank = extract_features(apply, variables, run.train_source.images, batch_size=512)
  queries = extract_features(apply, variables, test.images, batch_size=512)
  acc = knn_accuracy(np.asarray(bank), run.train_source.labels, np.asarray(queries),
                     test.labels, num_classes=run.config.data.num_classes, k=5,
                     temperature=1.0)
  return float(acc["top1"])


def plot(rows, path: str) -> None:
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  runs = [r for r in rows if r.get("mask") is not None]
  if not runs:
    return
  fig, axes = plt.subplots(1, 1 + len(runs), figsize=(4.5 * (1 + len(runs)), 3.5))
  for r in runs:
    axes[0].plot(np.sort(np.asarray(r["mask"])), label=f"{r['arm']} seed {r['seed']}")
  axes[0].set(title="sorted mask sigmoid(alpha), last checkpoint", xlabel="dimension (sorted)",
              ylabel="mask")
  axes[0].legend()
  for ax, r in zip(axes[1:], runs):
    hists = [metric_series(r["workdir"], f"train/mask_hist_{k}") for k in range(10)]
    steps = [s for s, _ in hists[0]]
    grid = np.array([[v for _, v in h] for h in hists])
    ax.imshow(grid, aspect="auto", origin="lower", extent=(steps[0], steps[-1], 0, 1))
    ax.set(title=f"{r['arm']} seed {r['seed']}: mask histogram", xlabel="step",
           ylabel="mask value (10 bins)")
  fig.tight_layout()
  fig.savefig(path, dpi=100)


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="runs/metamask")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--official-knn", action="store_true")
  parser.add_argument("--plot", default="")
  parser.add_argument("--json", default="benchmarks/results/metamask_results.json")
  args = parser.parse_args()
  rows = []
  for row, _ in finished_runs(args.root, args.arms.split(","), args.seeds):
    workdir = row["workdir"]
    for key in MASK_KEYS:
      series = metric_series(workdir, f"train/{key}")
      if series:
        row[key] = series[-1][1]
    if args.official_knn or args.plot:
      run, variables = _restore(workdir)
      if args.official_knn:
        row["knn_k5_t1_top1"] = official_knn(run, variables)
      if "mask" in run.state.params:
        import jax
        row["mask"] = [float(m) for m in jax.nn.sigmoid(
            jax.device_get(run.state.params["mask"]["alpha"]))]
    rows.append(row)
    print({k: v for k, v in row.items() if k != "mask"}, flush=True)
  if args.plot:
    plot(rows, args.plot)
    print(f"wrote {args.plot}")
  os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(rows, f, indent=1)
  print(f"wrote {args.json}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
