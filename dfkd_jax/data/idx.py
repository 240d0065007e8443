"""Reading and validating IDX files (the MNIST / Fashion-MNIST format), gzip-compressed or raw."""
from __future__ import annotations

import gzip
import os
import struct

import numpy as np

IMAGES_MAGIC = 2051
LABELS_MAGIC = 2049


class IDXError(ValueError):
  """A file is not a valid IDX file of the expected kind."""


def read_bytes(path: str) -> bytes:
  """Returns the decompressed bytes of `path` (gzip detected by its magic bytes)."""
  with open(path, "rb") as f:
    raw = f.read()
  if raw[:2] == b"\x1f\x8b":
    try:
      return gzip.decompress(raw)
    except (OSError, EOFError, gzip.BadGzipFile) as e:
      raise IDXError(f"{path}: corrupt or truncated gzip stream ({e}). Re-install or re-download "
                     "the file.") from e
  return raw


def parse(path: str, kind: str) -> np.ndarray:
  """Parses an IDX file of `kind` ('images' -> uint8 [N, H, W], 'labels' -> uint8 [N]).

  Raises:
    IDXError: wrong magic number, wrong rank, or fewer bytes than the header promises.
  """
  data = read_bytes(path)
  if len(data) < 8:
    raise IDXError(f"{path}: too short to be an IDX file ({len(data)} bytes).")
  magic = struct.unpack(">I", data[:4])[0]
  expected = IMAGES_MAGIC if kind == "images" else LABELS_MAGIC
  if magic != expected:
    raise IDXError(f"{path}: bad magic number {magic} (expected {expected} for an IDX {kind} "
                   "file). Is this the right file?")
  ndim = 3 if kind == "images" else 1
  header = 4 + 4 * ndim
  if len(data) < header:
    raise IDXError(f"{path}: truncated header.")
  dims = struct.unpack(">" + "I" * ndim, data[4:header])
  count = int(np.prod(dims))
  if len(data) - header < count:
    raise IDXError(f"{path}: truncated: header promises {dims} = {count} bytes of data, file "
                   f"has {len(data) - header}.")
  if len(data) - header > count:
    raise IDXError(f"{path}: {len(data) - header - count} unexpected trailing bytes.")
  return np.frombuffer(data, np.uint8, count, header).reshape(dims)


def find(folder: str, stem: str) -> str:
  """Path of `stem` or `stem.gz` in `folder`, or raises FileNotFoundError naming both."""
  for name in (stem + ".gz", stem):
    p = os.path.join(folder, name)
    if os.path.isfile(p):
      return p
  raise FileNotFoundError(f"{folder}: missing {stem}.gz (or {stem}).")
