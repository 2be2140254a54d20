"""Every built-in method exposes the stages add-ons rely on (shapes, names, inference mode).

Shapes only (``jax.eval_shape``): each method's own test file checks the values (the terms
reduce to the loss, the head layers equal the heads applied by hand).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.methods import build_method, registered_methods
from ssljax.methods.base import Outputs, RunInfo
from tests.util import SMALL_METHOD_SIZES, small_method_config

_KEY = jax.random.key(0)
_N = 16
_RUN = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=64)
# Embedding names per method, and the heads whose layers head_layers reports.
_EMBEDDINGS = {
    "simclr": {"projection"}, "moco": {"query", "key"},
    "byol": {"projection", "prediction", "target"}, "swav": {"projection", "scores"},
    "barlow_twins": {"projection"}, "npid": {"embedding"}, "dino": {"student", "teacher"},
    "cissl": {"student", "teacher"}, "dissl": {"student", "teacher"},
    "metamask": {"projection", "contrastive"},
}
_HEADS = {
    "simclr": ("projector",), "moco": ("projector",), "byol": ("projector", "predictor"),
    "swav": ("projector", "prototypes"), "barlow_twins": ("projector",), "npid": ("head",),
    "dino": ("head",), "cissl": ("student", "teacher"), "dissl": ("student", "teacher"),
    "metamask": ("bt_projector", "cl_projector"),
}


def test_every_registered_method_is_covered():
  assert set(SMALL_METHOD_SIZES) == set(registered_methods())


@pytest.mark.parametrize("name", sorted(SMALL_METHOD_SIZES))
def test_stages_have_the_documented_shapes(name, tmp_path):
  config = small_method_config(str(tmp_path), name)
  method = build_method(config, run=_RUN)
  views = tuple(jnp.zeros((_N, 16, 16, 1)) for _ in range(method.num_views))
  batch = {"views": views, "index": jnp.arange(_N, dtype=jnp.int32),
           "label": jnp.zeros((_N,), jnp.int32)}
  params, state = jax.eval_shape(method.init, _KEY, views)

  unchanged = []

  def stages(params, state):
    features, state = method.features(params, state, views, train=True)
    inference, same = method.features(params, state, views, train=False)
    unchanged.append(same is state)
    embeddings, state = method.embed(params, state, features, views, step=jnp.int32(0))
    out = method.objective(params, state, Outputs(features, embeddings), batch, key=_KEY,
                           step=jnp.int32(0), axis_name=None)
    terms = out.terms() if out.terms is not None else None
    layers = method.head_layers(params, state, inference)
    return features, inference, embeddings, out.value, terms, layers

  features, inference, embeddings, value, terms, layers = jax.eval_shape(
      stages, params, state)
  assert len(features) >= 1 and len(inference) == len(features)
  assert all(f.shape[0] == _N and f.ndim == 2 for f in features)
  assert unchanged == [True], "inference-mode features must leave the method state as it is"
  assert set(embeddings) == _EMBEDDINGS[name]
  for per_view in embeddings.values():
    assert all(e.shape[0] == _N for e in per_view)
  assert value.shape == ()
  if method.decomposes:
    assert terms.shape == (len(views), _N)
  else:
    assert terms is None and name in ("barlow_twins", "dissl", "metamask")
  names = list(layers)
  assert names[0] == "encoder" and layers["encoder"].shape == (len(features) * _N,
                                                               features[0].shape[1])
  for head in _HEADS[name]:
    assert f"{head}/output" in names
    assert all(layer.shape[0] == len(features) * _N for key, layer in layers.items()
               if key.startswith(head))
  # Heads come in order, each with at least one layer before its output (or a plain map).
  outputs = [names.index(f"{head}/output") for head in _HEADS[name]]
  assert outputs == sorted(outputs)
  np.testing.assert_array_equal(len(layers) > len(_HEADS[name]), True)
