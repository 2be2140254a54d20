"""NPID as a method record: state layout, the loss and the bank update by hand, two views,
NCE with its normalising constant, one train step on 8 devices vs 1, and bank-size errors."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import l2_normalize, npid_nce, npid_nce_log_z, npid_softmax
from ssljax.methods import RunInfo, build_method, registered_methods
from ssljax.methods.base import Outputs
from ssljax.methods.npid import build_npid, noise_indices, update_memory_bank
from ssljax.models import MLPHead
from ssljax.parallel import data_sharded, make_mesh, replicated
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, compile_train_step, make_per_device_step
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_SIZE = 8
_BATCH = 16
_N = 64  # training-set size = bank rows
_DIM = 8
_RUN = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=_N)


def _config(directory, **npid):
  config = tiny_config(str(directory), method="npid")
  config.method.npid.proj_dim = _DIM
  config.optim.warmup_epochs = 0.0  # the warm-up starts at lr 0: the first step would not move
  for key, value in npid.items():
    config.method.npid[key] = value
  return config


def _views(seed=0, count=1):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(_BATCH, _SIZE, _SIZE, 1))
  view = lambda: np.clip(images + 0.1 * rng.normal(size=images.shape), 0, 1)
  return tuple(jnp.asarray(view(), jnp.float32) for _ in range(count))


def _index(seed=0):
  return jnp.asarray(np.random.default_rng(seed).permutation(_N)[:_BATCH], jnp.int32)


def _objective(method, embeddings, state, index, *, key=_KEY, num_views=None):
  """The method's objective on given embeddings (no networks run): (value, metrics, state,
  terms). The objective reads neither params nor the views' pixels (only their count)."""
  num_views = num_views or len(embeddings)
  views = tuple(jnp.zeros((_BATCH, _SIZE, _SIZE, 1), jnp.float32) for _ in range(num_views))
  batch = {"views": views, "index": index, "label": jnp.full((_BATCH,), -1, jnp.int32)}
  out = method.objective({}, state, Outputs((), {"embedding": tuple(embeddings)}), batch,
                         key=key, step=jnp.int32(0), axis_name=None)
  return out.value, out.metrics, out.method_state, out.terms()


def _init(method, views):
  """Params and state with NumPy kernels and the real bank (the init's uniform draw)."""
  params, state = init_with_numpy_kernels(method.init, _KEY, views)
  bank = jax.jit(lambda key, views: method.init(key, views)[1]["bank"])(_KEY, views)
  return params, {**state, "bank": bank}


@pytest.fixture(scope="module")
def npid(tmp_path_factory):
  """The full-softmax default: config, method and (params, state)."""
  config = _config(tmp_path_factory.mktemp("npid"))
  method = build_method(config, run=_RUN)
  params, state = _init(method, _views())
  return config, method, params, state


def test_init_structure(npid, tmp_path):
  _, method, params, state = npid
  assert "npid" in registered_methods()
  assert method.name == "npid" and method.num_views == 1 and method.update_mask is None
  assert set(params) == {"encoder", "head"}
  assert jax.tree.map(lambda x: x.shape, params["head"]) == {
      "dense1": {"kernel": (32, _DIM), "bias": (_DIM,)}}
  assert set(state) == {"batch_stats", "bank"} and set(state["batch_stats"]) == {"encoder"}
  # Uniform in [-s, s], s = 1/sqrt(d/3), not normalised: squared row norms average d s^2/3 = 1.
  bank = np.asarray(state["bank"])
  bound = 1 / math.sqrt(_DIM / 3)
  assert bank.shape == (_N, _DIM) and np.abs(bank).max() <= bound
  assert np.abs(bank).max() > 0.9 * bound
  norms = np.linalg.norm(bank, axis=1)
  assert norms.std() > 0.05 and abs(np.mean(norms ** 2) - 1) < 0.2
  variables = method.eval_variables(params, state)
  assert variables["params"] is params["encoder"]

  nce = build_method(_config(tmp_path, nce_negatives=4), run=_RUN)
  shapes = jax.eval_shape(nce.init, _KEY, _views())[1]
  assert set(shapes) == {"batch_stats", "bank", "nce_log_z"} and shapes["nce_log_z"].shape == ()
  log_z = jax.jit(lambda key, views: nce.init(key, views)[1]["nce_log_z"])(_KEY, _views())
  assert np.isneginf(log_z)  # "not estimated yet"


