"""Schedules and optimisers against hand-written PyTorch-style references."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssljax.config import default_config
from ssljax.train.optim import build_optimizer, build_schedule, peak_learning_rate


def _optim(**overrides):
  optim = default_config().optim
  for key, value in overrides.items():
    optim[key] = value
  return optim


def _constant(lr: float):
  """A constant schedule at `lr` (global batch = base batch size)."""
  optim = _optim(schedule="constant", lr=lr, base_batch_size=256)
  return build_schedule(optim, global_batch=256, total_steps=10, steps_per_epoch=5)


def _params_and_grads(num_steps: int, seed: int = 0):
  rng = np.random.default_rng(seed)
  draw = lambda: {"w": rng.normal(size=(3, 2)), "b": rng.normal(size=(2,))}
  return draw(), [draw() for _ in range(num_steps)]


def _run_optax(tx: optax.GradientTransformation, params, grads):
  """Parameters after each step of `tx` applied to the fixed gradient sequence."""
  params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
  state = tx.init(params)
  update = jax.jit(tx.update)
  history = []
  for g in grads:
    updates, state = update(jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), g), state,
                            params)
    params = optax.apply_updates(params, updates)
    history.append(params)
  return history


def _assert_histories_close(actual, expected, rtol=1e-5, atol=1e-6):
  assert len(actual) == len(expected)
  for step, (a, e) in enumerate(zip(actual, expected)):
    for name in e:
      np.testing.assert_allclose(a[name], e[name], rtol=rtol, atol=atol,
                                 err_msg=f"step {step}, param {name}")


# ------------------------------------------------------------------------------ schedules


def test_peak_learning_rate_follows_the_linear_scaling_rule():
  assert peak_learning_rate(_optim(lr=0.3, base_batch_size=256), 1024) == pytest.approx(1.2)
  assert peak_learning_rate(_optim(lr=0.3, base_batch_size=256), 128) == pytest.approx(0.15)


def test_warmup_cosine_key_points():
  optim = _optim(lr=0.1, base_batch_size=256, warmup_epochs=2.0, warmup_init_fraction=0.1,
                 final_lr_fraction=0.01)
  schedule = build_schedule(optim, global_batch=512, total_steps=50, steps_per_epoch=5)
  peak, start, end = 0.2, 0.02, 0.002  # warmup = 10 steps, cosine over steps 10..50
  np.testing.assert_allclose(schedule(0), start, rtol=1e-6)
  np.testing.assert_allclose(schedule(5), (start + peak) / 2, rtol=1e-6)
  np.testing.assert_allclose(schedule(10), peak, rtol=1e-6)
  np.testing.assert_allclose(schedule(30), (peak + end) / 2, rtol=1e-6)
  np.testing.assert_allclose(schedule(50), end, rtol=1e-6)
  np.testing.assert_allclose(schedule(80), end, rtol=1e-6)  # stays at the end value

  steps = np.arange(61)
  values = np.asarray(jax.vmap(schedule)(steps))
  progress = np.clip((steps - 10) / 40, 0, 1)
  reference = np.where(steps < 10, start + (peak - start) * steps / 10,
                       end + (peak - end) * 0.5 * (1 + np.cos(np.pi * progress)))
  np.testing.assert_allclose(values, reference, rtol=1e-5, atol=1e-8)
  assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:51]) < 0)
  assert values.max() == pytest.approx(peak)


def test_warmup_cosine_edge_cases():
  no_warmup = build_schedule(_optim(lr=0.4, warmup_epochs=0.0), global_batch=256,
                             total_steps=20, steps_per_epoch=5)
  np.testing.assert_allclose(no_warmup(0), 0.4, rtol=1e-6)
  np.testing.assert_allclose(no_warmup(20), 0.0, atol=1e-8)
  # A warmup longer than the run is cut to leave one step: the peak is still reached.
  long_warmup = build_schedule(_optim(lr=0.4, warmup_epochs=100.0), global_batch=256,
                               total_steps=10, steps_per_epoch=5)
  np.testing.assert_allclose(long_warmup(0), 0.0, atol=1e-8)
  np.testing.assert_allclose(long_warmup(9), 0.4, rtol=1e-6)
  np.testing.assert_allclose(long_warmup(10), 0.0, atol=1e-8)


def test_constant_schedule_and_unknown_schedule():
  constant = build_schedule(_optim(schedule="constant", lr=0.3, base_batch_size=256),
                            global_batch=512, total_steps=10, steps_per_epoch=5)
  for step in (0, 5, 100):
    np.testing.assert_allclose(constant(step), 0.6, rtol=1e-6)
  with pytest.raises(ValueError, match="'warmup_cosine' or 'constant'.*'step'"):
    build_schedule(_optim(schedule="step"), global_batch=256, total_steps=10,
                   steps_per_epoch=5)


def test_unknown_optimizer_lists_the_valid_names():
  with pytest.raises(ValueError, match="rmsprop") as error:
    build_optimizer(_optim(name="rmsprop"), _constant(0.1))
  for name in ("sgd", "lars", "adam", "adamw"):
    assert name in str(error.value)


def test_optimizer_follows_the_schedule_step_by_step():
  schedule = build_schedule(_optim(lr=0.1, warmup_epochs=1.0), global_batch=256,
                            total_steps=6, steps_per_epoch=3)
  tx = build_optimizer(_optim(name="sgd", momentum=0.0, weight_decay=0.0), schedule)
  params, grads = _params_and_grads(5)
  expected, p = [], dict(params)
  for step, g in enumerate(grads):
    p = {k: p[k] - float(schedule(step)) * g[k] for k in p}
    expected.append(p)
  _assert_histories_close(_run_optax(tx, params, grads), expected)
  assert float(schedule(0)) == 0.0  # the first update is a no-op during warmup


# ------------------------------------------------------------------------------ optimisers


def _torch_sgd(params, grads, *, lr, momentum, weight_decay, nesterov):
  """torch.optim.SGD.step (dampening 0), one parameter at a time."""
  params, bufs, history = dict(params), {}, []
  for g in grads:
    new = {}
    for k, p in params.items():
      d = g[k] + weight_decay * p
      bufs[k] = d if k not in bufs else momentum * bufs[k] + d
      step = d + momentum * bufs[k] if nesterov else bufs[k]
      new[k] = p - lr * step
    params = new
    history.append(params)
  return history


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_matches_torch_with_coupled_weight_decay(nesterov):
  params, grads = _params_and_grads(3)
  optim = _optim(name="sgd", momentum=0.9, weight_decay=0.1, nesterov=nesterov)
  actual = _run_optax(build_optimizer(optim, _constant(0.1)), params, grads)
  expected = _torch_sgd(params, grads, lr=0.1, momentum=0.9, weight_decay=0.1,
                        nesterov=nesterov)
  _assert_histories_close(actual, expected)


def _barlow_twins_lars(params, grads, *, lr, momentum, weight_decay, eta, exclude):
  """The LARS of the Barlow Twins / BYOL PyTorch code."""
  params, mus, history = dict(params), {}, []
  for g in grads:
    new = {}
    for k, p in params.items():
      d = g[k]
      if not (exclude and p.ndim <= 1):
        d = d + weight_decay * p
        p_norm, d_norm = np.linalg.norm(p), np.linalg.norm(d)
        q = eta * p_norm / d_norm if p_norm > 0 and d_norm > 0 else 1.0
        d = d * q
      mus[k] = d if k not in mus else momentum * mus[k] + d
      new[k] = p - lr * mus[k]
    params = new
    history.append(params)
  return history


@pytest.mark.parametrize("exclude", [True, False])
def test_lars_matches_the_reference(exclude):
  params, grads = _params_and_grads(2, seed=1)
  optim = _optim(name="lars", momentum=0.9, weight_decay=0.1, lars_eta=0.2,
                 lars_exclude_bias_and_norm=exclude)
  actual = _run_optax(build_optimizer(optim, _constant(0.5)), params, grads)
  expected = _barlow_twins_lars(params, grads, lr=0.5, momentum=0.9, weight_decay=0.1,
                                eta=0.2, exclude=exclude)
  _assert_histories_close(actual, expected)
  # The rank-1 parameter follows plain momentum SGD exactly when excluded.
  plain_b = params["b"] - 0.5 * grads[0]["b"]
  assert np.allclose(actual[0]["b"], plain_b, rtol=1e-5) == exclude


def _adam_direction(m, v, g, t, b1, b2, eps):
  m = b1 * m + (1 - b1) * g
  v = b2 * v + (1 - b2) * g * g
  direction = (m / (1 - b1 ** t)) / (np.sqrt(v / (1 - b2 ** t)) + eps)
  return m, v, direction


def _reference_adam(params, grads, *, lr, weight_decay, decoupled, decay_rank1,
                    b1=0.9, b2=0.999, eps=1e-8):
  """torch.optim.Adam (coupled L2) or torch.optim.AdamW (decoupled) with lr-scaled decay."""
  params, history = dict(params), []
  m = {k: np.zeros_like(p) for k, p in params.items()}
  v = {k: np.zeros_like(p) for k, p in params.items()}
  for t, g in enumerate(grads, start=1):
    new = {}
    for k, p in params.items():
      wd = weight_decay if (decay_rank1 or p.ndim > 1) else 0.0
      d = g[k] if decoupled else g[k] + wd * p
      m[k], v[k], direction = _adam_direction(m[k], v[k], d, t, b1, b2, eps)
      new[k] = p - lr * (direction + (wd * p if decoupled else 0.0))
    params = new
    history.append(params)
  return history


def test_adam_uses_coupled_l2_on_every_parameter():
  params, grads = _params_and_grads(3, seed=2)
  optim = _optim(name="adam", weight_decay=0.5, lars_exclude_bias_and_norm=True)
  actual = _run_optax(build_optimizer(optim, _constant(0.01)), params, grads)
  expected = _reference_adam(params, grads, lr=0.01, weight_decay=0.5, decoupled=False,
                             decay_rank1=True)
  _assert_histories_close(actual, expected, rtol=1e-4)
  # ...which is not AdamW: decoupled decay gives different parameters.
  adamw = _reference_adam(params, grads, lr=0.01, weight_decay=0.5, decoupled=True,
                          decay_rank1=True)
  assert not np.allclose(actual[-1]["w"], adamw[-1]["w"], rtol=1e-4)


@pytest.mark.parametrize("exclude", [True, False])
def test_adamw_decays_decoupled_and_masks_rank1_params_when_excluded(exclude):
  params, grads = _params_and_grads(3, seed=3)
  optim = _optim(name="adamw", weight_decay=0.5, lars_exclude_bias_and_norm=exclude)
  actual = _run_optax(build_optimizer(optim, _constant(0.01)), params, grads)
  expected = _reference_adam(params, grads, lr=0.01, weight_decay=0.5, decoupled=True,
                             decay_rank1=not exclude)
  _assert_histories_close(actual, expected, rtol=1e-4)


def test_grad_clip_norm_clips_the_global_norm_before_weight_decay():
  params = {"w": np.ones((3, 2)), "b": np.ones(2)}
  big = {"w": np.zeros((3, 2)), "b": np.array([3.0, 4.0])}  # global norm 5
  small = {"w": np.full((3, 2), 0.1), "b": np.zeros(2)}  # global norm ~0.245
  optim = _optim(name="sgd", momentum=0.0, weight_decay=0.01, grad_clip_norm=1.0)
  tx = build_optimizer(optim, _constant(1.0))
  for grads, factor in ((big, 1 / 5), (small, 1.0)):
    (after,) = _run_optax(tx, params, [grads])
    for k in params:
      np.testing.assert_allclose(after[k], params[k] - (factor * grads[k] + 0.01 * params[k]),
                                 rtol=1e-6)
  unclipped = build_optimizer(_optim(name="sgd", momentum=0.0, weight_decay=0.0),
                              _constant(1.0))
  (after,) = _run_optax(unclipped, params, [big])
  np.testing.assert_allclose(after["b"], params["b"] - big["b"], rtol=1e-6)


def test_per_leaf_adam_equals_optax_adam():
  from ssljax.train.optim import scale_by_adam_per_leaf
  params = {"w": jnp.array([[0.5, -1.0], [2.0, 0.1]]), "b": jnp.array([0.3, -0.2])}
  ours, ref = scale_by_adam_per_leaf(0.9, 0.99, 1e-8), optax.scale_by_adam(0.9, 0.99, 1e-8)
  s_ours, s_ref = ours.init(params), ref.init(params)
  for i in range(4):
    grads = jax.tree.map(lambda p: jnp.sin(p * (i + 1)), params)
    u_ours, s_ours = ours.update(grads, s_ours, params)
    u_ref, s_ref = ref.update(grads, s_ref, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u_ours, u_ref)
  assert int(s_ours.count["w"]) == 4


# ------------------------------------------------------------------------ parameter groups


def test_element_wise_clipping_clips_each_entry_before_the_optimiser():
  params, grads = _params_and_grads(1)
  grads = [{"w": 3.0 * g["w"], "b": 3.0 * g["b"]} for g in grads]
  tx = build_optimizer(_optim(name="sgd", momentum=0.0, weight_decay=0.0,
                              grad_clip_value=0.5), _constant(0.1))
  actual = _run_optax(tx, params, grads)
  expected = {k: params[k] - 0.1 * np.clip(grads[0][k], -0.5, 0.5) for k in params}
  _assert_histories_close(actual, [expected])


def test_a_parameter_group_gets_its_own_optimiser_rate_and_decay():
  from ssljax.methods.base import ParamGroup
  rng = np.random.default_rng(3)
  params = {"encoder": {"w": rng.normal(size=(4, 3))},
            "mask": {"alpha": rng.normal(size=(5,)), "scale": rng.normal(size=(2, 2))}}
  grads = [jax.tree.map(lambda p: rng.normal(size=p.shape), params) for _ in range(2)]
  optim = _optim(name="lars", lars_eta=0.02, momentum=0.9, weight_decay=1e-3)
  groups = {"mask": ParamGroup(optimizer="sgd", lr_scale=0.5, weight_decay=0.0,
                               momentum=0.5, clip_value=0.3)}
  history = _run_optax(build_optimizer(optim, _constant(0.2), groups), params, grads)
  # The encoder follows the plain LARS chain, unaffected by the group.
  alone = _run_optax(build_optimizer(optim, _constant(0.2)), {"w": params["encoder"]["w"]},
                     [{"w": g["encoder"]["w"]} for g in grads])
  _assert_histories_close([h["encoder"] for h in history], alone)
  # The mask: SGD (no trust ratio, no decay) at half the rate, momentum 0.5, clipped entries.
  p = {k: np.asarray(v, np.float64) for k, v in params["mask"].items()}
  buffer = {k: np.zeros_like(v) for k, v in p.items()}
  for step, g in enumerate(grads):
    for k in p:
      buffer[k] = 0.5 * buffer[k] + np.clip(g["mask"][k], -0.3, 0.3)
      p[k] = p[k] - 0.1 * buffer[k]
    _assert_histories_close([history[step]["mask"]], [p])


def test_parameter_groups_name_existing_entries():
  from ssljax.methods.base import ParamGroup
  tx = build_optimizer(_optim(), _constant(0.1), {"uota": ParamGroup(optimizer="sgd")})
  with pytest.raises(ValueError, match=r"parameter groups \['uota'\] name no top-level params "
                                       r"entry; the entries are \['encoder'\]"):
    tx.init({"encoder": {"w": jnp.zeros(2)}})
  with pytest.raises(ValueError, match="parameter group 'uota': optimizer must be one of"):
    build_optimizer(_optim(), _constant(0.1), {"uota": ParamGroup(optimizer="rmsprop")})
  with pytest.raises(ValueError, match="parameter group 'uota': weight_decay must be >= 0"):
    build_optimizer(_optim(), _constant(0.1), {"uota": ParamGroup(weight_decay=-1.0)})


def test_restart_doubles_the_cosine_peak_from_the_switch_on():
  # The official UOTA restart: the same cosine progress, from twice the peak at the switch.
  optim = _optim(lr=0.6, base_batch_size=256, warmup_epochs=0.0, final_lr_fraction=0.001,
                 restart_fraction=0.5, restart_peak_scale=2.0)
  schedule = build_schedule(optim, global_batch=256, total_steps=100, steps_per_epoch=10)
  plain = build_schedule(_optim(lr=0.6, base_batch_size=256, warmup_epochs=0.0,
                                final_lr_fraction=0.001),
                         global_batch=256, total_steps=100, steps_per_epoch=10)
  end = 0.6 * 0.001
  for step in (0, 10, 49):
    np.testing.assert_allclose(schedule(step), plain(step), rtol=1e-6)
  for step in (50, 75, 100):
    cosine = 0.5 * (1 + np.cos(np.pi * step / 100))
    np.testing.assert_allclose(schedule(step), end + (1.2 - end) * cosine, rtol=1e-5)
  np.testing.assert_allclose(schedule(50) / plain(50), (end + (1.2 - end) * 0.5) /
                             (end + (0.6 - end) * 0.5), rtol=1e-5)
  with pytest.raises(ValueError, match=r"optim.restart_fraction must be in \[0, 1\)"):
    build_schedule(_optim(restart_fraction=1.0), global_batch=256, total_steps=10,
                   steps_per_epoch=5)
