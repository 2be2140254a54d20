"""SwAV as a method record: state, config errors, multi-crop forward, frozen prototypes, queue."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax import augment
from ssljax.losses import l2_normalize, sinkhorn, swav as swav_loss
from ssljax.methods import RunInfo, build_method, registered_methods
from ssljax.methods.addons import weight_terms
from ssljax.methods.swav import build_swav, init_prototypes
from ssljax.models import MLPHead
from ssljax.parallel import DATA_AXIS, data_sharded, make_mesh, replicated
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, compile_train_step, make_per_device_step
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_BATCH, _SIZE, _SMALL = 16, 16, 8
# Two steps per epoch: the builder turns epochs into steps with it.
_RUN = RunInfo(steps_per_epoch=2, total_steps=10)


def _config(directory, **swav):
  config = tiny_config(directory, method="swav")
  config.model.encoder = "resnet_tiny"
  config.augment.policy = "multicrop"
  config.augment.num_small_crops = 2
  config.augment.small_crop_size = _SMALL
  hp = config.method.swav
  hp.proj_hidden_dim, hp.proj_dim, hp.num_prototypes = 16, 8, 12
  hp.queue_size, hp.queue_start_epoch, hp.freeze_prototypes_epochs = 32, 0.0, 1.0
  for name, value in swav.items():
    hp[name] = value
  config.optim.schedule = "constant"
  return config


def _example_views(batch=_BATCH):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.uniform(size=(batch, s, s, 1)), jnp.float32)
               for s in (_SIZE, _SIZE, _SMALL, _SMALL))


def _init(method):
  """Initial (params, state), kernels from NumPy (fast); prototypes and queue as init makes them."""
  return init_with_numpy_kernels(method.init, _KEY, _example_views())


def _projections(method, config, params, stats, views):
  """Normalised projections of every view and the new BN statistics, by hand: one encoder
  pass per resolution, then one projector pass over all crops, all in training mode."""
  hp = config.method.swav
  projector = MLPHead(hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim, num_layers=2)
  enc_stats, features = stats["encoder"], []
  for group in (views[:2], views[2:]):
    h, updates = method.encoder.apply({"params": params["encoder"], "batch_stats": enc_stats},
                                      jnp.concatenate(group), train=True,
                                      mutable=["batch_stats"])
    enc_stats = updates["batch_stats"]
    features.append(h)
  z, updates = projector.apply(
      {"params": params["projector"], "batch_stats": stats["projector"]},
      jnp.concatenate(features), train=True, mutable=["batch_stats"])
  new_stats = {"encoder": enc_stats, "projector": updates["batch_stats"]}
  return jnp.split(l2_normalize(z), len(views)), new_stats


def test_registered_init_structure_and_helpers(tmp_path):
  assert "swav" in registered_methods()
  config = _config(str(tmp_path))
  method = build_method(config, run=_RUN)
  assert method.name == "swav" and method.num_views == 2
  assert augment.build_policy(config.augment).view_sizes == (16, 16, _SMALL, _SMALL)
  params, state = jax.eval_shape(method.init, _KEY, _example_views(batch=2))
  assert set(params) == {"encoder", "projector", "prototypes"}
  assert params["prototypes"].shape == (12, 8)
  assert set(state) == {"batch_stats", "queue", "queue_pointer"}
  assert set(state["batch_stats"]) == {"encoder", "projector"}
  assert state["queue"].shape == (2, 32, 8) and state["queue"].dtype == jnp.float32
  assert state["queue_pointer"].shape == () and state["queue_pointer"].dtype == jnp.int32
  mask = method.update_mask(params, jnp.int32(1))
  assert set(mask) == set(params) and not mask["prototypes"] and mask["encoder"]
  assert method.update_mask(params, jnp.int32(2))["prototypes"]

  config.method.swav.queue_size = 0
  config.method.swav.freeze_prototypes_epochs = 0.0
  config.method.swav.crops_for_assign = (0, 2)
  method = build_method(config, run=_RUN)
  assert method.update_mask is None and method.num_views == 3
  _, state = jax.eval_shape(method.init, _KEY, _example_views(batch=2))
  assert set(state) == {"batch_stats"}

  prototypes = init_prototypes(jax.random.key(1), 5, 3)
  np.testing.assert_allclose(jnp.linalg.norm(prototypes, axis=1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("changes, message", [
    ({"num_prototypes": 0}, r"num_prototypes must be >= 1, got 0"),
    ({"queue_size": 40}, r"method.swav.queue_size = 40 must be a positive multiple of "
                         r"the global batch \(train.batch_size = 16\)"),
    ({"queue_size": 0, "num_prototypes": 20},
     r"global batch \(train.batch_size = 16\) is smaller than method.swav.num_prototypes = "
     r"20 and there is no queue"),
    ({"queue_size": 16, "num_prototypes": 40},
     r"queue_size = 16 \+ train.batch_size = 16\) hold fewer samples than "
     r"method.swav.num_prototypes = 40"),
    ({"crops_for_assign": (0, 0)}, r"crops_for_assign must be distinct"),
])
def test_bad_configs_raise_clear_errors(tmp_path, changes, message):
  config = _config(str(tmp_path), **changes)
  with pytest.raises(ValueError, match=message):
    build_method(config, run=_RUN)


def test_enough_samples_with_queue_or_batch_build(tmp_path):
  # Exactly as many samples as prototypes is allowed, with or without a queue.
  build_method(_config(str(tmp_path), queue_size=0, num_prototypes=16), run=_RUN)
  build_method(_config(str(tmp_path), queue_size=32, num_prototypes=48), run=_RUN)


def test_loss_without_queue_is_swav_of_sinkhorn_codes_and_weighted_terms(tmp_path):
  # Weighting the per-(view, image) terms (`weight_terms`, UOTA's mechanism) gives SwAV's loss
  # with those view weights.
  config = _config(str(tmp_path), queue_size=0)
  seen = {}

  def double_small_crops(params, method_state, outputs, batch, *, step, axis_name):
    z = outputs.embeddings["projection"]
    seen["shapes"] = [v.shape for v in z]
    seen["axis"] = axis_name
    weights = jnp.array([1.0, 1.0, 2.0, 2.0])[:, None] * jnp.ones((4, z[0].shape[0]))
    return weights, {"weight_max": jnp.max(weights) + 0 * step}

  method = build_method(config, run=_RUN)
  weighted = weight_terms(build_swav(config, None, _RUN), double_small_crops, addon="x2")
  assert weighted.name == "swav+x2"
  params, state = _init(method)
  rng = np.random.default_rng(1)
  views = tuple(jnp.asarray(rng.uniform(size=(_BATCH, s, s, 1)), jnp.float32)
                for s in (_SIZE, _SIZE, _SMALL, _SMALL))
  batch = {"views": views, "index": jnp.arange(_BATCH), "label": jnp.zeros(_BATCH, jnp.int32)}

  @jax.jit
  def run(params, state):
    plain = method.loss(params, state, batch, key=_KEY, step=jnp.int32(0), axis_name=None)
    reweighted = weighted.loss(params, state, batch, key=_KEY, step=jnp.int32(0),
                               axis_name=None)
    z, stats = _projections(method, config, params, state["batch_stats"], views)
    scores = [zv @ params["prototypes"].T for zv in z]
    codes = [sinkhorn(scores[c]) for c in (0, 1)]
    terms_weights = jnp.array([1.0, 1.0, 2.0, 2.0])[:, None] * jnp.ones((4, _BATCH))
    return (plain, reweighted, swav_loss(scores, codes, temperature=0.1)[0],
            swav_loss(scores, codes, temperature=0.1, view_weights=terms_weights)[0], stats)

  (value, (metrics, new_state)), (w_value, (w_metrics, _)), expected, w_expected, stats = run(
      params, state)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(w_value, w_expected, rtol=1e-5)
  assert float(w_value) > float(value)
  assert seen == {"shapes": [(_BATCH, 8)] * 4, "axis": None}
  assert float(w_metrics["weight_max"]) == 2.0 and "weight_max" not in metrics
  assert set(metrics) == {"code_entropy", "agreement"}
  # BN statistics moved: the encoder's by the global, then the small crops' pass; the
  # projector's by one pass over all crops.
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for old, new in zip(jax.tree.leaves(state), jax.tree.leaves(new_state)):
    assert not np.allclose(old, new)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-6),
               new_state["batch_stats"], stats)
  with pytest.raises(ValueError, match=r"crops_for_assign = \(0, 1\) needs at least 2 views"):
    method.loss(params, state, {**batch, "views": views[:1]}, key=_KEY, step=jnp.int32(0),
                axis_name=None)


def _crops(keys, images):
  """A deterministic multi-crop 'policy' (2 global views, 2 half-resolution crops): the
  augmentation itself is tested elsewhere, and compiling it would triple this file's time."""
  del keys
  x = images.astype(jnp.float32) / 255.0
  return x, x[:, :, ::-1], x[:, ::2, ::2], x[:, 1::2, 1::2]


