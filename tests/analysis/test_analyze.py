"""ssljax analyze: every method's layers (shapes), end to end on a tiny SimCLR checkpoint, and
its command line."""

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax import cli
from ssljax.analysis import analyze as analyze_lib
from ssljax.analysis import geometry
from ssljax.methods import build_method
from ssljax.methods.base import RunInfo
from tests.util import SMALL_METHOD_SIZES, small_method_config, tiny_config


_RUN = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=64)


@pytest.mark.parametrize("name", sorted(SMALL_METHOD_SIZES))
def test_forward_layers_of_every_method(name, tmp_path):
  config = small_method_config(str(tmp_path), name)
  method = build_method(config, run=_RUN)
  views = tuple(jnp.zeros((16, 16, 16, 1)) for _ in range(method.num_views))
  params, state = jax.eval_shape(method.init, jax.random.key(0), views)
  copies = analyze_lib.views_needed(method, params, state, (16, 16, 1))
  # One view where the encoder takes any number; fixed view indices (Barlow Twins, symmetric
  # MoCo) need the method's number of views.
  assert copies in (1, method.num_views)
  if name in ("simclr", "barlow_twins"):
    assert copies == {"simclr": 1, "barlow_twins": 2}[name]
  x = jax.ShapeDtypeStruct((5, 16, 16, 1), jnp.float32)
  layers = jax.eval_shape(functools.partial(analyze_lib.forward_layers, method, copies),
                          params, state, x)
  names = list(layers)
  assert names[0] == "encoder"
  assert all(v.shape[0] == 5 and v.ndim == 2 for v in layers.values())
  outputs = [n for n in names if n.endswith("/output")]
  assert outputs and all(n + "/l2" in names for n in outputs)
  # Jacobians of the first head output with respect to the encoder features: [b, d_z, d_h].
  d_h = layers["encoder"].shape[1]
  fn = lambda h, p, s: analyze_lib.head_outputs(method, p, s, h[None])[outputs[0]][0]
  h = jax.ShapeDtypeStruct((3, d_h), jnp.float32)
  jac = jax.eval_shape(lambda h, p, s: geometry.jacobians(fn, h, p, s), h, params, state)
  assert jac.shape == (3, layers[outputs[0]].shape[1], d_h)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  """A workdir as ``ssljax train`` leaves it (config.json, a checkpoint), holding the
  initial state: the analysis reads any checkpoint, and compiling the train step and the
  final evaluation would cost ~25 s here (training and its checkpoints are tested in
  tests/train)."""
  from ssljax import data
  from ssljax.train import loop
  from ssljax.train.checkpoint import Checkpointer
  root = tmp_path_factory.mktemp("analyze")
  config = tiny_config(str(root), num_train=64, num_test=32)
  config.train.num_steps = 2
  # The encoder's width (32), so the projector's first layers share its probe compilation.
  config.method.simclr.proj_hidden_dim = 32
  workdir = str(root / "run")
  source = data.build_source(config.data, config.data.train_split)
  steps_per_epoch, total_steps = loop.run_length(config, len(source))
  _, init, _ = loop.build_state_and_step(config, loop.make_mesh(), tuple(source.image_shape),
                                         steps_per_epoch, total_steps, len(source))
  os.makedirs(workdir)
  loop._save_config(config, workdir)
  ckpt = Checkpointer(workdir)
  ckpt.save(2, init().replace(step=jnp.int32(2)),
            {"position": 2, "epoch": 2 / steps_per_epoch, "steps_per_epoch": steps_per_epoch})
  ckpt.wait()
  ckpt.close()
  return workdir


def _small(**overrides):
  a = analyze_lib.default_analysis_config()
  a.num_test, a.num_train, a.num_invariance, a.num_augmentations = 32, 64, 6, 4
  a.ranks = (2, 3, 20)
  a.num_neighbours = 5
  a.batch_size = 16
  a.knn_k = 5
  a.probe_epochs = 2
  a.probe_lrs = (0.1,)
  a.probe_weight_decays = (0.0,)
  a.precise_bn_examples = 16
  for k, v in overrides.items():
    a[k] = v
  return a


