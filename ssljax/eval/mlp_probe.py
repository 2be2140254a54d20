"""Offline MLP probe on frozen features (the ``_mlp`` evaluation of DISSL / CISSL).

Dubois et al. (2022) evaluate their ``cissl_mlp`` / ``dissl_mlp`` models with a non-linear
probe on pre-extracted features: two hidden layers of 2048 units with BatchNorm
(YannDubs/Invariant-Self-Supervised-Learning, ``config/predictor/torch_mlp.yaml`` and the MLP
of ``issl/predictors.py``). ssljax runs it with the selection protocol of its linear probe
(`ssljax.eval.linear_probe`), so the two probes differ only in the classifier:

  1. Split the train features: a seeded random ``holdout_fraction`` is held out, the rest fits.
  2. Standardise with the fitting part's statistics: x' = (x - mu) / sqrt(var + 1e-8).
  3. Per (lr, weight decay) grid point, train
       h_0 = x',  h_l = ReLU(BN_l(h_{l-1} W_l))  (l = 1..L),  logits = h_L V + c
     with BN_l(a) = gamma_l * (a - m) / sqrt(v + 1e-5) + beta_l, minimising the mean
     cross-entropy over mini-batches with the linear probe's optimiser (coupled weight decay,
     SGD momentum 0.9 Nesterov, cosine lr from lr to 0, every epoch a reshuffled pass).
     In training (m, v) are the mean and biased variance of the mini-batch; in the last, padded
     batch of an epoch they are taken over its real rows only, as is the loss.
  4. After training, BN's (m, v) for prediction are the population statistics of the fit set:
     the mean and biased variance over all of its rows of a_l = h_{l-1} W_l, with h_{l-1}
     itself normalised by the population statistics of the layers below. They are exact (not
     the exponential moving average PyTorch's BatchNorm keeps during training), computed in
     one pass over the fit set per hidden layer (chunked, with Chan et al.'s pairwise update of
     the mean and the sum of squared deviations).
  5. Select the best held-out top-1 (ties: the first in grid order, lrs outer, weight decays
     inner); re-standardise with the full train split, retrain the selected setting on all of
     it (step 3, then step 4 on the full split) and report test top-1.

Parameters: W_l He-normal (untruncated, std sqrt(2 / fan_in)) from ``seed``, the same for
every grid point and the final fit; gamma = 1, beta = 0; V and c zero. The hidden Linear layers
have no bias, since BN subtracts it again. Weight decay acts on the weight matrices W_l and V
only, not on c, gamma or beta. Everything is float32. Steps 3 and 4 are one compiled program
with the grid vmapped and the features on the device, as in the linear probe.

Deviation from the official probe: no augmentation and the selection uses a held-out part of
the train split, never the test set (see `ssljax.eval.linear_probe`).
"""

from __future__ import annotations

import functools
import itertools
import logging
from collections.abc import Sequence
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ssljax.eval.linear_probe import _check_split, _optimizer, _standardize, _standardizer
from ssljax.eval.linear_probe import fit_grid, holdout_split

log = logging.getLogger(__name__)

BN_EPS = 1e-5
_EVAL_CHUNK = 4096  # Rows per step of the population statistics and of prediction.
_HIGHEST = jax.lax.Precision.HIGHEST

Params = dict[str, Any]


def init_params(key: jax.Array, dim: int, hidden_dims: Sequence[int],
                num_classes: int) -> Params:
  """``{'hidden': ({'w', 'scale', 'shift'}, ...), 'out': {'w', 'b'}}`` at initialisation."""
  hidden, fan_in = [], dim
  for layer_key, width in zip(jax.random.split(key, len(hidden_dims)), hidden_dims):
    w = jax.random.normal(layer_key, (fan_in, width), jnp.float32) * np.sqrt(2.0 / fan_in)
    hidden.append({"w": w, "scale": jnp.ones((width,), jnp.float32),
                   "shift": jnp.zeros((width,), jnp.float32)})
    fan_in = width
  return {"hidden": tuple(hidden),
          "out": {"w": jnp.zeros((fan_in, num_classes), jnp.float32),
                  "b": jnp.zeros((num_classes,), jnp.float32)}}


def _decay_mask(params: Params) -> Params:
  """True on the weight matrices (decayed), False on biases and BN scale / shift."""
  return {"hidden": tuple({"w": True, "scale": False, "shift": False}
                          for _ in params["hidden"]),
          "out": {"w": True, "b": False}}


