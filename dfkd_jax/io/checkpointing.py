"""Thin wrapper over Orbax `CheckpointManager` (the only module that imports Orbax).

A checkpoint holds the whole train state (a pytree) plus a small JSON item (`meta`: the
accuracy series, timings, the resolved config) so a resumed run ends exactly like an
uninterrupted one. `meta["state_sha256"]` is a content checksum of the state's arrays, taken
before the save and verified after every restore: a damaged file (a flipped byte in array data,
which Orbax itself does not notice) is an error, never a silently different run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from dfkd_jax import parallel


class CheckpointError(RuntimeError):
  """A checkpoint could not be restored; the message names it and the way out."""


class CorruptCheckpointError(CheckpointError):
  """The arrays of the checkpoint at `step` fail their checksum (earlier ones may be intact)."""

  def __init__(self, message: str, step: int):
    super().__init__(message)
    self.step = step


def tree_sha256(tree: Any) -> str:
  """sha256 over every array leaf of `tree` (dtype, shape and bytes, in leaf order); PRNG keys
  by their key data. The arrays are copied to the host; an array sharded over several
  processes is gathered first (a collective: every process must call this, as they all save)."""
  h = hashlib.sha256()

  def raw(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.ascontiguousarray(parallel.to_host(x))

  for leaf in jax.tree.leaves(tree):
    a = raw(leaf)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(memoryview(a).cast("B"))  # no copy
  return h.hexdigest()


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
    """Saves asynchronously (call `wait()` before reading the files or exiting); `meta` gains
    the state's checksum, `state_sha256`."""
    # A deep copy now: the save is asynchronous and the caller's lists grow afterwards.
    meta = json.loads(json.dumps({**meta, "state_sha256": tree_sha256(state)}))
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
    except (MemoryError, PermissionError) as e:  # not the checkpoint's fault
      raise CheckpointError(f"Could not restore the checkpoint at step {step} in "
                            f"{self.directory}: {type(e).__name__}: {e}") from e
    except Exception as e:  # Orbax raises many types for damaged files and other structures.
      first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
      raise CheckpointError(
          f"Checkpoint at step {step} in {self.directory} is unreadable or does not fit this "
          f"run's state ({type(e).__name__}: {first_line[:300]}); it was written by another "
          "config or another version of dfkd_jax, or it is damaged. Resume with the run's own "
          f"config, or use a new --workdir. {self._way_out(step)}") from e
    meta = dict(restored["meta"])
    saved = meta.get("state_sha256")  # absent in checkpoints of earlier versions
    if saved is not None and tree_sha256(restored["state"]) != saved:
      raise CorruptCheckpointError(
          f"Checkpoint at step {step} in {self.directory} is damaged: its arrays do not match "
          f"the checksum written with them. {self._way_out(step)}", step=step)
    return restored["state"], meta

  def _way_out(self, step: int) -> str:
    earlier = [s for s in self.all_steps() if s < step]
    if earlier:
      return (f"Earlier checkpoints exist at steps {earlier}: delete "
              f"{os.path.join(self.directory, str(step))} to resume from step {earlier[-1]}.")
    return "No earlier checkpoint exists: delete the folder to start over."

  def read_meta(self, step: int | None = None) -> dict:
    """The JSON item of the checkpoint at `step` (latest by default), without its arrays; {}
    if it cannot be read (the restore of the whole checkpoint then says why)."""
    step = self.latest_step() if step is None else step
    try:
      restored = self._mngr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
      return dict(restored["meta"])
    except Exception:  # pylint: disable=broad-except
      return {}

  def quarantine(self, step: int) -> str:
    """Moves the checkpoint at `step` out of the way, to `<directory>.damaged/<step>` (kept for
    inspection); returns where it went."""
    dest_root = self.directory + ".damaged"
    dest = os.path.join(dest_root, str(step))
    if parallel.is_main_process():  # one process moves it; the others wait for the move
      os.makedirs(dest_root, exist_ok=True)
      if os.path.exists(dest):
        shutil.rmtree(dest)
      shutil.move(os.path.join(self.directory, str(step)), dest)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"dfkd_quarantine_{step}")
    self._mngr.reload()
    return dest

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
