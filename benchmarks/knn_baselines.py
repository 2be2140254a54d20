"""Reference points for the kNN numbers of a config: raw pixels and a random-init encoder.

An SSL encoder is only useful if it beats both. Uses the config's evaluation protocol
(weighted kNN with eval.knn_k / eval.knn_t on L2-normalised features, full train bank,
full test split) and writes a JSON record. Raw pixels are also scored standardised per pixel
and PCA-whitened (train-split statistics; `ssljax.eval.geometry.pca_whitening`, eps 1e-3):
the pixel-space counterparts of the feature transforms `benchmarks/knn_diagnostics.py` tries
on an encoder, which change the metric rather than the representation.

  python benchmarks/knn_baselines.py [--config configs/simclr.py:fashion_mnist] \
      [--out benchmarks/results/knn_baselines.json]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import time

import jax
import numpy as np

from ssljax import data
from ssljax.config import load_config
from ssljax.eval import extract_features, geometry, knn_accuracy
from ssljax.methods import RunInfo, build_method


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/simclr.py:fashion_mnist")
  parser.add_argument("--out", default="benchmarks/results/knn_baselines.json")
  args = parser.parse_args()
  config = load_config(args.config)
  ec = config.eval
  train = data.build_source(config.data, config.data.train_split)
  test = data.build_source(config.data, config.data.test_split)

  def knn(train_features, test_features, k):
    return knn_accuracy(train_features, train.labels, test_features, test.labels,
                        num_classes=config.data.num_classes, k=k, temperature=ec.knn_t,
                        chunk_size=ec.knn_chunk_size)["top1"]

  rows = []
  flat = lambda images: images.reshape(len(images), -1).astype(np.float32) / 255.0
  raw_train, raw_test = flat(train.images), flat(test.images)
  mean, std = raw_train.mean(0), raw_train.std(0) + 1e-6
  white_mean, white = geometry.pca_whitening(raw_train, eps=1e-3)
  whiten = lambda x: ((x - white_mean) @ white).astype(np.float32)
  for k in sorted({ec.knn_k, 20}):
    rows.append({"features": "raw pixels", "k": k, "top1": knn(raw_train, raw_test, k)})
    rows.append({"features": "raw pixels, standardised", "k": k,
                 "top1": knn((raw_train - mean) / std, (raw_test - mean) / std, k)})
    rows.append({"features": "raw pixels, PCA-whitened", "k": k,
                 "top1": knn(whiten(raw_train), whiten(raw_test), k)})

  method = build_method(config, run=RunInfo(steps_per_epoch=1, total_steps=1,
                                            num_examples=len(train)))
  params, method_state = method.init(jax.random.PRNGKey(config.seed),
                                     (np.zeros((2, *train.image_shape), np.float32),) * 2)
  variables = method.eval_variables(params, method_state)
  encode = lambda v, x: method.encoder.apply(v, x, train=False)
  start = time.time()
  train_f = extract_features(encode, variables, train.images, batch_size=ec.batch_size)
  test_f = extract_features(encode, variables, test.images, batch_size=ec.batch_size)
  rows.append({"features": f"random-init {config.model.encoder} "
                           f"(expand {config.model.expand_features})",
               "k": ec.knn_k, "top1": knn(train_f, test_f, ec.knn_k),
               "extract_seconds": time.time() - start})

  print(f"{'features':45s} {'k':>4s} {'kNN top-1':>10s}")
  for row in rows:
    print(f"{row['features']:45s} {row['k']:4d} {row['top1']:10.4f}")
  record = {"config": args.config, "temperature": ec.knn_t, "rows": rows,
            "device": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "processor": platform.processor() or platform.machine(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=2)


if __name__ == "__main__":
  main()
