"""SimCLR as a method record: registry, init, the loss by hand, eval weights, descent, devices."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import multiview_nt_xent, nt_xent
from ssljax.methods import base, build_method, register, registered_methods
from ssljax.models import MLPHead, ResNet
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_BATCH = 16
_SIZE = 8


def _views(seed: int = 0, batch: int = _BATCH):
  rng = np.random.default_rng(seed)
  base_images = rng.uniform(size=(batch, _SIZE, _SIZE, 1))
  view = lambda: np.clip(base_images + 0.1 * rng.normal(size=base_images.shape), 0, 1)
  return tuple(jnp.asarray(view(), jnp.float32) for _ in range(2))


def _batch(views):
  n = views[0].shape[0]
  return {"views": views, "index": jnp.arange(n, dtype=jnp.int32),
          "label": jnp.full((n,), -1, jnp.int32)}


@pytest.fixture(scope="module")
def simclr(tmp_path_factory):
  """The tiny config, its method, initial (params, method_state) and a jitted loss."""
  config = tiny_config(str(tmp_path_factory.mktemp("simclr")))
  method = build_method(config)
  params, state = init_with_numpy_kernels(method.init, _KEY, _views())

  @jax.jit
  def loss(params, state, views):
    return method.loss(params, state, _batch(views), key=_KEY, step=jnp.int32(0),
                       axis_name=None)

  return config, method, params, state, loss


def test_registry_names_simclr_and_rejects_unknown_names(tmp_path):
  assert "simclr" in registered_methods()
  assert registered_methods() == sorted(registered_methods())
  config = tiny_config(str(tmp_path))
  config.method.name = "simclrr"
  with pytest.raises(ValueError, match="simclrr") as error:
    build_method(config)
  assert str(registered_methods()) in str(error.value)


def test_registering_a_name_twice_raises_and_keeps_the_first(monkeypatch, tmp_path):
  monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
  with pytest.raises(ValueError, match="'simclr' is already registered"):
    register("simclr")(lambda config, axis_name, run: None)
  assert build_method(tiny_config(str(tmp_path))).name == "simclr"

  seen = []
  register("probe")(lambda config, axis_name, run: seen.append((axis_name, run)) or "built")
  config = tiny_config(str(tmp_path))
  config.method.name = "probe"
  run = base.RunInfo(steps_per_epoch=7, total_steps=70, num_examples=1792)
  assert build_method(config, axis_name="data", run=run) == "built"
  assert build_method(config) == "built"
  assert seen[0] == ("data", run)
  assert seen[1][1].num_examples is None and seen[1][1].steps_per_epoch == 1000
  assert "probe" in registered_methods()


def test_method_record_is_built_from_the_config(simclr):
  config, method, params, state, _ = simclr
  assert method.name == "simclr" and method.num_views == 2
  assert isinstance(method.encoder, ResNet) and method.encoder.num_features == 32
  assert method.encoder.input_mean == (0.2,) and method.encoder.input_std == (0.3,)
  new_params, new_state = method.post_update(params, state, step=jnp.int32(3))
  assert new_params is params and new_state is state


def test_init_structure(simclr, tmp_path):
  _, _, params, state, _ = simclr
  assert set(params) == {"encoder", "projector"}
  assert set(state) == {"batch_stats"} and set(state["batch_stats"]) == {"encoder", "projector"}
  shapes = jax.tree.map(lambda x: x.shape, params["projector"])
  assert shapes == {"dense1": {"kernel": (32, 16), "bias": (16,)},
                    "bn1": {"scale": (16,), "bias": (16,)},
                    "dense2": {"kernel": (16, 8), "bias": (8,)}}
  assert set(state["batch_stats"]["projector"]) == {"bn1"}
  # Every encoder BN layer has running statistics, still at their initial values.
  encoder_bns = {path for path, _ in jax.tree_util.tree_flatten_with_path(
      params["encoder"])[0] if path[-1].key == "scale"}
  stat_paths = {path[:-1] for path, _ in jax.tree_util.tree_flatten_with_path(
      state["batch_stats"]["encoder"])[0]}
  assert {p[:-1] for p in encoder_bns} == stat_paths
  for path, leaf in jax.tree_util.tree_flatten_with_path(state["batch_stats"])[0]:
    np.testing.assert_array_equal(leaf, 0.0 if path[-1].key == "mean" else 1.0)

  config = tiny_config(str(tmp_path))
  config.method.simclr.proj_last_bn = True
  config.method.simclr.proj_layers = 3
  method = build_method(config)
  params, state = jax.eval_shape(method.init, _KEY, _views())
  assert set(params["projector"]) == {"dense1", "bn1", "dense2", "bn2", "dense3"}
  assert set(state["batch_stats"]["projector"]) == {"bn1", "bn2", "bn3"}  # bn3: no affine


def method_projector(config):
  hp = config.method.simclr
  return MLPHead(hidden_dim=hp.proj_hidden_dim, out_dim=hp.proj_dim, num_layers=hp.proj_layers,
                 last_bn=hp.proj_last_bn)


def _forward(method, config, params, state, x):
  """Encoder then projector in training mode, by hand; returns (z, new batch_stats)."""
  projector = method_projector(config)
  stats = state["batch_stats"]
  h, enc = method.encoder.apply({"params": params["encoder"], "batch_stats": stats["encoder"]},
                                x, train=True, mutable=["batch_stats"])
  z, proj = projector.apply({"params": params["projector"],
                             "batch_stats": stats["projector"]}, h, train=True,
                            mutable=["batch_stats"])
  return z, {"encoder": enc["batch_stats"], "projector": proj["batch_stats"]}


def test_loss_is_nt_xent_of_one_concatenated_forward(simclr):
  config, method, params, state, loss = simclr
  view_a, view_b = _views(seed=1)
  value, (metrics, new_state) = loss(params, state, (view_a, view_b))

  @jax.jit
  def by_hand(params, state):
    z, stats = _forward(method, config, params, state, jnp.concatenate([view_a, view_b]))
    z_a, z_b = jnp.split(z, 2)
    return nt_xent(z_a, z_b, temperature=config.method.simclr.temperature), stats

  (expected, expected_metrics), expected_stats = by_hand(params, state)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  for name in ("pos_sim", "neg_sim", "accuracy"):
    np.testing.assert_allclose(metrics[name], expected_metrics[name], rtol=1e-5, atol=1e-6)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               new_state["batch_stats"], expected_stats)



def test_multicrop_loss_uses_every_view_one_encoder_forward_per_resolution(simclr):
  # Two 8x8 views and two 4x4 small crops: the encoder runs on each resolution's views
  # concatenated, the projector on all four, and the loss is the four-view NT-Xent.
  config, method, params, state, loss = simclr
  view_a, view_b = _views(seed=11)
  small_a, small_b = (v[:, 2:6, 2:6] for v in _views(seed=12))
  views = (view_a, view_b, small_a, small_b)
  value, (metrics, new_state) = loss(params, state, views)

  @jax.jit
  def by_hand(params, state):
    variables = lambda stats: {"params": params["encoder"], "batch_stats": stats}
    h_big, enc = method.encoder.apply(variables(state["batch_stats"]["encoder"]),
                                      jnp.concatenate([view_a, view_b]), train=True,
                                      mutable=["batch_stats"])
    h_small, enc = method.encoder.apply(variables(enc["batch_stats"]),
                                        jnp.concatenate([small_a, small_b]), train=True,
                                        mutable=["batch_stats"])
    projector = method_projector(config)
    z, proj = projector.apply({"params": params["projector"],
                               "batch_stats": state["batch_stats"]["projector"]},
                              jnp.concatenate([h_big, h_small]), train=True,
                              mutable=["batch_stats"])
    value, _ = multiview_nt_xent(jnp.split(z, 4), temperature=config.method.simclr.temperature)
    return value, {"encoder": enc["batch_stats"], "projector": proj["batch_stats"]}

  expected, expected_stats = by_hand(params, state)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5, atol=1e-7),
               new_state["batch_stats"], expected_stats)
  # The small crops change the loss: dropping them gives the two-view value.
  two_view, _ = loss(params, state, (view_a, view_b))
  assert abs(float(two_view) - float(value)) > 1e-3


def test_config_positives_reaches_the_loss(simclr, tmp_path):
  # method.simclr.positives picks the multi-view form: with three views the two forms differ
  # (each is multiview_nt_xent of the same projections), with two they are the same loss.
  config, _, params, state, loss = simclr
  log_sum_config = tiny_config(str(tmp_path))
  log_sum_config.method.simclr.positives = "log_sum"
  log_sum_method = build_method(log_sum_config)
  log_sum = jax.jit(lambda p, s, v: log_sum_method.loss(p, s, _batch(v), key=_KEY,
                                                        step=jnp.int32(0), axis_name=None))
  three = (*_views(seed=13), _views(seed=14)[0])
  assert abs(float(log_sum(params, state, three)[0]) - float(loss(params, state, three)[0])) > 1e-3
  two = _views(seed=15)
  np.testing.assert_allclose(log_sum(params, state, two)[0], loss(params, state, two)[0],
                             rtol=1e-5)


def test_unknown_positives_is_refused_when_the_method_is_built(tmp_path):
  # Before the fix the bad value reached the loss only when the train step was first traced,
  # after the workdir and config.json had been written.
  config = tiny_config(str(tmp_path))
  config.method.simclr.positives = "logsum"
  with pytest.raises(ValueError, match=r"method\.simclr\.positives must be one of "
                     r"\('mean_log', 'log_sum'\), got 'logsum'; e\.g\. "
                     r"--config\.method\.simclr\.positives=log_sum"):
    build_method(config)


def test_swapping_the_views_leaves_the_loss_unchanged(simclr):
  _, _, params, state, loss = simclr
  view_a, view_b = _views(seed=2)
  value, (_, new_state) = loss(params, state, (view_a, view_b))
  swapped, (_, swapped_state) = loss(params, state, (view_b, view_a))
  np.testing.assert_allclose(swapped, value, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               swapped_state, new_state)


def test_loss_updates_batch_stats_and_keeps_other_state(simclr):
  _, _, params, state, loss = simclr
  views = _views(seed=3)
  # State entries of add-ons (queues, teachers) pass through untouched.
  extra = {**state, "queue": jax.ShapeDtypeStruct((6,), jnp.float32)}
  _, (_, extra_state) = jax.eval_shape(loss, params, extra, views)
  assert extra_state["queue"] == extra["queue"]
  _, (_, new_state) = loss(params, state, views)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  for old, new in zip(jax.tree.leaves(state["batch_stats"]),
                      jax.tree.leaves(new_state["batch_stats"])):
    assert not np.allclose(old, new)


def test_eval_variables_are_the_online_encoder(simclr):
  _, method, params, state, loss = simclr
  _, (_, new_state) = loss(params, state, _views(seed=4))
  variables = method.eval_variables(params, new_state)
  assert variables["params"] is params["encoder"]
  assert variables["batch_stats"] is new_state["batch_stats"]["encoder"]
  x = _views(seed=5)[0]
  encode = jax.jit(functools.partial(method.encoder.apply, train=False))
  features = encode(variables, x)
  assert features.shape == (_BATCH, 32)
  # Inference mode uses the running statistics the training step produced.
  stale = encode(method.eval_variables(params, state), x)
  assert not np.allclose(features, stale, atol=1e-4)


def test_gradient_steps_lower_the_loss(simclr):
  _, _, params, state, loss = simclr
  views = _views(seed=6)
  grad_fn = jax.jit(jax.value_and_grad(lambda p, s: loss(p, s, views), has_aux=True))
  (start, _), grads = grad_fn(params, state)
  for path, g in jax.tree_util.tree_flatten_with_path(grads)[0]:
    assert np.abs(g).max() > 0, jax.tree_util.keystr(path)  # every parameter is trained
  values = []
  for _ in range(5):
    (value, (_, state)), grads = grad_fn(params, state)
    params = jax.tree.map(lambda p, g: p - 0.2 * g, params, grads)
    values.append(float(value))
  (final, _), _ = grad_fn(params, state)
  assert float(final) < 0.5 * float(start), (float(start), values, float(final))


def test_sharded_loss_equals_single_device_loss(simclr, num_devices):
  config, method, params, state, loss = simclr
  assert config.model.sync_batchnorm
  sharded_method = build_method(config, axis_name="data")
  views = _views(seed=7)

  def per_device(params, state, views):
    value, (_, new_state) = sharded_method.loss(params, state, _batch(views), key=_KEY,
                                                step=jnp.int32(0), axis_name="data")
    return jax.lax.pmean(value, "data"), new_state

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P(), P("data")),
                                  out_specs=(P(), P()), check_vma=False))
  value, new_state = sharded(params, state, views)
  expected, (_, expected_state) = loss(params, state, views)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-4, atol=1e-6),
               new_state, expected_state)


def test_objective_terms_are_per_view_and_image_and_reduce_to_the_value(simclr):
  # Two views and the four-view multi-crop case: terms() is [V, n] and sum_v mean_i terms is
  # the objective's value.
  _, method, params, state, _ = simclr
  view_a, view_b = _views(seed=13)
  small_a, small_b = (v[:, 2:6, 2:6] for v in _views(seed=14))

  @jax.jit
  def value_and_terms(params, state, views):
    batch = _batch(views)
    outputs, new_state = method.forward(params, state, batch, step=jnp.int32(0))
    out = method.objective(params, new_state, outputs, batch, key=_KEY, step=jnp.int32(0),
                           axis_name=None)
    return out.value, out.terms()

  assert method.decomposes
  for views in ((view_a, view_b), (view_a, view_b, small_a, small_b)):
    value, terms = value_and_terms(params, state, views)
    assert terms.shape == (len(views), _BATCH)
    np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), value, rtol=1e-6)
    expected, _ = method.loss(params, state, _batch(views), key=_KEY, step=jnp.int32(0),
                              axis_name=None)
    np.testing.assert_allclose(value, expected, rtol=1e-5)


def test_head_layers_are_every_projector_layer_in_inference_mode(simclr):
  config, method, params, state, loss = simclr
  # Running statistics that differ from the initial ones, so inference mode is visible.
  _, (_, state) = loss(params, state, _views(seed=15))
  views = _views(seed=16)
  features, same_state = jax.jit(functools.partial(method.features, train=False))(
      params, state, views)
  assert jax.tree.structure(same_state) == jax.tree.structure(state)
  jax.tree.map(np.testing.assert_array_equal, same_state, state)
  variables = method.eval_variables(params, state)
  encode = jax.jit(functools.partial(method.encoder.apply, train=False))
  assert len(features) == len(views)
  for view, h in zip(views, features):
    np.testing.assert_allclose(h, encode(variables, view), rtol=1e-5, atol=1e-6)

  # Not jitted: jit returns dicts with sorted keys, and the order of the layers is checked.
  layers = method.head_layers(params, state, features)
  assert list(layers) == ["encoder", "projector/dense1", "projector/bn1", "projector/dense2",
                          "projector/output"]
  h = jnp.concatenate(features, axis=0)
  np.testing.assert_array_equal(layers["encoder"], h)
  projector = method_projector(config)
  expected = projector.apply({"params": params["projector"],
                              "batch_stats": state["batch_stats"]["projector"]}, h,
                             train=False)
  np.testing.assert_allclose(layers["projector/output"], expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(layers["projector/dense2"], expected, rtol=1e-5, atol=1e-6)
  assert layers["projector/dense1"].shape == layers["projector/bn1"].shape == (2 * _BATCH, 16)
  # bn1 is the running-statistics normalisation of dense1's output.
  bn = params["projector"]["bn1"]
  stats = state["batch_stats"]["projector"]["bn1"]
  by_hand = ((layers["projector/dense1"] - stats["mean"]) / jnp.sqrt(stats["var"] + 1e-5)
             * bn["scale"] + bn["bias"])
  np.testing.assert_allclose(layers["projector/bn1"], by_hand, rtol=1e-4, atol=1e-5)
