"""CLD's batch k-means and cross-level loss: loop references, hand-computed values, gradients
by finite differences, and the gathered (global) option on 8 devices vs 1."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from ssljax.losses import batch_kmeans, cld, cld_terms


def _reference_kmeans(x: np.ndarray, k: int, iters: int):
  """The official spectral_clustering.KMeans, loop by loop in float64."""
  c = x[:k].copy()
  for _ in range(iters):
    labels = np.array([np.argmin([np.sum((xi - cj)**2) for cj in c]) for xi in x])
    c = np.zeros_like(c)
    for kk in range(k):
      members = x[labels == kk]
      c[kk] = members.sum(0) / max(len(members), 1)
  return labels, c


def _reference_cld(ga, gb, k, iters, t):
  la, ca = _reference_kmeans(ga, k, iters)
  lb, cb = _reference_kmeans(gb, k, iters)

  def ce(g, c, labels):
    total = 0.0
    for gi, li in zip(g, labels):
      logits = c @ gi / t
      total += -(logits[li] - math.log(np.sum(np.exp(logits))))
    return total / len(g)

  return 0.5 * (ce(ga, cb, lb) + ce(gb, ca, la))


def _unit_rows(seed, n=16, d=6):
  x = np.random.default_rng(seed).normal(size=(n, d))
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_kmeans_recovers_well_separated_clusters():
  rng = np.random.default_rng(0)
  centres = np.array([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
  truth = np.array([0, 1, 2] + list(rng.integers(0, 3, size=27)))  # first 3 rows: one each
  x = centres[truth] + rng.normal(scale=0.1, size=(30, 2))
  labels, centroids = batch_kmeans(jnp.asarray(x, jnp.float32), num_clusters=3, num_iters=5)
  np.testing.assert_array_equal(labels, truth)
  for kk in range(3):
    np.testing.assert_allclose(centroids[kk], x[truth == kk].mean(0), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k,iters", [(4, 5), (7, 1), (3, 10)])
def test_kmeans_matches_loop_reference(k, iters):
  x = _unit_rows(1, n=24, d=5)
  labels, centroids = batch_kmeans(jnp.asarray(x, jnp.float32), num_clusters=k,
                                   num_iters=iters)
  ref_labels, ref_centroids = _reference_kmeans(x, k, iters)
  np.testing.assert_array_equal(labels, ref_labels)
  np.testing.assert_allclose(centroids, ref_centroids, rtol=1e-5, atol=1e-6)
  assert labels.dtype == jnp.int32 and centroids.shape == (k, 5)


def test_empty_clusters_get_zero_centroids():
  # Rows 0 and 1 are the same point: centroid 1 starts on it and ties go to the lower index,
  # so cluster 1 is empty after the first assignment and stays at zero.
  x = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.1]], jnp.float32)
  labels, centroids = batch_kmeans(x, num_clusters=3, num_iters=3)
  np.testing.assert_array_equal(labels, [0, 0, 2, 2])
  np.testing.assert_allclose(centroids, [[1.0, 0.0], [0.0, 0.0], [0.0, 1.05]], rtol=1e-6)


def test_kmeans_gradient_flows_through_centroids_not_labels():
  # d/dx of sum(w * centroids) by central differences, with steps small enough to keep the
  # labels: equals the gradient of the last mean with the labels held fixed.
  x = _unit_rows(2, n=12, d=4)
  w = np.random.default_rng(3).normal(size=(3, 4))
  f = lambda x: jnp.sum(jnp.asarray(w, jnp.float32)
                        * batch_kmeans(x, num_clusters=3, num_iters=5)[1])
  grad = np.asarray(jax.grad(f)(jnp.asarray(x, jnp.float32)))
  labels, _ = _reference_kmeans(x, 3, 5)
  counts = np.bincount(labels, minlength=3)
  np.testing.assert_allclose(grad, w[labels] / counts[labels][:, None], rtol=1e-5)
  f64 = lambda x: float(np.sum(w * _reference_kmeans(x, 3, 5)[1]))
  h = 1e-5
  for i, j in [(0, 0), (5, 2), (11, 3)]:
    e = np.zeros_like(x)
    e[i, j] = h
    np.testing.assert_allclose(grad[i, j], (f64(x + e) - f64(x - e)) / (2 * h), rtol=1e-4,
                               atol=1e-6)
  # The labels carry no gradient: the gradient of a function of the labels alone is zero.
  g_labels = jax.grad(lambda x: jnp.sum(batch_kmeans(x, num_clusters=3)[0] * x[:, 0]))
  np.testing.assert_allclose(g_labels(jnp.asarray(x, jnp.float32))[:, 1:], 0.0)


def test_cld_hand_computed():
  # Four unit rows, K = 2, one round. View a: e1, e2, e1, e2 (init e1, e2) -> labels
  # (0, 1, 0, 1), centroids (e1, e2). View b: e1, e2, e2, e2 (init e1, e2) -> labels
  # (0, 1, 1, 1), centroids (e1, e2). With T = 0.5 every logit is 2 (same axis) or 0, and in
  # each direction one row of four picks the wrong centroid: a -> b row 2 (e1, label 1),
  # b -> a row 2 (e2, label 0).
  e1, e2 = [1.0, 0.0], [0.0, 1.0]
  ga = jnp.asarray([e1, e2, e1, e2], jnp.float32)
  gb = jnp.asarray([e1, e2, e2, e2], jnp.float32)
  lo, hi = math.log1p(math.exp(-2.0)), 2.0 + math.log1p(math.exp(-2.0))  # CE right / wrong
  expected = 0.5 * ((3 * lo + hi) / 4 + (3 * lo + hi) / 4)
  loss, metrics = cld(ga, gb, num_clusters=2, temperature=0.5, num_iters=1)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  np.testing.assert_allclose(metrics["group_acc"], 0.75)
  np.testing.assert_allclose(metrics["nonempty_clusters"], 2.0)


def test_cld_matches_loop_reference_and_its_terms():
  ga, gb = _unit_rows(4, n=20, d=8), _unit_rows(5, n=20, d=8)
  loss, _ = cld(jnp.asarray(ga, jnp.float32), jnp.asarray(gb, jnp.float32), num_clusters=5,
                temperature=0.2, num_iters=5)
  np.testing.assert_allclose(loss, _reference_cld(ga, gb, 5, 5, 0.2), rtol=1e-5)
  terms, _ = cld_terms(jnp.asarray(ga, jnp.float32), jnp.asarray(gb, jnp.float32),
                       num_clusters=5, temperature=0.2)
  assert terms.shape == (2, 20)
  np.testing.assert_allclose(jnp.sum(jnp.mean(terms, axis=1)), loss, rtol=1e-6)


def test_cld_gradient_by_finite_differences():
  # Both inputs get a gradient (g_b also through its centroids); labels are held by small
  # steps, so the float64 reference is differentiable there.
  ga, gb = _unit_rows(6, n=10, d=4), _unit_rows(7, n=10, d=4)
  f = lambda a, b: cld(a, b, num_clusters=3, temperature=0.3)[0]
  grad_a, grad_b = jax.grad(f, argnums=(0, 1))(jnp.asarray(ga, jnp.float32),
                                              jnp.asarray(gb, jnp.float32))
  h = 1e-5
  for which, grad in ((0, grad_a), (1, grad_b)):
    for i, j in [(0, 1), (4, 0), (9, 3)]:
      e = np.zeros_like(ga)
      e[i, j] = h
      args_p, args_m = [ga, gb], [ga, gb]
      args_p[which], args_m[which] = args_p[which] + e, args_m[which] - e
      fd = (_reference_cld(*args_p, 3, 5, 0.3) - _reference_cld(*args_m, 3, 5, 0.3)) / (2 * h)
      np.testing.assert_allclose(grad[i, j], fd, rtol=1e-3, atol=1e-5)
  assert np.abs(np.asarray(grad_b)).sum() > 0


def _sharded(fn, in_specs, out_specs):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                               check_vma=False))


def test_global_kmeans_on_8_devices_equals_one_device_on_the_gathered_batch(num_devices):
  ga = jnp.asarray(_unit_rows(8, n=32, d=6), jnp.float32)
  gb = jnp.asarray(_unit_rows(9, n=32, d=6), jnp.float32)
  # Labels and centroids.
  labels, centroids = batch_kmeans(ga, num_clusters=6)
  per_device = lambda x: batch_kmeans(x, num_clusters=6, axis_name="data")
  sharded_labels, sharded_centroids = _sharded(per_device, P("data"), (P("data"), P()))(ga)
  np.testing.assert_array_equal(sharded_labels, labels)
  np.testing.assert_allclose(sharded_centroids, centroids, rtol=1e-6)
  # Loss and gradient: mean over devices of the per-device values / gradients.
  w = jnp.asarray(np.random.default_rng(1).normal(size=(6, 6)), jnp.float32)
  loss_of = lambda w, a, b, axis: cld(a @ w, b @ w, num_clusters=6, temperature=0.2,
                                      axis_name=axis)[0]
  loss, grad = jax.value_and_grad(loss_of)(w, ga, gb, None)

  def step(w, a, b):
    value, g = jax.value_and_grad(loss_of)(w, a, b, "data")
    return jax.lax.pmean(value, "data"), jax.lax.pmean(g, "data")

  sharded_loss, sharded_grad = _sharded(step, (P(), P("data"), P("data")), (P(), P()))(w, ga, gb)
  np.testing.assert_allclose(sharded_loss, loss, rtol=1e-5)
  np.testing.assert_allclose(sharded_grad, grad, rtol=1e-4, atol=1e-6)
  pmapped = jax.pmap(step, axis_name="data", in_axes=(None, 0, 0))(
      w, ga.reshape(num_devices, 4, 6), gb.reshape(num_devices, 4, 6))
  np.testing.assert_allclose(pmapped[1][0], grad, rtol=1e-4, atol=1e-6)
  # Per-device k-means (the official default) is a different loss.
  local = _sharded(lambda w, a, b: jax.lax.pmean(
      cld(a @ w, b @ w, num_clusters=2, temperature=0.2)[0], "data"),
                   (P(), P("data"), P("data")), P())(w, ga, gb)
  assert not np.allclose(local, cld(ga @ w, gb @ w, num_clusters=2, temperature=0.2)[0])


def test_bad_inputs_name_the_fix():
  x = jnp.ones((4, 3))
  with pytest.raises(ValueError, match="num_clusters = 5 .* 4 .*this device's batch"):
    batch_kmeans(x, num_clusters=5)
  with pytest.raises(ValueError, match="num_clusters = 0"):
    batch_kmeans(x, num_clusters=0)
  with pytest.raises(ValueError, match="num_iters must be >= 0"):
    batch_kmeans(x, num_clusters=2, num_iters=-1)
  with pytest.raises(ValueError, match="temperature must be > 0"):
    cld(x, x, num_clusters=2, temperature=0.0)
  with pytest.raises(ValueError, match="global_kmeans"):
    cld(x, x, num_clusters=8, temperature=0.2)
  with pytest.raises(ValueError, match="num_clusters = 4 must be at least 1 and below the 4 "
                     "rows clustered \\(this device's batch\\).*instance discrimination"):
    cld(x, x, num_clusters=4, temperature=0.2)
  with pytest.raises(AssertionError):
    cld(x, jnp.ones((5, 3)), num_clusters=2, temperature=0.2)
  # On 8 devices with 4 rows each, K = 8 fits the gathered batch but not one device's rows.
  rows = jnp.asarray(_unit_rows(10, n=32, d=3), jnp.float32)
  _sharded(lambda g: batch_kmeans(g, num_clusters=8, axis_name="data")[0], P("data"),
           P("data"))(rows)
  with pytest.raises(ValueError, match="num_clusters = 8 .* 4 "):
    _sharded(lambda g: batch_kmeans(g, num_clusters=8)[0], P("data"), P("data"))(rows)
  with pytest.raises(ValueError, match="num_clusters = 32 must be at least 1 and below the 32 "
                     "rows clustered \\(the global batch gathered over devices\\)"):
    _sharded(lambda g: cld(g, g, num_clusters=32, temperature=0.2, axis_name="data")[0],
             P("data"), P())(rows)
