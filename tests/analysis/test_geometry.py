"""ssljax.analysis.geometry: every metric on synthetic data with a known answer."""

import jax.numpy as jnp
import numpy as np
import pytest

from ssljax.analysis import geometry


def _orthonormal(rng, d, r):
  return np.linalg.qr(rng.normal(size=(d, r)))[0]


def test_invariant_map_has_ratio_zero_and_cosine_one():
  rng = np.random.default_rng(0)
  clean = rng.normal(size=(40, 6)) + 2.0
  views = np.repeat(clean[:, None], 5, axis=1)  # every copy maps to the same point
  out = geometry.invariance(views, clean)
  assert out["ratio"] == pytest.approx(0.0, abs=1e-12)
  assert out["positive_cosine"] == pytest.approx(1.0)


def test_ratio_of_independent_noise_matches_its_closed_form():
  # Copies x_i + e_ik with e ~ N(0, s^2 I): E||a_k - a_k'||^2 = 2 d s^2; clean points
  # x_i ~ N(0, c^2 I): E_{i != j} ||x_i - x_j||^2 = 2 d c^2, so the ratio is s^2 / c^2.
  rng = np.random.default_rng(1)
  n, k, d, s, c = 4000, 8, 5, 0.5, 2.0
  clean = rng.normal(scale=c, size=(n, d))
  views = clean[:, None] + rng.normal(scale=s, size=(n, k, d))
  out = geometry.invariance(views, clean)
  assert out["ratio"] == pytest.approx(s ** 2 / c ** 2, rel=0.05)
  # Scale-free: a rescaled representation has the same ratio.
  assert geometry.invariance(3 * views, 3 * clean)["ratio"] == pytest.approx(out["ratio"])


def test_within_image_stats_match_the_pairwise_definition():
  rng = np.random.default_rng(2)
  views = rng.normal(size=(3, 4, 5))
  sq, cos = geometry.within_image_stats(views)
  for i in range(3):
    pairs = [(a, b) for a in range(4) for b in range(4) if a != b]
    d2 = np.mean([np.sum((views[i, a] - views[i, b]) ** 2) for a, b in pairs])
    cs = np.mean([views[i, a] @ views[i, b] / np.linalg.norm(views[i, a])
                  / np.linalg.norm(views[i, b]) for a, b in pairs])
    assert sq[i] == pytest.approx(d2)
    assert cos[i] == pytest.approx(cs)
  with pytest.raises(ValueError, match="K >= 2"):
    geometry.within_image_stats(views[:, :1])


def test_dimensionality_of_an_isotropic_cloud_and_a_plane():
  rng = np.random.default_rng(3)
  iso = rng.normal(size=(20000, 8))
  out = geometry.dimensionality(iso)
  assert out["effective_rank"] == pytest.approx(8.0, rel=0.01)
  assert out["components_90"] == 8 and out["dim"] == 8 and len(out["spectrum"]) == 8
  plane = rng.normal(size=(500, 2)) @ _orthonormal(rng, 10, 2).T
  out = geometry.dimensionality(plane)
  assert out["components_99"] == 2 and out["effective_rank"] <= 2.0 + 1e-6


def test_values_effective_rank():
  np.testing.assert_allclose(geometry.values_effective_rank(np.array([[1.0, 1, 1, 0],
                                                                      [1.0, 0, 0, 0],
                                                                      [0.0, 0, 0, 0]])),
                             [3.0, 1.0, 0.0])