def test_loss_and_bank_update_by_hand(npid):
  config, method, params, state = npid
  views, index = _views(seed=1), _index(1)
  batch = {"views": views, "index": index, "label": jnp.full((_BATCH,), -1, jnp.int32)}
  loss = jax.jit(lambda p, s: method.loss(p, s, batch, key=_KEY, step=jnp.int32(0),
                                          axis_name=None))
  value, (metrics, new_state) = loss(params, state)

  @jax.jit
  def by_hand(params, state):
    h, updates = method.encoder.apply(
        {"params": params["encoder"], "batch_stats": state["batch_stats"]["encoder"]},
        views[0], train=True, mutable=["batch_stats"])
    head = MLPHead(hidden_dim=_DIM, out_dim=_DIM, num_layers=1)
    v = l2_normalize(head.apply({"params": params["head"]}, h))
    return v, npid_softmax(v, state["bank"], index, temperature=0.1), updates["batch_stats"]

  v, (expected, expected_metrics), stats = by_hand(params, state)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for name in ("pos_sim", "neg_sim", "accuracy"):
    np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-5, atol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               new_state["batch_stats"]["encoder"], stats)

  # The batch's rows become norm(0.5 m + 0.5 v); every other row is left exactly as it was.
  old, new = np.asarray(state["bank"]), np.asarray(new_state["bank"])
  mixed = 0.5 * old[index] + 0.5 * np.asarray(v)
  np.testing.assert_allclose(new[index], mixed / np.linalg.norm(mixed, axis=1, keepdims=True),
                             rtol=1e-5, atol=1e-6)
  untouched = np.setdiff1d(np.arange(_N), np.asarray(index))
  np.testing.assert_array_equal(new[untouched], old[untouched])


def test_two_views_average_the_loss_and_write_each_view_in_turn(tmp_path):
  config = _config(tmp_path, num_views=2)
  method = build_method(config, run=_RUN)
  assert method.num_views == 2
  objective = jax.jit(functools.partial(_objective, build_npid(config, None, _RUN)))
  rng = np.random.default_rng(2)
  bank = jnp.asarray(rng.uniform(-0.6, 0.6, size=(_N, _DIM)), jnp.float32)
  v_a, v_b = (l2_normalize(jnp.asarray(rng.normal(size=(_BATCH, _DIM)), jnp.float32))
              for _ in range(2))
  index = _index(2)
  value, metrics, new_state, terms = objective((v_a, v_b), {"bank": bank}, index)
  both = [npid_softmax(v, bank, index, temperature=0.1) for v in (v_a, v_b)]
  np.testing.assert_allclose(value, (both[0][0] + both[1][0]) / 2, rtol=1e-6)
  # Terms: each view's rows against the bank before the step, halved.
  assert terms.shape == (2, _BATCH)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)
  for row, (loss, _) in zip(terms, both):
    np.testing.assert_allclose(jnp.mean(row), loss / 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["pos_sim"], (both[0][1]["pos_sim"]
                                                  + both[1][1]["pos_sim"]) / 2, rtol=1e-6)
  first = update_memory_bank(bank, index, v_a, momentum=0.5)
  np.testing.assert_allclose(new_state["bank"], update_memory_bank(first, index, v_b,
                                                                   momentum=0.5), rtol=1e-6)
  unit = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
  twice = unit(0.5 * unit(0.5 * np.asarray(bank)[index] + 0.5 * np.asarray(v_a))
               + 0.5 * np.asarray(v_b))
  np.testing.assert_allclose(new_state["bank"][index], twice, rtol=1e-5, atol=1e-6)


