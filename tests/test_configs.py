"""Every shipped config loads for every dataset, holds only its method's section, fits the
schema, and builds its model and policy; the command line loads ``path:dataset``."""

import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import pytest

from ssljax import augment, cli
from ssljax.config import DATASETS, config_from_json, config_to_json, load_config_module
from ssljax.methods import RunInfo, base, build_method, registered_methods

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
METHODS = registered_methods()
CASES = [(m, d) for m in METHODS for d in DATASETS]


def _path(method: str) -> str:
  return os.path.join(CONFIG_DIR, f"{method}.py")


def _addon_config_files() -> list[tuple[str, str, str]]:
  """``(file stem, method, add-on)`` of every ``configs/<method>_<add-on>.py``."""
  found = []
  for stem in sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py")):
    if stem in METHODS:
      continue
    method, _, addon = stem.rpartition("_")
    found.append((stem, method, addon))
  return found


def test_one_config_file_per_method_and_the_rest_name_a_method_and_an_add_on():
  stems = {f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py")}
  assert set(METHODS) <= stems
  for stem, method, addon in _addon_config_files():
    assert method in METHODS and addon in base.registered_addons(), stem


ADDON_CASES = [(stem, setting) for stem, _, _ in _addon_config_files()
               for setting in load_config_module(_path(stem)).SETTINGS]


@pytest.mark.parametrize("stem, setting", ADDON_CASES, ids=[f"{s}:{a}" for s, a in ADDON_CASES])
def test_addon_configs_build_and_name_their_command(stem, setting):
  module = load_config_module(_path(stem))
  assert f"--config configs/{stem}.py:{setting}" in module.__doc__
  config = module.get_config(setting)
  method, _, addon = stem.rpartition("_")
  assert config.method.name == method
  assert set(config.method.keys()) == {"name", "addons", method, *config.method.addons}
  assert set(config.method.addons) <= {addon}  # a baseline setting runs without the add-on
  rebuilt = config_from_json(config_to_json(config))
  assert config_to_json(rebuilt) == config_to_json(config)
  built = build_method(config, run=RunInfo(steps_per_epoch=10, total_steps=100,
                                           num_examples=1000))
  assert built.name == "+".join([method, *config.method.addons])
  assert augment.build_policy(config.augment, config.data.mean).num_views >= built.num_views
  with pytest.raises(ValueError, match="unknown setting"):
    module.get_config("no_such_setting")


@pytest.mark.parametrize("method, dataset", CASES, ids=[f"{m}:{d}" for m, d in CASES])
def test_config_fits_schema_and_builds(method, dataset):
  module = load_config_module(_path(method))
  assert f"ssljax train --config configs/{method}.py:{dataset}" in module.__doc__
  config = module.get_config(dataset)
  assert config.method.name == method and tuple(config.method.addons) == ()
  assert set(config.method.keys()) == {"name", "addons", method}
  stored = json.loads(config_to_json(config))
  assert set(stored["method"]) == {"name", "addons", method}
  rebuilt = config_from_json(config_to_json(config))  # raises on a key the schema lacks
  assert config_to_json(rebuilt) == config_to_json(config)
  policy = augment.build_policy(config.augment, config.data.mean)
  # A dataset-sized run (NPID sizes its memory bank by the training set).
  method_ = build_method(config, run=RunInfo(steps_per_epoch=10, total_steps=100,
                                             num_examples=1000))
  assert policy.num_views >= method_.num_views
  size, channels = config.augment.crop_size, config.data.channels
  views = tuple(jax.ShapeDtypeStruct((2, s, s, channels), jnp.float32)
                for s in policy.view_sizes)
  params, method_state = jax.eval_shape(method_.init, jax.random.PRNGKey(0), views)
  assert "encoder" in params
  features = jax.eval_shape(
      lambda v, x: method_.encoder.apply(v, x, train=False),
      method_.eval_variables(params, method_state),
      jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32))
  assert features.shape == (2, method_.encoder.num_features)


