"""Config checks that run before a training run writes anything to its workdir.

`validate_config` refuses values that are meaningless or dangerous (a negative or NaN learning
rate, an empty batch, a zero logging or checkpoint interval, keeping zero checkpoints), naming
every offending key and the fix in one message. `check_resume_compatible` compares the config
of a resumed run with the ``config.json`` stored in its workdir: the method, the shapes of the
model and heads and the optimiser must match (the checkpoint's state was built from them), and
a changed global batch, which changes what the learning rate (linear scaling) and an epoch
mean, needs ``train.allow_batch_size_change=True``.
"""

from __future__ import annotations

import math
import re
from typing import Any

import ml_collections


class ConfigError(ValueError):
  """A config that cannot run, or cannot resume the checkpoint of its workdir."""


# Keys whose value fixes the structure or shapes of the train state.
RESUME_KEYS = ("method.name", "method.addons", "model.encoder", "model.width",
               "model.cifar_stem", "model.expand_features", "model.output_bn",
               "data.image_size", "data.channels", "optim.name")
# Keys of a method's or add-on's section that size its heads, queues or banks.
_SHAPE_KEY = re.compile(r"(_dim|_size|_layers|_bias|_bn|^num_prototypes)$")


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for part in key.split("."):
    if not hasattr(node, "keys") or part not in node:
      return None
    node = node[part]
  return node


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises `ConfigError` listing every key whose value cannot give a meaningful run.

  Checked: ``optim.lr``, ``optim.weight_decay``, ``optim.grad_clip_norm``,
  ``optim.grad_clip_value``, ``optim.warmup_epochs`` finite and >= 0; ``optim.base_batch_size``,
  ``train.batch_size``, ``train.log_every_steps``, ``train.checkpoint_every_steps``,
  ``train.keep_checkpoints`` and ``eval.batch_size`` integers >= 1; ``train.num_steps`` and
  ``train.eval_every_steps`` integers >= 0; ``train.epochs`` finite and > 0 when
  ``train.num_steps`` is 0; ``data.image_size`` and ``augment.crop_size`` integers >= 1,
  ``data.channels`` 1 or 3, ``data.num_classes`` an integer >= 0 (0 is left only by the image
  folder preset: `ssljax.data.folder.resolve_config` fills these in first); ``data.mean`` and
  ``data.std`` one value per channel (``data.channels``), the standard deviations finite and
  > 0; with ``eval.linear_eval``, the ``eval.linear_eval_*`` settings
  (`ssljax.eval.linear_eval.LinearEvalSettings.check`), so that a typo fails before pretraining
  rather than after it.
  """
  problems = []

  def non_negative(key: str, meaning: str, example: str) -> None:
    value = _get(config, key)
    if not _is_number(value) or not math.isfinite(value) or value < 0:
      problems.append(f"{key} = {value!r} must be a finite number >= 0 ({meaning}); "
                      f"e.g. --config.{key}={example}")

  def count(key: str, meaning: str, example: str, minimum: int = 1) -> None:
    value = _get(config, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
      problems.append(f"{key} = {value!r} must be an integer >= {minimum} ({meaning}); "
                      f"e.g. --config.{key}={example}")

  non_negative("optim.lr", "the peak learning rate before batch scaling", "0.3")
  non_negative("optim.weight_decay", "0 disables weight decay", "1e-6")
  non_negative("optim.grad_clip_norm", "0 disables clipping", "1.0")
  non_negative("optim.grad_clip_value", "0 disables clipping", "0")
  non_negative("optim.warmup_epochs", "epochs of linear warmup", "1.0")
  count("optim.base_batch_size", "the batch at which optim.lr applies", "256")
  count("train.batch_size", "global images per step", "256")
  count("train.log_every_steps", "steps between logged metrics", "50")
  count("train.checkpoint_every_steps", "steps between checkpoints", "500")
  count("train.keep_checkpoints", "checkpoints kept on disk; 0 would delete every one", "2")
  count("train.num_steps", "0 means train.epochs decides the length", "0", minimum=0)
  count("train.eval_every_steps", "0 disables the periodic kNN monitor", "0", minimum=0)
  count("eval.batch_size", "images per feature-extraction batch", "1024")
  if _get(config, "train.num_steps") == 0:
    epochs = _get(config, "train.epochs")
    if not _is_number(epochs) or not math.isfinite(epochs) or epochs <= 0:
      problems.append(f"train.epochs = {epochs!r} must be a finite number > 0 when "
                      f"train.num_steps is 0; e.g. --config.train.epochs=10")
  count("data.image_size", "the square size images are delivered at; 0 means 'from the "
        "folder' only with data.source='image_folder'", "28")
  count("data.num_classes", "0: unlabelled data", "10", minimum=0)
  count("augment.crop_size", "the views' resolution; 0 means data.image_size", "28")
  channels = _get(config, "data.channels")
  if channels not in (1, 3) or isinstance(channels, bool):
    problems.append(f"data.channels = {channels!r} must be 1 (grayscale) or 3 (RGB); 0 means "
                    f"'from the folder' only with data.source='image_folder'; e.g. "
                    f"--config.data.channels=3")
  for key in ("data.mean", "data.std"):
    value = _get(config, key)
    values = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if len(values) != channels or not all(_is_number(v) and math.isfinite(v) for v in values):
      problems.append(f"{key} = {value!r} needs one finite number per channel (data.channels "
                      f"= {channels!r}); e.g. --config.{key}=\"{(0.5,) * 3!r}\" for RGB")
    elif key == "data.std" and min(values) <= 0:
      problems.append(f"data.std = {value!r} must be > 0 for every channel (images are "
                      f"divided by it)")
  if _get(config, "eval.linear_eval"):
    from ssljax.eval.linear_eval import LinearEvalSettings  # deferred: imports jax
    try:  # the device count is checked again on the run's mesh
      LinearEvalSettings.from_config(config.eval).check(num_devices=1)
    except (ValueError, TypeError, AttributeError) as e:
      problems.append(str(e))
  if problems:
    raise ConfigError("invalid config (nothing was written):\n  " + "\n  ".join(problems))


def _resume_keys(config: ml_collections.ConfigDict) -> list[str]:
  keys = list(RESUME_KEYS)
  for section in config.method.keys():
    if isinstance(config.method[section], ml_collections.ConfigDict):
      keys += [f"method.{section}.{k}" for k in config.method[section].keys()
               if _SHAPE_KEY.search(k)]
  return keys


def check_resume_compatible(stored: ml_collections.ConfigDict,
                            config: ml_collections.ConfigDict, workdir: str) -> None:
  """Raises `ConfigError` naming every key in which `config` cannot resume `stored`'s state.

  The keys compared are `RESUME_KEYS` and the shape keys (``*_dim``, ``*_size``, ``*_layers``,
  ``*_bias``, ``*_bn``, ``num_prototypes``) of both configs' method and add-on sections;
  ``train.batch_size`` must also match unless ``train.allow_batch_size_change`` is True.
  """
  keys = sorted(set(_resume_keys(stored)) | set(_resume_keys(config)))
  differing = [(k, _get(stored, k), _get(config, k)) for k in keys
               if _get(stored, k) != _get(config, k)]
  lines = [f"{k}: {old!r} in the checkpoint, {new!r} now" for k, old, new in differing]
  if differing:
    raise ConfigError(
        f"{workdir} holds a checkpoint of another model or method, so this config cannot "
        f"resume it (nothing was written):\n  " + "\n  ".join(lines) + "\nUse a new --workdir, "
        f"or the stored values (they are in {workdir}/config.json).")
  old_batch, new_batch = stored.train.batch_size, config.train.batch_size
  if old_batch != new_batch and not config.train.get("allow_batch_size_change", False):
    raise ConfigError(
        f"train.batch_size: {old_batch} in the checkpoint of {workdir}, {new_batch} now. A new "
        f"batch changes the learning rate (optim.lr scales with it) and the length of an "
        f"epoch; to resume with it anyway pass --config.train.allow_batch_size_change=True, "
        f"else --config.train.batch_size={old_batch} (nothing was written).")
