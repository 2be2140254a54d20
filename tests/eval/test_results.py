"""results.json keeps every evaluation with its options, and records where it ran."""

import copy
import json
import os
import subprocess

import flax
import jax
import pytest

from ssljax.eval import evaluate
from ssljax.eval import results as results_file
from ssljax.train import loop
from tests.util import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _overridden(config, **values):
  """A copy of `config` with dotted keys set, as ``--config.<key>=<value>`` would."""
  changed = copy.deepcopy(config)
  for key, value in values.items():
    *path, leaf = key.split("__")
    node = changed
    for part in path:
      node = node[part]
    node[leaf] = value
  return changed


def test_changed_options_are_the_overridden_keys(tmp_path):
  config = tiny_config(str(tmp_path))
  assert results_file.changed_options(config, config) == {}
  assert results_file.changed_options(config, None) is None  # no reference: unknown
  changed = _overridden(config, eval__knn_k=20, eval__linear_probe=False, data__mean=(0.5,))
  assert results_file.changed_options(changed, config) == {
      "data.mean": [0.5], "eval.knn_k": 20, "eval.linear_probe": False}
  flat = results_file.flat_config(config)
  assert flat["eval.knn_k"] == 5 and flat["method.name"] == "simclr"


def _entry(options, steps, **results):
  return {"options": options, "results": {"steps": steps, **results},
          "run": {"method": "simclr", "seed": 0},
          "environment": {"device_count": 8, "device_kind": "cpu", "host": "h"},
          "date": f"d{len(results)}{steps}"}


def test_merge_keeps_each_result_with_its_options():
  trained = _entry({}, 6, **{"knn/top1": 0.7, "linear_probe/top1": 0.8})
  record = results_file.merge(None, trained)
  assert record["knn/top1"] == 0.7 and record["linear_probe/top1"] == 0.8
  assert record["options"] == {} and record["devices"] == "8 x cpu"
  assert record["format"] == 2 and record["evaluations"] == [trained]

  # An evaluation with other options is added; the headline stays the run's own one.
  other = _entry({"eval.knn_k": 20, "eval.linear_probe": False}, 6, **{"knn/top1": 0.6})
  record = results_file.merge(record, other)
  assert [e["options"] for e in record["evaluations"]] == [{}, other["options"]]
  assert record["knn/top1"] == 0.7 and record["linear_probe/top1"] == 0.8

  # The same options on the same step replace their entry; a new own evaluation (here of a
  # later step) becomes the headline, without the probe it did not run.
  again = _entry({"eval.knn_k": 20, "eval.linear_probe": False}, 6, **{"knn/top1": 0.65})
  record = results_file.merge(record, again)
  assert len(record["evaluations"]) == 2 and record["evaluations"][-1] == again
  later = _entry({}, 12, **{"knn/top1": 0.9})
  record = results_file.merge(record, later)
  assert len(record["evaluations"]) == 3
  assert record["knn/top1"] == 0.9 and record["steps"] == 12
  assert "linear_probe/top1" not in record

  # Without an own evaluation, the headline is the latest one, and says its options.
  only = results_file.merge({}, other)
  assert only["knn/top1"] == 0.6 and only["options"] == other["options"]


def test_unknown_options_replace_no_evaluation():
  trained = _entry({}, 6, **{"knn/top1": 0.7})
  unknown = _entry(None, 6, **{"knn/top1": 0.1})
  record = results_file.merge(results_file.merge(None, trained), unknown)
  assert record["evaluations"] == [trained, unknown]
  assert record["knn/top1"] == 0.7 and record["options"] == {}  # still the run's own
  again = _entry(None, 6, **{"knn/top1": 0.2})  # two unknowns may differ: both are kept
  assert results_file.merge(record, again)["evaluations"] == [trained, unknown, again]


@pytest.mark.parametrize("record, message", [
    ([1, 2], "holds an array, not a JSON object"),
    ({"evaluations": {}}, "'evaluations' that is not a list"),
    ({"evaluations": [3]}, r"evaluations\[0\] that is not an object"),
    ({"evaluations": [{"results": {}}]}, r"evaluations\[0\] without 'options', 'run'"),
    ({"evaluations": [{"options": {}, "results": [], "run": {}}]},
     r"evaluations\[0\] whose options, results, run or environment is not an object"),
])
def test_merge_refuses_what_is_not_a_results_record(record, message):
  assert results_file.problem(record) is not None
  with pytest.raises(ValueError, match=message):
    results_file.merge(record, _entry({}, 6))
  assert results_file.problem({}) is None and results_file.problem({"knn/top1": 0.5}) is None


