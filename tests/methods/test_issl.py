"""CISSL and DISSL as method records: heads and init, the loss of one concatenated forward by
hand, parallel head layers, bad configs, and compiled train steps (8 devices vs 1)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax import augment
from ssljax.losses import cissl, dissl
from ssljax.methods import RunInfo, build_method
from ssljax.models.heads import ISSLHead
from ssljax.parallel import data_sharded, make_mesh, replicated
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, compile_train_step, make_per_device_step
from tests.util import SMALL_METHOD_SIZES, init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_SIZE = 8
_RUN = RunInfo(steps_per_epoch=4, total_steps=20)


def _config(directory, name, **changes):
  config = tiny_config(str(directory), method=name)
  for key, value in {**SMALL_METHOD_SIZES[name], **changes}.items():
    config.method[name][key] = value
  config.augment.jitter_prob = 0.0  # crops and flips only: cheaper to compile
  config.optim.warmup_epochs = 0.0  # the first optimiser update is not zero
  return config


def _views(seed=0, batch=16):
  rng = np.random.default_rng(seed)
  images = rng.uniform(size=(batch, _SIZE, _SIZE, 1))
  view = lambda: np.clip(images + 0.1 * rng.normal(size=images.shape), 0, 1)
  return tuple(jnp.asarray(view(), jnp.float32) for _ in range(2))


def _batch(views):
  n = views[0].shape[0]
  return {"views": views, "index": jnp.arange(n, dtype=jnp.int32),
          "label": jnp.full((n,), -1, jnp.int32)}


@pytest.fixture(scope="module", params=["cissl", "dissl"])
def issl(request, tmp_path_factory):
  config = _config(tmp_path_factory.mktemp(request.param), request.param)
  method = build_method(config, run=_RUN)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())
  return request.param, config, method, params, state


def _heads(name, config):
  hp = config.method[name]
  if name == "cissl":
    return {"student": ISSLHead(hidden_dims=tuple(hp.student_hidden_dims), out_dim=hp.out_dim,
                                out_bn=True),
            "teacher": ISSLHead(hidden_dims=tuple(hp.teacher_hidden_dims), out_dim=hp.out_dim,
                                out_bn=True)}
  return {head: ISSLHead(hidden_dims=tuple(hp[f"{head}_hidden_dims"]), out_dim=hp.num_classes,
                         bottleneck_dim=hp.bottleneck_dim) for head in ("student", "teacher")}


def test_head_layouts_and_init(tmp_path):
  expected = {
      "cissl": {"student": {"out": (32, 8), "out_bn": (8,)},
                "teacher": {"dense1": (32, 16), "bn1": (16,), "out": (16, 8), "out_bn": (8,)}},
      "dissl": {"student": {"bottleneck": (32, 8), "bottleneck_bn": (8,), "out": (8, 12)},
                "teacher": {"dense1": (32, 16), "bn1": (16,), "bottleneck": (16, 8),
                            "bottleneck_bn": (8,), "out": (8, 12)}},
  }
  for name, heads in expected.items():
    method = build_method(_config(tmp_path, name), run=_RUN)
    params, state = jax.eval_shape(method.init, _KEY, _views())
    assert set(params) == {"encoder", "student", "teacher"}
    for head, layers in heads.items():
      shapes = {layer: (p["kernel"] if "kernel" in p else p["scale"]).shape
                for layer, p in params[head].items()}
      assert shapes == layers, (name, head)
      # No bias before a BN; the output layer has one.
      assert all(("bias" in p) == (layer == "out") for layer, p in params[head].items()
                 if "kernel" in p)
      assert set(state["batch_stats"][head]) == {k for k in layers if "bn" in k}
    # The _mlp variants: two hidden layers on both heads.
    mlp = build_method(_config(tmp_path, name, student_hidden_dims=(16, 16),
                               teacher_hidden_dims=(16, 16)), run=_RUN)
    mlp_params, _ = jax.eval_shape(mlp.init, _KEY, _views())
    for head in ("student", "teacher"):
      assert {"dense1", "bn1", "dense2", "bn2", "out"} <= set(mlp_params[head])

  # Init: Linear weights normal with std 0.02, biases 0, BN scale 1 and bias 0.
  head = ISSLHead(hidden_dims=(256,), out_dim=512, bottleneck_dim=128)
  variables = head.init(jax.random.key(1), jnp.zeros((2, 256)), train=False)
  p = variables["params"]
  for layer in ("dense1", "bottleneck", "out"):
    np.testing.assert_allclose(np.std(p[layer]["kernel"]), 0.02, rtol=0.05)
  np.testing.assert_array_equal(p["out"]["bias"], 0.0)
  np.testing.assert_array_equal(p["bn1"]["scale"], 1.0)
  np.testing.assert_array_equal(p["bottleneck_bn"]["bias"], 0.0)


def test_loss_is_the_objective_of_one_concatenated_forward(issl):
  name, config, method, params, state = issl
  view_a, view_b = _views(seed=1)
  value, (metrics, new_state) = jax.jit(
      lambda p, s: method.loss(p, s, _batch((view_a, view_b)), key=_KEY, step=jnp.int32(0),
                               axis_name=None))(params, state)

  @jax.jit
  def by_hand(params, state):
    stats = state["batch_stats"]
    h, enc = method.encoder.apply({"params": params["encoder"],
                                   "batch_stats": stats["encoder"]},
                                  jnp.concatenate([view_a, view_b]), train=True,
                                  mutable=["batch_stats"])
    outs, new_stats = {}, {"encoder": enc["batch_stats"]}
    for head, module in _heads(name, config).items():
      y, upd = module.apply({"params": params[head], "batch_stats": stats[head]}, h,
                            train=True, mutable=["batch_stats"])
      outs[head], new_stats[head] = jnp.split(y, 2), upd["batch_stats"]
    (s_a, s_b), (t_a, t_b) = outs["student"], outs["teacher"]
    if name == "cissl":
      loss = cissl(s_a, s_b, t_a, t_b, temperature=config.method.cissl.temperature)
    else:
      loss = dissl(t_a, t_b, s_a, s_b)
    return loss, new_stats

  (expected, expected_metrics), expected_stats = by_hand(params, state)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  assert set(metrics) == set(expected_metrics)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               new_state["batch_stats"], expected_stats)
  if name == "dissl":
    assert {"H_M", "H_M_given_Z", "KL_invariance"} <= set(metrics)


def test_head_layers_are_both_heads_on_the_features(issl):
  name, config, method, params, state = issl
  views = _views(seed=2)
  features, _ = jax.jit(functools.partial(method.features, train=False))(params, state, views)
  layers = method.head_layers(params, state, features)  # not jitted: the order is checked
  names = list(layers)
  assert names[0] == "encoder"
  assert names.index("student/output") < names.index("teacher/dense1")
  h = jnp.concatenate(features)
  for head, module in _heads(name, config).items():
    expected = module.apply({"params": params[head],
                             "batch_stats": state["batch_stats"][head]}, h, train=False)
    np.testing.assert_allclose(layers[f"{head}/output"], expected, rtol=1e-5, atol=1e-6)


def test_needs_exactly_two_views(issl):
  _, _, method, params, state = issl
  three = _views() + _views(seed=5)[:1]
  with pytest.raises(ValueError, match="exactly 2 views"):
    jax.eval_shape(lambda p, s: method.loss(p, s, _batch(three), key=_KEY, step=jnp.int32(0),
                                            axis_name=None), params, state)


@pytest.mark.parametrize("name, changes, message", [
    ("cissl", {"temperature": 0.0}, "method.cissl.temperature must be > 0"),
    ("cissl", {"teacher_hidden_dims": (0,)}, "teacher_hidden_dims must be positive"),
    ("dissl", {"teacher_temperature": -0.5}, "method.dissl.teacher_temperature must be > 0"),
    ("dissl", {"lambda_maximality": -1.0}, "lambda_maximality must be >= 0"),
    ("dissl", {"num_classes": 1}, r"num_classes \(C\) must be >= 2"),
])
def test_bad_configs(tmp_path, name, changes, message):
  with pytest.raises(ValueError, match=message):
    build_method(_config(tmp_path, name, **changes), run=_RUN)


def _step_on(config, devices):
  mesh = make_mesh(devices)
  method = build_method(config, axis_name="data", run=_RUN)
  policy = augment.build_policy(config.augment)
  schedule = build_schedule(config.optim, global_batch=16, total_steps=20, steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule)
  step = compile_train_step(make_per_device_step(method, tx, policy, schedule), mesh)

  def run(params, state, images):
    train_state = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                             method_state=state, rng=jax.random.PRNGKey(1),
                             nonfinite_step=jnp.int32(-1))
    train_state = jax.device_put(jax.tree.map(jnp.copy, train_state), replicated(mesh))
    put = lambda x: jax.device_put(x, data_sharded(mesh))
    n = images.shape[0]
    return step(train_state, put(images), put(np.arange(n, dtype=np.int32)),
                put(np.full((n,), -1, np.int32)))

  return run


def _images():
  return np.random.default_rng(3).integers(0, 256, size=(16, 16, 16, 1), dtype=np.uint8)


def test_one_optimiser_step_is_finite_and_trains_every_parameter(issl):
  # The recipe's optimiser: Adam with element-wise gradient clipping (optim.grad_clip_value).
  name, config, method, params, state = issl
  config = config.copy_and_resolve_references()
  config.optim.name, config.optim.lr, config.optim.grad_clip_value = "adam", 2e-3, 2.0
  schedule = build_schedule(config.optim, global_batch=16, total_steps=20, steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule)

  @jax.jit
  def step(params, state, opt_state):
    (value, (metrics, state)), grads = jax.value_and_grad(
        lambda p: method.loss(p, state, _batch(_views(seed=4)), key=_KEY, step=jnp.int32(0),
                              axis_name=None), has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return jax.tree.map(jnp.add, params, updates), value, metrics

  new, value, metrics = step(params, state, tx.init(params))
  assert np.isfinite(float(value))
  change = jax.tree.map(lambda a, b: float(np.abs(np.asarray(a) - np.asarray(b)).max()),
                        new, params)
  assert min(jax.tree.leaves(change)) > 0
  assert all(np.isfinite(float(v)) for v in metrics.values())
  if name == "dissl":
    assert {"H_M", "H_M_given_Z", "KL_invariance", "H_M_global"} <= set(metrics)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cissl", "dissl"])
def test_a_compiled_step_on_8_devices_equals_1_device(tmp_path, name, num_devices):
  # The whole train step (augmentation, synchronised BN, global-batch negatives for CISSL,
  # the global marginal for DISSL, clipping): 8 devices equal 1 on the same global batch.
  config = _config(tmp_path, name, **({"global_marginal": True} if name == "dissl" else {}))
  config.optim.grad_clip_value = 2.0
  method = build_method(config, run=_RUN)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())
  eight, metrics8 = _step_on(config, jax.devices())(params, state, _images())
  one, metrics1 = _step_on(config, jax.devices()[:1])(params, state, _images())
  assert int(eight.nonfinite_step) == -1
  np.testing.assert_allclose(metrics1["train/loss"], metrics8["train/loss"], rtol=1e-4)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5),
               (eight.params, eight.method_state), (one.params, one.method_state))
