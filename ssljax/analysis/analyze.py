"""``ssljax analyze``: the geometry of a trained checkpoint's encoder and heads, layer by layer.

  python -m ssljax.analysis.analyze --workdir W [--out DIR] [--config.analysis.KEY=VALUE ...]

For any method (it reads the method's stages, not its code): restores the latest checkpoint of
W, takes a fixed held-out set (the first ``analysis.num_test`` images of the test split) and a
seeded subset of ``analysis.num_train`` training images, and for every layer that
``method.head_layers`` returns ('encoder', every captured submodule of every head, each head's
'<head>/output') plus each head output after L2 normalisation ('<head>/output/l2') measures,
all in inference mode (running BatchNorm statistics):

  1. kNN and linear-probe accuracy (the project's protocols, ssljax.eval.knn / linear_probe;
     train = the training subset, test = the held-out set; the probe's epochs and grid are
     ``analysis.probe_*``);
  2. invariance (`ssljax.analysis.geometry.invariance`) of K = ``analysis.num_augmentations``
     augmented copies of the first ``analysis.num_invariance`` held-out images, under the
     run's training policy (view 0 of ``build_policy(config.augment)``) and under a common
     reference policy (``analysis.reference_policy`` at ``analysis.reference_strength``, the
     run's other augment settings unchanged);
  3. dimensionality of the held-out cloud: effective rank, components for 90% / 99% of the
     variance, the full singular-value spectrum;
  4. for one head layer (``analysis.jacobian_layer``, default the first head's output): its
     Jacobian with respect to the encoder output at the invariance images' clean h_i, mean
     effective rank and averaged spectrum;
  5. tangent-plane alignment for r in ``analysis.ranks``: overlaps between P_i (the Jacobian's
     top-r right singular vectors), T_i (local PCA of the ``analysis.num_neighbours`` nearest
     training-subset encoder features of h_i) and A_i (top-r principal directions of the
     training-policy copies' encoder features), with the chance level r / d_h.

Writes ``analysis.json``, ``summary.md`` and PNG plots into ``--out`` (default
``W/analysis``). Exit codes: 0 done, 1 a bad flag or no checkpoint (a message).

The protocol (after Cosentino et al. 2022, arXiv 2205.06926, which publishes no code) is
ssljax's own; docs/geometry.md documents it.
"""

from __future__ import annotations

import os
import sys

if __name__ == "__main__" and "numpy" not in sys.modules:
  # One BLAS thread: on a shared, oversubscribed CPU OpenBLAS's spinning threads made the
  # batched SVDs of this analysis 30x slower (7.5 min vs 66 s on 2 cores). Set before NumPy,
  # SciPy and jax's LAPACK load; an explicit OPENBLAS_NUM_THREADS wins.
  os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import argparse
import ast
import collections
import copy
import dataclasses
import functools
import json
import logging
import time
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssljax.analysis import geometry

log = logging.getLogger(__name__)


def default_analysis_config() -> ml_collections.ConfigDict:
  """The ``analysis`` settings with their defaults (every key overridable)."""
  a = ml_collections.ConfigDict()
  a.num_test = 10000  # held-out set: the first N images of the test split
  a.num_train = 10000  # seeded subset of the train split: kNN bank, probe fit, neighbours
  a.num_invariance = 1000  # first held-out images used for invariance, Jacobians, overlaps
  a.num_augmentations = 16  # K copies per image (A_i needs K > r)
  a.reference_policy = "simclr"
  a.reference_strength = 1.0
  a.ranks = (5, 10, 20)
  a.num_neighbours = 20  # local PCA of the data tangent plane
  a.jacobian_layer = ""  # a head_layers name, or '' for the first '<head>/output'
  a.batch_size = 256  # images (clean) or views (augmented) per compiled forward
  a.jacobian_chunk = 128
  a.precise_bn_examples = -1  # -1: the run's eval.precise_bn_examples (<= num_train); 0: off
  a.knn = True
  a.knn_k = 200
  a.knn_t = 0.1
  a.probe = True
  a.probe_epochs = 20
  a.probe_batch_size = 512
  a.probe_lrs = (0.01, 0.1, 1.0)
  a.probe_weight_decays = (0.0, 1e-4)
  a.plots = True
  a.seed = 0
  return a


