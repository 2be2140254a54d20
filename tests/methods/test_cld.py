"""The CLD add-on on NPID, MoCo and BYOL: value = base + lambda * cld on the group head's
outputs, gradients (BYOL's target untouched), head layers, refusals with their fixes, and one
train step with the gathered k-means on 8 devices vs 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.config import default_config
from ssljax.losses import cld, l2_normalize
from ssljax.methods import RunInfo, build_method, method_from_loss
from ssljax.methods.cld import cld_addon
from ssljax.models.heads import NormLinear, NormMLP
from ssljax.parallel import data_sharded, make_mesh, replicated
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import TrainState, compile_train_step, make_per_device_step
from tests.util import init_with_numpy_kernels, tiny_config

_KEY = jax.random.key(0)
_SIZE = 8
_BATCH = 16
_N = 64
_RUN = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=_N)
_BASES = {
    "npid": dict(num_views=2, proj_dim=8),
    "moco": dict(num_views=3, symmetric=False, queue_size=32, proj_hidden_dim=16, proj_dim=8),
    "byol": dict(proj_hidden_dim=16, proj_dim=8, pred_hidden_dim=16),
}


def _config(directory, base, with_cld=True, **cld_settings):
  config = tiny_config(str(directory), method=base, addons=("cld",) if with_cld else (),
                       size=_SIZE)
  for key, value in _BASES[base].items():
    config.method[base][key] = value
  config.augment.num_views = 3 if base == "moco" else 2
  config.optim.warmup_epochs = 0.0
  if with_cld:
    config.method.cld.num_clusters = 4
    config.method.cld.head_dim = 6
    config.method.cld.head_hidden_dim = 8
    for key, value in cld_settings.items():
      config.method.cld[key] = value
  return config


def _views(count):
  rng = np.random.default_rng(0)
  images = rng.uniform(size=(_BATCH, _SIZE, _SIZE, 1))
  return tuple(jnp.asarray(np.clip(images + 0.1 * rng.normal(size=images.shape), 0, 1),
                           jnp.float32) for _ in range(count))


def _batch(views):
  return {"views": views, "index": jnp.arange(_BATCH, dtype=jnp.int32) * 3,
          "label": jnp.full((_BATCH,), -1, jnp.int32)}


def _loss(method, params, state, views):
  return method.loss(params, state, _batch(views), key=_KEY, step=jnp.int32(0), axis_name=None)


@pytest.mark.parametrize("base,head", [("npid", "linear"), ("moco", "norm_linear"),
                                       ("byol", "norm_mlp")])
def test_value_is_the_base_loss_plus_lambda_cld_on_the_group_head(tmp_path, base, head):
  config = _config(tmp_path, base, head=head, weight=0.7)
  method = build_method(config, run=_RUN)
  plain = build_method(_config(tmp_path, base, with_cld=False), run=_RUN)
  views = _views(method.num_views)
  params, state = init_with_numpy_kernels(method.init, _KEY, views)
  base_params = {k: v for k, v in params.items() if k != "cld_head"}
  value, (metrics, new_state) = _loss(method, params, state, views)
  base_value, (_, base_state) = _loss(plain, base_params, state, views)
  # The group branch forks from the online features of the first two views (MoCo: the two
  # query views), through the configured head, L2-normalised.
  features, _ = plain.features(base_params, state, views, train=True)
  module = {"linear": None, "norm_linear": NormLinear(6), "norm_mlp": NormMLP(8, 6)}[head]
  apply = ((lambda h: h @ params["cld_head"]["dense1"]["kernel"]
            + params["cld_head"]["dense1"]["bias"]) if module is None else
           (lambda h: module.apply({"params": params["cld_head"]}, h)))
  g = [l2_normalize(apply(h)) for h in features[:2]]
  expected_cld, expected_metrics = cld(*g, num_clusters=4, temperature=0.2)
  np.testing.assert_allclose(metrics["cld_loss"], expected_cld, rtol=1e-5)
  np.testing.assert_allclose(metrics["instance_loss"], base_value, rtol=1e-5)
  np.testing.assert_allclose(value, base_value + 0.7 * expected_cld, rtol=1e-5)
  np.testing.assert_allclose(metrics["group_acc"], expected_metrics["group_acc"])
  # The base method's state (bank, queue, BN statistics) moves exactly as without CLD.
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6), new_state, base_state)
  assert method.name == f"{base}+cld" and not method.decomposes
  out = method.objective(params, new_state, method.forward(params, state, _batch(views),
                                                           step=jnp.int32(0))[0],
                         _batch(views), key=_KEY, step=jnp.int32(0), axis_name=None)
  assert out.terms is None


def test_group_loss_trains_the_encoder_and_head_and_byol_target_is_untouched(tmp_path):
  config = _config(tmp_path, "byol", weight=1.0)
  method = build_method(config, run=_RUN)
  views = _views(2)
  params, state = init_with_numpy_kernels(method.init, _KEY, views)
  grad_cld = jax.grad(lambda p: _loss(method, p, state, views)[1][0]["cld_loss"])(params)
  assert float(jnp.abs(grad_cld["cld_head"]["dense1"]["kernel"]).max()) > 0
  assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grad_cld["encoder"])) > 0
  # The CLD term reaches neither the BYOL projector nor the predictor (online heads of the
  # instance branch); the target network is state, not a parameter.
  for entry in ("projector", "predictor"):
    assert max(float(jnp.abs(x).max()) for x in jax.tree.leaves(grad_cld[entry])) == 0
  assert "target" in state and "cld_head" not in state["target"]


def test_moco_norm_linear_instance_head_gives_cosines(tmp_path):
  # The official MoCo+CLD scripts' --normlinear also turns the instance head into NormLinear.
  config = _config(tmp_path, "moco", head="norm_linear")
  config.method.moco.proj_layers = 1
  config.method.moco.norm_linear = True
  method = build_method(config, run=_RUN)
  views = _views(3)
  params, state = init_with_numpy_kernels(method.init, _KEY, views)
  features, _ = method.features(params, state, views, train=True)
  embeddings, _ = method.embed(params, state, features, views, step=jnp.int32(0))
  kernel = params["projector"]["kernel"]
  expected = l2_normalize(features[0]) @ (kernel / jnp.linalg.norm(kernel, axis=0))
  np.testing.assert_allclose(embeddings["query"][0], expected, rtol=1e-5, atol=1e-6)
  config.method.moco.proj_layers = 3
  with pytest.raises(ValueError, match="norm_linear needs proj_layers 1"):
    build_method(config, run=_RUN)


def test_head_layers_add_the_group_head(tmp_path):
  config = _config(tmp_path, "npid", head="norm_mlp")
  method = build_method(config, run=_RUN)
  views = _views(2)
  params, state = init_with_numpy_kernels(method.init, _KEY, views)
  features, _ = method.features(params, state, views, train=False)
  layers = method.head_layers(params, state, features)
  assert list(layers)[:2] == ["encoder", "head/dense1"]
  assert [k for k in layers if k.startswith("cld_head/")] == [
      "cld_head/dense1", "cld_head/norm_linear", "cld_head/output"]
  assert layers["cld_head/output"].shape == (2 * _BATCH, 6)


def test_config_section_and_registration():
  config = default_config("moco", ("cld",))
  assert set(config.method) >= {"name", "addons", "moco", "cld"}
  assert config.method.cld.num_clusters == 128 and config.method.cld.num_iters == 5
  assert not config.method.cld.global_kmeans


@pytest.mark.parametrize("base,changes,message", [
    ("npid", {"npid.num_views": 1}, "method.npid.num_views=2"),
    ("moco", {"moco.num_views": 2, "moco.symmetric": False}, "method.moco.num_views=3"),
    ("npid", {"cld.num_clusters": 17}, "num_clusters = 17 .*lower"),
    # As many clusters as rows: every row its own group (instance discrimination).
    ("npid", {"cld.num_clusters": 16}, "num_clusters = 16 must be at least 1 and below the "
     "rows k-means clusters \\(train.batch_size = 16; .*instance discrimination\\); lower"),
    ("npid", {"cld.head": "conv"}, "method.cld.head must be one of"),
    ("npid", {"cld.temperature": 0.0}, "temperature must be > 0"),
])
def test_bad_configs_name_the_fix(tmp_path, base, changes, message):
  config = _config(tmp_path, base)
  for key, value in changes.items():
    section, name = key.split(".")
    config.method[section][name] = value
  with pytest.raises(ValueError, match=message):
    build_method(config, run=_RUN)


def test_per_device_clusters_must_be_fewer_than_each_devices_rows(tmp_path):
  # Built to train on 8 devices, batch 16 leaves 2 rows per device: K = 2 would make every
  # row its own group, so it is refused with the per-device count.
  config = _config(tmp_path, "npid", num_clusters=2)
  on_8 = RunInfo(steps_per_epoch=4, total_steps=10, num_examples=64, data_devices=8)
  build_method(config, run=_RUN)  # one device clusters the 16 rows
  # Evaluation, export and analysis (no data_devices) restore on any machine.
  build_method(config, axis_name="data", run=_RUN)
  with pytest.raises(ValueError, match="num_clusters = 2 .*train.batch_size / 8 devices = 2 "
                     "per device.*--config.method.cld.global_kmeans=True"):
    build_method(config, axis_name="data", run=on_8)
  config.method.cld.global_kmeans = True
  build_method(config, axis_name="data", run=on_8)


def test_unsupported_bases_are_refused(tmp_path):
  for base in ("simclr", "barlow_twins"):
    config = tiny_config(str(tmp_path), method=base, addons=("cld",))
    with pytest.raises(ValueError,
                       match="wraps npid, moco or byol.*configs/npid_cld.py.*drop 'cld'"):
      build_method(config, run=_RUN)


def test_a_method_without_features_to_fork_is_refused(tmp_path):
  config = _config(tmp_path, "npid")
  plain = build_method(_config(tmp_path, "npid", with_cld=False), run=_RUN)
  loss = lambda params, state, batch, *, key, step, axis_name: (jnp.float32(0), ({}, state))
  wrapped = cld_addon(method_from_loss("npid", plain.encoder, plain.init, loss), config, None,
                      _RUN)
  with pytest.raises(ValueError, match="method_from_loss.*no features to fork"):
    wrapped.init(_KEY, _views(2))


def _policy(keys, images):
  del keys
  x = images.astype(jnp.float32) / 255.0
  return x, x[:, :, ::-1]


def test_one_step_with_global_kmeans_on_8_devices_equals_1_device(tmp_path, num_devices):
  # NPID + CLD with the k-means over the gathered batch: 8 devices x 2 rows = 1 x 16 rows.
  config = _config(tmp_path, "npid", global_kmeans=True)
  config.model.sync_batchnorm = True
  views = _views(2)
  params, state = init_with_numpy_kernels(build_method(config, run=_RUN).init, _KEY, views)
  index = jnp.asarray(np.random.default_rng(1).permutation(_N)[:_BATCH], jnp.int32)

  def step_on(devices):
    mesh = make_mesh(devices)
    method = build_method(config, axis_name="data", run=_RUN)
    schedule = build_schedule(config.optim, global_batch=_BATCH, total_steps=10,
                              steps_per_epoch=4)
    tx = build_optimizer(config.optim, schedule)
    step = compile_train_step(make_per_device_step(method, tx, _policy, schedule), mesh)
    first = TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params),
                       method_state=state, rng=jax.random.PRNGKey(1),
                       nonfinite_step=jnp.int32(-1))
    first = jax.device_put(jax.tree.map(jnp.copy, first), replicated(mesh))
    images = np.random.default_rng(5).integers(0, 256, size=(_BATCH, _SIZE, _SIZE, 1),
                                               dtype=np.uint8)
    put = lambda x: jax.device_put(x, data_sharded(mesh))
    return step(first, put(images), put(np.asarray(index)),
                put(np.full((_BATCH,), -1, np.int32)))

  new8, metrics8 = step_on(jax.devices())
  new1, metrics1 = step_on(jax.devices()[:1])
  assert int(new8.nonfinite_step) == -1
  for name in ("train/loss", "train/cld_loss", "train/group_acc"):
    np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=1e-4)
  moved = jax.tree.leaves(jax.tree.map(lambda a, b: np.abs(np.asarray(a) - b).max(),
                                       new8.params["cld_head"], params["cld_head"]))
  assert min(moved) > 0
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-3, atol=1e-5),
               (new8.params, new8.method_state), (new1.params, new1.method_state))
