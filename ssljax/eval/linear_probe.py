"""Offline linear probe on frozen features.

ssljax's choice: one probe for every method, trained on pre-extracted features with its
learning rate and weight decay picked on a held-out part of the train split, because the
papers' own probes all differ (optimiser, epochs, augmentation, selection) and a single
protocol makes rows comparable; each paper's protocol stays an option where a number is
compared with that paper.

Protocol:
  1. Split the train features: a seeded random ``holdout_fraction`` is held out, the rest fits.
  2. Standardise with the fitting part's statistics: x' = (x - mu) / sqrt(var + eps).
  3. Train one softmax classifier p(c | x) = softmax(x' W + b)_c per (lr, weight decay) grid
     point, minimising the mean cross-entropy over mini-batches with
       g <- grad + wd * theta                       (coupled decay, as PyTorch SGD)
       SGD, momentum 0.9, Nesterov, lr_t = lr * (1 + cos(pi t / T)) / 2
     for ``epochs`` epochs (T = total steps); every epoch visits each example once, in an order
     reshuffled by a seeded RNG, and the last, smaller batch averages over its real rows.
  4. Select the grid point with the best held-out top-1 (ties: the first in grid order, lrs
     outer, weight decays inner).
  5. Re-standardise with the full train split's statistics, retrain the selected setting on all
     of it and report test top-1.

Steps 3 and 5 are each one compiled program: the grid is vmapped, epochs and mini-batches are
``lax.scan`` loops, and the features stay on the device. All grid points see the same batch
order. W and b start at zero (the problem is convex) and both are decayed.

Deviation from the papers' probes: no augmentation (pre-extracted features), and the selection
uses a held-out part of the train split, never the test set (the DISSL/CISSL code,
YannDubs/Invariant-Self-Supervised-Learning ``config/downstream_task/``, picks its weight
decay on test).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Callable, Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

log = logging.getLogger(__name__)

_STD_EPS = 1e-8
_MOMENTUM = 0.9


def holdout_split(num_examples: int, holdout_fraction: float,
                  seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Seeded random split of ``range(num_examples)`` into (fit indices, held-out indices).

  The held-out part has ``round(holdout_fraction * num_examples)`` rows; both parts are sorted
  and non-empty.
  """
  if not 0.0 < holdout_fraction < 1.0:
    raise ValueError(f"holdout_fraction must lie in (0, 1), got {holdout_fraction}")
  num_holdout = int(round(holdout_fraction * num_examples))
  if not 0 < num_holdout < num_examples:
    raise ValueError(f"holdout_fraction {holdout_fraction} of {num_examples} examples leaves "
                     f"{num_holdout} held out; both parts need at least one example")
  order = np.random.default_rng(seed).permutation(num_examples)
  return np.sort(order[num_holdout:]), np.sort(order[:num_holdout])