# ------------------------------------------------------------------- forward passes

def _l2(x: jax.Array) -> jax.Array:
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _with_l2(layers: collections.OrderedDict) -> collections.OrderedDict:
  """`layers` with '<head>/output/l2' (the L2-normalised output) after each '<head>/output'."""
  out = collections.OrderedDict()
  for name, value in layers.items():
    out[name] = value
    if name.endswith("/output"):
      out[name + "/l2"] = _l2(value)
  return out


def views_needed(method, params, method_state, image_shape: tuple[int, ...]) -> int:
  """How many identical views the features stage needs for one image: 1, or
  ``method.num_views`` for methods whose encoder reads fixed view indices (Barlow Twins:
  views 0 and 1). Shapes only (``jax.eval_shape``)."""
  x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
  for copies in (1, method.num_views):
    try:
      jax.eval_shape(lambda p, s, v, c=copies: method.features(p, s, (v,) * c, train=False),
                     params, method_state, x)
      return copies
    except (IndexError, ValueError, TypeError):
      continue
  return method.num_views


def head_outputs(method, params, method_state, h: jax.Array) -> collections.OrderedDict:
  """Every head layer from encoder features h ``[b, d_h]`` (inference mode), float32, with
  '<head>/output/l2' after each '<head>/output'; the 'encoder' entry is h itself."""
  layers = method.head_layers(params, method_state, (h,))
  return _with_l2(collections.OrderedDict((k, v.astype(jnp.float32)) for k, v in layers.items()))


def forward_layers(method, copies: int, params, method_state, x: jax.Array
                   ) -> collections.OrderedDict:
  """Every layer's output ``{name: [b, d]}`` for float images x ``[b, H, W, C]`` in [0, 1]:
  the features stage in inference mode (the image as `copies` identical views, the first
  one's features kept), then `head_outputs`."""
  features, _ = method.features(params, method_state, (x,) * copies, train=False)
  return head_outputs(method, params, method_state, features[0])


class Layers:
  """`forward_layers` and `head_outputs` of one checkpoint, jitted (parameters passed as
  arguments, not compiled in as constants)."""

  def __init__(self, method, params, method_state, image_shape: tuple[int, ...] = (16, 16, 1)):
    self.method, self.params, self.state = method, params, method_state
    copies = views_needed(method, params, method_state, image_shape)
    self._forward = jax.jit(functools.partial(forward_layers, method, copies))
    self._head = jax.jit(functools.partial(head_outputs, method))

  def forward(self, x: jax.Array) -> collections.OrderedDict:
    return self._forward(self.params, self.state, x)

  def head(self, h: jax.Array) -> collections.OrderedDict:
    return self._head(self.params, self.state, h)


def _batched(fn: Callable[[np.ndarray], dict], inputs: np.ndarray, batch: int, what: str
             ) -> dict[str, np.ndarray]:
  """Concatenated ``fn(inputs[s:s + batch])`` (the last batch padded by repetition)."""
  parts: dict[str, list[np.ndarray]] = collections.defaultdict(list)
  n = inputs.shape[0]
  started, reported = time.time(), time.time()
  for start in range(0, n, batch):
    chunk = inputs[start:start + batch]
    real = chunk.shape[0]
    if real < batch:
      chunk = np.concatenate([chunk, np.repeat(chunk[-1:], batch - real, axis=0)])
    for name, value in fn(chunk).items():
      parts[name].append(np.asarray(value)[:real])
    if time.time() - reported > 10 or start + batch >= n:
      reported = time.time()
      log.info("%s: %d/%d (%.0f s)", what, min(start + batch, n), n, reported - started)
  return collections.OrderedDict((k, np.concatenate(v)) for k, v in parts.items())


