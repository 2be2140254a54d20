"""Clustering losses: SwAV's Sinkhorn-Knopp codes and swapped prediction.

SwAV: Caron et al. 2020, Sec. 3.1 (swapped prediction, Eq. 1-2; online codes by
Sinkhorn-Knopp, Eq. 3), as in facebookresearch/swav ``main_swav.py`` (``train`` and
``distributed_sinkhorn``) and its fork in ssl-codelab/uota ``main_uota.py``.

``sinkhorn`` turns prototype scores into soft cluster assignments ("codes") that spread the
samples equally over the prototypes; ``swav`` trains every crop to predict the codes of the
other crops. The codes carry no gradient (the official code computes them under
``torch.no_grad()``), so all the cross-device coupling of SwAV sits in ``sinkhorn``: with
``axis_name`` it normalises over the global batch, and each device gets the rows of the codes
the single-device computation would give its samples. ``swav`` is then a plain per-sample mean,
and the distributed convention of ``ssljax.losses.contrastive`` holds without any collective in
it: the mean over devices of the per-device losses (and of their gradients) is the loss
(gradient) of the global batch.

UOTA (Wang et al. 2021; ssl-codelab/uota ``main_uota.py`` ``train``) reweights SwAV per (image,
predicted crop). ``swav_terms`` returns those per-sample, per-crop terms and ``swav`` takes the
weights as ``view_weights``; the SwAV method exposes the terms to add-ons through its objective
(``ssljax.methods.addons.weight_terms``).

Scope of the convention: ``pmap`` or ``shard_map(check_vma=False)``, as stated in
``ssljax.losses.contrastive``.
"""

from __future__ import annotations

from typing import Sequence

import chex
import jax
import jax.numpy as jnp

from ssljax.losses.contrastive import gather_rows


def _axis_size(axis_name: str | None) -> int:
  return 1 if axis_name is None else jax.lax.axis_size(axis_name)


def _replace_infs(x: jnp.ndarray) -> jnp.ndarray:
  """Replaces +-inf entries by the largest finite entry (the official ``shoot_infs``)."""
  is_inf = jnp.isinf(x)
  largest = jnp.max(jnp.where(is_inf, 0.0, x))
  return jnp.where(is_inf, largest, x)


def sinkhorn(
    scores: jnp.ndarray,
    *,
    epsilon: float = 0.05,
    num_iters: int = 3,
    axis_name: str | None = None,
) -> jnp.ndarray:
  """SwAV's Sinkhorn-Knopp codes for a batch of prototype scores (``distributed_sinkhorn``).

  With ``B`` the global number of rows (every device's rows along `axis_name`) and ``K``
  prototypes, in float32 and under ``stop_gradient``:

      Q = exp((s - max s) / eps)^T                       [K, B], max over all devices
      Q <- Q / sum(Q)                                     global sum
      repeat num_iters times:
        Q <- diag(1 / (K u)) Q,   u = row sums of Q       each prototype gets mass 1/K
        Q <- Q diag(1 / (B c)),   c = column sums of Q    each sample gets mass 1/B
      codes = (Q diag(1 / c))^T                           each row sums to 1

  Row sums are all-reduced over `axis_name`; column sums are per sample, so local. Subtracting
  the global maximum changes nothing after the first normalisation (the official
  ``improve_numerical_stability`` option, always on here) and keeps ``exp`` finite. An
  infinite row factor (a prototype whose every ``exp`` underflowed to 0) is replaced by the
  largest finite factor, as the official ``shoot_infs`` does. With unit-norm embeddings and
  prototypes the scores lie in [-1, 1], so no column can underflow entirely while
  ``eps > 2 / 87 ~ 0.023``; below that a sample far from every prototype can get NaN codes,
  as in the official code.

  ``num_iters = 0`` gives the per-sample softmax of ``s / eps``. After many iterations the
  prototypes' total mass over the samples approaches ``B / K`` each (the transport
  polytope's column marginal); the official code stops after 3.

  Args:
    scores: ``[n, K]`` prototype scores of this device's rows (queue rows included, if any).
    epsilon: entropy regularisation, > 0.
    num_iters: Sinkhorn iterations, >= 0.
    axis_name: if given, normalise over the rows of every device on this axis.

  Returns:
    float32 ``[n, K]`` codes of this device's rows, each row summing to 1, no gradient.
  """
  chex.assert_rank(scores, 2)
  if epsilon <= 0:
    raise ValueError(f"epsilon must be > 0, got {epsilon}")
  if num_iters < 0:
    raise ValueError(f"num_iters must be >= 0, got {num_iters}")
  logits = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  num_prototypes = logits.shape[1]
  num_samples = logits.shape[0] * _axis_size(axis_name)

  def psum(x):
    return x if axis_name is None else jax.lax.psum(x, axis_name)

  top = jnp.max(logits)
  if axis_name is not None:
    top = jax.lax.pmax(top, axis_name)
  q = jnp.exp(logits - top).T  # [K, n]
  q = q / psum(jnp.sum(q))
  for _ in range(num_iters):
    rows = psum(jnp.sum(q, axis=1, keepdims=True))
    q = q * _replace_infs(1.0 / (num_prototypes * rows))
    q = q / (num_samples * jnp.sum(q, axis=0, keepdims=True))
  codes = (q / jnp.sum(q, axis=0, keepdims=True)).T
  return jax.lax.stop_gradient(codes)


