"""The UOTA add-on on SwAV (multi-crop), SimCLR and BYOL: weights on the predicted side, the
switch-on, the learned view model in its own parameter group, 8 devices against 1, resume."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import swav, uota_view_weights
from ssljax.losses.uota import (precision_from_cholesky, uota_deviations, uota_gaussian_nll,
                                uota_precision_weights)
from ssljax.methods import build_method
from ssljax.methods.base import ParamGroup, RunInfo, reduce_terms
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_N = 16
_RUN = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=64)
_SIZES = {
    "swav": {"num_prototypes": 8, "queue_size": 0, "proj_hidden_dim": 16, "proj_dim": 8,
             "freeze_prototypes_epochs": 0.0},
    "simclr": {},
    "byol": {"proj_hidden_dim": 16, "proj_dim": 8, "pred_hidden_dim": 16},
    "barlow_twins": {"proj_hidden_dim": 16, "proj_dim": 8},
}


def _config(directory, name, mode="closed_form", axis_name=None):
  config = tiny_config(directory, method=name, addons=("uota",))
  for key, value in _SIZES[name].items():
    config.method[name][key] = value
  config.method.uota.mode = mode
  config.method.uota.temperature = 4.0  # sharp enough to see at d = 8
  config.method.uota.start_fraction = 0.5  # step 5 of _RUN's 10
  return config


def _views(num_small=2, seed=0):
  """Two global 16 px views, then `num_small` 8 px crops (multi-crop)."""
  rng = np.random.default_rng(seed)
  big = [jnp.asarray(rng.uniform(size=(_N, 16, 16, 1)), jnp.float32) for _ in range(2)]
  small = [jnp.asarray(rng.uniform(size=(_N, 8, 8, 1)), jnp.float32)
           for _ in range(num_small)]
  return tuple(big + small)


def _batch(views):
  return {"views": views, "index": jnp.arange(_N, dtype=jnp.int32),
          "label": jnp.zeros((_N,), jnp.int32)}


@functools.lru_cache(maxsize=None)
def _built(name, mode, directory):
  config = _config(directory, name, mode)
  method = build_method(config, run=_RUN)
  base = build_method(tiny_config(directory, method=name) if name == "simclr" else
                      _sized(directory, name), run=_RUN)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())
  return config, method, base, params, state


def _sized(directory, name):
  config = tiny_config(directory, method=name)
  for key, value in _SIZES[name].items():
    config.method[name][key] = value
  return config


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("uota"))
  return lambda name, mode="closed_form": _built(name, mode, directory)


def _weights_by_hand(method, params, state, views, hp, learned_entry=None):
  outputs, _ = method.forward(params, state, _batch(views), step=jnp.int32(0))
  z = jnp.stack(outputs.embeddings["projection"])
  if learned_entry is None:
    return outputs, uota_view_weights(z, temperature=hp.temperature)
  precision = precision_from_cholesky(learned_entry["log_diag"], learned_entry["lower"])
  z = z / jnp.linalg.norm(z, axis=-1, keepdims=True)
  return outputs, uota_precision_weights(uota_deviations(z), precision,
                                         temperature=hp.temperature)


def _loss(method, params, state, views, step):
  return method.loss(params, state, _batch(views), key=_KEY, step=jnp.int32(step),
                     axis_name=None)


def test_swav_weights_the_predicted_side_from_the_switch_on(built):
  config, method, base, params, state = built("swav")
  assert method.name == "swav+uota" and method.num_views == 2
  views = _views(num_small=4)
  before, (metrics_before, _) = _loss(method, params, state, views, step=4)
  base_value, _ = _loss(base, params, state, views, step=4)
  np.testing.assert_allclose(before, base_value, rtol=1e-6)  # plain SwAV before step 5
  assert float(metrics_before["uota_active"]) == 0.0
  after, (metrics, _) = _loss(method, params, state, views, step=5)
  assert float(metrics["uota_active"]) == 1.0
  # By hand: SwAV's loss with the closed-form weights on the predicted view (codes as the
  # base objective computes them: the same Sinkhorn, no queue).
  outputs, w = _weights_by_hand(base, params, state, views, config.method.uota)
  scores = outputs.embeddings["scores"]
  from ssljax.losses import sinkhorn
  codes = [sinkhorn(jax.lax.stop_gradient(scores[c]), epsilon=0.05, num_iters=3)
           for c in (0, 1)]
  expected, _ = swav(scores, codes, temperature=0.1, view_weights=w)
  np.testing.assert_allclose(after, expected, rtol=1e-5)
  assert not np.isclose(float(after), float(base_value), rtol=1e-4)
  np.testing.assert_allclose(metrics["uota_w_min"], jnp.min(w), rtol=1e-5)
  np.testing.assert_allclose(metrics["uota_w_max"], jnp.max(w), rtol=1e-5)
  np.testing.assert_allclose(metrics["uota_w_std"], jnp.std(w), rtol=1e-3)
  np.testing.assert_allclose(metrics["uota_w_global"], jnp.mean(w[:2]), rtol=1e-5)
  np.testing.assert_allclose(metrics["uota_w_local"], jnp.mean(w[2:]), rtol=1e-5)
  np.testing.assert_allclose(metrics["unweighted_loss"], base_value, rtol=1e-6)
  # The closed form's ridge: the official 1e-8 on this well-spread batch; raised when
  # method.uota.max_condition is below the batch's condition number (here ~2-30).
  assert float(metrics["uota_ridge"]) == np.float32(1e-8)
  strict = copy.deepcopy(config)  # the fixture's config is shared
  strict.method.uota.max_condition = 1.5
  raised_method = build_method(strict, run=_RUN)
  _, (raised, _) = _loss(raised_method, params, state, views, step=5)
  z = np.asarray(jnp.stack(outputs.embeddings["projection"]), np.float64)
  z = z / np.linalg.norm(z, axis=-1, keepdims=True)
  delta = (z - z[:2].mean(axis=0)).reshape(-1, z.shape[-1])
  np.testing.assert_allclose(raised["uota_ridge"],
                             1e-8 + np.trace(delta.T @ delta) / delta.shape[0] / 1.5, rtol=1e-4)


@pytest.mark.parametrize("name", ["simclr", pytest.param("byol", marks=pytest.mark.slow)])
def test_any_multi_view_loss_is_weighted_through_its_terms(built, name):  # byol: -m slow (time)
  config, method, base, params, state = built(name)
  views = _views(num_small=2)
  value, _ = _loss(method, params, state, views, step=7)
  outputs, w = _weights_by_hand(base, params, state, views, config.method.uota)
  terms = base.objective(params, state, outputs, _batch(views), key=_KEY, step=jnp.int32(7),
                         axis_name=None).terms()
  np.testing.assert_allclose(value, reduce_terms(terms, w), rtol=1e-5)
  # The weights are constants: the gradient is that of the weighted terms.
  grad = jax.grad(lambda p: _loss(method, p, state, views, step=7)[0])(params)
  by_hand = jax.grad(lambda p: reduce_terms(base.objective(
      p, state, base.forward(p, state, _batch(views), step=jnp.int32(7))[0], _batch(views),
      key=_KEY, step=jnp.int32(7), axis_name=None).terms(), w))(params)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6), grad,
               by_hand)


def test_barlow_twins_is_refused(tmp_path):
  config = _config(str(tmp_path), "barlow_twins")
  with pytest.raises(ValueError, match="add-on 'uota' weights per-\\(view, image\\) loss terms, "
                                       "but the objective of 'barlow_twins' does not "
                                       "decompose"):
    build_method(config, run=_RUN)


@pytest.mark.parametrize("key, value, message", [
    ("max_condition", 0.5, "method.uota.max_condition must be > 1 or None, got 0.5"),
    ("temperature", -1.0, "method.uota.temperature must be > 0, got -1.0"),
    ("mode", "online", "method.uota.mode must be one of"),
])
def test_invalid_settings_are_named(tmp_path, key, value, message):
  config = _config(str(tmp_path), "swav")
  config.method.uota[key] = value
  with pytest.raises(ValueError, match=message):
    build_method(config, run=_RUN)


def test_learned_mode_keeps_the_view_model_in_params_with_its_own_group(built):
  config, method, base, params, state = built("swav", "learned")
  hp = config.method.uota
  assert method.name == "swav+uota"
  # The group's peak rate is method.uota.learning_rate itself, whatever the run's rate.
  run_peak = config.optim.lr * config.train.batch_size / config.optim.base_batch_size
  assert method.param_groups == {"uota": ParamGroup(
      optimizer="adam", lr_scale=pytest.approx(hp.learning_rate / run_peak), weight_decay=0.0)}
  np.testing.assert_allclose(params["uota"]["log_diag"], -np.log(hp.init_scale) * np.ones(8))
  rng = np.random.default_rng(3)
  entry = {"log_diag": jnp.asarray(rng.normal(scale=0.2, size=8) + 1.0, jnp.float32),
           "lower": jnp.asarray(np.tril(rng.normal(scale=0.2, size=(8, 8)), -1), jnp.float32)}
  params = {**params, "uota": entry}
  views = _views(num_small=2)
  value, (metrics, _) = _loss(method, params, state, views, step=6)
  base_params = {k: v for k, v in params.items() if k != "uota"}
  outputs, w = _weights_by_hand(base, base_params, state, views, hp, learned_entry=entry)
  terms = base.objective(base_params, state, outputs, _batch(views), key=_KEY,
                         step=jnp.int32(6), axis_name=None).terms()
  z = jnp.stack(outputs.embeddings["projection"])
  nll = uota_gaussian_nll(entry["log_diag"], entry["lower"],
                          uota_deviations(z / jnp.linalg.norm(z, axis=-1, keepdims=True)),
                          ridge=hp.ridge)
  np.testing.assert_allclose(metrics["uota_nll"], nll, rtol=1e-5)
  np.testing.assert_allclose(value, reduce_terms(terms, w) + nll, rtol=1e-5)
  assert "uota_ridge" not in metrics  # the closed form's ridge; the learned mode has none
  # params['uota'] is trained by the likelihood alone (the weights are constants for the
  # loss they weight, or the SSL loss would teach the model to down-weight hard views): its
  # gradient is the NLL's, against finite differences of the NLL on these deviations.
  grad = jax.grad(lambda p: _loss(method, p, state, views, step=6)[0])(params)["uota"]
  delta = uota_deviations(z / jnp.linalg.norm(z, axis=-1, keepdims=True))
  eps = 1e-2
  for name, index in (("log_diag", (3,)), ("lower", (5, 2))):
    nll_at = lambda d: uota_gaussian_nll(
        **{**entry, name: entry[name].at[index].add(d)}, delta=delta, ridge=hp.ridge)
    numeric = (nll_at(eps) - nll_at(-eps)) / (2 * eps)
    np.testing.assert_allclose(grad[name][index], numeric, rtol=2e-2, atol=2e-4)
  assert float(jnp.abs(grad["log_diag"]).max()) > 0


@pytest.mark.parametrize("mode", ["closed_form", "learned"])
def test_eight_devices_equal_one_device(built, mode, num_devices):
  config, _, _, params, state = built("swav", mode)
  sharded_method = build_method(config, axis_name="data", run=_RUN)
  single = build_method(config, run=_RUN)
  views = _views(num_small=2, seed=4)

  def per_device(params, state, views):
    (value, (metrics, _)), grads = jax.value_and_grad(
        lambda p: sharded_method.loss(p, state, _batch(views), key=_KEY, step=jnp.int32(6),
                                      axis_name="data"), has_aux=True)(params)
    return (jax.lax.pmean(value, "data"), jax.lax.pmean(grads, "data"),
            jax.lax.pmean(metrics["uota_w_max"], "data"))

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data")),
                                  out_specs=(P(), P(), P()), check_vma=False))
  value, grads, w_max = sharded(params, state, views)
  (expected, (metrics, _)), expected_grads = jax.value_and_grad(
      lambda p: single.loss(p, state, _batch(views), key=_KEY, step=jnp.int32(6),
                            axis_name=None), has_aux=True)(params)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(w_max, metrics["uota_w_max"], rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=2e-3, atol=2e-5), grads,
               expected_grads)


def test_the_evaluation_report_plots_the_extreme_crops_with_their_weights(tmp_path):
  import types
  from ssljax import augment
  from ssljax.methods import base
  from ssljax.methods.uota import view_weights, weight_report
  config = _config(str(tmp_path), "swav")
  config.augment.policy = "multicrop"
  config.augment.num_small_crops = 2
  config.augment.small_crop_size = 8
  method = build_method(config, axis_name="data", run=_RUN)  # as the train loop builds it
  params, state = init_with_numpy_kernels(build_method(config, run=_RUN).init, _KEY, _views())
  assert [name for name, _ in base.addon_reports(config)] == ["uota"]
  images = np.random.default_rng(5).integers(0, 256, size=(_N, 16, 16, 1), dtype=np.uint8)
  train_state = types.SimpleNamespace(params=params, method_state=state)
  report = weight_report(method, config, train_state, images, str(tmp_path), step=7,
                         num_shown=3)
  assert report["uota/plot"] == str(tmp_path / "uota_weights_step7.png")
  assert (tmp_path / "uota_weights_step7.png").read_bytes()[:4] == b"\x89PNG"
  # The reported extremes are those of the weights of the same views, computed directly.
  views = augment.build_policy(config.augment)(
      jax.random.split(jax.random.PRNGKey(0), _N), jnp.asarray(images))
  outputs, _ = build_method(config, run=_RUN).forward(params, state, {"views": views},
                                                      step=jnp.int32(0))
  w = view_weights(config.method.uota, params, outputs)
  np.testing.assert_allclose(report["uota/w_min"], jnp.min(w), rtol=1e-4)
  np.testing.assert_allclose(report["uota/w_max"], jnp.max(w), rtol=1e-4)
  np.testing.assert_allclose(report["uota/w_local"], jnp.mean(w[2:]), rtol=1e-4)


def test_the_reproduction_configs_use_the_official_estimator_and_a_nan_names_the_guard(
    tmp_path):
  from ssljax.config import load_config
  from ssljax.train import loop

  hint = lambda config: build_method(config, run=RunInfo.nominal(config)).nonfinite_hint
  for setting in ("imagenet", "cifar10"):  # Sigma + 1e-8 I solved as it is (official)
    config = load_config(f"swav_uota:{setting}")
    assert config.method.uota.max_condition == float("inf"), setting
    assert "--config.method.uota.max_condition=1e5" in hint(config), setting
  fmnist = load_config("swav_uota:fashion_mnist")  # ssljax's guard, as measured
  assert fmnist.method.uota.max_condition == 1e5 and hint(fmnist) == ""
  learned = load_config("swav_uota:imagenet")
  learned.method.uota.mode = "learned"  # no Cholesky of a batch's second moment
  assert hint(learned) == ""
  assert hint(load_config("simclr:fashion_mnist")) == ""

  # A run that diverges with the official estimator on names the guard in its error.
  config = _config(str(tmp_path), "simclr")
  config.method.uota.max_condition = float("inf")
  config.optim.name = "sgd"
  config.optim.lr = 1e35
  config.optim.warmup_epochs = 0.0
  config.train.log_every_steps = 2
  config.eval.enabled = False
  with pytest.raises(loop.NonFiniteLossError,
                     match=r"non-finite at step \d+\..*compute_dtype=float32\. UOTA's official "
                           r"estimator is on.*max_condition=1e5 raises the ridge"):
    loop.train(config, str(tmp_path / "run"))
