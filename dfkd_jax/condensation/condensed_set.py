"""The condensed-set file: one `.npz` with the images, their labels and a JSON `meta` record.

A condensed set D_c (docs/methods.md §8) is either the output of Distribution Matching (§9,
`python -m dfkd_jax.condensation.condense --kind dm`) or k real training images per class (the
few-shot variant, `--kind fewshot`). Either way it is stored in the teacher's *normalised* input space:
the same normalisation and padding as `dfkd_jax.data.datasets.load_split(..., pad_to=...)`
returns, so the images can be fed to the teacher as they are.

File layout (`numpy.savez`, no pickles):
  images: float32 [N, H, W, C], normalised;
  labels: int32 [N], in [0, num_classes);
  meta:   a JSON string, e.g. {"dataset": "fashion_mnist", "pad_to": 32, "kind": "dm", "ipc": 10,
          "seed": 0, "iterations": 500, "num_classes": 10, "created": "2025-...Z", ...}.

`load_condensed` checks the file against what the caller's teacher expects and raises a
`CondensedDataError` with a one-line message that names the problem and its fix.
"""
from __future__ import annotations

import json
import os
import time
import zipfile

import numpy as np

from dfkd_jax.io import files
from dfkd_jax.data import datasets

_KEYS = ("images", "labels", "meta")
_REBUILD = "python -m dfkd_jax.condensation.condense"


class CondensedDataError(ValueError):
  """A condensed-set file is missing, malformed, or does not fit the teacher."""


