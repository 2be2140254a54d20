"""Redundancy-reduction losses (Barlow Twins).

Distributed convention: the loss is a function of statistics summed over every device (the
batch mean and variance of each feature and the cross-correlation matrix), so every device
computes the same global value and returns all of it, not a share. Averaging that value over
devices gives the loss of the concatenated global batch. Averaging the per-device gradients
(``lax.pmean(grads, axis_name)``) gives its gradient too: the transpose of ``psum`` (under
``pmap`` and under ``shard_map`` with ``check_vma=False``) sums the cotangents that the ``K``
identical per-device losses send back, so each device receives ``K`` times the true gradient
of its own rows, and the mean over devices of ``K`` times each device's contribution is the
true gradient of the replicated parameters. Tests check value and gradients on 8 devices
against one device, under both ``shard_map`` and ``pmap``.

Scope: this convention holds where the per-device function runs under ``pmap`` or under
``jax.shard_map(..., check_vma=False)``, as ``ssljax.train.step`` runs it. Under
``check_vma=True`` JAX differentiates replicated parameters with varying-axis types and sums
their cotangents over devices itself, so the gradient of a replicated parameter through a
gathered loss comes out multiplied by the device count (measured on 8 CPU devices: 8.0x for
``nt_xent``, 1.0x for ``barlow_twins``); the train step refuses to be traced there.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

_BN_EPS = 1e-5  # torch.nn.BatchNorm1d's default epsilon.


def _global_batch_size(n: int, axis_name: str | None) -> int:
  return n * jax.lax.axis_size(axis_name) if axis_name is not None else n


def _sum_over_batch(x: jnp.ndarray, axis_name: str | None) -> jnp.ndarray:
  """Column sums of `x` over this device's rows and, with `axis_name`, every device's."""
  total = jnp.sum(x, axis=0)
  return jax.lax.psum(total, axis_name) if axis_name is not None else total


def batch_standardize(z: jnp.ndarray, *, unbiased_std: bool = False,
                      axis_name: str | None = None) -> jnp.ndarray:
  """Standardises every column of `z` with the mean and spread of the (global) batch.

  * ``unbiased_std=False``: ``(z - mean) / sqrt(var + 1e-5)`` with the biased variance
    ``var = mean((z - mean)^2)``, i.e. a non-affine ``BatchNorm1d`` in training mode (the
    official Barlow Twins code, whose BN is synchronised over all GPUs).
  * ``unbiased_std=True``: ``(z - mean) / std`` with the unbiased sample standard deviation
    ``std = sqrt(sum((z - mean)^2) / (N - 1))`` and no epsilon (``torch.Tensor.std`` as in
    jiangmengli/MetaMask ``loss.py``). A constant column divides by zero, as there.

  Args:
    z: ``[n, d]`` this device's rows.
    unbiased_std: which spread (see above).
    axis_name: if given, mean and spread are taken over the rows of every device.

  Returns:
    ``[n, d]`` float32 standardised rows.
  """
  z = z.astype(jnp.float32)
  n_global = _global_batch_size(z.shape[0], axis_name)
  mean = _sum_over_batch(z, axis_name) / n_global
  centered = z - mean
  square_sum = _sum_over_batch(centered * centered, axis_name)
  if unbiased_std:
    return centered / jnp.sqrt(square_sum / (n_global - 1))
  return centered * jax.lax.rsqrt(square_sum / n_global + _BN_EPS)


def barlow_twins(
    z_a: jnp.ndarray,
    z_b: jnp.ndarray,
    *,
    lambda_offdiag: float = 0.0051,
    unbiased_std: bool = False,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Barlow Twins' redundancy-reduction loss (Zbontar et al. 2021, Sec. 2, Eq. 1-2).

  With ``N`` the global batch and ``D`` the projection width, each view is standardised per
  feature over the global batch (`batch_standardize`), and the ``D x D`` cross-correlation of
  the two views is pushed towards the identity:

      C = std(z_a)^T std(z_b) / N,
      L = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2.

  Defaults follow facebookresearch/barlowtwins ``main.py``: biased variance with epsilon 1e-5
  (its synchronised non-affine ``BatchNorm1d``), ``C`` divided by the global batch and summed
  over GPUs (``all_reduce``), lambda 0.0051. ``unbiased_std=True`` is MetaMask's variant
  (MetaMask ``loss.py``: unbiased ``std``, no epsilon, ``C`` still divided by ``N``); its lambda
  (5e-3) is passed as `lambda_offdiag`, this flag does not change it. ``C`` is computed in
  float32 at the highest matmul precision (TPUs would otherwise round its inputs to bf16).

  Args:
    z_a: ``[n, D]`` projections of the first view (this device's rows).
    z_b: ``[n, D]`` projections of the second view, row-aligned with `z_a`.
    lambda_offdiag: weight of the off-diagonal (redundancy) term, >= 0.
    unbiased_std: MetaMask's standardisation instead of BatchNorm's.
    axis_name: if given, the standardisation statistics and ``C`` span the rows of every
      device and each device returns the whole global loss (see the module docstring).

  Returns:
    ``(loss, metrics)``: the float32 scalar loss and ``on_diag_mean`` (mean of ``C_ii``, 1 at
    perfect invariance) and ``off_diag_mean_sq`` (mean of ``C_ij^2`` over ``i != j``).

  Raises:
    ValueError: `lambda_offdiag` < 0, or a global batch of fewer than 2 rows (batch
      statistics of one row are meaningless; torch's BatchNorm refuses them too).
  """
  chex.assert_rank([z_a, z_b], 2)
  chex.assert_equal_shape([z_a, z_b])
  if lambda_offdiag < 0:
    raise ValueError(f"lambda_offdiag must be >= 0, got {lambda_offdiag}")
  n, d = z_a.shape
  n_global = _global_batch_size(n, axis_name)
  if n_global < 2:
    raise ValueError(f"barlow_twins needs a global batch of at least 2 rows to standardise "
                     f"the features, got {n_global}")
  a = batch_standardize(z_a, unbiased_std=unbiased_std, axis_name=axis_name)
  b = batch_standardize(z_b, unbiased_std=unbiased_std, axis_name=axis_name)
  corr = jnp.matmul(a.T, b, precision=jax.lax.Precision.HIGHEST) / n_global
  if axis_name is not None:
    corr = jax.lax.psum(corr, axis_name)
  diag = jnp.diagonal(corr)
  is_diag = jnp.arange(d)[:, None] == jnp.arange(d)[None, :]
  off_diag_sq = jnp.sum(jnp.where(is_diag, 0.0, corr * corr))
  loss = jnp.sum((1.0 - diag) ** 2) + lambda_offdiag * off_diag_sq
  metrics = {"on_diag_mean": jnp.mean(diag),
             "off_diag_mean_sq": off_diag_sq / max(d * (d - 1), 1)}
  return loss, metrics
