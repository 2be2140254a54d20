"""``ssljax sweep``: train and analyse one model per cell of a grid, then draw the curves.

  python -m ssljax.analysis.sweep --config configs/simclr.py:fashion_mnist --root runs/geo \
      [--strengths 0.1 0.25 0.5 0.75 1 1.5 2] [--widths 128 512 2048] [--depths 2]
      [--seeds 0 1] [--cell I | --list | --report-only]
      [--analysis KEY=VALUE ...] [-- TRAIN OVERRIDES ...]

The grid is augmentation strength (``augment.strength``, the knob of ``ssljax.augment``'s
policies) x projector width x projector depth x seed. Each cell is a workdir
``ROOT/s<strength>_w<width>_d<depth>_seed<seed>``; the sweep runs ``ssljax train`` there (a
run that stopped half-way resumes from its checkpoint; a finished one, with ``results.json``,
is not rerun) and then ``ssljax analyze`` (skipped when ``analysis/analysis.json`` exists).
So a half-finished grid resumes where it stopped, and adding strengths or seeds later trains
only the new cells.

Width and depth are config keys: by default ``method.<method>.proj_hidden_dim`` and
``method.<method>.proj_layers`` (SimCLR, MoCo, Barlow Twins, DINO, BYOL and SwAV name their
projector's hidden width so); ``--width-key`` / ``--depth-key`` name others. An empty
``--widths`` / ``--depths`` keeps the config's value. It works for every method, because
``analyze`` reads the method's stages; the curves use two layers of each model: the encoder
output and the first head output that ``analyze`` takes the Jacobian of (the projector's).

On one machine the cells run in turn. On a cluster, run one cell per job: ``--cell I`` runs
cell I only (``--list`` prints the indices); with ``--cell -1`` the index is read from
``SLURM_ARRAY_TASK_ID``, so a SLURM array job of ``--list``'s length runs the whole grid,
e.g. ``sbatch --array=0-69 --wrap "python -m ssljax.analysis.sweep ... --cell -1"``; then
``--report-only`` draws the curves from the finished cells.

Report (``ROOT/sweep.json``, ``ROOT/sweep.md``, ``ROOT/sweep.png``): per (width, depth,
strength), the mean and the spread over seeds of kNN and linear-probe top-1, the invariance
ratio under the training and the reference policy, the effective rank and the components for
90% of the variance, each for the encoder and the projector output; the mean effective rank of
the projector's Jacobian; and the overlaps of its top-r subspace with the data tangent plane
(P-T) and the augmentation subspace (P-A), with chance, at ``--overlap-rank``.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import math
import os
import statistics
import subprocess
import sys
from typing import Any, Callable, Sequence

DEFAULT_STRENGTHS = (0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0)

# (label, layer role, path inside per_layer[layer] or the top level, higher/lower is "more").
_LAYER_METRICS = (
    ("knn_top1", ("knn_top1",)),
    ("probe_top1", ("probe_top1",)),
    ("invariance_train", ("invariance", "train", "ratio")),
    ("invariance_reference", ("invariance", "reference", "ratio")),
    ("effective_rank", ("dimensionality", "effective_rank")),
    ("components_90", ("dimensionality", "components_90")),
)
_TITLES = {
    "knn_top1": "kNN top-1", "probe_top1": "linear probe top-1",
    "invariance_train": "invariance ratio, training policy (0 = invariant)",
    "invariance_reference": "invariance ratio, reference policy",
    "effective_rank": "effective rank (held-out)", "components_90": "components for 90% variance",
    "jacobian_rank": "projector Jacobian: mean effective rank",
    "overlap_P-T": "overlap P-T (projector vs data tangent)",
    "overlap_P-A": "overlap P-A (projector vs augmentations)",
}


@dataclasses.dataclass(frozen=True)
class Cell:
  strength: float
  width: int | None
  depth: int | None
  seed: int

  @property
  def name(self) -> str:
    width = "cfg" if self.width is None else str(self.width)
    depth = "cfg" if self.depth is None else str(self.depth)
    return f"s{self.strength:g}_w{width}_d{depth}_seed{self.seed}"


def grid(strengths: Sequence[float], widths: Sequence[int], depths: Sequence[int],
         seeds: Sequence[int]) -> list[Cell]:
  """Every cell, seeds outermost (a grid cut short has whole seeds), strength innermost."""
  if not strengths or not seeds:
    raise ValueError("a sweep needs at least one strength and one seed")
  for s in strengths:
    if not s >= 0:
      raise ValueError(f"augmentation strengths must be >= 0, got {s}")
  return [Cell(float(s), w, d, int(seed))
          for seed, w, d, s in itertools.product(seeds, list(widths) or [None],
                                                 list(depths) or [None], strengths)]


def head_keys(config, width_key: str | None, depth_key: str | None) -> tuple[str, str]:
  """The config keys of projector width and depth, checked against `config`.

  Raises:
    ValueError: a key that the config does not have, with the method's keys to choose from.
  """
  name = config.method.name
  keys = (width_key or f"method.{name}.proj_hidden_dim", depth_key or f"method.{name}.proj_layers")
  for key, flag in zip(keys, ("--width-key", "--depth-key")):
    node = config
    for part in key.split("."):
      if part not in node:
        section = config.method.get(name, {})
        choices = ", ".join(f"method.{name}.{k}" for k in section) or "(none)"
        raise ValueError(f"config key {key!r} does not exist for method {name!r}; pass "
                         f"{flag} with one of: {choices}")
      node = node[part]
  return keys


def workdir(root: str, cell: Cell) -> str:
  return os.path.join(root, cell.name)


def train_command(spec: str, root: str, cell: Cell, keys: tuple[str, str],
                  overrides: Sequence[str] = ()) -> list[str]:
  cmd = [sys.executable, "-m", "ssljax.cli", "train", "--config", spec,
         "--workdir", workdir(root, cell), f"--config.seed={cell.seed}",
         f"--config.augment.strength={cell.strength}"]
  if cell.width is not None:
    cmd.append(f"--config.{keys[0]}={cell.width}")
  if cell.depth is not None:
    cmd.append(f"--config.{keys[1]}={cell.depth}")
  return cmd + list(overrides)


def analyze_command(root: str, cell: Cell, analysis: Sequence[str] = ()) -> list[str]:
  return [sys.executable, "-m", "ssljax.analysis.analyze", "--workdir", workdir(root, cell)] + [
      a if a.startswith("--config.analysis.") else f"--config.analysis.{a}" for a in analysis]


def run_cell(spec: str, root: str, cell: Cell, keys: tuple[str, str], *,
             overrides: Sequence[str] = (), analysis: Sequence[str] = (),
             runner: Callable[[list[str]], int] | None = None) -> str:
  """Trains (unless ``results.json`` exists) and analyses (unless ``analysis.json`` exists).

  Returns what happened: 'done' (nothing to do), 'analysed' or 'trained+analysed'.

  Raises:
    RuntimeError: a command failed; its command line and exit status are named.
  """
  runner = runner or (lambda cmd: subprocess.call(cmd))
  wd = workdir(root, cell)
  os.makedirs(wd, exist_ok=True)
  with open(os.path.join(wd, "sweep_cell.json"), "w", encoding="utf-8") as f:
    json.dump({**dataclasses.asdict(cell), "config": spec, "width_key": keys[0],
               "depth_key": keys[1], "overrides": list(overrides)}, f, indent=2)
  did = []
  if not os.path.exists(os.path.join(wd, "results.json")):
    _check(runner, train_command(spec, root, cell, keys, overrides))
    did.append("trained")
  if not os.path.exists(os.path.join(wd, "analysis", "analysis.json")):
    _check(runner, analyze_command(root, cell, analysis))
    did.append("analysed")
  return "+".join(did) or "done"


def _check(runner, cmd: list[str]) -> None:
  print("sweep:", " ".join(cmd), flush=True)
  rc = runner(cmd)
  if rc != 0:
    raise RuntimeError(f"sweep: exit status {rc} from: {' '.join(cmd)}")


def _get(tree: Any, path: Sequence[str]) -> float:
  for part in path:
    if not isinstance(tree, dict) or part not in tree:
      return math.nan
    tree = tree[part]
  return float(tree) if isinstance(tree, (int, float)) else math.nan


def cell_row(analysis: dict[str, Any], cell: dict[str, Any], overlap_rank: int) -> dict[str, Any]:
  """One cell's numbers: encoder and projector (the Jacobian's layer) side by side."""
  projector = analysis["jacobian"]["layer"]
  row: dict[str, Any] = {"strength": cell["strength"], "width": cell["width"],
                         "depth": cell["depth"], "seed": cell["seed"], "projector": projector,
                         "step": analysis.get("step")}
  for label, path in _LAYER_METRICS:
    row[f"encoder/{label}"] = _get(analysis["per_layer"].get("encoder", {}), path)
    row[f"projector/{label}"] = _get(analysis["per_layer"].get(projector, {}), path)
  row["jacobian_rank"] = float(analysis["jacobian"]["mean_effective_rank"])
  overlaps = analysis.get("overlaps", {}).get(str(overlap_rank), {})
  for pair in ("P-T", "P-A", "T-A"):
    row[f"overlap_{pair}"] = _get(overlaps, (pair, "mean"))
  row["overlap_chance"] = _get(overlaps, ("chance",))
  return row


def collect(root: str, overlap_rank: int = 10) -> list[dict[str, Any]]:
  """Rows of every finished cell under `root` (a cell has ``sweep_cell.json`` and analysis)."""
  rows = []
  for name in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    cell_path = os.path.join(root, name, "sweep_cell.json")
    analysis_path = os.path.join(root, name, "analysis", "analysis.json")
    if os.path.exists(cell_path) and os.path.exists(analysis_path):
      with open(cell_path, encoding="utf-8") as f:
        cell = json.load(f)
      with open(analysis_path, encoding="utf-8") as f:
        rows.append(cell_row(json.load(f), cell, overlap_rank))
  return rows


def aggregate(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and spread (max - min) over seeds per (width, depth, strength)."""
  groups: dict[tuple, list[dict[str, Any]]] = {}
  for row in rows:
    groups.setdefault((row["width"], row["depth"], row["strength"]), []).append(row)
  numeric = [k for k in (rows[0] if rows else {})
             if k not in ("strength", "width", "depth", "seed", "projector", "step")]
  out = []
  for (width, depth, strength), members in sorted(
      groups.items(), key=lambda kv: tuple(-1 if v is None else v for v in kv[0])):
    entry: dict[str, Any] = {"width": width, "depth": depth, "strength": strength,
                             "seeds": sorted(m["seed"] for m in members)}
    for key in numeric:
      values = [m[key] for m in members if not math.isnan(m[key])]
      entry[key] = statistics.fmean(values) if values else math.nan
      entry[f"{key}_spread"] = (max(values) - min(values)) if len(values) > 1 else 0.0
    out.append(entry)
  return out