def test_nce_estimates_z_on_the_first_step_and_keeps_it(tmp_path):
  config = _config(tmp_path, nce_negatives=6, temperature=0.07)
  objective = jax.jit(functools.partial(_objective, build_npid(config, None, _RUN)))
  rng = np.random.default_rng(3)
  bank = l2_normalize(jnp.asarray(rng.normal(size=(_N, _DIM)), jnp.float32))
  v = l2_normalize(jnp.asarray(rng.normal(size=(_BATCH, _DIM)), jnp.float32))
  index = _index(3)
  state = {"bank": bank, "nce_log_z": jnp.float32(-jnp.inf)}
  value, metrics, new_state, terms = objective((v,), state, index)

  noise = noise_indices(jax.random.fold_in(_KEY, 0), _BATCH, 6, _N)
  assert noise.shape == (_BATCH, 6) and 0 <= int(noise.min()) and int(noise.max()) < _N
  log_z = npid_nce_log_z(v, bank, index, noise, temperature=0.07)
  np.testing.assert_allclose(new_state["nce_log_z"], log_z, rtol=1e-6)
  np.testing.assert_allclose(metrics["nce_log_z"], log_z, rtol=1e-6)
  expected = npid_nce(v, bank, index, noise, temperature=0.07, log_z=log_z)[0]
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  # Terms: the NCE rows with the estimated Z; sum_v mean_i terms is the value.
  assert terms.shape == (1, _BATCH)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)

  # Later steps use the stored Z, whatever the batch.
  stored = {**new_state, "nce_log_z": jnp.float32(5.0)}
  key = jax.random.key(9)
  value, _, later, terms = objective((v,), stored, index, key=key)
  assert float(later["nce_log_z"]) == 5.0
  noise = noise_indices(jax.random.fold_in(key, 0), _BATCH, 6, _N)
  expected = npid_nce(v, new_state["bank"], index, noise, temperature=0.07, log_z=5.0)[0]
  np.testing.assert_allclose(value, expected, rtol=1e-6)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)


def test_objective_terms_are_per_view_and_image_and_reduce_to_the_value(npid):
  # The default (one view, full softmax) on the method's own forward; a batch with a second
  # view that NPID does not use gets a zero row for it.
  _, method, params, state = npid
  index = _index(1)

  @jax.jit
  def run(params, state, views):
    batch = {"views": views, "index": index, "label": jnp.full((_BATCH,), -1, jnp.int32)}
    outputs, new_state = method.forward(params, state, batch, step=jnp.int32(0))
    out = method.objective(params, new_state, outputs, batch, key=_KEY, step=jnp.int32(0),
                           axis_name=None)
    return out.value, out.terms(), outputs.embeddings["embedding"]

  assert method.decomposes
  for views in (_views(seed=1), _views(seed=1, count=2)):
    value, terms, embeddings = run(params, state, views)
    assert len(embeddings) == 1
    assert terms.shape == (len(views), _BATCH)
    np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)
    expected = npid_softmax(embeddings[0], state["bank"], index, temperature=0.1)[0]
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    np.testing.assert_array_equal(terms[1:], 0.0)


def test_noise_and_bank_update_do_not_depend_on_the_device_count(num_devices):
  rng = np.random.default_rng(4)
  bank = jnp.asarray(rng.normal(size=(_N, _DIM)), jnp.float32)
  v = jnp.asarray(rng.normal(size=(_BATCH, _DIM)), jnp.float32)
  index = _index(4)

  def per_device(v, index):
    noise = noise_indices(_KEY, v.shape[0], 5, _N, axis_name="data")
    return noise, update_memory_bank(bank, index, v, momentum=0.5, axis_name="data")[None]

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P("data"),
                                  out_specs=P("data"), check_vma=False))
  noise, banks = sharded(v, index)
  np.testing.assert_array_equal(noise, noise_indices(_KEY, _BATCH, 5, _N))
  single = update_memory_bank(bank, index, v, momentum=0.5)
  assert banks.shape == (num_devices, _N, _DIM)
  for copy in banks:  # every device wrote the rows of the whole global batch
    np.testing.assert_allclose(copy, single, rtol=1e-6)


