"""MetaMask: the meta-gradient against hand-derived and numerical values, the masked encoder
at evaluation, and the step body's order (real step, meta-gradient, mask step)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ssljax import augment, data
from ssljax.methods import build_method
from ssljax.methods.metamask import mask_statistics, meta_gradient, momentum_buffer
from ssljax.parallel import DATA_AXIS, data_sharded, make_mesh, replicated
from ssljax.train.optim import build_optimizer, build_schedule
from ssljax.train.step import compile_train_step, init_train_state, make_per_device_step
from tests.util import tiny_config

# ----------------------------------------------------------------- meta_gradient


def _quadratic(seed=0):
  """L(theta, alpha) = 1/2 t^T A t + a^T B t + 1/2 a^T C a on pytrees (t: 5 numbers in two
  leaves, a: 2 numbers in two leaves), float64."""
  rng = np.random.default_rng(seed)
  m = rng.normal(size=(5, 5))
  a_mat, b_mat = m @ m.T / 5 + np.eye(5), rng.normal(size=(2, 5))
  c_mat = np.diag([0.5, 2.0])
  flat_t = lambda t: jnp.concatenate([t["w"], t["b"]])
  flat_a = lambda a: jnp.concatenate([a["x"], a["y"]])

  def loss(theta, alpha):
    t, a = flat_t(theta), flat_a(alpha)
    return 0.5 * t @ a_mat @ t + a @ b_mat @ t + 0.5 * a @ c_mat @ a

  theta = {"w": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=2))}
  alpha = {"x": jnp.asarray(rng.normal(size=1)), "y": jnp.asarray(rng.normal(size=1))}
  buf = {"w": jnp.asarray(rng.normal(size=3)), "b": jnp.asarray(rng.normal(size=2))}
  return loss, theta, alpha, buf, (a_mat, b_mat, c_mat), flat_t, flat_a


@pytest.mark.parametrize("with_buffer", [False, True])
def test_exact_meta_gradient_is_the_hand_derived_one_on_a_quadratic(with_buffer):
  with jax.enable_x64(True):
    loss, theta, alpha, buf, (a_mat, b_mat, c_mat), flat_t, flat_a = _quadratic()
    lr, mu, wd = 0.1, 0.9, 0.05
    t, a, b = np.asarray(flat_t(theta)), np.asarray(flat_a(alpha)), np.asarray(flat_t(buf))
    # theta' = t - lr (mu b + A t + B^T a + wd t); d theta'/d a = -lr B^T, so
    # dL(theta'(a), a)/da = B theta' + C a - lr B (A theta' + B^T a).
    t_v = t - lr * ((mu * b if with_buffer else 0) + a_mat @ t + b_mat.T @ a + wd * t)
    expected = b_mat @ t_v + c_mat @ a - lr * b_mat @ (a_mat @ t_v + b_mat.T @ a)
    value, grad = meta_gradient(loss, theta, alpha, lr=lr, momentum=mu,
                                momentum_buffer=buf if with_buffer else None,
                                weight_decay=wd)
    np.testing.assert_allclose(flat_a(grad), expected, rtol=1e-12)
    t_tree = {"w": jnp.asarray(t_v[:3]), "b": jnp.asarray(t_v[3:])}
    np.testing.assert_allclose(value, loss(t_tree, alpha), rtol=1e-12)
    # The Hessian-vector product is exact for a quadratic: the central difference too.
    _, fd = meta_gradient(loss, theta, alpha, lr=lr, momentum=mu,
                          momentum_buffer=buf if with_buffer else None, weight_decay=wd,
                          second_order="finite_difference")
    np.testing.assert_allclose(flat_a(fd), expected, rtol=1e-9)
    # 'none': the first-order term B theta' + C a alone.
    _, first = meta_gradient(loss, theta, alpha, lr=lr, momentum=mu,
                             momentum_buffer=buf if with_buffer else None, weight_decay=wd,
                             second_order="none")
    np.testing.assert_allclose(flat_a(first), b_mat @ t_v + c_mat @ a, rtol=1e-12)


def _tiny_network(seed=0):
  """A two-layer tanh network on masked inputs, squared error: not quadratic in theta."""
  rng = np.random.default_rng(seed)
  x, y = jnp.asarray(rng.normal(size=(8, 4))), jnp.asarray(rng.normal(size=(8, 2)))

  def loss(theta, alpha):
    h = jnp.tanh((x * jax.nn.sigmoid(alpha["logits"])) @ theta["w1"] + theta["b1"])
    return jnp.mean((h @ theta["w2"] - y) ** 2)

  theta = {"w1": jnp.asarray(rng.normal(size=(4, 6))), "b1": jnp.asarray(rng.normal(size=6)),
           "w2": jnp.asarray(rng.normal(size=(6, 2)))}
  alpha = {"logits": jnp.asarray(rng.normal(size=4))}
  buf = jax.tree.map(lambda p: jnp.asarray(rng.normal(size=p.shape)) * 0.1, theta)
  return loss, theta, alpha, buf


def test_exact_meta_gradient_equals_a_central_difference_of_the_outer_objective():
  with jax.enable_x64(True):
    loss, theta, alpha, buf = _tiny_network()
    kw = dict(lr=0.3, momentum=0.9, momentum_buffer=buf, weight_decay=5e-4)
    _, grad = meta_gradient(loss, theta, alpha, **kw)

    def outer(a):
      g = jax.grad(loss)(theta, a)
      step = jax.tree.map(lambda p, gi, b: p - 0.3 * (0.9 * b + gi + 5e-4 * p), theta, g, buf)
      return float(loss(step, a))

    eps = 1e-6
    for i in range(4):
      bump = lambda d: {"logits": alpha["logits"].at[i].add(d)}
      numeric = (outer(bump(eps)) - outer(bump(-eps))) / (2 * eps)
      np.testing.assert_allclose(grad["logits"][i], numeric, rtol=1e-6, atol=1e-10)


def test_finite_difference_mode_approximates_the_exact_one_and_none_drops_the_second_order():
  with jax.enable_x64(True):
    loss, theta, alpha, buf = _tiny_network(seed=1)
    kw = dict(lr=0.3, momentum=0.9, momentum_buffer=buf, weight_decay=5e-4)
    v_exact, exact = meta_gradient(loss, theta, alpha, **kw)
    v_fd, fd = meta_gradient(loss, theta, alpha, second_order="finite_difference", **kw)
    v_none, first = meta_gradient(loss, theta, alpha, second_order="none", **kw)
    np.testing.assert_allclose(v_fd, v_exact, rtol=1e-12)
    np.testing.assert_allclose(v_none, v_exact, rtol=1e-12)
    # The first-order term misses -lr * H v, which is not small here; the central difference
    # (r = 0.01 / ||v||, an O(r^2) error) gets that term to within 0.1%.
    exact, fd, first = (np.asarray(t["logits"]) for t in (exact, fd, first))
    second = np.linalg.norm(exact - first)
    assert second > 0.1 * np.linalg.norm(exact)
    assert np.linalg.norm(fd - exact) < 1e-3 * second
    np.testing.assert_allclose(fd, exact, rtol=1e-4, atol=1e-6)
    with pytest.raises(ValueError, match="second_order"):
      meta_gradient(loss, theta, alpha, lr=0.1, second_order="darts")


def test_finite_difference_mode_in_float32_stays_close_to_the_exact_one():
  # In float32 (the training precision) the estimate is still close to the exact value.
  loss, theta, alpha, buf = _tiny_network(seed=2)
  theta, alpha, buf = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), (theta, alpha, buf))
  kw = dict(lr=0.3, momentum=0.9, momentum_buffer=buf, weight_decay=5e-4)
  _, exact = meta_gradient(loss, theta, alpha, **kw)
  _, fd = meta_gradient(loss, theta, alpha, second_order="finite_difference", **kw)
  np.testing.assert_allclose(fd["logits"], exact["logits"], rtol=2e-2, atol=1e-4)


def test_mask_statistics():
  alpha = jnp.asarray([-5.0, -1.0, 0.0, 0.0, 3.0])  # m = .0067 .27 .5 .5 .953
  s = mask_statistics(alpha, bins=10)
  np.testing.assert_allclose(s["mask_below_0.1"], 0.2)
  np.testing.assert_allclose(s["mask_above_0.9"], 0.2)
  hist = [float(s[f"mask_hist_{k}"]) for k in range(10)]
  np.testing.assert_allclose(hist, [0.2, 0, 0.2, 0, 0, 0.4, 0, 0, 0, 0.2], rtol=1e-6)


# ----------------------------------------------------------------- the method


def _config(directory, **section):
  config = tiny_config(directory, method="metamask")
  hp = config.method.metamask
  hp.bt_hidden_dim, hp.bt_dim, hp.cl_hidden_dim, hp.cl_dim = 16, 16, 16, 8
  for key, value in section.items():
    hp[key] = value
  config.optim.name = "sgd"
  config.optim.lr = 0.05
  config.optim.weight_decay = 5e-4
  config.optim.warmup_epochs = 0.0
  return config


def _views(config, n=16, seed=0):
  rng = np.random.default_rng(seed)
  shape = (n, config.augment.crop_size, config.augment.crop_size, config.data.channels)
  return tuple(jnp.asarray(rng.uniform(size=shape), jnp.float32) for _ in range(2))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
  config = _config(str(tmp_path_factory.mktemp("metamask")))
  method = build_method(config)
  views = _views(config)
  params, state = jax.jit(method.init)(jax.random.PRNGKey(0), views)
  schedule = build_schedule(config.optim, global_batch=16, total_steps=10, steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule, method.param_groups)
  return config, method, views, params, state, schedule, tx


def test_eval_features_are_the_backbone_features_times_the_mask(built):
  _, method, views, params, state, _, _ = built
  alpha = jnp.linspace(-3.0, 3.0, params["mask"]["alpha"].shape[0])
  params = {**params, "mask": {"alpha": alpha}}
  masked = method.encoder.apply(method.eval_variables(params, state), views[0], train=False)
  raw = method.encoder.encoder.apply({"params": params["encoder"],
                                      "batch_stats": state["batch_stats"]["encoder"]},
                                     views[0], train=False)
  np.testing.assert_allclose(masked, raw * jax.nn.sigmoid(alpha), rtol=1e-6, atol=1e-7)
  stage, _ = method.features(params, state, views, train=False)
  np.testing.assert_allclose(stage[0], masked, rtol=1e-6, atol=1e-7)
  assert masked.shape[1] == method.encoder.num_features
  layers = method.head_layers(params, state, stage)
  assert {"encoder", "bt_projector/output", "cl_projector/output"} <= set(layers)


def _update(method, tx, schedule, params, state, views):
  from ssljax.train.step import TrainState
  train_state = TrainState(step=jnp.zeros((), jnp.int32), params=params,
                           opt_state=tx.init(params), method_state=state,
                           rng=jax.random.PRNGKey(1), nonfinite_step=jnp.array(-1))
  batch = {"views": views, "index": jnp.arange(16), "label": jnp.zeros(16, jnp.int32)}
  body = functools.partial(method.update, key=jax.random.PRNGKey(2), axis_name=None, tx=tx,
                           schedule=schedule)
  return jax.jit(body)(train_state, batch), batch


@pytest.fixture(scope="module")
def stepped(built):
  """One jitted step body and the reference real step (first-order) on the same batch."""
  config, method, views, params, state, schedule, tx = built
  out, batch = _update(method, tx, schedule, params, state, views)
  real = jax.jit(jax.value_and_grad(functools.partial(
      method.loss, key=None, step=jnp.zeros((), jnp.int32), axis_name=None), has_aux=True))
  (loss, (_, real_state)), g = real(params, state, batch)
  return out, loss, real_state, g


def test_the_step_body_takes_the_real_step_and_keeps_the_real_passes_statistics(built, stepped):
  _, method, _, params, _, schedule, _ = built
  out, loss, real_state, g = stepped
  assert np.isfinite(float(out.loss))
  np.testing.assert_allclose(out.loss, loss, rtol=1e-5)
  # (1) theta: one SGD step on L_BT + gamma L_CL at the initial mask (first step: no buffer).
  lr = float(schedule(0))
  for k in params:
    if k != "mask":
      jax.tree.map(lambda new, p, gi: np.testing.assert_allclose(
          new, p - lr * (gi + 5e-4 * p), rtol=1e-4, atol=1e-6), out.params[k], params[k], g[k])
  # BN statistics: those of the real pass only (the meta passes' updates are dropped).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
               out.method_state, real_state)
  # The mask moved, through the meta step only (the real loss's gradient is dropped).
  assert float(jnp.abs(out.params["mask"]["alpha"]).max()) > 0
  for key in ("mask_below_0.1", "mask_above_0.9", "mask_hist_9", "meta_grad_norm",
              "meta_outer_loss", "loss_bt", "loss_cl"):
    assert np.isfinite(float(out.metrics[key])), key


@pytest.mark.slow
def test_the_mask_step_uses_the_meta_gradient_from_the_updated_network(built, stepped):
  _, method, views, params, _, schedule, _ = built
  out, _, real_state, g = stepped
  lr = float(schedule(0))
  theta1 = {k: out.params[k] for k in params if k != "mask"}
  # (2)+(3) alpha: SGD on the meta-gradient of L_CL from theta_{t+1}, whose virtual step uses
  # the momentum buffer after the real step (g + wd theta on the first step).
  buf = {k: jax.tree.map(lambda p, gi: gi + 5e-4 * p, params[k], g[k]) for k in theta1}
  contrastive = lambda th, a: _contrastive(method, th, a, real_state, views)
  _, d_alpha = jax.jit(lambda th, a, b: meta_gradient(
      contrastive, th, a, lr=lr, momentum=0.9, momentum_buffer=b, weight_decay=5e-4))(
          theta1, params["mask"], buf)
  expected = -lr * d_alpha["alpha"]  # alpha_0 = 0: no decay term, no old momentum
  np.testing.assert_allclose(out.params["mask"]["alpha"], expected, rtol=2e-3, atol=1e-9)


def _contrastive(method, theta, mask, state, views):
  from ssljax.losses import nt_xent
  params = {**theta, "mask": mask}
  feats, state = method.features(params, state, views, train=True)
  emb, _ = method.embed(params, state, feats, views, step=0)
  return nt_xent(*emb["contrastive"], temperature=0.07)[0]


def test_without_the_meta_step_the_mask_gets_no_gradient(tmp_path):
  config = _config(str(tmp_path), meta_step=False)
  method = build_method(config)
  views = _views(config)
  params, state = jax.jit(method.init)(jax.random.PRNGKey(0), views)
  schedule = build_schedule(config.optim, global_batch=16, total_steps=10, steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule, method.param_groups)
  out, _ = _update(method, tx, schedule, params, state, views)
  np.testing.assert_array_equal(out.params["mask"]["alpha"], params["mask"]["alpha"])
  np.testing.assert_array_equal(out.grads["mask"]["alpha"], 0.0)
  assert float(jnp.abs(out.params["encoder"]["stem_conv"]["kernel"]
                       - params["encoder"]["stem_conv"]["kernel"]).max()) > 0


def test_momentum_buffer_is_read_from_the_grouped_optimizer_state(built):
  _, method, _, params, _, _, tx = built
  opt_state = tx.init(params)
  grads = jax.tree.map(jnp.ones_like, params)
  _, opt_state = tx.update(grads, opt_state, params)
  buf = momentum_buffer(opt_state, params)
  expected = jax.tree.map(lambda p: 1.0 + 5e-4 * p, params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), buf, expected)


def test_the_builder_refuses_optimisers_without_an_sgd_step(tmp_path):
  config = _config(str(tmp_path))
  config.optim.name = "lars"
  with pytest.raises(ValueError, match="optim.name = 'sgd'"):
    build_method(config)
  config.method.metamask.meta_step = False
  build_method(config)


def _compiled(config, devices, steps):
  mesh = make_mesh(devices)
  method = build_method(config, axis_name=DATA_AXIS)
  policy = augment.build_policy(config.augment)
  schedule = build_schedule(config.optim, global_batch=16, total_steps=10, steps_per_epoch=4)
  tx = build_optimizer(config.optim, schedule, method.param_groups)
  init = jax.jit(functools.partial(init_train_state, method, tx, policy, (16, 16, 1),
                                   config.seed), out_shardings=replicated(mesh))
  step = compile_train_step(make_per_device_step(method, tx, policy, schedule), mesh)
  # Noise images: the tiny dataset's blobs give near-constant small crops, whose BatchNorm
  # statistics make the gradients of this 16-pixel network ill-conditioned (8-device and
  # 1-device rounding then differ by ~1e-3 in the first layers' gradients).
  images = np.random.default_rng(0).integers(0, 256, size=(16, 16, 16, 1), dtype=np.uint8)
  put = lambda x: jax.device_put(x, data_sharded(mesh))
  state, history = init(), []
  for _ in range(steps):
    state, metrics = step(state, put(images), put(np.arange(16, dtype=np.int32)),
                          put(np.zeros(16, np.int32)))
    history.append((jax.device_get(state), jax.device_get(metrics)))
  return history


@pytest.mark.slow
def test_the_compiled_step_on_eight_devices_equals_one_device(tmp_path):
  config = _config(str(tmp_path))
  config.model.sync_batchnorm = True
  eight = _compiled(config, jax.devices(), steps=2)
  one = _compiled(config, jax.devices()[:1], steps=2)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3,
                                                  atol=1e-5)
  for (state8, metrics8), (state1, metrics1) in zip(eight, one):
    assert int(state8.nonfinite_step) == -1 and np.isfinite(metrics8["train/loss"])
    for key in ("train/loss", "train/meta_grad_norm", "train/meta_outer_loss"):
      close(metrics8[key], metrics1[key])
    jax.tree.map(close, state8.params, state1.params)
    jax.tree.map(close, state8.method_state, state1.method_state)
    # Momentum buffers hold raw gradients (up to ~20 here, not scaled by the learning rate),
    # compared relative to each leaf's largest entry: the mask's (the meta-gradient, a second
    # derivative) differs by up to 5e-4 of its largest entry, the biases before a BatchNorm
    # (a zero gradient up to rounding) by ~1e-5.
    jax.tree_util.tree_map_with_path(lambda path, a, b: np.testing.assert_array_less(
        np.abs(a - b).max(), 1e-3 * np.abs(b).max() + 1e-4, jax.tree_util.keystr(path)),
        state8.opt_state, state1.opt_state)


@pytest.mark.slow
def test_remat_backbone_gives_the_same_step(built, tmp_path):
  config, method, views, params, state, schedule, tx = built
  remat = build_method(_config(str(tmp_path), remat_backbone=True))
  out, _ = _update(method, tx, schedule, params, state, views)
  out_remat, _ = _update(remat, tx, schedule, params, state, views)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  jax.tree.map(close, out_remat.params, out.params)
  jax.tree.map(close, out_remat.method_state, out.method_state)


@pytest.mark.slow
def test_an_interrupted_run_resumes_bit_exactly(tmp_path, monkeypatch):
  from ssljax.train import loop
  from tests.train.test_loop import _final_params
  config = _config(str(tmp_path))
  config.eval.linear_probe = False
  loop.train(config, str(tmp_path / "straight"))
  _, straight, _ = _final_params(tmp_path / "straight", config)
  real_next = data.HostLoader.__next__
  calls = {"n": 0}

  def interrupting_next(self):  # Ctrl-C before the fifth batch: checkpoint at step 4
    calls["n"] += 1
    if calls["n"] == 5:
      raise KeyboardInterrupt
    return real_next(self)

  monkeypatch.setattr(data.HostLoader, "__next__", interrupting_next)
  with pytest.raises(KeyboardInterrupt):
    loop.train(config, str(tmp_path / "resumed"))
  monkeypatch.setattr(data.HostLoader, "__next__", real_next)
  loop.train(config, str(tmp_path / "resumed"))
  step, resumed, _ = _final_params(tmp_path / "resumed", config)
  assert step == 6
  jax.tree.map(np.testing.assert_array_equal, resumed, straight)  # params, mask, opt state
