"""Distillation losses: a student matches a target network's output on another view.

* `byol_regression`: BYOL's normalised regression of a prediction onto a target projection
  (Grill et al. 2020, Sec. 3.1, Eq. 2; deepmind-research ``byol/utils/helpers.py``
  ``regression_loss``).
* `dino`: DINO's cross-entropy between a centred, sharpened teacher distribution and the
  student distribution over every (teacher view, other student view) pair (Caron et al. 2021,
  Sec. 3.1; facebookresearch/dino ``main_dino.py`` ``DINOLoss``, and the DINO baseline of the
  DISSL/CISSL code, YannDubs/Invariant-Self-Supervised-Learning ``issl/losses/dino.py``), with
  `dino_center_update` for the running centre the method keeps in its state.

Distributed convention (as in ``ssljax.losses.contrastive``): the functions run per device on
that device's rows. Both losses are means of per-row terms, so each device returns the mean
over its own rows, and the mean over devices of the values (and of the per-device gradients)
is the value (gradient) of the concatenated global batch; nothing is gathered. The only
cross-device reductions are ``pmean``s over `axis_name` for DINO's centre (the running mean of
the teacher outputs over the global batch) and for the diagnostic marginal entropy.

Scope of the convention: ``pmap`` or ``shard_map(check_vma=False)``, as stated in
``ssljax.losses.contrastive``.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp

from ssljax.losses.contrastive import l2_normalize


def byol_regression(p: jnp.ndarray, target: jnp.ndarray
                    ) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """BYOL's regression loss between predictions and targets (Grill et al. 2020, Sec. 3.1).

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


def byol_terms(predictions, targets) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """BYOL's loss over every view, before the batch mean: per-(view, image) terms ``[V, n]``.

  With V online predictions p_v and T <= V target projections t_g of the first T views (the
  global crops):

      terms[v, i] = sum_{g < T, g != v} (2 - 2 cos(p_{v,i}, t_{g,i})),

  so ``sum_v mean_i terms[v, i]`` is the sum of `byol_regression` over every (target view g,
  other view v) pair: ``L(p_1, t_2) + L(p_2, t_1)`` for two views, and solo-learn's multi-crop
  BYOL (``byol.py``: every large crop's target against every other crop, summed) for more.
  Targets are used as given (the caller stops their gradient).

  Args:
    predictions: V arrays ``[n, d]`` (online network, one per view).
    targets: T arrays ``[n, d]``, 1 <= T <= V, the targets of views 0..T-1.

  Returns:
    ``(terms, metrics)``: float32 ``[V, n]`` and ``metrics['cosine']``, the mean cosine over
    the pairs.
  """
  predictions, targets = list(predictions), list(targets)
  if not 1 <= len(targets) <= len(predictions) or len(predictions) < 2:
    raise ValueError(f"byol_terms needs V >= 2 predictions and 1 <= T <= V targets, got "
                     f"V = {len(predictions)}, T = {len(targets)}")
  chex.assert_rank(predictions + targets, 2)
  chex.assert_equal_shape(predictions + targets)
  p = [l2_normalize(x.astype(jnp.float32)) for x in predictions]
  t = [l2_normalize(x.astype(jnp.float32)) for x in targets]
  zero = jnp.zeros(p[0].shape[0], jnp.float32)
  terms, cosines = [], []
  for v, p_v in enumerate(p):
    term = zero
    for g, t_g in enumerate(t):
      if g != v:
        cosine = jnp.sum(p_v * t_g, axis=-1)
        cosines.append(cosine)
        term = term + (2.0 - 2.0 * cosine)
    terms.append(term)
  return jnp.stack(terms), {"cosine": jnp.mean(jnp.stack(cosines))}


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
  crop, averaged over the pairs) and of the DINO baseline in the DISSL/CISSL code
  (``issl/losses/dino.py``, two views: the mean of the two cross-view terms). The teacher
  distribution is a target, so it is under ``stop_gradient`` here, as the official
  ``DINOLoss`` detaches it.

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
  num_student, n, _ = _check_dino_inputs(student_logits, teacher_logits, center,
                                         student_temperature, teacher_temperature)
  num_teacher = teacher_logits.shape[0]

  q, log_p, is_pair = _dino_distributions(student_logits, teacher_logits, center,
                                          student_temperature, teacher_temperature)
  cross = -jnp.einsum("tik,sik->ts", q, log_p) / n  # [T, S]: batch-mean cross-entropies
  loss = jnp.sum(jnp.where(is_pair, cross, 0.0)) / (num_teacher * (num_student - 1))

  teacher_entropy = jnp.mean(_entropy(q))
  marginal = jnp.mean(q, axis=(0, 1))
  if axis_name is not None:
    marginal = jax.lax.pmean(marginal, axis_name)
  metrics = {"teacher_entropy": teacher_entropy, "kl": loss - teacher_entropy,
             "teacher_marginal_entropy": _entropy(marginal)}
  return loss, metrics


def dino_terms(
    student_logits: jnp.ndarray,
    teacher_logits: jnp.ndarray,
    *,
    center: jnp.ndarray,
    student_temperature: float,
    teacher_temperature: float | jnp.ndarray,
) -> jnp.ndarray:
  """`dino` before its reduction: per-(student view, image) terms, float32 ``[S, n]``.

      terms[s, i] = (1/|P|) sum_{t < T, t != s} -sum_k q_{t,ik} log p_{s,ik},

  so ``sum_s mean_i terms[s, i]`` is the loss of `dino` (same arguments; the student view is
  the predicted side).
  """
  _check_dino_inputs(student_logits, teacher_logits, center, student_temperature,
                     teacher_temperature)
  num_student, num_teacher = student_logits.shape[0], teacher_logits.shape[0]
  q, log_p, is_pair = _dino_distributions(student_logits, teacher_logits, center,
                                          student_temperature, teacher_temperature)
  cross = -jnp.einsum("tik,sik->tsi", q, log_p)  # [T, S, n]
  per_pair = jnp.where(is_pair[:, :, None], cross, 0.0)
  return jnp.sum(per_pair, axis=0) / (num_teacher * (num_student - 1))


def _check_dino_inputs(student_logits, teacher_logits, center, student_temperature,
                       teacher_temperature) -> tuple[int, int, int]:
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
  return num_student, n, k


def _dino_distributions(student_logits, teacher_logits, center, student_temperature,
                        teacher_temperature):
  """(q [T, n, K] under stop-gradient, log p [S, n, K], is_pair [T, S]) of `dino`."""
  num_student, num_teacher = student_logits.shape[0], teacher_logits.shape[0]
  centers = center if center.ndim == 2 else center[None]
  teacher = (teacher_logits.astype(jnp.float32) - centers[:, None, :].astype(jnp.float32))
  q = jax.lax.stop_gradient(jax.nn.softmax(teacher / teacher_temperature, axis=-1))
  log_p = jax.nn.log_softmax(student_logits.astype(jnp.float32) / student_temperature,
                             axis=-1)
  is_pair = jnp.arange(num_teacher)[:, None] != jnp.arange(num_student)[None, :]
  return q, log_p, is_pair


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
