"""Add-ons wrap a base method's stages (DESIGN principle 5): one worked example per capability.

* `with_learned_loss_scale`: parameters of its own (``params['loss_scale']``) in their own
  parameter group, and a wrapped objective value (uncertainty weighting, Kendall et al. 2018);
* `with_feature_mask`: transforms the backbone features before the heads (MetaMask's shape);
* `with_aux_head`: forks a head of its own from the features and adds a loss on it (CLD's
  shape);
* `with_view_index_weights`: weights the per-(view, image) terms (UOTA's shape), and is
  refused by a method whose objective does not decompose;
* registered add-ons compose from ``config.method.addons``.

A custom step body (``Method.update``) is shown in ``tests/train/test_step.py``.
"""

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from ssljax.losses import multiview_nt_xent_terms, nt_xent
from ssljax.methods import base, build_method
from ssljax.methods.addons import add_params_entry, weight_terms
from ssljax.methods.base import Objective, Outputs, ParamGroup, RunInfo
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, make_per_device_step
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_BATCH = 16
_METHODS = ("simclr", "barlow_twins")
_RUN = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=64)


# ------------------------------------------------------------------- the example add-ons


def with_learned_loss_scale(method: base.Method) -> base.Method:
  """Weights `method`'s loss by a learned ``exp(-s)`` and adds ``s`` (uncertainty weighting).

  ``d loss' / d s = 1 - exp(-s) * loss``, so ``s`` settles where ``exp(s)`` equals the loss.
  Affine in the base loss, so the per-device convention holds. ``s`` trains with plain SGD
  and no weight decay, whatever the base optimiser (its own parameter group).
  """
  wrapped = add_params_entry(
      method, "loss_scale", init=lambda key, views: {"log_variance": jnp.zeros((), jnp.float32)},
      group=ParamGroup(optimizer="sgd", weight_decay=0.0, momentum=0.0))

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    out = wrapped_objective(params, method_state, outputs, batch, key=key, step=step,
                            axis_name=axis_name)
    s = params["loss_scale"]["log_variance"]
    metrics = {**out.metrics, "base_loss": out.value, "loss_weight": jnp.exp(-s)}
    return Objective(jnp.exp(-s) * out.value + s, None, metrics, out.method_state)

  wrapped_objective = wrapped.objective
  return dataclasses.replace(wrapped, objective=objective, decomposes=False)


def with_feature_mask(method: base.Method, num_features: int) -> base.Method:
  """Multiplies the backbone features by ``sigmoid(params['feature_mask']['logits'])``."""
  wrapped = add_params_entry(
      method, "feature_mask",
      init=lambda key, views: {"logits": jnp.zeros((num_features,), jnp.float32)})

  def features(params, method_state, views, *, train):
    h, method_state = wrapped.features(params, method_state, views, train=train)
    mask = jax.nn.sigmoid(params["feature_mask"]["logits"])
    return tuple(x * mask for x in h), method_state

  return dataclasses.replace(wrapped, features=features)


def with_aux_head(method: base.Method, *, weight: float, dim: int = 4) -> base.Method:
  """Adds a linear head on the features and ``weight * nt_xent`` on its outputs."""
  head = nn.Dense(dim)

  def init(key, views):
    params, state = jax.eval_shape(method.init, key, views)
    features, _ = jax.eval_shape(
        lambda p, s: method.features(p, s, views[:1], train=False), params, state)
    return head.init(key, jnp.zeros((1, features[0].shape[1])))["params"]

  wrapped = add_params_entry(method, "aux_head", init=init)

  def embed(params, method_state, features, views, *, step):
    embeddings, method_state = wrapped.embed(params, method_state, features, views, step=step)
    aux = tuple(head.apply({"params": params["aux_head"]}, h) for h in features)
    return {**embeddings, "aux": aux}, method_state

  def objective(params, method_state, outputs, batch, *, key, step, axis_name):
    out = wrapped.objective(params, method_state, outputs, batch, key=key, step=step,
                            axis_name=axis_name)
    aux_loss, _ = nt_xent(*outputs.embeddings["aux"][:2], temperature=0.5,
                          axis_name=axis_name)
    return out._replace(value=out.value + weight * aux_loss, terms=None,
                        metrics={**out.metrics, "aux_loss": aux_loss})

  return dataclasses.replace(wrapped, embed=embed, objective=objective, decomposes=False)


