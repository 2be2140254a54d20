"""barlow_twins: hand-computed values, MetaMask's variant, distributed equivalence, descent."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import barlow_twins


def _reference_barlow(z_a: np.ndarray, z_b: np.ndarray, lam: float,
                      unbiased: bool) -> tuple[float, np.ndarray]:
  """Element-by-element SPEC 6.5 / 4.3 formula, written independently of the vectorised code.

  Returns the loss and the cross-correlation matrix C.
  """
  n, d = z_a.shape

  def standardize(z):
    out = np.empty_like(z, dtype=np.float64)
    for j in range(d):
      column = [float(v) for v in z[:, j]]
      mean = sum(column) / n
      square_sum = sum((v - mean) ** 2 for v in column)
      # torch.std (unbiased, no eps) for MetaMask; BatchNorm1d (biased, eps 1e-5) otherwise.
      spread = (square_sum / (n - 1)) ** 0.5 if unbiased else (square_sum / n + 1e-5) ** 0.5
      for k in range(n):
        out[k, j] = (column[k] - mean) / spread
    return out

  a, b = standardize(z_a), standardize(z_b)
  total = 0.0
  corr = np.empty((d, d))
  for i in range(d):
    for j in range(d):
      corr[i, j] = sum(a[k, i] * b[k, j] for k in range(n)) / n
      total += (1.0 - corr[i, j]) ** 2 if i == j else lam * corr[i, j] ** 2
  return total, corr


def test_hand_computed_two_perfectly_correlated_features():
  # Two rows, two identical features equal to +-1: mean 0, biased variance 1, unbiased 2.
  # Biased: std(z) = z / sqrt(1 + eps), every C_ij = 1 / (1 + eps).
  # Unbiased: std(z) = z / sqrt(2), every C_ij = (1/2 + 1/2) / 2 = 0.5.
  z = jnp.array([[1.0, 1.0], [-1.0, -1.0]])
  lam = 0.25
  c = 1.0 / (1.0 + 1e-5)
  loss, metrics = barlow_twins(z, z, lambda_offdiag=lam)
  np.testing.assert_allclose(loss, 2 * (1 - c) ** 2 + lam * 2 * c ** 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["on_diag_mean"], c, rtol=1e-6)
  np.testing.assert_allclose(metrics["off_diag_mean_sq"], c ** 2, rtol=1e-6)
  loss, metrics = barlow_twins(z, z, lambda_offdiag=lam, unbiased_std=True)
  np.testing.assert_allclose(loss, 2 * 0.5 ** 2 + lam * 2 * 0.5 ** 2, rtol=1e-6)
  np.testing.assert_allclose(metrics["on_diag_mean"], 0.5, rtol=1e-6)


@pytest.mark.parametrize("unbiased", [False, True])
@pytest.mark.parametrize("lam", [0.0051, 0.5])
def test_matches_loop_reference(unbiased, lam):
  rng = np.random.default_rng(0)
  z_a = rng.normal(size=(7, 5)).astype(np.float32)
  z_b = (0.5 * z_a + rng.normal(size=(7, 5))).astype(np.float32)
  loss, metrics = barlow_twins(jnp.asarray(z_a), jnp.asarray(z_b), lambda_offdiag=lam,
                               unbiased_std=unbiased)
  expected, corr = _reference_barlow(z_a, z_b, lam, unbiased)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert loss.dtype == jnp.float32
  off_diagonal = corr[~np.eye(5, dtype=bool)]
  np.testing.assert_allclose(metrics["on_diag_mean"], np.mean(np.diag(corr)), rtol=1e-5)
  np.testing.assert_allclose(metrics["off_diag_mean_sq"], np.mean(off_diagonal ** 2), rtol=1e-5)


def test_symmetric_scale_invariant_and_float32_from_bfloat16():
  rng = np.random.default_rng(1)
  z_a = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  z_b = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  base, _ = barlow_twins(z_a, z_b, unbiased_std=True)
  swapped, _ = barlow_twins(z_b, z_a, unbiased_std=True)
  scale = jnp.array([3.0, 0.5, 2.0, 7.0])
  affine, _ = barlow_twins(scale * z_a + 4.0, z_b - 1.0, unbiased_std=True)
  np.testing.assert_allclose(swapped, base, rtol=1e-5)
  np.testing.assert_allclose(affine, base, rtol=1e-5)
  low, _ = barlow_twins(z_a.astype(jnp.bfloat16), z_b.astype(jnp.bfloat16))
  assert low.dtype == jnp.float32


def test_bad_inputs():
  with pytest.raises(ValueError, match="lambda_offdiag must be >= 0"):
    barlow_twins(jnp.ones((4, 3)), jnp.ones((4, 3)), lambda_offdiag=-0.1)
  with pytest.raises(ValueError, match="global batch of at least 2 rows"):
    barlow_twins(jnp.ones((1, 3)), jnp.ones((1, 3)))
  with pytest.raises(AssertionError):
    barlow_twins(jnp.ones((2, 3)), jnp.ones((3, 3)))
  with pytest.raises(AssertionError):
    barlow_twins(jnp.ones((2, 3, 1)), jnp.ones((2, 3, 1)))


def _linear_model_loss(w, x_a, x_b, unbiased, axis_name=None):
  loss, metrics = barlow_twins(x_a @ w, x_b @ w, lambda_offdiag=0.1, unbiased_std=unbiased,
                               axis_name=axis_name)
  return loss, metrics


@pytest.mark.parametrize("unbiased", [False, True])
def test_distributed_value_and_gradient_equal_single_device(num_devices, unbiased):
  rng = np.random.default_rng(2)
  x_a = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  x_b = jnp.asarray(x_a + 0.5 * rng.normal(size=(32, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  value_and_grad = jax.value_and_grad(_linear_model_loss, has_aux=True)
  (single_loss, single_metrics), single_grad = value_and_grad(w, x_a, x_b, unbiased)

  def per_device(w, x_a, x_b):
    (loss, metrics), grad = value_and_grad(w, x_a, x_b, unbiased, "data")
    return jax.lax.pmean((loss, metrics, grad), "data")

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                  out_specs=P(), check_vma=False))
  loss, metrics, grad = sharded(w, x_a, x_b)
  np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(metrics["on_diag_mean"], single_metrics["on_diag_mean"], rtol=1e-5)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-4, atol=1e-6)

  pmapped = jax.pmap(per_device, axis_name="data", in_axes=(None, 0, 0))
  p_loss, _, p_grad = pmapped(w, x_a.reshape(num_devices, 4, 6), x_b.reshape(num_devices, 4, 6))
  np.testing.assert_allclose(p_loss[0], single_loss, rtol=1e-5)
  np.testing.assert_allclose(p_grad[5], single_grad, rtol=1e-4, atol=1e-6)


def test_every_device_returns_the_global_loss_and_gradient_rows_scale_by_devices(num_devices):
  # Each device's value is the whole global loss (not a share); the gradient each device gets
  # for its own rows is num_devices x the single-device rows (the psum transpose adds the
  # identical cotangents of every device's loss), so pmean of parameter gradients is exact.
  rng = np.random.default_rng(3)
  z_a = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  z_b = jnp.asarray(z_a + rng.normal(size=(16, 3)), jnp.float32)
  loss_fn = lambda a, b, axis_name=None: barlow_twins(a, b, axis_name=axis_name)[0]
  single_loss = loss_fn(z_a, z_b)
  single = jax.grad(loss_fn, argnums=(0, 1))(z_a, z_b)

  def per_device(a, b):
    loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(a, b, "data")
    return loss[None], grads

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P("data"), P("data")),
                                  out_specs=(P("data"), (P("data"), P("data"))),
                                  check_vma=False))
  losses, (g_a, g_b) = sharded(z_a, z_b)
  np.testing.assert_allclose(losses, np.full(num_devices, single_loss), rtol=1e-5)
  np.testing.assert_allclose(g_a / num_devices, single[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_b / num_devices, single[1], rtol=1e-4, atol=1e-6)


def test_gradient_steps_lower_the_loss():
  # Noisy views of redundant features (random mixing): both terms start far from zero. The
  # gradient of each row scales with 1 / N, hence the large step.
  rng = np.random.default_rng(5)
  z = jnp.asarray(rng.normal(size=(32, 8)) @ rng.normal(size=(8, 8)), jnp.float32)
  z_a = z + jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  z_b = z + jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  f = lambda ab: barlow_twins(ab[0], ab[1], lambda_offdiag=1.0)[0]
  grad_fn = jax.jit(jax.value_and_grad(f))
  params = (z_a, z_b)
  start, _ = grad_fn(params)
  for _ in range(30):
    _, grads = grad_fn(params)
    params = jax.tree.map(lambda p, g: p - 5.0 * g, params, grads)
  final, _ = grad_fn(params)
  assert final < 0.2 * start, (float(start), float(final))