@pytest.mark.parametrize("method", METHODS)
def test_default_argument_is_fashion_mnist_and_unknown_dataset_lists_valid_ones(method):
  module = load_config_module(_path(method))
  assert config_to_json(module.get_config()) == config_to_json(module.get_config("fashion_mnist"))
  with pytest.raises(ValueError, match="unknown dataset 'cifar-10'") as error:
    module.get_config("cifar-10")
  for name in DATASETS:
    assert name in str(error.value)


def _parse(*args):
  return cli._parse(["ssljax", *args, "--workdir", "unused"], "train")


def test_cli_loads_path_with_dataset_argument_and_applies_overrides():
  fv = _parse("--config", f"{CONFIG_DIR}/swav.py:cifar100", "--config.optim.lr=0.1",
              "--config.method.swav.queue_size=0")
  assert (fv.config.data.name, fv.config.method.name) == ("cifar100", "swav")
  assert (fv.config.optim.lr, fv.config.method.swav.queue_size) == (0.1, 0)
  assert fv.config.is_locked
  assert _parse(f"--config={CONFIG_DIR}/swav.py").config.data.name == "fashion_mnist"


def test_cli_names_a_missing_file_and_an_unknown_dataset():
  with pytest.raises(SystemExit, match=r"config file '.*nope\.py' not found"):
    _parse("--config", f"{CONFIG_DIR}/nope.py:cifar10")
  with pytest.raises(SystemExit, match=r"unknown dataset 'cifar'.*cifar10, cifar100"):
    _parse("--config", f"{CONFIG_DIR}/swav.py:cifar")


def test_cli_override_of_another_methods_key_says_how_to_switch():
  with pytest.raises(SystemExit, match=r"'method\.moco\.queue_size' belongs to method 'moco', "
                     r"but this config runs method 'swav'.*configs/moco\.py:<dataset>"):
    _parse("--config", f"{CONFIG_DIR}/swav.py:cifar10", "--config.method.moco.queue_size=8")
  with pytest.raises(SystemExit, match=r"method\.name is 'moco' but the config has no "
                     r"method\.moco section.*configs/moco\.py"):
    _parse("--config", f"{CONFIG_DIR}/swav.py:cifar10", "--config.method.name=moco")
  with pytest.raises(SystemExit, match=r"config\.method\.swav has no key 'bogus'.*Valid keys "
                     r"of config\.method\.swav: .*num_prototypes"):
    _parse("--config", f"{CONFIG_DIR}/swav.py:cifar10", "--config.method.swav.bogus=1")


def _toy_section():
  section = ml_collections.ConfigDict()
  section.weight = 0.5
  return section


@pytest.fixture
def toy_addon(monkeypatch):
  """A throwaway add-on 'toy' (section ``weight``) that renames the method it wraps."""
  import dataclasses

  def build(method, config, axis_name, run):
    del axis_name, run
    return dataclasses.replace(method, name=f"{method.name}+toy{config.method.toy.weight}")

  monkeypatch.setitem(base._ADDONS, "toy", base._Entry(build, _toy_section))


def test_cli_adds_an_addon_section_from_the_command_line(toy_addon):
  fv = _parse("--config", f"{CONFIG_DIR}/simclr.py:cifar10", "--config.method.addons=toy",
              "--config.method.toy.weight=2.0")
  assert tuple(fv.config.method.addons) == ("toy",)
  assert fv.config.method.toy.weight == 2.0
  assert fv.config.method.simclr.proj_dim == 256  # the file's values are kept
  assert build_method(fv.config).name == "simclr+toy2.0"


def test_cli_addon_key_without_the_addon_says_how_to_add_it(toy_addon):
  with pytest.raises(SystemExit, match=r"belongs to add-on 'toy', which is not in "
                     r"method\.addons.*--config\.method\.addons="):
    _parse("--config", f"{CONFIG_DIR}/simclr.py:cifar10", "--config.method.toy.weight=2.0")


def test_cli_unknown_addon_is_a_clear_error():
  with pytest.raises(SystemExit, match=r"unknown add-on 'nope'; registered add-ons"):
    _parse("--config", f"{CONFIG_DIR}/simclr.py:cifar10", "--config.method.addons=nope")


