"""BYOL as a method record: state layout, the loss by hand, the EMA step, 8 devices vs 1."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax import augment
from ssljax.losses import byol_regression
from ssljax.methods import RunInfo, build_method
from ssljax.methods.base import apply_module
from ssljax.methods.common import apply_to_views
from ssljax.models import MLPHead
from ssljax.parallel import data_sharded, make_mesh, replicated
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, compile_train_step, make_per_device_step
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_SIZE = 8
_RUN = RunInfo(steps_per_epoch=4, total_steps=10)


def _config(directory, **byol):
  config = tiny_config(str(directory), method="byol")
  config.method.byol.proj_hidden_dim = 16
  config.method.byol.proj_dim = 8
  config.method.byol.pred_hidden_dim = 12
  config.augment.policy = "byol"
  # Crops and flips only: the augmentation ops are not under test and cost compile time.
  config.augment.byol_blur_probs = (0.0, 0.0)
  config.augment.byol_solarize_probs = (0.0, 0.0)
  config.augment.jitter_prob = 0.0
  config.optim.warmup_epochs = 0.0  # the first optimiser update is not zero
  for key, value in byol.items():
    config.method.byol[key] = value
  return config


def _views(seed: int = 0, batch: int = 16):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, _SIZE, _SIZE, 1))
  view = lambda: np.clip(images + 0.1 * rng.normal(size=images.shape), 0, 1)
  return tuple(jnp.asarray(view(), jnp.float32) for _ in range(2))


def _batch(views):
  n = views[0].shape[0]
  return {"views": views, "index": jnp.arange(n, dtype=jnp.int32),
          "label": jnp.full((n,), -1, jnp.int32)}


@pytest.fixture(scope="module")
def byol(tmp_path_factory):
  """Config, method and a state whose target differs from the online weights.

  `init_with_numpy_kernels` draws every kernel independently, so the target's kernels are
  not the online ones here (the real init copies them; `test_init_structure` checks that on
  the init's jaxpr); a target that differs makes the EMA check below meaningful.
  """
  config = _config(tmp_path_factory.mktemp("byol"))
  method = build_method(config, run=_RUN)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())
  return config, method, params, state


def _loss_fn(method):
  return jax.jit(lambda params, state, views: method.loss(
      params, state, _batch(views), key=_KEY, step=jnp.int32(3), axis_name=None))


def test_init_structure(byol):
  config, method, params, state = byol
  assert method.name == "byol" and method.num_views == 2 and method.update_mask is None
  assert set(params) == {"encoder", "projector", "predictor"}
  assert set(state) == {"batch_stats", "target"}
  assert set(state["batch_stats"]) == {"encoder", "projector", "predictor", "target_encoder",
                                       "target_projector"}
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(params["projector"]) == {"dense1": {"kernel": (32, 16), "bias": (16,)},
                                         "bn1": {"scale": (16,), "bias": (16,)},
                                         "dense2": {"kernel": (16, 8), "bias": (8,)}}
  assert shapes(params["predictor"]) == {"dense1": {"kernel": (8, 12), "bias": (12,)},
                                         "bn1": {"scale": (12,), "bias": (12,)},
                                         "dense2": {"kernel": (12, 8), "bias": (8,)}}
  online = {"encoder": params["encoder"], "projector": params["projector"]}
  assert shapes(state["target"]) == shapes(online)
  stats = state["batch_stats"]
  assert shapes(stats["target_encoder"]) == shapes(stats["encoder"])
  assert shapes(stats["target_projector"]) == shapes(stats["projector"])

  # The init's target leaves are copies of the online leaves (read off the jaxpr, which is
  # cheaper than running the real initialisers).
  views = _views()
  closed = jax.make_jaxpr(method.init)(_KEY, views)
  out = jax.tree.unflatten(jax.tree.structure(jax.eval_shape(method.init, _KEY, views)),
                           closed.jaxpr.outvars)
  producer = {id(var): eqn for eqn in closed.jaxpr.eqns for var in eqn.outvars}
  online_vars = {"encoder": out[0]["encoder"], "projector": out[0]["projector"]}
  for source, copy in zip(jax.tree.leaves(online_vars), jax.tree.leaves(out[1]["target"])):
    eqn = producer[id(copy)]
    assert eqn.primitive.name == "copy" and eqn.invars[0] is source


def test_apply_to_views_per_view_and_concatenated(byol):
  config, _, params, state = byol
  head = MLPHead(hidden_dim=16, out_dim=8)
  stats = state["batch_stats"]["projector"]
  rng = np.random.default_rng(1)
  a, b, c = (jnp.asarray(rng.normal(size=(6, 32)), jnp.float32) for _ in range(3))

  outs, new = apply_to_views(head, params["projector"], stats, [a, b], per_view=True)
  out_a, s1 = apply_module(head, params["projector"], stats, a)
  out_b, s2 = apply_module(head, params["projector"], s1, b)
  np.testing.assert_allclose(outs[0], out_a, rtol=1e-6)
  np.testing.assert_allclose(outs[1], out_b, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new, s2)

  outs, new = apply_to_views(head, params["projector"], stats, [a, b, c], per_view=False)
  both, s_ab = apply_module(head, params["projector"], stats, jnp.concatenate([a, b, c]))
  for got, want in zip(outs, jnp.split(both, 3)):
    np.testing.assert_allclose(got, want, rtol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, new, s_ab)

  # Views of another shape form their own forward (multi-crop resolutions).
  images = [jnp.zeros((2, 8, 8, 1)), jnp.ones((2, 8, 8, 1)), jnp.ones((2, 4, 4, 1))]
  calls = []
  probe = lambda module, p, s, x: (calls.append(x.shape) or x, s)
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr("ssljax.methods.common.apply_module", probe)
    apply_to_views(None, None, {}, images, per_view=False)
    apply_to_views(None, None, {}, images, per_view=True)
  assert calls == [(4, 8, 8, 1), (2, 4, 4, 1), (2, 8, 8, 1), (2, 8, 8, 1), (2, 4, 4, 1)]


def _by_hand(method, config, params, state, views, per_view):
  """BYOL's symmetric loss from module.apply calls written out; returns (loss, stats)."""
  hp = config.method.byol
  projector = MLPHead(hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim)
  predictor = MLPHead(hidden_dim=hp.pred_hidden_dim, out_dim=hp.proj_dim)

  def run(module, p, s, xs):
    groups = [[x] for x in xs] if per_view else [xs]
    outs = []
    for group in groups:
      out, updates = module.apply({"params": p, "batch_stats": s}, jnp.concatenate(group),
                                  train=True, mutable=["batch_stats"])
      outs += jnp.split(out, len(group))
      s = updates["batch_stats"]
    return outs, s

  stats, target = state["batch_stats"], state["target"]
  h, s_enc = run(method.encoder, params["encoder"], stats["encoder"], list(views))
  z, s_proj = run(projector, params["projector"], stats["projector"], h)
  p, s_pred = run(predictor, params["predictor"], stats["predictor"], z)
  th, s_tenc = run(method.encoder, target["encoder"], stats["target_encoder"], list(views))
  t, s_tproj = run(projector, target["projector"], stats["target_projector"], th)
  value = byol_regression(p[0], t[1])[0] + byol_regression(p[1], t[0])[0]
  return value, {"encoder": s_enc, "projector": s_proj, "predictor": s_pred,
                 "target_encoder": s_tenc, "target_projector": s_tproj}


@pytest.mark.parametrize("per_view", [True, False])
def test_loss_by_hand(byol, tmp_path, per_view):
  config, method, params, state = byol
  if not per_view:
    config = _config(tmp_path, per_view_forward=False)
    method = build_method(config, run=_RUN)
  views = _views(seed=2)
  value, (metrics, new_state) = _loss_fn(method)(params, state, views)
  expected, expected_stats = jax.jit(functools.partial(
      _by_hand, method, config, per_view=per_view))(params, state, views)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert 0.0 <= float(value) <= 8.0 and -1 <= float(metrics["cosine"]) <= 1
  np.testing.assert_allclose(1 - float(metrics["cosine"]), float(value) / 4, rtol=1e-5)
  tau = 1 - (1 - 0.99) * (math.cos(math.pi * 3 / 10) + 1) / 2
  np.testing.assert_allclose(metrics["ema_momentum"], tau, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               new_state["batch_stats"], expected_stats)
  jax.tree.map(np.testing.assert_array_equal, new_state["target"], state["target"])



@pytest.mark.parametrize("num_views", [2, 3, 4])
def test_objective_terms_are_per_view_and_image_and_reduce_to_the_value(byol, num_views):
  # Two views, and multi-crop (small 4x4 crops after the two global views): the online
  # network sees every view, the target the first two; the value sums byol_regression(p_v, t_g)
  # over every target view g and every other view v.
  _, method, params, state = byol
  views = _views(seed=5)
  small = tuple(v[:, 2:6, 2:6] for v in _views(seed=6))
  views = (views + small)[:num_views]

  @jax.jit
  def run(params, state):
    batch = _batch(views)
    outputs, new_state = method.forward(params, state, batch, step=jnp.int32(3))
    out = method.objective(params, new_state, outputs, batch, key=_KEY, step=jnp.int32(3),
                           axis_name=None)
    return out.value, out.terms(), outputs.embeddings

  assert method.decomposes
  value, terms, embeddings = run(params, state)
  p, t = embeddings["prediction"], embeddings["target"]
  assert len(p) == len(embeddings["projection"]) == num_views and len(t) == 2
  assert terms.shape == (num_views, 16)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)
  expected = sum(float(byol_regression(p[v], t[g])[0])
                 for v in range(num_views) for g in range(2) if g != v)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  if num_views == 2:
    np.testing.assert_allclose(
        value, byol_regression(p[0], t[1])[0] + byol_regression(p[1], t[0])[0], rtol=1e-6)
    whole, _ = _loss_fn(method)(params, state, views)
    np.testing.assert_allclose(value, whole, rtol=1e-5)
  else:  # a small crop is regressed onto both global targets
    for v in range(2, num_views):
      np.testing.assert_allclose(
          jnp.mean(terms[v]),
          byol_regression(p[v], t[0])[0] + byol_regression(p[v], t[1])[0], rtol=1e-5)