def test_overlap_of_identical_orthogonal_and_random_subspaces():
  rng = np.random.default_rng(4)
  basis = _orthonormal(rng, 12, 6)
  u, v = basis[:, :3], basis[:, 3:]
  assert geometry.subspace_overlap(u, u) == pytest.approx(1.0)
  assert geometry.subspace_overlap(u, v) == pytest.approx(0.0, abs=1e-12)
  # The same subspace in another basis is still identical.
  rot = _orthonormal(rng, 3, 3)
  assert geometry.subspace_overlap(u, u @ rot) == pytest.approx(1.0)
  # Random pairs average r / d.
  d, r = 40, 5
  rand = np.stack([_orthonormal(rng, d, r) for _ in range(400)])
  rand2 = np.stack([_orthonormal(rng, d, r) for _ in range(400)])
  assert geometry.subspace_overlap(rand, rand2).mean() == pytest.approx(r / d, rel=0.1)
  summary = geometry.overlap_summary({"a": rand, "b": rand}, d)
  assert summary["a-b"]["mean"] == pytest.approx(1.0) and summary["chance"] == r / d


def test_jacobian_matches_finite_differences():
  rng = np.random.default_rng(5)
  w1 = jnp.asarray(rng.normal(size=(4, 7)), jnp.float32)
  w2 = jnp.asarray(rng.normal(size=(7, 3)), jnp.float32)

  def fn(x):
    return jnp.tanh(x @ w1) @ w2

  points = rng.normal(size=(6, 4)).astype(np.float64)
  jac = np.asarray(geometry.jacobians(fn, jnp.asarray(points, jnp.float32)))
  assert jac.shape == (6, 3, 4)
  eps = 1e-3
  f64 = lambda x: np.tanh(x @ np.asarray(w1, np.float64)) @ np.asarray(w2, np.float64)
  for i in range(6):
    for j in range(4):
      step = np.zeros(4)
      step[j] = eps
      fd = (f64(points[i] + step) - f64(points[i] - step)) / (2 * eps)
      np.testing.assert_allclose(jac[i, :, j], fd, rtol=1e-3, atol=1e-4)
  values, spaces = geometry.jacobian_geometry(fn, points, rank=2, chunk_size=4)
  assert values.shape == (6, 3) and spaces.shape == (6, 4, 2)
  np.testing.assert_allclose(values, np.linalg.svd(jac, compute_uv=False), rtol=1e-4)


def test_exact_projection_has_jacobian_rank_r_and_its_subspace():
  rng = np.random.default_rng(6)
  d, r = 10, 3
  basis = _orthonormal(rng, d, r)
  proj = jnp.asarray(basis @ basis.T, jnp.float32)
  fn = lambda x: proj @ x  # g(h) = U U^T h: an exact projection onto span(U)
  values, spaces = geometry.jacobian_geometry(fn, rng.normal(size=(5, d)), rank=r)
  np.testing.assert_allclose(geometry.values_effective_rank(values), r, rtol=1e-4)
  np.testing.assert_allclose(geometry.subspace_overlap(spaces, np.repeat(basis[None], 5, 0)),
                             1.0, rtol=1e-4)


def test_local_tangent_of_points_on_a_plane():
  rng = np.random.default_rng(7)
  d = 8
  basis = _orthonormal(rng, d, 2)
  bank = rng.uniform(-1, 1, size=(300, 2)) @ basis.T + 5.0
  points = bank[:10] + 1e-3 * rng.normal(size=(10, d))
  tangent = geometry.local_tangent(points, bank, num_neighbours=15, rank=2)
  np.testing.assert_allclose(geometry.subspace_overlap(tangent, np.repeat(basis[None], 10, 0)),
                             1.0, atol=1e-3)
  idx = geometry.nearest_neighbours(bank[:3], bank, 1)
  np.testing.assert_array_equal(idx[:, 0], [0, 1, 2])


def test_augmentation_subspace_recovers_the_noise_directions():
  rng = np.random.default_rng(8)
  d, k, r = 9, 6, 2
  basis = _orthonormal(rng, d, r)
  centres = rng.normal(size=(4, d))
  views = centres[:, None] + rng.normal(size=(4, k, r)) @ basis.T
  spaces = geometry.augmentation_subspace(views, r)
  np.testing.assert_allclose(geometry.subspace_overlap(spaces, np.repeat(basis[None], 4, 0)),
                             1.0, rtol=1e-4)
  with pytest.raises(ValueError, match="K > 6"):
    geometry.augmentation_subspace(views, 6)
