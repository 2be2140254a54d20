"""Training-curve plots from a workdir's ``metrics.jsonl``.

Each line of ``metrics.jsonl`` is one JSON object with a ``step``. Training lines carry
``train/loss`` (and possibly ``train/lr``); kNN-monitor lines carry ``monitor/knn_top1`` (subsets)
and the final evaluation ``knn/top1`` (full splits). The figure
has the loss (with the learning rate on a secondary axis when logged) against step, and, when
the monitor ran, a second panel with kNN top-1 against step.

Rendering uses matplotlib's Agg canvas on a bare ``Figure``: no pyplot state, no display, and
no change to the process-wide matplotlib backend.
"""

from __future__ import annotations

import json
import os
from typing import Any

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure


def read_metrics(metrics_jsonl_path: str | os.PathLike[str]) -> list[dict[str, Any]]:
  """All records of a metrics.jsonl file, in file order; blank lines are skipped."""
  records = []
  with open(metrics_jsonl_path, encoding="utf-8") as f:
    for line_number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      try:
        records.append(json.loads(line))
      except json.JSONDecodeError as e:
        raise ValueError(f"{metrics_jsonl_path}:{line_number} is not valid JSON: {e}") from e
  return records


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[float], list[float]]:
  """(steps, values) of the records that have both ``step`` and ``key``."""
  pairs = [(r["step"], r[key]) for r in records if "step" in r and key in r]
  return [p[0] for p in pairs], [p[1] for p in pairs]


def plot_training_curves(metrics_jsonl_path: str | os.PathLike[str],
                         out_png_path: str | os.PathLike[str]) -> None:
  """Draws train loss vs step (and kNN top-1 vs step when logged) into a PNG file.

  Args:
    metrics_jsonl_path: the run's ``metrics.jsonl``.
    out_png_path: where to write the PNG (its directory must exist).

  Raises:
    ValueError: the file holds no ``train/loss`` entries, or a line is not JSON.
  """
  records = read_metrics(metrics_jsonl_path)
  loss_steps, losses = _series(records, "train/loss")
  if not losses:
    raise ValueError(f"{metrics_jsonl_path} has no 'train/loss' entries to plot")
  lr_steps, lrs = _series(records, "train/lr")
  knn_steps, knn_top1 = _series(records, "monitor/knn_top1")
  final_steps, final_top1 = _series(records, "knn/top1")

  num_panels = 2 if (knn_top1 or final_top1) else 1
  figure = Figure(figsize=(6.0 * num_panels, 4.0), layout="constrained")
  FigureCanvasAgg(figure)
  axes = figure.subplots(1, num_panels, squeeze=False)[0]

  loss_axis = axes[0]
  loss_axis.plot(loss_steps, losses, color="tab:blue", linewidth=1.0)
  loss_axis.set_xlabel("step")
  loss_axis.set_ylabel("train loss", color="tab:blue")
  loss_axis.set_title("training loss")
  loss_axis.grid(alpha=0.3)
  if lrs:
    lr_axis = loss_axis.twinx()
    lr_axis.plot(lr_steps, lrs, color="tab:orange", linewidth=1.0, alpha=0.7)
    lr_axis.set_ylabel("learning rate", color="tab:orange")

  if knn_top1 or final_top1:
    knn_axis = axes[1]
    if knn_top1:
      knn_axis.plot(knn_steps, knn_top1, marker="o", color="tab:green",
                    label="monitor (subsets)")
    if final_top1:
      knn_axis.plot(final_steps, final_top1, marker="*", markersize=12, linestyle="none",
                    color="tab:red", label="final (full splits)")
    knn_axis.legend(loc="lower right")
    knn_axis.set_xlabel("step")
    knn_axis.set_ylabel("kNN top-1")
    knn_axis.set_title("kNN monitor")
    knn_axis.grid(alpha=0.3)

  figure.savefig(out_png_path, format="png", dpi=100)


def plot_crops(crops, titles, path: str | os.PathLike[str], *, rows: int = 1,
               suptitle: str = "") -> str:
  """Saves image crops (``[h, w, c]`` floats in [0, 1], any sizes) in a grid with titles.

  One- and three-channel crops are shown as grayscale and RGB; every crop fills its cell at
  its own resolution. Returns `path`.
  """
  import numpy as np

  if len(crops) != len(titles):
    raise ValueError(f"{len(crops)} crops but {len(titles)} titles")
  cols = -(-len(crops) // rows)
  fig = Figure(figsize=(1.6 * cols, 1.9 * rows))
  FigureCanvasAgg(fig)
  for k, (crop, title) in enumerate(zip(crops, titles)):
    ax = fig.add_subplot(rows, cols, k + 1)
    crop = np.clip(np.asarray(crop, np.float32), 0.0, 1.0)
    if crop.shape[-1] == 1:
      ax.imshow(crop[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
      ax.imshow(crop, interpolation="nearest")
    ax.set_title(title, fontsize=7)
    ax.set_xticks([])
    ax.set_yticks([])
  if suptitle:
    fig.suptitle(suptitle, fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return str(path)