def test_eval_variables_are_the_online_encoder(byol):
  _, method, params, state = byol
  variables = method.eval_variables(params, state)
  assert variables["params"] is params["encoder"]
  assert variables["batch_stats"] is state["batch_stats"]["encoder"]


@pytest.mark.parametrize("changes, message", [
    ({"ema_momentum": 1.2}, r"method.byol.ema_momentum \(1.2\)"),
    ({"ema_momentum": 0.99, "ema_momentum_final": 0.9}, "ema_momentum_final"),
    ({"pred_hidden_dim": 0}, "method.byol.pred_hidden_dim must be >= 1"),
])
def test_bad_configs(tmp_path, changes, message):
  with pytest.raises(ValueError, match=message):
    build_method(_config(tmp_path, **changes), run=_RUN)


def _step_on(config, params, state, devices):
  """One compiled train step of `config` on a mesh of `devices` (state built by hand)."""
  mesh = make_mesh(devices)
  method = build_method(config, axis_name="data", run=_RUN)
  policy = augment.build_policy(config.augment)
  schedule = build_schedule(config.optim, global_batch=16, total_steps=10, steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule)
  step = compile_train_step(make_per_device_step(method, tx, policy, schedule), mesh)

  def run(train_state, images):
    train_state = jax.device_put(jax.tree.map(jnp.copy, train_state), replicated(mesh))
    put = lambda x: jax.device_put(x, data_sharded(mesh))
    n = images.shape[0]
    return step(train_state, put(images), put(np.arange(n, dtype=np.int32)),
                put(np.full((n,), -1, np.int32)))

  first = TrainState(step=jnp.int32(3), params=params, opt_state=tx.init(params),
                     method_state=state, rng=jax.random.PRNGKey(1),
                     nonfinite_step=jnp.int32(-1))
  return run, first


