"""Tests for ssljax.eval.plots: PNG output from a metrics.jsonl file."""

from __future__ import annotations

import json

import pytest
from matplotlib.figure import Figure

from ssljax.eval import plots

_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write_jsonl(path, records):
  path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _training_records(with_knn):
  records = [{"step": s, "train/loss": 5.0 / (1 + s), "train/lr": 0.1 * s / 40}
             for s in range(0, 40, 5)]
  if with_knn:
    records += [{"step": s, "monitor/knn_top1": 0.2 + 0.01 * s} for s in (10, 20, 30)]
    records.append({"step": 30, "knn/top1": 0.6, "knn/top5": 0.9})
  return records


def _is_png(path):
  data = path.read_bytes()
  return len(data) > len(_PNG_MAGIC) and data.startswith(_PNG_MAGIC)


@pytest.mark.parametrize("with_knn,num_panels", [(True, 2), (False, 1)])
def test_writes_png_with_one_panel_per_series(tmp_path, monkeypatch, with_knn, num_panels):
  metrics, out = tmp_path / "metrics.jsonl", tmp_path / "curves.png"
  _write_jsonl(metrics, _training_records(with_knn))
  figures = []
  original_savefig = Figure.savefig

  def recording_savefig(self, *args, **kwargs):
    figures.append(self)
    return original_savefig(self, *args, **kwargs)

  monkeypatch.setattr(Figure, "savefig", recording_savefig)
  plots.plot_training_curves(metrics, out)
  assert _is_png(out)
  (figure,) = figures
  titled = [axis for axis in figure.axes if axis.get_title()]
  assert len(titled) == num_panels


def test_skips_blank_lines(tmp_path):
  metrics, out = tmp_path / "metrics.jsonl", tmp_path / "curves.png"
  metrics.write_text('{"step": 1, "train/loss": 2.0}\n\n{"step": 2, "train/loss": 1.5}\n')
  plots.plot_training_curves(metrics, out)
  assert _is_png(out)


def test_no_loss_entries_is_an_error(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  _write_jsonl(metrics, [{"step": 1, "knn/top1": 0.3}])
  with pytest.raises(ValueError, match="train/loss"):
    plots.plot_training_curves(metrics, tmp_path / "curves.png")


def test_malformed_line_names_its_number(tmp_path):
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2,\n')
  with pytest.raises(ValueError, match=":2 is not valid JSON"):
    plots.plot_training_curves(metrics, tmp_path / "curves.png")
