"""Every shipped ``<config>:imagenet`` recipe trains on the streaming ImageNet input.

Each config with an ``imagenet`` setting runs two steps through `ssljax.train.loop.train` on
TFDS's mocked ``imagenet2012`` (random images of varying size, read through the
``'tfds_stream'`` source exactly as a prepared ImageNet is). Only sizes shrink: images and
crops of 32 px (multi-crop small crops 16 px), the CPU backbone, batch 16, two steps, head
widths, queues and negatives capped at 64, SwAV prototypes at the batch and CLD clusters below
it, evaluation on streamed subsets of 32 train and 16 test images with two probe epochs. The
data source, method, add-ons, augmentation policy and optimiser are the recipe's. Three
recipes run in the default suite, the rest with ``-m slow``; a recipe that the stream cannot
serve (a long-tailed subset) and the in-memory source on ImageNet fail with their reason.
"""

from __future__ import annotations

import json
import math
import os

import ml_collections
import pytest

from ssljax import configs, data
from ssljax.config import DATASETS, load_config, load_config_module
from ssljax.train import loop

tfds = pytest.importorskip("tensorflow_datasets")

NUM_EXAMPLES = 48  # 3 steps of 16 per epoch
IMAGE_SIZE = 32
SMALL_CROP_SIZE = 16
BATCH = 16
STEPS = 2
CAP = 64  # the widest head, the longest queue, the most negatives
EVAL_TRAIN, EVAL_TEST = 32, 16  # the streamed evaluation subsets (of 48 mocked images each)
LINEAR_EVAL_STEPS = 2


def _imagenet_configs() -> list[str]:
  """The shipped config names whose module has an ``imagenet`` recipe (``_imagenet``)."""
  found = []
  for name in configs.names():
    module = load_config_module(configs.resolve(name).partition(":")[0])
    if hasattr(module, "_imagenet"):
      found.append(name)
  return found


IMAGENET_CONFIGS = _imagenet_configs()