def save_condensed(path: str, images, labels, meta: dict) -> None:
  """Writes a condensed set to `path` (.npz) atomically, creating parent folders.

  Args:
    path: output file; ".npz" is expected (numpy appends it otherwise, so pass it).
    images: [N, H, W, C] images in the teacher's normalised input space (stored as float32).
    labels: [N] integer labels (stored as int32).
    meta: JSON-serialisable record (dataset, pad_to, kind, ipc, seed, iterations, num_classes,
      ...); "created" (UTC, ISO 8601) and "num_images" are added when absent.

  Raises:
    CondensedDataError: if images are not rank 4, N differs between images and labels, or the
      images are not finite.
  """
  images = np.asarray(images, np.float32)
  labels = np.asarray(labels)
  _check_arrays(images, labels, path)
  meta = dict(meta)
  meta.setdefault("created", time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
  meta.setdefault("num_images", int(images.shape[0]))
  meta_json = json.dumps(meta, sort_keys=True)
  folder = os.path.dirname(os.path.abspath(path))
  os.makedirs(folder, exist_ok=True)
  with files.atomic_open(path, "wb") as f:
    np.savez(f, images=images, labels=labels.astype(np.int32), meta=np.asarray(meta_json))


def _check_arrays(images: np.ndarray, labels: np.ndarray, path: str) -> None:
  if images.ndim != 4:
    raise CondensedDataError(
        f"condensed images in {path} have shape {images.shape}, not [N, H, W, C]: rebuild the "
        f"file with {_REBUILD}")
  if images.shape[0] == 0:
    raise CondensedDataError(
        f"{path} holds no images: an empty condensed set guides nothing; rebuild it with "
        f"{_REBUILD} (ipc >= 1)")
  if labels.ndim != 1 or labels.shape[0] != images.shape[0]:
    raise CondensedDataError(
        f"{path} holds {images.shape[0]} images but labels of shape {labels.shape}: the file is "
        f"corrupt; rebuild it with {_REBUILD}")
  if not np.issubdtype(labels.dtype, np.integer):
    raise CondensedDataError(
        f"labels in {path} have dtype {labels.dtype}, not an integer type: rebuild the file "
        f"with {_REBUILD}")
  if not np.all(np.isfinite(images)):
    bad = int(np.sum(~np.isfinite(images)))
    raise CondensedDataError(
        f"condensed images in {path} hold {bad} non-finite values (NaN/inf; diverged "
        f"condensation?): rebuild with {_REBUILD} (lower --lr)")


def load_condensed(path: str, *, image_shape=None,
                   num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
  """Reads a condensed set written by `save_condensed` and checks it against the teacher.

  Args:
    path: the .npz file.
    image_shape: optional (H, W, C) (or (H, W)) the teacher expects; a mismatch raises.
    num_classes: optional class count of the teacher; labels must lie in [0, num_classes) and
      the file's recorded class count (meta["num_classes"]) must agree.

  Returns:
    (images float32 [N, H, W, C], labels int32 [N], meta dict).

  Raises:
    CondensedDataError: with a one-line message naming the problem and the fix, for a missing
      file, a file that is not an npz or lacks a key, images not of rank 4, an image size or
      channel count other than `image_shape`, labels out of range or a class count other than
      `num_classes`, N differing between images and labels, or non-finite images.
  """
  if not os.path.isfile(path):
    raise CondensedDataError(
        f"condensed-set file {path} does not exist: build it with {_REBUILD} --out {path} "
        "(or fix the path)")
  try:
    with np.load(path, allow_pickle=False) as data:
      missing = [k for k in _KEYS if k not in data.files]
      if missing:
        raise CondensedDataError(
            f"{path} lacks the key(s) {missing} (has {sorted(data.files)}): it is not a "
            f"condensed-set file; build one with {_REBUILD}")
      images = np.asarray(data["images"])
      labels = np.asarray(data["labels"])
      meta_raw = data["meta"]
  except CondensedDataError:
    raise
  except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
    raise CondensedDataError(
        f"{path} is not a readable .npz file ({type(e).__name__}: {e}): build it with "
        f"{_REBUILD}") from e
  try:
    meta = json.loads(str(meta_raw.item() if meta_raw.ndim == 0 else meta_raw))
    if not isinstance(meta, dict):
      raise ValueError("not a JSON object")
  except ValueError as e:
    raise CondensedDataError(
        f"the meta record in {path} is not a JSON object ({e}): rebuild the file with "
        f"{_REBUILD}") from e
  _check_arrays(images, labels, path)
  images = images.astype(np.float32, copy=False)
  labels = labels.astype(np.int32)
  if image_shape is not None:
    _check_shape(images, tuple(int(s) for s in image_shape), path, meta)
  file_classes = meta.get("num_classes")
  if num_classes is not None:
    if file_classes is not None and int(file_classes) != int(num_classes):
      raise CondensedDataError(
          f"{path} was condensed for {file_classes} classes ({meta.get('dataset', '?')}) but "
          f"the teacher has {num_classes}: rebuild with {_REBUILD} --dataset <the teacher's "
          "dataset>")
  limit = num_classes if num_classes is not None else file_classes
  if labels.size and (labels.min() < 0 or (limit is not None and labels.max() >= int(limit))):
    raise CondensedDataError(
        f"labels in {path} span [{labels.min()}, {labels.max()}] but must lie in "
        f"[0, {limit}): the file was made for another dataset; rebuild with {_REBUILD} "
        "--dataset <the teacher's dataset>")
  return images, labels, meta


def _check_shape(images: np.ndarray, expected: tuple[int, ...], path: str, meta: dict) -> None:
  """Raises if the images' (H, W[, C]) differ from `expected`, with the flag that fixes it."""
  if len(expected) not in (2, 3):
    raise ValueError(f"image_shape must be (H, W) or (H, W, C), got {expected}")
  got = images.shape[1:]
  if got[:2] == expected[:2] and (len(expected) == 2 or got[2] == expected[2]):
    return
  got_s = "x".join(map(str, got))
  exp_s = "x".join(map(str, expected))
  if got[:2] != expected[:2]:
    native = datasets.DATASETS.get(str(meta.get("dataset")))
    if native is not None and expected[:2] == (native.image_size,) * 2:
      fix = "rebuild with --pad_to 0 (the native size)"
    elif expected[0] == expected[1]:
      fix = f"rebuild with --pad_to {expected[0]}"
    else:
      fix = f"rebuild at {expected[0]}x{expected[1]}"
  else:
    fix = "rebuild with --dataset <the teacher's dataset>"
  raise CondensedDataError(
      f"condensed images in {path} are {got_s} but the teacher expects {exp_s}: {fix}")
