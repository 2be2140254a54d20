"""Evaluation of a trained encoder: weighted kNN, an offline linear probe and, optionally, an
offline MLP probe.

ssljax's choice: the same two protocols for every method (kNN k = 200, t = 0.1 and the
held-out-selected linear probe), because each paper evaluates differently and one protocol
makes every results row comparable.

Features are the encoder's pooled output (pre-projector) in inference mode, on un-augmented
images of the train and test splits. With ``eval.precise_bn_examples > 0`` the BatchNorm
statistics are first re-estimated on that many clean training images (`precise_bn`), for
encoders trained on views smaller than the images. Protocols: kNN with ``eval.knn_k`` /
``eval.knn_t`` on L2-normalised features (default k = 200, t = 0.1); linear probe on
standardised frozen features, hyperparameters chosen on a held-out part of the train split.
With ``eval.mlp_probe`` (``--config.eval.mlp_probe=True``) also the MLP probe of DISSL /
CISSL's ``_mlp`` evaluation (`ssljax.eval.mlp_probe`: Linear-BN-ReLU hidden layers
``eval.mlp_probe_hidden_dims``) on the same features with the same held-out selection,
reported as ``mlp_probe/*``; it is off by default, since an epoch of one grid point is ~1000x
the linear probe's arithmetic at 512 features.

Streaming sources (`ssljax.data.streaming`, ImageNet scale) never hold a split in memory, so
the monitor and the final evaluation both run on the monitor's seeded subsets,
``eval.monitor_train_examples`` train and ``eval.monitor_test_examples`` test images (a size at
or above a split's takes all of it), decoded and centre-cropped (`StreamingSource.get`) one
``eval.batch_size`` batch at a time. Per host that holds one batch of images, the subsets'
indices and labels, and the float32 features [N, D] of both subsets (50000 x 2048 is 0.4 GB),
where an in-memory split holds every image as well. On a mesh of several processes each host
decodes only the rows of each batch that its own devices hold (`ssljax.eval.features.LocalRows`),
and every host receives all features and labels. Nothing decoded is kept, so
every monitor call decodes its subsets again (monitor sparingly: ``train.eval_every_steps``
is 0 in the ImageNet recipes, which evaluate once at the end). The precise-BN images are then
drawn from the train subset, as the monitor draws them. A size of 0 (a whole split) on a stream
gets no kNN or probes: `skip_reason` records ``eval/skipped`` naming the two keys to set (only
``eval.linear_eval``, which reads whole splits a batch at a time, still runs then).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import tempfile
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np
from jax.experimental import multihost_utils

from ssljax import data
from ssljax.eval import results as results_file
from ssljax.eval.features import Images, StreamedImages, extract_features
from ssljax.eval.knn import knn_accuracy
from ssljax.eval.linear_eval import LinearEvalSettings, linear_eval
from ssljax.eval.linear_probe import linear_probe
from ssljax.eval.mlp_probe import mlp_probe
from ssljax.eval.plots import plot_training_curves
from ssljax.eval.precise_bn import precise_batch_stats
from ssljax.methods.base import Method
from ssljax.train.paths import is_local, replace_text, workdir_path

log = logging.getLogger(__name__)


def _apply_eval(encoder, variables, x):
  return encoder.apply(variables, x, train=False)


@functools.lru_cache(maxsize=16)
def _cached_encode_fn(encoder):
  return functools.partial(_apply_eval, encoder)


def _encode_fn(method: Method):
  """The encoder's eval-mode apply; one object per (equal) encoder module, so that
  `extract_features` reuses its compiled function across monitor calls."""
  try:
    return _cached_encode_fn(method.encoder)
  except TypeError:  # an encoder with unhashable fields
    return functools.partial(_apply_eval, method.encoder)


def _subset_index(n: int, count: int, seed: int) -> np.ndarray | None:
  """Sorted indices of `count` of `n` rows drawn with `seed`; None for all of them."""
  if count <= 0 or count >= n:
    return None
  return np.sort(np.random.default_rng(seed).choice(n, size=count, replace=False))


class _Split(NamedTuple):
  """Images and labels of (a subset of) an in-memory split."""
  images: np.ndarray
  labels: np.ndarray


class _StreamedSplit:
  """Examples `indices` of a streaming source, decoded a batch at a time when read.

  ``images`` is `StreamedImages` over the examples; ``labels`` is filled in as their images are
  read (a label costs the record read anyway), so it is complete once features of every image
  have been extracted. Where the processes of a multi-process mesh each read only their own rows,
  `extract_features` then calls `_gather_labels`, which completes every process's labels.
  """

  def __init__(self, source: data.StreamingSource, indices: np.ndarray, *,
               resize_side: int | None = None):
    self.indices = indices
    self._resize_side = resize_side
    self.labels = np.full((len(indices),), -1, np.int32)
    self._source = source
    self.images = StreamedImages(len(indices), self._read, self._gather_labels)

  def _read(self, positions: np.ndarray) -> np.ndarray:
    examples = self._source.get(self.indices[positions], resize_side=self._resize_side)
    self.labels[positions] = examples["label"]
    return examples["image"]

  def _gather_labels(self) -> None:
    """Every process's labels, in place (a collective): a row not read here is -1 and was read
    by exactly one other process, so the maximum over processes is its label."""
    gathered = multihost_utils.process_allgather(self.labels)
    self.labels[:] = np.asarray(gathered).reshape(-1, len(self.labels)).max(axis=0)


def _subset(source, count: int, seed: int) -> _Split | _StreamedSplit:
  """`count` examples of `source` drawn with `seed` (all for count 0 or >= its size)."""
  idx = _subset_index(len(source), count, seed)
  if isinstance(source, data.StreamingSource):
    return _StreamedSplit(source, np.arange(len(source)) if idx is None else idx)
  if idx is None:
    return _Split(source.images, source.labels)
  return _Split(source.images[idx], source.labels[idx])


def eval_batch_size(config, mesh) -> int:
  """``eval.batch_size`` rounded down to a multiple of the mesh size (at least one per device)."""
  batch = config.eval.batch_size
  return max(batch - batch % mesh.size, mesh.size)


def _precise_bn_plan(config, mesh, num_images: int) -> tuple[int, int]:
  """(images drawn, batch size) for ``eval.precise_bn_examples``; whole batches are used."""
  count = min(config.eval.precise_bn_examples, num_images)
  if count < mesh.size:
    raise ValueError(f"eval.precise_bn_examples = {config.eval.precise_bn_examples} gives "
                     f"{count} images, fewer than the {mesh.size} devices; set it to at least "
                     f"{mesh.size} (or 0 to keep the running BN statistics)")
  return count, min(eval_batch_size(config, mesh), count - count % mesh.size)


def encoder_variables(config, method: Method, state, mesh, train_images: Images) -> Any:
  """The encoder's eval variables; BN statistics re-estimated if ``eval.precise_bn_examples``."""
  return encoder_variables_and_bn_images(config, method, state, mesh, train_images)[0]


