"""The sweep driver: its grid, commands, resume logic, aggregation over seeds and report."""

import json
import math
import os

import pytest

from ssljax.analysis import sweep
from ssljax.config import load_config

_SPEC = "configs/simclr.py:fashion_mnist"


def _keys():
  return sweep.head_keys(load_config(_SPEC), None, None)


def test_grid_puts_seeds_outermost_and_names_every_cell():
  cells = sweep.grid([0.5, 1.0], [128, 512], [], [0, 1])
  assert len(cells) == 8
  assert [c.seed for c in cells[:4]] == [0, 0, 0, 0]
  assert [c.strength for c in cells[:2]] == [0.5, 1.0]
  assert cells[0].name == "s0.5_w128_dcfg_seed0"
  assert len({c.name for c in cells}) == 8
  with pytest.raises(ValueError, match="strengths must be >= 0"):
    sweep.grid([-1.0], [], [], [0])


def test_head_keys_default_to_the_projector_and_unknown_keys_are_named():
  config = load_config(_SPEC)
  assert _keys() == ("method.simclr.proj_hidden_dim", "method.simclr.proj_layers")
  with pytest.raises(ValueError, match=r"'method.simclr.width' does not exist for method "
                                       r"'simclr'; pass --width-key with one of: .*"
                                       r"method.simclr.proj_hidden_dim"):
    sweep.head_keys(config, "method.simclr.width", None)


def test_commands_set_the_cell_and_pass_overrides_through(tmp_path):
  cell = sweep.Cell(0.25, 128, 3, 1)
  cmd = sweep.train_command(_SPEC, str(tmp_path), cell, _keys(), ["--config.train.epochs=1"])
  assert "--config.augment.strength=0.25" in cmd and "--config.seed=1" in cmd
  assert "--config.method.simclr.proj_hidden_dim=128" in cmd
  assert "--config.method.simclr.proj_layers=3" in cmd and cmd[-1] == "--config.train.epochs=1"
  assert cmd[cmd.index("--workdir") + 1] == os.path.join(str(tmp_path), "s0.25_w128_d3_seed1")
  analyze = sweep.analyze_command(str(tmp_path), cell, ["num_test=100"])
  assert analyze[-1] == "--config.analysis.num_test=100"
  # A cell without width/depth keeps the config's values: no override at all.
  plain = sweep.train_command(_SPEC, str(tmp_path), sweep.Cell(1.0, None, None, 0), _keys())
  assert not any("proj_" in a for a in plain)


def _fake_analysis(strength, seed, width):
  # The projector gets more invariant and lower-rank with strength; seeds differ slightly.
  return {
      "step": 10, "jacobian": {"layer": "projector/output", "mean_effective_rank": 10 / strength},
      "per_layer": {
          "encoder": {"knn_top1": 0.8 + 0.01 * seed, "probe_top1": 0.85,
                      "invariance": {"train": {"ratio": 0.5}, "reference": {"ratio": 0.6}},
                      "dimensionality": {"effective_rank": 30.0, "components_90": 20}},
          "projector/output": {"knn_top1": 0.7, "probe_top1": 0.75,
                               "invariance": {"train": {"ratio": 0.4 / strength},
                                              "reference": {"ratio": 0.5}},
                               "dimensionality": {"effective_rank": 12.0 / strength + width / 512,
                                                  "components_90": 8}}},
      "overlaps": {"10": {"P-T": {"mean": 0.3}, "P-A": {"mean": 0.2}, "chance": 0.02}}}


def test_run_cell_trains_and_analyses_once_and_resumes(tmp_path):
  root = str(tmp_path)
  calls = []

  def runner(cmd):  # stands in for the subprocesses: writes what they would write
    calls.append(cmd[3] if cmd[2] == "ssljax.cli" else "analyze")
    wd = cmd[cmd.index("--workdir") + 1]
    if cmd[2] == "ssljax.cli":
      open(os.path.join(wd, "results.json"), "w").write("{}")
    else:
      os.makedirs(os.path.join(wd, "analysis"), exist_ok=True)
      json.dump(_fake_analysis(1.0, 0, 128), open(os.path.join(wd, "analysis", "analysis.json"), "w"))
    return 0

  cell = sweep.Cell(1.0, 128, None, 0)
  assert sweep.run_cell(_SPEC, root, cell, _keys(), runner=runner) == "trained+analysed"
  assert sweep.run_cell(_SPEC, root, cell, _keys(), runner=runner) == "done"
  os.remove(os.path.join(root, cell.name, "analysis", "analysis.json"))
  assert sweep.run_cell(_SPEC, root, cell, _keys(), runner=runner) == "analysed"
  assert calls == ["train", "analyze", "analyze"]
  with pytest.raises(RuntimeError, match="exit status 3 from: .*ssljax.cli train"):
    sweep.run_cell(_SPEC, root, sweep.Cell(2.0, 128, None, 0), _keys(), runner=lambda c: 3)


