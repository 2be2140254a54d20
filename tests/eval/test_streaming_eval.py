"""Evaluation on a streaming source (issue 20): features, precise BN and labels of seeded
subsets read a batch at a time through `StreamingSource.get` equal those of the same images as
an array; a short run on a folder_stream writes the kNN monitor, kNN and linear probe; a
whole-split request on a stream is skipped with the keys to set."""

from __future__ import annotations

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from ssljax import data
from ssljax.config import default_config
from ssljax.eval import evaluate
from ssljax.eval.features import StreamedImages, extract_features
from ssljax.eval.precise_bn import precise_batch_stats
from ssljax.export import export_encoder
from ssljax.train import loop

NUM_CLASSES = 2
TRAIN_PER_CLASS, TEST_PER_CLASS = 16, 5  # 32 train, 10 test JPEGs of 24 x 20 (W x H)
SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
  """DIR/{train,test}/<wnid>/<i>.JPEG; class c's images are bright in channel c."""
  root = tmp_path_factory.mktemp("stream_eval")
  rng = np.random.default_rng(0)
  for split, per_class in (("train", TRAIN_PER_CLASS), ("test", TEST_PER_CLASS)):
    for c in range(NUM_CLASSES):
      directory = root / split / f"n{c:08d}"
      directory.mkdir(parents=True)
      for i in range(per_class):
        pixels = rng.integers(0, 100, (20, 24, 3), dtype=np.uint8)
        pixels[..., c] += 150
        Image.fromarray(pixels).save(directory / f"{i}.JPEG", quality=90)
  return str(root)


def _config(folder: str, **eval_overrides):
  c = default_config("simclr")
  c.data.source = "folder_stream"
  c.data.name = "stream_eval"
  c.data.data_dir = folder
  c.data.train_split, c.data.test_split = "train", "test"
  c.data.image_size = SIZE
  c.data.channels = 3
  c.data.num_classes = NUM_CLASSES
  c.data.mean, c.data.std = (0.4,) * 3, (0.3,) * 3
  c.data.stream_workers = 0
  c.data.stream_threads = 1
  c.augment.crop_size = SIZE
  c.model.encoder = "resnet_tiny"
  c.model.width = 0.25
  c.method.simclr.proj_hidden_dim = 16
  c.method.simclr.proj_dim = 8
  c.train.batch_size = 16
  c.train.num_steps = 2
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = 2
  c.train.eval_every_steps = 2
  c.train.progress_bar = False
  c.eval.batch_size = 8
  c.eval.knn_k = 5
  c.eval.probe_epochs = 2
  c.eval.probe_batch_size = 8
  c.eval.probe_lrs = (0.1,)
  c.eval.probe_weight_decays = (0.0,)
  c.eval.plots = False
  c.eval.monitor_train_examples = 20
  c.eval.monitor_test_examples = 6
  c.eval.update(eval_overrides)
  return c


def _pool_and_project(variables, x):
  return jnp.mean(x, axis=(1, 2)) @ variables["w"]


def test_streamed_subset_features_and_labels_equal_the_array_path(folder):
  c = _config(folder)
  source = data.build_source(c.data, "train")
  subset = evaluate._subset(source, 20, seed=3)
  idx = evaluate._subset_index(len(source), 20, seed=3)  # the in-memory draw
  expected = source.get(idx)
  variables = {"w": np.random.default_rng(1).normal(size=(3, 7)).astype(np.float32)}

  # 20 images in batches of 8: two full batches and a padded one, read as they are needed.
  streamed = extract_features(_pool_and_project, variables, subset.images, batch_size=8)
  in_memory = extract_features(_pool_and_project, variables, expected["image"], batch_size=8)
  np.testing.assert_array_equal(streamed, in_memory)
  np.testing.assert_array_equal(subset.labels, expected["label"])
  assert sorted(set(subset.labels.tolist())) == [0, 1]

  whole = evaluate._subset(source, 0, seed=3)  # 0: all 32, still streamed
  assert isinstance(whole.images, StreamedImages) and len(whole.images) == 32


def test_streamed_images_are_read_one_batch_at_a_time():
  images = np.random.default_rng(2).integers(0, 256, (13, 4, 4, 3), dtype=np.uint8)
  reads = []

  def read(positions):
    reads.append(positions.tolist())
    return images[positions]

  variables = {"w": np.eye(3, dtype=np.float32)}
  got = extract_features(_pool_and_project, variables, StreamedImages(13, read), batch_size=5)
  np.testing.assert_array_equal(
      got, extract_features(_pool_and_project, variables, images, batch_size=5))
  assert reads == [list(range(0, 5)), list(range(5, 10)), list(range(10, 13))]
  picked = StreamedImages(13, read)[np.array([12, 0, 7])]
  np.testing.assert_array_equal(picked.rows(1, 9), images[[0, 7]])


