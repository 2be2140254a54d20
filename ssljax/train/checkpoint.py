"""Checkpointing: a thin wrapper over orbax's ``CheckpointManager``.

A checkpoint at step ``s`` holds the whole `TrainState` (parameters, optimiser state, method
state, RNG) and a JSON ``meta`` record with the input position (the next global batch the
loader will produce) and the config. Restoring it and running on gives the same batches and
the same keys as an uninterrupted run. Writes are atomic (orbax commits a step directory only
once complete), so an interrupted save never replaces the last good checkpoint.

Kept small on purpose so that moving to orbax's V1 API later is local to this module.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

PyTree = Any


class Checkpointer:
  """Saves and restores ``(state, meta)`` pairs under ``<workdir>/checkpoints``."""

  def __init__(self, workdir: str, *, max_to_keep: int = 2):
    self.directory = os.path.abspath(os.path.join(workdir, "checkpoints"))
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True),
        item_names=("state", "meta"))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: PyTree, meta: dict[str, Any]) -> None:
    """Starts writing the checkpoint of `step` (asynchronously; see `wait`)."""
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, like: PyTree) -> tuple[PyTree, dict[str, Any]]:
    """Restores step `step` into arrays with the shapes, dtypes and shardings of `like`."""
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    return restored["state"], restored["meta"]

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
