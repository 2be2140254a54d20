"""benchmarks/default_job.py: the target verdicts and the records it reads, not the timing."""

import importlib.util
import json
import os
import sys

import pytest

_BENCH = os.path.join(os.path.dirname(__file__), "..", "benchmarks")


@pytest.fixture(scope="module")
def job():
  sys.path.insert(0, os.path.abspath(_BENCH))  # default_job imports its sibling cpu_step
  try:
    spec = importlib.util.spec_from_file_location("default_job",
                                                  os.path.join(_BENCH, "default_job.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
  finally:
    sys.path.pop(0)
  return module


def _run(seed, wall, knn, probe=None):
  results = {"knn/top1": knn}
  if probe is not None:
    results["linear_probe/top1"] = probe
  return {"seed": seed, "wall_seconds": wall, "results": results}


def test_assess_per_seed_verdicts(job):
  runs = [_run(0, 600.0, 0.8533, 0.90), _run(1, 901.0, 0.86, 0.91), _run(2, 500.0, 0.849)]
  a = job.assess(runs, {200: 0.7885, 20: 0.8447}, wall_budget_s=900, knn_target=0.85)
  assert [(v["wall_ok"], v["knn_ok"]) for v in a["seeds"]] == [
      (True, True), (False, True), (True, False)]
  assert not a["all_met"]
  assert a["knn_mean"] == pytest.approx((0.8533 + 0.86 + 0.849) / 3)
  assert (a["knn_min"], a["knn_max"]) == (0.849, 0.86)
  assert a["probe_mean"] == pytest.approx(0.905)  # seed 2 has no probe and is left out
  assert a["wall_max_seconds"] == 901.0
  assert job.assess(runs[:1], {200: 0.7885}, wall_budget_s=900, knn_target=0.85)["all_met"]


def test_assess_requires_beating_every_raw_pixel_baseline(job):
  # Above the 0.85 target but below raw pixels at k=20: the encoder is not worth having.
  a = job.assess([_run(0, 60.0, 0.851)], {200: 0.79, 20: 0.86}, wall_budget_s=900,
                 knn_target=0.85)
  assert a["seeds"][0]["knn_ok"] and not a["seeds"][0]["beats_raw_pixels"]
  assert not a["all_met"]
  with pytest.raises(ValueError, match="at least one run"):
    job.assess([], {})


def test_without_baselines_the_targets_are_not_called_met(job):
  a = job.assess([_run(0, 60.0, 0.9)], {}, wall_budget_s=900, knn_target=0.85)
  assert a["seeds"][0]["beats_raw_pixels"] is None
  assert not a["all_met"]


def test_overrides_after_double_dash(job):
  args = job.parse_args(["--seeds", "0", "1", "--", "--config.train.epochs=2"])
  assert args.seeds == [0, 1] and args.overrides == ["--config.train.epochs=2"]
  with pytest.raises(SystemExit):
    job.parse_args(["--", "--config.seed=5"])  # would run every "seed" as seed 5
  with pytest.raises(SystemExit):
    job.parse_args(["--", "--fresh"])  # a script option put after the '--'


def _fake_launcher(job, monkeypatch, outcomes):
  """Replaces the launcher: outcomes[seed] is (exit code, results.json dict or None)."""
  class Done:
    def __init__(self, returncode):
      self.returncode = returncode

  real_run = job.subprocess.run

  def run(command, **kwargs):
    if command[0] != "bash":  # lscpu and uptime, for the machine description
      return real_run(command, **kwargs)
    workdir, seed = command[4], int(command[5].split("=")[1])
    code, results = outcomes[seed]
    os.makedirs(workdir, exist_ok=True)
    if results is not None:
      with open(os.path.join(workdir, "results.json"), "w") as f:
        json.dump(results, f)
    return Done(code)
  monkeypatch.setattr(job.subprocess, "run", run)


def test_a_failed_seed_keeps_the_earlier_ones(job, monkeypatch, tmp_path):
  _fake_launcher(job, monkeypatch, {0: (0, {"seed": 0, "knn/top1": 0.86}), 1: (3, None)})
  out = tmp_path / "o.json"
  with pytest.raises(SystemExit, match="seed 1 failed with exit code 3.*seed_1.log"):
    job.main(["--root", str(tmp_path / "r"), "--seeds", "0", "1", "--out", str(out),
              "--baselines", str(tmp_path / "none.json")])
  record = json.loads(out.read_text())
  assert [run["seed"] for run in record["runs"]] == [0]
  assert record["runs"][0]["results"]["knn/top1"] == 0.86
  assert record["failed"]["seed"] == 1


@pytest.mark.parametrize("results, message", [
    (None, "wrote no"), ({"seed": 0}, "no 'knn/top1'"),
    ({"seed": 7, "knn/top1": 0.9}, "for seed 7, not 0")])
def test_unusable_results_are_errors(job, monkeypatch, tmp_path, results, message):
  _fake_launcher(job, monkeypatch, {0: (0, results)})
  with pytest.raises(SystemExit, match=message):
    job.main(["--root", str(tmp_path / "r"), "--out", str(tmp_path / "o.json")])


def test_reads_baselines_and_final_throughput(job, tmp_path):
  baselines = tmp_path / "knn_baselines.json"
  baselines.write_text(json.dumps({"rows": [
      {"features": "raw pixels", "k": 20, "top1": 0.8447},
      {"features": "raw pixels, standardised", "k": 20, "top1": 0.8594},
      {"features": "raw pixels", "k": 200, "top1": 0.7885},
      {"features": "raw pixels", "k": 50, "top1": 0.8}]}))
  assert job.raw_pixel_baselines(str(baselines), 200) == {20: 0.8447, 200: 0.7885}
  assert job.raw_pixel_baselines(str(tmp_path / "missing.json"), 200) == {}
  metrics = tmp_path / "metrics.jsonl"
  metrics.write_text("\n".join(json.dumps(r) for r in [
      {"step": 10, "train/images_per_sec": 100.0, "train/loss": 1.0},
      {"step": 20, "train/images_per_sec": 250.5},
      {"step": 20, "knn/top1": 0.5}]) + "\n")
  assert job.final_images_per_s(str(metrics)) == 250.5
  assert job.final_images_per_s(str(tmp_path / "none.jsonl")) is None


def test_refuses_to_resume_an_existing_workdir(job, tmp_path):
  (tmp_path / "seed_0").mkdir()
  with pytest.raises(SystemExit, match="would resume.*--fresh"):
    job.main(["--root", str(tmp_path), "--seeds", "0", "--out", str(tmp_path / "o.json")])
  assert (tmp_path / "seed_0").exists()
