"""Barlow Twins as a method record: config, init, per-view forwards, one train step, devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssljax.losses import barlow_twins
from ssljax.methods import build_method, registered_methods
from ssljax.models import MLPHead, ResNet
from ssljax.parallel import data_sharded, make_mesh
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, compile_train_step, make_per_device_step
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_BATCH = 16
_SIZE = 8
_SCALE = 0.5


def _views(seed: int = 0, batch: int = _BATCH, size: int = _SIZE):
  rng = np.random.default_rng(seed)
  base_images = rng.uniform(size=(batch, size, size, 1))
  view = lambda: np.clip(base_images + 0.1 * rng.normal(size=base_images.shape), 0, 1)
  return tuple(jnp.asarray(view(), jnp.float32) for _ in range(2))


def _batch(views):
  n = views[0].shape[0]
  return {"views": views, "index": jnp.arange(n, dtype=jnp.int32),
          "label": jnp.full((n,), -1, jnp.int32)}


def _config(directory, **overrides):
  config = tiny_config(directory, method="barlow_twins")
  hp = config.method.barlow_twins
  hp.proj_hidden_dim, hp.proj_dim, hp.scale_loss = 16, 8, _SCALE
  for key, value in overrides.items():
    hp[key] = value
  return config


@pytest.fixture(scope="module")
def barlow(tmp_path_factory):
  """The tiny config, its method and initial (params, method_state)."""
  config = _config(str(tmp_path_factory.mktemp("barlow")))
  method = build_method(config)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())
  return config, method, params, state


def _train_state(params, method_state, tx):
  """A fresh state holding copies (the compiled step donates its state argument)."""
  params, method_state = jax.tree.map(jnp.copy, (params, method_state))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    method_state=method_state, rng=jax.random.PRNGKey(1),
                    nonfinite_step=jnp.full((), -1, jnp.int32))


def _assert_trees_close(a, b, rtol=1e-4, atol=1e-6):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


def test_registered_and_built_from_the_config(barlow, tmp_path):
  _, method, params, state = barlow
  assert "barlow_twins" in registered_methods()
  assert method.name == "barlow_twins" and method.num_views == 2
  assert isinstance(method.encoder, ResNet) and method.encoder.num_features == 32
  assert method.post_update(params, state, step=jnp.int32(1)) == (params, state)
  for key, value, message in (("proj_layers", 0, "proj_layers must be >= 1, got 0"),
                              ("lambda_offdiag", -1.0, "lambda_offdiag must be >= 0"),
                              ("scale_loss", 0.0, "scale_loss must be > 0, got 0.0")):
    with pytest.raises(ValueError, match=message):
      build_method(_config(str(tmp_path), **{key: value}))


def test_init_structure(barlow, tmp_path):
  _, _, params, state = barlow
  assert set(params) == {"encoder", "projector"}
  assert set(state) == {"batch_stats"} and set(state["batch_stats"]) == {"encoder", "projector"}
  # The official projector: bias-free linear layers, BN + ReLU between them, nothing after.
  shapes = jax.tree.map(lambda x: x.shape, params["projector"])
  assert shapes == {"dense1": {"kernel": (32, 16)}, "bn1": {"scale": (16,), "bias": (16,)},
                    "dense2": {"kernel": (16, 16)}, "bn2": {"scale": (16,), "bias": (16,)},
                    "dense3": {"kernel": (16, 8)}}
  assert set(state["batch_stats"]["projector"]) == {"bn1", "bn2"}
  method = build_method(_config(str(tmp_path), proj_bias=True, proj_layers=2))
  params, _ = jax.eval_shape(method.init, _KEY, _views())
  assert jax.tree.map(lambda x: x.shape, params["projector"]["dense2"]) == {
      "kernel": (16, 8), "bias": (8,)}


def _forward(method, config, params, stats, x):
  """Encoder then projector in training mode, by hand; returns (z, new batch_stats)."""
  hp = config.method.barlow_twins
  projector = MLPHead(hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim,
                      num_layers=hp.proj_layers, use_bias=False)
  h, enc = method.encoder.apply({"params": params["encoder"], "batch_stats": stats["encoder"]},
                                x, train=True, mutable=["batch_stats"])
  z, proj = projector.apply({"params": params["projector"], "batch_stats": stats["projector"]},
                            h, train=True, mutable=["batch_stats"])
  return z, {"encoder": enc["batch_stats"], "projector": proj["batch_stats"]}


def test_loss_forwards_each_view_separately(barlow, tmp_path):
  config, method, params, state = barlow
  unbiased = build_method(_config(str(tmp_path), unbiased_std=True))
  views = _views(seed=1)

  @jax.jit
  def run(params, state):
    outputs = [m.loss(params, state, _batch(views), key=_KEY, step=jnp.int32(0),
                      axis_name=None) for m in (method, unbiased)]
    # By hand: view a, then view b starting from the statistics view a left (two BN updates).
    z_a, stats = _forward(method, config, params, state["batch_stats"], views[0])
    z_b, stats = _forward(method, config, params, stats, views[1])
    expected = [barlow_twins(z_a, z_b, lambda_offdiag=0.0051, unbiased_std=u)
                for u in (False, True)]
    # One concatenated forward would normalise both views with pooled statistics instead.
    z, _ = _forward(method, config, params, state["batch_stats"], jnp.concatenate(views))
    pooled = barlow_twins(*jnp.split(z, 2))[0]
    return outputs, expected, stats, pooled

  outputs, expected, stats, pooled = run(params, state)
  for (value, (metrics, new_state)), (loss, expected_metrics) in zip(outputs, expected):
    np.testing.assert_allclose(value, _SCALE * loss, rtol=1e-5)
    _assert_trees_close(metrics, expected_metrics, rtol=1e-5)
    _assert_trees_close(new_state["batch_stats"], stats)
  assert not np.allclose(outputs[0][0], outputs[1][0], rtol=1e-3)
  assert not np.allclose(outputs[0][0], _SCALE * pooled, rtol=1e-3)


def test_objective_does_not_decompose_into_terms(barlow):
  # Barlow Twins' loss is a function of batch statistics: no per-(view, image) terms.
  _, method, params, state = barlow
  assert method.decomposes is False
  views = _views(seed=2)
  batch = _batch(views)

  def objective(params, state):
    outputs, new_state = method.forward(params, state, batch, step=jnp.int32(0))
    return method.objective(params, new_state, outputs, batch, key=_KEY, step=jnp.int32(0),
                            axis_name=None)

  out = objective(params, state)
  assert out.terms is None
  value, _ = jax.jit(lambda p, s: method.loss(p, s, batch, key=_KEY, step=jnp.int32(0),
                                              axis_name=None))(params, state)
  np.testing.assert_allclose(out.value, value, rtol=1e-5)


def test_one_step_on_eight_devices_is_the_single_device_update(barlow, num_devices):
  # One compiled shard_map step on 8 devices (2 rows each; synchronised BN, psum'ed
  # correlation) must equal, on one device, the config's LARS update with the gradient of the
  # scaled loss, the batch statistics of the two forwards and the loss' metrics. The policy
  # is deterministic per row (a view and its vertical flip), so both sides see the same views.
  config, single, params, state = barlow
  schedule = build_schedule(config.optim, global_batch=_BATCH, total_steps=10,
                            steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule)

  def policy(keys, images):
    del keys
    x = images.astype(jnp.float32) / 255.0
    return x, x[:, ::-1]

  rng = np.random.default_rng(3)
  images = rng.integers(0, 256, size=(_BATCH, _SIZE, _SIZE, 1), dtype=np.uint8)
  mesh = make_mesh(jax.devices())
  method = build_method(config, axis_name="data")
  step = compile_train_step(make_per_device_step(method, tx, policy, schedule), mesh)
  put = lambda x: jax.device_put(x, data_sharded(mesh))
  new, metrics = step(_train_state(params, state, tx), put(images),
                      put(np.arange(_BATCH, dtype=np.int32)), put(np.full((_BATCH,), -1, np.int32)))

  @jax.jit
  def single_device_update(params):
    views = policy(None, jnp.asarray(images))
    (value, (loss_metrics, new_state)), grads = jax.value_and_grad(
        lambda p: single.loss(p, state, _batch(views), key=_KEY, step=jnp.int32(0),
                              axis_name=None), has_aux=True)(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    return optax.apply_updates(params, updates), new_state, value, loss_metrics, grads

  expected_params, expected_state, value, loss_metrics, grads = single_device_update(params)
  assert num_devices == 8 and int(new.step) == 1 and int(new.nonfinite_step) == -1
  np.testing.assert_allclose(metrics["train/loss"], value, rtol=1e-4)
  for name in ("on_diag_mean", "off_diag_mean_sq"):
    np.testing.assert_allclose(metrics[f"train/{name}"], loss_metrics[name], rtol=1e-4)
  _assert_trees_close(new.params, expected_params, rtol=1e-3, atol=1e-5)
  _assert_trees_close(new.method_state, expected_state, rtol=1e-3, atol=1e-5)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.abs(g).max() > 0, jax.tree_util.keystr(path)  # every parameter is trained
  moved = [float(np.abs(np.asarray(a) - b).max()) for a, b in
           zip(jax.tree.leaves(new.method_state), jax.tree.leaves(state))]
  assert min(moved) > 0  # every running statistic was updated
