"""`ssljax export` and `ssljax.load_encoder`: the README's commands and snippet on a tiny run.

The run is a checkpoint of an initialised (untrained) tiny SimCLR state, which needs no
train-step compile; evaluation re-estimates its BatchNorm statistics (precise BN), so the
exported statistics differ from the checkpoint's running averages.
"""

import json
import os
import re

import jax
import numpy as np
import pytest
from PIL import Image

import ssljax
from ssljax import cli, data, export
from ssljax.eval import evaluate
from ssljax.eval.features import extract_features
from ssljax.eval.knn import knn_accuracy
from ssljax.train import loop
from ssljax.train.checkpoint import Checkpointer
from tests.util import readme_command, readme_text, tiny_config

WORKDIR = "runs/simclr_fashion_mnist"  # the README's workdir, relative to the test's cwd


def _readme_snippet() -> str:
  """The README's python block that calls ssljax.load_encoder."""
  blocks = re.findall(r"```python\n(.*?)```", readme_text(), flags=re.S)
  found = [b for b in blocks if "ssljax.load_encoder(" in b]
  assert len(found) == 1, blocks
  return found[0]


def _tiny_run(tmp_path):
  """A finished-looking workdir at WORKDIR (cwd = tmp_path): config.json and a checkpoint."""
  (tmp_path / "data").mkdir()
  config = tiny_config(str(tmp_path / "data"))
  config.eval.precise_bn_examples = 32  # two batches of 16
  config.eval.linear_probe = False
  mesh = loop.make_mesh()
  source = data.build_source(config.data, config.data.train_split)
  steps_per_epoch, total = loop.run_length(config, len(source))
  method, init, _ = loop.build_state_and_step(config, mesh, tuple(source.image_shape),
                                              steps_per_epoch, total, len(source))
  state = init()
  os.makedirs(WORKDIR)
  loop._save_config(config, WORKDIR)
  ckpt = Checkpointer(WORKDIR)
  ckpt.save(total, state, {"position": total, "epoch": total / steps_per_epoch,
                           "steps_per_epoch": steps_per_epoch})
  ckpt.wait()
  ckpt.close()
  return config, mesh, method, state, source