def with_view_index_weights(method: base.Method) -> base.Method:
  """Weights view v of every image by ``(v + 1) / mean_v (v + 1)``: mean 1 over the terms."""

  def weights(params, method_state, outputs, batch, *, step, axis_name):
    del params, method_state, outputs, step, axis_name
    num_views, n = len(batch["views"]), batch["views"][0].shape[0]
    w = jnp.arange(1, num_views + 1, dtype=jnp.float32)[:, None] * jnp.ones((1, n))
    return w / jnp.mean(w), {"max_weight": jnp.max(w / jnp.mean(w))}

  return weight_terms(method, weights, addon="view_index_weights")


# ------------------------------------------------------------------- helpers


def _config(directory, name: str, addons=()):
  config = tiny_config(directory, method=name, addons=addons)
  if name == "barlow_twins":
    config.method.barlow_twins.proj_hidden_dim = 16
    config.method.barlow_twins.proj_dim = 8
  config.optim.schedule = "constant"  # a learning rate above zero at step 0
  return config


def _views(size: int = 16, num_views: int = 2):
  rng = np.random.default_rng(0)
  return tuple(jnp.asarray(rng.uniform(size=(_BATCH, size, size, 1)), jnp.float32)
               for _ in range(num_views))


def _batch_of(views):
  return {"views": views, "index": jnp.arange(_BATCH, dtype=jnp.int32),
          "label": jnp.full((_BATCH,), -1, jnp.int32)}


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-7):
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=rtol, atol=atol), a, b)


@pytest.fixture(scope="module")
def simclr(tmp_path_factory):
  """A tiny SimCLR, its parameters and state (numpy kernels: fast to initialise)."""
  method = build_method(_config(str(tmp_path_factory.mktemp("simclr")), "simclr"), run=_RUN)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())
  return method, params, state


def _loss(method, params, state, views):
  return jax.jit(lambda p, s: method.loss(p, s, _batch_of(views), key=_KEY, step=jnp.int32(0),
                                          axis_name=None))(params, state)


# ------------------------------------------------------------------- parameters and groups


