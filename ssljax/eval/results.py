"""``results.json``: every evaluation of a workdir, each with the options that produced it.

``ssljax train`` and ``ssljax eval`` each add one evaluation; earlier ones are kept. The file
holds (format 2):

  format        2.
  evaluations   one entry per evaluation, oldest first:
                  options      the config keys the evaluation changed from the workdir's
                               ``config.json``, flat (``{'eval.knn_k': 20}``); ``{}`` for the
                               run's own config (what ``ssljax train`` evaluates with); null
                               when unknown (``config.json`` was missing or unreadable).
                  results      what it measured (``knn/top1``, ``linear_probe/top1``,
                               ``steps``, ...), as `ssljax.eval.evaluate.evaluate_state` and
                               the trainer return them.
                  run          method, dataset, encoder, batch size and seed it evaluated.
                  environment  where it ran: ssljax version and git commit (when ssljax runs
                               from a git checkout), Python, jax, jaxlib and flax versions,
                               platform, device kind and count, process count, host.
                  date         when it was written (UTC, ISO 8601).
                An evaluation with the same (known) options of the same checkpoint step
                replaces the earlier one; any other is appended, so one with unknown options
                never replaces the run's own.
  headline      the top-level keys repeat one evaluation flat, as files before format 2 held
                their only one (``results['knn/top1']`` keeps working): the latest with
                ``options == {}``, or the latest of all when none has. Its own keys are those
                of ``results`` and ``run``, plus ``devices`` ("8 x cpu"), ``host``, ``date``,
                ``options`` and ``environment``.

A file written before format 2 (flat, without ``evaluations``) becomes the first entry, with
``options == {}`` (the trainer wrote it with the run's config) and ``"legacy": True``.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess
from typing import Any

import jax
import ml_collections

from ssljax.config import config_from_json, config_to_json

FORMAT = 2
RUN_KEYS = ("method", "dataset", "encoder", "batch_size", "seed")


def flat_config(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``{'eval.knn_k': 200, ...}``: every leaf of `config` by its dotted key, JSON values."""
  flat: dict[str, Any] = {}

  def visit(prefix: str, node: Any) -> None:
    if isinstance(node, dict):
      for key, value in node.items():
        visit(f"{prefix}{key}.", value)
    else:
      flat[prefix[:-1]] = node

  visit("", json.loads(config_to_json(config)))
  return flat


def changed_options(config: ml_collections.ConfigDict,
                    reference: ml_collections.ConfigDict | None) -> dict[str, Any] | None:
  """The keys of `config` whose values differ from `reference`; None (unknown) without one.

  A key only one of the two has (another method's section) counts as changed, with None
  for a key `config` lacks.
  """
  if reference is None:
    return None
  ours, theirs = flat_config(config), flat_config(reference)
  return {key: ours.get(key) for key in sorted(set(ours) | set(theirs))
          if ours.get(key) != theirs.get(key) or (key in ours) != (key in theirs)}


def _git(directory: str, *args: str) -> str | None:
  try:
    done = subprocess.run(["git", "-C", directory, *args], capture_output=True, text=True,
                          timeout=10, check=False)
  except (OSError, subprocess.SubprocessError):
    return None
  return done.stdout.strip() if done.returncode == 0 else None


def git_commit() -> dict[str, Any]:
  """``{'git_commit': sha, 'git_dirty': bool}`` of the checkout ssljax is imported from.

  Empty when the package is not a tracked part of a git work tree (a pip-installed copy,
  even one inside a repository's virtualenv) or git is unavailable.
  """
  package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  if _git(package, "ls-files", "--error-unmatch", "__init__.py") is None:
    return {}
  commit = _git(package, "rev-parse", "HEAD")
  if not commit:
    return {}
  status = _git(package, "status", "--porcelain", "--untracked-files=no")
  return {"git_commit": commit, "git_dirty": bool(status)}


def _version(distribution: str) -> str | None:
  try:
    return importlib.metadata.version(distribution)
  except importlib.metadata.PackageNotFoundError:
    return None


def environment() -> dict[str, Any]:
  """Software and hardware of this process: what a result needs to be reproduced."""
  device = jax.devices()[0]
  return {
      "ssljax_version": _version("ssljax"), **git_commit(),
      "python": platform.python_version(), "jax": jax.__version__,
      "jaxlib": _version("jaxlib"), "flax": _version("flax"),
      "platform": device.platform, "device_kind": device.device_kind,
      "device_count": jax.device_count(), "process_count": jax.process_count(),
      "host": platform.node(),
  }


