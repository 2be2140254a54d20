"""Tests for ssljax.eval.linear_probe: accuracy, selection, held-out isolation, determinism."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssljax.eval import linear_probe as lp

_SMALL = dict(epochs=10, batch_size=64, lrs=(0.01, 1.0), weight_decays=(0.0, 1e-3))


def _blobs(seed, num_train=600, num_test=300, dim=8, num_classes=4, spread=6.0, noise=1.0):
  rng = np.random.default_rng(seed)
  centers = spread * rng.normal(size=(num_classes, dim))
  train_labels = rng.integers(0, num_classes, num_train)
  test_labels = rng.integers(0, num_classes, num_test)
  train = centers[train_labels] + noise * rng.normal(size=(num_train, dim))
  test = centers[test_labels] + noise * rng.normal(size=(num_test, dim))
  return (train.astype(np.float32), train_labels, test.astype(np.float32), test_labels,
          num_classes)


def test_separable_blobs_reach_high_accuracy():
  train, train_labels, test, test_labels, num_classes = _blobs(seed=0)
  result = lp.linear_probe(train, train_labels, test, test_labels, num_classes=num_classes,
                           **_SMALL)
  assert result["test_top1"] > 0.95
  assert result["holdout_top1"] > 0.95


def test_selection_picks_the_best_holdout_setting():
  train, train_labels, test, test_labels, num_classes = _blobs(seed=1, spread=0.6, dim=16)
  result = lp.linear_probe(train, train_labels, test, test_labels, num_classes=num_classes,
                           epochs=5, batch_size=50, lrs=(1e-3, 0.1, 3.0),
                           weight_decays=(0.0, 0.1))
  grid = result["grid"]
  assert [(row["lr"], row["weight_decay"]) for row in grid] == [
      (1e-3, 0.0), (1e-3, 0.1), (0.1, 0.0), (0.1, 0.1), (3.0, 0.0), (3.0, 0.1)]
  accuracies = [row["holdout_top1"] for row in grid]
  assert len(set(accuracies)) > 1, "the grid must discriminate for this test to mean anything"
  best = grid[int(np.argmax(accuracies))]
  assert (result["best_lr"], result["best_weight_decay"]) == (best["lr"], best["weight_decay"])
  assert result["holdout_top1"] == max(accuracies)


def test_holdout_split_is_a_seeded_partition():
  fit, holdout = lp.holdout_split(1000, 0.1, seed=3)
  assert holdout.size == 100 and fit.size == 900
  np.testing.assert_array_equal(np.sort(np.concatenate([fit, holdout])), np.arange(1000))
  fit_again, holdout_again = lp.holdout_split(1000, 0.1, seed=3)
  np.testing.assert_array_equal(holdout, holdout_again)
  np.testing.assert_array_equal(fit, fit_again)
  assert not np.array_equal(holdout, lp.holdout_split(1000, 0.1, seed=4)[1])


def test_holdout_rows_are_never_fitted():
  # Fitted rows: label = sign of feature 0, feature 1 is zero. Held-out rows: label = sign of
  # feature 1 and feature 0 is noise. Fitting on the held-out rows would learn feature 1 and
  # reach ~100% held-out accuracy; without them its weight never moves, leaving chance level.
  rng = np.random.default_rng(0)
  num_train, seed = 1000, 7
  _, holdout = lp.holdout_split(num_train, 0.2, seed)
  features = np.zeros((num_train, 2), np.float32)
  labels = rng.integers(0, 2, num_train)
  features[:, 0] = (2 * labels - 1) * (1.0 + rng.random(num_train))
  features[holdout, 0] = rng.normal(size=holdout.size)
  features[holdout, 1] = (2 * labels[holdout] - 1) * (1.0 + rng.random(holdout.size))
  result = lp.linear_probe(features, labels, features[:50], labels[:50], num_classes=2,
                           holdout_fraction=0.2, seed=seed, **_SMALL)
  accuracies = [row["holdout_top1"] for row in result["grid"]]
  assert max(accuracies) < 0.7, accuracies
  # The final fit does see those rows (the whole train split), so it learns feature 1.
  assert result["test_top1"] > 0.9


def test_deterministic_given_seed():
  train, train_labels, test, test_labels, num_classes = _blobs(seed=2, spread=1.0)
  first = lp.linear_probe(train, train_labels, test, test_labels, num_classes=num_classes,
                          seed=5, **_SMALL)
  second = lp.linear_probe(train, train_labels, test, test_labels, num_classes=num_classes,
                           seed=5, **_SMALL)
  assert first == second


def test_grid_training_matches_independent_optax_loops():
  # Every grid point of the vmapped, scanned program equals a plain per-setting optax loop
  # over the same batch orders (a partial last batch included: 50 = 3 * 16 + 2).
  rng = np.random.default_rng(0)
  x = rng.normal(size=(50, 3)).astype(np.float32)
  y = rng.integers(0, 3, 50).astype(np.int32)
  lrs, wds = np.array([0.05, 0.5], np.float32), np.array([0.0, 1e-2], np.float32)
  key, epochs, batch_size = jax.random.key(1), 3, 16
  params = lp._train_grid(jnp.asarray(x), jnp.asarray(y), jnp.asarray(lrs), jnp.asarray(wds),
                          key, num_classes=3, epochs=epochs, batch_size=batch_size)
  total_steps = epochs * 4
  for g in range(2):
    optimizer = optax.chain(
        optax.add_decayed_weights(float(wds[g])),
        optax.sgd(optax.cosine_decay_schedule(float(lrs[g]), total_steps), momentum=0.9,
                  nesterov=True))
    p = {"w": jnp.zeros((3, 3)), "b": jnp.zeros((3,))}
    state = optimizer.init(p)
    for epoch_key in jax.random.split(key, epochs):
      order = np.asarray(jax.random.permutation(epoch_key, 50))
      for start in range(0, 50, batch_size):
        idx = order[start:start + batch_size]

        def loss(p, idx=idx):
          logits = x[idx] @ p["w"] + p["b"]
          return optax.softmax_cross_entropy_with_integer_labels(logits, y[idx]).mean()

        updates, state = optimizer.update(jax.grad(loss)(p), state, p)
        p = optax.apply_updates(p, updates)
    np.testing.assert_allclose(params["w"][g], p["w"], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(params["b"][g], p["b"], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("corrupt,match", [
    (lambda a: (a[0], np.where(a[1] == 0, 4, a[1]), a[2], a[3]), "train labels must lie"),
    (lambda a: (a[0], a[1], a[2], a[3] - 1), "test labels must lie"),
    (lambda a: (a[0], a[1][:-1], a[2], a[3]), "feature rows but"),
    (lambda a: (a[0], a[1].astype(np.float32), a[2], a[3]), "must be integers"),
])
def test_bad_inputs_are_rejected(corrupt, match):
  train, train_labels, test, test_labels, num_classes = _blobs(seed=0, num_train=40,
                                                               num_test=10)
  args = corrupt((train, train_labels, test, test_labels))
  with pytest.raises(ValueError, match=match):
    lp.linear_probe(*args, num_classes=num_classes, **_SMALL)


def test_bad_holdout_fraction_is_rejected():
  train, train_labels, test, test_labels, num_classes = _blobs(seed=0, num_train=40,
                                                               num_test=10)
  with pytest.raises(ValueError, match="holdout_fraction"):
    lp.linear_probe(train, train_labels, test, test_labels, num_classes=num_classes,
                    holdout_fraction=0.0, **_SMALL)
