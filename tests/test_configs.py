"""Every shipped config loads, fits the schema, and builds its model and policy."""

import glob
import os

import jax
import jax.numpy as jnp
import pytest

from ssljax import augment
from ssljax.config import config_from_json, config_to_json, load_config_module
from ssljax.methods import RunInfo, build_method

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_DIR, "*.py")))


def test_configs_exist():
  assert any(path.endswith("simclr_fashion_mnist.py") for path in CONFIGS)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_fits_schema_and_builds(path):
  module = load_config_module(path)
  assert "Command" in module.__doc__ and "ssljax" in module.__doc__
  config = module.get_config()
  rebuilt = config_from_json(config_to_json(config))  # raises on a key the schema lacks
  assert config_to_json(rebuilt) == config_to_json(config)
  policy = augment.build_policy(config.augment)
  # A dataset-sized run (NPID sizes its memory bank by the training set).
  method = build_method(config, run=RunInfo(steps_per_epoch=10, total_steps=100,
                                            num_examples=1000))
  assert policy.num_views >= method.num_views
  size, channels = config.augment.crop_size, config.data.channels
  views = tuple(jax.ShapeDtypeStruct((2, s, s, channels), jnp.float32)
                for s in policy.view_sizes)
  params, method_state = jax.eval_shape(method.init, jax.random.PRNGKey(0), views)
  assert "encoder" in params
  features = jax.eval_shape(
      lambda v, x: method.encoder.apply(v, x, train=False),
      method.eval_variables(params, method_state),
      jax.ShapeDtypeStruct((2, size, size, channels), jnp.float32))
  assert features.shape == (2, method.encoder.num_features)