def _trainer(config, mesh):
  """(method, jitted step, tx) on `mesh` (None: one device, no axis name)."""
  axis_name = DATA_AXIS if mesh else None
  method = build_method(config, axis_name=axis_name, run=_RUN)
  schedule = build_schedule(config.optim, global_batch=_BATCH, total_steps=10,
                            steps_per_epoch=2)
  tx = build_optimizer(config.optim, schedule)
  per_device = make_per_device_step(method, tx, _crops, schedule, axis_name=axis_name)
  return method, (compile_train_step(per_device, mesh) if mesh else jax.jit(per_device)), tx


def _assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=rtol, atol=atol), a, b)


def test_steps_freeze_prototypes_fill_the_queue_and_match_eight_devices(tmp_path, num_devices):
  # Two steps per epoch: the queue (two global batches) is filled from step 1
  # (queue_start_epoch 0.5), so it is full after step 2 and joins the codes at step 3; the
  # prototypes are frozen for steps 0 and 1.
  config = _config(str(tmp_path), queue_start_epoch=0.5)
  mesh = make_mesh(jax.devices())
  method, step1, tx = _trainer(config, None)
  _, step8, _ = _trainer(config, mesh)
  params, method_state = _init(method)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                     method_state=method_state, rng=jax.random.PRNGKey(3),
                     nonfinite_step=jnp.full((), -1, jnp.int32))
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(_BATCH, _SIZE, _SIZE, 1), dtype=np.uint8)
  index, label = np.arange(_BATCH, dtype=np.int32), np.zeros(_BATCH, np.int32)
  views = _crops(None, jnp.asarray(images))
  assert [v.shape for v in views] == [(_BATCH, 16, 16, 1)] * 2 + [(_BATCH, 8, 8, 1)] * 2
  put = lambda x: jax.device_put(x, data_sharded(mesh))

  @jax.jit
  def projections(state):
    return _projections(method, config, state.params, state.method_state["batch_stats"],
                        views)[0]

  states, metrics = [state], []
  # A copy on the mesh: the compiled step donates its state argument.
  state8 = jax.device_put(jax.tree.map(jnp.copy, state), replicated(mesh))
  for _ in range(4):
    new_state, new_metrics = step1(states[-1], images, index, label)
    state8, metrics8 = step8(state8, put(images), put(index), put(label))
    _assert_trees_close(state8.params, new_state.params, rtol=1e-3, atol=1e-5)
    _assert_trees_close(state8.method_state, new_state.method_state, rtol=1e-3, atol=1e-5)
    np.testing.assert_allclose(metrics8["train/loss"], new_metrics["train/loss"], rtol=1e-4)
    np.testing.assert_allclose(metrics8["train/queue_used"], new_metrics["train/queue_used"])
    states.append(new_state)
    metrics.append(new_metrics)
  assert [float(m["train/queue_used"]) for m in metrics] == [0.0, 0.0, 0.0, 1.0]
  z = [projections(s) for s in states[:4]]

  # Steps 0 and 1: prototypes frozen (unchanged up to the re-normalisation's rounding) while
  # the encoder trains.
  for s in (1, 2):
    np.testing.assert_allclose(states[s].params["prototypes"], params["prototypes"],
                               rtol=1e-6, atol=1e-7)
    assert not np.allclose(states[s].params["encoder"]["stem_conv"]["kernel"],
                           states[s - 1].params["encoder"]["stem_conv"]["kernel"])
  # Step 2: prototypes trained, then re-normalised.
  assert not np.allclose(states[3].params["prototypes"], params["prototypes"])
  np.testing.assert_allclose(jnp.linalg.norm(states[3].params["prototypes"], axis=1), 1.0,
                             rtol=1e-6)

  close = functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-5)
  # Step 0 is before the queue's start: nothing written.
  np.testing.assert_array_equal(states[1].method_state["queue"], 0.0)
  assert int(states[1].method_state["queue_pointer"]) == 0
  # Step 1 wrote the global batch's crops 0 and 1 (global row order) at rows 0-15 ...
  queue, pointer = states[2].method_state["queue"], states[2].method_state["queue_pointer"]
  assert int(pointer) == 16
  close(queue[0, :16], z[1][0])
  close(queue[1, :16], z[1][1])
  np.testing.assert_array_equal(queue[:, 16:], 0.0)
  # ... step 2 rows 16-31, completing the queue and wrapping the pointer ...
  queue, pointer = states[3].method_state["queue"], states[3].method_state["queue_pointer"]
  assert int(pointer) == 0
  close(queue[0, :16], z[1][0])
  close(queue[0, 16:], z[2][0])
  # ... and step 3, the first to use it, overwrote the oldest rows (0-15).
  queue, pointer = states[4].method_state["queue"], states[4].method_state["queue_pointer"]
  assert int(pointer) == 16
  close(queue[1, :16], z[3][1])
  close(queue[1, 16:], z[2][1])

  # Step 3's loss: Sinkhorn over [queue scores; batch scores], the batch rows kept.
  prototypes = states[3].params["prototypes"]
  scores = [zv @ prototypes.T for zv in z[3]]
  queue = states[3].method_state["queue"]
  codes = [sinkhorn(jnp.concatenate([queue[i] @ prototypes.T, scores[c]]))[-_BATCH:]
           for i, c in enumerate((0, 1))]
  expected, _ = swav_loss(scores, codes, temperature=0.1)
  np.testing.assert_allclose(metrics[3]["train/loss"], expected, rtol=1e-4)
  without_queue, _ = swav_loss(scores, [sinkhorn(scores[c]) for c in (0, 1)],
                               temperature=0.1)
  assert abs(float(without_queue) - float(expected)) > 1e-4


