"""benchmarks/issl_results.py: what it reads from finished workdirs (no training)."""

import importlib.util
import json
import os

import pytest

_BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture(scope="module")
def issl():
  spec = importlib.util.spec_from_file_location("issl_results",
                                                os.path.join(_BENCH, "issl_results.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _write(root, name, results):
  os.makedirs(root / name)
  (root / name / "results.json").write_text(json.dumps(results))


def test_mlp_probe_from_the_run_or_a_later_evaluation(issl, tmp_path):
  # Trained with the MLP probe: top-level key. Probed later by `ssljax eval`: the latest
  # evaluation that ran it, under "evaluations" (the top level keeps the run's own keys).
  _write(tmp_path, "a_s0", {"knn/top1": 0.5, "linear_probe/top1": 0.6, "mlp_probe/top1": 0.7})
  _write(tmp_path, "a_s1", {"knn/top1": 0.4, "linear_probe/top1": 0.5, "evaluations": [
      {"options": {}, "results": {"knn/top1": 0.4}},
      {"options": {"eval.mlp_probe": True}, "results": {"mlp_probe/top1": 0.55}},
      {"options": {"eval.mlp_probe": True}, "results": {"mlp_probe/top1": 0.65}},
      {"options": {"eval.knn_k": 20}, "results": {"knn/top1": 0.45}}]})
  rows = issl.collect(str(tmp_path), ["a", "b"], [0, 1])
  assert [r.get("mlp_probe") for r in rows[:2]] == [0.7, 0.65]
  assert "knn" not in rows[2]  # b_s0 never ran: listed as missing
  text = issl.table(rows)
  assert "| a | 1 | 0.4000 | 0.5000 | 0.6500 |" in text
  assert "| b | 0 | missing |" in text
  assert "a: mean over 2 seed(s): kNN 0.4500, probe 0.5500, MLP probe 0.6750" in text