# Keys of a method or add-on section that set a size, and the most each may be in the test:
# widths, DISSL's classes and queues at CAP; SwAV's prototypes at the batch (the ImageNet
# recipes without a queue have batch >= prototypes) and CLD's k-means clusters below it.
_SIZE_CAPS = (("hidden_dim", CAP), ("_dim", CAP), ("num_classes", CAP), ("queue_size", CAP),
              ("nce_negatives", CAP), ("num_prototypes", BATCH), ("num_clusters", BATCH // 2))

# Compiling each recipe's train step takes 15-60 s on 2 CPU cores, so the default suite runs
# three that cover the distinct input paths: two views with LARS (simclr), the per-example
# memory bank that needs the stream's example indices (npid) and multi-crop with small crops
# (swav). The others run with -m slow.
DEFAULT_RUN = ("swav",)  # the others with -m slow (suite time); swav runs the linear eval too


@pytest.fixture(scope="module")
def mock_imagenet(tmp_path_factory):
  """The directory under which TFDS's mocked imagenet2012 is read, while the mock is on."""
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  with tfds.testing.mock_data(num_examples=NUM_EXAMPLES):
    yield data_dir


def _shrunk(config: ml_collections.ConfigDict, data_dir: str) -> ml_collections.ConfigDict:
  """`config` sized for two CPU steps; data source, method and policy unchanged."""
  c = ml_collections.ConfigDict(config.to_dict())
  c.data.data_dir = data_dir
  c.data.image_size = IMAGE_SIZE
  c.data.stream_workers = 0
  c.data.stream_threads = 2
  c.augment.crop_size = IMAGE_SIZE
  if c.augment.policy == "multicrop":
    c.augment.small_crop_size = SMALL_CROP_SIZE
  c.model.encoder = "resnet_tiny"
  c.train.batch_size = BATCH
  c.train.num_steps = STEPS
  c.train.log_every_steps = 1
  c.train.checkpoint_every_steps = STEPS
  c.eval.batch_size = BATCH
  c.eval.monitor_train_examples = EVAL_TRAIN
  c.eval.monitor_test_examples = EVAL_TEST
  c.eval.probe_epochs = 2
  c.eval.linear_eval_batch_size = BATCH
  c.eval.linear_eval_epochs = LINEAR_EVAL_STEPS / (NUM_EXAMPLES // BATCH)
  for section in (c.method.name, *c.method.addons):
    hp = c.method[section]
    for key, value in hp.items():
      if not isinstance(value, int) or isinstance(value, bool):
        continue
      for suffix, most in _SIZE_CAPS:
        if key.endswith(suffix) and value > most:
          hp[key] = most
          break
  return c


def test_every_method_has_an_imagenet_recipe_on_the_stream():
  method_configs = [n for n in configs.names() if not hasattr(
      load_config_module(configs.resolve(n).partition(":")[0]), "SETTINGS")]
  assert set(method_configs) <= set(IMAGENET_CONFIGS)
  assert DATASETS["imagenet"]["source"] == "tfds_stream"
  for name in IMAGENET_CONFIGS:
    c = load_config(configs.resolve(f"{name}:imagenet"))
    assert (c.data.source, c.data.name, c.data.image_size) == ("tfds_stream", "imagenet2012",
                                                               224), name
    assert c.data.precrop_scale == (1.0, 1.0), name  # the device crop keeps its meaning
    assert c.eval.linear_eval, name  # the papers' protocol, on the whole splits
    assert c.eval.linear_eval_lr == (30.0 if name in ("moco", "moco_cld", "npid",
                                                      "npid_cld") else 0.3), name


@pytest.mark.parametrize("name", [
    name if name in DEFAULT_RUN else pytest.param(name, marks=pytest.mark.slow)
    for name in IMAGENET_CONFIGS])
def test_imagenet_recipe_trains_on_mocked_imagenet_stream(name, mock_imagenet, tmp_path):
  recipe = load_config(configs.resolve(f"{name}:imagenet"))
  c = _shrunk(recipe, mock_imagenet)
  c.eval.linear_eval = name == "swav"  # one recipe runs it (a compile each)
  workdir = str(tmp_path / name)
  results = loop.train(c, workdir)
  if name == "swav":  # the papers' protocol: whole train split for its steps, whole test split
    assert results["linear_eval/steps"] == LINEAR_EVAL_STEPS
    assert results["linear_eval/test_examples"] == NUM_EXAMPLES
    assert 0.0 <= results["linear_eval/top1"] <= results["linear_eval/top5"] <= 1.0
    assert "test: shorter side 37, centre 32 crop" in results["linear_eval/protocol"]
    # `ssljax eval` finds the classifier `train` left (same settings, same encoder variables).
    again = loop.evaluate_workdir(workdir)
    assert again["linear_eval/top1"] == results["linear_eval/top1"]
    assert len(os.listdir(os.path.join(workdir, "linear_eval"))) == 1

  assert results["steps"] == STEPS
  # Evaluated on the stream: the recipe's subsets shrunk to 32 train / 16 test images.
  assert "eval/skipped" not in results, results.get("eval/skipped")
  assert (results["eval/train_examples"], results["eval/test_examples"]) == (EVAL_TRAIN,
                                                                             EVAL_TEST)
  assert 0.0 <= results["knn/top1"] <= 1.0 and 0.0 <= results["linear_probe/top1"] <= 1.0
  with open(os.path.join(workdir, "config.json"), encoding="utf-8") as f:
    stored = json.load(f)
  assert stored["data"]["source"] == "tfds_stream"
  assert stored["augment"]["policy"] == recipe.augment.policy
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f]
  losses = {r["step"]: r["train/loss"] for r in records if "train/loss" in r}
  assert sorted(losses) == list(range(1, STEPS + 1)), losses
  assert all(math.isfinite(v) for v in losses.values()), losses
  final = [r for r in records if r["step"] == STEPS and "linear_eval/top1" in r]
  assert len(final) == (name == "swav"), final  # with the final kNN in metrics.jsonl


def test_shrinking_keeps_source_method_and_policy(mock_imagenet):
  for name in IMAGENET_CONFIGS:
    recipe = load_config(configs.resolve(f"{name}:imagenet"))
    c = _shrunk(recipe, mock_imagenet)
    for section in ("augment", "optim"):
      changed = {k for k in recipe[section] if c[section][k] != recipe[section][k]}
      assert changed <= {"crop_size", "small_crop_size"}, (name, section, changed)
    assert (c.data.source, c.data.name) == (recipe.data.source, recipe.data.name)
    assert (c.method.name, c.method.addons) == (recipe.method.name, recipe.method.addons)
    for section in (c.method.name, *c.method.addons):
      for key, value in recipe.method[section].items():
        if c.method[section][key] != value:  # only sizes shrink, never grow
          assert isinstance(value, int) and c.method[section][key] < value, (name, key)


def test_long_tailed_imagenet_is_refused_by_the_stream(mock_imagenet, tmp_path):
  # moco_cld's docstring offers --config.data.imbalance=100 (CIFAR-10-LT); a streaming split
  # cannot be subset that way, and the run stops before writing anything.
  c = _shrunk(load_config(configs.resolve("moco_cld:imagenet")), mock_imagenet)
  c.data.imbalance = 100.0
  with pytest.raises(ValueError, match=r"data\.imbalance .*not available for streaming "
                     r"sources; set --config\.data\.imbalance=0\.0"):
    loop.train(c, str(tmp_path / "lt"))
  assert not os.path.exists(tmp_path / "lt" / "config.json")


def test_imagenet_in_memory_names_the_streaming_source(mock_imagenet):
  # The in-memory 'tfds' source holds a split as one array: mocked ImageNet's images of
  # varying size are refused with the reason.
  c = _shrunk(load_config(configs.resolve("simclr:imagenet")), mock_imagenet)
  c.data.source = "tfds"
  with pytest.raises(ValueError, match=r"variable-size datasets need a streaming source"):
    data.build_source(c.data, "train")
