"""The analysis reads every built-in method's stages: its layers have the expected shapes."""

import functools

import jax
import jax.numpy as jnp
import pytest

from ssljax.analysis import analyze as analyze_lib
from ssljax.methods import build_method, registered_methods
from ssljax.methods.base import RunInfo
from tests.util import tiny_config

_RUN = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=64)
_SIZES = {
    "simclr": {},
    "moco": {"queue_size": 64, "proj_hidden_dim": 16, "proj_dim": 8},
    "byol": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
    "swav": {"num_prototypes": 8, "queue_size": 0, "proj_hidden_dim": 16, "proj_dim": 8},
    "barlow_twins": {"proj_hidden_dim": 16, "proj_dim": 16},
    "npid": {"proj_dim": 8},
    "dino": {"proj_hidden_dim": 16, "bottleneck_dim": 8, "out_dim": 12},
}


def test_every_registered_method_is_covered():
  assert set(_SIZES) == set(registered_methods())


@pytest.mark.parametrize("name", sorted(_SIZES))
def test_forward_layers_of_every_method(name, tmp_path):
  config = tiny_config(str(tmp_path), method=name)
  for key, value in _SIZES[name].items():
    config.method[name][key] = value
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
  from ssljax.analysis import geometry
  jac = jax.eval_shape(lambda h, p, s: geometry.jacobians(fn, h, p, s), h, params, state)
  assert jac.shape == (3, layers[outputs[0]].shape[1], d_h)
