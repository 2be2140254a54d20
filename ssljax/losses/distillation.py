"""Distillation losses: a student matches a target network's output on another view.

* `byol_regression`: BYOL's normalised regression of a prediction onto a target projection
  (SPEC 6.3).
* `dino`: DINO's cross-entropy between a centred, sharpened teacher distribution and the
  student distribution over every (teacher view, other student view) pair (SPEC 2.3b), with
  `dino_center_update` for the running centre the method keeps in its state.

Distributed convention (as in ``ssljax.losses.contrastive``): the functions run per device on
that device's rows. Both losses are means of per-row terms, so each device returns the mean
over its own rows, and the mean over devices of the values (and of the per-device gradients)
is the value (gradient) of the concatenated global batch; nothing is gathered. The only
cross-device reductions are ``pmean``s over `axis_name` for DINO's centre (the running mean of
the teacher outputs over the global batch) and for the diagnostic marginal entropy.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from ssljax.losses.contrastive import l2_normalize


def byol_regression(p: jnp.ndarray, target: jnp.ndarray
                    ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """BYOL's regression loss between predictions and targets (SPEC 6.3).

      L = (1/n) sum_i || p_i / ||p_i|| - t_i / ||t_i|| ||^2 = (1/n) sum_i (2 - 2 cos(p_i, t_i))

  in [0, 4]. BYOL's symmetric objective is the sum of two such batch means, one per direction
  ``L(p_1, t_2) + L(p_2, t_1)`` (in [0, 8]), which is the scale of both the DeepMind code
  (per-example sum of the two regressions, then the batch mean) and solo-learn.

  The target is *not* wrapped in ``stop_gradient`` here: the caller decides what is constant.
  In BYOL the target comes from the EMA network, whose weights live outside the differentiated
  parameters, and the method stops its gradient explicitly; keeping the function a plain
  regression also serves callers that want gradients on both sides.

  Args:
    p: ``[n, d]`` predictions (online network).
    target: ``[n, d]`` targets (target network), row-aligned with `p`.

  Returns:
    ``(loss, metrics)``: the float32 scalar loss and ``metrics['cosine']``, the mean cosine
    similarity of the pairs.
  """
  chex.assert_rank([p, target], 2)
  chex.assert_equal_shape([p, target])
  cosine = jnp.sum(l2_normalize(p.astype(jnp.float32)) *
                   l2_normalize(target.astype(jnp.float32)), axis=-1)
  loss = jnp.mean(2.0 - 2.0 * cosine)
  return loss, {"cosine": jnp.mean(cosine)}


def _entropy(probs: jnp.ndarray, axis: int = -1) -> jnp.ndarray:
  return -jnp.sum(jnp.where(probs > 0, probs * jnp.log(probs), 0.0), axis=axis)


def _check_static_positive(name: str, value) -> None:
  if isinstance(value, (int, float)) and not value > 0:
    raise ValueError(f"{name} must be > 0, got {value}")


def dino(
    student_logits: jnp.ndarray,
    teacher_logits: jnp.ndarray,
    *,
    center: jnp.ndarray,
    student_temperature: float,
    teacher_temperature: float | jnp.ndarray,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """DINO's self-distillation loss over all (teacher view, other student view) pairs.

  With S student views (the global crops first, then any small crops) and T <= S teacher
  views (the global crops; teacher view t is the same crop as student view t):

      q_t = softmax((g_t - c_t) / tau_t)      (teacher, centred by c_t, no gradient)
      log p_s = log_softmax(s_s / tau_s)      (student)
      L = (1/|P|) sum_{(t, s) in P} (1/n) sum_i  -sum_k q_{t,ik} log p_{s,ik},
      P = {(t, s): t < T, s < S, s != t}.

  This is the loss of the official DINO code (every teacher global crop against every other
  crop, averaged over the pairs) and of the DINO baseline in the DISSL/CISSL code (SPEC 2.3b,
  two views: the mean of the two cross-view terms). The teacher distribution is a target, so
  it is under ``stop_gradient`` here, as the official ``DINOLoss`` detaches it.

  The centre is one vector ``[K]`` for every teacher view (official DINO) or one per teacher
  view ``[T, K]``: the DISSL/CISSL code updates the centre between its two view pairs, so its
  second pair is centred with an already updated centre (see ``ssljax.methods.dino``). New
  centres come from `dino_center_update`.

  Args:
    student_logits: ``[S, n, K]`` student outputs, S >= 2 views of the same n images.
    teacher_logits: ``[T, n, K]`` teacher outputs of the first T student views, 1 <= T <= S.
    center: ``[K]`` or ``[T, K]`` centre(s) subtracted from the teacher outputs.
    student_temperature: tau_s > 0.
    teacher_temperature: tau_t > 0 (a scalar array when it follows a schedule).
    axis_name: if given, ``teacher_marginal_entropy`` is over the global batch (the loss
      itself needs no collective: it is this device's mean over its rows).

  Returns:
    ``(loss, metrics)``: the float32 scalar loss and metrics ``teacher_entropy`` (mean
    entropy of the teacher distributions), ``kl`` (loss minus teacher entropy: the mean KL
    from the teacher to the student distributions, since each teacher view enters the same
    number of pairs), and ``teacher_marginal_entropy`` (entropy of the batch-averaged teacher
    distribution: near 0 when every image gets the same dominant class, log K when the
    teacher outputs are uniform -- DINO's two collapse modes).
  """
  chex.assert_rank([student_logits, teacher_logits], 3)
  num_student, n, k = student_logits.shape
  num_teacher = teacher_logits.shape[0]
  chex.assert_shape(teacher_logits, (None, n, k))
  if not 1 <= num_teacher <= num_student or num_student < 2:
    raise ValueError(f"dino needs S >= 2 student views and 1 <= T <= S teacher views, got "
                     f"S = {num_student}, T = {num_teacher}")
  chex.assert_rank(center, {1, 2})
  chex.assert_shape(center, (k,) if center.ndim == 1 else (num_teacher, k))
  _check_static_positive("student_temperature", student_temperature)
  _check_static_positive("teacher_temperature", teacher_temperature)

  centers = center if center.ndim == 2 else center[None]
  teacher = (teacher_logits.astype(jnp.float32) - centers[:, None, :].astype(jnp.float32))
  q = jax.lax.stop_gradient(jax.nn.softmax(teacher / teacher_temperature, axis=-1))
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temperature,
                             axis=-1)
  cross = -jnp.einsum("tik,sik->ts", q, log_p) / n  # [T, S]: batch-mean cross-entropies
  is_pair = jnp.arange(num_teacher)[:, None] != jnp.arange(num_student)[None, :]
  loss = jnp.sum(jnp.where(is_pair, cross, 0.0)) / (num_teacher * (num_student - 1))

  teacher_entropy = jnp.mean(_entropy(q))
  marginal = jnp.mean(q, axis=(0, 1))
  if axis_name is not None:
    marginal = jax.lax.pmean(marginal, axis_name)
  metrics = {"teacher_entropy": teacher_entropy, "kl": loss - teacher_entropy,
             "teacher_marginal_entropy": _entropy(marginal)}
  return loss, metrics


def dino_center_update(center: jnp.ndarray, teacher_logits: jnp.ndarray, *, momentum: float,
                       axis_name: str | None = None) -> jnp.ndarray:
  """DINO's centre update: ``c <- m c + (1 - m) mean(teacher outputs over the global batch)``.

  The mean runs over every row of `teacher_logits` (all leading axes: views and images) and,
  with `axis_name`, over every device (``pmean``; equal row counts per device make it the
  mean of the concatenated batch, as the official code's ``all_reduce`` sum divided by the
  world batch). Call it once with all teacher views for DINO's update, or once per view for
  the DISSL/CISSL code's sequential updates.

  Args:
    center: ``[K]`` current centre.
    teacher_logits: ``[..., n, K]`` teacher outputs (this device's rows).
    momentum: m in [0, 1].
    axis_name: the data axis for the global-batch mean, or None.

  Returns:
    The new ``[K]`` float32 centre (identical on every device).
  """
  chex.assert_rank(center, 1)
  chex.assert_axis_dimension(teacher_logits, -1, center.shape[0])
  if not 0.0 <= momentum <= 1.0:
    raise ValueError(f"center momentum must be in [0, 1], got {momentum}")
  logits = teacher_logits.astype(jnp.float32)
  batch_mean = jnp.mean(logits.reshape(-1, logits.shape[-1]), axis=0)
  if axis_name is not None:
    batch_mean = jax.lax.pmean(batch_mean, axis_name)
  return momentum * center.astype(jnp.float32) + (1.0 - momentum) * batch_mean