def _check_swav_inputs(scores_per_view: Sequence[jnp.ndarray],
                       codes_per_assign_view: Sequence[jnp.ndarray], temperature: float,
                       crops_for_assign: Sequence[int]) -> None:
  num_views = len(scores_per_view)
  if num_views < 2:
    raise ValueError(f"swav needs at least 2 views, got {num_views}")
  if temperature <= 0:
    raise ValueError(f"temperature must be > 0, got {temperature}")
  crops = tuple(crops_for_assign)
  if not crops or len(set(crops)) != len(crops) or not all(0 <= c < num_views for c in crops):
    raise ValueError(f"crops_for_assign must be distinct view indices in [0, {num_views}), "
                     f"got {crops}")
  if len(codes_per_assign_view) != len(crops):
    raise ValueError(f"expected one codes array per assignment crop {crops}, got "
                     f"{len(codes_per_assign_view)}")
  chex.assert_rank(list(scores_per_view), 2)
  chex.assert_equal_shape([*scores_per_view, *codes_per_assign_view])


def swav_terms(
    scores_per_view: Sequence[jnp.ndarray],
    codes_per_assign_view: Sequence[jnp.ndarray],
    *,
    temperature: float,
    crops_for_assign: Sequence[int] = (0, 1),
) -> jnp.ndarray:
  """SwAV's loss split into one term per (predicted view j, sample i).

  With V views, the assignment crops S = `crops_for_assign` (A = |S|), codes ``q_c`` and
  ``p_j = softmax(s_j / T)``:

      t[j, i] = 1 / (A (V - 1)) * sum_{c in S, c != j} CE(q_{c,i}, p_{j,i}),
      CE(q, p) = -sum_k q_k log p_k,

  so that the SwAV loss of ``main_swav.py``, ``mean_{c in S} mean_{j != c} mean_i CE(q_c,
  p_j)``, equals ``sum_j mean_i t[j, i]``. A per-(image, view) weight ``w[j, i]`` on the
  predicted side, as UOTA applies it (``main_uota.py`` multiplies the predicted crop's term;
  the codes are not weighted), gives
  ``sum_j mean_i w[j, i] t[j, i]``. The codes are treated as constants (stop-gradient).

  Args:
    scores_per_view: V arrays ``[n, K]``, the prototype scores of every crop, in crop order.
    codes_per_assign_view: A arrays ``[n, K]``, the codes of the crops in `crops_for_assign`
      (rows summing to 1, e.g. from `sinkhorn`).
    temperature: T > 0 of the predicted softmax.
    crops_for_assign: indices of the views whose codes are predicted (SwAV: (0, 1)).

  Returns:
    float32 ``[V, n]`` terms.
  """
  _check_swav_inputs(scores_per_view, codes_per_assign_view, temperature, crops_for_assign)
  crops = tuple(crops_for_assign)
  num_views = len(scores_per_view)
  scale = 1.0 / (len(crops) * (num_views - 1))
  codes = [jax.lax.stop_gradient(q).astype(jnp.float32) for q in codes_per_assign_view]
  terms = []
  for j, scores in enumerate(scores_per_view):
    log_p = jax.nn.log_softmax(scores.astype(jnp.float32) / temperature, axis=-1)
    term = jnp.zeros(log_p.shape[0], jnp.float32)
    for c, q in zip(crops, codes):
      if c != j:
        term = term - jnp.sum(q * log_p, axis=-1)
    terms.append(scale * term)
  return jnp.stack(terms)


