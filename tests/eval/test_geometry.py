"""ssljax.eval.geometry: spectrum, effective rank, components, PCA whitening."""

import numpy as np
import pytest

from ssljax.eval import geometry


def test_spectrum_matches_the_svd_of_the_centred_cloud():
  x = np.random.default_rng(0).normal(size=(50, 6)) @ np.diag([5.0, 3, 2, 1, 0.5, 0.1]) + 7.0
  expected = np.linalg.svd(x - x.mean(0), compute_uv=False)
  np.testing.assert_allclose(geometry.spectrum(x), expected, rtol=1e-9)


def test_effective_rank_of_a_line_a_square_and_a_hand_computed_cloud():
  t = np.linspace(-1.0, 1.0, 101)
  line = np.stack([t, 2 * t, -t], axis=1) + 3.0  # rank 1 after centring
  assert geometry.effective_rank(line) == pytest.approx(1.0, abs=1e-6)
  # Four corners of a square: two equal singular values -> erank 2.
  square = np.array([[1.0, 1], [1, -1], [-1, 1], [-1, -1]])
  assert geometry.effective_rank(square) == pytest.approx(2.0)
  # Rows (+-3, 0) and (0, +-1): singular values sqrt(18) and sqrt(2), i.e. p = (3/4, 1/4).
  cloud = np.array([[3.0, 0], [-3, 0], [0, 1], [0, -1]])
  p = np.array([0.75, 0.25])
  assert geometry.effective_rank(cloud) == pytest.approx(np.exp(-np.sum(p * np.log(p))))
  assert geometry.effective_rank(np.ones((5, 3))) == 0.0


def test_components_for_counts_principal_directions():
  # Variances 16, 4, 1 (sum 21) along the axes, exactly.
  x = np.concatenate([np.diag([4.0, 2, 1]), -np.diag([4.0, 2, 1])]) * np.sqrt(2)
  assert geometry.components_for(x, 16 / 21) == 1
  assert geometry.components_for(x, 0.9) == 2
  assert geometry.components_for(x, 1.0) == 3
  with pytest.raises(ValueError, match="fraction"):
    geometry.components_for(x, 0.0)


def test_pca_whitening_gives_identity_covariance_and_keeps_distances_rotation_free():
  rng = np.random.default_rng(1)
  mixing = rng.normal(size=(4, 4))
  x = rng.normal(size=(2000, 4)) @ mixing + 5.0
  mean, w = geometry.pca_whitening(x, eps=1e-9)
  y = (x - mean) @ w
  np.testing.assert_allclose(y.mean(0), 0.0, atol=1e-9)
  np.testing.assert_allclose(y.T @ y / len(y), np.eye(4), atol=1e-6)
  # A larger eps shrinks the low-variance directions instead of inflating them.
  _, w_soft = geometry.pca_whitening(x, eps=1.0)
  var_soft = np.var((x - mean) @ w_soft, axis=0)
  assert np.all(var_soft < 1.0) and var_soft[0] > var_soft[-1]


def test_bad_features_are_rejected_with_a_message():
  with pytest.raises(ValueError, match=r"\[n, d\]"):
    geometry.effective_rank(np.ones(5))
  with pytest.raises(ValueError, match="NaN or inf"):
    geometry.spectrum(np.array([[0.0, np.nan], [1.0, 2.0]]))
  with pytest.raises(ValueError, match="eps"):
    geometry.pca_whitening(np.eye(3), eps=0.0)
