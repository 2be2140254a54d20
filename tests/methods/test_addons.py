"""How an add-on wraps a base method (DESIGN principle 5), shown with a learned loss weight.

`with_learned_loss_scale` below is a small but complete add-on: uncertainty weighting
(Kendall et al. 2018), ``loss' = exp(-s) * loss + s`` with ``s`` a learned log-variance. It
keeps ``s`` as its own entry of the parameter pytree, ``params['loss_scale']``, which is how
UOTA's learned view-weight model and MetaMask's mask are carried too, so the optimiser trains
it in the same step and checkpoints save it. It is built with
`ssljax.methods.addons.add_params_entry` and registered under a name of its own; the tests run
it on SimCLR and Barlow Twins.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.methods import base, build_method, register, registered_methods
from ssljax.methods.addons import add_params_entry
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, make_per_device_step
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_BATCH = 16
_METHODS = ("simclr", "barlow_twins")


def with_learned_loss_scale(method: base.Method) -> base.Method:
  """Weights `method`'s loss by a learned ``exp(-s)`` and adds ``s`` (uncertainty weighting).

  ``d loss' / d s = 1 - exp(-s) * loss``, so ``s`` settles where ``exp(s)`` equals the loss.
  The transformation is affine in the base loss, so the per-device convention of the losses
  holds for it (see `ssljax.methods.addons`).
  """

  def init(key, views):
    del key, views
    return {"log_variance": jnp.zeros((), jnp.float32)}

  def loss(entry, params, method_state, batch, *, key, step, axis_name):
    value, (metrics, new_state) = method.loss(params, method_state, batch, key=key, step=step,
                                              axis_name=axis_name)
    weight = jnp.exp(-entry["log_variance"])
    metrics = {**metrics, "base_loss": value, "loss_weight": weight}
    return weight * value + entry["log_variance"], (metrics, new_state)

  return add_params_entry(method, "loss_scale", init=init, loss=loss)


def _config(directory, name: str):
  config = tiny_config(directory)
  config.method.name = name
  config.method.barlow_twins.proj_hidden_dim = 16
  config.method.barlow_twins.proj_dim = 8
  config.optim.schedule = "constant"  # a learning rate above zero at step 0
  return config


def _views(size: int = 16):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.uniform(size=(_BATCH, size, size, 1)), jnp.float32)
               for _ in range(2))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


def test_registered_under_a_name_of_its_own(monkeypatch, tmp_path):
  monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
  for name in _METHODS:
    register(f"{name}_loss_scale")(
        lambda config, axis_name, run, name=name: with_learned_loss_scale(
            base._REGISTRY[name](config, axis_name, run)))
  assert {"simclr_loss_scale", "barlow_twins_loss_scale"} <= set(registered_methods())
  method = build_method(_config(str(tmp_path), "barlow_twins_loss_scale"))
  assert method.name == "barlow_twins+loss_scale" and method.num_views == 2
  params, state = jax.eval_shape(method.init, _KEY, _views())
  assert set(params) == {"encoder", "projector", "loss_scale"}
  assert set(state) == {"batch_stats"}


@pytest.mark.parametrize("name", _METHODS)
def test_init_adds_the_entry_and_keeps_the_base_state(name, tmp_path):
  method = build_method(_config(str(tmp_path), name))
  wrapped = with_learned_loss_scale(method)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())
  w_params, w_state = init_with_numpy_kernels(wrapped.init, _KEY, _views())
  assert set(w_params) == set(params) | {"loss_scale"}
  np.testing.assert_array_equal(w_params["loss_scale"]["log_variance"], 0.0)
  _assert_trees_close({k: v for k, v in w_params.items() if k != "loss_scale"}, params,
                      rtol=0, atol=0)
  _assert_trees_close(w_state, state, rtol=0, atol=0)
  variables = wrapped.eval_variables(w_params, w_state)
  assert variables["params"] is w_params["encoder"]
  clash = add_params_entry(method, "encoder", init=lambda key, views: {},
                           loss=lambda *args, **kwargs: None)
  with pytest.raises(ValueError, match="add-on entry 'encoder' is already a key of the params "
                                       f"of '{name}'"):
    jax.eval_shape(clash.init, _KEY, _views())


def _toy_method(mask_is_dict: bool) -> base.Method:
  """A base whose post_update builds a fresh params dict and whose mask freezes `frozen`."""

  def post_update(params, method_state, *, step):
    del step
    return {"unit": params["unit"] / jnp.linalg.norm(params["unit"]),
            "frozen": params["frozen"]}, method_state

  def update_mask(params, step):
    del params
    return {"unit": True, "frozen": step >= 2} if mask_is_dict else step >= 2

  return base.Method(
      name="toy", encoder=nn.Dense(1), post_update=post_update, update_mask=update_mask,
      init=lambda key, views: ({"unit": jnp.array([3.0, 4.0]), "frozen": jnp.ones(2)}, {}),
      loss=lambda params, method_state, batch, **kwargs: (jnp.sum(params["unit"]), ({}, {})),
      eval_variables=lambda params, method_state: params)


@pytest.mark.parametrize("mask_is_dict", [True, False])
def test_post_update_mask_and_eval_variables_see_only_the_base_params(mask_is_dict, tmp_path):
  wrapped = with_learned_loss_scale(_toy_method(mask_is_dict))
  params, state = wrapped.init(_KEY, _views())
  params = {**params, "loss_scale": {"log_variance": jnp.float32(0.7)}}
  new_params, _ = wrapped.post_update(params, state, step=jnp.int32(0))
  np.testing.assert_allclose(new_params["unit"], [0.6, 0.8], rtol=1e-6)
  assert new_params["loss_scale"] is params["loss_scale"]  # kept, untouched
  mask = wrapped.update_mask(params, jnp.int32(1))
  expected = {"unit": True, "frozen": False} if mask_is_dict else {"unit": False,
                                                                   "frozen": False}
  assert jax.tree.map(bool, mask) == {**expected, "loss_scale": True}
  assert set(wrapped.eval_variables(params, state)) == {"unit", "frozen"}
  assert with_learned_loss_scale(build_method(_config(str(tmp_path), "simclr"))).update_mask is None


def _state(params, method_state, tx):
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    method_state=method_state, rng=jax.random.PRNGKey(1),
                    nonfinite_step=jnp.full((), -1, jnp.int32))


def _flip_policy(keys, images):
  """Two deterministic views (the image and its vertical flip): cheap to compile."""
  del keys
  x = images.astype(jnp.float32) / 255.0
  return x, x[:, ::-1]


@pytest.fixture(scope="module")
def steps(tmp_path_factory):
  """``get(name, wrapped) -> (step, params, method_state, tx, lr)``, each step jitted once.

  One step of ssljax.train.step with the config's LARS optimiser at a constant rate (the
  scalar entry gets neither the trust ratio nor weight decay: a plain first momentum-SGD
  step).
  """
  cache = {}

  def get(name: str, wrapped: bool):
    if (name, wrapped) not in cache:
      config = _config(str(tmp_path_factory.mktemp(name)), name)
      method = build_method(config)
      params, method_state = init_with_numpy_kernels(method.init, _KEY, _views())
      schedule = build_schedule(config.optim, global_batch=_BATCH, total_steps=10,
                                steps_per_epoch=4)
      tx = build_optimizer(config.optim, schedule)
      method = with_learned_loss_scale(method) if wrapped else method
      step = jax.jit(make_per_device_step(method, tx, _flip_policy, schedule, axis_name=None))
      cache[name, wrapped] = step, params, method_state, tx, float(schedule(0))
    return cache[name, wrapped]

  return get


def _batch():
  rng = np.random.default_rng(1)
  return (jnp.asarray(rng.integers(0, 256, size=(_BATCH, 16, 16, 1), dtype=np.uint8)),
          jnp.arange(_BATCH, dtype=jnp.int32), jnp.full((_BATCH,), -1, jnp.int32))


def _wrapped_step(steps, name, log_variance):
  step, params, method_state, tx, _ = steps(name, wrapped=True)
  params = {**params, "loss_scale": {"log_variance": jnp.float32(log_variance)}}
  return step(_state(params, method_state, tx), *_batch())


@pytest.mark.parametrize("name", _METHODS)
def test_train_step_trains_the_entry_with_the_analytic_gradient(steps, name):
  # loss' = exp(-s) * loss + s: the entry moves by -lr * (1 - exp(-s) * loss).
  s, lr = 0.3, steps(name, wrapped=True)[-1]
  new, metrics = _wrapped_step(steps, name, s)
  value = float(metrics["train/base_loss"])
  np.testing.assert_allclose(metrics["train/loss"], np.exp(-s) * value + s, rtol=1e-6)
  np.testing.assert_allclose(metrics["train/loss_weight"], np.exp(-s), rtol=1e-6)
  np.testing.assert_allclose(new.params["loss_scale"]["log_variance"],
                             s - lr * (1.0 - np.exp(-s) * value), rtol=1e-5)
  assert int(new.step) == 1 and int(new.nonfinite_step) == -1
  assert set(new.params) == {"encoder", "projector", "loss_scale"}


def test_base_params_and_state_move_as_without_the_add_on(steps):
  # s = 0 weighs the base loss by 1: the base parameters and BN statistics move exactly as
  # in the base method's own step, from the same views (same rng) and the same base loss.
  # (Barlow Twins only, to keep compiles few; SimCLR's state has the same structure.)
  step, params, method_state, tx, _ = steps("barlow_twins", wrapped=False)
  base_state, base_metrics = step(_state(params, method_state, tx), *_batch())
  new, metrics = _wrapped_step(steps, "barlow_twins", 0.0)
  np.testing.assert_allclose(metrics["train/base_loss"], base_metrics["train/loss"], rtol=1e-6)
  for name in ("on_diag_mean", "off_diag_mean_sq"):
    np.testing.assert_allclose(metrics[f"train/{name}"], base_metrics[f"train/{name}"],
                               rtol=1e-6)
  _assert_trees_close({k: v for k, v in new.params.items() if k != "loss_scale"},
                      base_state.params, rtol=1e-5, atol=1e-7)
  _assert_trees_close(new.method_state, base_state.method_state)