def encoder_variables_and_bn_images(config, method: Method, state, mesh,
                                    train_images: Images) -> tuple[Any, int]:
  """`encoder_variables`, and how many clean train images its BN statistics come from.

  `train_images` is an array or `StreamedImages` (a streaming source's subset, read one batch
  at a time); the ``eval.precise_bn_examples`` drawn from it are the same either way.

  Returns:
    ``(variables, images)``: ``images`` is the number of train images (whole batches of the
    ``eval.precise_bn_examples`` drawn) whose statistics replaced the running ones; 0 when
    the running statistics are kept (``eval.precise_bn_examples`` 0, or an encoder without
    BatchNorm).
  """
  variables = method.eval_variables(state.params, state.method_state)
  if config.eval.precise_bn_examples <= 0:
    return variables, 0
  count, batch = _precise_bn_plan(config, mesh, len(train_images))
  if "batch_stats" not in variables:
    return variables, 0
  idx = _subset_index(len(train_images), count, config.seed + 2)
  images = train_images if idx is None else train_images[idx]
  variables = precise_batch_stats(method.encoder, variables, images, batch_size=batch, mesh=mesh)
  return variables, count // batch * batch


def bn_images(config: ml_collections.ConfigDict, train_source) -> Images:
  """The train images ``eval.precise_bn_examples`` are drawn from, as `evaluate_state` draws
  them: an in-memory split's array, or a streaming source's evaluation subset (read on demand)."""
  if isinstance(train_source, data.StreamingSource):
    return _subset(train_source, config.eval.monitor_train_examples, config.seed).images
  return train_source.images