def _standardizer(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu, 1 / sqrt(var + eps)) per feature, computed in float64."""
  features = features.astype(np.float64)
  return features.mean(0), 1.0 / np.sqrt(features.var(0) + _STD_EPS)


def _standardize(features: np.ndarray, stats: tuple[np.ndarray, np.ndarray]) -> jax.Array:
  mean, inv_std = stats
  return jnp.asarray(((features - mean) * inv_std).astype(np.float32))


def _logits(params: dict[str, jax.Array], x: jax.Array) -> jax.Array:
  return jnp.dot(x, params["w"], precision=jax.lax.Precision.HIGHEST) + params["b"]


def _optimizer(lr: jax.Array, weight_decay: jax.Array, total_steps: int,
               decay_mask: Any = None) -> optax.GradientTransformation:
  """Coupled weight decay, then Nesterov SGD with a cosine schedule (`decay_mask`: the
  parameters decayed, as ``optax.add_decayed_weights``'s mask; None decays all)."""
  return optax.chain(
      optax.add_decayed_weights(weight_decay, mask=decay_mask),
      optax.sgd(optax.cosine_decay_schedule(lr, total_steps), momentum=_MOMENTUM,
                nesterov=True))


@functools.partial(jax.jit, static_argnames=("num_classes", "epochs", "batch_size"))
def _train_grid(x: jax.Array, y: jax.Array, lrs: jax.Array, weight_decays: jax.Array,
                key: jax.Array, *, num_classes: int, epochs: int,
                batch_size: int) -> dict[str, jax.Array]:
  """Trains G classifiers at once; returns {'w': [G, D, C], 'b': [G, C]}."""
  num_examples, dim = x.shape
  steps_per_epoch = -(-num_examples // batch_size)
  total_steps = epochs * steps_per_epoch

  def init(lr: jax.Array, wd: jax.Array) -> tuple[dict[str, jax.Array], Any]:
    params = {"w": jnp.zeros((dim, num_classes), jnp.float32),
              "b": jnp.zeros((num_classes,), jnp.float32)}
    return params, _optimizer(lr, wd, total_steps).init(params)

  def loss_fn(params: dict[str, jax.Array], xb: jax.Array, yb: jax.Array,
              mask: jax.Array) -> jax.Array:
    ce = optax.softmax_cross_entropy_with_integer_labels(_logits(params, xb), yb)
    return jnp.sum(ce * mask) / jnp.sum(mask)

  return fit_grid(init, loss_fn, lambda lr, wd: _optimizer(lr, wd, total_steps), lrs,
                  weight_decays, x, y, key, epochs=epochs, batch_size=batch_size)


def fit_grid(init: Callable[[jax.Array, jax.Array], tuple[Any, Any]],
             loss_fn: Callable[[Any, jax.Array, jax.Array, jax.Array], jax.Array],
             optimizer: Callable[[jax.Array, jax.Array], optax.GradientTransformation],
             lrs: jax.Array, weight_decays: jax.Array, x: jax.Array, y: jax.Array,
             key: jax.Array, *, epochs: int, batch_size: int) -> Any:
  """Trains one model per (learning rate, weight decay) pair at once, vmapped over the grid.

  Every epoch visits the rows of `x` in a permutation drawn from its own split of `key`, in
  batches of `batch_size` (the last one padded with row 0 and masked out); all models see the
  same batches. ``init(lr, wd) -> (params, opt_state)``, ``loss_fn(params, xb, yb, mask)`` (a
  masked mean) and ``optimizer(lr, wd)`` define the model; returns the trained parameters with
  a leading grid axis. Shared by the linear and the MLP probe (to be traced inside a jit).
  """
  num_examples = x.shape[0]
  steps_per_epoch = -(-num_examples // batch_size)
  padded = steps_per_epoch * batch_size

  def update(params: Any, opt_state: Any, lr: jax.Array, wd: jax.Array, xb: jax.Array,
             yb: jax.Array, mask: jax.Array) -> tuple[Any, Any]:
    grads = jax.grad(loss_fn)(params, xb, yb, mask)
    updates, opt_state = optimizer(lr, wd).update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  update_grid = jax.vmap(update, in_axes=(0, 0, 0, 0, None, None, None))
  valid = (jnp.arange(padded) < num_examples).astype(jnp.float32).reshape(-1, batch_size)

  def run_epoch(carry: tuple[Any, Any], epoch_key: jax.Array) -> tuple[tuple[Any, Any], None]:
    order = jax.random.permutation(epoch_key, num_examples)
    order = jnp.pad(order, (0, padded - num_examples)).reshape(-1, batch_size)

    def step(carry: tuple[Any, Any], batch: tuple[jax.Array, jax.Array]
             ) -> tuple[tuple[Any, Any], None]:
      idx, mask = batch
      return update_grid(*carry, lrs, weight_decays, x[idx], y[idx], mask), None

    return jax.lax.scan(step, carry, (order, valid))[0], None

  carry = jax.vmap(init)(lrs, weight_decays)
  params, _ = jax.lax.scan(run_epoch, carry, jax.random.split(key, epochs))[0]
  return params


@jax.jit
def _grid_correct(params: dict[str, jax.Array], x: jax.Array, y: jax.Array) -> jax.Array:
  """Number of correct top-1 predictions [G], one grid point at a time (bounded memory)."""
  def correct(p: dict[str, jax.Array]) -> jax.Array:
    return jnp.sum(jnp.argmax(_logits(p, x), axis=-1) == y)

  return jax.lax.map(correct, params)


def _check_split(features: np.ndarray, labels: np.ndarray, num_classes: int, name: str) -> None:
  chex.assert_rank([features, labels], [2, 1])
  if features.shape[0] != labels.shape[0]:
    raise ValueError(f"{name}: {features.shape[0]} feature rows but {labels.shape[0]} labels")
  if features.shape[0] == 0:
    raise ValueError(f"{name} split is empty")
  if not np.issubdtype(labels.dtype, np.integer):
    raise ValueError(f"{name} labels must be integers, got dtype {labels.dtype}")
  if labels.min() < 0 or labels.max() >= num_classes:
    raise ValueError(f"{name} labels must lie in [0, {num_classes}), got range "
                     f"[{labels.min()}, {labels.max()}]")
  if not np.isfinite(features).all():
    raise ValueError(f"{name} features contain NaN or infinity")


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
                 epochs: int = 100, batch_size: int = 512,
                 lrs: Sequence[float] = (0.01, 0.1, 1.0),
                 weight_decays: Sequence[float] = (0.0, 1e-5, 1e-4),
                 holdout_fraction: float = 0.1, seed: int = 0) -> dict[str, Any]:
  """Linear probe with (lr, weight decay) chosen on a held-out part of the train split.

  Args:
    train_features: [N, D] frozen features of the train split.
    train_labels: [N] integer labels in [0, num_classes).
    test_features: [M, D] frozen features of the test split (same D).
    test_labels: [M] integer labels in [0, num_classes).
    num_classes: C.
    epochs: training epochs, for every grid point and for the final fit.
    batch_size: mini-batch size.
    lrs, weight_decays: the grid is their Cartesian product (lrs outer).
    holdout_fraction: fraction of the train split held out for selection.
    seed: seeds the split, the batch orders and nothing else (the initialisation is zero).

  Returns:
    ``test_top1`` (selected setting refit on the full train split), ``holdout_top1`` (of the
    selected setting), ``best_lr``, ``best_weight_decay``, and ``grid``: a list of
    ``{'lr', 'weight_decay', 'holdout_top1'}`` in grid order.
  """
  train_features, test_features = np.asarray(train_features), np.asarray(test_features)
  train_labels, test_labels = np.asarray(train_labels), np.asarray(test_labels)
  _check_split(train_features, train_labels, num_classes, "train")
  _check_split(test_features, test_labels, num_classes, "test")
  chex.assert_equal_shape_suffix([train_features, test_features], 1)
  if epochs < 1 or batch_size < 1:
    raise ValueError(f"epochs and batch_size must be >= 1, got {epochs} and {batch_size}")
  if not lrs or not weight_decays:
    raise ValueError("the lr and weight-decay grids must be non-empty")

  grid = list(itertools.product(lrs, weight_decays))
  grid_lrs = jnp.asarray([lr for lr, _ in grid], jnp.float32)
  grid_wds = jnp.asarray([wd for _, wd in grid], jnp.float32)
  selection_key, final_key = jax.random.split(jax.random.key(seed))

  fit_idx, holdout_idx = holdout_split(train_features.shape[0], holdout_fraction, seed)
  stats = _standardizer(train_features[fit_idx])
  params = _train_grid(_standardize(train_features[fit_idx], stats),
                       jnp.asarray(train_labels[fit_idx], jnp.int32), grid_lrs, grid_wds,
                       selection_key, num_classes=num_classes, epochs=epochs,
                       batch_size=batch_size)
  correct = _grid_correct(params, _standardize(train_features[holdout_idx], stats),
                          jnp.asarray(train_labels[holdout_idx], jnp.int32))
  holdout_top1 = np.asarray(correct) / holdout_idx.size
  best = int(np.argmax(holdout_top1))
  table = [{"lr": float(lr), "weight_decay": float(wd), "holdout_top1": float(acc)}
           for (lr, wd), acc in zip(grid, holdout_top1)]
  for row in table:
    log.info("linear probe: lr=%g weight_decay=%g holdout top-1=%.4f", row["lr"],
                 row["weight_decay"], row["holdout_top1"])

  stats = _standardizer(train_features)
  params = _train_grid(_standardize(train_features, stats),
                       jnp.asarray(train_labels, jnp.int32), grid_lrs[best:best + 1],
                       grid_wds[best:best + 1], final_key, num_classes=num_classes,
                       epochs=epochs, batch_size=batch_size)
  correct = _grid_correct(params, _standardize(test_features, stats),
                          jnp.asarray(test_labels, jnp.int32))
  test_top1 = float(np.asarray(correct)[0]) / test_labels.size
  log.info("linear probe: selected lr=%g weight_decay=%g, test top-1=%.4f",
               table[best]["lr"], table[best]["weight_decay"], test_top1)
  return {"test_top1": test_top1, "holdout_top1": table[best]["holdout_top1"],
          "best_lr": table[best]["lr"], "best_weight_decay": table[best]["weight_decay"],
          "grid": table}
