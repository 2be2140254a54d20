"""Contrastive losses.

Distributed convention shared by every ssljax loss that takes ``axis_name``: the function runs
per device (inside ``shard_map`` or ``pmap``) on that device's rows, gathers what it needs from
the other devices, and returns this device's share of the loss: the mean over its own
anchors. Averaging that value over devices gives the loss of the concatenated global batch, and
so does averaging the per-device gradients (``lax.pmean(grads, axis_name)``), because the
transpose of ``all_gather`` sums the cotangents each device's loss sends to the other devices'
rows. Tests compare both against the single-device computation.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

_EPS = 1e-12


def l2_normalize(x: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  """x / max(||x||_2, eps) along `axis` (matches torch.nn.functional.normalize)."""
  norm = jnp.linalg.norm(x, axis=axis, keepdims=True)
  return x / jnp.maximum(norm, _EPS)


def gather_rows(x: jnp.ndarray, axis_name: str | None) -> tuple[jnp.ndarray, jnp.ndarray]:
  """Concatenates `x` over `axis_name` along axis 0; also returns this device's row offset.

  Without an axis name it returns ``(x, 0)``. The gather is differentiable: its transpose
  sums the cotangents of every device's copy into the owner's rows.
  """
  if axis_name is None:
    return x, jnp.zeros((), jnp.int32)
  gathered = jax.lax.all_gather(x, axis_name, tiled=True)
  offset = jax.lax.axis_index(axis_name) * x.shape[0]
  return gathered, offset


def nt_xent(
    z_a: jnp.ndarray,
    z_b: jnp.ndarray,
    *,
    temperature: float,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """SimCLR's NT-Xent loss (normalised temperature-scaled cross-entropy), SPEC 6.1.

  For N images with two views, the 2N projections are L2-normalised and every projection is
  an anchor whose positive is the other view of the same image and whose negatives are the
  other 2N - 2 projections (the anchor itself is excluded):

      l(i) = -log exp(s_ip / t) / sum_{k != i} exp(s_ik / t),   s = cosine similarity,
      L = mean over all 2N anchors.

  Args:
    z_a: ``[n, d]`` projections of the first view (this device's rows).
    z_b: ``[n, d]`` projections of the second view, row-aligned with `z_a`.
    temperature: t > 0.
    axis_name: if given, negatives come from the projections of every device on this axis
      (global-batch NT-Xent) and the returned loss is this device's mean over its 2n anchors.

  Returns:
    ``(loss, metrics)``: the scalar loss (float32) and ``metrics`` with ``pos_sim`` (mean
    cosine of positive pairs), ``neg_sim`` (mean cosine to negatives) and ``accuracy`` (share
    of anchors whose most similar candidate is their positive).
  """
  chex.assert_rank([z_a, z_b], 2)
  chex.assert_equal_shape([z_a, z_b])
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  z_a = l2_normalize(z_a.astype(jnp.float32))
  z_b = l2_normalize(z_b.astype(jnp.float32))
  n = z_a.shape[0]
  all_a, offset = gather_rows(z_a, axis_name)
  all_b, _ = gather_rows(z_b, axis_name)
  n_global = all_a.shape[0]

  anchors = jnp.concatenate([z_a, z_b], axis=0)  # [2n, d]
  candidates = jnp.concatenate([all_a, all_b], axis=0)  # [2N, d]
  sims = anchors @ candidates.T  # [2n, 2N]
  rows = jnp.arange(n) + offset
  self_index = jnp.concatenate([rows, rows + n_global])
  pos_index = jnp.concatenate([rows + n_global, rows])
  is_self = jax.nn.one_hot(self_index, 2 * n_global, dtype=jnp.bool_)
  logits = jnp.where(is_self, -jnp.inf, sims / temperature)
  pos_logit = jnp.take_along_axis(logits, pos_index[:, None], axis=1)[:, 0]
  loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - pos_logit)

  pos_sim = jnp.take_along_axis(sims, pos_index[:, None], axis=1)[:, 0]
  is_pos = jax.nn.one_hot(pos_index, 2 * n_global, dtype=jnp.bool_)
  num_neg = 2 * n_global - 2
  neg_sim = jnp.sum(jnp.where(is_self | is_pos, 0.0, sims), axis=1) / max(num_neg, 1)
  accuracy = jnp.mean(jnp.argmax(logits, axis=1) == pos_index)
  metrics = {"pos_sim": jnp.mean(pos_sim), "neg_sim": jnp.mean(neg_sim),
             "accuracy": accuracy.astype(jnp.float32)}
  return loss, metrics
