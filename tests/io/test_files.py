"""Result files are written whole or not at all (dfkd_jax.io.files)."""
import errno
import json
import os

import pytest

from dfkd_jax.io import files


def test_write_atomic_replaces_the_file_and_leaves_no_temporary(tmp_path):
  path = tmp_path / "summary.json"
  files.write_json(str(path), {"a": 1})
  files.write_json(str(path), {"a": 2})
  assert json.load(open(path)) == {"a": 2}
  files.write_atomic(str(tmp_path / "w.bin"), b"\x00\x01")
  assert (tmp_path / "w.bin").read_bytes() == b"\x00\x01"
  assert sorted(os.listdir(tmp_path)) == ["summary.json", "w.bin"]


def test_a_failed_write_keeps_the_old_file_whole(tmp_path, monkeypatch):
  """A full disk at fsync (where ENOSPC surfaces for buffered writes): the old contents stay,
  the temporary file is gone, the error is raised for the caller to report."""
  path = tmp_path / "model.json"
  files.write_json(str(path), {"good": True})

  def full(fd):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "fsync", full)
  with pytest.raises(OSError, match="No space left"):
    files.write_json(str(path), {"good": False, "pad": "x" * 100000})
  assert json.load(open(path)) == {"good": True}
  assert os.listdir(tmp_path) == ["model.json"]


def test_an_error_inside_the_block_writes_nothing(tmp_path):
  path = tmp_path / "set.npz"
  with pytest.raises(RuntimeError):
    with files.atomic_open(str(path), "wb") as f:
      f.write(b"half")
      raise RuntimeError("killed mid-write")
  assert not os.listdir(tmp_path)
  with pytest.raises(ValueError, match="whole files"):
    with files.atomic_open(str(path), "a"):
      pass
