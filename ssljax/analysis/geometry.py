"""Geometry metrics of representations: invariance, dimensionality, Jacobians, subspaces.

The measurements behind ``ssljax analyze``, after Cosentino et al. 2022 ("Toward a Geometrical
Understanding of Self-supervised Contrastive Learning", arXiv 2205.06926), whose claims are
that the projector, not the encoder, becomes invariant to the augmentations as their strength
grows, by projecting the encoder's representation onto a low-dimensional space that estimates
the tangent plane of the data manifold. The paper publishes no code: the exact definitions
below are ssljax's own protocol (docs/geometry.md).

Notation: n images, K augmentations per image, d the width of a representation phi, h the
encoder output (d_h wide), z = g(h) a head layer's output.

  invariance(views, clean)      R_inv = E_i E_{k != k'} ||phi_ik - phi_ik'||^2
                                        / E_{i != j} ||phi_i - phi_j||^2
                                and the mean positive cosine E_i E_{k != k'} cos(phi_ik, phi_ik')
  dimensionality(x)             spectrum, effective rank, components for 90% / 99% of the
                                variance of a centred cloud (ssljax.eval.geometry)
  values_effective_rank(s)      exp(entropy of s / sum(s)) for singular values s of a matrix
  jacobian_geometry(fn, h, r)   J_i = dg/dh at h_i (vmap of jacfwd): singular values and the
                                top-r right singular vectors, per point
  top_subspace(x, r, centre)    top-r right singular vectors of (x - centre), batched
  local_tangent(h, bank, k, r)  T_i: top-r directions of the k nearest bank rows of h_i,
                                centred at h_i (local PCA)
  augmentation_subspace(v, r)   A_i: top-r principal directions of the K augmented copies
  subspace_overlap(u, v)        ||U^T V||_F^2 / r, the mean squared cosine of the principal
                                angles: 1 for identical subspaces, 0 for orthogonal ones,
                                r / d on average for random ones (the chance level)

Clouds are reduced in float64 with NumPy (exactness over speed, as ssljax.eval.geometry);
Jacobians and batched SVDs run in float32 in jitted JAX.
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from ssljax.eval import geometry as cloud_geometry

log = logging.getLogger(__name__)

_EPS = 1e-12


# ------------------------------------------------------------------- invariance

def within_image_stats(views: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-image (mean squared distance between two different copies, mean pairwise cosine).

  Args:
    views: ``[n, K, d]``, K >= 2 representations of each of n images' augmented copies.

  Returns:
    ``(sq_dist [n], cosine [n])`` with, for image i,
      sq_dist_i = 1 / (K (K - 1)) sum_{k != k'} ||v_ik - v_ik'||^2
                = 2 K / (K - 1) * mean_k ||v_ik - mean_k' v_ik'||^2,
      cosine_i  = 1 / (K (K - 1)) sum_{k != k'} <u_ik, u_ik'>,  u = v / max(||v||, 1e-12)
                = (||sum_k u_ik||^2 - sum_k ||u_ik||^2) / (K (K - 1)).
    A zero vector has cosine 0 with everything.
  """
  views = np.asarray(views, np.float64)
  chex.assert_rank(views, 3)
  num_views = views.shape[1]
  if num_views < 2:
    raise ValueError(f"invariance needs K >= 2 augmentations per image, got {num_views}")
  centred = views - views.mean(axis=1, keepdims=True)
  sq_dist = 2.0 * num_views / (num_views - 1) * np.mean(np.sum(centred ** 2, -1), axis=1)
  u = views / np.maximum(np.linalg.norm(views, axis=-1, keepdims=True), _EPS)
  cosine = ((np.sum(u.sum(axis=1) ** 2, -1) - np.sum(u ** 2, axis=(1, 2)))
            / (num_views * (num_views - 1)))
  return sq_dist, cosine


def mean_pairwise_sq_distance(x: np.ndarray) -> float:
  """E_{i != j} ||x_i - x_j||^2 = 2 n / (n - 1) * mean_i ||x_i - mean(x)||^2 for x ``[n, d]``."""
  x = np.asarray(x, np.float64)
  chex.assert_rank(x, 2)
  n = x.shape[0]
  if n < 2:
    raise ValueError(f"need at least 2 rows, got {n}")
  return float(2.0 * n / (n - 1) * np.mean(np.sum((x - x.mean(0)) ** 2, -1)))


def invariance(views: np.ndarray, clean: np.ndarray) -> dict[str, float]:
  """Normalised invariance ratio and mean positive cosine of one representation.

  Args:
    views: ``[n, K, d]``: the representation of K augmented copies of each of n images.
    clean: ``[m, d]``: the representation of un-augmented images (usually the same n), which
      sets the scale: the spread between different images.

  Returns:
    ``ratio``: E_i sq_dist_i / E_{i != j} ||clean_i - clean_j||^2 (see `within_image_stats`):
    0 for a representation that ignores the augmentations, about 1 when an image's copies are
    as far apart as two different images, scale-free (a rescaled phi has the same ratio);
    ``positive_cosine``: E_i cosine_i, 1 for a perfectly invariant (non-zero) representation;
    ``within``, ``between``: the numerator and the denominator.
  """
  chex.assert_rank([views, clean], [3, 2])
  chex.assert_equal(np.shape(views)[-1], np.shape(clean)[-1])
  sq_dist, cosine = within_image_stats(views)
  between = mean_pairwise_sq_distance(clean)
  within = float(sq_dist.mean())
  ratio = within / between if between > 0 else float("nan")
  return {"ratio": ratio, "positive_cosine": float(cosine.mean()), "within": within,
          "between": between}


