"""Weighted k-nearest-neighbour classifier on frozen features (NPID, Wu et al. 2018, Sec. 3.4).

The InstDisc / MoCo-monitor protocol, as in CLD's ``test.py`` and MetaMask's ``knn_predict``.
With L2-normalised bank features F [N, D], bank labels y [N] and a query q [D]:

  s = F q                                   cosine similarities, [N]
  I = top-k indices of s
  w_i = exp(s_i / t)                        for i in I
  score_c = sum_{i in I, y_i = c} w_i       [num_classes]

prediction = argmax_c score_c; top-5 = the five highest scores. ssljax's choice: always
report k = 200, t = 0.1 (CLD's and the MoCo demo's values) on the L2-normalised backbone
feature, so every method is measured alike; MetaMask's own protocol (its ``utils.py``) is
k = 5, t = 1.0.

The bank is moved to the device once; queries are processed in chunks of ``chunk_size`` rows by
one compiled function (the last chunk zero-padded), so only a [chunk_size, N] similarity block
exists at a time. Similarities use full float32 matmul precision, so neighbour ranks do not
depend on the accelerator's default reduced-precision matmul.
"""

from __future__ import annotations

import functools
import logging

import chex
import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger(__name__)

_EPS = 1e-12


def _l2_normalize(x: jax.Array) -> jax.Array:
  """x / max(||x||_2, eps) row-wise; zero rows stay zero."""
  norm = jnp.linalg.norm(x, axis=-1, keepdims=True)
  return x / jnp.maximum(norm, _EPS)


@functools.partial(jax.jit, static_argnames=("k", "num_classes", "normalize"))
def _chunk_scores(bank: jax.Array, bank_labels: jax.Array, queries: jax.Array,
                  temperature: jax.Array, *, k: int, num_classes: int,
                  normalize: bool) -> jax.Array:
  """Class scores [chunk, num_classes] of a chunk of queries against the whole bank."""
  if normalize:
    queries = _l2_normalize(queries)
  sims = jnp.dot(queries, bank.T, precision=jax.lax.Precision.HIGHEST)  # [chunk, N]
  top_sims, top_idx = jax.lax.top_k(sims, k)  # [chunk, k]
  weights = jnp.exp(top_sims / temperature)
  neighbour_labels = bank_labels[top_idx]

  def scatter(labels: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.zeros((num_classes,), jnp.float32).at[labels].add(w)

  return jax.vmap(scatter)(neighbour_labels, weights)


def _check_bank(train_features: np.ndarray, train_labels: np.ndarray,
                test_features: np.ndarray, num_classes: int) -> None:
  chex.assert_rank([train_features, train_labels, test_features], [2, 1, 2])
  chex.assert_equal_shape_prefix([train_features, train_labels], 1)
  chex.assert_equal_shape_suffix([train_features, test_features], 1)
  if train_features.shape[0] == 0:
    raise ValueError("the kNN bank is empty")
  if not np.issubdtype(np.asarray(train_labels).dtype, np.integer):
    raise ValueError(f"train_labels must be integers, got dtype {train_labels.dtype}")
  labels = np.asarray(train_labels)
  if (labels < 0).any():
    raise ValueError(f"{int((labels < 0).sum())} bank labels are negative (-1 marks unlabelled "
                     "examples); the kNN bank must contain labelled examples only")
  if (labels >= num_classes).any():
    raise ValueError(f"bank labels reach {int(labels.max())}, outside [0, {num_classes})")


def knn_predict(train_features: np.ndarray, train_labels: np.ndarray,
                test_features: np.ndarray, *, num_classes: int, k: int = 200,
                temperature: float = 0.1, chunk_size: int = 1024,
                normalize: bool = True) -> np.ndarray:
  """Weighted kNN class scores ``score_c = sum_{i in top-k(q), y_i = c} exp(s_i / t)``.

  Args:
    train_features: bank features [N, D].
    train_labels: bank labels [N], integers in [0, num_classes).
    test_features: query features [M, D].
    num_classes: number of classes C.
    k: neighbours per query; clamped to N (with a warning) when larger.
    temperature: t in exp(s / t).
    chunk_size: queries per compiled call; bounds the similarity block to [chunk_size, N].
    normalize: L2-normalise bank and queries first (the protocol); off, s is the raw dot
      product and the caller is responsible for exp(s / t) staying finite.

  Returns:
    float32 scores [M, C] on the host.
  """
  _check_bank(train_features, train_labels, test_features, num_classes)
  if k < 1 or chunk_size < 1 or temperature <= 0:
    raise ValueError(f"need k >= 1, chunk_size >= 1 and temperature > 0; got k={k}, "
                     f"chunk_size={chunk_size}, temperature={temperature}")
  num_train = train_features.shape[0]
  if k > num_train:
    log.warning("kNN: k=%d exceeds the bank size %d; using k=%d", k, num_train, num_train)
    k = num_train

  bank = jnp.asarray(train_features, jnp.float32)
  if normalize:
    bank = _l2_normalize(bank)
  bank_labels = jnp.asarray(train_labels, jnp.int32)
  temperature = jnp.float32(temperature)
  queries = np.asarray(test_features, np.float32)
  num_test = queries.shape[0]

  chunks = []
  for start in range(0, num_test, chunk_size):
    chunk = queries[start:start + chunk_size]
    if chunk.shape[0] < chunk_size:
      chunk = np.pad(chunk, ((0, chunk_size - chunk.shape[0]), (0, 0)))
    chunks.append(_chunk_scores(bank, bank_labels, jax.device_put(chunk), temperature, k=k,
                                num_classes=num_classes, normalize=normalize))
  if not chunks:
    return np.zeros((0, num_classes), np.float32)
  return np.concatenate([np.asarray(c) for c in chunks])[:num_test]


def knn_accuracy(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                 k: int = 200, temperature: float = 0.1, chunk_size: int = 1024,
                 normalize: bool = True) -> dict[str, float]:
  """Top-1 and top-5 accuracy of the weighted kNN classifier (see `knn_predict`).

  A query counts as top-n correct when its label is among the n highest scores; ties between
  equal scores are broken towards the lower class index (a stable descending sort), so the
  result is deterministic. With fewer than five classes every label is in the top five, so
  top-5 is 1.

  Args:
    test_labels: query labels [M], integers in [0, num_classes).
    The other arguments are those of `knn_predict`.

  Returns:
    ``{'top1': float, 'top5': float}``, fractions in [0, 1].
  """
  chex.assert_rank(test_labels, 1)
  chex.assert_equal_shape_prefix([test_features, test_labels], 1)
  labels = np.asarray(test_labels)
  if labels.size == 0:
    raise ValueError("knn_accuracy got no test examples")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"test labels must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  scores = knn_predict(train_features, train_labels, test_features, num_classes=num_classes,
                       k=k, temperature=temperature, chunk_size=chunk_size,
                       normalize=normalize)
  ranking = np.argsort(-scores, axis=1, kind="stable")[:, :min(5, num_classes)]
  hits = ranking == labels[:, None]
  return {"top1": float(hits[:, 0].mean()), "top5": float(hits.any(axis=1).mean())}
