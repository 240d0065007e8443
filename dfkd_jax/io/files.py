"""Writing result files whole or not at all.

Every file a run writes for people or for later runs (summary.json, config.json, model.msgpack,
model.json, results tables, condensed sets) goes through `write_atomic`: the data go to a
temporary file next to the target, are flushed to disk, and replace the target in one rename.
A full disk, a read-only folder or a kill mid-write leaves the previous file (or none), never
half of one, and no temporary file behind. In a multi-process run only process 0 writes (the
others' writes are dropped: every process computes the same results).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
from typing import IO, Iterator

from dfkd_jax import parallel


@contextlib.contextmanager
def atomic_open(path: str, mode: str = "w") -> Iterator[IO]:
  """A file object whose contents replace `path` when the block ends without an error.

  `mode` is "w" (text, UTF-8) or "wb". On any error the temporary file is removed and the
  error raised; `path` is untouched.
  """
  if mode not in ("w", "wb"):
    raise ValueError(f"atomic_open writes whole files: mode 'w' or 'wb', not {mode!r}.")
  if not parallel.is_main_process():
    yield io.StringIO() if mode == "w" else io.BytesIO()
    return
  folder = os.path.dirname(os.path.abspath(path))
  tmp = os.path.join(folder, f".{os.path.basename(path)}.tmp{os.getpid()}")
  try:
    with open(tmp, mode, **({"encoding": "utf-8"} if mode == "w" else {})) as f:
      yield f
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_atomic(path: str, data: bytes | str) -> None:
  """Writes `data` (bytes, or text as UTF-8) to `path` whole or not at all."""
  with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)


def write_json(path: str, obj, indent: int | None = 2) -> None:
  """`obj` as JSON at `path`, whole or not at all."""
  write_atomic(path, json.dumps(obj, indent=indent) + "\n")
