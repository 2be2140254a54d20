"""The evaluated encoder of a workdir, exported for use without the trainer or the data.

``ssljax export --workdir W --out DIR`` (`export_encoder`) restores W's latest checkpoint and
writes three files to DIR:

  variables.msgpack  the encoder's variables, ``{'params': ..., 'batch_stats': ...}``, in
                     ``flax.serialization`` msgpack (``msgpack_restore`` reads them into numpy
                     arrays). They are the variables the evaluation (kNN, linear probe) applies:
                     with ``eval.precise_bn_examples > 0`` the BatchNorm statistics are
                     re-estimated on the same clean training images (same seed, same batches
                     on the same device count) as `ssljax.eval.evaluate.encoder_variables`
                     does for the reported kNN; the checkpoint only holds training's running
                     averages.
  encoder.json       what a user needs to feed it: architecture, the ``model`` config, input
                     size, channels and the mean/std the module standardises with, the
                     feature dimension, and where it came from (method, step, dataset,
                     environment; under ``results`` the kNN and probe accuracies that
                     results.json reports for this step with the run's own config); and
                     ``num_examples``, the training-set size, without which a method that
                     sizes state by it (NPID's memory bank) cannot be rebuilt.
  config.json        the run's whole config, from which `load_encoder` rebuilds the module.

`load_encoder(DIR)` returns ``(module, variables)``; then, in plain Flax,

  embedding = module.apply(variables, images, train=False)   # [B, feature_dim]

with ``images`` float32 ``[B, H, W, C]`` in [0, 1] (uint8 / 255), as the evaluation feeds it;
the module subtracts the mean and divides by the std itself.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any

import flax.serialization
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ssljax.config import config_from_json, config_to_json
from ssljax.eval.results import environment
from ssljax.models import resolve_compute_dtype
from ssljax.train.paths import workdir_path

log = logging.getLogger(__name__)

FORMAT = 1
ENCODER_JSON = "encoder.json"
VARIABLES_FILE = "variables.msgpack"
CONFIG_JSON = "config.json"


class ExportError(ValueError):
  """An export directory that `load_encoder` cannot read, with what to do about it."""


def _evaluated_knn(workdir: str, step: int) -> dict[str, Any]:
  """The kNN (and probe) results.json holds for the run's own config at `step`, or {}."""
  path = workdir_path(workdir) / "results.json"
  if not path.exists():
    return {}
  try:
    record = json.loads(path.read_text(encoding="utf-8"))
  except json.JSONDecodeError:
    return {}
  entries = record.get("evaluations", [record]) if isinstance(record, dict) else []
  for entry in reversed(entries):
    results = entry.get("results", entry)
    if entry.get("options", {}) == {} and results.get("steps") == step:
      return {k: results[k] for k in ("knn/top1", "knn/top5", "knn/protocol",
                                      "linear_probe/top1", "mlp_probe/top1") if k in results}
  return {}


def encoder_spec(config: ml_collections.ConfigDict, module: Any, *, feature_dim: int,
                 step: int, precise_bn_images: int,
                 num_examples: int | None = None) -> dict[str, Any]:
  """The content of encoder.json (see the module docstring)."""
  data = config.data
  return {
      "format": FORMAT,
      "architecture": type(module).__name__,
      "encoder": config.model.encoder,
      "model": config.model.to_dict(),
      "compute_dtype": resolve_compute_dtype(config.train.compute_dtype),
      "feature_dim": feature_dim,
      "input": {
          "image_size": data.image_size, "channels": data.channels,
          "mean": list(data.mean), "std": list(data.std), "layout": "NHWC",
          "scale": "float32 in [0, 1] (uint8 / 255); the module standardises with mean/std",
      },
      "batch_stats": (f"re-estimated on {precise_bn_images} clean train images "
                      "(eval.precise_bn_examples)" if precise_bn_images
                      else "training's running averages"),
      "method": config.method.name, "addons": list(config.method.get("addons", ())),
      "dataset": f"{data.source}:{data.name}", "step": step, "num_examples": num_examples,
      "environment": environment(),
      "files": {"variables": VARIABLES_FILE, "config": CONFIG_JSON},
  }


