"""Tests for ssljax.eval.mlp_probe: non-linear accuracy, masked and population BatchNorm
statistics, decay mask, selection and bad inputs."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from ssljax.eval import mlp_probe as mp
from ssljax.eval.linear_probe import linear_probe

_SMALL = dict(hidden_dims=(32, 32), epochs=20, batch_size=64)


def _xor(seed: int, num: int) -> tuple[np.ndarray, np.ndarray]:
  """2-D points in [-1, 1]^2, class 1 in the first and third quadrants: no line separates
  the classes better than about chance."""
  x = np.random.default_rng(seed).uniform(-1.0, 1.0, size=(num, 2)).astype(np.float32)
  return x, (x[:, 0] * x[:, 1] > 0).astype(np.int64)


@pytest.fixture(scope="module")
def xor_results():
  train, train_labels = _xor(0, 600)
  test, test_labels = _xor(1, 300)
  mlp = mp.mlp_probe(train, train_labels, test, test_labels, num_classes=2,
                     lrs=(1e-4, 0.3), weight_decays=(0.0, 1e-3), **_SMALL)
  linear = linear_probe(train, train_labels, test, test_labels, num_classes=2, epochs=20,
                        batch_size=64, lrs=(0.1, 1.0), weight_decays=(0.0,))
  return mlp, linear


def test_the_mlp_probe_solves_xor_where_the_linear_probe_cannot(xor_results):
  mlp, linear = xor_results
  assert mlp["test_top1"] > 0.9 and mlp["holdout_top1"] > 0.9, mlp
  assert linear["test_top1"] < 0.7, linear


def test_selection_picks_the_best_holdout_setting(xor_results):
  mlp, _ = xor_results
  grid = mlp["grid"]
  assert [(row["lr"], row["weight_decay"]) for row in grid] == [
      (pytest.approx(1e-4), 0.0), (pytest.approx(1e-4), 1e-3), (0.3, 0.0), (0.3, 1e-3)]
  accuracies = [row["holdout_top1"] for row in grid]
  # lr 1e-4 barely moves from the random hidden features (~0.87); lr 0.3 fits (~0.98).
  assert max(accuracies) - min(accuracies) > 0.05, accuracies
  best = grid[int(np.argmax(accuracies))]
  assert (mlp["best_lr"], mlp["best_weight_decay"]) == (best["lr"], best["weight_decay"])
  assert mlp["best_lr"] == pytest.approx(0.3) and mlp["holdout_top1"] == max(accuracies)


def _random_params(seed: int, dim: int, hidden_dims: tuple[int, ...], num_classes: int):
  """`init_params` with BN scale / shift and the output layer moved off their initial values,
  so that every term of the forward pass matters."""
  params = mp.init_params(jax.random.key(seed), dim, hidden_dims, num_classes)
  rng = np.random.default_rng(seed)
  hidden = tuple({"w": layer["w"],
                  "scale": jnp.asarray(rng.uniform(0.5, 2.0, layer["scale"].shape), jnp.float32),
                  "shift": jnp.asarray(rng.normal(size=layer["shift"].shape), jnp.float32)}
                 for layer in params["hidden"])
  out = {"w": jnp.asarray(rng.normal(size=params["out"]["w"].shape), jnp.float32),
         "b": jnp.asarray(rng.normal(size=params["out"]["b"].shape), jnp.float32)}
  return {"hidden": hidden, "out": out}


def test_padding_rows_do_not_enter_the_training_batch_statistics():
  rng = np.random.default_rng(0)
  real = rng.normal(size=(5, 4)).astype(np.float32)
  padded = np.concatenate([real, 1e3 * rng.normal(size=(3, 4)).astype(np.float32)])
  mask = jnp.asarray([1.0] * 5 + [0.0] * 3)
  mean, var = mp.masked_moments(jnp.asarray(padded), mask)
  np.testing.assert_allclose(mean, real.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(var, real.var(0), rtol=1e-5, atol=1e-6)
  # The whole training-mode forward: the real rows' logits are those of the real rows alone.
  params = _random_params(1, 4, (6, 5), 3)
  np.testing.assert_allclose(mp.train_logits(params, jnp.asarray(padded), mask)[:5],
                             mp.train_logits(params, jnp.asarray(real), jnp.ones(5)),
                             rtol=1e-5, atol=1e-5)


def test_population_statistics_are_the_fit_sets_mean_and_variance():
  # 37 rows in chunks of 8: four full chunks and a padded one of 5 real rows.
  rng = np.random.default_rng(2)
  x = (3.0 * rng.normal(size=(37, 4)) + 1.0).astype(np.float32)
  params = _random_params(3, 4, (6, 5), 3)
  stats = mp.population_stats(params, jnp.asarray(x), chunk=8)
  h = x.astype(np.float64)
  for layer, got in zip(params["hidden"], stats):
    a = h @ np.asarray(layer["w"], np.float64)
    np.testing.assert_allclose(got["mean"], a.mean(0), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got["var"], a.var(0), rtol=1e-4, atol=1e-5)
    normed = (a - a.mean(0)) / np.sqrt(a.var(0) + mp.BN_EPS)
    h = np.maximum(normed * np.asarray(layer["scale"]) + np.asarray(layer["shift"]), 0.0)
  # Prediction with these statistics is the training-mode forward over the whole set at once.
  np.testing.assert_allclose(mp.eval_logits(params, stats, jnp.asarray(x)),
                             mp.train_logits(params, jnp.asarray(x), jnp.ones(37)),
                             rtol=1e-4, atol=1e-4)


def test_weight_decay_acts_on_the_weight_matrices_only():
  params = _random_params(4, 3, (4,), 2)
  optimizer = mp._optimizer(jnp.float32(0.1), jnp.float32(0.5), 10, mp._decay_mask(params))
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero, optimizer.init(params), params)
  moved = optax.apply_updates(params, updates)
  layer, new = params["hidden"][0], moved["hidden"][0]
  # One step at lr 0.1 of the gradient 0.5 * w (Nesterov: (1 + momentum) times it).
  np.testing.assert_allclose(new["w"], layer["w"] * (1 - 0.1 * 0.5 * 1.9), rtol=1e-6)
  np.testing.assert_allclose(moved["out"]["w"], params["out"]["w"] * (1 - 0.1 * 0.5 * 1.9),
                             rtol=1e-6)
  for before, after in [(layer["scale"], new["scale"]), (layer["shift"], new["shift"]),
                        (params["out"]["b"], moved["out"]["b"])]:
    np.testing.assert_array_equal(before, after)


@pytest.mark.parametrize("corrupt, options, match", [
    (lambda a: (a[0], np.where(a[1] == 0, 2, a[1]), a[2], a[3]), {}, "train labels must lie"),
    (lambda a: (a[0], a[1], a[2], a[3] - 1), {}, "test labels must lie"),
    (lambda a: (a[0], a[1][:-1], a[2], a[3]), {}, "feature rows but"),
    (lambda a: (a[0], a[1].astype(np.float32), a[2], a[3]), {}, "must be integers"),
    (lambda a: (np.where(a[0] > 0, np.nan, a[0]), a[1], a[2], a[3]), {}, "NaN or infinity"),
    (lambda a: a, {"hidden_dims": ()}, "hidden_dims must be one or more positive widths"),
    (lambda a: a, {"hidden_dims": (8, 0)}, "hidden_dims must be one or more positive widths"),
    (lambda a: a, {"lrs": ()}, "grids must be non-empty"),
    (lambda a: a, {"epochs": 0}, "epochs and batch_size must be >= 1"),
    (lambda a: a, {"holdout_fraction": 1.0}, "holdout_fraction"),
])
def test_bad_inputs_are_rejected(corrupt, options, match):
  train, train_labels = _xor(0, 40)
  test, test_labels = _xor(1, 10)
  args = corrupt((train, train_labels, test, test_labels))
  with pytest.raises(ValueError, match=match):
    mp.mlp_probe(*args, num_classes=2, **{**_SMALL, **options})
