"""Tests for ssljax.config: the presets shared by the configs/<method>_<dataset>.py files."""

from __future__ import annotations

import pytest

from ssljax.augment import policies
from ssljax.config import (AUGMENT_PRESETS, DATASETS, config_to_json, default_config, lock,
                           set_augment_preset, set_cpu_job, set_dataset)


@pytest.mark.parametrize("name", sorted(DATASETS))
def test_set_dataset_sets_schema_keys_and_crop_size(name):
  c = lock(default_config())  # locked: a preset key missing from the schema would raise
  set_dataset(c, name)
  for key, value in DATASETS[name].items():
    assert c.data[key] == value
  assert c.augment.crop_size == c.data.image_size
  assert len(c.data.mean) == len(c.data.std) == c.data.channels


def test_cifar100_preset_values():
  c = default_config()
  set_dataset(c, "cifar100")
  assert (c.data.source, c.data.name, c.data.data_dir) == ("tfds", "cifar100", "")
  assert (c.data.train_split, c.data.test_split) == ("train", "test")
  assert (c.data.image_size, c.data.channels, c.data.num_classes) == (32, 3, 100)
  assert c.data.mean == (0.5071, 0.4865, 0.4409)
  assert c.data.std == (0.2673, 0.2564, 0.2762)
  assert c.augment.crop_size == 32


def test_cifar100_differs_from_cifar10_only_in_name_classes_and_statistics():
  cifar10, cifar100 = default_config(), default_config()
  set_dataset(cifar10, "cifar10")
  set_dataset(cifar100, "cifar100")
  changed = {key for key in DATASETS["cifar10"] if cifar10.data[key] != cifar100.data[key]}
  assert changed == {"name", "num_classes", "mean", "std"}


@pytest.mark.parametrize("name", sorted(AUGMENT_PRESETS))
def test_augment_preset_builds_a_policy_and_keeps_other_keys(name):
  c = lock(default_config())
  set_dataset(c, "cifar10")
  c.augment.num_small_crops = 3
  before = c.augment.to_dict()
  set_augment_preset(c, name)
  after = c.augment.to_dict()
  assert {k for k in after if after[k] != before[k]} <= set(AUGMENT_PRESETS[name])
  assert (c.augment.crop_size, c.augment.num_small_crops) == (32, 3)
  assert policies.build_policy(c.augment).num_views >= 2


def test_augment_presets_solo_learn_cifar_values():
  """SPEC 6: solo-learn's `symmetric`, `symmetric_weak` and `asymmetric` CIFAR presets."""
  c = default_config()
  set_augment_preset(c, "symmetric")
  assert (c.augment.policy, c.augment.jitter, c.augment.blur_prob) == (
      "simclr", (0.8, 0.8, 0.8, 0.2), 0.5)
  set_augment_preset(c, "symmetric_weak")
  assert (c.augment.policy, c.augment.jitter, c.augment.blur_prob) == (
      "moco_v2", (0.4, 0.4, 0.4, 0.1), 0.5)
  set_augment_preset(c, "asymmetric")
  assert (c.augment.policy, c.augment.jitter) == ("byol", (0.4, 0.4, 0.2, 0.1))
  assert (c.augment.byol_blur_probs, c.augment.byol_solarize_probs) == ((0.0, 0.0), (0.0, 0.2))
  for preset in ("symmetric", "symmetric_weak", "asymmetric"):
    set_augment_preset(c, preset)
    assert (c.augment.crop_scale, c.augment.jitter_prob, c.augment.grayscale_prob,
            c.augment.flip_prob) == ((0.08, 1.0), 0.8, 0.2, 0.5)


def test_set_cpu_job_values():
  c = lock(default_config())
  set_cpu_job(c)
  assert (c.model.encoder, c.model.expand_features) == ("resnet_tiny", 512)
  assert (c.train.batch_size, c.train.epochs) == (256, 12.0)
  assert (c.train.log_every_steps, c.train.checkpoint_every_steps,
          c.train.eval_every_steps) == (50, 500, 234)


@pytest.mark.parametrize("apply, valid", [
    (set_dataset, DATASETS),
    (set_augment_preset, AUGMENT_PRESETS),
])
def test_unknown_preset_name_lists_valid_names(apply, valid):
  c = default_config()
  before = config_to_json(c)
  with pytest.raises(ValueError, match="unknown .* preset 'cifar-10'") as error:
    apply(c, "cifar-10")
  for name in valid:
    assert name in str(error.value)
  assert config_to_json(c) == before  # nothing assigned


@pytest.mark.parametrize("apply, names", [
    (set_dataset, DATASETS),
    (set_augment_preset, AUGMENT_PRESETS),
])
def test_docstrings_list_every_preset(apply, names):
  for name in names:
    assert f"\n    {name} " in apply.__doc__


def test_load_config_module_reads_a_file_and_names_a_missing_one(tmp_path):
  from ssljax.config import load_config_module
  path = tmp_path / "mine.py"
  path.write_text('"""Doc."""\n\ndef get_config():\n  return 7\n')
  module = load_config_module(str(path))
  assert module.get_config() == 7 and module.__doc__ == "Doc."
  with pytest.raises(FileNotFoundError, match=r"config file '.*nope.py' not found"):
    load_config_module(str(tmp_path / "nope.py"))