def test_a_results_json_from_before_format_2_becomes_the_first_entry():
  legacy = {"knn/top1": 0.7, "linear_probe/top1": 0.8, "steps": 6, "method": "simclr",
            "seed": 0, "devices": "8 x cpu", "host": "old", "date": "2026-11-01T00:00:00+00:00"}
  other = _entry({"eval.knn_k": 20}, 6, **{"knn/top1": 0.6})
  record = results_file.merge(legacy, other)
  first = record["evaluations"][0]
  assert first["legacy"] and first["options"] == {}
  assert first["results"] == {"knn/top1": 0.7, "linear_probe/top1": 0.8, "steps": 6}
  assert first["run"] == {"method": "simclr", "seed": 0}
  # The old evaluation stays the headline: the readers of knn/top1 and the probe see it.
  assert record["linear_probe/top1"] == 0.8 and record["knn/top1"] == 0.7
  assert record["devices"] == "8 x cpu" and record["date"] == legacy["date"]


def test_environment_records_versions_commit_and_devices():
  env = results_file.environment()
  assert env["jax"] == jax.__version__ and env["flax"] == flax.__version__
  assert env["device_count"] == 8 and env["process_count"] == 1  # tests/conftest.py
  assert env["platform"] == "cpu" and env["device_kind"] == jax.devices()[0].device_kind
  assert env["ssljax_version"]
  head = subprocess.run(["git", "-C", ROOT, "rev-parse", "HEAD"], capture_output=True,
                        text=True, check=False)
  if head.returncode != 0:
    pytest.skip("ssljax is not running from a git checkout")
  assert env["git_commit"] == head.stdout.strip()
  assert isinstance(env["git_dirty"], bool)


def test_write_results_merges_train_and_eval_records(tmp_path):
  workdir = str(tmp_path / "run")
  config = tiny_config(str(tmp_path))
  os.makedirs(workdir)
  loop._save_config(config, workdir)
  evaluate.write_results(config, workdir, {"knn/top1": 0.7, "linear_probe/top1": 0.8,
                                           "steps": 6})
  # `ssljax eval --config.eval.knn_k=3 --config.eval.linear_probe=False`
  evaluate.write_results(_overridden(config, eval__knn_k=3, eval__linear_probe=False),
                         workdir, {"knn/top1": 0.6, "steps": 6})
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    record = json.load(f)
  assert record["knn/top1"] == 0.7 and record["linear_probe/top1"] == 0.8
  assert [e["options"] for e in record["evaluations"]] == [
      {}, {"eval.knn_k": 3, "eval.linear_probe": False}]
  assert record["evaluations"][1]["results"] == {"knn/top1": 0.6, "steps": 6}
  assert record["evaluations"][1]["run"]["method"] == "simclr"
  assert record["environment"]["device_count"] == 8
  assert record["dataset"] == "arrays:tiny" and record["seed"] == 0

  # A damaged results.json is set aside, not lost, and a new one is started.
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    f.write("{not json")
  evaluate.write_results(config, workdir, {"knn/top1": 0.75, "steps": 6})
  with open(os.path.join(workdir, "results.unreadable.json"), encoding="utf-8") as f:
    assert f.read() == "{not json"
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    assert len(json.load(f)["evaluations"]) == 1


def test_write_results_sets_aside_a_record_it_cannot_merge(tmp_path, caplog):
  workdir = tmp_path / "run"
  config = tiny_config(str(tmp_path))
  workdir.mkdir()
  loop._save_config(config, str(workdir))
  (workdir / "results.unreadable.json").write_text("{not json")  # an earlier one is kept
  for n, text in enumerate(('[{"knn/top1": 0.7}]', '{"evaluations": [{"results": {}}]}'), 1):
    (workdir / "results.json").write_text(text)
    with caplog.at_level("WARNING"):
      evaluate.write_results(config, str(workdir), {"knn/top1": 0.75, "steps": 6})
    assert (workdir / f"results.unreadable.{n}.json").read_text() == text
    record = json.loads((workdir / "results.json").read_text())
    assert [e["results"]["knn/top1"] for e in record["evaluations"]] == [0.75]
    assert f"it is kept as results.unreadable.{n}.json" in caplog.text
  assert (workdir / "results.unreadable.json").read_text() == "{not json"


@pytest.mark.parametrize("damage", ["missing", "unreadable"])
def test_an_evaluation_without_the_run_config_keeps_the_runs_own_entry(tmp_path, caplog,
                                                                        damage):
  workdir = tmp_path / "run"
  config = tiny_config(str(tmp_path))
  workdir.mkdir()
  loop._save_config(config, str(workdir))
  evaluate.write_results(config, str(workdir), {"knn/top1": 0.7, "steps": 6})
  if damage == "missing":
    (workdir / "config.json").unlink()
  else:
    (workdir / "config.json").write_text("{not a config")
  changed = _overridden(config, eval__knn_k=3)
  with caplog.at_level("WARNING"):
    evaluate.write_results(changed, str(workdir), {"knn/top1": 0.2, "steps": 6})
  record = json.loads((workdir / "results.json").read_text())
  assert [(e["options"], e["results"]["knn/top1"]) for e in record["evaluations"]] == [
      ({}, 0.7), (None, 0.2)]
  assert record["knn/top1"] == 0.7  # the headline is still the run's own evaluation
  reason = "does not exist" if damage == "missing" else "cannot be read as a config"
  assert f"config.json {reason}, so the options this evaluation changed" in caplog.text