def _features(config, variables, method: Method, images: Images, mesh) -> np.ndarray:
  return extract_features(_encode_fn(method), variables, images,
                          batch_size=eval_batch_size(config, mesh), mesh=mesh)


def skip_reason(config: ml_collections.ConfigDict, train_source,
                test_source=None) -> str | None:
  """Why kNN and the linear probe cannot (or are not to) run, or None when they can.

  Checked in order: ``eval.enabled``; for a streaming source, positive subset sizes
  ``eval.monitor_train_examples`` and ``eval.monitor_test_examples`` (0 asks for a whole split,
  which a stream does not evaluate: see the module docstring); labels on every train image; for
  an image folder, that its test split exists; labels on every test image (when `test_source`
  is given).
  """
  if not config.eval.enabled:
    return "eval.enabled is False"
  if isinstance(train_source, data.StreamingSource):
    ec = config.eval
    if ec.monitor_train_examples <= 0 or ec.monitor_test_examples <= 0:
      return (f"data.source={config.data.source!r} streams its images, and on a stream the kNN "
              f"monitor, kNN and probes use subsets of eval.monitor_train_examples train and "
              f"eval.monitor_test_examples test images (now {ec.monitor_train_examples} and "
              f"{ec.monitor_test_examples}; 0 asks for a whole split): set both > 0, e.g. "
              f"--config.eval.monitor_train_examples=50000 "
              f"--config.eval.monitor_test_examples=10000")
  if not train_source.has_labels:
    return (f"the train split {config.data.train_split!r} is unlabelled (kNN and the linear "
            f"probe need a class per image: for an image folder, one subfolder per class)")
  if config.data.source == "image_folder":
    test_dir = os.path.join(config.data.data_dir, config.data.test_split)
    if not os.path.isdir(test_dir):
      return (f"the image folder has no test split ({test_dir} does not exist; add it with the "
              f"train split's class folders to evaluate)")
  if test_source is not None and not test_source.has_labels:
    return f"the test split {config.data.test_split!r} is unlabelled"
  return None


def _test_split(config: ml_collections.ConfigDict, train_source) -> tuple[Any, str | None]:
  """``(test source, None)``, or ``(None, reason)`` when `skip_reason` finds one.

  The test split is only built when the config and the train split allow an evaluation, and
  then checked for labels itself.
  """
  reason = skip_reason(config, train_source)
  if reason is not None:
    return None, reason
  test = data.build_source(config.data, config.data.test_split)
  reason = skip_reason(config, train_source, test)
  return (None, reason) if reason is not None else (test, None)


class KnnMonitor:
  """Periodic kNN accuracy on fixed subsets of the train (bank) and test splits."""

  def __init__(self, config: ml_collections.ConfigDict, method: Method, mesh, *,
               train_source=None, test_source=None):
    self._config, self._method, self._mesh = config, method, mesh
    ec = config.eval
    train = train_source or data.build_source(config.data, config.data.train_split)
    test = test_source or data.build_source(config.data, config.data.test_split)
    self._bank = _subset(train, ec.monitor_train_examples, config.seed)
    self._queries = _subset(test, ec.monitor_test_examples, config.seed + 1)

  def __call__(self, state) -> dict[str, float]:
    ec = self._config.eval
    bank_images, query_images = self._bank.images, self._queries.images
    variables = encoder_variables(self._config, self._method, state, self._mesh, bank_images)
    bank = _features(self._config, variables, self._method, bank_images, self._mesh)
    queries = _features(self._config, variables, self._method, query_images, self._mesh)
    # A streamed split's labels are complete once its features are (read with the images).
    acc = knn_accuracy(bank, self._bank.labels, queries, self._queries.labels,
                       num_classes=self._config.data.num_classes, k=ec.knn_k,
                       temperature=ec.knn_t, chunk_size=ec.knn_chunk_size)
    return {"monitor/knn_top1": acc["top1"]}


