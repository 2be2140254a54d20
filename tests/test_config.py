"""Tests for ssljax.config: the schema with per-method sections, its JSON form, and the presets
shared by the configs/<method>.py files."""

from __future__ import annotations

import dataclasses
import json

import ml_collections
import pytest

from ssljax.augment import policies
from ssljax.config import (AUGMENT_PRESETS, DATASETS, check_method_sections, config_dataset,
                           config_from_json, config_to_json, default_config, lock,
                           set_augment_preset, set_cpu_job, set_dataset, with_method)
from ssljax.methods import base, build_method, registered_methods


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


# ---------------------------------------------------------------- method sections

@pytest.mark.parametrize("method", registered_methods())
def test_default_config_holds_only_its_methods_section(method):
  c = default_config(method)
  assert (c.method.name, c.method.addons) == (method, ())
  assert set(c.method.keys()) == {"name", "addons", method}
  assert c.method[method].to_dict() == base.method_section(method).to_dict()
  assert set(json.loads(config_to_json(c))["method"]) == {"name", "addons", method}


def test_default_config_default_is_simclr():
  assert config_to_json(default_config()) == config_to_json(default_config("simclr"))


def test_unknown_method_and_repeated_addon_are_clear_errors():
  with pytest.raises(ValueError, match=r"method\.name must be one of .*'simclr'.*got 'simclr2'"):
    default_config("simclr2")
  with pytest.raises(ValueError, match="unknown add-on 'nope'; registered add-ons"):
    default_config("simclr", ("nope",))


@pytest.mark.parametrize("method", registered_methods())
def test_json_round_trip(method):
  c = lock(default_config(method))
  c.optim.lr = 0.123
  rebuilt = config_from_json(config_to_json(c))
  assert config_to_json(rebuilt) == config_to_json(c)
  assert rebuilt.is_locked and isinstance(rebuilt.method.addons, tuple)


def _old_style_json(method: str) -> dict:
  """A config.json as written before configs held only their sections: every method's
  section, no method.addons."""
  values = json.loads(config_to_json(default_config(method)))
  del values["method"]["addons"]
  for other in registered_methods():
    values["method"][other] = base.method_section(other).to_dict()
  return values


def test_old_config_json_with_every_methods_section_loads():
  values = _old_style_json("moco")
  values["method"]["moco"]["queue_size"] = 512
  values["optim"]["lr"] = 0.7
  c = config_from_json(json.dumps(values))
  assert set(c.method.keys()) == {"name", "addons", "moco"}
  assert (c.method.moco.queue_size, c.optim.lr, c.method.addons) == (512, 0.7, ())


def test_config_from_json_rejects_unknown_keys():
  values = json.loads(config_to_json(default_config("swav")))
  values["optim"]["lrr"] = 1.0
  with pytest.raises(KeyError, match=r"config key optim\.lrr is not part of the ssljax config "
                     r"schema for method 'swav'"):
    config_from_json(json.dumps(values))
  values = json.loads(config_to_json(default_config("swav")))
  values["method"]["cld"] = {"k": 3}  # not a registered method: not silently dropped
  with pytest.raises(KeyError, match=r"method\.cld is not part"):
    config_from_json(json.dumps(values))


def test_with_method_swaps_sections_and_keeps_shared_values():
  c = lock(default_config("simclr"))
  set_dataset(c, "cifar10")
  c.optim.lr = 0.9
  c.method.simclr.temperature = 0.3
  moco = with_method(c, "moco")
  assert set(moco.method.keys()) == {"name", "addons", "moco"}
  assert (moco.method.name, moco.data.name, moco.optim.lr) == ("moco", "cifar10", 0.9)
  assert moco.method.moco.to_dict() == base.method_section("moco").to_dict()
  assert moco.is_locked
  back = with_method(moco, "simclr")
  assert back.method.simclr.temperature == base.method_section("simclr").temperature
  assert c.method.name == "simclr" and c.method.simclr.temperature == 0.3  # input unchanged


def _toy_section():
  section = ml_collections.ConfigDict()
  section.weight = 0.5
  return section


@pytest.fixture
def toy_addon(monkeypatch):
  """A throwaway add-on 'toy' that renames the method it wraps, refusing Barlow Twins."""
  def build(method, config, axis_name, run):
    del axis_name, run
    if method.name == "barlow_twins":
      raise ValueError("toy cannot wrap barlow_twins (its objective does not decompose)")
    return dataclasses.replace(method, name=f"{method.name}+toy{config.method.toy.weight}")

  monkeypatch.setitem(base._ADDONS, "toy", base._Entry(build, _toy_section))


def test_addon_composes_through_method_addons(toy_addon):
  c = lock(default_config("simclr", ("toy",)))
  assert tuple(c.method.addons) == ("toy",)
  assert set(c.method.keys()) == {"name", "addons", "simclr", "toy"}
  c.method.toy.weight = 2.0
  assert build_method(c).name == "simclr+toy2.0"
  rebuilt = config_from_json(config_to_json(c))
  assert rebuilt.method.toy.weight == 2.0 and tuple(rebuilt.method.addons) == ("toy",)
  kept = with_method(c, "simclr", ("toy",))
  assert kept.method.toy.weight == 2.0  # the add-on's section keeps its values
  c.method.simclr.temperature = 0.4
  dropped = with_method(c, "simclr")
  assert "toy" not in dropped.method and dropped.method.simclr.temperature == 0.4


def test_addon_refusing_a_method_is_a_clear_error(toy_addon):
  with pytest.raises(ValueError, match="toy cannot wrap barlow_twins"):
    build_method(default_config("barlow_twins", ("toy",)))


def test_check_method_sections_names_the_missing_section(toy_addon):
  check_method_sections(default_config("npid", ("toy",)))
  c = default_config("simclr")
  c.method.name = "moco"
  with pytest.raises(ValueError, match=r"no method\.moco section.*configs/moco\.py"):
    check_method_sections(c)
  c = default_config("simclr")
  c.method.addons = ("toy",)
  with pytest.raises(ValueError, match=r"add-on 'toy' is in method\.addons but the config has "
                     r"no method\.toy section"):
    check_method_sections(c)


def test_config_dataset_defaults_to_fashion_mnist_and_lists_valid_names():
  assert config_dataset(None) == "fashion_mnist"
  assert config_dataset("cifar100") == "cifar100"
  with pytest.raises(ValueError, match="unknown dataset 'svhn'.*fashion_mnist, cifar10"):
    config_dataset("svhn")
