"""MoCo v2 as a method record: state layout, the loss by hand, view layouts, the EMA schedule,
the queue, one train step on 8 devices vs 1, and configuration errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax import augment
from ssljax.losses import l2_normalize, moco_infonce
from ssljax.methods import RunInfo, build_method, registered_methods
from ssljax.methods.base import Outputs
from ssljax.methods.moco import MocoProjector, build_moco
from ssljax.parallel import data_sharded, make_mesh, replicated
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, compile_train_step, make_per_device_step
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_SIZE = 8
_BATCH = 16
_RUN = RunInfo(steps_per_epoch=4, total_steps=10)
_QUEUE = 64  # a multiple of 2 x 16: symmetric steps enqueue both views' keys


def _config(directory, num_views=2, **moco):
  config = tiny_config(str(directory), method="moco")
  config.augment.num_views = num_views
  hp = config.method.moco
  hp.queue_size = _QUEUE
  hp.proj_hidden_dim = 16
  hp.proj_dim = 8
  hp.ema_momentum = 0.9  # a schedule with room to move, so its shape is checked
  hp.ema_momentum_final = 0.99
  hp.num_views = num_views
  config.optim.warmup_epochs = 0.0  # the warm-up starts at lr 0: the first step would not move
  for key, value in moco.items():
    hp[key] = value
  return config


def _views(seed=0, count=2):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(_BATCH, _SIZE, _SIZE, 1))
  view = lambda: np.clip(images + 0.1 * rng.normal(size=images.shape), 0, 1)
  return tuple(jnp.asarray(view(), jnp.float32) for _ in range(count))


def _batch(views):
  return {"views": views, "index": jnp.arange(_BATCH, dtype=jnp.int32),
          "label": jnp.full((_BATCH,), -1, jnp.int32)}


def _init(method, views):
  """Params and state with NumPy kernels, the real queue, and key networks = query networks.

  `init_with_numpy_kernels` draws every rank >= 2 leaf on its own, so the queue and the key
  networks are put back as the real init makes them (`test_init_structure` checks that).
  """
  params, state = init_with_numpy_kernels(method.init, _KEY, views)
  queue = jax.jit(lambda key, views: method.init(key, views)[1]["queue"])(_KEY, views)
  state = {**state, "queue": queue, "key_params": jax.tree.map(jnp.copy, params)}
  return params, state


def _loss_fn(method, step=3):
  return jax.jit(lambda params, state, views: method.loss(
      params, state, _batch(views), key=_KEY, step=jnp.int32(step), axis_name=None))


@pytest.fixture(scope="module")
def moco(tmp_path_factory):
  """The symmetric default: config, method, (params, state) and the jitted loss."""
  config = _config(tmp_path_factory.mktemp("moco"))
  method = build_method(config, run=_RUN)
  params, state = _init(method, _views())
  return config, method, params, state, _loss_fn(method)


def test_init_structure(moco):
  _, method, params, state, _ = moco
  assert "moco" in registered_methods()
  assert method.name == "moco" and method.num_views == 2 and method.update_mask is None
  assert set(params) == {"encoder", "projector"}
  assert set(state) == {"batch_stats", "key_params", "queue", "queue_pointer"}
  assert set(state["batch_stats"]) == {"encoder", "key_encoder"}  # the projector has no BN
  shapes = lambda tree: jax.tree.map(lambda x: x.shape, tree)
  assert shapes(params["projector"]) == {"dense1": {"kernel": (32, 16), "bias": (16,)},
                                         "dense2": {"kernel": (16, 8), "bias": (8,)}}
  assert shapes(state["key_params"]) == shapes(params)
  assert shapes(state["batch_stats"]["key_encoder"]) == shapes(state["batch_stats"]["encoder"])
  assert state["queue"].shape == (_QUEUE, 8) and int(state["queue_pointer"]) == 0
  np.testing.assert_allclose(np.linalg.norm(state["queue"], axis=1), 1.0, rtol=1e-5)
  assert np.abs(np.asarray(state["queue"]).mean(0)).max() < 0.5  # random directions

  # The real init copies the query networks and their BN statistics into the key networks
  # (read off the jaxpr: cheaper than running the initialisers).
  views = _views()
  closed = jax.make_jaxpr(method.init)(_KEY, views)
  out = jax.tree.unflatten(jax.tree.structure(jax.eval_shape(method.init, _KEY, views)),
                           closed.jaxpr.outvars)
  producer = {id(var): eqn for eqn in closed.jaxpr.eqns for var in eqn.outvars}
  pairs = [(out[0], out[1]["key_params"]),
           (out[1]["batch_stats"]["encoder"], out[1]["batch_stats"]["key_encoder"])]
  for online, copies in pairs:
    for source, copy in zip(jax.tree.leaves(online), jax.tree.leaves(copies)):
      eqn = producer[id(copy)]
      assert eqn.primitive.name == "copy" and eqn.invars[0] is source


def _forward(module, params, stats, x):
  out, updates = module.apply({"params": params, "batch_stats": stats}, x, train=True,
                              mutable=["batch_stats"])
  return out, updates["batch_stats"]


def _by_hand(method, config, params, state, views):
  """Symmetric MoCo from module.apply calls: (loss, queue rows written, new BN statistics)."""
  hp = config.method.moco
  projector = MocoProjector(hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim)
  stats, key_params = state["batch_stats"], state["key_params"]
  h0, s = _forward(method.encoder, params["encoder"], stats["encoder"], views[0])
  h1, s_enc = _forward(method.encoder, params["encoder"], s, views[1])
  q0, q1 = (projector.apply({"params": params["projector"]}, h) for h in (h0, h1))
  # The key encoder sees view 1 first, then view 0 (the official symmetric order).
  g1, s = _forward(method.encoder, key_params["encoder"], stats["key_encoder"], views[1])
  g0, s_key = _forward(method.encoder, key_params["encoder"], s, views[0])
  k0, k1 = (l2_normalize(projector.apply({"params": key_params["projector"]}, g))
            for g in (g0, g1))
  t = hp.temperature
  value = (moco_infonce(q0, k1, state["queue"], temperature=t)[0]
           + moco_infonce(q1, k0, state["queue"], temperature=t)[0]) / 2
  return value, jnp.concatenate([k0, k1]), {"encoder": s_enc, "key_encoder": s_key}


def test_loss_by_hand_and_the_queue_write(moco):
  config, method, params, state, loss = moco
  views = _views(seed=1)
  value, (metrics, new_state) = loss(params, state, views)
  expected, keys, stats = jax.jit(functools.partial(_by_hand, method, config))(
      params, state, views)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert set(metrics) == {"pos_sim", "neg_sim", "accuracy", "ema_momentum"}
  momentum = 0.99 - (0.99 - 0.9) * (math.cos(math.pi * 3 / 10) + 1) / 2  # step 3 of 10
  np.testing.assert_allclose(metrics["ema_momentum"], momentum, rtol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               new_state["batch_stats"], stats)
  # Both views' keys (view 0 first) fill rows [0, 32); the rest of the queue is untouched.
  assert int(new_state["queue_pointer"]) == 2 * _BATCH
  np.testing.assert_allclose(new_state["queue"][:2 * _BATCH], keys, rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(new_state["queue"][2 * _BATCH:], state["queue"][2 * _BATCH:])
  jax.tree.map(np.testing.assert_array_equal, new_state["key_params"],
               state["key_params"])  # only post_update moves them

  # The pointer wraps around: a full queue restarts at row 0.
  wrapped = {**state, "queue_pointer": jnp.int32(_QUEUE - 2 * _BATCH)}
  _, (_, after) = loss(params, wrapped, views)
  assert int(after["queue_pointer"]) == 0
  np.testing.assert_allclose(after["queue"][-2 * _BATCH:], keys, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("num_views", [2, 3])
def test_asymmetric_and_three_view_layouts(tmp_path, num_views):
  # Asymmetric: query view 0, key view 1. Three views (CLD): queries 0 and 1, key view 2.
  config = _config(tmp_path, num_views=num_views, symmetric=False)
  method = build_method(config, run=_RUN)
  assert build_moco(config, None, _RUN).num_views == num_views
  key_view = num_views - 1
  assert method.num_views == num_views
  params, state = _init(method, _views(count=num_views))
  step = jnp.int32(3)

  # `loss` is forward + objective; compiling the forward alone is enough for the layout.
  @jax.jit
  def forward(params, state, views):
    return method.forward(params, state, _batch(views), step=step)[0]

  @jax.jit
  def objective(params, state, outputs, views):
    out = method.objective(params, state, outputs, _batch(views), key=_KEY, step=step,
                           axis_name=None)
    return out.value, out.terms(), out.method_state

  views = _views(seed=4, count=num_views)
  outputs = forward(params, state, views)
  queries, keys = outputs.embeddings["query"], outputs.embeddings["key"]
  assert len(outputs.features) == len(queries) == num_views - 1 and len(keys) == 1
  assert outputs.features[0].shape == (_BATCH, 32) and keys[0].shape == (_BATCH, 8)
  value, terms, new_state = objective(params, state, outputs, views)
  expected = np.mean([moco_infonce(q, keys[0], state["queue"],
                                   temperature=config.method.moco.temperature)[0]
                      for q in queries])
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  assert int(new_state["queue_pointer"]) == _BATCH
  np.testing.assert_array_equal(new_state["queue"][:_BATCH], keys[0])
  # Terms: one row per view of the batch; the key view is never a query (zero row).
  assert terms.shape == (num_views, _BATCH)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)
  np.testing.assert_array_equal(terms[key_view], 0.0)
  assert np.all(np.asarray(terms[:key_view]) > 0)

  # The key comes from the key view alone, the queries from the other views.
  other = _views(seed=5, count=num_views)
  changed = forward(params, state, other[:key_view] + views[key_view:])
  np.testing.assert_allclose(changed.embeddings["key"][0], keys[0], rtol=1e-6)
  assert not np.allclose(changed.embeddings["query"][0], queries[0])
  changed = forward(params, state, views[:key_view] + other[key_view:])
  np.testing.assert_allclose(changed.embeddings["query"][0], queries[0], rtol=1e-6)
  assert not np.allclose(changed.embeddings["key"][0], keys[0])
  # Query i comes from view i (query views 0, ..., key_view - 1, in order).
  for i in range(key_view):
    mixed = tuple(other[v] if v == i else views[v] for v in range(num_views))
    changed = forward(params, state, mixed)
    for j in range(key_view):
      same = np.allclose(changed.embeddings["query"][j], queries[j], rtol=1e-6)
      assert same == (i != j), (i, j)


def test_objective_terms_are_per_view_and_image_and_reduce_to_the_value(moco):
  # The symmetric default: view v's row is its query's InfoNCE against the other view's key,
  # halved (the loss is the mean of the two pairs).
  config, method, params, state, _ = moco
  views = _views(seed=1)
  step = jnp.int32(3)

  @jax.jit
  def run(params, state):
    batch = _batch(views)
    outputs, new_state = method.forward(params, state, batch, step=step)
    out = method.objective(params, new_state, outputs, batch, key=_KEY, step=step,
                           axis_name=None)
    return out.value, out.terms(), outputs

  assert method.decomposes
  value, terms, outputs = run(params, state)
  assert terms.shape == (len(views), _BATCH)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)
  expected, _, _ = jax.jit(functools.partial(_by_hand, method, config))(params, state, views)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  (q0, q1), (k1, k0) = outputs.embeddings["query"], outputs.embeddings["key"]
  t = config.method.moco.temperature
  for row, (q, k) in zip(terms, ((q0, k1), (q1, k0))):
    np.testing.assert_allclose(jnp.mean(row), moco_infonce(q, k, state["queue"],
                                                             temperature=t)[0] / 2, rtol=1e-5)


def test_post_update_follows_the_cosine_momentum_schedule(moco):
  _, method, params, state, _ = moco
  ones = jax.tree.map(jnp.ones_like, params)
  zeros = {**state, "key_params": jax.tree.map(jnp.zeros_like, params)}
  post_update = jax.jit(method.post_update)
  for step in (0, 5, 10, 20):
    m = 0.99 - (0.99 - 0.9) * (math.cos(math.pi * min(step, 10) / 10) + 1) / 2
    new_params, new_state = post_update(ones, zeros, step=jnp.int32(step))
    jax.tree.map(np.testing.assert_array_equal, new_params, ones)
    for leaf in jax.tree.leaves(new_state["key_params"]):
      np.testing.assert_allclose(leaf, 1 - m, rtol=1e-5)
  np.testing.assert_array_equal(new_state["queue"], state["queue"])


def test_constant_momentum_when_base_equals_final(tmp_path):
  config = _config(tmp_path, ema_momentum=0.999, ema_momentum_final=0.999)
  method = build_moco(config, None, _RUN)
  # The objective's metric is the schedule's momentum; only the queue and the embeddings'
  # shapes matter to it, so stand-in embeddings avoid compiling the networks.
  rng = np.random.default_rng(0)
  embedding = lambda: jnp.asarray(rng.normal(size=(_BATCH, 8)), jnp.float32)
  outputs = Outputs(features=(), embeddings={"query": (embedding(), embedding()),
                                             "key": (embedding(), embedding())})
  state = {"queue": l2_normalize(embedding().repeat(4, axis=0)),
           "queue_pointer": jnp.int32(0)}
  momentum = jax.jit(lambda step: method.objective(
      {}, state, outputs, _batch(_views()), key=_KEY, step=step,
      axis_name=None).metrics["ema_momentum"])
  for step in (0, 3, 10):
    np.testing.assert_allclose(momentum(jnp.int32(step)), 0.999, rtol=1e-7)


@pytest.mark.parametrize("changes, num_views, message", [
    ({"queue_size": 40, "symmetric": False}, 2,
     r"moco: method.moco.queue_size = 40 must be a positive multiple of the global batch "
     r"\(train.batch_size = 16\).*queue_size=32"),
    ({"queue_size": 48}, 2,
     r"queue_size = 48 must be a positive multiple of 32 = 2 x train.batch_size \(16\).*"
     r"queue_size=32"),
    ({"queue_size": 0, "symmetric": False}, 3, "positive multiple"),
    ({"symmetric": True}, 3, "symmetric = True needs method.moco.num_views = 2"),
    ({}, 4, "num_views must be 2 or 3, got 4"),
    ({"ema_momentum": 1.5}, 2,
     r"method.moco.ema_momentum \(1.5\) and ema_momentum_final \(.*\) must satisfy"),
    ({"queue_init": "zeros"}, 2,
     r"method.moco.queue_init = 'zeros' is not one of 'normal', 'uniform'"),
])
def test_bad_configs(tmp_path, changes, num_views, message):
  with pytest.raises(ValueError, match=message):
    build_method(_config(tmp_path, num_views=num_views, **changes), run=_RUN)


def test_uniform_queue_init_is_cld_memorymocos(tmp_path):
  """'uniform' rows: entries in +-1/sqrt(d/3) (CLD's lib/NCEAverage.py MemoryMoCo), not
  normalised, unit squared norm on average; the CLD CIFAR configs use it, ImageNet's MoCo
  builder and plain MoCo keep normalised Gaussian rows."""
  from ssljax.config import load_config
  from ssljax.methods.moco import initial_queue
  bound = 1.0 / math.sqrt(128 / 3)
  queue = np.asarray(initial_queue(_KEY, 4096, 128, "uniform"))
  assert queue.shape == (4096, 128) and queue.dtype == np.float32
  assert np.abs(queue).max() <= bound and np.abs(queue).max() > 0.99 * bound
  norms_sq = (queue ** 2).sum(1)
  assert abs(norms_sq.mean() - 1.0) < 0.01 and norms_sq.std() > 0.05  # not normalised
  assert abs(queue.mean()) < 0.01 * bound  # centred
  # The same draw through the method's init, with the tiny config's queue.
  method = build_method(_config(tmp_path, queue_init="uniform"), run=_RUN)
  state = jax.eval_shape(method.init, _KEY, _views())[1]
  assert state["queue"].shape == (_QUEUE, 8)
  init_queue = jax.jit(lambda key, views: method.init(key, views)[1]["queue"])(_KEY, _views())
  assert np.abs(np.asarray(init_queue)).max() <= 1.0 / math.sqrt(8 / 3)
  assert np.linalg.norm(init_queue, axis=1).std() > 0.05
  assert {name: load_config(f"moco_cld:{name}").method.moco.queue_init
          for name in ("cifar10", "cifar100", "imagenet", "fashion_mnist")} == {
              "cifar10": "uniform", "cifar100": "uniform", "imagenet": "normal",
              "fashion_mnist": "normal"}
  assert load_config("moco:cifar10").method.moco.queue_init == "normal"


def test_three_view_layout_needs_three_augmented_views(tmp_path):
  config = _config(tmp_path, num_views=3, symmetric=False)
  method = build_method(config, run=_RUN)
  config.augment.num_views = 2
  assert augment.build_policy(config.augment).num_views < method.num_views


def _policy(keys, images):
  """Deterministic views (the image and its mirror): quick to compile, same on any mesh."""
  del keys
  x = images.astype(jnp.float32) / 255.0
  return x, x[:, :, ::-1]


def _step_on(config, params, state, devices):
  """One compiled train step of `config` on a mesh of `devices` (state built by hand)."""
  mesh = make_mesh(devices)
  method = build_method(config, axis_name="data", run=_RUN)
  schedule = build_schedule(config.optim, global_batch=_BATCH, total_steps=10,
                            steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule)
  step = compile_train_step(make_per_device_step(method, tx, _policy, schedule), mesh)
  first = TrainState(step=jnp.int32(3), params=params, opt_state=tx.init(params),
                     method_state=state, rng=jax.random.PRNGKey(1),
                     nonfinite_step=jnp.int32(-1))
  first = jax.device_put(jax.tree.map(jnp.copy, first), replicated(mesh))  # it is donated
  images = np.random.default_rng(3).integers(0, 256, size=(_BATCH, _SIZE, _SIZE, 1),
                                                  dtype=np.uint8)
  put = lambda x: jax.device_put(x, data_sharded(mesh))
  return step(first, put(images), put(np.arange(_BATCH, dtype=np.int32)),
              put(np.full((_BATCH,), -1, np.int32)))


def test_one_step_on_8_devices_equals_1_device(moco, num_devices):
  config, _, params, state, _ = moco
  new8, metrics8 = _step_on(config, params, state, jax.devices())
  assert int(new8.step) == 4 and int(new8.nonfinite_step) == -1
  ms = new8.method_state

  # The queue took the 2 x 16 keys of the global batch; its other rows are untouched.
  assert int(ms["queue_pointer"]) == 2 * _BATCH
  np.testing.assert_array_equal(ms["queue"][2 * _BATCH:], state["queue"][2 * _BATCH:])
  np.testing.assert_allclose(np.linalg.norm(ms["queue"][:2 * _BATCH], axis=1), 1.0, rtol=1e-5)
  assert not np.allclose(ms["queue"][:2 * _BATCH], state["queue"][:2 * _BATCH])

  # The key networks moved towards the new query networks with the momentum of step 3.
  m = 0.99 - (0.99 - 0.9) * (math.cos(math.pi * 3 / 10) + 1) / 2
  np.testing.assert_allclose(metrics8["train/ema_momentum"], m, rtol=1e-6)
  expected = jax.tree.map(lambda old, new: m * np.asarray(old) + (1 - m) * np.asarray(new),
                          state["key_params"], new8.params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               ms["key_params"], expected)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                                       new8.params, params))
  assert min(moved) > 0  # the optimiser step happened

  # Every device computed the same global step: the one-device run gives the same state,
  # queue rows (gathered keys in global batch order) included.
  new1, metrics1 = _step_on(config, params, state, jax.devices()[:1])
  np.testing.assert_allclose(metrics8["train/loss"], metrics1["train/loss"], rtol=1e-4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5),
               (new8.params, new8.method_state), (new1.params, new1.method_state))
