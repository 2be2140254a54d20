"""Tests for ssljax.eval.knn against a naive NumPy kNN and a hand-computed case."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from ssljax.eval.knn import knn_accuracy, knn_predict


def _naive_scores(train, labels, test, num_classes, k, t, normalize=True):
  train, test = train.astype(np.float64), test.astype(np.float64)
  if normalize:
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
  scores = np.zeros((test.shape[0], num_classes))
  for row, query in enumerate(test):
    sims = train @ query
    for i in np.argsort(-sims)[:k]:
      scores[row, labels[i]] += np.exp(sims[i] / t)
  return scores


def _random_problem(seed, num_train=150, num_test=45, dim=12, num_classes=6):
  rng = np.random.default_rng(seed)
  train = rng.normal(size=(num_train, dim)).astype(np.float32)
  test = rng.normal(size=(num_test, dim)).astype(np.float32)
  labels = rng.integers(0, num_classes, num_train)
  test_labels = rng.integers(0, num_classes, num_test)
  return train, labels, test, test_labels, num_classes


@pytest.mark.parametrize("k,t,chunk_size", [(1, 0.1, 45), (7, 0.07, 16), (50, 1.0, 100),
                                            (200, 0.1, 7)])
def test_matches_naive_numpy(k, t, chunk_size):
  train, labels, test, _, num_classes = _random_problem(seed=k)
  scores = knn_predict(train, labels, test, num_classes=num_classes, k=min(k, len(train)),
                       temperature=t, chunk_size=chunk_size)
  expected = _naive_scores(train, labels, test, num_classes, min(k, len(train)), t)
  assert scores.shape == (len(test), num_classes)
  np.testing.assert_allclose(scores, expected, rtol=2e-4)


def test_unnormalized_dot_product():
  train, labels, test, _, num_classes = _random_problem(seed=3, dim=4)
  train, test = 0.3 * train, 0.3 * test
  scores = knn_predict(train, labels, test, num_classes=num_classes, k=9, temperature=1.0,
                       chunk_size=10, normalize=False)
  expected = _naive_scores(train, labels, test, num_classes, 9, 1.0, normalize=False)
  np.testing.assert_allclose(scores, expected, rtol=2e-4)


def test_hand_computed_tiny_case():
  # Unit vectors at 0, 60, 90 and 180 degrees; query at 0 degrees: sims 1, 0.5, 0, -1.
  train = np.array([[1.0, 0.0], [0.5, np.sqrt(3) / 2], [0.0, 2.0], [-3.0, 0.0]], np.float32)
  labels = np.array([0, 1, 1, 0])
  query = np.array([[5.0, 0.0]], np.float32)
  scores = knn_predict(train, labels, query, num_classes=2, k=3, temperature=0.5)
  # Top 3: sims 1 (class 0), 0.5 (class 1), 0 (class 1); weights exp(s / 0.5).
  np.testing.assert_allclose(scores, [[np.exp(2.0), np.exp(1.0) + 1.0]], rtol=1e-6)


def test_chunking_invariance():
  train, labels, test, _, num_classes = _random_problem(seed=11, num_test=50)
  reference = knn_predict(train, labels, test, num_classes=num_classes, k=20, chunk_size=50)
  for chunk_size in (1, 8, 13, 64):
    scores = knn_predict(train, labels, test, num_classes=num_classes, k=20,
                         chunk_size=chunk_size)
    # Matmul kernels differ with the chunk shape, so only float rounding may differ.
    np.testing.assert_allclose(scores, reference, rtol=1e-5)
    np.testing.assert_array_equal(scores.argmax(1), reference.argmax(1))


def test_top1_and_top5():
  train, labels, test, test_labels, num_classes = _random_problem(seed=5, num_test=60,
                                                                  num_classes=8)
  result = knn_accuracy(train, labels, test, test_labels, num_classes=num_classes, k=15,
                        chunk_size=16)
  scores = _naive_scores(train, labels, test, num_classes, 15, 0.1)
  order = np.argsort(-scores, axis=1)
  assert result["top1"] == pytest.approx(np.mean(order[:, 0] == test_labels))
  assert result["top5"] == pytest.approx(np.mean((order[:, :5] == test_labels[:, None]).any(1)))
  assert result["top1"] < result["top5"] < 1.0


def test_separable_clusters_are_classified_perfectly():
  rng = np.random.default_rng(0)
  centers = 10.0 * np.eye(4)
  train_labels, test_labels = rng.integers(0, 4, 80), rng.integers(0, 4, 30)
  train = centers[train_labels] + rng.normal(size=(80, 4))
  test = centers[test_labels] + rng.normal(size=(30, 4))
  result = knn_accuracy(train, train_labels, test, test_labels, num_classes=4, k=10)
  assert result == {"top1": 1.0, "top5": 1.0}


def test_k_larger_than_bank_is_clamped_with_warning(caplog):
  train, labels, test, _, num_classes = _random_problem(seed=2, num_train=30)
  with caplog.at_level(logging.WARNING):
    scores = knn_predict(train, labels, test, num_classes=num_classes, k=200)
  assert "exceeds the bank size" in caplog.text
  np.testing.assert_allclose(scores, _naive_scores(train, labels, test, num_classes, 30, 0.1),
                             rtol=2e-4)


def test_unlabelled_bank_is_rejected():
  train, labels, test, _, num_classes = _random_problem(seed=1)
  labels[3] = -1
  with pytest.raises(ValueError, match="unlabelled"):
    knn_predict(train, labels, test, num_classes=num_classes)


def test_label_out_of_range_is_rejected():
  train, labels, test, _, num_classes = _random_problem(seed=1)
  labels[0] = num_classes
  with pytest.raises(ValueError, match="outside"):
    knn_predict(train, labels, test, num_classes=num_classes)