def evaluation_entry(config: ml_collections.ConfigDict, results: dict[str, Any],
                     options: dict[str, Any] | None) -> dict[str, Any]:
  """One entry of ``evaluations``: `results` with the run, options, environment and date."""
  return {
      "options": options,
      "results": dict(results),
      "run": {"method": config.method.name,
              "dataset": f"{config.data.source}:{config.data.name}",
              "encoder": config.model.encoder, "batch_size": config.train.batch_size,
              "seed": config.seed},
      "environment": environment(),
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
  }


def _from_legacy(record: dict[str, Any]) -> dict[str, Any]:
  """A results.json written before format 2 as one ``evaluations`` entry."""
  context = set(RUN_KEYS) | {"devices", "host", "date"}
  return {"options": {}, "legacy": True,
          "results": {k: v for k, v in record.items() if k not in context},
          "run": {k: record[k] for k in RUN_KEYS if k in record},
          "environment": {k: record[k] for k in ("devices", "host") if k in record},
          "date": record.get("date")}


def _same_evaluation(a: dict[str, Any], b: dict[str, Any]) -> bool:
  """Whether `b` replaces `a`: the same known options at the same step."""
  return (a["options"] is not None and a["options"] == b["options"]
          and a["results"].get("steps") == b["results"].get("steps"))


_JSON_TYPES = {list: "an array", str: "a string", int: "a number", float: "a number",
               bool: "true or false", type(None): "null"}


def problem(record: Any) -> str | None:
  """Why `record`, a results.json's parsed JSON, cannot be merged into; None when it can.

  A file before format 2 can be any object; from format 2 on, ``evaluations`` is a list of
  objects with ``options`` (an object or null), ``results`` and ``run`` (objects).
  """
  if not isinstance(record, dict):
    return f"holds {_JSON_TYPES.get(type(record), 'a value')}, not a JSON object"
  if "evaluations" not in record:
    return None
  if not isinstance(record["evaluations"], list):
    return "has an 'evaluations' that is not a list"
  for i, entry in enumerate(record["evaluations"]):
    if not isinstance(entry, dict):
      return f"has an evaluations[{i}] that is not an object"
    missing = [key for key in ("options", "results", "run") if key not in entry]
    if missing:
      return f"has an evaluations[{i}] without {', '.join(repr(k) for k in missing)}"
    if not (isinstance(entry["results"], dict) and isinstance(entry["run"], dict)
            and isinstance(entry["options"], (dict, type(None)))
            and isinstance(entry.get("environment", {}), dict)):
      return (f"has an evaluations[{i}] whose options, results, run or environment is not "
              f"an object")
  return None


def merge(previous: dict[str, Any] | None, entry: dict[str, Any]) -> dict[str, Any]:
  """The results.json record after adding `entry` to `previous` (the file's JSON; None or
  ``{}`` when there is none yet).

  Raises:
    ValueError: `previous` is not a results record (`problem` says why); the caller sets the
      file aside instead of dropping it.
  """
  if previous is not None and problem(previous) is not None:
    raise ValueError(f"results.json {problem(previous)}")
  if not previous:
    evaluations = []
  elif "evaluations" in previous:
    evaluations = list(previous["evaluations"])
  else:
    evaluations = [_from_legacy(previous)]
  evaluations = [e for e in evaluations if not _same_evaluation(e, entry)] + [entry]
  own = [e for e in evaluations if e["options"] == {}]
  headline = (own or evaluations)[-1]
  environment_ = headline.get("environment", {})
  devices = (f"{environment_['device_count']} x {environment_['device_kind']}"
             if "device_count" in environment_ else environment_.get("devices"))
  return {**headline["results"], **headline["run"], "devices": devices,
          "host": environment_.get("host"), "date": headline.get("date"),
          "options": headline["options"], "environment": environment_,
          "format": FORMAT, "evaluations": evaluations}


def read_reference_config(text: str | None) -> ml_collections.ConfigDict | None:
  """The workdir's config from the text of its ``config.json`` (None if absent/unreadable)."""
  if text is None:
    return None
  try:
    return config_from_json(text)
  except (KeyError, ValueError, TypeError):
    return None


def dumps(record: dict[str, Any]) -> str:
  """The JSON text of a results record (keys sorted, indented)."""
  return json.dumps(record, indent=2, sort_keys=True, default=_json_default)


def _json_default(value: Any) -> Any:
  if hasattr(value, "tolist"):  # numpy / jax scalars and arrays
    return value.tolist()
  raise TypeError(f"results.json cannot store a {type(value).__name__}: {value!r}")