@pytest.mark.parametrize("changes, num_examples, message", [
    ({"bank_size": 100}, _N,
     r"npid: method.npid.bank_size = 100 but the training set has 64 images.*"
     r"--config.method.npid.bank_size=0 \(the dataset size\) or 64"),
    ({}, None, r"bank_size = 0 sizes the memory bank by the training set.*num_examples is None"),
    ({"bank_size": -1}, _N, "bank_size must be >= 0"),
    ({"nce_negatives": -2}, _N, "nce_negatives must be >= 0"),
    ({"bank_momentum": 1.0}, _N, r"bank_momentum must be in \[0, 1\)"),
    ({"num_views": 3}, _N, "num_views must be 1 or 2, got 3"),
])
def test_bad_configs(tmp_path, changes, num_examples, message):
  run = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=num_examples)
  with pytest.raises(ValueError, match=message):
    build_method(_config(tmp_path, **changes), run=run)


def test_explicit_bank_size_without_a_dataset(tmp_path):
  method = build_method(_config(tmp_path, bank_size=32))  # RunInfo.nominal: size unknown
  assert jax.eval_shape(method.init, _KEY, _views())[1]["bank"].shape == (32, _DIM)


def _policy(keys, images):
  """Deterministic views (the image and its mirror): quick to compile, same on any mesh."""
  del keys
  x = images.astype(jnp.float32) / 255.0
  return x, x[:, :, ::-1]


def _step_on(config, params, state, index, devices):
  """One compiled train step of `config` on a mesh of `devices` (state built by hand)."""
  mesh = make_mesh(devices)
  method = build_method(config, axis_name="data", run=_RUN)
  schedule = build_schedule(config.optim, global_batch=_BATCH, total_steps=10,
                            steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule)
  step = compile_train_step(make_per_device_step(method, tx, _policy, schedule), mesh)
  first = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                     method_state=state, rng=jax.random.PRNGKey(1),
                     nonfinite_step=jnp.int32(-1))
  first = jax.device_put(jax.tree.map(jnp.copy, first), replicated(mesh))  # it is donated
  images = np.random.default_rng(5).integers(0, 256, size=(_BATCH, _SIZE, _SIZE, 1),
                                             dtype=np.uint8)
  put = lambda x: jax.device_put(x, data_sharded(mesh))
  return step(first, put(images), put(np.asarray(index)), put(np.full((_BATCH,), -1, np.int32)))


def test_one_nce_step_on_8_devices_equals_1_device(tmp_path, num_devices):
  # NCE mode: noise drawn per global row, Z estimated over the global batch, the bank rows of
  # every device written on every device.
  config = _config(tmp_path, nce_negatives=8)
  method = build_method(config, run=_RUN)
  params, state = _init(method, _views())
  state = {**state, "nce_log_z": jnp.float32(-jnp.inf)}
  index = _index(5)
  new8, metrics8 = _step_on(config, params, state, index, jax.devices())
  assert int(new8.step) == 1 and int(new8.nonfinite_step) == -1
  bank = np.asarray(new8.method_state["bank"])
  untouched = np.setdiff1d(np.arange(_N), np.asarray(index))
  np.testing.assert_array_equal(bank[untouched], np.asarray(state["bank"])[untouched])
  np.testing.assert_allclose(np.linalg.norm(bank[index], axis=1), 1.0, rtol=1e-5)
  assert np.isfinite(new8.method_state["nce_log_z"])
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                                       new8.params, params))
  assert min(moved) > 0  # the optimiser step happened

  new1, metrics1 = _step_on(config, params, state, index, jax.devices()[:1])
  np.testing.assert_allclose(metrics8["train/loss"], metrics1["train/loss"], rtol=1e-4)
  np.testing.assert_allclose(metrics8["train/nce_log_z"], metrics1["train/nce_log_z"],
                             rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5),
               (new8.params, new8.method_state), (new1.params, new1.method_state))