def export_encoder(workdir: str, out: str,
                   config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
  """Writes the evaluated encoder of `workdir`'s latest checkpoint to `out`.

  Args:
    workdir: a directory written by ``ssljax train``.
    out: the export directory (created; local or a bucket path). Its three files are
      replaced if they exist.
    config: the config to evaluate with (default: the workdir's ``config.json``);
      ``eval.precise_bn_examples`` and ``seed`` decide the BatchNorm statistics.

  Returns:
    The content of encoder.json.

  Raises:
    FileNotFoundError: the workdir has no checkpoint (or its training data is missing: the
      run is rebuilt from it, and precise BN reads it).
    WorkdirError: `out` or `workdir` is a bucket without its filesystem package, or one that
      does not answer (`ssljax.train.paths.check_reachable`).
  """
  # Deferred: the trainer's imports are not needed to load an export.
  from ssljax.eval import evaluate
  from ssljax.train import loop

  workdir_path(out, "--out")  # a bucket without its package, or silent: before any work
  run = loop.restore_latest(workdir, config)
  variables, precise = evaluate.encoder_variables_and_bn_images(
      run.config, run.method, run.state, run.mesh,
      evaluate.bn_images(run.config, run.train_source))
  variables = jax.tree.map(np.asarray, jax.device_get(variables))
  image_shape = (1, *run.train_source.image_shape)
  features = jax.eval_shape(lambda v, x: run.method.encoder.apply(v, x, train=False),
                            variables, jax.ShapeDtypeStruct(image_shape, jnp.float32))
  spec = encoder_spec(run.config, run.method.encoder, feature_dim=int(features.shape[-1]),
                      step=run.step, precise_bn_images=precise,
                      num_examples=len(run.train_source))
  spec["workdir"] = os.fspath(workdir)
  spec["results"] = _evaluated_knn(workdir, run.step)
  if jax.process_index() == 0:
    directory = workdir_path(out, "--out")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / VARIABLES_FILE).write_bytes(flax.serialization.msgpack_serialize(variables))
    (directory / CONFIG_JSON).write_text(config_to_json(run.config), encoding="utf-8")
    (directory / ENCODER_JSON).write_text(json.dumps(spec, indent=2, sort_keys=True),
                                          encoding="utf-8")
    log.info("exported the encoder of %s (step %d, %s) to %s", workdir, run.step,
             spec["batch_stats"], out)
  return spec


def _read(directory: Any, name: str) -> bytes:
  path = directory / name
  if not path.exists():
    raise ExportError(f"{path} not found: {os.fspath(directory)} is not an encoder export "
                      f"(write one with `ssljax export --workdir WORKDIR --out "
                      f"{os.fspath(directory)}`)")
  return path.read_bytes()


def load_encoder(directory: str | os.PathLike) -> tuple[Any, dict[str, Any]]:
  """The Flax module and variables that `export_encoder` wrote to `directory`.

  Needs neither the workdir nor the training data. ``module.apply(variables, images,
  train=False)`` embeds float32 ``[B, H, W, C]`` images in [0, 1] (encoder.json's ``input``).

  Returns:
    ``(module, variables)``: the encoder the evaluation applied (a ``flax.linen.Module``)
    and its variables as numpy arrays.

  Raises:
    ExportError: a file is missing, was written by a newer export format, or the variables
      do not fit the module rebuilt from config.json.
  """
  import ssljax.methods  # noqa: F401  (registers the methods)
  from ssljax.methods import RunInfo, build_method

  path = workdir_path(directory, "the export directory")
  spec = json.loads(_read(path, ENCODER_JSON))
  if spec.get("format", 0) > FORMAT:
    raise ExportError(f"{os.fspath(path / ENCODER_JSON)} has format {spec['format']}; this "
                      f"ssljax reads format {FORMAT} and older: upgrade ssljax")
  config = config_from_json(_read(path, CONFIG_JSON).decode("utf-8"))
  # The dtype the evaluation computed in, as encoder.json records it: config.json may say
  # 'auto', which would resolve on this host's backend instead (float32 on a CPU for an
  # encoder evaluated in bf16 on a GPU).
  if spec.get("compute_dtype"):
    config.train.compute_dtype = spec["compute_dtype"]
  # The training-set size sizes NPID's memory bank, which its builder checks; the encoder
  # itself depends on neither it nor the schedule.
  run = dataclasses.replace(RunInfo.nominal(config), num_examples=spec.get("num_examples"))
  module = build_method(config, run=run).encoder
  if type(module).__name__ != spec["architecture"]:
    raise ExportError(f"config.json builds a {type(module).__name__} but encoder.json names "
                      f"{spec['architecture']}; the export directory mixes two exports")
  variables = flax.serialization.msgpack_restore(_read(path, VARIABLES_FILE))
  image = jax.ShapeDtypeStruct(
      (1, spec["input"]["image_size"], spec["input"]["image_size"],
       spec["input"]["channels"]), jnp.float32)
  expected = jax.eval_shape(lambda x: module.init(jax.random.key(0), x, train=False), image)
  shapes = lambda tree: jax.tree.map(lambda a: tuple(a.shape), tree)
  if shapes(expected) != shapes(variables):
    raise ExportError(f"{os.fspath(path / VARIABLES_FILE)} does not fit the {spec['architecture']} "
                      "that config.json describes (other parameter names or shapes); the "
                      "export directory mixes two exports")
  return module, variables
