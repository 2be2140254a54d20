"""Checkpointing: a thin wrapper over orbax's ``CheckpointManager``, with verified restores.

A checkpoint at step ``s`` holds the whole `TrainState` (parameters, optimiser state, method
state, RNG), a JSON ``meta`` record with the input position (the next global batch the loader
will produce), and a JSON ``checksums`` record: the SHA-256 of every state array's bytes (with
its dtype and shape), taken from the values being saved. Restoring it and running on gives the
same batches and the same keys as an uninterrupted run. Writes are atomic (orbax commits a step
directory only once complete), so an interrupted save never replaces the last good checkpoint.

Restores verify: `restore_latest_intact` reads the newest step, recomputes the checksums of
what it read and, if the step cannot be read or differs from its checksums (a truncated or
overwritten file), moves it to ``<workdir>/checkpoints-damaged/`` with a warning naming it and
tries the next older step; if none is intact it raises `NoIntactCheckpointError`. A state whose
tree or shapes differ from the checkpoint's (another method or model) is not damage: it raises
`CheckpointMismatchError` naming the differing arrays, before any data is read.

Failed saves raise `CheckpointSaveError` naming the step, the directory and the cause (e.g.
"No space left on device"); orbax writes asynchronously, so the error of one save surfaces at
the next `save` or at `wait`. Earlier checkpoints are left as they were. orbax's writer threads
of a failed save may then wait for its coordination timeout (20 minutes) before the
interpreter can exit, which is why ``ssljax train`` ends the process itself after reporting.

The workdir may be a bucket (``gs://bucket/run``): paths are `etils.epath` paths
(`ssljax.train.paths`), which orbax writes to directly; only local workdirs are made absolute.
On multi-host runs every process calls `save` and `restore` (orbax writes each array once,
from the process that holds it, and process 0 commits the step).

Kept small on purpose so that moving to orbax's V1 API later is local to this module.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ssljax.train.paths import is_local, workdir_path

PyTree = Any
log = logging.getLogger(__name__)


class CheckpointSaveError(RuntimeError):
  """A checkpoint could not be written; the earlier checkpoints are unchanged."""


class CheckpointMismatchError(ValueError):
  """The checkpoint's state has another tree structure or other shapes than the config's."""


class NoIntactCheckpointError(RuntimeError):
  """Every checkpoint of the workdir is unreadable or differs from its checksums."""


class _DamagedCheckpoint(Exception):
  pass


def _host_value(x: jax.Array) -> np.ndarray | None:
  if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  if getattr(x, "is_fully_addressable", True):
    return np.asarray(jax.device_get(x))
  if x.is_fully_replicated:
    return np.asarray(x.addressable_data(0))
  return None  # sharded across hosts: no host holds the whole array


def state_checksums(state: PyTree) -> dict[str, str]:
  """``{path: "sha256:<hex> <dtype> <shape>"}`` of every array leaf of `state`."""
  sums = {}
  for path, leaf in jax.tree_util.tree_leaves_with_path(state):
    value = _host_value(leaf)
    if value is None:
      continue
    digest = hashlib.sha256(np.ascontiguousarray(value).tobytes()).hexdigest()
    sums[_path_name(path)] = f"sha256:{digest} {value.dtype} {list(value.shape)}"
  return sums


def _path_name(path: tuple[Any, ...]) -> str:
  """``params/encoder/conv/kernel`` for a pytree path of dict keys, attributes or indices."""
  return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def _cause(error: BaseException) -> str:
  """The innermost OSError of `error`'s chain (the disk's own words), else `error` itself."""
  seen, chain = set(), []
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    chain.append(error)
    error = error.__cause__ or error.__context__
  found = next((e for e in reversed(chain) if isinstance(e, OSError)), chain[0])
  text = str(found).strip().splitlines()[0] if str(found).strip() else ""
  return f"{type(found).__name__}: {text[:300]}"


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2):
    root = workdir_path(workdir)  # absolute if local; gs:// reaches orbax as it is
    self.directory = root / "checkpoints"
    self.damaged_directory = root / "checkpoints-damaged"
    self._pending: int | None = None
    self._failed: CheckpointSaveError | None = None
    try:
      self._manager = ocp.CheckpointManager(
          self.directory,
          options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
          item_handlers={"state": ocp.StandardCheckpointHandler(),
                         "meta": ocp.JsonCheckpointHandler(),
                         "checksums": ocp.JsonCheckpointHandler()})
    except (OSError, ValueError) as e:
      raise CheckpointSaveError(f"cannot use {self.directory} for checkpoints: {_cause(e)}. "
                                f"Make it a writable directory (or choose another --workdir)."
                                ) from e

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def _committed_steps(self) -> list[int]:
    names = [p.name for p in self.directory.iterdir()] if self.directory.is_dir() else []
    return sorted(int(n) for n in names if n.isdigit())

  def _save_failed(self, step: int | None, error: BaseException) -> CheckpointSaveError:
    kept = [s for s in self._committed_steps() if s != step]
    where = f"the latest complete one is step {kept[-1]}" if kept else "none was completed"
    try:  # TensorStore reports a full disk as RESOURCE_EXHAUSTED, without ENOSPC's words
      free = (f" ({shutil.disk_usage(os.fspath(self.directory)).free / 2**20:.1f} MiB free "
              f"there)" if is_local(self.directory) else "")
    except OSError:
      free = ""
    self._failed = CheckpointSaveError(
        f"the checkpoint of step {step} could not be written to {self.directory}{free}: "
        f"{_cause(error)}. Training stopped; earlier checkpoints are kept ({where}). Free disk "
        f"space or make the directory writable, then rerun the same command to resume.")
    return self._failed

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Starts writing the checkpoint of `step` (asynchronously; see `wait`).

    Raises:
      CheckpointSaveError: this save or the previous, still asynchronous one failed.
    """
    if self._failed is not None:
      raise self._failed
    self.wait()  # orbax would wait for the previous save here too; its error names its step
    checksums = state_checksums(state)
    try:
      self._manager.save(step, args=ocp.args.Composite(
          state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
          checksums=ocp.args.JsonSave(checksums)), force=True)
    except Exception as e:
      raise self._save_failed(step, e) from e
    self._pending = step

  def _abstract(self, like: PyTree) -> PyTree:
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)

  def check_structure(self, step: int, like: PyTree) -> None:
    """Raises `CheckpointMismatchError` if step `step` holds another tree or other shapes.

    An unreadable metadata file is reported as damage (`_DamagedCheckpoint`).
    """
    try:
      stored = self._manager.item_metadata(step)["state"]
      stored_tree = stored.tree if hasattr(stored, "tree") else stored
      stored_leaves = {_path_name(p): tuple(m.shape) for p, m in
                       jax.tree_util.tree_leaves_with_path(stored_tree)}
    except Exception as e:
      raise _DamagedCheckpoint(f"its metadata cannot be read ({_cause(e)})") from e
    wanted = {_path_name(p): tuple(x.shape)
              for p, x in jax.tree_util.tree_leaves_with_path(like)}
    differing = sorted(set(stored_leaves) ^ set(wanted))
    differing += sorted(k for k in set(stored_leaves) & set(wanted)
                        if stored_leaves[k] != wanted[k])
    if differing:
      shown = [f"{k}: {stored_leaves.get(k, 'absent')} in the checkpoint, "
               f"{wanted.get(k, 'absent')} in this config" for k in differing[:6]]
      more = f" (and {len(differing) - 6} more)" if len(differing) > 6 else ""
      raise CheckpointMismatchError(
          f"the checkpoint of step {step} in {self.directory} holds another train state than "
          f"this config builds; {len(differing)} arrays differ{more}:\n  " + "\n  ".join(shown)
          + "\nResume with the config the workdir was trained with, or use a new --workdir.")

  def restore(self, step: int, like: PyTree, *, verify: bool = True
              ) -> tuple[PyTree, dict[str, Any]]:
    """Restores step `step` into arrays with the shapes, dtypes and shardings of `like`.

    Raises:
      CheckpointMismatchError: the checkpoint holds another tree or other shapes.
      _DamagedCheckpoint: the step cannot be read, or (with `verify`) what was read differs
        from the checksums written with it.
    """
    self.check_structure(step, like)
    has_sums = (self.directory / str(step) / "checksums").is_dir()
    args = dict(state=ocp.args.StandardRestore(self._abstract(like)),
                meta=ocp.args.JsonRestore())
    if has_sums:
      args["checksums"] = ocp.args.JsonRestore()
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**args))
    except Exception as e:
      raise _DamagedCheckpoint(f"it cannot be read ({_cause(e)})") from e
    if verify:
      if not has_sums:
        log.warning("checkpoint step %d has no checksums (written before they were "
                    "added); restored unverified", step)
      else:
        stored, actual = restored["checksums"], state_checksums(restored["state"])
        bad = sorted(k for k in set(stored) | set(actual) if stored.get(k) != actual.get(k))
        if bad:
          raise _DamagedCheckpoint(f"{len(bad)} of {len(stored)} arrays differ from the "
                                   f"checksums written with it (first: {bad[0]})")
    return restored["state"], restored["meta"]

  def restore_latest_intact(self, like: PyTree
                            ) -> tuple[int, PyTree, dict[str, Any]] | None:
    """The newest intact step and its ``(state, meta)``; None if there is no checkpoint.

    Damaged steps newer than it are moved to ``checkpoints-damaged/`` (so that training on
    can write those steps again), each with a warning naming it and what is wrong.

    Raises:
      CheckpointMismatchError: the newest checkpoint holds another tree or other shapes.
      NoIntactCheckpointError: checkpoints exist but none is intact.
    """
    steps = sorted(self._manager.all_steps(), reverse=True)
    if not steps:
      return None
    damaged = []
    for step in steps:
      try:
        state, meta = self.restore(step, like)
      except _DamagedCheckpoint as e:
        damaged.append(f"step {step}: {e}")
        log.warning("checkpoint step %d in %s is damaged: %s; moving it to %s and trying "
                    "the previous one", step, self.directory, e, self.damaged_directory)
        self._move_damaged(step)
        continue
      if damaged:
        log.warning("resuming from checkpoint step %d, the newest intact one (damaged: %s)",
                    step, "; ".join(damaged))
      return step, state, meta
    raise NoIntactCheckpointError(
        f"no intact checkpoint in {self.directory}; every step is damaged (moved to "
        f"{self.damaged_directory}):\n  " + "\n  ".join(damaged) + "\nTraining cannot resume; "
        "start again in a new --workdir (or restore the checkpoints from a backup).")

  def _move_damaged(self, step: int) -> None:
    if jax.process_index() == 0:
      self.damaged_directory.mkdir(parents=True, exist_ok=True)
      target = self.damaged_directory / str(step)
      suffix = 1
      while target.exists():
        target = self.damaged_directory / f"{step}.{suffix}"
        suffix += 1
      (self.directory / str(step)).rename(target)
    if jax.process_count() > 1:  # the others reload only after process 0 has moved it
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices(f"ssljax_move_damaged_{step}")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until the pending save is written.

    Raises:
      CheckpointSaveError: it failed (once; later calls return at once).
    """
    if self._failed is not None:
      return
    try:  # orbax re-raises the writer thread's error as it was
      self._manager.wait_until_finished()
    except Exception as e:
      raise self._save_failed(self._pending, e) from e

  def reached_preemption(self, step: int) -> bool:
    """Whether every host has agreed to stop at `step` (orbax's preemption sync point).

    Only meaningful on multi-host runs started with ``jax.distributed.initialize``, where JAX
    turns SIGTERM into a notice that all hosts see at the same step.
    """
    return self._manager.reached_preemption(step)

  def close(self) -> None:
    if self._failed is not None:
      return
    self.wait()
    self._manager.close()