def report_markdown(agg: list[dict[str, Any]], overlap_rank: int) -> str:
  cols = [("kNN enc/proj", "knn_top1"), ("probe enc/proj", "probe_top1"),
          ("R_inv train enc/proj", "invariance_train"),
          ("R_inv ref enc/proj", "invariance_reference"),
          ("eff. rank enc/proj", "effective_rank")]
  head = ["width", "depth", "strength", "seeds"] + [c for c, _ in cols] + [
      "Jacobian rank", f"P-T (r={overlap_rank})", "P-A", "chance"]
  lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
  f = lambda x: "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.3f}"
  for e in agg:
    cells = [str(e["width"] if e["width"] is not None else "cfg"),
             str(e["depth"] if e["depth"] is not None else "cfg"), f"{e['strength']:g}",
             ",".join(map(str, e["seeds"]))]
    cells += [f"{f(e[f'encoder/{k}'])} / {f(e[f'projector/{k}'])}" for _, k in cols]
    cells += [f(e["jacobian_rank"]), f(e["overlap_P-T"]), f(e["overlap_P-A"]),
              f(e["overlap_chance"])]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def plot(agg: list[dict[str, Any]], path: str) -> str:
  """One panel per metric against strength: encoder dashed, projector solid, a colour per
  (width, depth); error bars are the spread over seeds."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  panels = [m for m, _ in _LAYER_METRICS] + ["jacobian_rank", "overlap_P-T", "overlap_P-A"]
  fig = Figure(figsize=(16, 8))
  heads = sorted({(e["width"], e["depth"]) for e in agg},
                 key=lambda wd: tuple(-1 if v is None else v for v in wd))
  colours = [f"C{i}" for i in range(10)]
  for p, metric in enumerate(panels):
    ax = fig.add_subplot(2, 5, p + 1)
    for h, (width, depth) in enumerate(heads):
      entries = sorted((e for e in agg if (e["width"], e["depth"]) == (width, depth)),
                       key=lambda e: e["strength"])
      x = [e["strength"] for e in entries]
      label = f"w{width if width is not None else 'cfg'} d{depth if depth is not None else 'cfg'}"
      layers = (("projector", "-"), ("encoder", "--")) if metric in dict(_LAYER_METRICS) else (
          (None, "-"),)
      for layer, style in layers:
        key = f"{layer}/{metric}" if layer else metric
        ax.errorbar(x, [e[key] for e in entries], yerr=[e[f"{key}_spread"] / 2 for e in entries],
                    fmt=style, marker="o", ms=3, color=colours[h % 10],
                    label=f"{label} {layer or ''}".strip())
      if metric.startswith("overlap") and entries:
        ax.plot(x, [e["overlap_chance"] for e in entries], ":", color="k",
                label="chance" if h == 0 else None)
    ax.set_xscale("log")
    ax.set(xlabel="augmentation strength", title=_TITLES[metric])
    ax.title.set_fontsize(8)
    if p == 0:
      ax.legend(fontsize=6)
  fig.tight_layout()
  FigureCanvasAgg(fig)
  fig.savefig(path, dpi=100)
  return path


def report(root: str, overlap_rank: int = 10) -> dict[str, Any]:
  """Writes ROOT/sweep.json, sweep.md and sweep.png from the finished cells; returns the JSON."""
  rows = collect(root, overlap_rank)
  if not rows:
    raise FileNotFoundError(f"no finished sweep cell under {root!r} (a cell needs "
                            f"sweep_cell.json and analysis/analysis.json)")
  agg = aggregate(rows)
  result = {"root": os.path.abspath(root), "overlap_rank": overlap_rank, "cells": rows,
            "aggregate": agg}
  with open(os.path.join(root, "sweep.json"), "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(root, "sweep.md"), "w", encoding="utf-8") as f:
    f.write(report_markdown(agg, overlap_rank))
  plot(agg, os.path.join(root, "sweep.png"))
  return result


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  train_overrides: list[str] = []
  if "--" in argv:
    cut = argv.index("--")
    argv, train_overrides = argv[:cut], argv[cut + 1:]
  parser = argparse.ArgumentParser(
      prog="ssljax sweep", description=__doc__,
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", help="config spec, as ssljax train's --config")
  parser.add_argument("--root", required=True, help="directory of the cells' workdirs")
  parser.add_argument("--strengths", type=float, nargs="+", default=list(DEFAULT_STRENGTHS))
  parser.add_argument("--widths", type=int, nargs="*", default=[])
  parser.add_argument("--depths", type=int, nargs="*", default=[])
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
  parser.add_argument("--width-key", default=None)
  parser.add_argument("--depth-key", default=None)
  parser.add_argument("--analysis", nargs="*", default=[],
                      help="analysis settings KEY=VALUE (as ssljax analyze --config.analysis.)")
  parser.add_argument("--overlap-rank", type=int, default=10)
  parser.add_argument("--cell", type=int, default=None,
                      help="run this cell only; -1: the index in SLURM_ARRAY_TASK_ID")
  parser.add_argument("--list", action="store_true", help="print the cells and exit")
  parser.add_argument("--report-only", action="store_true",
                      help="draw the report from the finished cells, train nothing")
  args = parser.parse_args(argv)
  try:
    if args.report_only:
      result = report(args.root, args.overlap_rank)
      print(f"sweep: {len(result['cells'])} cells -> {os.path.join(args.root, 'sweep.md')}")
      return 0
    if not args.config:
      parser.error("--config is required (except with --report-only)")
    from ssljax.config import load_config
    keys = head_keys(load_config(args.config), args.width_key, args.depth_key)
    cells = grid(args.strengths, args.widths, args.depths, args.seeds)
    if args.list:
      for i, cell in enumerate(cells):
        print(i, cell.name)
      return 0
    if args.cell is not None:
      index = args.cell
      if index == -1:
        if "SLURM_ARRAY_TASK_ID" not in os.environ:
          raise ValueError("--cell -1 reads SLURM_ARRAY_TASK_ID, which is not set")
        index = int(os.environ["SLURM_ARRAY_TASK_ID"])
      if not 0 <= index < len(cells):
        raise ValueError(f"--cell {index} is outside the grid's {len(cells)} cells (--list)")
      cells = [cells[index]]
    for i, cell in enumerate(cells):
      status = run_cell(args.config, args.root, cell, keys, overrides=train_overrides,
                        analysis=args.analysis)
      print(f"sweep: cell {cell.name}: {status} ({i + 1}/{len(cells)})", flush=True)
    if args.cell is None:
      report(args.root, args.overlap_rank)
      print(f"sweep: report in {os.path.join(args.root, 'sweep.md')} and sweep.png")
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"ssljax sweep: {e}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