# ------------------------------------------------------------------- dimensionality

def dimensionality(x: np.ndarray) -> dict[str, Any]:
  """Shape of the centred cloud x ``[n, d]``: ``dim`` (d), ``effective_rank``,
  ``components_90`` / ``components_99`` (fewest principal components reaching that share of
  the variance), ``spectrum`` (all min(n, d) singular values, largest first, as a list)."""
  x = np.asarray(x)
  chex.assert_rank(x, 2)
  return {"dim": int(x.shape[1]),
          "effective_rank": cloud_geometry.effective_rank(x),
          "components_90": cloud_geometry.components_for(x, 0.9),
          "components_99": cloud_geometry.components_for(x, 0.99),
          "spectrum": [float(s) for s in cloud_geometry.spectrum(x)]}


def values_effective_rank(singular_values: np.ndarray) -> np.ndarray:
  """exp(-sum_k p_k log p_k), p_k = s_k / sum_j s_j, over the last axis (Roy & Vetterli 2007).

  For the singular values of matrices (no centring): a rank-r projection has r equal singular
  values and effective rank exactly r. All-zero rows give 0. Shape ``[..., m] -> [...]``.
  """
  s = np.asarray(singular_values, np.float64)
  total = s.sum(-1, keepdims=True)
  p = np.where(total > 0, s / np.where(total > 0, total, 1.0), 0.0)
  entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), -1)
  return np.where(total[..., 0] > 0, np.exp(entropy), 0.0)


# ------------------------------------------------------------------- Jacobians

def jacobians(fn: Callable[..., jax.Array], points: jax.Array, *args: Any) -> jax.Array:
  """J_i = d fn(x, *args) / d x at every row x_i of `points` ``[n, d_in]``: ``[n, d_out, d_in]``.

  `fn` maps one point ``[d_in]`` (and `args`, e.g. parameters, shared by all points) to
  ``[d_out]``: a head in inference mode, whose BatchNorm uses running statistics, so the
  rows do not interact. Forward mode (``jax.jacfwd``) vmapped over the points: one batched
  program, no Python loop.
  """
  chex.assert_rank(points, 2)
  return jax.vmap(jax.jacfwd(fn), in_axes=(0,) + (None,) * len(args))(points, *args)


@functools.partial(jax.jit, static_argnums=(0, 2))
def _jacobian_chunk(fn, points, rank, args):
  jac = jacobians(fn, points, *args)  # [b, d_out, d_in]
  _, s, vt = jnp.linalg.svd(jac, full_matrices=False)  # s [b, m], vt [b, m, d_in]
  top = jnp.swapaxes(vt[:, :rank], 1, 2)  # [b, d_in, rank]
  return s, top


def jacobian_geometry(fn: Callable[..., jax.Array], points: np.ndarray, *, rank: int,
                      chunk_size: int = 256, args: tuple = ()) -> tuple[np.ndarray, np.ndarray]:
  """Singular values and top right singular vectors of the Jacobian of `fn` at every point.

  Args:
    fn: ``(x [d_in], *args) -> [d_out]``, jit-compatible and hashable (one compiled program
      per fn and shapes); differentiated with respect to x only.
    points: ``[n, d_in]``.
    rank: how many right singular vectors to keep (<= min(d_in, d_out)).
    chunk_size: points per compiled call (the last chunk is padded by repeating a point);
      memory is ``chunk_size * d_out * d_in`` floats.
    args: passed to every call of `fn` as traced arguments (parameters: not baked into the
      compiled program as constants).

  Returns:
    ``(singular_values [n, min(d_in, d_out)] largest first, subspaces [n, d_in, rank])``: the
    columns of ``subspaces[i]`` are an orthonormal basis of the input directions that J_i
    stretches most (the projector's subspace P_i).
  """
  points = np.asarray(points, np.float32)
  chex.assert_rank(points, 2)
  n = points.shape[0]
  values, spaces = [], []
  for start in range(0, n, chunk_size):
    chunk = points[start:start + chunk_size]
    real = chunk.shape[0]
    if real < chunk_size and n > chunk_size:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], chunk_size - real, axis=0)])
    s, top = _jacobian_chunk(fn, jnp.asarray(chunk), rank, tuple(args))
    values.append(np.asarray(s)[:real])
    spaces.append(np.asarray(top)[:real])
    log.info("Jacobians: %d/%d points", start + real, n)
  return np.concatenate(values), np.concatenate(spaces)