def test_a_failed_read_ahead_is_raised_not_hung():
  images = np.zeros((13, 4, 4, 3), np.uint8)

  def read(positions):
    if positions[0] >= 5:
      raise OSError(f"cannot read image {positions[0]}")
    return images[positions]

  with pytest.raises(OSError, match="cannot read image 5"):
    extract_features(_pool_and_project, {"w": np.eye(3, dtype=np.float32)},
                     StreamedImages(13, read), batch_size=5)


class _PoolDenseBN(nn.Module):
  bn_momentum: float = 0.9
  axis_name: str | None = None

  @nn.compact
  def __call__(self, x, train: bool = True):
    h = nn.Dense(4)(jnp.mean(x, axis=(1, 2)))
    return nn.BatchNorm(use_running_average=not train, momentum=self.bn_momentum)(h)


def test_precise_bn_on_streamed_images_equals_the_array(folder):
  source = data.build_source(_config(folder).data, "train")
  subset = evaluate._subset(source, 0, seed=0)
  images = source.get(np.arange(len(source)))["image"]
  module = _PoolDenseBN()
  variables = module.init(jax.random.key(0), jnp.zeros((2, SIZE, SIZE, 3)), train=False)
  streamed = precise_batch_stats(module, variables, subset.images, batch_size=8)
  in_memory = precise_batch_stats(module, variables, images, batch_size=8)
  jax.tree.map(np.testing.assert_array_equal, streamed["batch_stats"], in_memory["batch_stats"])
  assert not np.allclose(streamed["batch_stats"]["BatchNorm_0"]["var"], 1.0)


@pytest.mark.parametrize("key", ["monitor_train_examples", "monitor_test_examples"])
def test_a_whole_split_on_a_stream_is_skipped_naming_the_keys(folder, key):
  c = _config(folder, **{key: 0})
  source = data.build_source(c.data, "train")
  results = evaluate.evaluate_state(c, None, None, None, train_source=source)
  reason = results["eval/skipped"]
  assert "'folder_stream' streams its images" in reason
  assert "--config.eval.monitor_train_examples=" in reason
  assert "--config.eval.monitor_test_examples=" in reason
  assert evaluate.knn_monitor(c, None, None, train_source=source) is None
  c.eval.update({key: 5})
  assert evaluate.skip_reason(c, source) is None


def test_a_whole_split_on_a_stream_still_gets_the_linear_evaluation(folder, tmp_path):
  import types

  from jax.sharding import Mesh

  c = _config(folder, monitor_train_examples=0, linear_eval=True, linear_eval_batch_size=8,
              linear_eval_epochs=0.5)  # 32 // 8 = 4 steps per epoch: 2 steps
  module = _PoolDenseBN()
  variables = module.init(jax.random.key(0), jnp.zeros((2, SIZE, SIZE, 3)), train=False)
  method = types.SimpleNamespace(encoder=module, eval_variables=lambda params, ms: variables)
  state = types.SimpleNamespace(params=None, method_state=None, step=5)
  mesh = Mesh(np.array(jax.devices()[:1]), ("data",))
  source = data.build_source(c.data, "train")
  results = evaluate.evaluate_state(c, method, state, mesh, train_source=source,
                                    workdir=str(tmp_path))
  assert "eval/skipped" not in results and "knn/top1" not in results
  assert "'folder_stream' streams its images" in results["eval/knn_and_probes_skipped"]
  assert results["linear_eval/steps"] == 2
  assert results["linear_eval/test_examples"] == 2 * TEST_PER_CLASS  # the whole test split
  assert os.listdir(tmp_path / "linear_eval")[0].startswith("step5-")
  c.eval.enabled = False  # every other reason to skip still skips everything
  assert evaluate.evaluate_state(c, method, state, mesh, train_source=source) == {
      "eval/skipped": "eval.enabled is False"}


def test_training_on_a_stream_writes_knn_monitor_and_probe(folder, tmp_path):
  c = _config(folder, precise_bn_examples=16)
  results = loop.train(c, str(tmp_path / "run"))

  assert "eval/skipped" not in results
  assert (results["eval/train_examples"], results["eval/test_examples"]) == (20, 6)
  assert 0.0 <= results["knn/top1"] <= 1.0 and results["knn/top5"] == 1.0  # two classes
  assert 0.0 <= results["linear_probe/top1"] <= 1.0
  assert "on 20 train and 6 test images drawn from the streamed splits" in results[
      "knn/protocol"]
  assert "BN statistics re-estimated on 16 clean train images" in results["knn/protocol"]
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  monitors = [r["monitor/knn_top1"] for r in records if "monitor/knn_top1" in r]
  assert len(monitors) == 1 and 0.0 <= monitors[0] <= 1.0
  stored = json.loads((tmp_path / "run" / "results.json").read_text())
  assert stored["knn/top1"] == results["knn/top1"]
  # `ssljax export` re-estimates BN on the same streamed train subset (no `.images` on a stream).
  spec = export_encoder(str(tmp_path / "run"), str(tmp_path / "export"))
  assert spec["batch_stats"] == "re-estimated on 16 clean train images (eval.precise_bn_examples)"