def test_analyze_end_to_end(tiny_run, tmp_path):
  from ssljax.train.loop import restore_latest
  out = str(tmp_path / "out")
  results = analyze_lib.analyze(tiny_run, out, _small())
  for name in ("analysis.json", "summary.md", "spectra.png", "invariance.png", "overlaps.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  with open(os.path.join(out, "analysis.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["layers"] == results["layers"]
  assert saved["precise_bn_examples"] == 16
  assert saved["method_config"]["simclr"]["proj_dim"] == 8  # for grouping a sweep's cells

  # The layers are head_layers' (in order), each head output followed by its L2 version.
  run = restore_latest(tiny_run)
  views = (np.zeros((2, 16, 16, 1), np.float32),)
  feats, _ = run.method.features(run.state.params, run.state.method_state, views, train=False)
  expected = []
  for name in run.method.head_layers(run.state.params, run.state.method_state, feats):
    expected += [name, name + "/l2"] if name.endswith("/output") else [name]
  assert saved["layers"] == expected
  assert saved["layers"][0] == "encoder" and "projector/output/l2" in saved["layers"]

  for name in saved["layers"]:
    p = saved["per_layer"][name]
    dim = p["dimensionality"]
    assert 0 < dim["effective_rank"] <= p["dim"] + 1e-6
    assert 1 <= dim["components_90"] <= dim["components_99"] <= p["dim"]
    assert len(dim["spectrum"]) == min(32, p["dim"])
    for policy in ("train", "reference"):
      inv = p["invariance"][policy]
      assert np.isfinite(inv["ratio"]) and inv["ratio"] >= 0
      assert -1 - 1e-6 <= inv["positive_cosine"] <= 1 + 1e-6
    assert 0 <= p["knn_top1"] <= 1 and 0 <= p["probe_top1"] <= 1
  # L2-normalised outputs have unit norm: positive cosine is computed on the same directions.
  l2 = saved["per_layer"]["projector/output/l2"]["invariance"]["train"]["positive_cosine"]
  raw = saved["per_layer"]["projector/output"]["invariance"]["train"]["positive_cosine"]
  assert l2 == pytest.approx(raw, abs=1e-5)

  jac = saved["jacobian"]
  assert jac["layer"] == "projector/output"
  d_out, d_h = jac["shape"]
  assert 0 < jac["mean_effective_rank"] <= min(d_out, d_h) + 1e-6
  assert len(jac["mean_spectrum"]) == min(d_out, d_h)
  # r = 2, 3: every pair defined; r = 20: K = 4 copies cannot span 20 directions.
  for r in ("2", "3"):
    entry = saved["overlaps"][r]
    assert entry["undefined"] == []
    for pair in ("P-T", "P-A", "T-A"):
      assert 0 <= entry[pair]["mean"] <= 1 + 1e-6
    assert entry["chance"] == pytest.approx(int(r) / d_h)
  assert "A" in saved["overlaps"]["20"]["undefined"]
  assert all(np.isfinite(v) for v in saved["timings_s"].values())
  with open(os.path.join(out, "summary.md"), encoding="utf-8") as f:
    summary = f.read()
  assert "`projector/output/l2`" in summary and "coincide" in summary  # strength 1 = reference


def test_jacobian_of_a_head_matches_finite_differences(tiny_run):
  from ssljax.train.loop import restore_latest
  run = restore_latest(tiny_run)
  layers = analyze_lib.Layers(run.method, run.state.params, run.state.method_state)
  d_h = run.state.params["projector"]["dense1"]["kernel"].shape[0]
  h = np.random.default_rng(0).normal(size=(3, d_h)).astype(np.float32)
  fn = lambda x: layers.head(x[None])["projector/output"][0]
  jac = np.asarray(geometry.jacobians(fn, jnp.asarray(h)))
  eps = 1e-2
  for j in range(0, d_h, 7):
    step = np.zeros((1, d_h), np.float32)
    step[0, j] = eps
    fd = (np.asarray(layers.head(jnp.asarray(h + step))["projector/output"])
          - np.asarray(layers.head(jnp.asarray(h - step))["projector/output"])) / (2 * eps)
    np.testing.assert_allclose(jac[:, :, j], fd, rtol=2e-2, atol=2e-3)


def test_command_line(tiny_run, tmp_path, capsys):
  out = str(tmp_path / "cli")
  args = ["--workdir", tiny_run, "--out", out, "--config.analysis.num_test=16",
          "--config.analysis.num_train=32", "--config.analysis.num_invariance=4",
          "--config.analysis.num_augmentations=4", "--config.analysis.ranks=(2,)",
          "--config.analysis.num_neighbours=4", "--config.analysis.knn=False",
          "--config.analysis.probe=False", "--config.analysis.plots=False",
          "--config.analysis.batch_size=16", "--config.analysis.precise_bn_examples=0"]
  assert cli.main(["ssljax", "analyze", *args]) == 0  # the `ssljax analyze` command
  with open(os.path.join(out, "analysis.json"), encoding="utf-8") as f:
    saved = json.load(f)
  assert saved["num_test"] == 16 and saved["analysis"]["ranks"] == [2]
  assert "knn_top1" not in saved["per_layer"]["encoder"]
  assert analyze_lib.main(["--workdir", tiny_run, "--config.analysis.nope=1"]) == 1
  assert cli.main(["ssljax", "analyze", "--workdir", str(tmp_path / "missing")]) == 1
  assert "ssljax analyze" in capsys.readouterr().err


def test_parse_overrides():
  a = analyze_lib.parse_overrides(analyze_lib.default_analysis_config(),
                                  ["--config.analysis.ranks=[4, 8]",
                                   "--config.analysis.reference_strength=2",
                                   "--config.analysis.reference_policy=byol"])
  assert a.ranks == (4, 8) and a.reference_strength == 2.0 and a.reference_policy == "byol"
  with pytest.raises(ValueError, match="valid keys"):
    analyze_lib.parse_overrides(a, ["--config.analysis.missing=3"])
