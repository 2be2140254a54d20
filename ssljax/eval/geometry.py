"""Shape of a cloud of features: spectrum, effective rank, PCA whitening.

The dimensionality measures of the geometry analysis (Cosentino et al. 2022, "Toward a
Geometrical Understanding of Self-supervised Contrastive Learning", which has no official
code; ssljax's choice of measures: effective rank after Roy & Vetterli 2007, the components
needed for 90% / 99% of the variance, and the spectrum).

All functions take host arrays ``[n, d]`` (one row per example) and compute in float64 with
NumPy: they run once per evaluation on at most a few hundred thousand rows, where exactness
matters more than speed, and the d x d covariance is all that is decomposed.

  spectrum(x)              singular values of the centred cloud, largest first
  effective_rank(x)        exp(entropy of p), p_k = sigma_k / sum(sigma) (Roy & Vetterli 2007)
  components_for(x, f)     fewest principal components whose variance reaches fraction f
  pca_whitening(x, eps)    (mean, W): (y - mean) @ W has identity covariance on x, up to eps

Effective rank depends on n (use n >= 5 d) and on centring; every function here
centres with the mean of its own input.
"""

from __future__ import annotations

import numpy as np


def _centred_covariance_eigh(x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(mean [d], eigenvalues [d] largest first and >= 0, eigenvectors [d, d] as columns) of the
  biased covariance of x."""
  x = np.asarray(x, np.float64)
  if x.ndim != 2 or x.shape[0] < 2:
    raise ValueError(f"features must be [n, d] with n >= 2 rows, got shape {x.shape}")
  if not np.all(np.isfinite(x)):
    raise ValueError("features contain NaN or inf; check the checkpoint/encoder that made them")
  mean = x.mean(axis=0)
  xc = x - mean
  cov = xc.T @ xc / x.shape[0]
  eigvals, eigvecs = np.linalg.eigh(cov)
  order = np.argsort(eigvals)[::-1]
  return mean, np.clip(eigvals[order], 0.0, None), eigvecs[:, order]


def spectrum(x: np.ndarray) -> np.ndarray:
  """Singular values [min(n, d)] of the centred x, largest first."""
  _, eigvals, _ = _centred_covariance_eigh(x)
  return np.sqrt(eigvals * np.asarray(x).shape[0])[:min(np.asarray(x).shape)]


def effective_rank(x: np.ndarray) -> float:
  """exp(-sum_k p_k log p_k) with p_k = sigma_k / sum_j sigma_j over the singular values of the
  centred x: 1 for a cloud on a line, d for an isotropic one. 0 for a constant cloud."""
  sigma = spectrum(x)
  total = sigma.sum()
  if total <= 0:
    return 0.0
  p = sigma[sigma > 0] / total
  return float(np.exp(-np.sum(p * np.log(p))))


def components_for(x: np.ndarray, fraction: float) -> int:
  """The fewest principal components of the centred x that explain `fraction` of its variance."""
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f"fraction must be in (0, 1], got {fraction}")
  _, eigvals, _ = _centred_covariance_eigh(x)
  total = eigvals.sum()
  if total <= 0:
    return 0
  explained = np.cumsum(eigvals) / total
  return int(min(np.searchsorted(explained, fraction - 1e-12) + 1, len(eigvals)))


def pca_whitening(x: np.ndarray, eps: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
  """(mean [d], W [d, d]) with W = U diag(1 / sqrt(lambda + eps * mean(lambda))), U and lambda
  the eigenvectors and eigenvalues of x's covariance.

  ``(y - mean) @ W`` rotates y onto x's principal axes and rescales each to unit variance (on
  x); `eps`, relative to the average eigenvalue so that it does not depend on the features'
  scale, keeps directions with almost no variance from being blown up.
  """
  if eps <= 0:
    raise ValueError(f"eps must be > 0 (relative to the mean eigenvalue), got {eps}")
  mean, eigvals, eigvecs = _centred_covariance_eigh(x)
  floor = eps * max(float(eigvals.mean()), np.finfo(np.float64).tiny)
  return mean, eigvecs / np.sqrt(eigvals + floor)[None, :]