def knn_monitor(config: ml_collections.ConfigDict, method: Method, mesh, *,
                train_source) -> KnnMonitor | None:
  """The periodic kNN monitor, or None (with the reason logged) when `skip_reason` finds one."""
  test, reason = _test_split(config, train_source)
  if reason is not None:
    log.info("no periodic kNN monitor: %s", reason)
    return None
  return KnnMonitor(config, method, mesh, train_source=train_source, test_source=test)


def evaluate_state(config: ml_collections.ConfigDict, method: Method, state, mesh, *,
                   train_source=None, workdir: str | None = None) -> dict[str, Any]:
  """kNN (and, if ``eval.linear_probe`` / ``eval.mlp_probe``, the probes) of the state's encoder.

  When `skip_reason` finds a reason (``eval.enabled`` False, unlabelled data, an image folder
  without a test split, a streaming source asked for a whole split), nothing is computed: the
  reason is logged and returned as ``{'eval/skipped': reason}``.

  An in-memory source is evaluated on its whole splits. A streaming source is evaluated on the
  kNN monitor's subsets (``eval.monitor_train_examples`` train, ``eval.monitor_test_examples``
  test images; the same draws), read one ``eval.batch_size`` batch at a time; the results then
  also hold ``eval/train_examples`` and ``eval/test_examples``, and ``knn/protocol`` names them.
  With ``eval.linear_eval`` the papers' linear evaluation (`ssljax.eval.linear_eval`) follows,
  on the whole splits (streamed or not) with the same encoder variables, checkpointed under
  `workdir` when one is given; its settings are checked first (`ConfigError`), and a failure
  while it runs (a non-finite loss) is logged and returned as ``linear_eval/error`` beside the
  other results, which the CLI then reports with exit code 1. On a stream asked for whole
  splits (a monitor size of 0) only the linear evaluation runs, and
  ``eval/knn_and_probes_skipped`` says why the others did not.
  """
  ec = config.eval
  if ec.linear_eval:  # before any work: a setting that cannot run is a config error
    from ssljax.train.validate import ConfigError
    try:
      LinearEvalSettings.from_config(ec).check(mesh.size)
    except ValueError as e:
      raise ConfigError(str(e)) from None
  train = train_source or data.build_source(config.data, config.data.train_split)
  if (ec.linear_eval and isinstance(train, data.StreamingSource)
      and min(ec.monitor_train_examples, ec.monitor_test_examples) <= 0):
    return _linear_eval_only(config, method, state, mesh, train, workdir)
  test, reason = _test_split(config, train)
  if reason is not None:
    log.warning("evaluation skipped: %s", reason)
    return {"eval/skipped": reason}
  streamed = isinstance(train, data.StreamingSource)
  whole_train, whole_test = train, test
  if streamed:
    train = _subset(train, ec.monitor_train_examples, config.seed)
    test = _subset(test, ec.monitor_test_examples, config.seed + 1)
  variables, bn_images = encoder_variables_and_bn_images(config, method, state, mesh,
                                                         train.images)
  train_features = _features(config, variables, method, train.images, mesh)
  test_features = _features(config, variables, method, test.images, mesh)
  results: dict[str, Any] = {"feature_dim": int(train_features.shape[1])}
  if streamed:
    results["eval/train_examples"] = len(train.labels)
    results["eval/test_examples"] = len(test.labels)
  knn = knn_accuracy(train_features, train.labels, test_features, test.labels,
                     num_classes=config.data.num_classes, k=ec.knn_k, temperature=ec.knn_t,
                     chunk_size=ec.knn_chunk_size)
  results["knn/top1"], results["knn/top5"] = knn["top1"], knn["top5"]
  results["knn/protocol"] = (f"weighted kNN k={ec.knn_k} t={ec.knn_t} on L2-normalised "
                             f"encoder features")
  if streamed:
    results["knn/protocol"] += (f", on {len(train.labels)} train and {len(test.labels)} test "
                                f"images drawn from the streamed splits")
  if bn_images:
    results["knn/protocol"] += f", BN statistics re-estimated on {bn_images} clean train images"
  log.info("kNN top-1 %.4f", knn["top1"])
  if ec.linear_probe:
    probe = linear_probe(train_features, train.labels, test_features, test.labels,
                         num_classes=config.data.num_classes, epochs=ec.probe_epochs,
                         batch_size=ec.probe_batch_size, lrs=tuple(ec.probe_lrs),
                         weight_decays=tuple(ec.probe_weight_decays),
                         holdout_fraction=ec.probe_holdout_fraction, seed=config.seed)
    results["linear_probe/top1"] = probe["test_top1"]
    results["linear_probe/holdout_top1"] = probe["holdout_top1"]
    results["linear_probe/best_lr"] = probe["best_lr"]
    results["linear_probe/best_weight_decay"] = probe["best_weight_decay"]
    log.info("linear probe top-1 %.4f", probe["test_top1"])
  if ec.mlp_probe:
    probe = mlp_probe(train_features, train.labels, test_features, test.labels,
                      num_classes=config.data.num_classes,
                      hidden_dims=tuple(ec.mlp_probe_hidden_dims), epochs=ec.mlp_probe_epochs,
                      batch_size=ec.probe_batch_size, lrs=tuple(ec.mlp_probe_lrs),
                      weight_decays=tuple(ec.mlp_probe_weight_decays),
                      holdout_fraction=ec.probe_holdout_fraction, seed=config.seed)
    results["mlp_probe/top1"] = probe["test_top1"]
    results["mlp_probe/holdout_top1"] = probe["holdout_top1"]
    results["mlp_probe/best_lr"] = probe["best_lr"]
    results["mlp_probe/best_weight_decay"] = probe["best_weight_decay"]
    log.info("MLP probe top-1 %.4f", probe["test_top1"])
  if ec.linear_eval:
    results.update(_run_linear_eval(config, method, state, mesh, variables, whole_train,
                                    whole_test, workdir))
  return results


