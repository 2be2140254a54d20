"""Shared pieces of the comparison drivers (cld_results.py, metamask_results.py): the finished
runs of an ``<root>/<arm>_s<seed>`` layout and the series a run logged.

Imports no JAX; reads metrics.jsonl with ``ssljax.eval.plots.read_metrics``.
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Iterator, Sequence

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # run as a script from a checkout without installing
  sys.path.insert(0, REPO_ROOT)

from ssljax.eval.plots import read_metrics  # noqa: E402


def finished_runs(root: str, arms: Sequence[str], seeds: Sequence[int]
                  ) -> Iterator[tuple[dict[str, Any], dict[str, Any]]]:
  """Yields ``(row, results)`` per finished run (its results.json exists), arms outermost;
  ``row`` holds arm, seed, workdir, kNN and probe top-1, and the run's times, epochs and
  date. An unfinished run is named on stderr and skipped."""
  for arm in arms:
    for seed in seeds:
      workdir = os.path.join(root, f"{arm}_s{seed}")
      path = os.path.join(workdir, "results.json")
      if not os.path.exists(path):
        print(f"missing: {workdir} (not run or not finished)", file=sys.stderr)
        continue
      with open(path) as f:
        results = json.load(f)
      yield {"arm": arm, "seed": seed, "workdir": workdir,
             "knn_top1": results.get("knn/top1"),
             "probe_top1": results.get("linear_probe/top1"),
             "pretrain_seconds": results.get("pretrain_seconds_this_session"),
             "seconds": results.get("total_seconds_this_session"),
             "epochs": results.get("epochs"), "date": results.get("date")}, results


def metric_series(workdir: str, key: str) -> list[tuple[int, float]]:
  """``(step, value)`` of every record of `key` in the run's metrics.jsonl ([] if none)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  return [(r["step"], r[key]) for r in read_metrics(path) if key in r]
