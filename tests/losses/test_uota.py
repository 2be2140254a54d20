"""UOTA's view weights: the closed form against a loop reference of the official procedure, the
learned Gaussian model's likelihood and its fixed point, 8 devices against 1."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import (uota_gaussian_nll, uota_precision_weights, uota_second_moment,
                           uota_view_weights)
from ssljax.losses.uota import _condition_estimate, precision_from_cholesky, uota_deviations


def _embeddings(num_views=6, n=16, d=8, seed=0, outlier=None):
  """Unit vectors: per image a direction, views scattered around it (small crops more)."""
  rng = np.random.default_rng(seed)
  centre = rng.normal(size=(n, d))
  spread = np.array([0.3, 0.3] + [0.8] * (num_views - 2))[:, None, None]
  z = centre[None] + spread * rng.normal(size=(num_views, n, d))
  if outlier is not None:  # one view of image 0 replaced by an unrelated direction
    z[outlier, 0] = 5.0 * rng.normal(size=d)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def _reference(z, temperature=350.0, num_global=2, eps=1e-8):
  """The official ``_get_sample_weight``, literally, in float64."""
  z = np.asarray(z, np.float64)
  num_views, n, d = z.shape
  centre = z[:num_global].mean(axis=0)
  weights = np.empty((num_views, n))
  deviations = [[z[j, i] - centre[i] for i in range(n)] for j in range(num_views)]
  sigma = eps * np.eye(d)
  for j in range(num_views):
    for i in range(n):
      sigma += np.outer(deviations[j][i], deviations[j][i]) / (num_views * n)
  inverse = np.linalg.inv(sigma)
  u = np.array([[deviations[j][i] @ inverse @ deviations[j][i] / temperature
                 for i in range(n)] for j in range(num_views)])
  weights = num_views * n * np.exp(-u) / np.exp(-u).sum()
  return weights


@pytest.mark.parametrize("num_views,temperature", [(6, 350.0), (4, 8.0), (2, 5.0)])
def test_closed_form_matches_the_official_procedure(num_views, temperature):
  z = _embeddings(num_views=num_views)
  w = uota_view_weights(jnp.asarray(z, jnp.float32), temperature=temperature)
  np.testing.assert_allclose(w, _reference(z, temperature), rtol=2e-4)
  np.testing.assert_allclose(jnp.mean(w), 1.0, rtol=1e-6)
  if num_views == 2:  # delta_1 = -delta_2: both views of an image share their weight
    np.testing.assert_allclose(w[0], w[1], rtol=1e-5)


def test_an_out_of_distribution_view_gets_the_smallest_weight():
  z = _embeddings(num_views=6, outlier=4)
  w = np.asarray(uota_view_weights(jnp.asarray(z, jnp.float32), temperature=2.0))
  assert np.unravel_index(np.argmin(w), w.shape) == (4, 0)
  # Global views sit at half their mutual distance from the centre: favoured on average.
  assert w[:2].mean() > w[2:].mean()


def test_the_weights_carry_no_gradient():
  z = jnp.asarray(_embeddings(), jnp.float32)
  grad = jax.grad(lambda z: jnp.sum(uota_view_weights(z, temperature=3.0) * z[..., 0]))(z)
  expected = jnp.zeros_like(z).at[..., 0].set(uota_view_weights(z, temperature=3.0))
  np.testing.assert_allclose(grad, expected, rtol=1e-6, atol=1e-7)


def test_precision_weights_with_the_closed_form_precision_are_the_closed_form():
  z = jnp.asarray(_embeddings(), jnp.float32)
  delta = uota_deviations(z)
  precision = jnp.linalg.inv(uota_second_moment(delta))
  np.testing.assert_allclose(uota_precision_weights(delta, precision, temperature=4.0),
                             uota_view_weights(z, temperature=4.0), rtol=1e-4)


def test_eight_devices_equal_one_device_on_the_concatenated_batch(num_devices):
  z = jnp.asarray(_embeddings(n=16), jnp.float32)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  per_device = functools.partial(uota_view_weights, temperature=3.0, axis_name="data")
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(None, "data"),
                                  out_specs=P(None, "data"), check_vma=False))
  np.testing.assert_allclose(sharded(z), uota_view_weights(z, temperature=3.0), rtol=1e-5)
  pmapped = jax.pmap(per_device, axis_name="data", in_axes=1, out_axes=1)
  stacked = z.reshape(z.shape[0], num_devices, -1, z.shape[-1])
  np.testing.assert_allclose(pmapped(stacked).reshape(z.shape[:2]),
                             uota_view_weights(z, temperature=3.0), rtol=1e-5)


def _collapsed_embeddings(num_views=6, n=64, d=32, rank=4, noise=1e-4, seed=0):
  """Unit vectors that span `rank` directions up to `noise`: what a run whose projections
  collapse onto a few directions gives (BYOL with tiny crops on Fashion-MNIST, issue 16)."""
  rng = np.random.default_rng(seed)
  basis = np.linalg.qr(rng.normal(size=(d, rank)))[0]
  centre = rng.normal(size=(n, rank))
  z = (centre[None] + 0.3 * rng.normal(size=(num_views, n, rank))) @ basis.T
  z = z + noise * rng.normal(size=z.shape)
  return z / np.linalg.norm(z, axis=-1, keepdims=True)


def test_a_well_spread_batch_keeps_the_official_ridge():
  z = jnp.asarray(_embeddings(), jnp.float32)
  w, ridge = uota_view_weights(z, temperature=4.0, return_ridge=True)
  assert float(ridge) == np.float32(1e-8)
  np.testing.assert_array_equal(w, uota_view_weights(z, temperature=4.0, max_condition=None))


@pytest.mark.parametrize("jit", [False, True])
def test_an_ill_conditioned_second_moment_gets_a_raised_ridge(jit):
  z64 = _collapsed_embeddings()
  z = jnp.asarray(z64, jnp.float32)
  delta = z64 - z64[:2].mean(axis=0)
  flat = delta.reshape(-1, delta.shape[-1])
  moment = flat.T @ flat / flat.shape[0]
  eigenvalues = np.linalg.eigvalsh(moment + 1e-8 * np.eye(moment.shape[0]))
  assert eigenvalues[-1] / eigenvalues[0] > 1e6  # the premise, in float64
  weigh = functools.partial(uota_view_weights, temperature=32.0, return_ridge=True)
  w, ridge = (jax.jit(weigh) if jit else weigh)(z)
  np.testing.assert_allclose(ridge, 1e-8 + np.trace(moment) / 1e5, rtol=1e-4)
  # The weights are the official procedure's with that ridge, in float64.
  np.testing.assert_allclose(w, _reference(z64, 32.0, eps=float(ridge)), rtol=1e-3)
  np.testing.assert_allclose(jnp.mean(w), 1.0, rtol=1e-6)
  # Below the threshold nothing changes: the same batch with a threshold above its condition.
  _, kept = uota_view_weights(z, temperature=32.0, max_condition=1e9, return_ridge=True)
  assert float(kept) == np.float32(1e-8)


def test_the_condition_estimate_is_close_to_the_float64_condition_number():
  for noise in (3e-4, 1e-2, 1e-1):
    z = _collapsed_embeddings(d=64, n=128, noise=noise)
    delta = uota_deviations(jnp.asarray(z, jnp.float32))
    sigma = uota_second_moment(delta)
    estimate = float(_condition_estimate(sigma, jnp.linalg.cholesky(sigma)))
    eigenvalues = np.linalg.eigvalsh(np.asarray(sigma, np.float64))
    true = eigenvalues[-1] / eigenvalues[0]
    assert 0.85 * true <= estimate <= 1.01 * true, (noise, estimate, true)


def test_a_singular_second_moment_still_gets_finite_weights():
  # Exactly rank 4 of 32 and a negligible ridge: the float32 factor is not usable as it is.
  z = jnp.asarray(_collapsed_embeddings(noise=0.0), jnp.float32)
  w, ridge = uota_view_weights(z, temperature=32.0, eps=1e-30, return_ridge=True)
  assert np.isfinite(w).all() and float(ridge) > 1e-7
  never = uota_view_weights(z, temperature=32.0, eps=1e-30, max_condition=float("inf"))
  assert not np.allclose(never, w, rtol=1e-2)  # inf: never raised, as the official code


def test_the_raised_ridge_is_the_same_on_eight_devices(num_devices):
  z = jnp.asarray(_collapsed_embeddings(n=64), jnp.float32)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  per_device = functools.partial(uota_view_weights, temperature=32.0, axis_name="data",
                                 return_ridge=True)
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=P(None, "data"),
                                  out_specs=(P(None, "data"), P()), check_vma=False))
  w, ridge = sharded(z)
  w1, ridge1 = uota_view_weights(z, temperature=32.0, return_ridge=True)
  np.testing.assert_allclose(ridge, ridge1, rtol=1e-5)
  assert float(ridge1) > 1e-6
  np.testing.assert_allclose(w, w1, rtol=5e-4)


def test_bad_inputs_are_named():
  z = jnp.asarray(_embeddings(num_views=3, n=2, d=8), jnp.float32)
  with pytest.raises(ValueError, match=r"span at most \(V - 1\) N = 4 dimensions.*1e-4"):
    uota_view_weights(z)
  assert np.isfinite(uota_view_weights(z, eps=1e-3)).all()  # a larger ridge is accepted
  with pytest.raises(ValueError, match="num_global_views = 4 views, but z has 3 views"):
    uota_view_weights(z, num_global_views=4, eps=1e-3)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    uota_view_weights(jnp.asarray(_embeddings(), jnp.float32), temperature=0.0)
  with pytest.raises(ValueError, match="max_condition must be > 1 or None, got 1.0"):
    uota_view_weights(jnp.asarray(_embeddings(), jnp.float32), max_condition=1.0)
  with pytest.raises(ValueError, match="the ridge eps must be > 0 \\(official 1e-8\\), got 0.0"):
    uota_view_weights(jnp.asarray(_embeddings(), jnp.float32), eps=0.0)


def test_gaussian_nll_gradient_matches_finite_differences():
  delta = uota_deviations(jnp.asarray(_embeddings(d=4), jnp.float64 if jax.config.x64_enabled
                                      else jnp.float32))
  rng = np.random.default_rng(1)
  log_diag = jnp.asarray(rng.normal(scale=0.3, size=4) + 1.0, jnp.float32)
  lower = jnp.asarray(np.tril(rng.normal(scale=0.3, size=(4, 4)), -1), jnp.float32)
  g_diag, g_lower = jax.grad(uota_gaussian_nll, argnums=(0, 1))(log_diag, lower, delta)
  eps = 1e-2
  for k in range(4):
    bump = jnp.zeros(4).at[k].set(eps)
    numeric = (uota_gaussian_nll(log_diag + bump, lower, delta) -
               uota_gaussian_nll(log_diag - bump, lower, delta)) / (2 * eps)
    np.testing.assert_allclose(g_diag[k], numeric, rtol=1e-2, atol=1e-4)
  bump = jnp.zeros((4, 4)).at[2, 1].set(eps)
  numeric = (uota_gaussian_nll(log_diag, lower + bump, delta) -
             uota_gaussian_nll(log_diag, lower - bump, delta)) / (2 * eps)
  np.testing.assert_allclose(g_lower[2, 1], numeric, rtol=1e-2, atol=1e-4)
  np.testing.assert_array_equal(g_lower[1, 2], 0.0)  # the upper triangle is not a parameter


def test_learned_precision_converges_to_the_closed_form_on_a_stationary_distribution():
  # Views drawn afresh every step from one fixed distribution: maximum likelihood by Adam
  # (as the learned mode's parameter group) reaches the precision of its second moment.
  d, views, n = 4, 6, 64
  rng = np.random.default_rng(2)
  centres = rng.normal(size=(n, d))
  mixing = np.eye(d) + 0.5 * rng.normal(size=(d, d))
  spread = np.array([0.1, 0.1, 0.3, 0.3, 0.3, 0.3])[:, None, None]

  def sample(key):
    noise = jax.random.normal(key, (views, n, d)) @ jnp.asarray(mixing.T, jnp.float32)
    return uota_deviations(jnp.asarray(centres, jnp.float32)[None] + spread * noise)

  params = {"log_diag": jnp.zeros(d), "lower": jnp.zeros((d, d))}
  tx = optax.adam(optax.cosine_decay_schedule(3e-2, 3000))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, key):
    grads = jax.grad(lambda p: uota_gaussian_nll(p["log_diag"], p["lower"], sample(key)))(params)
    updates, opt_state = tx.update(grads, opt_state)
    return optax.apply_updates(params, updates), opt_state

  for i in range(3000):
    params, opt_state = step(params, opt_state, jax.random.key(i))
  # The closed form on a large sample of the same distribution.
  big = jnp.concatenate([sample(jax.random.key(10**6 + i)) for i in range(50)], axis=1)
  closed = jnp.linalg.inv(uota_second_moment(big, eps=0.0))
  learned = precision_from_cholesky(params["log_diag"], params["lower"])
  np.testing.assert_allclose(learned, closed, rtol=0.05, atol=0.05 * float(jnp.max(closed)))


def test_the_ridge_bounds_the_fitted_precision_at_the_closed_form_with_that_ridge():
  # Deviations in a 2-d subspace of R^4 (rank-deficient, as early in training): without a
  # ridge the likelihood has no minimum (the precision grows without bound off the subspace);
  # with (ridge / 2) tr(P) its minimum is (Sigma + ridge I)^{-1}, the closed form with eps.
  rng = np.random.default_rng(5)
  basis = np.linalg.qr(rng.normal(size=(4, 2)))[0]
  sample = rng.normal(size=(6, 32, 2)) * np.array([0.3, 0.1])
  centres = rng.normal(size=(32, 2))
  delta = uota_deviations(jnp.asarray((centres[None] + sample) @ basis.T, jnp.float32))
  ridge = 1e-2
  tx = optax.adam(optax.cosine_decay_schedule(5e-2, 4000))

  def fit(r, steps):
    params = {"log_diag": jnp.zeros(4), "lower": jnp.zeros((4, 4))}
    opt_state = tx.init(params)
    objective = lambda p: uota_gaussian_nll(p["log_diag"], p["lower"], delta, ridge=r)
    update = jax.jit(lambda p, o: tx.update(jax.grad(objective)(p), o))
    for _ in range(steps):
      updates, opt_state = update(params, opt_state)
      params = optax.apply_updates(params, updates)
    return params

  params = fit(ridge, 4000)
  closed = jnp.linalg.inv(uota_second_moment(delta, eps=ridge))
  learned = precision_from_cholesky(params["log_diag"], params["lower"])
  np.testing.assert_allclose(learned, closed, rtol=0.02, atol=0.02 * float(jnp.max(closed)))
  assert float(jnp.linalg.eigvalsh(learned).max()) <= 1.02 / ridge
  # Without the ridge the same fit runs away off the subspace.
  unbounded = fit(0.0, 1000)
  runaway = precision_from_cholesky(unbounded["log_diag"], unbounded["lower"])
  assert float(jnp.linalg.eigvalsh(runaway).max()) > 10 / ridge
  with pytest.raises(ValueError, match="ridge must be >= 0"):
    uota_gaussian_nll(params["log_diag"], params["lower"], delta, ridge=-1.0)


def test_float32_solves_the_official_estimator_where_the_default_guard_would_step_in():
  # Why the reproduction configs (swav_uota:imagenet, :cifar10) keep max_condition = inf: at
  # the official shapes (V = 8, n = 256, d = 128) with a spectrum falling over 3.5 decades,
  # cond(Sigma) ~ 6.6e5 is above the default guard's 1e5, yet the float32 weights equal the
  # float64 official ones to 1e-3 while the guard's shrinkage moves them by > 0.1.
  num_views, n, dim = 8, 256, 128
  rng = np.random.default_rng(0)
  scale = 0.2 * 10 ** (-3.5 * np.arange(dim) / (dim - 1))
  basis = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
  centre = (rng.normal(size=(n, dim)) * scale) @ basis.T
  centre /= np.linalg.norm(centre, axis=-1, keepdims=True)
  spread = np.array([0.25, 0.25] + [0.5] * (num_views - 2))[:, None, None]
  z = centre[None] + spread * (rng.normal(size=(num_views, n, dim)) * scale) @ basis.T
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  delta = (z - z[:2].mean(axis=0)).reshape(-1, dim)
  sigma = delta.T @ delta / delta.shape[0] + 1e-8 * np.eye(dim)
  assert 3e5 < np.linalg.cond(sigma) < 3e6
  official = _reference(z)
  z32 = jnp.asarray(z, jnp.float32)
  solved = np.asarray(uota_view_weights(z32, temperature=350.0, max_condition=float("inf")))
  guarded, ridge = uota_view_weights(z32, temperature=350.0, return_ridge=True)  # 1e5
  assert np.abs(solved - official).max() < 1e-3
  assert float(ridge) > 1e-8 and np.abs(np.asarray(guarded) - official).max() > 0.1