# ------------------------------------------------------------------- subspaces

@functools.partial(jax.jit, static_argnums=(1,))
def _top_right_vectors(x: jax.Array, rank: int) -> jax.Array:
  _, _, vt = jnp.linalg.svd(x, full_matrices=False)
  return jnp.swapaxes(vt[..., :rank, :], -1, -2)


def top_subspace(x: np.ndarray, rank: int, centre: np.ndarray | None = None) -> np.ndarray:
  """Orthonormal basis ``[..., d, rank]`` of the top-`rank` right singular vectors of
  ``x - centre`` (x ``[..., m, d]``; centre ``[..., d]``, default the mean over m).

  These are the principal directions of the m points around the centre. They are defined only
  when ``rank <= min(m', d)``, m' the rank of the centred points (m - 1 around the mean).
  """
  x = np.asarray(x, np.float32)
  if x.ndim < 2:
    raise ValueError(f"x must be [..., m, d], got shape {x.shape}")
  centre = x.mean(-2) if centre is None else np.asarray(centre, np.float32)
  chex.assert_equal_shape_prefix([x, centre[..., None, :]], x.ndim - 2)
  if rank > min(x.shape[-2], x.shape[-1]):
    raise ValueError(f"rank {rank} exceeds min(m, d) = {min(x.shape[-2:])} of x {x.shape}")
  return np.asarray(_top_right_vectors(jnp.asarray(x - centre[..., None, :]), rank))


def nearest_neighbours(queries: np.ndarray, bank: np.ndarray, k: int, *,
                       chunk_size: int = 1024) -> np.ndarray:
  """Indices ``[n, k]`` of the k rows of `bank` ``[N, d]`` nearest (Euclidean) to each query
  ``[n, d]``, nearest first. Rows of the bank identical to the query count as neighbours."""
  queries, bank = np.asarray(queries, np.float32), np.asarray(bank, np.float32)
  chex.assert_rank([queries, bank], 2)
  chex.assert_equal(queries.shape[1], bank.shape[1])
  if not 1 <= k <= bank.shape[0]:
    raise ValueError(f"k must be in [1, {bank.shape[0]}] (the bank's rows), got {k}")
  bank_j = jnp.asarray(bank)
  bank_sq = jnp.sum(bank_j ** 2, -1)

  @jax.jit
  def chunk_fn(q):
    d2 = bank_sq[None, :] - 2 * jnp.dot(q, bank_j.T, precision=jax.lax.Precision.HIGHEST)
    return jax.lax.top_k(-d2, k)[1]

  return np.concatenate([np.asarray(chunk_fn(jnp.asarray(queries[s:s + chunk_size])))
                         for s in range(0, queries.shape[0], chunk_size)])


def local_tangent(points: np.ndarray, bank: np.ndarray, *, num_neighbours: int,
                  rank: int) -> np.ndarray:
  """T_i ``[n, d, rank]``: local PCA of the `num_neighbours` nearest bank rows of each point,
  centred at the point itself (not at the neighbours' mean), an estimate of the tangent plane
  of the data manifold at h_i."""
  idx = nearest_neighbours(points, bank, num_neighbours)
  return top_subspace(np.asarray(bank)[idx], rank, centre=np.asarray(points))


def augmentation_subspace(views: np.ndarray, rank: int) -> np.ndarray:
  """A_i ``[n, d, rank]``: the top-`rank` principal directions of each image's augmented
  copies ``views [n, K, d]`` around their mean (needs rank <= K - 1)."""
  chex.assert_rank(views, 3)
  if rank > np.shape(views)[1] - 1:
    raise ValueError(f"an augmentation subspace of rank {rank} needs K > {rank} copies per "
                     f"image, got K = {np.shape(views)[1]}")
  return top_subspace(views, rank)


def subspace_overlap(u: np.ndarray, v: np.ndarray) -> np.ndarray:
  """||U^T V||_F^2 / r for orthonormal bases u, v ``[..., d, r]``: ``[...]``.

  Equals the mean of cos^2 of the r principal angles between the subspaces: 1 when they are
  identical, 0 when orthogonal, r / d in expectation for a uniformly random pair (chance).
  """
  u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
  chex.assert_equal_shape([u, v])
  r = u.shape[-1]
  return np.sum(np.einsum("...dr,...ds->...rs", u, v) ** 2, axis=(-2, -1)) / r


def overlap_summary(spaces: dict[str, np.ndarray], dim: int) -> dict[str, Any]:
  """Mean overlaps of every pair of named subspace batches ``{name: [n, d, r]}`` (same r)."""
  names = list(spaces)
  result: dict[str, Any] = {}
  for a in range(len(names)):
    for b in range(a + 1, len(names)):
      overlap = subspace_overlap(spaces[names[a]], spaces[names[b]])
      result[f"{names[a]}-{names[b]}"] = {"mean": float(overlap.mean()),
                                          "std": float(overlap.std())}
  r = next(iter(spaces.values())).shape[-1] if spaces else 0
  result["chance"] = r / dim
  return result
