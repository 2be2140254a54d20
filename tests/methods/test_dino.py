"""DINO as a method record: state layout, schedules, the loss and centre by hand, the frozen
last layer, the EMA step, 8 devices vs 1."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax import augment
from ssljax.methods import RunInfo, build_method
from ssljax.methods.dino import teacher_temperature_schedule
from ssljax.models.heads import DINOHead
from ssljax.parallel import data_sharded, make_mesh, replicated
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, compile_train_step, make_per_device_step
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_SIZE = 8
_RUN = RunInfo(steps_per_epoch=4, total_steps=20)


def _config(directory, **dino):
  config = tiny_config(str(directory), method="dino")
  hp = config.method.dino
  hp.proj_hidden_dim, hp.bottleneck_dim, hp.out_dim = 16, 8, 12
  hp.teacher_temperature_warmup_epochs = 3.0
  config.augment.policy = "multicrop"
  config.augment.jitter_prob = 0.0  # crops and flips only: cheaper to compile
  config.optim.warmup_epochs = 0.0  # the first optimiser update is not zero
  for key, value in dino.items():
    hp[key] = value
  return config


def _views(seed=0, batch=16, small=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, _SIZE, _SIZE, 1))
  view = lambda: np.clip(images + 0.1 * rng.normal(size=images.shape), 0, 1)
  views = [view(), view()] + [view()[:, ::2, ::2] for _ in range(small)]
  return tuple(jnp.asarray(v, jnp.float32) for v in views)


def _batch(views):
  n = views[0].shape[0]
  return {"views": views, "index": jnp.arange(n, dtype=jnp.int32),
          "label": jnp.full((n,), -1, jnp.int32)}


def _head(config):
  hp = config.method.dino
  return DINOHead(hidden_dim=hp.proj_hidden_dim, bottleneck_dim=hp.bottleneck_dim,
                  out_dim=hp.out_dim, num_layers=hp.proj_layers, use_bn=hp.proj_bn,
                  use_bias=hp.proj_bias,
                  normalize_before_bottleneck=hp.normalize_before_bottleneck)


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
  """Config, method and a state whose teacher differs from the student and whose centre is
  not zero (`init_with_numpy_kernels` draws every kernel independently)."""
  config = _config(tmp_path_factory.mktemp("dino"))
  method = build_method(config, run=_RUN)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())
  center = np.random.default_rng(9).normal(scale=0.1, size=(12,))
  return config, method, params, {**state, "center": jnp.asarray(center, jnp.float32)}


def _softmax(x):
  e = np.exp(x - x.max(axis=-1, keepdims=True))
  return e / e.sum(axis=-1, keepdims=True)


def _cross_entropy(teacher, center, tau_t, student, tau_s):
  """Batch mean of -sum_k softmax((g - c)/tau_t) log softmax(s/tau_s), in NumPy."""
  q = _softmax((np.asarray(teacher, np.float64) - center) / tau_t)
  log_p = np.log(_softmax(np.asarray(student, np.float64) / tau_s))
  return float(np.mean(-np.sum(q * log_p, axis=-1)))


def _forward(module, params, stats, groups):
  """Training-mode forward of each group (a concatenated batch); returns (outputs, stats)."""
  outs = []
  for x in groups:
    out, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
    outs.append(out)
    stats = updates["batch_stats"]
  return outs, stats


def test_init_structure_and_update_mask(dino, tmp_path):
  config, method, params, state = dino
  assert method.name == "dino" and method.num_views == 2
  assert set(params) == {"encoder", "head"}
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(params["head"]) == {"dense1": {"kernel": (32, 16)},
                                    "bn1": {"scale": (16,), "bias": (16,)},
                                    "dense2": {"kernel": (16, 8)},
                                    "last_layer": {"kernel": (8, 12)}}
  assert set(state) == {"batch_stats", "teacher", "center"}
  assert set(state["batch_stats"]) == {"encoder", "head", "teacher_encoder", "teacher_head"}
  assert shapes(state["teacher"]) == shapes(params)
  views = _views()
  fresh = jax.eval_shape(method.init, _KEY, views)[1]["center"]
  assert fresh.shape == (12,) and fresh.dtype == jnp.float32

  # The teacher starts as a copy of the student (read off the init's jaxpr); the centre is 0.
  closed = jax.make_jaxpr(method.init)(_KEY, views)
  out = jax.tree.unflatten(jax.tree.structure(jax.eval_shape(method.init, _KEY, views)),
                           closed.jaxpr.outvars)
  producer = {id(var): eqn for eqn in closed.jaxpr.eqns for var in eqn.outvars}
  for source, copy in zip(jax.tree.leaves(out[0]), jax.tree.leaves(out[1]["teacher"])):
    assert producer[id(copy)].primitive.name == "copy"
    assert producer[id(copy)].invars[0] is source

  # The last layer is frozen for freeze_last_layer_epochs (1 epoch = 4 steps), nothing else.
  for step, trained in ((0, False), (3, False), (4, True), (11, True)):
    mask = method.update_mask(params, jnp.int32(step))
    assert set(mask) == {"encoder", "head"} and bool(mask["encoder"])
    assert {name: bool(v) for name, v in mask["head"].items()} == {
        "dense1": True, "bn1": True, "dense2": True, "last_layer": trained}
  assert build_method(_config(tmp_path, freeze_last_layer_epochs=0.0),
                      run=_RUN).update_mask is None


def test_teacher_temperature_schedule():
  schedule = functools.partial(teacher_temperature_schedule, steps_per_epoch=4, warmup=0.04,
                               final=0.07)
  # W = 3 epochs: linspace(0.04, 0.07, 3) = (0.04, 0.055, 0.07) per epoch, then 0.07.
  values = [float(schedule(jnp.int32(s), warmup_epochs=3)) for s in (0, 3, 4, 7, 8, 12, 99)]
  np.testing.assert_allclose(values, [0.04, 0.04, 0.055, 0.055, 0.07, 0.07, 0.07], rtol=1e-6)
  # W = 1: only epoch 0 at the warm-up value (numpy's linspace(a, b, 1) = [a]); W = 0: final.
  values = [float(schedule(jnp.int32(s), warmup_epochs=1)) for s in (0, 3, 4)]
  np.testing.assert_allclose(values, [0.04, 0.04, 0.07], rtol=1e-6)
  np.testing.assert_allclose(float(schedule(jnp.int32(0), warmup_epochs=0)), 0.07, rtol=1e-6)
  # The ISSL default (50 warm-up epochs) at epoch 10: 0.04 + 0.03 * 10 / 49.
  np.testing.assert_allclose(float(schedule(jnp.int32(41), warmup_epochs=50)),
                             0.04 + 0.03 * 10 / 49, rtol=1e-6)


def test_issl_loss_and_sequential_center_by_hand(dino):
  # ISSL code: pair (student 0, teacher 1) with the incoming centre c0, then c1 = update(c0,
  # teacher 1); pair (student 1, teacher 0) with c1; the new centre is update(c1, teacher 0).
  config, method, params, state = dino
  views = _views(seed=1)
  step = jnp.int32(5)  # epoch 1 of the 3 warm-up epochs: teacher temperature 0.055
  value, (metrics, new_state) = jax.jit(lambda p, s: method.loss(
      p, s, _batch(views), key=_KEY, step=step, axis_name=None))(params, state)

  head, stats, teacher = _head(config), state["batch_stats"], state["teacher"]

  @jax.jit
  def by_hand(params, state):
    both = jnp.concatenate(views)
    (h,), s_enc = _forward(method.encoder, params["encoder"], stats["encoder"], [both])
    (s,), s_head = _forward(head, params["head"], stats["head"], [h])
    (th,), t_enc = _forward(method.encoder, teacher["encoder"], stats["teacher_encoder"], [both])
    (g,), t_head = _forward(head, teacher["head"], stats["teacher_head"], [th])
    return jnp.split(s, 2), jnp.split(g, 2), {"encoder": s_enc, "head": s_head,
                                              "teacher_encoder": t_enc, "teacher_head": t_head}

  s, g, expected_stats = by_hand(params, state)
  c0 = np.asarray(state["center"], np.float64)
  c1 = 0.9 * c0 + 0.1 * np.mean(np.asarray(g[1]), axis=0)
  c2 = 0.9 * c1 + 0.1 * np.mean(np.asarray(g[0]), axis=0)
  expected = 0.5 * (_cross_entropy(g[1], c0, 0.055, s[0], 0.1) +
                    _cross_entropy(g[0], c1, 0.055, s[1], 0.1))
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(new_state["center"], c2, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(metrics["teacher_temperature"], 0.055, rtol=1e-6)
  tau = 1 - (1 - 0.996) * (math.cos(math.pi * 5 / 20) + 1) / 2
  np.testing.assert_allclose(metrics["ema_momentum"], tau, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               new_state["batch_stats"], expected_stats)
  jax.tree.map(np.testing.assert_array_equal, new_state["teacher"], state["teacher"])


def test_official_layout_multicrop_loss_and_center_by_hand(tmp_path):
  # Official DINO: head (Linear-GELU) x 2 - bottleneck - normalise - unit-norm layer; one
  # centre for both teacher views, updated once with their mean. Multi-crop: the student
  # encodes the 2 global crops in one forward and the 2 small ones in another, the head sees
  # all 4 at once; the teacher sees the global crops only.
  config = _config(tmp_path, proj_layers=3, proj_bn=False, proj_bias=True,
                   normalize_before_bottleneck=False, sequential_center=False)
  method = build_method(config, run=_RUN)
  views = _views(seed=2, small=2)
  params, state = init_with_numpy_kernels(method.init, _KEY, views)
  assert set(params["head"]) == {"dense1", "dense2", "dense3", "last_layer"}
  state = {**state, "center": jnp.linspace(-0.1, 0.1, 12)}
  value, (_, new_state) = jax.jit(lambda p, s: method.loss(
      p, s, _batch(views), key=_KEY, step=jnp.int32(12), axis_name=None))(params, state)

  head, stats, teacher = _head(config), state["batch_stats"], state["teacher"]

  @jax.jit
  def by_hand(params):
    (h_global, h_small), s_enc = _forward(method.encoder, params["encoder"], stats["encoder"],
                                          [jnp.concatenate(views[:2]),
                                           jnp.concatenate(views[2:])])
    (s,), _ = _forward(head, params["head"], stats["head"],
                       [jnp.concatenate([h_global, h_small])])
    (th,), _ = _forward(method.encoder, teacher["encoder"], stats["teacher_encoder"],
                        [jnp.concatenate(views[:2])])
    (g,), _ = _forward(head, teacher["head"], stats["teacher_head"], [th])
    return jnp.split(s, 4), jnp.split(g, 2), s_enc

  s, g, expected_enc_stats = by_hand(params)
  center = np.asarray(state["center"], np.float64)
  pairs = [(t, v) for t in range(2) for v in range(4) if v != t]
  expected = np.mean([_cross_entropy(g[t], center, 0.07, s[v], 0.1) for t, v in pairs])
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  new_center = 0.9 * center + 0.1 * np.mean(np.concatenate([g[0], g[1]]), axis=0)
  np.testing.assert_allclose(new_state["center"], new_center, rtol=1e-5, atol=1e-7)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               new_state["batch_stats"]["encoder"], expected_enc_stats)
  assert np.max(np.abs(np.stack(s))) <= 1.0 + 1e-5  # cosine outputs


@pytest.mark.parametrize("layout", ["issl", "official_multicrop"])
def test_objective_terms_are_per_view_and_image_and_reduce_to_the_value(dino, tmp_path,
                                                                        layout):
  # The fixture's ISSL layout on two views (sequential centre), and the official layout with
  # two small crops: terms[v] is student view v's cross-entropies against the other teacher
  # views, divided by the number of (teacher, student) pairs.
  config, method, params, state = dino
  views = _views(seed=1)
  if layout != "issl":
    config = _config(tmp_path, proj_layers=3, proj_bn=False, proj_bias=True,
                     normalize_before_bottleneck=False, sequential_center=False)
    method = build_method(config, run=_RUN)
    views = _views(seed=2, small=2)
    params, state = init_with_numpy_kernels(method.init, _KEY, views)
    state = {**state, "center": jnp.linspace(-0.1, 0.1, 12)}
  step = jnp.int32(5)  # teacher temperature 0.055

  @jax.jit
  def run(params, state):
    batch = _batch(views)
    outputs, new_state = method.forward(params, state, batch, step=step)
    out = method.objective(params, new_state, outputs, batch, key=_KEY, step=step,
                           axis_name=None)
    return out.value, out.terms(), outputs.embeddings

  assert method.decomposes
  value, terms, embeddings = run(params, state)
  s, g = embeddings["student"], embeddings["teacher"]
  assert len(s) == len(views) and len(g) == 2
  assert terms.shape == (len(views), 16)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)
  c0 = np.asarray(state["center"], np.float64)
  if layout == "issl":  # teacher view 1 meets c0, teacher view 0 the moved centre c1
    c1 = 0.9 * c0 + 0.1 * np.mean(np.asarray(g[1]), axis=0)
    centers = {1: c0, 0: c1}
  else:
    centers = {0: c0, 1: c0}
  num_pairs = 2 * (len(views) - 1)
  for v in range(len(views)):
    expected = sum(_cross_entropy(g[t], centers[t], 0.055, s[v], 0.1)
                   for t in range(2) if t != v) / num_pairs
    np.testing.assert_allclose(jnp.mean(terms[v]), expected, rtol=1e-5)


def test_eval_variables_student_or_teacher(dino, tmp_path):
  _, method, params, state = dino
  variables = method.eval_variables(params, state)
  assert variables["params"] is params["encoder"]
  assert variables["batch_stats"] is state["batch_stats"]["encoder"]
  teacher_eval = build_method(_config(tmp_path, eval_teacher=True), run=_RUN)
  variables = teacher_eval.eval_variables(params, state)
  assert variables["params"] is state["teacher"]["encoder"]
  assert variables["batch_stats"] is state["batch_stats"]["teacher_encoder"]


@pytest.mark.parametrize("changes, message", [
    ({"teacher_temperature_warmup_epochs": 2.5}, "whole number of epochs"),
    ({"teacher_temperature_warmup_epochs": -1.0}, "whole number of epochs"),
    ({"teacher_temperature": 0.0}, "method.dino.teacher_temperature must be > 0"),
    ({"center_momentum": 1.5}, "method.dino.center_momentum must be in"),
    ({"ema_momentum": 0.996, "ema_momentum_final": 0.99}, "ema_momentum_final"),
    ({"freeze_last_layer_epochs": -1.0}, "freeze_last_layer_epochs must be >= 0"),
    ({"proj_layers": 0}, "method.dino.proj_layers must be >= 1"),
])
def test_bad_configs(tmp_path, changes, message):
  with pytest.raises(ValueError, match=message):
    build_method(_config(tmp_path, **changes), run=_RUN)


def test_loss_needs_two_views(dino):
  _, method, params, state = dino
  with pytest.raises(ValueError, match="at least 2 views"):
    jax.eval_shape(lambda p, s: method.loss(p, s, _batch(_views()[:1]), key=_KEY,
                                            step=jnp.int32(0), axis_name=None), params, state)


def _step_on(config, devices):
  """A compiled train step of `config` on a mesh of `devices` and a runner for it."""
  mesh = make_mesh(devices)
  method = build_method(config, axis_name="data", run=_RUN)
  policy = augment.build_policy(config.augment)
  schedule = build_schedule(config.optim, global_batch=16, total_steps=20, steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule)
  step = compile_train_step(make_per_device_step(method, tx, policy, schedule), mesh)

  def run(params, state, at_step, images):
    train_state = TrainState(step=jnp.int32(at_step), params=params, opt_state=tx.init(params),
                             method_state=state, rng=jax.random.PRNGKey(1),
                             nonfinite_step=jnp.int32(-1))
    train_state = jax.device_put(jax.tree.map(jnp.copy, train_state), replicated(mesh))
    put = lambda x: jax.device_put(x, data_sharded(mesh))
    n = images.shape[0]
    return step(train_state, put(images), put(np.arange(n, dtype=np.int32)),
                put(np.full((n,), -1, np.int32)))

  return run


def _max_change(new, old):
  return jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()), new, old)


def test_steps_freeze_the_last_layer_move_the_teacher_and_match_one_device(dino, num_devices):
  config, _, params, state = dino
  images = np.random.default_rng(3).integers(0, 256, size=(16, 16, 16, 1), dtype=np.uint8)
  run8 = _step_on(config, jax.devices())

  # Step 0 of 4 frozen steps: the last layer keeps its weights, everything else trains.
  frozen, metrics0 = run8(params, state, 0, images)
  assert int(frozen.step) == 1 and int(frozen.nonfinite_step) == -1
  change = _max_change(frozen.params, params)
  assert change["head"]["last_layer"]["kernel"] == 0.0
  other = jax.tree.leaves({**change, "head": {k: v for k, v in change["head"].items()
                                              if k != "last_layer"}})
  assert min(other) > 0
  # Teacher: EMA with momentum 0.996 (step 0) towards the new student, last layer included.
  np.testing.assert_allclose(metrics0["train/ema_momentum"], 0.996, rtol=1e-6)
  expected = jax.tree.map(lambda old, new: 0.996 * np.asarray(old) + 0.004 * np.asarray(new),
                          state["teacher"], frozen.params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               frozen.method_state["teacher"], expected)
  assert _max_change(frozen.method_state["center"], state["center"]) > 0
  np.testing.assert_allclose(metrics0["train/teacher_temperature"], 0.04, rtol=1e-6)

  # Step 4 (epoch 1): the last layer trains too; momentum follows the cosine schedule.
  trained, metrics = run8(params, state, 4, images)
  assert _max_change(trained.params, params)["head"]["last_layer"]["kernel"] > 0
  tau = 1 - (1 - 0.996) * (math.cos(math.pi * 4 / 20) + 1) / 2
  np.testing.assert_allclose(metrics["train/ema_momentum"], tau, rtol=1e-6)

  # 8 devices (synced BN, pmean'd centre) equal 1 device on the same global batch.
  one, metrics1 = _step_on(config, jax.devices()[:1])(params, state, 0, images)
  np.testing.assert_allclose(metrics1["train/loss"], metrics0["train/loss"], rtol=1e-4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5),
               (frozen.params, frozen.method_state), (one.params, one.method_state))