def test_report_averages_seeds_and_draws_the_curves(tmp_path):
  root = str(tmp_path)
  for strength in (0.5, 1.0, 2.0):
    for seed in (0, 1):
      for width in (128, 512):
        cell = sweep.Cell(strength, width, None, seed)
        wd = os.path.join(root, cell.name)
        os.makedirs(os.path.join(wd, "analysis"))
        json.dump({"strength": strength, "width": width, "depth": None, "seed": seed},
                  open(os.path.join(wd, "sweep_cell.json"), "w"))
        json.dump(_fake_analysis(strength, seed, width),
                  open(os.path.join(wd, "analysis", "analysis.json"), "w"))
  os.makedirs(os.path.join(root, "unfinished"))  # no analysis: left out
  result = sweep.report(root)
  assert len(result["cells"]) == 12 and len(result["aggregate"]) == 6
  first = result["aggregate"][0]
  assert (first["width"], first["strength"], first["seeds"]) == (128, 0.5, [0, 1])
  assert first["encoder/knn_top1"] == pytest.approx(0.805)
  assert first["encoder/knn_top1_spread"] == pytest.approx(0.01)
  assert first["projector/invariance_train"] == pytest.approx(0.8)
  assert first["jacobian_rank"] == pytest.approx(20.0)
  assert first["overlap_chance"] == pytest.approx(0.02)
  wide = [e for e in result["aggregate"] if e["width"] == 512 and e["strength"] == 2.0][0]
  assert wide["projector/effective_rank"] == pytest.approx(7.0)
  table = open(os.path.join(root, "sweep.md")).read()
  assert "| 128 | cfg | 0.5 | 0,1 | 0.805 / 0.700 |" in table
  assert os.path.getsize(os.path.join(root, "sweep.png")) > 10_000
  assert math.isnan(sweep.cell_row({"jacobian": {"layer": "x", "mean_effective_rank": 1.0},
                                    "per_layer": {}}, {"strength": 1, "width": None,
                                                       "depth": None, "seed": 0},
                                   10)["encoder/knn_top1"])


def test_command_line_lists_picks_a_slurm_cell_and_names_bad_input(tmp_path, capsys, monkeypatch):
  root = str(tmp_path)
  assert sweep.main(["--config", _SPEC, "--root", root, "--strengths", "0.5", "1",
                     "--widths", "64", "--seeds", "0", "1", "--list"]) == 0
  listed = capsys.readouterr().out.splitlines()
  assert listed == ["0 s0.5_w64_dcfg_seed0", "1 s1_w64_dcfg_seed0", "2 s0.5_w64_dcfg_seed1",
                    "3 s1_w64_dcfg_seed1"]
  monkeypatch.delenv("SLURM_ARRAY_TASK_ID", raising=False)
  assert sweep.main(["--config", _SPEC, "--root", root, "--cell", "-1"]) == 1
  assert "SLURM_ARRAY_TASK_ID, which is not set" in capsys.readouterr().err
  monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "99")
  assert sweep.main(["--config", _SPEC, "--root", root, "--cell", "-1"]) == 1
  assert "--cell 99 is outside the grid's 14 cells" in capsys.readouterr().err
  assert sweep.main(["--root", root, "--report-only"]) == 1
  assert "no finished sweep cell" in capsys.readouterr().err


def test_ssljax_sweep_dispatches_to_the_driver(tmp_path, capsys):
  from ssljax import cli
  assert cli.main(["ssljax", "sweep", "--config", _SPEC, "--root", str(tmp_path),
                   "--strengths", "2", "--seeds", "3", "--list"]) == 0
  assert capsys.readouterr().out == "0 s2_wcfg_dcfg_seed3\n"