def _run_linear_eval(config, method: Method, state, mesh, variables, train, test,
                     workdir: str | None) -> dict[str, Any]:
  """`linear_eval`'s results, or ``{'linear_eval/error': message}`` when it fails while it
  runs (the other results computed before it are still written; the CLI reports it)."""
  try:
    return linear_eval(config, _encode_fn(method), variables, mesh, train_source=train,
                       test_source=test, workdir=workdir, encoder_step=int(state.step))
  except (FloatingPointError, ValueError) as e:
    log.error("linear evaluation failed: %s", e)
    return {"linear_eval/error": str(e)}


def _linear_eval_only(config, method: Method, state, mesh, train: data.StreamingSource,
                      workdir: str | None) -> dict[str, Any]:
  """A stream asked for whole splits: no kNN or probes (they need subsets of a stream), but
  the linear evaluation, which reads a batch at a time anyway, runs on the whole splits."""
  subsets = ml_collections.ConfigDict(config.to_dict())
  subsets.eval.monitor_train_examples = subsets.eval.monitor_test_examples = 1
  test, reason = _test_split(subsets, train)  # every other reason to skip still applies
  if reason is not None:
    log.warning("evaluation skipped: %s", reason)
    return {"eval/skipped": reason}
  knn_reason = skip_reason(config, train)
  log.warning("kNN and probes skipped: %s; the linear evaluation runs on the whole splits",
              knn_reason)
  variables, _ = encoder_variables_and_bn_images(
      config, method, state, mesh, _subset(train, 0, config.seed).images)
  results: dict[str, Any] = {"eval/knn_and_probes_skipped": knn_reason}
  results.update(_run_linear_eval(config, method, state, mesh, variables, train, test,
                                  workdir))
  return results


