"""nt_xent: hand-computed values, distributed equivalence, and descent."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import nt_xent


def _reference_nt_xent(z_a: np.ndarray, z_b: np.ndarray, t: float) -> float:
  """Loop-by-loop SPEC 6.1 formula, written independently of the vectorised code."""
  z = []
  for a, b in zip(z_a, z_b):
    z.append(a / np.linalg.norm(a))
    z.append(b / np.linalg.norm(b))
  total = 0.0
  for i in range(len(z)):
    pos = i + 1 if i % 2 == 0 else i - 1
    denom = sum(math.exp(z[i] @ z[k] / t) for k in range(len(z)) if k != i)
    total += -math.log(math.exp(z[i] @ z[pos] / t) / denom)
  return total / len(z)


def test_hand_computed_orthogonal_case():
  # Two images, identical views, orthogonal across images, t = 1. Every anchor sees its
  # positive at cosine 1 and two negatives at cosine 0: loss = log(e + 2) - 1.
  z = jnp.eye(2)
  loss, metrics = nt_xent(z, z, temperature=1.0)
  np.testing.assert_allclose(loss, math.log(math.e + 2) - 1, rtol=1e-6)
  assert metrics["accuracy"] == 1.0
  np.testing.assert_allclose(metrics["pos_sim"], 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics["neg_sim"], 0.0, atol=1e-7)


@pytest.mark.parametrize("t", [0.1, 0.5, 2.0])
def test_matches_loop_reference(t):
  rng = np.random.default_rng(0)
  z_a = rng.normal(size=(6, 5)).astype(np.float32)
  z_b = rng.normal(size=(6, 5)).astype(np.float32)
  loss, _ = nt_xent(jnp.asarray(z_a), jnp.asarray(z_b), temperature=t)
  np.testing.assert_allclose(loss, _reference_nt_xent(z_a, z_b, t), rtol=1e-5)


def test_scale_invariant_and_symmetric():
  rng = np.random.default_rng(1)
  z_a = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  z_b = jnp.asarray(rng.normal(size=(8, 4)), jnp.float32)
  base, _ = nt_xent(z_a, z_b, temperature=0.2)
  scaled, _ = nt_xent(3.0 * z_a, 0.5 * z_b, temperature=0.2)
  swapped, _ = nt_xent(z_b, z_a, temperature=0.2)
  np.testing.assert_allclose(scaled, base, rtol=1e-5)
  np.testing.assert_allclose(swapped, base, rtol=1e-5)


def test_bad_inputs():
  with pytest.raises(ValueError, match="temperature"):
    nt_xent(jnp.ones((2, 3)), jnp.ones((2, 3)), temperature=0.0)
  with pytest.raises(AssertionError):
    nt_xent(jnp.ones((2, 3)), jnp.ones((3, 3)), temperature=0.1)


def _linear_model_loss(w, x_a, x_b, axis_name=None):
  loss, _ = nt_xent(x_a @ w, x_b @ w, temperature=0.3, axis_name=axis_name)
  return loss


def test_distributed_value_and_gradient_equal_single_device(num_devices):
  rng = np.random.default_rng(2)
  x_a = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  x_b = jnp.asarray(rng.normal(size=(32, 6)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)
  single_loss, single_grad = jax.value_and_grad(_linear_model_loss)(w, x_a, x_b)

  def per_device(w, x_a, x_b):
    loss, grad = jax.value_and_grad(_linear_model_loss)(w, x_a, x_b, "data")
    return jax.lax.pmean(loss, "data"), jax.lax.pmean(grad, "data")

  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.jit(jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P("data"), P("data")),
                                  out_specs=(P(), P()), check_vma=False))
  loss, grad = sharded(w, x_a, x_b)
  np.testing.assert_allclose(loss, single_loss, rtol=1e-5)
  np.testing.assert_allclose(grad, single_grad, rtol=1e-4, atol=1e-6)

  pmapped = jax.pmap(per_device, axis_name="data", in_axes=(None, 0, 0))
  p_loss, p_grad = pmapped(w, x_a.reshape(num_devices, 4, 6), x_b.reshape(num_devices, 4, 6))
  np.testing.assert_allclose(p_loss[0], single_loss, rtol=1e-5)
  np.testing.assert_allclose(p_grad[3], single_grad, rtol=1e-4, atol=1e-6)


def test_gradient_wrt_embeddings_matches_single_device(num_devices):
  # The gradient each device gets for its own rows must include what the other devices'
  # anchors send back through the gather: it equals N_dev x the single-device gradient rows.
  rng = np.random.default_rng(3)
  z_a = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  z_b = jnp.asarray(rng.normal(size=(16, 3)), jnp.float32)
  single = jax.grad(lambda a, b: nt_xent(a, b, temperature=0.5)[0], argnums=(0, 1))(z_a, z_b)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  grad_fn = jax.grad(lambda a, b: nt_xent(a, b, temperature=0.5, axis_name="data")[0],
                     argnums=(0, 1))
  sharded = jax.jit(jax.shard_map(grad_fn, mesh=mesh, in_specs=(P("data"), P("data")),
                                  out_specs=(P("data"), P("data")), check_vma=False))
  g_a, g_b = sharded(z_a, z_b)
  np.testing.assert_allclose(g_a / num_devices, single[0], rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(g_b / num_devices, single[1], rtol=1e-4, atol=1e-6)


def test_gradient_matches_finite_differences():
  rng = np.random.default_rng(4)
  z_a = jnp.asarray(rng.normal(size=(4, 3)), jnp.float64 if jax.config.x64_enabled else
                    jnp.float32)
  z_b = jnp.asarray(rng.normal(size=(4, 3)), z_a.dtype)
  f = lambda a: nt_xent(a, z_b, temperature=0.5)[0]
  g = jax.grad(f)(z_a)
  eps = 1e-2
  for idx in [(0, 0), (2, 1), (3, 2)]:
    e = jnp.zeros_like(z_a).at[idx].set(eps)
    fd = (f(z_a + e) - f(z_a - e)) / (2 * eps)
    np.testing.assert_allclose(g[idx], fd, rtol=2e-2, atol=2e-4)


def test_gradient_steps_lower_the_loss():
  rng = np.random.default_rng(5)
  z = jnp.asarray(rng.normal(size=(16, 8)), jnp.float32)
  z_a = z + 0.5 * jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  z_b = z + 0.5 * jnp.asarray(rng.normal(size=z.shape), jnp.float32)
  f = lambda ab: nt_xent(ab[0], ab[1], temperature=0.2)[0]
  start = f((z_a, z_b))
  params = (z_a, z_b)
  for _ in range(20):
    grads = jax.grad(f)(params)
    params = jax.tree.map(lambda p, g: p - 0.5 * g, params, grads)
  assert f(params) < 0.5 * start