# ---------------------------------------------------------------- configs shipped by name


def test_every_repository_config_file_is_the_shipped_module_not_a_copy():
  import importlib

  from ssljax import configs
  stems = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py"))
  assert stems == list(configs.names()) and "simclr" in stems and "simclr_uota" in stems
  for stem in stems:
    file_module = load_config_module(_path(stem))
    shipped = importlib.import_module(f"ssljax.configs.{stem}")
    assert file_module.get_config is shipped.get_config, stem
    assert file_module.__doc__ == shipped.__doc__, stem


@pytest.mark.parametrize("spec, same_as", [
    ("simclr:fashion_mnist", "configs/simclr.py:fashion_mnist"),
    ("simclr_fashion_mnist", "configs/simclr.py:fashion_mnist"),
    ("swav:cifar100", "configs/swav.py:cifar100"),
    ("moco", "configs/moco.py"),
    ("simclr_uota_fashion_mnist_base", "configs/simclr_uota.py:fashion_mnist_base"),
    ("moco_cld:cifar10", "configs/moco_cld.py:cifar10"),
])
def test_a_shipped_config_loads_by_name_as_the_repository_file(spec, same_as):
  from ssljax.config import load_config
  assert config_to_json(load_config(spec)) == config_to_json(
      load_config(os.path.join(os.path.dirname(CONFIG_DIR), same_as)))


def test_name_resolution_keeps_files_and_joins_name_and_argument():
  from ssljax import configs
  path = _path("simclr")
  assert configs.resolve(f"{path}:cifar10") == f"{path}:cifar10"
  shipped = os.path.join(os.path.dirname(os.path.abspath(configs.__file__)), "simclr_uota.py")
  assert configs.resolve("simclr_uota") == shipped  # a name itself, not simclr + "uota"
  assert configs.resolve("simclr_uota_fashion_mnist") == f"{shipped}:fashion_mnist"
  assert configs.resolve("simclr_uota:") == f"{shipped}:"


@pytest.mark.parametrize("spec, start", [
    ("simclr2:cifar10", "'simclr2' is neither a config file nor a shipped config name"),
    ("nope", "'nope' is neither a config file nor a shipped config name"),
    ("configs/nope.py:cifar10", "config file 'configs/nope.py' not found"),
])
def test_an_unknown_config_lists_the_shipped_names(spec, start):
  from ssljax import configs
  from ssljax.config import load_config
  with pytest.raises(FileNotFoundError) as error:
    load_config(spec)
  message = str(error.value)
  assert message.startswith(start)
  assert f"shipped configs: {', '.join(configs.names())} (use NAME:ARG" in message
  with pytest.raises(SystemExit, match=f"ssljax train: {start}.*simclr_uota, swav, swav_uota"):
    _parse("--config", spec)


def test_cli_runs_a_shipped_config_by_name():
  fv = _parse("--config", "swav:cifar100", "--config.optim.lr=0.1")
  assert (fv.config.data.name, fv.config.method.name, fv.config.optim.lr) == (
      "cifar100", "swav", 0.1)


def test_the_configs_are_a_package_setup_cfg_ships():
  # setup.cfg's `packages = find:` with its include patterns is what goes into a wheel.
  # setuptools is in the test extra: Python 3.12's venvs come without it.
  import configparser

  import setuptools
  root = os.path.dirname(CONFIG_DIR)
  parser = configparser.ConfigParser()
  parser.read(os.path.join(root, "setup.cfg"), encoding="utf-8")
  assert parser["options"]["packages"].strip() == "find:"
  include = parser["options.packages.find"]["include"].replace(",", " ").split()
  assert "ssljax.configs" in setuptools.find_packages(where=root, include=include)


def test_the_configs_load_outside_the_repository(tmp_path):
  import subprocess
  import sys

  # A process started outside the repository loads a config by name (nothing from configs/).
  code = ("from ssljax.config import load_config; c = load_config('simclr:fashion_mnist'); "
          "print(c.method.name, c.data.name)")
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": ""})
  assert result.returncode == 0, result.stderr
  assert result.stdout.split() == ["simclr", "fashion_mnist"]
