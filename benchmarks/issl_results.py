"""SimCLR, CISSL and DISSL on Fashion-MNIST at equal budgets: the table of docs/results.md.

Reads finished ``ssljax train`` workdirs ``<root>/<arm>_s<seed>`` (this script does not
train; the runs are the commands in docs/results.md, section "CISSL / DISSL") and prints a
Markdown table with, per run, kNN top-1 (k = 200, t = 0.1 on the L2-normalised backbone
features), linear-probe top-1 and, where it ran, MLP-probe top-1 from results.json, the pretraining seconds, and for DISSL the
last logged diagnostics (H_M, H_M_given_Z, KL_invariance); then the mean per arm. Runs that
have not finished are listed as missing.

  python benchmarks/issl_results.py [--root runs/issl] [--arms simclr,cissl,dissl]
      [--seeds 0 1] [--json benchmarks/results/issl_results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics

_DIAGNOSTICS = ("train/H_M", "train/H_M_given_Z", "train/KL_invariance")


def _last_metrics(workdir: str, keys) -> dict[str, float]:
  found: dict[str, float] = {}
  path = os.path.join(workdir, "metrics.jsonl")
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        record = json.loads(line)
        for key in keys:
          if key in record:
            found[key] = record[key]
  return found


def collect(root: str, arms, seeds) -> list[dict]:
  rows = []
  for arm in arms:
    for seed in seeds:
      workdir = os.path.join(root, f"{arm}_s{seed}")
      path = os.path.join(workdir, "results.json")
      row = {"arm": arm, "seed": seed, "workdir": workdir}
      if os.path.exists(path):
        with open(path) as f:
          results = json.load(f)
        row.update(knn=results.get("knn/top1"), probe=results.get("linear_probe/top1"),
                   mlp_probe=_mlp_probe(results),
                   pretrain_s=results.get("pretrain_seconds_this_session"),
                   steps=results.get("steps"), date=results.get("date"))
        row.update(_last_metrics(workdir, _DIAGNOSTICS))
      rows.append(row)
  return rows


def _mlp_probe(results: dict):
  """The MLP probe's top-1: the run's own, else that of the latest ``ssljax eval`` that ran it
  (results.json keeps each later evaluation under ``evaluations``)."""
  if "mlp_probe/top1" in results:
    return results["mlp_probe/top1"]
  for entry in reversed(results.get("evaluations", [])):
    if "mlp_probe/top1" in entry.get("results", {}):
      return entry["results"]["mlp_probe/top1"]
  return None


def _fmt(value, digits=4):
  return "-" if value is None else f"{value:.{digits}f}"


def table(rows) -> str:
  lines = ["| arm | seed | kNN top-1 | linear probe | MLP probe | pretrain (s) | "
           "H_M / H_M_given_Z / KL_inv |",
           "| --- | --- | --- | --- | --- | --- | --- |"]
  for r in rows:
    if "knn" not in r:
      lines.append(f"| {r['arm']} | {r['seed']} | missing | | | | |")
      continue
    diag = " / ".join(_fmt(r.get(k), 3) for k in _DIAGNOSTICS) if "train/H_M" in r else ""
    lines.append(f"| {r['arm']} | {r['seed']} | {_fmt(r['knn'])} | {_fmt(r['probe'])} | "
                 f"{_fmt(r.get('mlp_probe'))} | {_fmt(r['pretrain_s'], 0)} | {diag} |")
  lines.append("")
  for arm in dict.fromkeys(r["arm"] for r in rows):
    done = [r for r in rows if r["arm"] == arm and "knn" in r]
    if done:
      knn = statistics.mean(r["knn"] for r in done)
      probes = [r["probe"] for r in done if r["probe"] is not None]
      probe = statistics.mean(probes) if probes else None
      mlps = [r["mlp_probe"] for r in done if r.get("mlp_probe") is not None]
      mlp = statistics.mean(mlps) if mlps else None
      lines.append(f"{arm}: mean over {len(done)} seed(s): kNN {knn:.4f}, probe {_fmt(probe)}, "
                   f"MLP probe {_fmt(mlp)}")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--root", default="runs/issl")
  parser.add_argument("--arms", default="simclr,cissl,dissl")
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--json", default="")
  args = parser.parse_args(argv)
  rows = collect(args.root, args.arms.split(","), args.seeds)
  print(table(rows))
  if args.json:
    os.makedirs(os.path.dirname(args.json) or ".", exist_ok=True)
    with open(args.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