def masked_moments(a: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Mean and biased variance over the rows of `a` [B, H] where `mask` [B] is 1."""
  count = jnp.sum(mask)
  mean = jnp.sum(a * mask[:, None], axis=0) / count
  var = jnp.sum(jnp.square(a - mean) * mask[:, None], axis=0) / count
  return mean, var


def _hidden_layer(layer: Params, a: jax.Array, mean: jax.Array, var: jax.Array) -> jax.Array:
  normed = (a - mean) * jax.lax.rsqrt(var + BN_EPS)
  return jax.nn.relu(normed * layer["scale"] + layer["shift"])


def _output(params: Params, h: jax.Array) -> jax.Array:
  return jnp.dot(h, params["out"]["w"], precision=_HIGHEST) + params["out"]["b"]


def train_logits(params: Params, x: jax.Array, mask: jax.Array) -> jax.Array:
  """Logits [B, C] with BN on the statistics of the rows where `mask` is 1 (training mode)."""
  h = x
  for layer in params["hidden"]:
    a = jnp.dot(h, layer["w"], precision=_HIGHEST)
    h = _hidden_layer(layer, a, *masked_moments(a, mask))
  return _output(params, h)


def eval_logits(params: Params, bn: tuple[dict[str, jax.Array], ...],
                x: jax.Array) -> jax.Array:
  """Logits [B, C] with BN on the given statistics ``({'mean', 'var'}, ...)``, one per layer."""
  h = x
  for layer, stats in zip(params["hidden"], bn):
    h = _hidden_layer(layer, jnp.dot(h, layer["w"], precision=_HIGHEST), stats["mean"],
                      stats["var"])
  return _output(params, h)


def _chunks(num_rows: int, size: int) -> tuple[jax.Array, jax.Array]:
  """Row indices [K, size] covering ``range(num_rows)`` (the last chunk padded with row 0) and
  the matching mask of real rows."""
  steps = -(-num_rows // size)
  padded = steps * size
  idx = jnp.pad(jnp.arange(num_rows), (0, padded - num_rows)).reshape(steps, size)
  return idx, (jnp.arange(padded) < num_rows).astype(jnp.float32).reshape(steps, size)


def population_stats(params: Params, x: jax.Array,
                     chunk: int) -> tuple[dict[str, jax.Array], ...]:
  """BN statistics of all rows of `x` for every hidden layer (step 4 of the module docstring).

  Layer l's pre-activations are computed with the layers below normalised by their population
  statistics; each layer is one chunked pass over `x` that merges the chunks' (count, mean,
  sum of squared deviations) with Chan et al.'s pairwise update.
  """
  idx, mask = _chunks(x.shape[0], chunk)
  stats: list[dict[str, jax.Array]] = []
  for depth, layer in enumerate(params["hidden"]):
    below = tuple(stats)

    def merge(carry, batch, depth=depth, layer=layer, below=below):
      count, mean, m2 = carry
      rows, real = batch
      h = x[rows]
      for prev, s in zip(params["hidden"][:depth], below):
        h = _hidden_layer(prev, jnp.dot(h, prev["w"], precision=_HIGHEST), s["mean"], s["var"])
      a = jnp.dot(h, layer["w"], precision=_HIGHEST)
      n_b = jnp.sum(real)
      mean_b, var_b = masked_moments(a, real)
      total = count + n_b
      delta = mean_b - mean
      mean = mean + delta * (n_b / total)
      m2 = m2 + var_b * n_b + jnp.square(delta) * (count * n_b / total)
      return (total, mean, m2), None

    width = layer["w"].shape[1]
    init = (jnp.float32(0.0), jnp.zeros((width,), jnp.float32), jnp.zeros((width,), jnp.float32))
    count, mean, m2 = jax.lax.scan(merge, init, (idx, mask))[0]
    stats.append({"mean": mean, "var": m2 / count})
  return tuple(stats)


@functools.partial(jax.jit, static_argnames=("num_classes", "hidden_dims", "epochs",
                                             "batch_size", "stats_chunk"))
def _fit_grid(x: jax.Array, y: jax.Array, lrs: jax.Array, weight_decays: jax.Array,
              order_key: jax.Array, init_key: jax.Array, *, num_classes: int,
              hidden_dims: tuple[int, ...], epochs: int, batch_size: int,
              stats_chunk: int) -> tuple[Params, tuple[dict[str, jax.Array], ...]]:
  """Trains G MLPs at once (steps 3-4); returns their parameters and population BN statistics,
  each with a leading grid axis G."""
  num_examples, dim = x.shape
  steps_per_epoch = -(-num_examples // batch_size)
  total_steps = epochs * steps_per_epoch
  start = init_params(init_key, dim, hidden_dims, num_classes)
  decay_mask = _decay_mask(start)

  def optimizer(lr: jax.Array, wd: jax.Array) -> optax.GradientTransformation:
    return _optimizer(lr, wd, total_steps, decay_mask)

  def init(lr: jax.Array, wd: jax.Array) -> tuple[Params, Any]:
    return start, optimizer(lr, wd).init(start)

  def loss_fn(params: Params, xb: jax.Array, yb: jax.Array, mask: jax.Array) -> jax.Array:
    ce = optax.softmax_cross_entropy_with_integer_labels(train_logits(params, xb, mask), yb)
    return jnp.sum(ce * mask) / jnp.sum(mask)

  params = fit_grid(init, loss_fn, optimizer, lrs, weight_decays, x, y, order_key,
                    epochs=epochs, batch_size=batch_size)
  bn = jax.vmap(lambda p: population_stats(p, x, stats_chunk))(params)
  return params, bn


@functools.partial(jax.jit, static_argnames=("chunk",))
def _grid_correct(params: Params, bn: tuple[dict[str, jax.Array], ...], x: jax.Array,
                  y: jax.Array, *, chunk: int) -> jax.Array:
  """Correct top-1 predictions [G], one grid point and `chunk` rows at a time."""
  idx, mask = _chunks(x.shape[0], chunk)

  def correct(p_bn: tuple[Params, Any]) -> jax.Array:
    p, s = p_bn

    def count(total: jax.Array, batch: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, None]:
      rows, real = batch
      hits = jnp.argmax(eval_logits(p, s, x[rows]), axis=-1) == y[rows]
      return total + jnp.sum(hits * (real > 0)), None

    return jax.lax.scan(count, jnp.int32(0), (idx, mask))[0]

  return jax.lax.map(correct, (params, bn))


def mlp_probe(train_features: np.ndarray, train_labels: np.ndarray,
              test_features: np.ndarray, test_labels: np.ndarray, *, num_classes: int,
              hidden_dims: Sequence[int] = (2048, 2048), epochs: int = 30,
              batch_size: int = 512, lrs: Sequence[float] = (0.01, 0.1),
              weight_decays: Sequence[float] = (1e-5, 1e-4),
              holdout_fraction: float = 0.1, seed: int = 0) -> dict[str, Any]:
  """MLP probe with (lr, weight decay) chosen on a held-out part of the train split.

  Args:
    train_features: [N, D] frozen features of the train split.
    train_labels: [N] integer labels in [0, num_classes).
    test_features: [M, D] frozen features of the test split (same D).
    test_labels: [M] integer labels in [0, num_classes).
    num_classes: C.
    hidden_dims: widths of the Linear-BN-ReLU hidden layers (at least one).
    epochs: training epochs, for every grid point and for the final fit.
    batch_size: mini-batch size.
    lrs, weight_decays: the grid is their Cartesian product (lrs outer).
    holdout_fraction: fraction of the train split held out for selection.
    seed: seeds the split, the batch orders and the hidden weights' initialisation.

  Returns:
    As `ssljax.eval.linear_probe.linear_probe`: ``test_top1`` (selected setting refit on the
    full train split), ``holdout_top1`` (of the selected setting), ``best_lr``,
    ``best_weight_decay``, and ``grid``: a list of ``{'lr', 'weight_decay', 'holdout_top1'}``
    in grid order.
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
  hidden_dims = tuple(int(h) for h in hidden_dims)
  if not hidden_dims or min(hidden_dims) < 1:
    raise ValueError(f"hidden_dims must be one or more positive widths, got {hidden_dims} "
                     f"(without hidden layers, use the linear probe)")

  grid = list(itertools.product(lrs, weight_decays))
  grid_lrs = jnp.asarray([lr for lr, _ in grid], jnp.float32)
  grid_wds = jnp.asarray([wd for _, wd in grid], jnp.float32)
  selection_key, final_key, init_key = jax.random.split(jax.random.key(seed), 3)
  static = dict(num_classes=num_classes, hidden_dims=hidden_dims, epochs=epochs,
                batch_size=batch_size)

  fit_idx, holdout_idx = holdout_split(train_features.shape[0], holdout_fraction, seed)
  stats = _standardizer(train_features[fit_idx])
  params, bn = _fit_grid(_standardize(train_features[fit_idx], stats),
                         jnp.asarray(train_labels[fit_idx], jnp.int32), grid_lrs, grid_wds,
                         selection_key, init_key,
                         stats_chunk=min(_EVAL_CHUNK, fit_idx.size), **static)
  correct = _grid_correct(params, bn, _standardize(train_features[holdout_idx], stats),
                          jnp.asarray(train_labels[holdout_idx], jnp.int32),
                          chunk=min(_EVAL_CHUNK, holdout_idx.size))
  holdout_top1 = np.asarray(correct) / holdout_idx.size
  best = int(np.argmax(holdout_top1))
  table = [{"lr": float(lr), "weight_decay": float(wd), "holdout_top1": float(acc)}
           for (lr, wd), acc in zip(grid, holdout_top1)]
  for row in table:
    log.info("mlp probe: lr=%g weight_decay=%g holdout top-1=%.4f", row["lr"],
             row["weight_decay"], row["holdout_top1"])

  stats = _standardizer(train_features)
  params, bn = _fit_grid(_standardize(train_features, stats),
                         jnp.asarray(train_labels, jnp.int32), grid_lrs[best:best + 1],
                         grid_wds[best:best + 1], final_key, init_key,
                         stats_chunk=min(_EVAL_CHUNK, train_labels.size), **static)
  correct = _grid_correct(params, bn, _standardize(test_features, stats),
                          jnp.asarray(test_labels, jnp.int32),
                          chunk=min(_EVAL_CHUNK, test_labels.size))
  test_top1 = float(np.asarray(correct)[0]) / test_labels.size
  log.info("mlp probe: selected lr=%g weight_decay=%g, test top-1=%.4f", table[best]["lr"],
           table[best]["weight_decay"], test_top1)
  return {"test_top1": test_top1, "holdout_top1": table[best]["holdout_top1"],
          "best_lr": table[best]["lr"], "best_weight_decay": table[best]["weight_decay"],
          "grid": table}