@pytest.mark.parametrize("name", _METHODS)
def test_init_adds_the_entry_and_keeps_the_base_state(name, tmp_path):
  method = build_method(_config(str(tmp_path), name), run=_RUN)
  wrapped = with_learned_loss_scale(method)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())
  w_params, w_state = init_with_numpy_kernels(wrapped.init, _KEY, _views())
  assert set(w_params) == set(params) | {"loss_scale"}
  assert wrapped.name == f"{name}+loss_scale"
  assert wrapped.param_groups == {"loss_scale": ParamGroup(optimizer="sgd", weight_decay=0.0,
                                                           momentum=0.0)}
  np.testing.assert_array_equal(w_params["loss_scale"]["log_variance"], 0.0)
  _assert_trees_close({k: v for k, v in w_params.items() if k != "loss_scale"}, params,
                      rtol=0, atol=0)
  _assert_trees_close(w_state, state, rtol=0, atol=0)
  variables = wrapped.eval_variables(w_params, w_state)
  assert variables["params"] is w_params["encoder"]
  clash = add_params_entry(method, "encoder", init=lambda key, views: {})
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

  return base.method_from_loss(
      "toy", nn.Dense(1), post_update=post_update, update_mask=update_mask,
      init=lambda key, views: ({"unit": jnp.array([3.0, 4.0]), "frozen": jnp.ones(2)}, {}),
      loss=lambda params, method_state, batch, **kwargs: (jnp.sum(params["unit"]), ({}, {})))


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
  simclr = build_method(_config(str(tmp_path), "simclr"), run=_RUN)
  assert with_learned_loss_scale(simclr).update_mask is None


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

  One step of ssljax.train.step with the config's LARS optimiser (momentum 0.9, weight decay)
  at a constant rate; with the add-on, the optimiser is built with its parameter group.
  """
  cache = {}

  def get(name: str, wrapped: bool):
    if (name, wrapped) not in cache:
      config = _config(str(tmp_path_factory.mktemp(name)), name)
      config.optim.weight_decay = 1e-2
      method = build_method(config, run=_RUN)
      params, method_state = init_with_numpy_kernels(method.init, _KEY, _views())
      schedule = build_schedule(config.optim, global_batch=_BATCH, total_steps=10,
                                steps_per_epoch=4)
      method = with_learned_loss_scale(method) if wrapped else method
      tx = build_optimizer(config.optim, schedule, method.param_groups)
      if wrapped:
        params = {**params, "loss_scale": {"log_variance": jnp.float32(0.0)}}
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
def test_train_step_trains_the_entry_in_its_group_with_the_analytic_gradient(steps, name):
  # loss' = exp(-s) * loss + s: the entry moves by -lr * (1 - exp(-s) * loss), by plain SGD
  # (no LARS trust ratio, no weight decay) since it is its own parameter group.
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
  # in the base method's own step (same views, same base loss, same LARS for them).
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


# ------------------------------------------------------------------- features


def test_a_feature_transform_reaches_the_heads_in_training_and_inference(simclr):
  method, params, state = simclr
  features, feature_state = method.features(params, state, _views(), train=True)
  masked = with_feature_mask(method, features[0].shape[1])
  logits = jnp.linspace(-2.0, 2.0, features[0].shape[1])
  m_params = {**params, "feature_mask": {"logits": logits}}
  value, (_, new_state) = _loss(masked, m_params, state, _views())
  # By hand: the base stages with the features scaled by sigmoid(logits).
  scaled = tuple(h * jax.nn.sigmoid(logits) for h in features)
  embeddings, by_hand_state = method.embed(params, feature_state, scaled, _views(),
                                            step=jnp.int32(0))
  expected = method.objective(params, by_hand_state, Outputs(scaled, embeddings),
                              _batch_of(_views()), key=_KEY, step=jnp.int32(0),
                              axis_name=None)
  np.testing.assert_allclose(value, expected.value, rtol=1e-5)
  _assert_trees_close(new_state, expected.method_state, rtol=1e-5, atol=1e-6)
  # Inference mode: the mask applies and the BN statistics do not move.
  inference, same_state = masked.features(m_params, state, _views()[:1], train=False)
  plain, _ = method.features(params, state, _views()[:1], train=False)
  np.testing.assert_allclose(inference[0], plain[0] * jax.nn.sigmoid(logits), rtol=1e-6)
  assert same_state is state
  # The mask's gradient is the loss's sensitivity to it (finite difference, one coordinate).
  grad = jax.grad(lambda p: _loss(masked, p, state, _views())[0])(m_params)
  eps = 1e-2
  bump = lambda d: {**m_params, "feature_mask": {"logits": logits.at[3].add(d)}}
  numeric = (_loss(masked, bump(eps), state, _views())[0] -
             _loss(masked, bump(-eps), state, _views())[0]) / (2 * eps)
  np.testing.assert_allclose(grad["feature_mask"]["logits"][3], numeric, rtol=2e-2, atol=1e-4)


def test_a_forked_head_adds_its_loss_on_the_features(simclr):
  method, params, state = simclr
  forked = with_aux_head(method, weight=0.3)
  f_params, _ = init_with_numpy_kernels(forked.init, _KEY, _views())
  f_params = {**params, "aux_head": f_params["aux_head"]}
  value, (metrics, _) = _loss(forked, f_params, state, _views())
  base_value, _ = _loss(method, params, state, _views())
  features, _ = method.features(params, state, _views(), train=True)
  aux = [nn.Dense(4).apply({"params": f_params["aux_head"]}, h) for h in features]
  aux_loss, _ = nt_xent(*aux, temperature=0.5)
  np.testing.assert_allclose(metrics["aux_loss"], aux_loss, rtol=1e-5)
  np.testing.assert_allclose(value, base_value + 0.3 * aux_loss, rtol=1e-5)
  # The branch trains the encoder too: its gradient differs from the base method's.
  grad = jax.grad(lambda p: _loss(forked, p, state, _views())[0])(f_params)
  base_grad = jax.grad(lambda p: _loss(method, p, state, _views())[0])(params)
  assert float(jnp.abs(grad["aux_head"]["kernel"]).max()) > 0
  diff = jax.tree.map(lambda a, b: float(jnp.abs(a - b).max()), grad["encoder"],
                      base_grad["encoder"])
  assert max(jax.tree.leaves(diff)) > 1e-6
  _assert_trees_close(grad["projector"], base_grad["projector"], rtol=1e-4, atol=1e-7)


# ------------------------------------------------------------------- per-(view, image) terms


@pytest.mark.parametrize("num_views", [2, 3])
def test_weighting_the_terms_weights_each_view_as_an_anchor(simclr, num_views):
  method, params, state = simclr
  views = _views(num_views=num_views)
  weighted = with_view_index_weights(method)
  assert weighted.name == "simclr+view_index_weights"
  value, (metrics, _) = _loss(weighted, params, state, views)
  base_value, _ = _loss(method, params, state, views)
  np.testing.assert_allclose(metrics["unweighted_loss"], base_value, rtol=1e-6)
  # By hand: the per-anchor NT-Xent losses of each view, weighted by (v + 1) / mean.
  outputs, _ = method.forward(params, state, _batch_of(views), step=jnp.int32(0))
  terms, _ = multiview_nt_xent_terms(outputs.embeddings["projection"], temperature=0.2)
  w = np.arange(1, num_views + 1) / np.mean(np.arange(1, num_views + 1))
  expected = sum(w[v] * float(jnp.mean(terms[v])) for v in range(num_views))
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(float(jnp.sum(jnp.mean(terms, axis=1))), base_value, rtol=1e-6)
  # The weights are constants: the gradient is the weighted sum of the terms' gradients.
  grad = jax.grad(lambda p: _loss(weighted, p, state, views)[0])(params)
  by_hand = jax.grad(lambda p: jnp.sum(jnp.asarray(w, jnp.float32) * jnp.mean(
      multiview_nt_xent_terms(method.forward(p, state, _batch_of(views), step=jnp.int32(0))[0]
                              .embeddings["projection"], temperature=0.2)[0], axis=1)))(params)
  _assert_trees_close(grad, by_hand, rtol=1e-4, atol=1e-5)


def test_weighting_refuses_objectives_that_do_not_decompose(tmp_path):
  barlow = build_method(_config(str(tmp_path), "barlow_twins"), run=_RUN)
  assert barlow.decomposes is False
  with pytest.raises(ValueError, match="add-on 'view_index_weights' weights per-\\(view, "
                                       "image\\) loss terms, but the objective of "
                                       "'barlow_twins' does not decompose"):
    with_view_index_weights(barlow)
  with pytest.raises(ValueError, match="the objective of 'toy' does not decompose"):
    with_view_index_weights(_toy_method(True))


# ------------------------------------------------------------------- composition from config


def _register_examples(monkeypatch):
  monkeypatch.setattr(base, "_ADDONS", dict(base._ADDONS))

  def section():
    s = ml_collections.ConfigDict()
    s.num_features = 32  # the tiny encoder's feature width
    return s

  base.register_addon("feature_mask", config=section)(
      lambda method, config, axis_name, run: with_feature_mask(
          method, config.method.feature_mask.num_features))
  base.register_addon("view_index_weights")(
      lambda method, config, axis_name, run: with_view_index_weights(method))


def test_add_ons_compose_from_the_config_in_order(monkeypatch, tmp_path):
  _register_examples(monkeypatch)
  config = _config(str(tmp_path), "simclr", addons=("feature_mask", "view_index_weights"))
  assert config.method.feature_mask.num_features == 32
  method = build_method(config, run=_RUN)
  assert method.name == "simclr+feature_mask+view_index_weights"
  params, state = jax.eval_shape(method.init, _KEY, _views())
  assert set(params) == {"encoder", "projector", "feature_mask"}
  assert params["feature_mask"]["logits"].shape == (32,)
  value = jax.eval_shape(lambda p, s: method.loss(p, s, _batch_of(_views()), key=_KEY,
                                                  step=jnp.int32(0), axis_name=None),
                         params, state)
  assert value[0].shape == ()
  (tmp_path / "bt").mkdir()
  bad = _config(str(tmp_path / "bt"), "barlow_twins", addons=("view_index_weights",))
  with pytest.raises(ValueError, match="objective of 'barlow_twins' does not decompose"):
    build_method(bad, run=_RUN)
  with config.unlocked():
    config.method.addons = ("no_such_addon",)
  with pytest.raises(ValueError, match="method.addons: unknown add-on 'no_such_addon'; "
                                       "registered add-ons:"):
    build_method(config, run=_RUN)
