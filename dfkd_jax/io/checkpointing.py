"""Thin wrapper over Orbax `CheckpointManager` (the only module that imports Orbax).

A checkpoint holds the whole train state (a pytree) plus a small JSON item (`meta`: the
accuracy series, timings, the resolved config) so a resumed run ends exactly like an
uninterrupted one.
"""
from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored; the message names it and the way out."""


class Checkpointer:
  """Saves and restores `(state, meta)` pairs under `directory/<step>`."""

  def __init__(self, directory: str, max_to_keep: int = 2):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, create=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._mngr.all_steps())

  def latest_step(self) -> int | None:
    return self._mngr.latest_step()

  def save(self, step: int, state: Any, meta: dict) -> None:
    """Saves asynchronously; call `wait()` before reading the files or exiting."""
    self._mngr.save(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, target: Any, step: int | None = None) -> tuple[Any, dict]:
    """Restores the state at `step` (latest by default) into the structure of `target`.

    `target` is a state with the same tree structure, shapes and shardings (e.g. the freshly
    initialised state). Raises CheckpointError if the checkpoint is unreadable.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"No checkpoint in {self.directory}.")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax raises many types for damaged files.
      earlier = [s for s in self.all_steps() if s < step]
      way_out = (f"Earlier checkpoints are intact at steps {earlier}: delete "
                 f"{os.path.join(self.directory, str(step))} to resume from step {earlier[-1]}."
                 if earlier else "No earlier checkpoint exists: delete the folder to start over.")
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"Checkpoint at step {step} in {self.directory} is corrupt or incompatible with this "
          f"config ({type(e).__name__}: {first_line[:300]}). {way_out}") from e
    return restored["state"], dict(restored["meta"])

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
