"""Where a checkpoint's kNN accuracy comes from: neighbours, classes, layers, offsets, scale.

Restores the latest checkpoint of a workdir and, on the full train split (bank) and test split
(queries), prints and writes to JSON:

  k            weighted kNN top-1 for each ``--ks`` value (the configured k is the protocol;
               a small k shows how good the nearest neighbours are on their own);
  per class    top-1 of each class under the configured k and t;
  offset       the protocol, then the same with features centred, standardised per
               dimension, and PCA-whitened (``--whiten-eps`` values) with train-split
               statistics before the L2 normalisation (diagnostic only: the protocol of
               DECISIONS.md is plain L2-normalised features);
  geometry     of the train-split features: effective rank (Roy & Vetterli, on singular
               values), principal components for 90% / 99% of the variance, and the mean
               cosine similarity of 10k random pairs of test images (how much of the cosine
               range the protocol's t has to work with);
  layers       kNN on the spatially pooled output of every residual block, next to the
               encoder's output (how much each stage, and the 1x1 expansion, adds);
  resolution   train and test images resized (bilinear, antialiased) to each ``--sizes``
               value before encoding, BN statistics re-estimated at that size when the config
               does so (whether evaluating at another scale than the native one would help an
               encoder trained on smaller views, as FixRes reports for ImageNet).

Every number uses the workdir's saved config (precise BN included), so the "k" row at the
configured k reproduces ``knn/top1`` of its ``results.json``.

  python benchmarks/knn_diagnostics.py --workdir runs/simclr_fashion_mnist \
      [--ks 20 200] [--sizes 24 32] [--whiten-eps 1e-3 1] [--out WORKDIR/knn_diagnostics.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import sys
import time
from typing import Any, Callable

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:
  sys.path.insert(0, REPO_ROOT)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from ssljax import data  # noqa: E402
from ssljax.eval import evaluate, extract_features, geometry, knn_predict  # noqa: E402
from ssljax.train.loop import restore_latest  # noqa: E402

_BLOCK = re.compile(r"stage(\d+)_block(\d+)$")


def resize_images(images: np.ndarray, size: int, chunk: int = 4096) -> np.ndarray:
  """uint8 [N, H, W, C] resized to [N, size, size, C] (bilinear, antialiased, rounded)."""
  if images.shape[1:3] == (size, size):
    return images
  out = []
  for start in range(0, len(images), chunk):
    x = jnp.asarray(images[start:start + chunk], jnp.float32)
    y = jax.image.resize(x, (x.shape[0], size, size, x.shape[3]), "linear", antialias=True)
    out.append(np.asarray(jnp.clip(jnp.round(y), 0, 255)).astype(np.uint8))
  return np.concatenate(out)


def residual_blocks(encoder, variables, image_shape) -> list[tuple[str, int]]:
  """(name, channels) of each residual block of `encoder` (modules named stageS_blockB),
  in forward order; empty for an encoder without such modules."""
  x = jnp.zeros((1, *image_shape), jnp.float32)
  _, state = jax.eval_shape(
      lambda v: encoder.apply(v, x, train=False, capture_intermediates=_is_block,
                              mutable=["intermediates"]), variables)
  found = state.get("intermediates", {})
  names = sorted(found, key=lambda n: tuple(int(g) for g in _BLOCK.match(n).groups()))
  return [(n, int(found[n]["__call__"][0].shape[-1])) for n in names]


def _is_block(module, method_name: str) -> bool:
  return method_name == "__call__" and bool(module.name) and bool(_BLOCK.match(module.name))


def layer_encoder(encoder, names: list[str]) -> Callable[[Any, jax.Array], jax.Array]:
  """``(variables, x) -> [b, sum of widths]``: pooled block outputs, then the encoder output."""

  def apply(variables, x):
    out, state = encoder.apply(variables, x, train=False, capture_intermediates=_is_block,
                               mutable=["intermediates"])
    pooled = [jnp.mean(state["intermediates"][n]["__call__"][0], axis=(1, 2)) for n in names]
    return jnp.concatenate([p.astype(jnp.float32) for p in pooled] + [out], axis=1)

  return apply


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True, help="a workdir with a checkpoint")
  parser.add_argument("--ks", type=int, nargs="*", default=[20],
                      help="k values besides the configured eval.knn_k")
  parser.add_argument("--sizes", type=int, nargs="*", default=[],
                      help="image sizes to evaluate at besides the native one")
  parser.add_argument("--whiten-eps", type=float, nargs="*", default=[1e-3],
                      help="eps values (relative to the mean eigenvalue) for PCA-whitened rows")
  parser.add_argument("--out", default=None, help="JSON file (default WORKDIR/knn_diagnostics"
                                                  ".json)")
  args = parser.parse_args()
  start = time.time()
  run = restore_latest(args.workdir)
  config, method, mesh = run.config, run.method, run.mesh
  ec, num_classes = config.eval, config.data.num_classes
  train = run.train_source
  test = data.build_source(config.data, config.data.test_split)
  batch = evaluate.eval_batch_size(config, mesh)

  def knn(bank, queries, k=ec.knn_k):
    scores = knn_predict(bank, train.labels, queries, num_classes=num_classes, k=k,
                         temperature=ec.knn_t, chunk_size=ec.knn_chunk_size)
    return np.argmax(scores, axis=1)

  acc = lambda pred: float(np.mean(pred == test.labels))
  record: dict[str, Any] = {"workdir": args.workdir, "step": run.step, "k": ec.knn_k,
                            "t": ec.knn_t, "precise_bn_examples": ec.precise_bn_examples}

  variables = evaluate.encoder_variables(config, method, run.state, mesh, train.images)
  blocks = residual_blocks(method.encoder, variables, train.image_shape)
  encode = layer_encoder(method.encoder, [name for name, _ in blocks])
  train_all = extract_features(encode, variables, train.images, batch_size=batch, mesh=mesh)
  test_all = extract_features(encode, variables, test.images, batch_size=batch, mesh=mesh)
  dim = train_all.shape[1] - sum(width for _, width in blocks)
  train_f, test_f = train_all[:, -dim:], test_all[:, -dim:]

  pred = knn(train_f, test_f)
  record["k_rows"] = [{"k": k, "top1": acc(knn(train_f, test_f, k)) if k != ec.knn_k
                       else acc(pred)} for k in sorted({ec.knn_k, *args.ks})]
  record["per_class"] = [{"class": c, "count": int(np.sum(test.labels == c)),
                          "top1": float(np.mean(pred[test.labels == c] == c))}
                         for c in range(num_classes)]
  mu, sd = train_f.mean(0), train_f.std(0) + 1e-6
  record["offset"] = [
      {"features": "L2-normalised (the protocol)", "top1": acc(pred)},
      {"features": "centred, then L2-normalised", "top1": acc(knn(train_f - mu, test_f - mu))},
      {"features": "standardised, then L2-normalised",
       "top1": acc(knn((train_f - mu) / sd, (test_f - mu) / sd))}]
  for eps in args.whiten_eps:
    mean, w = geometry.pca_whitening(train_f, eps)
    white = lambda f: ((f - mean) @ w).astype(np.float32)
    record["offset"].append({"features": f"PCA-whitened (eps {eps:g}), then L2-normalised",
                             "top1": acc(knn(white(train_f), white(test_f)))})
  pairs = np.random.default_rng(0).integers(0, len(test_f), (10000, 2))
  unit = test_f / np.maximum(np.linalg.norm(test_f, axis=1, keepdims=True), 1e-12)
  record["geometry"] = {
      "dim": int(dim), "effective_rank": geometry.effective_rank(train_f),
      "components_90": geometry.components_for(train_f, 0.9),
      "components_99": geometry.components_for(train_f, 0.99),
      "random_pair_cosine": float(np.mean(np.sum(unit[pairs[:, 0]] * unit[pairs[:, 1]], 1)))}
  record["layers"], offset = [], 0
  for name, width in blocks:
    cols = slice(offset, offset + width)
    record["layers"].append({"layer": name, "dim": width,
                             "top1": acc(knn(train_all[:, cols], test_all[:, cols]))})
    offset += width
  record["layers"].append({"layer": "encoder output", "dim": dim, "top1": acc(pred)})

  record["resolution"] = [{"size": train.image_shape[0], "top1": acc(pred)}]
  plain = lambda v, x: method.encoder.apply(v, x, train=False)
  for size in args.sizes:
    train_r, test_r = resize_images(train.images, size), resize_images(test.images, size)
    v = evaluate.encoder_variables(config, method, run.state, mesh, train_r)
    bank = extract_features(plain, v, train_r, batch_size=batch, mesh=mesh)
    queries = extract_features(plain, v, test_r, batch_size=batch, mesh=mesh)
    record["resolution"].append({"size": size, "top1": acc(knn(bank, queries))})

  record.update({
      "seconds": time.time() - start,
      "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
      "processor": platform.processor() or platform.machine(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
  _print(record)
  out = args.out or os.path.join(args.workdir, "knn_diagnostics.json")
  os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)


def _print(record: dict[str, Any]) -> None:
  k, t = record["k"], record["t"]
  print(f"{record['workdir']} at step {record['step']}: weighted kNN top-1, t={t}")
  for row in record["k_rows"]:
    print(f"  k={row['k']:<4d} {row['top1']:.4f}")
  print(f"per class (k={k}): " + "  ".join(f"{r['class']}:{r['top1']:.3f}"
                                          for r in record["per_class"]))
  for row in record["offset"]:
    print(f"  {row['features']:44s} {row['top1']:.4f}")
  g = record["geometry"]
  print(f"  {g['dim']}-d features: effective rank {g['effective_rank']:.1f}, "
        f"{g['components_90']} / {g['components_99']} components for 90% / 99% of the "
        f"variance, random-pair cosine {g['random_pair_cosine']:.3f}")
  for row in record["layers"]:
    print(f"  {row['layer']:20s} {row['dim']:5d}-d {row['top1']:.4f}")
  for row in record["resolution"]:
    print(f"  images at {row['size']:3d} px        {row['top1']:.4f}")


if __name__ == "__main__":
  main()
