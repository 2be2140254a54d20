"""CLD against its base methods on Fashion-MNIST at equal budgets: the table of docs/results.md.

Reads finished ``ssljax train`` workdirs ``<root>/<arm>_s<seed>`` (the runs themselves are the
commands listed in docs/results.md, CLD section; this script does not train), and prints a
Markdown table and writes JSON with, per run:

  * kNN top-1 (k = 200, t = 0.1, L2-normalised 512-d backbone features) and linear-probe
    top-1, from results.json (ssljax's default protocol);
  * with ``--head-knn``: the official CLD protocol, a weighted kNN (k = 200, sigma = the
    instance temperature of the run's config) on the L2-normalised 128-d instance-branch
    output (NPID: ``head``, MoCo / BYOL: ``projector``), bank = the whole train split, queries
    = the test split (CLD test.py ``kNN``), from the latest checkpoint;
  * the last logged ``train/group_acc`` and ``train/cld_loss`` of CLD runs, and a plot of the
    group accuracy over training (``--plot``).

  python benchmarks/cld_results.py [--root runs/cld] [--arms npid,npidcld,...] [--seeds 0 1]
      [--head-knn] [--json benchmarks/results/cld_results.json]
      [--plot benchmarks/results/cld_group_acc.png]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script from a checkout without installing
  sys.path.insert(0, REPO_ROOT)

from run_table import finished_runs, metric_series  # noqa: E402  (benchmarks/)
ARMS = ("npid", "npidcld", "moco", "mococld", "byol", "byolcld")
_INSTANCE_HEAD = {"npid": ("head/output", "npid"), "moco": ("projector/output", "moco"),
                  "byol": ("projector/output", None)}


def head_knn(workdir: str) -> float:
  """Top-1 of CLD's kNN protocol on the instance-branch output of the latest checkpoint."""
  import jax
  import numpy as np

  from ssljax import data
  from ssljax.eval.features import extract_features
  from ssljax.eval.knn import knn_accuracy
  from ssljax.train.loop import restore_latest

  run = restore_latest(workdir)
  config, method, state = run.config, run.method, run.state
  layer, section = _INSTANCE_HEAD[config.method.name]
  temperature = config.method[section].temperature if section else 0.1
  params, method_state = jax.device_get((state.params, state.method_state))
  encoder_vars = method.eval_variables(params, method_state)

  def apply(variables, x):
    encoder_vars, params, method_state = variables
    h = method.encoder.apply(encoder_vars, x, train=False)
    return method.head_layers(params, method_state, (h,))[layer]

  variables = (encoder_vars, params, method_state)
  test = data.build_source(config.data, config.data.test_split)
  train = run.train_source
  bank = extract_features(apply, variables, train.images, batch_size=512)
  queries = extract_features(apply, variables, test.images, batch_size=512)
  acc = knn_accuracy(np.asarray(bank), train.labels, np.asarray(queries), test.labels,
                     num_classes=config.data.num_classes, k=200, temperature=temperature)
  return float(acc["top1"])


def main() -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="runs/cld")
  parser.add_argument("--arms", default=",".join(ARMS))
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--head-knn", action="store_true")
  parser.add_argument("--json", default="benchmarks/results/cld_results.json")
  parser.add_argument("--plot", default="")
  args = parser.parse_args()
  rows = []
  for row, _ in finished_runs(args.root, args.arms.split(","), args.seeds):
    workdir = row["workdir"]
    for key in ("group_acc", "cld_loss"):
      series = metric_series(workdir, f"train/{key}")
      row[key] = series[-1][1] if series else None
    if args.head_knn:
      row["head_knn_top1"] = head_knn(workdir)
    rows.append(row)

  fmt = lambda x: "-" if x is None else f"{x:.4f}"
  print("| arm | seed | kNN top-1 (backbone) | linear probe | kNN top-1 (128-d head) | "
        "group acc (last) | seconds |")
  print("|---|---|---|---|---|---|---|")
  for r in rows:
    print(f"| {r['arm']} | {r['seed']} | {fmt(r['knn_top1'])} | {fmt(r['probe_top1'])} | "
          f"{fmt(r.get('head_knn_top1'))} | {fmt(r['group_acc'])} | {r['seconds'] or 0:.0f} |")
  for arm in dict.fromkeys(r["arm"] for r in rows):
    means = {}
    for key in ("knn_top1", "probe_top1", "head_knn_top1"):
      values = [r.get(key) for r in rows if r["arm"] == arm and r.get(key) is not None]
      means[key] = f"{statistics.mean(values):.4f} ({len(values)} seeds)" if values else "-"
    print(f"mean {arm}: kNN {means['knn_top1']}, probe {means['probe_top1']}, head kNN "
          f"{means['head_knn_top1']}")
  os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(rows, f, indent=1)
  if args.plot:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for r in rows:
      series = metric_series(r["workdir"], "train/group_acc")
      if series:
        ax.plot(*zip(*series), label=f"{r['arm']} seed {r['seed']}")
    ax.set_xlabel("step")
    ax.set_ylabel("group accuracy (train batch)")
    ax.set_title("CLD group accuracy, Fashion-MNIST")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=120)
  return 0


if __name__ == "__main__":
  sys.exit(main())