def swav(
    scores_per_view: Sequence[jnp.ndarray],
    codes_per_assign_view: Sequence[jnp.ndarray],
    *,
    temperature: float,
    crops_for_assign: Sequence[int] = (0, 1),
    view_weights: jnp.ndarray | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """SwAV's swapped-prediction loss (Sec. 3.1), optionally weighted per (view, sample).

      L = (1/A) sum_{c in S} (1/(V-1)) sum_{j != c} mean_i CE(q_{c,i}, softmax(s_{j,i} / T))
        = sum_j mean_i w[j, i] t[j, i]        (w = 1 unless `view_weights` is given)

  with ``t`` from `swav_terms`. The loss is a mean over this device's samples and has no
  cross-device term (the codes, computed by `sinkhorn` with ``axis_name``, carry the global
  coupling and no gradient), so averaging the per-device values and gradients over devices
  gives the global-batch loss and gradient.

  Args:
    scores_per_view: V arrays ``[n, K]``: prototype scores ``C z`` of each crop (unit-norm
      ``z`` and prototype rows), in crop order; multi-crop puts the global crops first.
    codes_per_assign_view: A arrays ``[n, K]``: the codes of the crops in `crops_for_assign`.
    temperature: T > 0 (SwAV: 0.1).
    crops_for_assign: the assignment crops S (SwAV: the two global crops, (0, 1)).
    view_weights: optional ``[V, n]`` weights of the predicted views (UOTA's ``w``, mean 1
      over the global batch); treated as constants (stop-gradient).

  Returns:
    ``(loss, metrics)``: the float32 scalar loss and ``metrics`` with ``code_entropy`` (mean
    entropy of the codes, nats) and ``agreement`` (share of (c, j != c, i) whose predicted
    argmax prototype is the argmax of the code).
  """
  terms = swav_terms(scores_per_view, codes_per_assign_view, temperature=temperature,
                     crops_for_assign=crops_for_assign)
  if view_weights is not None:
    chex.assert_shape(view_weights, terms.shape)
    terms = jax.lax.stop_gradient(view_weights).astype(jnp.float32) * terms
  loss = jnp.sum(jnp.mean(terms, axis=1))

  codes = [jax.lax.stop_gradient(q).astype(jnp.float32) for q in codes_per_assign_view]
  entropy = jnp.mean(jnp.stack(
      [-jnp.sum(q * jnp.log(jnp.maximum(q, 1e-30)), axis=-1) for q in codes]))
  matches = [
      jnp.argmax(scores, axis=-1) == jnp.argmax(q, axis=-1)
      for c, q in zip(crops_for_assign, codes)
      for j, scores in enumerate(scores_per_view) if j != c
  ]
  agreement = jnp.mean(jnp.stack(matches).astype(jnp.float32))
  return loss, {"code_entropy": entropy, "agreement": agreement}


def batch_kmeans(
    x: jnp.ndarray,
    *,
    num_clusters: int,
    num_iters: int = 5,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, jnp.ndarray]:
  """CLD's batch k-means of group features (CLD paper Sec. 3.2; official spectral_clustering.py
  ``KMeans``).

  For rows ``x`` ``[N, D]`` (N = this device's rows, or every device's rows gathered along
  `axis_name` in global batch order when it is given) and K = `num_clusters`:

      c = x[:K]                                        first K rows as initial centroids
      repeat num_iters times:
        l_n = argmin_k ||x_n - c_k||^2                 squared Euclidean assignment
        c_k = sum_{n: l_n = k} x_n / max(|{n: l_n = k}|, 1)   empty cluster: c_k = 0

  The labels and centroids of the last round are returned; centroids are not re-normalised.
  The assignment rounds run on ``stop_gradient(x)``; the last mean is recomputed from `x` so
  the gradient reaches `x` through the centroids (the official code keeps autograd on the
  means), never through the discrete labels. ``num_iters = 0`` returns ``x[:K]`` as the
  centroids and the assignment to them.

  Per-device k-means (``axis_name=None``) is the official behaviour: each GPU clusters its own
  rows. With `axis_name` the rows of every device are gathered first (an ssljax option), every
  device computes the same global centroids, and the labels returned are those of this
  device's rows; the gather is differentiable, so the centroids' gradient reaches every
  device's rows.

  Args:
    x: ``[n, D]`` float rows (CLD: L2-normalised group features of one view).
    num_clusters: K, at most the number of rows clustered.
    num_iters: Lloyd rounds (CLD's scripts: 5).
    axis_name: gather the rows over this axis before clustering.

  Returns:
    ``(labels, centroids)``: int32 ``[n]`` (this device's rows) and float32 ``[K, D]``.

  Raises:
    ValueError: K < 1, K larger than the rows clustered (the official ImageNet script silently
      degenerates there: every row becomes its own cluster next to zero centroids), or
      ``num_iters < 0``.
  """
  chex.assert_rank(x, 2)
  if num_iters < 0:
    raise ValueError(f"batch_kmeans: num_iters must be >= 0, got {num_iters}")
  x_all, offset = gather_rows(x.astype(jnp.float32), axis_name)
  rows = x_all.shape[0]
  if not 1 <= num_clusters <= rows:
    where = ("the global batch gathered over devices" if axis_name is not None
             else "this device's batch")
    raise ValueError(
        f"batch_kmeans: num_clusters = {num_clusters} must be between 1 and the number of rows "
        f"clustered, {rows} ({where}); lower the number of clusters (method.cld.num_clusters) "
        f"or raise the per-device batch (train.batch_size / devices), or cluster the gathered "
        f"batch (method.cld.global_kmeans = True)")

  def centroids_of(points, labels):
    onehot = jax.nn.one_hot(labels, num_clusters, dtype=jnp.float32)  # [N, K]
    counts = jnp.maximum(jnp.sum(onehot, axis=0), 1.0)
    return (onehot.T @ points) / counts[:, None]

  def assign(points, centroids):  # the official (x_i - c_j)^2 summed: exact ties included
    distances = jnp.sum((points[:, None, :] - centroids[None, :, :])**2, axis=-1)
    return jnp.argmin(distances, axis=1).astype(jnp.int32)

  fixed = jax.lax.stop_gradient(x_all)
  labels = assign(fixed, fixed[:num_clusters])
  if num_iters > 0:
    labels = jax.lax.fori_loop(
        1, num_iters, lambda _, l: assign(fixed, centroids_of(fixed, l)), labels)
    centroids = centroids_of(x_all, labels)
  else:
    centroids = x_all[:num_clusters]
  local = jax.lax.dynamic_slice_in_dim(labels, offset, x.shape[0])
  return local, centroids


def cld_terms(
    g_a: jnp.ndarray,
    g_b: jnp.ndarray,
    *,
    num_clusters: int,
    temperature: float,
    num_iters: int = 5,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """Per-row cross-level terms of `cld`: ``[2, n]`` (row 0: view a's rows, row 1: view b's).

  ``terms[0, i] = CE(g^a_i M^bT / T, l^b_i) / 2`` and ``terms[1, i] = CE(g^b_i M^aT / T,
  l^a_i) / 2``, so ``cld = sum_v mean_i terms[v, i]``.
  """
  chex.assert_rank([g_a, g_b], 2)
  chex.assert_equal_shape([g_a, g_b])
  if temperature <= 0:
    raise ValueError(f"cld: temperature must be > 0, got {temperature}")
  rows = g_a.shape[0] * (1 if axis_name is None else jax.lax.psum(1, axis_name))
  if not 1 <= num_clusters < rows:  # (batch_kmeans itself allows K = rows)
    where = ("the global batch gathered over devices" if axis_name is not None
             else "this device's batch")
    raise ValueError(
        f"cld: num_clusters = {num_clusters} must be at least 1 and below the {rows} rows "
        f"clustered ({where}): with as many clusters as rows every row is its own group and "
        f"the loss is cross-view instance discrimination; use fewer clusters "
        f"(method.cld.num_clusters), a larger per-device batch, or cluster the gathered batch "
        f"(method.cld.global_kmeans = True)")
  g_a, g_b = g_a.astype(jnp.float32), g_b.astype(jnp.float32)
  kmeans = lambda g: batch_kmeans(g, num_clusters=num_clusters, num_iters=num_iters,
                                  axis_name=axis_name)
  labels_a, centroids_a = kmeans(g_a)
  labels_b, centroids_b = kmeans(g_b)

  def cross_entropy(g, centroids, labels):
    logits = g @ centroids.T / temperature
    log_p = jax.nn.log_softmax(logits, axis=1)
    ce = -jnp.take_along_axis(log_p, labels[:, None], axis=1)[:, 0]
    correct = (jnp.argmax(logits, axis=1) == labels).astype(jnp.float32)
    return ce, correct

  ce_a, correct_a = cross_entropy(g_a, centroids_b, labels_b)
  ce_b, _ = cross_entropy(g_b, centroids_a, labels_a)
  clusters = lambda labels: jnp.sum(jnp.bincount(labels, length=num_clusters) > 0)
  metrics = {"group_acc": jnp.mean(correct_a),
             "nonempty_clusters": clusters(labels_a).astype(jnp.float32)}
  return jnp.stack([ce_a, ce_b]) / 2.0, metrics


def cld(
    g_a: jnp.ndarray,
    g_b: jnp.ndarray,
    *,
    num_clusters: int,
    temperature: float,
    num_iters: int = 5,
    axis_name: str | None = None,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
  """CLD's cross-level instance-group discrimination loss (CLD paper Sec. 3.2, Eq. 5-6;
  official train_cifar_npid_cld.py / train_cifar_moco_cld.py, the CLD_loss lines).

  For the group features of two views of the same images, ``G^a, G^b`` ``[n, D]`` (rows
  L2-normalised by the caller), with ``(l^a, M^a) = batch_kmeans(G^a)`` and ``(l^b, M^b) =
  batch_kmeans(G^b)`` (K clusters, `num_iters` rounds):

      L = 1/2 [ mean_i CE(softmax_k(G^a_i . M^b_k / T), l^b_i)
              + mean_i CE(softmax_k(G^b_i . M^a_k / T), l^a_i) ]

  Each instance of one view must pick, among the other view's K centroids, the group its other
  view was put in. No stop-gradient on either side: the gradient reaches ``G^a`` through the
  logits and ``G^b`` through its centroids (and vice versa); the labels carry none. Empty
  clusters keep a zero centroid, i.e. a logit of 0 in every softmax, as in the official code.

  Distributed: ``axis_name=None`` clusters each device's rows on their own (the official
  behaviour; the per-device loss is the loss of its rows). With `axis_name` the k-means runs
  on the gathered global batch (`batch_kmeans`); each device returns the mean over its rows,
  so the mean over devices is the global loss and the mean of the per-device gradients is its
  gradient (the convention of ``ssljax.losses``).

  Args:
    g_a, g_b: ``[n, D]`` group features of views a and b (row i: the same image).
    num_clusters: K (< rows clustered).
    temperature: T_c (CLD's ``cld_t``; 0.2 in the CIFAR scripts).
    num_iters: k-means rounds (5).
    axis_name: cluster the gathered batch over this axis (None: per device).

  Returns:
    ``(loss, metrics)``: float32 scalar; ``group_acc`` (the official "CLD acc": fraction of
    rows of view a whose most similar centroid of view b is their label) and
    ``nonempty_clusters`` (of view a).
  """
  terms, metrics = cld_terms(g_a, g_b, num_clusters=num_clusters, temperature=temperature,
                             num_iters=num_iters, axis_name=axis_name)
  return jnp.sum(jnp.mean(terms, axis=1)), metrics