def test_one_step_moves_the_target_with_the_scheduled_momentum_on_8_and_1_devices(byol,
                                                                                     num_devices):
  config, _, params, state = byol
  images = np.random.default_rng(3).integers(0, 256, size=(16, 16, 16, 1), dtype=np.uint8)
  run8, first = _step_on(config, params, state, jax.devices())
  new8, metrics8 = run8(first, images)
  assert int(new8.step) == 4 and int(new8.nonfinite_step) == -1

  tau = 1 - (1 - 0.99) * (math.cos(math.pi * 3 / 10) + 1) / 2  # step 3 of 10
  np.testing.assert_allclose(metrics8["train/ema_momentum"], tau, rtol=1e-6)
  online = {"encoder": new8.params["encoder"], "projector": new8.params["projector"]}
  expected = jax.tree.map(lambda old, new: tau * np.asarray(old) + (1 - tau) * np.asarray(new),
                          state["target"], online)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               new8.method_state["target"], expected)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                                       new8.params, params))
  assert min(moved) > 0  # the gradient reached every online parameter
  for name in ("target_encoder", "target_projector", "encoder", "predictor"):
    old, new = state["batch_stats"][name], new8.method_state["batch_stats"][name]
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(old),
                                                     jax.tree.leaves(new))), name

  run1, first1 = _step_on(config, params, state, jax.devices()[:1])
  new1, metrics1 = run1(first1, images)
  np.testing.assert_allclose(metrics8["train/loss"], metrics1["train/loss"], rtol=1e-4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5),
               (new8.params, new8.method_state), (new1.params, new1.method_state))
