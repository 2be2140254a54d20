"""Contrastive losses.

Distributed convention shared by every ssljax loss that takes ``axis_name``: the function runs
per device (inside ``shard_map`` or ``pmap``) on that device's rows, gathers what it needs from
the other devices, and returns this device's share of the loss: the mean over its own
anchors. Averaging that value over devices gives the loss of the concatenated global batch, and
so does averaging the per-device gradients (``lax.pmean(grads, axis_name)``), because the
transpose of ``all_gather`` sums the cotangents each device's loss sends to the other devices'
rows. Tests compare both against the single-device computation.

Scope: this convention holds where the per-device function runs under ``pmap`` or under
``jax.shard_map(..., check_vma=False)``, as ``ssljax.train.step`` runs it. Under
``check_vma=True`` JAX differentiates replicated parameters with varying-axis types and sums
their cotangents over devices itself, so the gradient of a replicated parameter through a
gathered loss comes out multiplied by the device count (measured on 8 CPU devices: 8.0x for
``nt_xent``, 1.0x for ``barlow_twins``); the train step refuses to be traced there.
"""

from __future__ import annotations

import math
from typing import Sequence

import chex
import jax
import jax.numpy as jnp
import numpy as np

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
  """SimCLR's NT-Xent loss (normalised temperature-scaled cross-entropy).

  Chen et al. 2020, Sec. 2.1, Eq. 1; google-research/simclr ``objective.py``
  ``add_contrastive_loss``.

  For N images with two views, the 2N projections are L2-normalised and every projection is
  an anchor whose positive is the other view of the same image and whose negatives are the
  other 2N - 2 projections (the anchor itself is excluded):

      l(i) = -log exp(s_ip / t) / sum_{k != i} exp(s_ik / t),   s = cosine similarity,
      L = mean over all 2N anchors.

  This is `multiview_nt_xent` with two views.

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
  return multiview_nt_xent([z_a, z_b], temperature=temperature, axis_name=axis_name)


def multiview_nt_xent(
    views: Sequence[jnp.ndarray],
    *,
    temperature: float,
    positives: str = "mean_log",
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """NT-Xent over V >= 2 views per image: every other view of the same image is a positive.

  The V * N projections are L2-normalised; each is an anchor i with positives P(i) (the V - 1
  other views of its image) and candidates every projection but itself, with
  ``Z_i = sum_{k != i} exp(s_ik / t)``. Two ways to combine the positives of an anchor:

      positives="mean_log" (default; Khosla et al. 2020, "Supervised Contrastive Learning",
      Sec. 3.2.2, L_out): each positive is its own log-ratio, averaged,
          l(i) = -1/(V-1) sum_{p in P(i)} log (exp(s_ip / t) / Z_i);
      positives="log_sum" (solo-learn's multi-crop SimCLR, ``solo/losses/simclr.py``
      ``simclr_loss_func``: ``-log(pos / (pos + neg))``): one log of the summed positives,
          l(i) = -log (sum_{p in P(i)} exp(s_ip / t) / Z_i);
      L = mean over all V * N anchors.

  ssljax's choice is the mean of logs: every positive pair gets its own pull, however well
  the anchor already matches its other positives (in the log of a sum an easy positive
  dominates and the hard ones, e.g. small crops, get little gradient), and SupCon reports it
  trains better than the log-of-sum form (Sec. 3.2.2: L_out beats L_in on ImageNet).
  ``"log_sum"`` is the form to reproduce solo-learn's multi-crop runs. With V = 2 there is one
  positive, the two forms are the same and both are exactly `nt_xent` (SimCLR, Chen et al.
  2020, Sec. 2.1, Eq. 1). Views may come from crops of different resolutions (multi-crop
  SimCLR): they are interchangeable here, each an anchor and each a candidate, as in solo-learn.

  Args:
    views: V arrays ``[n, d]`` of projections, row i of each from image i (this device's rows).
    temperature: t > 0.
    positives: ``"mean_log"`` or ``"log_sum"``, as above.
    axis_name: if given, negatives come from every device's projections on this axis and the
      returned loss is this device's mean over its V * n anchors (the package's convention:
      the mean over devices is the global loss, and so is the mean of the gradients).

  Returns:
    ``(loss, metrics)``: the scalar float32 loss and ``pos_sim`` (mean cosine of positive
    pairs), ``neg_sim`` (mean cosine to the other images' projections) and ``accuracy``
    (share of anchors whose most similar candidate is one of their positives).
  """
  per_anchor, metrics = _nt_xent_anchor_losses(views, temperature, positives, axis_name)
  return jnp.mean(per_anchor), metrics


def multiview_nt_xent_terms(
    views: Sequence[jnp.ndarray],
    *,
    temperature: float,
    positives: str = "mean_log",
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """`multiview_nt_xent` before its reduction: per-(view, image) terms ``[V, n]``.

  ``terms[v, i] = l(anchor (v, i)) / V``, so that ``sum_v mean_i terms[v, i]`` is the loss of
  `multiview_nt_xent` (the mean over the V n anchors). A weight on ``terms[v, i]`` weights view
  v of image i as an anchor (its negatives and positives are unchanged), which is how UOTA
  weights SimCLR (UOTA paper, Sec. 3; its official code weights SwAV's terms the same way).

  Args and metrics: as `multiview_nt_xent`.

  Returns:
    ``(terms, metrics)`` with float32 ``terms`` of shape ``[V, n]`` (this device's rows).
  """
  per_anchor, metrics = _nt_xent_anchor_losses(views, temperature, positives, axis_name)
  num_views = len(views)
  return per_anchor.reshape(num_views, -1) / num_views, metrics


# The ways `multiview_nt_xent` combines an anchor's positives (its ``positives`` argument).
POSITIVE_FORMS = ("mean_log", "log_sum")


def _nt_xent_anchor_losses(views: Sequence[jnp.ndarray], temperature: float, positives: str,
                           axis_name: str | None) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Per-anchor losses ``[V n]`` (view-major) and metrics of `multiview_nt_xent`."""
  views = list(views)
  if positives not in POSITIVE_FORMS:
    raise ValueError(f"positives must be one of {POSITIVE_FORMS} (mean of per-positive logs, "
                     f"or log of the summed positives as solo-learn), got {positives!r}")
  if len(views) < 2:
    raise ValueError(f"NT-Xent needs at least 2 views per image, got {len(views)}")
  chex.assert_rank(views, 2)
  chex.assert_equal_shape(views)
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  num_views = len(views)
  zs = [l2_normalize(z.astype(jnp.float32)) for z in views]
  n = zs[0].shape[0]
  gathered = [gather_rows(z, axis_name) for z in zs]
  offset = gathered[0][1]
  n_global = gathered[0][0].shape[0]
  if n_global < 2:  # no negatives: the loss would be log(V - 1) - log(V - 1) = 0, silently
    raise ValueError(f"NT-Xent needs at least 2 images (rows per view) to have negatives, "
                     f"got {n_global}" + (f" over axis {axis_name!r}" if axis_name else ""))

  anchors = jnp.concatenate(zs, axis=0)  # [V n, d], view-major
  candidates = jnp.concatenate([g for g, _ in gathered], axis=0)  # [V N, d], view-major
  sims = anchors @ candidates.T  # [V n, V N]
  anchor_image = jnp.tile(jnp.arange(n) + offset, num_views)
  anchor_column = jnp.repeat(jnp.arange(num_views), n) * n_global + anchor_image
  candidate_image = jnp.tile(jnp.arange(n_global), num_views)
  same_image = anchor_image[:, None] == candidate_image[None, :]
  is_self = jax.nn.one_hot(anchor_column, num_views * n_global, dtype=jnp.bool_)
  is_pos = same_image & ~is_self
  logits = jnp.where(is_self, -jnp.inf, sims / temperature)
  if positives == "mean_log":
    pos_logit = jnp.sum(jnp.where(is_pos, logits, 0.0), axis=1) / (num_views - 1)
  else:
    pos_logit = jax.nn.logsumexp(jnp.where(is_pos, logits, -jnp.inf), axis=1)
  per_anchor = jax.nn.logsumexp(logits, axis=1) - pos_logit  # [V n], view-major

  pos_sim = jnp.sum(jnp.where(is_pos, sims, 0.0), axis=1) / (num_views - 1)
  num_neg = num_views * (n_global - 1)
  neg_sim = jnp.sum(jnp.where(same_image, 0.0, sims), axis=1) / max(num_neg, 1)
  top = jnp.argmax(logits, axis=1)
  accuracy = jnp.mean(jnp.take_along_axis(is_pos, top[:, None], axis=1)[:, 0])
  metrics = {"pos_sim": jnp.mean(pos_sim), "neg_sim": jnp.mean(neg_sim),
             "accuracy": accuracy.astype(jnp.float32)}
  return per_anchor, metrics


def moco_infonce(
    q: jnp.ndarray,
    k: jnp.ndarray,
    queue: jnp.ndarray,
    *,
    temperature: float,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """MoCo's InfoNCE loss: each query against its key and a queue of past keys.

  He et al. 2020, Sec. 3.1, Eq. 1 (the queue: Sec. 3.2); facebookresearch/moco
  ``moco/builder.py`` ``MoCo.forward``.

  With q_i and k_i L2-normalised and Q the queue of K earlier keys:

      l_i = -log exp(q_i.k_i / t) / (exp(q_i.k_i / t) + sum_{j=1..K} exp(q_i.Q_j / t)),
      L = mean_i l_i,

  i.e. the cross-entropy of the K + 1 logits ``[q.k, q.Q_1, ..., q.Q_K] / t`` with target 0,
  as the official code builds them (``cat([l_pos, l_neg]) / T``, label 0).

  Gradients: `queue` is a memory of past keys and is treated as a constant (stop-gradient
  inside). `k` is differentiated like any input; MoCo passes keys from its EMA encoder under
  stop-gradient, as the official code computes them under ``no_grad``.

  Args:
    q: ``[n, d]`` query projections (this device's rows); normalised here.
    k: ``[n, d]`` key projections, row-aligned with `q` (the positives); normalised here.
    queue: ``[K, d]`` past keys, used as they are (MoCo stores them L2-normalised).
    temperature: t > 0.
    axis_name: accepted for the signature every ssljax loss shares. The loss needs no
      communication: the queue is replicated, so each device returns the mean over its own
      rows, and the ``pmean`` over devices of these values and of their gradients equals the
      single-device loss and gradient on the concatenated batch (the module's convention).

  Returns:
    ``(loss, metrics)``: the scalar loss (float32) and ``metrics`` with ``pos_sim`` (mean
    cosine q.k), ``neg_sim`` (mean cosine of queries to queue rows) and ``accuracy`` (share of
    queries whose largest logit is their key's).
  """
  per_row, metrics = moco_infonce_terms(q, k, queue, temperature=temperature,
                                        axis_name=axis_name)
  return jnp.mean(per_row), metrics


def moco_infonce_terms(
    q: jnp.ndarray,
    k: jnp.ndarray,
    queue: jnp.ndarray,
    *,
    temperature: float,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """`moco_infonce` before its reduction: the per-query losses ``l_i``, float32 ``[n]``.

  Arguments and metrics as `moco_infonce`, whose loss is ``mean_i l_i``.
  """
  del axis_name  # nothing to gather: see `moco_infonce`
  chex.assert_rank([q, k, queue], 2)
  chex.assert_equal_shape([q, k])
  chex.assert_axis_dimension(queue, 1, q.shape[1])
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  q = l2_normalize(q.astype(jnp.float32))
  k = l2_normalize(k.astype(jnp.float32))
  queue = jax.lax.stop_gradient(queue.astype(jnp.float32))
  pos = jnp.sum(q * k, axis=1)  # [n]
  neg = q @ queue.T  # [n, K]
  logits = jnp.concatenate([pos[:, None], neg], axis=1) / temperature
  per_row = jax.nn.logsumexp(logits, axis=1) - logits[:, 0]
  metrics = {"pos_sim": jnp.mean(pos), "neg_sim": jnp.mean(neg),
             "accuracy": jnp.mean(jnp.argmax(logits, axis=1) == 0).astype(jnp.float32)}
  return per_row, metrics


def _check_npid_inputs(v: jnp.ndarray, bank: jnp.ndarray, index: jnp.ndarray,
                       temperature: float) -> None:
  """Shape checks, and a range check of `index` where its values are known.

  A concrete `index` (eager call) outside ``[0, N)`` raises. Under `jit` the values are not
  known at trace time; an out-of-range row then reads the fill value of JAX's gather (NaN),
  so its loss is NaN, which the trainer's non-finite guard reports with its step.
  """
  chex.assert_rank([v, bank, index], [2, 2, 1])
  chex.assert_axis_dimension(bank, 1, v.shape[1])
  chex.assert_axis_dimension(index, 0, v.shape[0])
  chex.assert_type(index, int)
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  if not isinstance(index, jax.core.Tracer) and index.size:
    # On the host: a concrete index closed over by a jitted function is still concrete, but
    # jnp.min of it inside the trace would be a tracer.
    values = np.asarray(index)
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= bank.shape[0]:
      raise ValueError(f"NPID index must lie in [0, {bank.shape[0]}) (one memory-bank row per "
                       f"training image), got values in [{lo}, {hi}]; the bank has "
                       f"{bank.shape[0]} rows: size it to the dataset (method.npid.bank_size)")


def npid_softmax(
    v: jnp.ndarray,
    bank: jnp.ndarray,
    index: jnp.ndarray,
    *,
    temperature: float,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """NPID's non-parametric softmax over the whole memory bank.

  Wu et al. 2018, Sec. 3.1, Eq. 2; as CLD's NPID branch runs it (frank-xwang/
  CLD-UnsupervisedLearning ``train_cifar_npid_cld.py`` with ``lib/LinearAverage.py``).

  Each example i is its own class, represented by its bank row m_{index_i}:

      P(j | v_i) = exp(m_j.v_i / t) / sum_{l=1..N} exp(m_l.v_i / t),
      L = -mean_i log P(index_i | v_i),

  the full-softmax objective (NPID with ``nce_k = 0``, CLD's NPID branch:
  ``CrossEntropy(v @ bank.T / t, index)``).

  Args:
    v: ``[n, d]`` embeddings of this device's rows; normalised here.
    bank: ``[N, d]`` memory bank, one row per training example, used as it is and treated as
      a constant (stop-gradient inside), as in the official code.
    index: int ``[n]`` dataset index of each row (its bank row is the positive).
    temperature: t > 0 (NPID 0.07, CLD 0.1).
    axis_name: accepted for the shared signature; no communication is needed (the bank is
      replicated): each device returns the mean over its rows, whose ``pmean`` (value and
      gradient) is the single-device result on the concatenated batch.

  Returns:
    ``(loss, metrics)`` with ``pos_sim`` (mean v.m_index), ``neg_sim`` (mean v.m_j over the
    other rows) and ``accuracy`` (share of rows whose most similar bank row is their own).
  """
  del axis_name  # nothing to gather: see the docstring
  per_row, metrics = _npid_softmax_rows(v, bank, index, temperature)
  return jnp.mean(per_row), metrics


def _npid_softmax_rows(v: jnp.ndarray, bank: jnp.ndarray, index: jnp.ndarray,
                       temperature: float) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Per-row losses ``[n]`` and metrics of `npid_softmax`."""
  _check_npid_inputs(v, bank, index, temperature)
  v = l2_normalize(v.astype(jnp.float32))
  bank = jax.lax.stop_gradient(bank.astype(jnp.float32))
  sims = v @ bank.T  # [n, N]
  pos = jnp.take_along_axis(sims, index[:, None], axis=1)[:, 0]
  logits = sims / temperature
  per_row = jax.nn.logsumexp(logits, axis=1) - pos / temperature
  num_neg = max(bank.shape[0] - 1, 1)
  metrics = {"pos_sim": jnp.mean(pos),
             "neg_sim": jnp.mean((jnp.sum(sims, axis=1) - pos) / num_neg),
             "accuracy": jnp.mean(jnp.argmax(sims, axis=1) == index).astype(jnp.float32)}
  return per_row, metrics


def _npid_nce_scores(v: jnp.ndarray, bank: jnp.ndarray, index: jnp.ndarray,
                     noise_index: jnp.ndarray, temperature: float) -> jnp.ndarray:
  """``[n, 1 + K]`` logits m.v / t: column 0 the positive, then the noise rows."""
  chex.assert_rank(noise_index, 2)
  chex.assert_axis_dimension(noise_index, 0, v.shape[0])
  chex.assert_type(noise_index, int)
  v = l2_normalize(v.astype(jnp.float32))
  rows = jnp.concatenate([index[:, None], noise_index], axis=1)  # [n, 1 + K]
  weights = jax.lax.stop_gradient(bank.astype(jnp.float32))[rows]  # [n, 1 + K, d]
  return jnp.einsum("nkd,nd->nk", weights, v) / temperature


def npid_nce_log_z(
    v: jnp.ndarray,
    bank: jnp.ndarray,
    index: jnp.ndarray,
    noise_index: jnp.ndarray,
    *,
    temperature: float,
    axis_name: str | None = None,
) -> jnp.ndarray:
  """log Z, NPID's estimate of the softmax normaliser from one batch (Wu et al. 2018, Sec. 3.2).

      Z = N * mean_{i, c} exp(m_c.v_i / t)

  over the rows i of the batch and the columns c = (positive, K noise rows) of each, as the
  official ``NCEAverage`` does on its first batch (its mean includes the positive column).
  Computed in log space (no overflow for small t). The result is a constant (stop-gradient).

  Args:
    v, bank, index, noise_index, temperature: as in `npid_nce`.
    axis_name: if given, the mean runs over the rows of every device (the global batch), so
      every device gets the same Z.

  Returns:
    float32 scalar log Z.
  """
  _check_npid_inputs(v, bank, index, temperature)
  scores = jax.lax.stop_gradient(
      _npid_nce_scores(v, bank, index, noise_index, temperature))
  log_sum = jax.nn.logsumexp(scores)
  count = scores.size
  if axis_name is not None:
    every = jax.lax.all_gather(log_sum, axis_name)
    log_sum, count = jax.nn.logsumexp(every), count * every.shape[0]
  return log_sum - jnp.log(float(count)) + jnp.log(float(bank.shape[0]))


def npid_nce(
    v: jnp.ndarray,
    bank: jnp.ndarray,
    index: jnp.ndarray,
    noise_index: jnp.ndarray,
    *,
    temperature: float,
    log_z: jnp.ndarray | float,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """The NCE approximation of NPID's softmax (the original NPID, Wu et al. 2018, Sec. 3.2).

  With P(j | v) = exp(m_j.v / t) / Z (Z fixed, see `npid_nce_log_z`), uniform noise
  P_n = 1 / N and K noise rows j_1..j_K per example, the probability that row j came from
  the data rather than the noise is h(j, v) = P(j | v) / (P(j | v) + K P_n), and

      L = -mean_i [ log h(index_i, v_i) + sum_{k=1..K} log(1 - h(j_ik, v_i)) ].

  The official ``NCECriterion`` (CLD lib/NCECriterion.py, lemniscate.pytorch) adds
  eps = 1e-7 to both denominators, h = P / (P + K P_n + eps) and 1 - h = K P_n / (P + K P_n +
  eps), and so does this function: the loss moves by about eps N per row (5e-3 on a loss of
  10 at N = 50,000, K = 4096), far above float32 rounding. With c = log(K P_n + eps) =
  log(K/N) + log1p(eps N / K), computed in float64 at trace time, it is evaluated in log space
  as log h = -softplus(c - log P) and log(1 - h) = -softplus(log P - c) - log1p(eps N / K),
  which keeps the small eps terms exact in float32 (``logaddexp(log P, c)`` would round them
  away at the scale of c). Noise rows are drawn with replacement and may hit the positive
  row, as the official alias sampler does.

  Args:
    v: ``[n, d]`` embeddings of this device's rows; normalised here.
    bank: ``[N, d]`` memory bank (constant, stop-gradient inside).
    index: int ``[n]`` dataset index of each row.
    noise_index: int ``[n, K]`` noise rows of each example.
    temperature: t > 0 (NPID 0.07).
    log_z: log of the normaliser Z (a constant).
    axis_name: accepted for the shared signature; no communication is needed (each device
      returns its mean over its rows; ``pmean`` of values and gradients = single device).

  Returns:
    ``(loss, metrics)`` with ``pos_sim`` (mean v.m_index), ``neg_sim`` (mean v.m over the
    noise rows) and ``pos_prob`` (mean h of the positives).
  """
  del axis_name  # nothing to gather: see the docstring
  per_row, metrics = _npid_nce_rows(v, bank, index, noise_index, temperature, log_z)
  return jnp.mean(per_row), metrics


# The eps that the official NCECriterion adds to both denominators.
_NCE_EPS = 1e-7


def _npid_nce_rows(v: jnp.ndarray, bank: jnp.ndarray, index: jnp.ndarray,
                   noise_index: jnp.ndarray, temperature: float, log_z: jnp.ndarray | float
                   ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Per-row losses ``[n]`` and metrics of `npid_nce`."""
  _check_npid_inputs(v, bank, index, temperature)
  logits = _npid_nce_scores(v, bank, index, noise_index, temperature)
  num_noise, size = noise_index.shape[1], bank.shape[0]
  log_p = logits - jax.lax.stop_gradient(jnp.asarray(log_z, jnp.float32))
  # The official eps in both denominators: c = log(K P_n + eps), in float64 here.
  eps_ratio = _NCE_EPS * size / num_noise  # eps / (K P_n)
  log_noise_eps = math.log(num_noise / size) + math.log1p(eps_ratio)
  log_h_pos = -jax.nn.softplus(log_noise_eps - log_p[:, 0])
  log_1mh_noise = -jax.nn.softplus(log_p[:, 1:] - log_noise_eps)
  per_row = -(log_h_pos + jnp.sum(log_1mh_noise, axis=1)) + num_noise * math.log1p(eps_ratio)
  sims = logits * temperature
  metrics = {"pos_sim": jnp.mean(sims[:, 0]), "neg_sim": jnp.mean(sims[:, 1:]),
             "pos_prob": jnp.mean(jnp.exp(log_h_pos))}
  return per_row, metrics


def npid(
    v: jnp.ndarray,
    bank: jnp.ndarray,
    index: jnp.ndarray,
    *,
    temperature: float,
    noise_index: jnp.ndarray | None = None,
    log_z: jnp.ndarray | float | None = None,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """NPID's loss: `npid_softmax` by default, `npid_nce` when noise rows are given.

  The official code picks the same way (``nce_k = 0``: full softmax, ``LinearAverage``;
  ``nce_k > 0``: NCE, ``NCEAverage``). NCE needs both `noise_index` and `log_z`.
  """
  _check_npid_mode(noise_index, log_z)
  if noise_index is None:
    return npid_softmax(v, bank, index, temperature=temperature, axis_name=axis_name)
  return npid_nce(v, bank, index, noise_index, temperature=temperature, log_z=log_z,
                  axis_name=axis_name)


def npid_terms(
    v: jnp.ndarray,
    bank: jnp.ndarray,
    index: jnp.ndarray,
    *,
    temperature: float,
    noise_index: jnp.ndarray | None = None,
    log_z: jnp.ndarray | float | None = None,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """`npid` before its reduction: the per-row losses, float32 ``[n]`` (their mean is `npid`).

  Arguments and metrics as `npid` (full softmax, or NCE with `noise_index` and `log_z`).
  """
  del axis_name  # nothing to gather: see `npid_softmax` / `npid_nce`
  _check_npid_mode(noise_index, log_z)
  if noise_index is None:
    return _npid_softmax_rows(v, bank, index, temperature)
  return _npid_nce_rows(v, bank, index, noise_index, temperature, log_z)


def _check_npid_mode(noise_index, log_z) -> None:
  if noise_index is None and log_z is not None:
    raise ValueError("npid: log_z is only used by the NCE loss; pass noise_index too")
  if noise_index is not None and log_z is None:
    raise ValueError("npid: the NCE loss (noise_index given) needs log_z; estimate it with "
                     "npid_nce_log_z on the first batch")
