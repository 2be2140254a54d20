"""The two objectives of "Improving Self-Supervised Learning by Characterizing Idealized
Representations" (Dubois, Hashimoto, Ermon, Liang; NeurIPS 2022): CISSL and DISSL.

Both take the outputs of two different heads on the two views of each image: a *student*
head with the architecture of the downstream probe (linear for linear probing) and an
expressive *teacher* head. The formulas follow the official code
(YannDubs/Invariant-Self-Supervised-Learning, issl/losses/contrastive.py ``CISSL`` and
issl/losses/dissl.py ``DISSL``).

* `cissl`: a contrastive loss between the student outputs (anchors) and the teacher outputs
  (candidates) in which each anchor has two positives with target probability 1/2 each, the
  teacher output of the same view (kept: the two heads differ, so it is not trivial) and of
  the other view; there is no diagonal mask.
* `dissl`: the teacher assigns each view a distribution over C equivalence classes; the
  student predicts the teacher's assignment of the other view (distillation), the teacher's
  batch marginal is pushed towards high entropy (maximality), and the teacher's assignments
  of the two views towards agreement and determinism. No stop-gradient anywhere.

Distributed convention (as in ``ssljax.losses.contrastive``): the functions run per device on
that device's rows and return this device's share of the loss; the mean over devices of the
values and of the per-device gradients is the loss (gradient) of the concatenated batch, for
the ``pmap`` / ``shard_map(check_vma=False)`` scope stated there. `cissl` gathers the teacher
outputs of every device (global-batch negatives). `dissl` takes its marginal over this
device's batch by default, as the official code does (each GPU computes the loss of its own
batch under DDP), or over the global batch with ``global_marginal=True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from ssljax.losses.contrastive import gather_rows, l2_normalize


def _check_positive(name: str, value) -> None:
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def _check_pairs(kind: str, **arrays: jnp.ndarray) -> tuple[int, int]:
  """Every array rank 2 and of one shape: returns (n, width); else a ValueError naming them."""
  shapes = {name: tuple(jnp.shape(x)) for name, x in arrays.items()}
  for name, shape in shapes.items():
    if len(shape) != 2:
      raise ValueError(f"{kind}: {name} must be [n, d] (rank 2), got shape {shape}")
  if len(set(shapes.values())) != 1:
    listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
    raise ValueError(f"{kind}: the head outputs must have one shape [n, d], got {listed}")
  return next(iter(shapes.values()))


# ------------------------------------------------------------------------------------ CISSL

def cissl(
    student_a: jnp.ndarray,
    student_b: jnp.ndarray,
    teacher_a: jnp.ndarray,
    teacher_b: jnp.ndarray,
    *,
    temperature: float = 0.07,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """CISSL: contrastive ISSL with asymmetric heads and the self-pair kept as a positive.

  With N images, u_k the L2-normalised student outputs and w_l the L2-normalised teacher
  outputs of the 2N views (view a of every image, then view b), and L_kl = u_k . w_l / t:

      l(k) = -1/2 [ log softmax_l(L_k.)_k + log softmax_l(L_k.)_pos(k) ],
      L = mean over the 2N anchors k,

  pos(k) the other view of k's image; the softmax runs over all 2N teacher outputs, k's own
  included (official code: ``is_self_contrastive=True``, the target puts mass 1/2 on both).
  With identical heads and the self column removed instead, this is SimCLR's NT-Xent.

  Args:
    student_a, student_b: ``[n, d]`` student (probe-shaped) head outputs of the two views,
      before normalisation; row i of each from image i (this device's rows).
    teacher_a, teacher_b: ``[n, d]`` teacher head outputs of the same views.
    temperature: t > 0 (official default 0.07).
    axis_name: if given, the candidates are the teacher outputs of every device on this axis
      (global-batch negatives, as SimCLR's) and the loss is this device's mean over its 2n
      anchors. (The official code gathers nothing: under DDP each GPU contrasts its own
      batch; pass None inside a per-device function for that.)

  Returns:
    ``(loss, metrics)``: the float32 scalar loss and metrics ``pos_sim`` (mean cosine of an
    anchor with the other view's teacher output), ``self_sim`` (with its own view's),
    ``neg_sim`` (with the other images'), ``accuracy`` (share of anchors whose largest logit
    is one of their two positives; near 1 as soon as the student and teacher agree on the same
    view, so ``pos_sim`` is the informative one) and ``I_q_zm`` (log 2N - loss, the official code's
    monitored lower bound).

  Raises:
    ValueError: temperature <= 0, head outputs not all ``[n, d]`` of one shape, or fewer than
      2 images in the (global) batch (no negatives).
  """
  per_anchor, metrics = _cissl_anchor_losses(student_a, student_b, teacher_a, teacher_b,
                                             temperature, axis_name)
  return jnp.mean(per_anchor), metrics


def cissl_terms(
    student_a: jnp.ndarray,
    student_b: jnp.ndarray,
    teacher_a: jnp.ndarray,
    teacher_b: jnp.ndarray,
    *,
    temperature: float = 0.07,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """`cissl` before its reduction: per-(view, image) terms ``[2, n]``, ``l(anchor) / 2``.

  ``sum_v mean_i terms[v, i]`` is the loss of `cissl` (same arguments and metrics).
  """
  per_anchor, metrics = _cissl_anchor_losses(student_a, student_b, teacher_a, teacher_b,
                                             temperature, axis_name)
  return per_anchor.reshape(2, -1) / 2.0, metrics


def _cissl_anchor_losses(student_a, student_b, teacher_a, teacher_b, temperature, axis_name):
  n, _ = _check_pairs("cissl", student_a=student_a, student_b=student_b, teacher_a=teacher_a,
                      teacher_b=teacher_b)
  _check_positive("cissl temperature", temperature)
  u = l2_normalize(jnp.concatenate([student_a, student_b], axis=0).astype(jnp.float32))
  w_a, offset = gather_rows(l2_normalize(teacher_a.astype(jnp.float32)), axis_name)
  w_b, _ = gather_rows(l2_normalize(teacher_b.astype(jnp.float32)), axis_name)
  n_global = w_a.shape[0]
  if n_global < 2:
    raise ValueError(f"cissl needs at least 2 images in the batch to have negatives, got "
                     f"{n_global}" + (f" over axis {axis_name!r}" if axis_name else ""))
  w = jnp.concatenate([w_a, w_b], axis=0)  # [2N, d]: view a of every image, then view b
  sims = u @ w.T  # [2n, 2N]
  logp = jax.nn.log_softmax(sims / temperature, axis=1)

  image = jnp.tile(jnp.arange(n) + offset, 2)  # anchor k's image (global index)
  view = jnp.repeat(jnp.arange(2), n)
  self_col = view * n_global + image
  pos_col = (1 - view) * n_global + image
  take = lambda m, col: jnp.take_along_axis(m, col[:, None], axis=1)[:, 0]
  per_anchor = -0.5 * (take(logp, self_col) + take(logp, pos_col))  # [2n]

  same_image = jnp.tile(jnp.arange(n_global), 2)[None, :] == image[:, None]
  top = jnp.argmax(sims, axis=1)
  num_neg = 2 * (n_global - 1)
  metrics = {
      "pos_sim": jnp.mean(take(sims, pos_col)),
      "self_sim": jnp.mean(take(sims, self_col)),
      "neg_sim": jnp.mean(jnp.sum(jnp.where(same_image, 0.0, sims), axis=1) / num_neg),
      "accuracy": jnp.mean(((top == self_col) | (top == pos_col)).astype(jnp.float32)),
      "I_q_zm": jnp.log(2.0 * n_global) - jnp.mean(per_anchor),
  }
  return per_anchor, metrics


# ------------------------------------------------------------------------------------ DISSL

def _entropy(probs: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(jnp.where(probs > 0, probs, 1.0)),
                            0.0), axis=axis)


def dissl(
    teacher_a: jnp.ndarray,
    teacher_b: jnp.ndarray,
    student_a: jnp.ndarray,
    student_b: jnp.ndarray,
    *,
    teacher_temperature: float = 0.5,
    student_temperature: float = 1.0,
    lambda_maximality: float = 2.3,
    beta_det_inv: float = 0.8,
    axis_name: str | None = None,
    global_marginal: bool = False,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """DISSL: distillation ISSL (no EMA teacher, no stop-gradient).

  With P^v = softmax(t^v / tau_t) the teacher assignments and log Q^v = log_softmax(s^v /
  tau_s) the student predictions of view v over C classes (both in float32), and p^v the
  batch mean of P^v, summing over the ordered view pairs (v, v') = (a, b), (b, a):

      distill = 1/2 sum_{v != v'} mean_i -sum_c P^v_ic log Q^v'_ic
      H_max   = 1/2 sum_v H[p^v]
      det_inv = 1/2 sum_{v != v'} mean_i -sum_c P^v_ic log P^v'_ic
      L = distill - lambda * H_max + beta * det_inv.

  Gradients flow through every P^v, including where it is the target of a cross-entropy;
  since CE(P^v, Q^v') = KL(P^v || Q^v') + H[P^v], the distillation term also rewards a
  deterministic teacher, which is why beta is much smaller than lambda.

  Marginal: p^v is the mean over this device's rows (default), as in the official code,
  where each GPU computes the loss of its own batch. ``global_marginal=True`` takes it over
  the global batch (the mean of every device's marginal, gathered differentiably); then the
  mean over devices of the values and gradients equals the single-device loss of the
  concatenated batch. The other terms are means over rows and need no communication.

  Args:
    teacher_a, teacher_b: ``[n, C]`` teacher logits of the two views (this device's rows).
    student_a, student_b: ``[n, C]`` student logits of the same views.
    teacher_temperature: tau_t > 0 (official 0.5, half the student's).
    student_temperature: tau_s > 0 (official 1.0).
    lambda_maximality: lambda, weight of the marginal entropy (official 2.3).
    beta_det_inv: beta, weight of the determinism + invariance term (official 0.8).
    axis_name: the data axis; used for the global marginal and for the metric ``H_M_global``.
    global_marginal: marginal over the global batch instead of this device's.

  Returns:
    ``(loss, metrics)``: the float32 scalar loss and the official code's diagnostics:
    ``H_M`` (the entropy H_max of the marginal as used by the loss; log C at best),
    ``H_M_given_Z`` (mean entropy of the teacher assignments, H[M|Z]; 0 for a deterministic
    teacher), ``KL_invariance`` (det_inv - H[M|Z]: mean KL between the two views'
    assignments), ``KL_distillation`` (same-view CE(P^v, Q^v) - H[M|Z]: how far the student
    is from the teacher on the same view), ``CE_distill`` (the distill term) and
    ``H_M_global`` (entropy of the global-batch marginal, for monitoring), all scalars.

  Raises:
    ValueError: a temperature <= 0, negative lambda or beta, logits not all ``[n, C]`` of one
      shape, or C < 2 (a single class makes every term constant).
  """
  _, num_classes = _check_pairs("dissl", teacher_a=teacher_a, teacher_b=teacher_b,
                                student_a=student_a, student_b=student_b)
  _check_positive("dissl teacher_temperature", teacher_temperature)
  _check_positive("dissl student_temperature", student_temperature)
  for name, value in (("lambda_maximality", lambda_maximality),
                      ("beta_det_inv", beta_det_inv)):
    if isinstance(value, (int, float)) and value < 0:
      raise ValueError(f"dissl {name} must be >= 0, got {value}")
  if num_classes < 2:
    raise ValueError(f"dissl needs C >= 2 equivalence classes (logits [n, C]), got C = "
                     f"{num_classes}")
  if global_marginal and axis_name is None:
    global_marginal = False  # one device: its batch is the global batch

  t = jnp.stack([teacher_a, teacher_b]).astype(jnp.float32) / teacher_temperature  # [2, n, C]
  s = jnp.stack([student_a, student_b]).astype(jnp.float32) / student_temperature
  p = jax.nn.softmax(t, axis=-1)
  log_p = jax.nn.log_softmax(t, axis=-1)
  log_q = jax.nn.log_softmax(s, axis=-1)
  other = jnp.array([1, 0])

  cross = lambda target, log_pred: jnp.mean(-jnp.sum(target * log_pred, axis=-1), axis=-1)
  distill = jnp.mean(cross(p, log_q[other]))  # P^v against Q^v', v != v'
  det_inv = jnp.mean(cross(p, log_p[other]))

  marginal = jnp.mean(p, axis=1)  # [2, C], this device's rows
  if global_marginal:
    marginal = jnp.mean(jax.lax.all_gather(marginal, axis_name), axis=0)
  h_max = jnp.mean(_entropy(marginal))
  loss = distill - lambda_maximality * h_max + beta_det_inv * det_inv

  stopped = jax.lax.stop_gradient
  h_m_given_z = jnp.mean(_entropy(stopped(p)))
  same_view = jnp.mean(cross(stopped(p), stopped(log_q)))
  global_m = jnp.mean(stopped(p), axis=1)
  if axis_name is not None:
    global_m = jax.lax.pmean(global_m, axis_name)
  metrics = {
      "H_M": h_max,
      "H_M_given_Z": h_m_given_z,
      "KL_invariance": det_inv - h_m_given_z,
      "KL_distillation": same_view - h_m_given_z,
      "CE_distill": distill,
      "H_M_global": jnp.mean(_entropy(global_m)),
  }
  return loss, metrics