def addon_reports(config: ml_collections.ConfigDict, method: Method, state, workdir: str, *,
                  train_source=None, num_images: int = 64) -> dict[str, Any]:
  """Runs the evaluation report of every add-on of the run that has one (process 0 only).

  Each report (``ssljax.methods.base.register_addon(report=...)``) gets the train state and
  the first `num_images` training images and may write plots into `workdir`; the values it
  returns are merged into the results, each under its add-on's name.
  """
  from ssljax.methods.base import addon_reports as registered_reports

  reports = registered_reports(config)
  if not reports or jax.process_index() != 0:
    return {}
  train = train_source or data.build_source(config.data, config.data.train_split)
  images = train.get(np.arange(min(num_images, len(train))))["image"]
  results: dict[str, Any] = {}
  for name, report in reports:
    values = report(method, config, state, images, workdir, step=int(state.step))
    results.update(values)
    log.info("%s report: %s", name, values)
  return results


def _set_aside(directory, text: str) -> str:
  """Writes a damaged results.json's `text` to a free results.unreadable[.N].json; its name."""
  name, n = "results.unreadable.json", 0
  while (directory / name).exists():
    n += 1
    name = f"results.unreadable.{n}.json"
  (directory / name).write_text(text, encoding="utf-8")
  return name


def write_results(config: ml_collections.ConfigDict, workdir: str,
                  results: dict[str, Any]) -> None:
  """Adds `results` to ``results.json`` and draws the training-curve plot (process 0 only).

  Earlier evaluations in the file are kept, each with the config keys it changed from the
  workdir's ``config.json`` (`ssljax.eval.results` describes the file).
  """
  if jax.process_index() != 0:
    return
  directory = workdir_path(workdir)
  path = directory / "results.json"
  previous = None
  if path.exists():
    text = path.read_text(encoding="utf-8")
    try:
      previous = json.loads(text)
      damage = results_file.problem(previous)
    except json.JSONDecodeError as e:
      damage = f"is not valid JSON ({e})"
    if damage is not None:
      aside = _set_aside(directory, text)
      log.warning("%s %s; it is kept as %s and a new one is started", path, damage, aside)
      previous = None
  config_path = directory / "config.json"
  if config_path.exists():
    reference = results_file.read_reference_config(config_path.read_text(encoding="utf-8"))
    unknown = f"{config_path} cannot be read as a config"
  else:
    reference, unknown = None, f"{config_path} does not exist"
  options = results_file.changed_options(config, reference)
  if options is None:
    log.warning("%s, so the options this evaluation changed from the run's config are "
                "unknown: it is recorded with options null, as an entry that replaces no "
                "other (not as the run's own evaluation)", unknown)
  entry = results_file.evaluation_entry(config, results, options)
  replace_text(path, results_file.dumps(results_file.merge(previous, entry)))
  metrics = directory / "metrics.jsonl"
  if not (config.eval.plots and metrics.exists()):
    return
  if is_local(directory):
    plot_training_curves(os.fspath(metrics), os.fspath(directory / "training_curves.png"))
    return
  with tempfile.TemporaryDirectory(prefix="ssljax-plot-") as tmp:  # bucket: drawn locally
    local_metrics, local_png = os.path.join(tmp, "metrics.jsonl"), os.path.join(tmp, "plot.png")
    with open(local_metrics, "w", encoding="utf-8") as f:
      f.write(metrics.read_text(encoding="utf-8"))
    plot_training_curves(local_metrics, local_png)
    with open(local_png, "rb") as f:
      (directory / "training_curves.png").write_bytes(f.read())
