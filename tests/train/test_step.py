"""The compiled train step: shard_map vs pmap, 8 devices vs 1, the non-finite guard."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax import augment, data
from ssljax.methods import build_method
from ssljax.parallel import DATA_AXIS, data_sharded, make_mesh, replicated
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import (UpdateOutput, average_batch_stats, compile_train_step,
                               init_train_state, make_per_device_step, masked_update, mean_over,
                               pmap_train_step)
from tests.util import tiny_config


def _setup(config, mesh_devices, axis_name=DATA_AXIS, wrap=None):
  mesh = make_mesh(mesh_devices)
  method = build_method(config, axis_name=axis_name)
  method = wrap(method) if wrap else method
  policy = augment.build_policy(config.augment)
  schedule = build_schedule(config.optim, global_batch=config.train.batch_size,
                            total_steps=10, steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule)
  source = data.build_source(config.data, config.data.train_split)
  init = jax.jit(functools.partial(init_train_state, method, tx, policy,
                                   tuple(source.image_shape), config.seed),
                 out_shardings=replicated(mesh))
  per_device = make_per_device_step(method, tx, policy, schedule, axis_name=axis_name)
  batch = source.get(np.arange(config.train.batch_size))
  batch["index"] = np.arange(config.train.batch_size, dtype=np.int32)
  return mesh, init, per_device, batch


def _run(step, state, batch, mesh, steps=2):
  put = lambda x: jax.device_put(x, data_sharded(mesh))
  for _ in range(steps):
    state, metrics = step(state, put(batch["image"]), put(batch["index"]), put(batch["label"]))
  return state, metrics


def _assert_trees_close(a, b, rtol=2e-4, atol=2e-5):
  jax.tree.map(lambda x, y: np.testing.assert_allclose(np.asarray(x), np.asarray(y),
                                                       rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """One config and one compiled 8-device step shared by the tests (compiling is the cost)."""
  config = tiny_config(str(tmp_path_factory.mktemp("tiny")))
  mesh, init, per_device, batch = _setup(config, jax.devices())
  return config, mesh, init, per_device, compile_train_step(per_device, mesh), batch


def test_shard_map_and_pmap_steps_give_the_same_state(tiny, num_devices):
  _, mesh, init, per_device, step, batch = tiny
  sharded_state, sharded_metrics = _run(step, init(), batch, mesh, steps=1)
  pmapped = pmap_train_step(per_device)
  reshape = lambda x: np.asarray(x).reshape(num_devices, -1, *np.shape(x)[1:])
  p_state, p_metrics = pmapped(init(), reshape(batch["image"]), reshape(batch["index"]),
                               reshape(batch["label"]))
  first = jax.tree.map(lambda x: x[0], p_state)
  last = jax.tree.map(lambda x: x[-1], p_state)
  _assert_trees_close(first, last, rtol=0, atol=0)  # replicas agree exactly
  _assert_trees_close(sharded_state, first)
  np.testing.assert_allclose(sharded_metrics["train/loss"], p_metrics["train/loss"][0],
                             rtol=1e-5)
  assert int(sharded_state.step) == 1


def test_eight_devices_equal_one_device(tiny):
  # Sync BN + gathered negatives + per-row augmentation keys that depend on the global row,
  # so the global computation is the same whatever the device count.
  config, mesh8, init8, _, step8, batch = tiny
  mesh1, init1, step1, _ = _setup(config, jax.devices()[:1])
  state8, metrics8 = _run(step8, init8(), batch, mesh8)
  state1, metrics1 = _run(compile_train_step(step1, mesh1), init1(), batch, mesh1)
  np.testing.assert_allclose(metrics8["train/loss"], metrics1["train/loss"], rtol=1e-4)
  _assert_trees_close(state8.params, state1.params, rtol=1e-3, atol=1e-5)
  _assert_trees_close(state8.method_state, state1.method_state, rtol=1e-3, atol=1e-5)


def test_step_changes_parameters_and_counts(tiny):
  _, mesh, init, _, step, batch = tiny
  state0 = init()
  params0 = jax.device_get(state0.params)
  state, metrics = _run(step, state0, batch, mesh, steps=3)
  assert int(state.step) == 3 and int(state.nonfinite_step) == -1
  moved = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - b).max()), state.params,
                       params0)
  assert max(jax.tree.leaves(moved)) > 0
  for key in ("train/loss", "train/lr", "train/grad_norm", "train/accuracy"):
    assert np.isfinite(metrics[key]), key


def test_nonfinite_loss_freezes_the_state_and_records_the_step(tiny):
  _, mesh, init, _, step, batch = tiny
  state, _ = _run(step, init(), batch, mesh, steps=2)
  good = jax.device_get(state)
  # Poison one weight: from step 2 on the loss is NaN, so the state must stay as it was.
  poisoned_params = jax.tree.map(lambda x: x, state.params)
  poisoned_params["projector"]["dense1"]["kernel"] = (
      poisoned_params["projector"]["dense1"]["kernel"].at[0, 0].set(jnp.nan))
  state, _ = _run(step, state.replace(params=poisoned_params), batch, mesh, steps=3)
  assert int(state.nonfinite_step) == 2
  assert int(state.step) == 2
  frozen = jax.device_get(state)
  _assert_trees_close(frozen.opt_state, good.opt_state, rtol=0, atol=0)
  _assert_trees_close(frozen.method_state, good.method_state, rtol=0, atol=0)


def _toy_method(freeze_steps: int):
  """A two-parameter method: `frozen` is masked for `freeze_steps` steps, `unit` is renormalised."""
  import flax.linen as nn
  from ssljax.methods.base import method_from_loss

  def init(key, views):
    del key, views
    return {"unit": jnp.array([3.0, 4.0]), "frozen": jnp.array([1.0, -2.0])}, {"seen": 0}

  def loss(params, method_state, batch, *, key, step, axis_name):
    del key, step, axis_name
    x = jnp.mean(batch["views"][0])
    value = jnp.sum((params["unit"] - x) ** 2) + jnp.sum((params["frozen"] - x) ** 2)
    return value, ({}, {"seen": method_state["seen"] + 1})

  def post_update(params, method_state, *, step):
    del step
    unit = params["unit"] / jnp.linalg.norm(params["unit"])
    return {**params, "unit": unit}, method_state

  def update_mask(params, step):
    del params
    return {"unit": jnp.bool_(True), "frozen": step >= freeze_steps}

  return method_from_loss("toy", nn.Dense(1), init, loss, post_update=post_update,
                          update_mask=update_mask)


def test_update_mask_freezes_leaves_and_post_update_may_change_params():
  import optax
  method = _toy_method(freeze_steps=2)
  tx = optax.chain(optax.add_decayed_weights(0.1), optax.sgd(0.1, momentum=0.9))
  policy = lambda keys, images: (images.astype(jnp.float32),) * 2
  state = init_train_state(method, tx, policy, (2, 2, 1), seed=0)
  step = jax.jit(make_per_device_step(method, tx, policy, optax.constant_schedule(0.1),
                                      axis_name=None))
  images = jnp.ones((4, 2, 2, 1), jnp.uint8)
  index = label = jnp.zeros((4,), jnp.int32)
  frozen0 = np.asarray(state.params["frozen"])
  for expected_step in (1, 2):
    state, _ = step(state, images, index, label)
    # Neither the gradient nor the weight decay moved the frozen leaf or its momentum.
    np.testing.assert_array_equal(state.params["frozen"], frozen0)
    np.testing.assert_allclose(np.linalg.norm(state.params["unit"]), 1.0, rtol=1e-6)
    assert int(state.step) == expected_step and int(state.method_state["seen"]) == expected_step
  state, _ = step(state, images, index, label)
  # Unfrozen at step 2: SGD from a momentum buffer still at zero, grad = 2 (p - 1) + 0.1 p.
  expected = frozen0 - 0.1 * (2 * (frozen0 - 1.0) + 0.1 * frozen0)
  np.testing.assert_allclose(state.params["frozen"], expected, rtol=1e-6)


def test_update_mask_restarts_adam_bias_correction_when_a_leaf_unfreezes():
  import ml_collections
  import optax
  from ssljax.train.optim import build_optimizer
  method = _toy_method(freeze_steps=3)
  optim = ml_collections.ConfigDict({"name": "adam", "lr": 0.1, "b1": 0.9, "b2": 0.999,
                                     "eps": 1e-8, "weight_decay": 0.0, "grad_clip_norm": 0.0,
                                     "grad_clip_value": 0.0,
                                     "lars_exclude_bias_and_norm": True})
  tx = build_optimizer(optim, optax.constant_schedule(0.01))
  policy = lambda keys, images: (images.astype(jnp.float32),) * 2
  state = init_train_state(method, tx, policy, (2, 2, 1), seed=0)
  step = jax.jit(make_per_device_step(method, tx, policy, optax.constant_schedule(0.01),
                                      axis_name=None))
  images = jnp.ones((4, 2, 2, 1), jnp.uint8)
  index = label = jnp.zeros((4,), jnp.int32)
  for _ in range(4):
    frozen_before = np.asarray(state.params["frozen"])
    state, _ = step(state, images, index, label)
  # Adam's first step is lr * g / (|g| + eps): exactly lr per coordinate, as at step 1 of a
  # fresh PyTorch Adam. A shared step count (4 here) would give 0.58 lr instead.
  np.testing.assert_allclose(frozen_before - state.params["frozen"],
                             0.01 * np.sign(frozen_before - 1.0), rtol=1e-5)


def test_common_state_helpers():
  from ssljax.methods import common
  target = {"w": jnp.array([1.0, 2.0])}
  online = {"w": jnp.array([3.0, 6.0])}
  np.testing.assert_allclose(common.ema_update(target, online, 0.75)["w"], [1.5, 3.0])
  moms = [float(common.cosine_ema_momentum(jnp.int32(s), 10, 0.99)) for s in (0, 5, 10, 20)]
  np.testing.assert_allclose(moms, [0.99, 0.995, 1.0, 1.0], rtol=1e-6)
  queue = jnp.zeros((6, 2))
  queue, ptr = common.fifo_enqueue(queue, jnp.int32(0), jnp.ones((3, 2)))
  queue, ptr = common.fifo_enqueue(queue, ptr, 2 * jnp.ones((3, 2)))
  queue, ptr = common.fifo_enqueue(queue, ptr, 3 * jnp.ones((3, 2)))
  np.testing.assert_array_equal(queue[:, 0], [3, 3, 3, 2, 2, 2])
  assert int(ptr) == 3
  with pytest.raises(ValueError, match="queue length 6 is not a multiple .* \\(4\\)"):
    common.fifo_enqueue(queue, ptr, jnp.ones((4, 2)))
  with pytest.raises(ValueError, match=r"moco: method.moco.queue_size = 1000 must be a positive "
                     r"multiple of the global batch \(train.batch_size = 256\).*"
                     r"--config.method.moco.queue_size=768"):
    common.check_queue_length("moco", 1000, 256, "method.moco.queue_size")
  common.check_queue_length("moco", 1024, 256, "method.moco.queue_size")


# ----------------------------------------------------------------- a custom step body


def sharpness_aware(method, rho_per_lr: float):
  """`method` with its own step body: sharpness-aware minimisation (Foret et al. 2021).

  An example of ``Method.update``: the body takes a first gradient g at theta, moves to the
  neighbour theta + rho g / ||g|| (rho = rho_per_lr x the step's learning rate, read from the
  schedule), takes the gradient there, and updates theta with it (one masked optimiser update,
  then post_update). Both gradients are averaged over the data axis before use, as every body
  must; the BN statistics of the second pass are kept.
  """
  import dataclasses
  import optax

  def update(state, batch, *, key, axis_name, tx, schedule):
    loss_grad = jax.value_and_grad(method.loss, has_aux=True)
    _, g = loss_grad(state.params, state.method_state, batch, key=key, step=state.step,
                     axis_name=axis_name)
    g = mean_over(g, axis_name)
    rho = rho_per_lr * schedule(state.step)
    scale = rho / (optax.tree.norm(g) + 1e-12)
    neighbour = jax.tree.map(lambda p, x: p + scale * x, state.params, g)
    (loss, (metrics, method_state)), grads = loss_grad(
        neighbour, state.method_state, batch, key=key, step=state.step, axis_name=axis_name)
    grads = mean_over(grads, axis_name)
    method_state = average_batch_stats(method_state, axis_name)
    params, opt_state, grads = masked_update(method, tx, grads, state.opt_state,
                                             state.params, state.step)
    params, method_state = method.post_update(params, method_state, step=state.step)
    return UpdateOutput(params, opt_state, method_state, loss, grads, {**metrics, "rho": rho})

  return dataclasses.replace(method, update=update)


def test_a_custom_body_runs_in_the_step_and_keeps_guard_and_metrics():
  import optax
  method = sharpness_aware(_toy_method(freeze_steps=0), rho_per_lr=2.0)
  tx = optax.sgd(0.1)
  policy = lambda keys, images: (images.astype(jnp.float32),) * 2
  state = init_train_state(method, tx, policy, (2, 2, 1), seed=0)
  step = jax.jit(make_per_device_step(method, tx, policy, optax.constant_schedule(0.1),
                                      axis_name=None))
  images = jnp.ones((4, 2, 2, 1), jnp.uint8)
  index = label = jnp.zeros((4,), jnp.int32)
  p0 = {k: np.asarray(v, np.float64) for k, v in state.params.items()}
  new, metrics = step(state, images, index, label)
  # loss = sum (p - 1)^2 over both leaves: g = 2 (p - 1); the step uses the gradient at
  # p + rho g / ||g|| with rho = 2.0 x 0.1, then SGD at 0.1 and the unit renormalisation.
  g = {k: 2 * (v - 1.0) for k, v in p0.items()}
  norm = np.sqrt(sum(np.sum(v ** 2) for v in g.values()))
  moved = {k: p0[k] - 0.1 * 2 * (p0[k] + 0.2 * g[k] / norm - 1.0) for k in p0}
  np.testing.assert_allclose(new.params["frozen"], moved["frozen"], rtol=1e-6)
  np.testing.assert_allclose(new.params["unit"], moved["unit"] / np.linalg.norm(moved["unit"]),
                             rtol=1e-6)
  np.testing.assert_allclose(metrics["train/rho"], 0.2, rtol=1e-6)
  assert int(new.step) == 1 and int(new.method_state["seen"]) == 1
  # The non-finite guard applies to the custom body too.
  poisoned = state.replace(params={**state.params, "frozen": jnp.array([jnp.nan, 0.0])})
  frozen, _ = step(poisoned, images, index, label)
  assert int(frozen.nonfinite_step) == 0 and int(frozen.step) == 0
  np.testing.assert_array_equal(frozen.params["unit"], state.params["unit"])


def test_custom_body_eight_devices_equal_one_device_under_shard_map_and_pmap(tiny, num_devices):
  config, mesh8 = tiny[0], tiny[1]
  wrap = lambda method: sharpness_aware(method, rho_per_lr=0.5)
  _, init8, per_device8, batch = _setup(config, jax.devices(), wrap=wrap)
  mesh1, init1, per_device1, _ = _setup(config, jax.devices()[:1], wrap=wrap)
  step8 = compile_train_step(per_device8, mesh8)  # compiled once, run for 2 steps and 1
  state8, metrics8 = _run(step8, init8(), batch, mesh8)
  state1, metrics1 = _run(compile_train_step(per_device1, mesh1), init1(), batch, mesh1)
  np.testing.assert_allclose(metrics8["train/loss"], metrics1["train/loss"], rtol=1e-4)
  np.testing.assert_allclose(metrics8["train/grad_norm"], metrics1["train/grad_norm"],
                             rtol=1e-4)
  _assert_trees_close(state8.params, state1.params, rtol=1e-3, atol=1e-5)
  _assert_trees_close(state8.method_state, state1.method_state, rtol=1e-3, atol=1e-5)
  reshape = lambda x: np.asarray(x).reshape(num_devices, -1, *np.shape(x)[1:])
  p_state, p_metrics = pmap_train_step(per_device8)(
      init8(), reshape(batch["image"]), reshape(batch["index"]), reshape(batch["label"]))
  one_step, one_metrics = _run(step8, init8(), batch, mesh8, steps=1)
  _assert_trees_close(jax.tree.map(lambda x: x[0], p_state), one_step)
  np.testing.assert_allclose(p_metrics["train/loss"][0], one_metrics["train/loss"], rtol=1e-5)


def test_the_step_refuses_shard_map_with_varying_types(tiny):
  from jax.sharding import PartitionSpec as P
  _, mesh, init, per_device, _, batch = tiny
  strict = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(DATA_AXIS),
                                                                  P(DATA_AXIS), P(DATA_AXIS)),
                                 out_specs=(P(), P()), check_vma=True))
  with pytest.raises(ValueError, match=r"shard_map\(check_vma=False\) or pmap"):
    _run(strict, init(), batch, mesh, steps=1)


def test_frozen_leaves_keep_their_state_inside_a_parameter_group():
  import optax
  from ssljax.methods.base import ParamGroup
  from ssljax.config import default_config
  from ssljax.train.optim import build_optimizer
  method = _toy_method(freeze_steps=2)
  optim = default_config().optim
  optim.name, optim.momentum, optim.weight_decay = "sgd", 0.9, 0.1
  tx = build_optimizer(optim, optax.constant_schedule(0.1),
                       {"frozen": ParamGroup(optimizer="sgd", weight_decay=0.0)})
  policy = lambda keys, images: (images.astype(jnp.float32),) * 2
  state = init_train_state(method, tx, policy, (2, 2, 1), seed=0)
  step = jax.jit(make_per_device_step(method, tx, policy, optax.constant_schedule(0.1),
                                      axis_name=None))
  images = jnp.ones((4, 2, 2, 1), jnp.uint8)
  index = label = jnp.zeros((4,), jnp.int32)
  frozen0 = np.asarray(state.params["frozen"])
  for _ in range(2):
    state, _ = step(state, images, index, label)
    np.testing.assert_array_equal(state.params["frozen"], frozen0)
  state, _ = step(state, images, index, label)
  # Unfrozen at step 2 in its own group (no decay): the momentum buffer is still zero.
  np.testing.assert_allclose(state.params["frozen"], frozen0 - 0.1 * 2 * (frozen0 - 1.0),
                             rtol=1e-6)