def test_readme_export_and_snippet_embed_with_the_evaluated_statistics(tmp_path, monkeypatch,
                                                                       capsys):
  monkeypatch.chdir(tmp_path)
  config, mesh, method, state, source = _tiny_run(tmp_path)
  reported = loop.evaluate_workdir(WORKDIR)

  # The README's re-evaluation keeps the first result at the top level.
  assert cli.main(readme_command("eval")) == 0
  with open(os.path.join(WORKDIR, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  assert results["knn/top1"] == reported["knn/top1"]
  assert [e["options"] for e in results["evaluations"]] == [{}, {"eval.knn_k": 20}]

  argv = readme_command("export")
  out = argv[argv.index("--out") + 1]
  capsys.readouterr()
  assert cli.main(argv) == 0
  features = method.encoder.num_features
  assert json.loads(capsys.readouterr().out) == {"feature_dim": features, "step": 6}
  with open(os.path.join(out, "encoder.json"), encoding="utf-8") as f:
    spec = json.load(f)
  assert spec["architecture"] == "ResNet" and spec["encoder"] == config.model.encoder
  assert spec["input"]["image_size"] == 16 and spec["input"]["channels"] == 1
  assert spec["input"]["mean"] == [0.2] and spec["input"]["std"] == [0.3]
  assert spec["batch_stats"].startswith("re-estimated on 32 clean train images")
  assert spec["step"] == 6 and spec["feature_dim"] == features
  assert spec["num_examples"] == len(source)
  assert spec["results"]["knn/top1"] == reported["knn/top1"]
  assert spec["environment"]["device_count"] == 8

  module, variables = ssljax.load_encoder(out)
  # The exported variables are those the evaluation applied: precise-BN statistics, not the
  # checkpoint's running averages.
  evaluated = jax.device_get(evaluate.encoder_variables(config, method, state, mesh,
                                                        source.images))
  jax.tree.map(np.testing.assert_array_equal, variables, evaluated)
  running = method.eval_variables(state.params, state.method_state)["batch_stats"]
  assert not np.allclose(variables["batch_stats"]["stem_bn"]["mean"],
                         running["stem_bn"]["mean"])
  # ... so the loaded encoder reproduces the reported kNN exactly.
  test = data.build_source(config.data, config.data.test_split)
  apply = lambda v, x: module.apply(v, x, train=False)
  bank = extract_features(apply, variables, source.images, batch_size=16, mesh=mesh)
  queries = extract_features(apply, variables, test.images, batch_size=16, mesh=mesh)
  knn = knn_accuracy(bank, source.labels, queries, test.labels, num_classes=4,
                     k=config.eval.knn_k, temperature=config.eval.knn_t)
  assert knn["top1"] == reported["knn/top1"]

  # The README snippet, verbatim, on a test image, without the data directory.
  Image.fromarray(test.images[0, :, :, 0]).save("image.png")
  os.rename(tmp_path / "data", tmp_path / "moved")
  namespace = {}
  exec(compile(_readme_snippet(), "README.md", "exec"), namespace)  # noqa: S102
  embedding = np.asarray(namespace["embedding"])
  assert embedding.shape == (1, features)
  np.testing.assert_allclose(embedding, queries[:1], rtol=1e-4, atol=1e-5)

  # A larger, non-square image is decoded as an image folder's images are (shorter side
  # resized, centre crop), not squashed to a square.
  wide = np.array(Image.fromarray(test.images[1, :, :, 0]).resize((40, 24)))
  wide[:, :4] = 255  # a band at the edge: squashing keeps it, the centre crop drops it
  Image.fromarray(wide).save("image.png")
  exec(compile(_readme_snippet(), "README.md", "exec"), namespace)  # noqa: S102
  decoded = data.sources._decode_image("image.png", 16, 1)
  assert decoded.shape == (16, 16, 1)
  expected = module.apply(variables, decoded[None].astype(np.float32) / 255.0, train=False)
  np.testing.assert_allclose(np.asarray(namespace["embedding"]), np.asarray(expected),
                             rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("method", ["metamask", "simclr+uota", "npid"])
def test_load_encoder_rebuilds_the_encoder_each_method_evaluates(tmp_path, method):
  """MetaMask evaluates its masked encoder; an add-on's parameters are not the encoder's;
  NPID's method is only built knowing the training-set size (its memory bank's rows), which
  the export records."""
  import flax.serialization
  import jax.numpy as jnp

  from ssljax.config import config_to_json
  from ssljax.methods import RunInfo, build_method

  name, *addons = method.split("+")
  config = tiny_config(str(tmp_path), method=name, addons=tuple(addons))
  if name == "metamask":
    config.optim.name = "sgd"  # its meta step refuses LARS
  run = RunInfo(steps_per_epoch=2, total_steps=6, num_examples=32)
  built = build_method(config, run=run)
  params, method_state = built.init(jax.random.key(1),
                                    [jnp.zeros((4, 16, 16, 1))] * built.num_views)
  evaluated = jax.tree.map(np.asarray, built.eval_variables(params, method_state))
  out = tmp_path / "export"
  out.mkdir()
  (out / "variables.msgpack").write_bytes(flax.serialization.msgpack_serialize(evaluated))
  (out / "config.json").write_text(config_to_json(config), encoding="utf-8")
  spec = export.encoder_spec(config, built.encoder, feature_dim=0, step=0,
                             precise_bn_images=0, num_examples=run.num_examples)
  (out / "encoder.json").write_text(json.dumps(spec), encoding="utf-8")

  module, variables = ssljax.load_encoder(out)
  assert type(module).__name__ == ("MaskedEncoder" if name == "metamask" else "ResNet")
  images = np.random.default_rng(0).uniform(size=(2, 16, 16, 1)).astype(np.float32)
  np.testing.assert_allclose(module.apply(variables, images, train=False),
                             built.encoder.apply(evaluated, images, train=False), rtol=1e-6)


def test_load_encoder_computes_in_the_dtype_the_evaluation_used(tmp_path, monkeypatch):
  """config.json keeps train.compute_dtype = 'auto'; an encoder evaluated in bf16 on a GPU
  is rebuilt in bf16 on a CPU too, as encoder.json records it, not in the CPU's float32."""
  import flax.serialization
  import jax.numpy as jnp

  from ssljax.config import config_to_json
  from ssljax.methods import RunInfo, build_method

  config = tiny_config(str(tmp_path))
  config.train.compute_dtype = "auto"
  out = tmp_path / "export"
  out.mkdir()
  with monkeypatch.context() as gpu:  # the export is written where the run evaluated: a GPU
    gpu.setattr(jax, "default_backend", lambda: "gpu")
    built = build_method(config, run=RunInfo(steps_per_epoch=2, total_steps=6))
    spec = export.encoder_spec(config, built.encoder, feature_dim=0, step=0,
                               precise_bn_images=0)
  assert built.encoder.dtype == jnp.bfloat16 and spec["compute_dtype"] == "bfloat16"
  params, method_state = built.init(jax.random.key(1),
                                    [jnp.zeros((4, 16, 16, 1))] * built.num_views)
  evaluated = jax.tree.map(np.asarray, built.eval_variables(params, method_state))
  (out / "variables.msgpack").write_bytes(flax.serialization.msgpack_serialize(evaluated))
  (out / "config.json").write_text(config_to_json(config), encoding="utf-8")
  (out / "encoder.json").write_text(json.dumps(spec), encoding="utf-8")

  module, variables = ssljax.load_encoder(out)  # on this CPU, where 'auto' means float32
  assert module.dtype == jnp.bfloat16
  images = np.random.default_rng(0).uniform(size=(2, 16, 16, 1)).astype(np.float32)
  np.testing.assert_array_equal(module.apply(variables, images, train=False),
                                built.encoder.apply(evaluated, images, train=False))


def test_load_encoder_names_what_is_wrong(tmp_path):
  with pytest.raises(export.ExportError, match="not an encoder export.*ssljax export"):
    ssljax.load_encoder(tmp_path)
  config = tiny_config(str(tmp_path))
  (tmp_path / "config.json").write_text(config.to_json(), encoding="utf-8")
  spec = {"format": export.FORMAT, "architecture": "ResNet",
          "input": {"image_size": 16, "channels": 1}}
  (tmp_path / "encoder.json").write_text(json.dumps(spec), encoding="utf-8")
  import flax.serialization
  wrong = {"params": {"stem_conv": {"kernel": np.zeros((3, 3, 1, 4), np.float32)}}}
  (tmp_path / "variables.msgpack").write_bytes(flax.serialization.msgpack_serialize(wrong))
  with pytest.raises(export.ExportError, match="does not fit the ResNet"):
    ssljax.load_encoder(tmp_path)
  (tmp_path / "encoder.json").write_text(json.dumps({**spec, "format": export.FORMAT + 1}))
  with pytest.raises(export.ExportError, match="upgrade ssljax"):
    ssljax.load_encoder(tmp_path)


def test_export_command_line(tmp_path, capsys):
  for argv in (["ssljax", "export", "--help"], ["ssljax", "help", "export"]):
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("usage: ssljax export --workdir DIR --out OUT")
    assert "ssljax.load_encoder(OUT)" in printed and "config keys:" in printed
  assert cli.main(["ssljax", "--help"]) == 0
  assert "ssljax export --workdir" in capsys.readouterr().out
  with pytest.raises(SystemExit, match="ssljax export: --workdir is required"):
    cli.main(["ssljax", "export", "--out", str(tmp_path / "out")])
  with pytest.raises(SystemExit, match="ssljax export: .*config.json not found"):
    cli.main(["ssljax", "export", "--workdir", str(tmp_path / "none"), "--out", "x"])
  workdir = tmp_path / "run"
  workdir.mkdir()
  loop._save_config(tiny_config(str(tmp_path)), str(workdir))
  with pytest.raises(SystemExit, match="ssljax export: --out is required"):
    cli.main(["ssljax", "export", "--workdir", str(workdir)])
  with pytest.raises(SystemExit, match="ssljax export: no checkpoint in .*train first"):
    cli.main(["ssljax", "export", "--workdir", str(workdir), "--out", str(tmp_path / "out")])
  assert not (tmp_path / "out").exists()
