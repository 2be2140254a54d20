"""UOTA's view weights: arbitrating out-of-distribution views with a Gaussian view model.

UOTA (Wang et al., NeurIPS 2021, "Unsupervised Outlier Arbitration", Sec. 3; official code
``ssl-codelab/uota``, ``src/uota.py`` ``_get_sample_weight``) weights the per-(image, view)
terms of a multi-view loss by how typical each view's embedding is for its image. With V views
of N images (global batch), unit-norm embeddings ``z[j, i]`` and G global views (the first G):

    mu_i      = (1/G) sum_{j < G} z[j, i]                 the image's centre (global views)
    delta_ji  = z[j, i] - mu_i                             every view's deviation
    Sigma     = (1/(V N)) sum_{j, i} delta delta^T + eps I  one second moment, all views
    u_ji      = delta_ji^T Sigma^{-1} delta_ji / tau        squared Mahalanobis distance
    w_ji      = V N exp(-u_ji) / sum_{j', i'} exp(-u_j'i')  softmax over the whole batch

so the weights have mean 1 over the global batch (the loss keeps its scale) and views far from
their image's centre, relative to how far views usually are, get small weights. Everything is
computed in float32 under stop-gradient: the weights are constants for the loss they weight.
With two views both get the same weight (``delta_1i = -delta_2i``).

`uota_view_weights` is the official closed form. `uota_precision_weights` computes the same
weights from any precision matrix P (in place of Sigma^{-1}), and `uota_gaussian_nll` is the
mean negative log-likelihood of the deviations under N(0, P^{-1}) with ``P = L L^T``; ssljax's
learned mode keeps L in the parameter pytree and fits it by maximum likelihood, whose optimum
on a fixed sample is exactly the closed form's ``Sigma^{-1}`` (``ssljax.methods.uota``).

Distributed convention: with ``axis_name`` the second moment and the softmax normaliser are
``psum``'ed over the devices (equivalent to gathering every deviation, as the official code's
``all_gather`` does, without moving them), so each device gets the weights of its own rows,
equal to the single-device weights of the concatenated batch. ``uota_gaussian_nll`` is a mean
over this device's rows (its ``pmean`` is the global NLL), the package's loss convention, whose
scope (``pmap`` or ``shard_map(check_vma=False)``) ``ssljax.losses.contrastive`` states.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from ssljax.losses.contrastive import l2_normalize


def uota_deviations(z: jnp.ndarray, *, num_global_views: int = 2) -> jnp.ndarray:
  """``delta[j, i] = z[j, i] - mean_{g < G} z[g, i]``, float32 ``[V, n, d]``, stop-gradient.

  Raises:
    ValueError: `z` is not ``[V, n, d]`` or has fewer than `num_global_views` views.
  """
  chex.assert_rank(z, 3)
  if not 1 <= num_global_views <= z.shape[0]:
    raise ValueError(f"uota: the centre is the mean of the first num_global_views = "
                     f"{num_global_views} views, but z has {z.shape[0]} views (z is "
                     f"[views, images, dim]); use a policy with at least {num_global_views} "
                     f"views or lower num_global_views")
  z = jax.lax.stop_gradient(z).astype(jnp.float32)
  centre = jnp.mean(z[:num_global_views], axis=0)
  return z - centre[None]


def _global_count(local: int, axis_name: str | None) -> int:
  return local * jax.lax.axis_size(axis_name) if axis_name else local


def _sum(x: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  return jax.lax.psum(x, axis_name) if axis_name else x


def uota_precision_weights(delta: jnp.ndarray, precision: jnp.ndarray, *,
                           temperature: float = 350.0,
                           axis_name: str | None = None) -> jnp.ndarray:
  """Weights ``V N softmax(-delta^T P delta / tau)`` over the global batch, ``[V, n]``.

  Args:
    delta: ``[V, n, d]`` deviations (`uota_deviations`), this device's rows.
    precision: ``[d, d]`` symmetric positive-definite P (the closed form's ``Sigma^{-1}``).
    temperature: tau > 0 (official 350 for d = 128; scale it with d).
    axis_name: the data axis: the softmax runs over every device's rows.

  Returns:
    float32 ``[V, n]`` weights under stop-gradient, mean 1 over the global batch.
  """
  chex.assert_rank([delta, precision], [3, 2])
  chex.assert_shape(precision, (delta.shape[-1], delta.shape[-1]))
  _check_temperature(temperature)
  delta = jax.lax.stop_gradient(delta).astype(jnp.float32)
  precision = jax.lax.stop_gradient(precision).astype(jnp.float32)
  u = jnp.einsum("vnd,de,vne->vn", delta, precision, delta)
  return _softmax_weights(u / temperature, axis_name)


def _check_temperature(temperature: float) -> None:
  if not temperature > 0:
    raise ValueError(f"uota: temperature must be > 0, got {temperature}")


def _softmax_weights(u: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  """``V N softmax(-u)`` over the global batch (every device's rows), stop-gradient."""
  # Shifted by the global max of -u for stability.
  shift = jnp.max(-u)
  if axis_name:
    shift = jax.lax.pmax(shift, axis_name)
  unnormalised = jnp.exp(-u - shift)
  total = _sum(jnp.sum(unnormalised), axis_name)
  count = _global_count(u.size, axis_name)
  return jax.lax.stop_gradient(count * unnormalised / total)


def uota_second_moment(delta: jnp.ndarray, *, eps: float = 1e-8,
                       axis_name: str | None = None) -> jnp.ndarray:
  """``Sigma = (1/(V N)) sum delta delta^T + eps I`` over the global batch, float32 ``[d, d]``."""
  delta = jax.lax.stop_gradient(delta).astype(jnp.float32)
  flat = delta.reshape(-1, delta.shape[-1])
  moment = _sum(flat.T @ flat, axis_name) / _global_count(flat.shape[0], axis_name)
  return moment + eps * jnp.eye(flat.shape[1], dtype=jnp.float32)


def _condition_estimate(sigma: jnp.ndarray, factor: jnp.ndarray,
                        iterations: int = 20) -> jnp.ndarray:
  """An estimate of ``cond(Sigma)`` from below (float32 scalar).

  The largest eigenvalue by power iteration on Sigma, the smallest by inverse iteration with
  its Cholesky factor (two triangular solves a step), each read off as a Rayleigh quotient
  (so both lie inside the spectrum), and at least the pivots' ratio ``(max L_kk / min
  L_kk)^2``, itself a lower bound but one that can be 10-30x low. On near-low-rank second
  moments (d = 32-256) the estimate came within 11% of the float64 condition number (the
  slow case: many small eigenvalues of similar size). O(d^2) per step, against the factor's
  O(d^3). Infinite when the factor is not finite.
  """
  dim = sigma.shape[0]
  start = jax.random.normal(jax.random.key(0), (dim,), jnp.float32)  # a constant, generic
  start = start / jnp.linalg.norm(start)

  def unit(v):
    return v / jnp.maximum(jnp.linalg.norm(v), jnp.finfo(jnp.float32).tiny)

  def solve(v):  # Sigma^{-1} v = C^{-T} C^{-1} v
    inner = jax.scipy.linalg.solve_triangular(factor, v, lower=True)
    return jax.scipy.linalg.solve_triangular(factor, inner, lower=True, trans="T")

  def step(_, vs):
    top, bottom = vs
    return unit(sigma @ top), unit(solve(bottom))

  top, bottom = jax.lax.fori_loop(0, iterations, step, (start, start))
  largest = top @ sigma @ top
  smallest = 1.0 / (bottom @ solve(bottom))
  pivots = jnp.diagonal(factor)
  estimate = jnp.maximum(largest / smallest, (jnp.max(pivots) / jnp.min(pivots)) ** 2)
  finite = jnp.all(jnp.isfinite(factor)) & jnp.isfinite(estimate) & (smallest > 0)
  return jnp.where(finite, estimate, jnp.inf)


def uota_view_weights(z: jnp.ndarray, *, temperature: float = 350.0, num_global_views: int = 2,
                      eps: float = 1e-8, max_condition: float | None = 1e5,
                      axis_name: str | None = None, return_ridge: bool = False):
  """UOTA's closed-form view weights (official ``_get_sample_weight``), float32 ``[V, n]``.

  Args:
    z: ``[V, n, d]`` embeddings of every view of this device's n images (the global views
      first); L2-normalised here (the official code weights normalised projections).
    temperature: tau > 0 of ``u = delta^T Sigma^{-1} delta / tau`` (official 350 at d = 128).
    num_global_views: G, the views whose mean is the image's centre (official 2).
    eps: ridge > 0 added to the second moment M of the deviations (official 1e-8).
    max_condition: the largest condition number of ``Sigma = M + eps I`` solved as it is
      (None or inf: any, the official behaviour). The official code inverts Sigma in float32.
      When training collapses the embeddings onto a few directions (BYOL with tiny crops on
      Fashion-MNIST does: 200 of 256 eigenvalues below 1e-7, condition ~1e8), the float32
      Cholesky factor of Sigma comes out NaN or finite depending on the last bit of the
      input, and the distances along the near-empty directions are rounding noise. So when
      the factor is not finite, or its condition number, estimated from below by a few steps
      of power and inverse iteration (`_condition_estimate`), exceeds `max_condition`, the
      ridge is raised to ``eps + tr(M) / max_condition``, which bounds the condition number by
      ``max_condition + 1``: a shrinkage estimate of Sigma, no longer the official one, whose
      weights are flatter (the near-empty directions stop counting). A batch just under the
      threshold keeps ``eps`` and one just over gets the raised ridge, so the weights can
      change in steps between batches; the ridge is returned with `return_ridge` (and logged
      by the UOTA add-on as ``uota_ridge``) so that this is visible. A batch whose condition
      number is below the threshold gets the official weights unchanged.
    axis_name: the data axis: Sigma and the softmax span the global batch.
    return_ridge: also return the ridge used, a float32 scalar (``eps`` unless raised).

  Returns:
    float32 ``[V, n]`` weights under stop-gradient with mean 1 over the global batch (and the
    ridge with `return_ridge`).

  Raises:
    ValueError: fewer views than `num_global_views`; or a second moment that is singular up
      to the ridge: the deviations span at most ``(V - 1) N`` dimensions (each image's global
      deviations sum to zero), so with ``d > (V - 1) N`` and ``eps < 1e-4`` the inverse would
      be ill-conditioned; or ``eps <= 0`` or ``max_condition <= 1``.
  """
  chex.assert_rank(z, 3)
  _check_temperature(temperature)
  if not eps > 0:
    raise ValueError(f"uota: the ridge eps must be > 0 (official 1e-8), got {eps}")
  if max_condition is not None and not max_condition > 1:
    raise ValueError(f"uota: max_condition must be > 1 or None, got {max_condition}")
  num_views, n, dim = z.shape
  rank_bound = (num_views - 1) * _global_count(n, axis_name)
  if dim > rank_bound and eps < 1e-4:
    raise ValueError(
        f"uota: the {dim}-dimensional deviations of {num_views} views of "
        f"{_global_count(n, axis_name)} images span at most (V - 1) N = {rank_bound} "
        f"dimensions, so their second moment is singular up to the ridge eps = {eps}; use a "
        f"larger batch or more views, or a ridge eps >= 1e-4")
  delta = uota_deviations(l2_normalize(jax.lax.stop_gradient(z).astype(jnp.float32)),
                          num_global_views=num_global_views)
  sigma = uota_second_moment(delta, eps=eps, axis_name=axis_name)
  # delta^T Sigma^{-1} delta = ||C^{-1} delta||^2 with Sigma = C C^T (Cholesky): one triangular
  # solve of the deviations, no explicit inverse (better conditioned, and 1.5x faster on the
  # CPU than forming Sigma^{-1} with cho_solve, in a side-by-side micro-benchmark at V n = 1536,
  # d = 128).
  factor = jnp.linalg.cholesky(sigma)
  ridge = jnp.asarray(eps, jnp.float32)
  if max_condition is not None and max_condition < float("inf"):
    # Sigma is the same on every device (psum'ed), so every device takes the same branch.
    solvable = _condition_estimate(sigma, factor) <= max_condition
    raised = eps + (jnp.trace(sigma) - dim * eps) / max_condition  # eps + tr(M) / K

    def shrunk(_):
      return (jnp.linalg.cholesky(sigma + (raised - eps) * jnp.eye(dim, dtype=jnp.float32)),
              raised.astype(jnp.float32))

    factor, ridge = jax.lax.cond(solvable, lambda _: (factor, ridge), shrunk, None)
  flat = delta.reshape(-1, dim)
  whitened = jax.scipy.linalg.solve_triangular(factor, flat.T, lower=True)
  u = jnp.sum(whitened ** 2, axis=0).reshape(num_views, n)
  w = _softmax_weights(u / temperature, axis_name)
  return (w, jax.lax.stop_gradient(ridge)) if return_ridge else w


def precision_from_cholesky(log_diag: jnp.ndarray, lower: jnp.ndarray) -> jnp.ndarray:
  """``P = L L^T`` with L lower-triangular, ``diag(L) = exp(log_diag)`` (always PD)."""
  chex.assert_rank([log_diag, lower], [1, 2])
  factor = jnp.tril(lower, k=-1) + jnp.diag(jnp.exp(log_diag))
  return factor @ factor.T


def uota_gaussian_nll(log_diag: jnp.ndarray, lower: jnp.ndarray,
                      delta: jnp.ndarray, *, ridge: float = 0.0) -> jnp.ndarray:
  """Mean negative log-likelihood of the deviations under ``N(0, P^{-1})``, ``P = L L^T``.

      NLL = mean_{j, i} (1/2) ||L^T delta_ji||^2 - sum_k log L_kk + (ridge / 2) tr(P)   (+ const)

  Minimised over L on a fixed sample, ``P = (Sigma + ridge I)^{-1}`` with Sigma the sample's
  second moment: the learned mode's fixed point is the closed form with ridge ``eps = ridge``.
  The ridge term ``tr(P) = ||L||_F^2`` bounds the precision by ``1 / ridge`` in directions the
  deviations do not span; without it (``ridge = 0``) maximum likelihood drives the precision
  to infinity there as soon as the deviations are (near) low-rank, as early in training.
  The deviations are constants (stop-gradient); only ``log_diag`` and ``lower`` get a
  gradient. This device's mean (``pmean`` over devices is the global NLL).
  """
  chex.assert_rank(delta, 3)
  if ridge < 0:
    raise ValueError(f"uota_gaussian_nll: ridge must be >= 0, got {ridge}")
  delta = jax.lax.stop_gradient(delta).astype(jnp.float32).reshape(-1, delta.shape[-1])
  factor = jnp.tril(lower, k=-1) + jnp.diag(jnp.exp(log_diag))
  projected = delta @ factor
  nll = 0.5 * jnp.mean(jnp.sum(projected ** 2, axis=-1)) - jnp.sum(log_diag)
  if ridge:
    nll = nll + 0.5 * ridge * jnp.sum(factor ** 2)
  return nll