def clean_layers(layers: Layers, images: np.ndarray, batch: int, what: str
                 ) -> dict[str, np.ndarray]:
  """``{layer: [N, d]}`` of un-augmented uint8 images ``[N, H, W, C]``."""
  return _batched(lambda x: layers.forward(jnp.asarray(x, jnp.float32) / 255.0), images,
                  batch, what)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _augment(spec, num_augmentations: int, base: jax.Array, index: jax.Array,
             images: jax.Array) -> jax.Array:
  """``[b * K, s, s, C]``: copy k of image ``index[j]`` is ``augment_view(fold_in(fold_in(base,
  index[j]), k), images[j], spec)``, rows image-major."""
  from ssljax.augment.policies import augment_view
  k = num_augmentations
  keys = jax.vmap(lambda i: jax.vmap(lambda c: jax.random.fold_in(
      jax.random.fold_in(base, i), c))(jnp.arange(k)))(index)  # [b, K]
  views = jax.vmap(jax.vmap(lambda key, im: augment_view(key, im, spec), (0, None)))(
      keys, images)  # [b, K, s, s, C]
  return views.reshape((-1,) + views.shape[2:])


def augmented_layers(layers: Layers, spec, images: np.ndarray, *, num_augmentations: int,
                     batch: int, seed: int, what: str) -> dict[str, np.ndarray]:
  """``{layer: [n, K, d]}``: K augmented copies (view spec `spec`) of each uint8 image.

  Copy k of image i is ``augment_view(fold_in(fold_in(key(seed), i), k), images[i], spec)``,
  so the copies do not depend on the batching; ``batch // K`` images go through per call.
  """
  k = num_augmentations
  base = jax.random.key(seed)

  def fn(index):
    views = _augment(spec, k, base, jnp.asarray(index), jnp.asarray(images[index]))
    return collections.OrderedDict((n, v.reshape(len(index), k, -1))
                                   for n, v in layers.forward(views).items())

  return _batched(fn, np.arange(images.shape[0]), max(1, batch // k), what)


# ------------------------------------------------------------------- the analysis

def _policy_spec(augment_config, data_mean, policy: str | None = None,
                 strength: float | None = None):
  """View 0 of the run's policy; with `policy` or `strength`, the common reference policy,
  which erases nothing whatever the run did (it is the same for every run compared)."""
  from ssljax.augment.policies import build_policy
  cfg = copy.deepcopy(augment_config)
  with cfg.unlocked():
    if policy is not None:
      cfg.policy = policy
    if strength is not None:
      cfg.strength = strength
    if policy is not None or strength is not None:
      cfg.erasing_prob = 0.0
  spec = build_policy(cfg, data_mean).views[0]
  return spec


def _precise_state(run, train_images: np.ndarray, count: int):
  """The state with the encoder's BN statistics re-estimated on clean training images
  (the evaluation's precise-BN protocol), when the method keeps them under 'encoder'."""
  from ssljax.eval import evaluate
  stats = (run.state.method_state.get("batch_stats", {})
           if isinstance(run.state.method_state, Mapping) else {})
  if count <= 0 or "encoder" not in stats:
    return run.state.method_state, 0
  config = copy.deepcopy(run.config)
  with config.unlocked():
    config.eval.precise_bn_examples = count
  variables = evaluate.encoder_variables(config, run.method, run.state, run.mesh, train_images)
  state = dict(run.state.method_state)
  state["batch_stats"] = {**stats, "encoder": variables["batch_stats"]}
  return state, min(count, len(train_images))


def _subset(source, count: int, seed: int, first: bool) -> tuple[np.ndarray, np.ndarray]:
  n = len(source)
  if count <= 0 or count >= n:
    return source.images, source.labels
  idx = np.arange(count) if first else np.sort(
      np.random.default_rng(seed).choice(n, size=count, replace=False))
  return source.images[idx], source.labels[idx]


def analyze(workdir: str, out: str | None = None,
            analysis_config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Runs the analysis of the latest checkpoint of `workdir`; returns what analysis.json holds.

  Args:
    workdir: an ssljax workdir (config.json and checkpoints/).
    out: output directory (default ``<workdir>/analysis``).
    analysis_config: `default_analysis_config` with overrides; None: the defaults.
  """
  from ssljax import data
  from ssljax.eval.knn import knn_accuracy
  from ssljax.eval.linear_probe import linear_probe
  from ssljax.train.loop import restore_latest

  a = analysis_config or default_analysis_config()
  out = out or os.path.join(workdir, "analysis")
  os.makedirs(out, exist_ok=True)
  timings: dict[str, float] = {}
  clock = time.time()

  def lap(stage: str) -> None:
    nonlocal clock
    timings[stage] = round(time.time() - clock, 2)
    log.info("analysis stage %s done in %.1f s", stage, timings[stage])
    clock = time.time()

  run = restore_latest(workdir)
  config = run.config
  train_images, train_labels = _subset(run.train_source, a.num_train, a.seed, first=False)
  test_source = data.build_source(config.data, config.data.test_split)
  test_images, test_labels = _subset(test_source, a.num_test, a.seed, first=True)
  n_inv = min(a.num_invariance, len(test_images))
  labelled = run.train_source.has_labels and test_source.has_labels
  precise = config.eval.precise_bn_examples if a.precise_bn_examples < 0 else a.precise_bn_examples
  method_state, precise_count = _precise_state(run, train_images, precise)
  layers = Layers(run.method, run.state.params, method_state,
                  tuple(run.train_source.image_shape))
  log.info("analysing %s step %d: %d held-out, %d train, %d x %d augmented images",
           config.method.name, run.step, len(test_images), len(train_images), n_inv,
           a.num_augmentations)
  lap("restore")

  test = clean_layers(layers, test_images, a.batch_size, "held-out features")
  train = clean_layers(layers, train_images, a.batch_size, "train features")
  names = list(test)
  lap("features")

  per_layer: dict[str, dict[str, Any]] = {name: {"dim": int(test[name].shape[1])}
                                          for name in names}
  for name in names:
    per_layer[name]["dimensionality"] = geometry.dimensionality(test[name])
  lap("dimensionality")

  if labelled and a.knn:
    k = min(a.knn_k, len(train_images))
    for name in names:
      acc = knn_accuracy(train[name], train_labels, test[name], test_labels,
                         num_classes=config.data.num_classes, k=k, temperature=a.knn_t,
                         chunk_size=config.eval.knn_chunk_size)
      per_layer[name]["knn_top1"] = acc["top1"]
      log.info("kNN %s: %.4f", name, acc["top1"])
    lap("knn")
  if labelled and a.probe:
    for name in names:
      probe = linear_probe(train[name], train_labels, test[name], test_labels,
                           num_classes=config.data.num_classes, epochs=a.probe_epochs,
                           batch_size=a.probe_batch_size, lrs=tuple(a.probe_lrs),
                           weight_decays=tuple(a.probe_weight_decays), seed=a.seed)
      per_layer[name]["probe_top1"] = probe["test_top1"]
      log.info("linear probe %s: %.4f", name, probe["test_top1"])
    lap("probe")

  policies = {"train": _policy_spec(config.augment, config.data.mean),
              "reference": _policy_spec(config.augment, config.data.mean, a.reference_policy,
                                        a.reference_strength)}
  encoder_views = None
  for policy, spec in policies.items():
    views = augmented_layers(layers, spec, test_images[:n_inv],
                             num_augmentations=a.num_augmentations,
                             batch=a.batch_size, seed=a.seed + 1, what=f"{policy} policy views")
    for name in names:
      per_layer[name].setdefault("invariance", {})[policy] = geometry.invariance(
          views[name], test[name][:n_inv])
    if policy == "train":
      encoder_views = views["encoder"]
    del views
    lap(f"invariance_{policy}")

  jac_layer = a.jacobian_layer or next(n for n in names if n.endswith("/output"))
  if jac_layer not in names:
    raise ValueError(f"analysis.jacobian_layer {jac_layer!r} is not a layer; layers: {names}")
  h = test["encoder"][:n_inv]
  d_h, d_out = h.shape[1], test[jac_layer].shape[1]
  method = run.method
  jac_fn = lambda x, p, s: head_outputs(method, p, s, x[None])[jac_layer][0]
  ranks = sorted(int(r) for r in a.ranks)
  max_p = min(d_h, d_out, max(ranks))
  values, p_spaces = geometry.jacobian_geometry(jac_fn, h, rank=max_p,
                                                chunk_size=a.jacobian_chunk,
                                                args=(layers.params, layers.state))
  jac_erank = geometry.values_effective_rank(values)
  jacobian = {"layer": jac_layer, "wrt": "encoder", "shape": [int(d_out), int(d_h)],
              "mean_effective_rank": float(jac_erank.mean()),
              "std_effective_rank": float(jac_erank.std()),
              "mean_spectrum": [float(s) for s in values.mean(0)]}
  log.info("Jacobian of %s: mean effective rank %.2f", jac_layer, jac_erank.mean())
  lap("jacobian")

  max_t = min(a.num_neighbours, d_h, max(ranks))
  t_spaces = geometry.local_tangent(h, train["encoder"], num_neighbours=a.num_neighbours,
                                    rank=max_t)
  max_a = min(a.num_augmentations - 1, d_h, max(ranks))
  a_spaces = geometry.augmentation_subspace(encoder_views, max_a)
  overlaps: dict[str, Any] = {}
  for r in ranks:
    spaces = {name: s[..., :r] for name, s, top in (("P", p_spaces, max_p),
                                                    ("T", t_spaces, max_t),
                                                    ("A", a_spaces, max_a)) if r <= top}
    entry = geometry.overlap_summary(spaces, d_h) if len(spaces) >= 2 else {"chance": r / d_h}
    entry["undefined"] = [n for n in ("P", "T", "A") if n not in spaces]
    overlaps[str(r)] = entry
  lap("overlaps")

  results = {
      "workdir": os.path.abspath(workdir), "method": config.method.name, "step": run.step,
      "augment_strength": float(config.augment.strength),
      "encoder": config.model.encoder, "method_config": config.method.to_dict(),
      "seed": config.seed,
      "analysis": a.to_dict(), "layers": names, "per_layer": per_layer,
      "jacobian": jacobian, "overlaps": overlaps,
      "precise_bn_examples": precise_count,
      "policies": {k: dataclasses.asdict(v) for k, v in policies.items()},
      "num_test": int(len(test_images)), "num_train": int(len(train_images)),
      "num_invariance": int(n_inv), "devices": f"{jax.device_count()} x "
      f"{jax.devices()[0].device_kind}", "timings_s": timings,
  }
  with open(os.path.join(out, "analysis.json"), "w", encoding="utf-8") as f:
    json.dump(results, f, indent=2, default=_json_default)
  with open(os.path.join(out, "summary.md"), "w", encoding="utf-8") as f:
    f.write(summary_markdown(results))
  if a.plots:
    write_plots(results, out)
  lap("write")
  results["timings_s"] = timings
  log.info("analysis written to %s (%.0f s in all)", out, sum(timings.values()))
  return results


def _json_default(x):
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  return str(x)


# ------------------------------------------------------------------- reports

def _fmt(x: Any, digits: int = 3) -> str:
  if x is None:
    return "-"
  if isinstance(x, float):
    return f"{x:.{digits}f}"
  return str(x)


def summary_markdown(results: dict[str, Any]) -> str:
  """The short markdown report: one row per layer, then the Jacobian and the overlaps."""
  lines = [f"# Geometry analysis: {results['method']} at step {results['step']}", "",
           f"Workdir `{results['workdir']}`, augmentation strength "
           f"{results['augment_strength']}; {results['num_test']} held-out images, "
           f"{results['num_train']} train images, {results['num_invariance']} images x "
           f"{results['analysis']['num_augmentations']} augmentations. R_inv: within-image / "
           f"between-image mean squared distance (0 = invariant); cos+: mean positive cosine.",
           ""]
  if results["policies"]["train"] == results["policies"]["reference"]:
    lines += ["The run's training policy equals the reference policy: their columns coincide.",
              ""]
  lines += ["| layer | dim | kNN | probe | R_inv train | R_inv ref | cos+ train | cos+ ref | "
           "erank | PCs 90% | PCs 99% |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  for name in results["layers"]:
    p = results["per_layer"][name]
    inv, dim = p.get("invariance", {}), p["dimensionality"]
    lines.append("| " + " | ".join([
        f"`{name}`", str(p["dim"]), _fmt(p.get("knn_top1")), _fmt(p.get("probe_top1")),
        _fmt(inv.get("train", {}).get("ratio")), _fmt(inv.get("reference", {}).get("ratio")),
        _fmt(inv.get("train", {}).get("positive_cosine")),
        _fmt(inv.get("reference", {}).get("positive_cosine")),
        _fmt(dim["effective_rank"], 1), str(dim["components_90"]),
        str(dim["components_99"])]) + " |")
  j = results["jacobian"]
  lines += ["", f"Jacobian of `{j['layer']}` w.r.t. the encoder output ({j['shape'][0]} x "
            f"{j['shape'][1]}): mean effective rank {j['mean_effective_rank']:.2f} "
            f"(std {j['std_effective_rank']:.2f}).", "",
            "Subspace overlaps ||U^T V||_F^2 / r in encoder space (P: projector's top-r "
            "right singular vectors, T: local data tangent plane, A: augmentation "
            "subspace):", "", "| r | P-T | P-A | T-A | chance r/d |", "|---|---|---|---|---|"]
  for r, entry in results["overlaps"].items():
    cells = [_fmt(entry.get(pair, {}).get("mean")) for pair in ("P-T", "P-A", "T-A")]
    lines.append(f"| {r} | " + " | ".join(cells) + f" | {entry['chance']:.3f} |")
  lines += ["", "Stage times (s): " + ", ".join(f"{k} {v}" for k, v in
                                                results["timings_s"].items()), ""]
  return "\n".join(lines)


def write_plots(results: dict[str, Any], out: str) -> list[str]:
  """spectra.png (normalised spectra, log scale, plus the Jacobian's), invariance.png (R_inv
  and positive cosine per layer and policy) and overlaps.png (overlaps per r with chance)."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure

  names = results["layers"]
  paths = []

  fig = Figure(figsize=(11, 4.5))
  ax, axj = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
  for name in names:
    s = np.asarray(results["per_layer"][name]["dimensionality"]["spectrum"])
    if s.size and s[0] > 0:
      ax.semilogy(np.arange(1, s.size + 1), np.maximum(s / s[0], 1e-12), label=name)
  ax.set(xlabel="component", ylabel="singular value / largest", title="held-out spectra")
  ax.legend(fontsize=7)
  s = np.asarray(results["jacobian"]["mean_spectrum"])
  axj.semilogy(np.arange(1, s.size + 1), np.maximum(s, 1e-12))
  axj.set(xlabel="component", ylabel="singular value",
          title=f"mean Jacobian spectrum of {results['jacobian']['layer']}")
  fig.tight_layout()
  paths.append(_save(fig, os.path.join(out, "spectra.png"), FigureCanvasAgg))

  fig = Figure(figsize=(11, 4.5))
  x = np.arange(len(names))
  for col, (key, title) in enumerate((("ratio", "invariance ratio R_inv (0 = invariant)"),
                                      ("positive_cosine", "mean positive cosine"))):
    ax = fig.add_subplot(1, 2, col + 1)
    for offset, policy in ((-0.2, "train"), (0.2, "reference")):
      vals = [results["per_layer"][n].get("invariance", {}).get(policy, {}).get(key, np.nan)
              for n in names]
      ax.bar(x + offset, vals, width=0.4, label=f"{policy} policy")
    ax.set_xticks(x, names, rotation=45, ha="right", fontsize=7)
    ax.set_title(title)
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(_save(fig, os.path.join(out, "invariance.png"), FigureCanvasAgg))

  fig = Figure(figsize=(7, 4.5))
  ax = fig.add_subplot(1, 1, 1)
  ranks = list(results["overlaps"])
  pairs = ("P-T", "P-A", "T-A")
  x = np.arange(len(ranks))
  for i, pair in enumerate(pairs):
    vals = [results["overlaps"][r].get(pair, {}).get("mean", np.nan) for r in ranks]
    ax.bar(x + (i - 1) * 0.25, vals, width=0.25, label=pair)
  for i, r in enumerate(ranks):
    chance = results["overlaps"][r]["chance"]
    ax.hlines(chance, i - 0.4, i + 0.4, colors="k", linestyles="dashed",
              label="chance r/d" if i == 0 else None)
  ax.set_xticks(x, [f"r={r}" for r in ranks])
  ax.set(ylim=(0, 1), ylabel="mean ||U^T V||_F^2 / r", title="subspace overlaps (encoder space)")
  ax.legend(fontsize=7)
  paths.append(_save(fig, os.path.join(out, "overlaps.png"), FigureCanvasAgg))
  return paths


def _save(fig, path: str, canvas) -> str:
  canvas(fig)
  fig.savefig(path, dpi=100)
  return path


# ------------------------------------------------------------------- command line

def parse_overrides(config: ml_collections.ConfigDict, overrides: list[str]
                    ) -> ml_collections.ConfigDict:
  """Applies ``--config.analysis.KEY=VALUE`` (VALUE a Python literal, else a string)."""
  config = copy.deepcopy(config)
  for arg in overrides:
    if not arg.startswith("--config.analysis.") or "=" not in arg:
      raise ValueError(f"unknown argument {arg!r}; expected --config.analysis.KEY=VALUE")
    key, value = arg[len("--config.analysis."):].split("=", 1)
    if key not in config:
      raise ValueError(f"unknown analysis key {key!r}; valid keys: {', '.join(sorted(config))}")
    try:
      parsed = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      parsed = value
    if isinstance(config[key], tuple) and not isinstance(parsed, tuple):
      parsed = tuple(parsed) if isinstance(parsed, list) else (parsed,)
    if isinstance(config[key], float) and isinstance(parsed, int):
      parsed = float(parsed)
    try:
      config[key] = parsed
    except TypeError as e:
      raise ValueError(f"--config.analysis.{key}: {e}") from None
  return config


def _keys_help() -> str:
  """The ``--help`` text's list of analysis keys with their defaults."""
  lines = ["config keys (--config.analysis.KEY=VALUE, VALUE a Python literal), with their",
           "defaults; each is declared with a comment in default_analysis_config of",
           f"  {os.path.abspath(__file__)}", "and docs/geometry.md explains the protocol:"]
  for key, value in default_analysis_config().items():
    lines.append(f"  {key} = {value!r}")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(
      prog="ssljax analyze", usage="ssljax analyze --workdir DIR [--out DIR] "
      "[--config.analysis.KEY=VALUE ...]", description=__doc__, epilog=_keys_help(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", required=True,
                      help="a directory written by ssljax train (its latest checkpoint)")
  parser.add_argument("--out", default=None,
                      help="where analysis.json, summary.md and the plots go "
                      "(default: WORKDIR/analysis)")
  parser.add_argument("--log_level", default="INFO", help="Python logging level")
  try:
    args, rest = parser.parse_known_args(argv)
  except SystemExit as e:  # --help (0) or a bad flag (argparse's message is printed)
    return 0 if e.code in (0, None) else 1
  try:
    config = parse_overrides(default_analysis_config(), rest)
  except ValueError as e:
    print(f"ssljax analyze: {e}", file=sys.stderr)
    return 1
  logging.basicConfig(level=getattr(logging, args.log_level.upper(), logging.INFO),
                      format="%(asctime)s %(levelname)s %(name)s: %(message)s")
  logging.getLogger("absl").setLevel(logging.WARNING)
  try:
    results = analyze(args.workdir, args.out, config)
  except FileNotFoundError as e:
    print(f"ssljax analyze: {e}", file=sys.stderr)
    return 1
  print(f"wrote {os.path.join(args.out or os.path.join(args.workdir, 'analysis'), 'analysis.json')}"
        f" ({sum(results['timings_s'].values()):.0f} s)")
  return 0


if __name__ == "__main__":
  if "XLA_FLAGS" not in os.environ:
    from ssljax.cli import CPU_XLA_FLAGS
    os.environ["XLA_FLAGS"] = CPU_XLA_FLAGS
  sys.exit(main())
