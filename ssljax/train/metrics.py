"""Metric writing: one JSON object per line in ``<workdir>/metrics.jsonl`` and TensorBoard
event files in ``<workdir>/tensorboard``. Only process 0 writes. A bucket workdir (``gs://``,
`ssljax.train.paths`) gets ``metrics.jsonl`` only, rewritten at every write.

A run resumed from the checkpoint of step s (s = 0: started afresh, e.g. after a session killed
before its first checkpoint) recomputes the steps after s, so the records of a previous session
after s are dropped from ``metrics.jsonl`` when the writer opens, as are that session's
final-evaluation records at s, which the resumed run writes again; each step then appears
once. TensorBoard's event files are left as they are.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping

# Keys of the records the final evaluation writes at the last step (ssljax.train.loop.train).
FINAL_EVALUATION_KEYS = frozenset({"knn/top1", "knn/top5", "linear_probe/top1",
                                   "mlp_probe/top1", "linear_eval/top1", "linear_eval/top5"})

import jax
import numpy as np

from ssljax.train.paths import append_text, is_local, replace_text, workdir_path

log = logging.getLogger(__name__)


class MetricWriter:
  """Appends scalar metrics to JSONL and TensorBoard (resumed runs keep appending, after
  cutting ``metrics.jsonl`` back to `resume_step` unless it is None)."""

  def __init__(self, workdir: str, *, tensorboard: bool = True,
               resume_step: int | None = None):
    self._active = jax.process_index() == 0
    self._closed = False
    self._jsonl = None
    self._tb = None
    if not self._active:
      return
    directory = workdir_path(workdir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "metrics.jsonl"
    if resume_step is not None and path.exists():
      _truncate_to_step(path, resume_step)
    self._path = path
    if is_local(path):
      self._jsonl = open(os.fspath(path), "a", encoding="utf-8")
    if tensorboard and is_local(directory):
      from tensorboardX import SummaryWriter  # deferred: only the writer needs it
      self._tb = SummaryWriter(os.path.join(os.fspath(directory), "tensorboard"))
    elif tensorboard:
      log.warning("no TensorBoard events for the bucket workdir %s (local workdirs only); "
                  "metrics.jsonl holds every scalar", directory)

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    if self._closed:
      raise RuntimeError("MetricWriter.write after close()")
    if not self._active:
      return
    scalars = {k: float(np.asarray(v)) for k, v in metrics.items()}
    line = json.dumps({"step": int(step), **scalars}) + "\n"
    if self._jsonl is not None:
      self._jsonl.write(line)
      self._jsonl.flush()
    else:  # a bucket object cannot be appended to: rewritten whole
      append_text(self._path, line)
    if self._tb is not None:
      for key, value in scalars.items():
        self._tb.add_scalar(key, value, int(step))
      self._tb.flush()

  def close(self) -> None:
    """Closes the files (idempotent)."""
    self._closed = True
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None


def _truncate_to_step(path, step: int) -> None:
  """Keeps the records of `path` up to `step` (a torn last line is dropped); atomic."""
  kept = []
  for line in path.read_text(encoding="utf-8").splitlines():
    try:
      record = json.loads(line)
    except json.JSONDecodeError:
      continue
    at = record.get("step", 0)
    final = at == step and FINAL_EVALUATION_KEYS.intersection(record)
    if at <= step and not final:
      kept.append(json.dumps(record) + "\n")
  replace_text(path, "".join(kept))