@pytest.mark.parametrize("queue_size", [0, 32])
def test_objective_terms_are_per_view_and_image_and_reduce_to_the_value(tmp_path, queue_size):
  # Four multi-crop views; with a queue (still empty, so the codes are the batch's alone) the
  # terms are those of the same codes.
  config = _config(str(tmp_path), queue_size=queue_size)
  method = build_method(config, run=_RUN)
  assert method.decomposes
  params, state = _init(method)
  rng = np.random.default_rng(1)
  views = tuple(jnp.asarray(rng.uniform(size=(_BATCH, s, s, 1)), jnp.float32)
                for s in (_SIZE, _SIZE, _SMALL, _SMALL))
  batch = {"views": views, "index": jnp.arange(_BATCH), "label": jnp.zeros(_BATCH, jnp.int32)}

  @jax.jit
  def run(params, state):
    outputs, new_state = method.forward(params, state, batch, step=jnp.int32(0))
    out = method.objective(params, new_state, outputs, batch, key=_KEY, step=jnp.int32(0),
                           axis_name=None)
    scores = outputs.embeddings["scores"]
    codes = [sinkhorn(scores[c]) for c in (0, 1)]
    return out.value, out.terms(), swav_loss(scores, codes, temperature=0.1)[0]

  value, terms, expected = run(params, state)
  assert terms.shape == (len(views), _BATCH)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)
  np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_post_update_renormalises_the_prototypes(tmp_path):
  method = build_method(_config(str(tmp_path)), run=_RUN)
  params = {"encoder": {}, "projector": {},
            "prototypes": 3.0 * init_prototypes(jax.random.key(2), 12, 8)}
  state = {"batch_stats": {}}
  new_params, new_state = method.post_update(params, state, step=jnp.int32(3))
  np.testing.assert_allclose(new_params["prototypes"], params["prototypes"] / 3.0, rtol=1e-6)
  assert new_state is state and new_params["encoder"] is params["encoder"]
