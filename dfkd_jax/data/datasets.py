"""Dataset constants and in-memory loading of TFDS splits (no TensorFlow needed).

Every real dataset is read through TFDS's array_record `data_source`, decoded once and held in
memory as a normalised float32 NHWC array (these datasets fit). TensorFlow is needed only to
*build* a dataset (`python -m dfkd_jax.data.prepare`), never to read one.
"""
from __future__ import annotations

import dataclasses
import functools
import glob
import json
import os

import numpy as np


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Static facts about a dataset.

  Attributes:
    tfds_name: name in the TFDS catalogue.
    num_classes: number of labels.
    channels: image channels.
    image_size: native height (= width).
    mean: per-channel mean of the train split in [0, 1] units (the teacher's training
      normalisation).
    std: per-channel std, same units.
    test_split: name of the held-out split used for reporting.
  """
  tfds_name: str
  num_classes: int
  channels: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  test_split: str = "test"


# CIFAR-100 uses the CIFAR-10 constants, as DAFL and PRE-DFKD do (docs/methods.md §0.3).
_CIFAR_MEAN = (0.4914, 0.4822, 0.4465)
_CIFAR_STD = (0.2023, 0.1994, 0.2010)

DATASETS: dict[str, DatasetInfo] = {
    "fashion_mnist": DatasetInfo("fashion_mnist", 10, 1, 28, (0.2860,), (0.3530,)),
    "mnist": DatasetInfo("mnist", 10, 1, 28, (0.1307,), (0.3081,)),
    "svhn_cropped": DatasetInfo("svhn_cropped", 10, 3, 32, (0.4377, 0.4438, 0.4728),
                                (0.1980, 0.2010, 0.1970)),
    "cifar10": DatasetInfo("cifar10", 10, 3, 32, _CIFAR_MEAN, _CIFAR_STD),
    "cifar100": DatasetInfo("cifar100", 100, 3, 32, _CIFAR_MEAN, _CIFAR_STD),
}

DEBIAN_HINT = {
    "fashion_mnist": ("python -m dfkd_jax.data.prepare fashion_mnist "
                      "--from /usr/share/datasets/fashion-mnist   (Debian package "
                      "'dataset-fashion-mnist': apt-get install dataset-fashion-mnist)"),
}


def get_info(name: str) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`, or raises a ValueError listing the valid names."""
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}. Valid datasets: {', '.join(sorted(DATASETS))}.")
  return DATASETS[name]


def default_data_dir() -> str:
  """TFDS data dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets (the TFDS default)."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def normalize(images_uint8: np.ndarray, info: DatasetInfo) -> np.ndarray:
  """uint8 NHWC in [0, 255] -> float32 (x/255 - mean) / std."""
  x = images_uint8.astype(np.float32) / 255.0
  return (x - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)


def denormalize(images, info: DatasetInfo):
  """Inverse of `normalize`, back to [0, 1] units (works on numpy and jax arrays)."""
  return images * np.asarray(info.std, np.float32) + np.asarray(info.mean, np.float32)


def pad_images(images: np.ndarray, size: int) -> np.ndarray:
  """Zero-pads (in normalised space: pads with the normalised value of black) HxW to size x size."""
  h, w = images.shape[1:3]
  if h == size and w == size:
    return images
  if h > size or w > size:
    raise ValueError(f"Cannot pad {h}x{w} images to {size}x{size}: pad_to must be >= {max(h, w)}.")
  top, left = (size - h) // 2, (size - w) // 2
  out = np.zeros((images.shape[0], size, size, images.shape[3]), images.dtype)
  out[:, top:top + h, left:left + w] = images
  return out


class _NoOpenCVNotice:
  """Drops TFDS's 'OpenCV is not installed' notice (PIL decoding is fine for these sizes)."""

  def filter(self, record) -> bool:
    return "OpenCV is not installed" not in record.getMessage()


def _read_uint8(name: str, split: str, data_dir: str,
                limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads a TFDS split (its first `limit` examples, or all) as uint8 images and int32 labels."""
  import logging  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _NoOpenCVNotice) for f in absl_logger.filters):
    absl_logger.addFilter(_NoOpenCVNotice())
  builder_dir = os.path.join(data_dir, name)
  if not os.path.isdir(builder_dir):
    hint = DEBIAN_HINT.get(name, f"python -m dfkd_jax.data.prepare {name}   (needs internet "
                                 "and the 'prepare' extra: pip install 'dfkd_jax[prepare]')")
    raise FileNotFoundError(
        f"Dataset {name!r} is not prepared in the TFDS data dir {data_dir!r}. Prepare it with:\n"
        f"  {hint}\n(or set TFDS_DATA_DIR / config.data_dir to where it was prepared).")
  _check_prepared(name, split, data_dir, builder_dir)
  try:
    # download=False: reading never downloads (an incomplete folder is an error, not a fetch).
    source = tfds.data_source(name, split=split, data_dir=data_dir, download=False)
  except Exception as e:  # TFDS raises several types; re-raise with the fix.
    raise RuntimeError(
        f"Could not open TFDS dataset {name!r} split {split!r} in {data_dir!r}: {e}. "
        f"Re-prepare it with python -m dfkd_jax.data.prepare {name} (it must be built in the "
        "array_record format).") from e
  images, labels = [], []
  chunk = 2048
  try:
    n = len(source) if limit is None else min(len(source), limit)
    for start in range(0, n, chunk):
      examples = source.__getitems__(list(range(start, min(n, start + chunk))))
      images.append(np.stack([np.asarray(ex["image"], np.uint8) for ex in examples]))
      labels.append(np.asarray([ex["label"] for ex in examples], np.int32))
  except Exception as e:  # pylint: disable=broad-except  (array_record / decoding errors)
    files = sorted(glob.glob(os.path.join(builder_dir, "*", f"{name}-{split}.array_record*")))
    hint = DEBIAN_HINT.get(name, f"python -m dfkd_jax.data.prepare {name}")
    raise RuntimeError(
        f"Reading the {split!r} split of {name!r} failed ({type(e).__name__}: "
        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}): its files "
        f"({', '.join(files) or builder_dir}) are damaged. Delete {builder_dir!r} and prepare it "
        f"again: {hint}") from e
  return np.concatenate(images), np.concatenate(labels)


def _check_prepared(name: str, split: str, data_dir: str, builder_dir: str) -> None:
  """A prepared split has a version folder with dataset_info.json and its array_record files
  (an interrupted `prepare` leaves a folder without them); otherwise a FileNotFoundError that
  says how to prepare it again."""
  complete, known = [], set()
  for version in sorted(os.listdir(builder_dir)):
    folder = os.path.join(builder_dir, version)
    info_path = os.path.join(folder, "dataset_info.json")
    if not os.path.isfile(info_path):
      continue
    try:
      with open(info_path, encoding="utf-8") as f:
        known.update(s["name"] for s in json.load(f).get("splits", []))
    except (OSError, ValueError, KeyError, TypeError):
      pass
    if any(f.startswith(f"{name}-{split}.array_record") for f in os.listdir(folder)):
      complete.append(folder)
  if not complete and known and split not in known:
    raise ValueError(f"Dataset {name!r} has no split {split!r} (slices such as 'test[:8]' are "
                     f"not supported; use a limit); valid: {', '.join(sorted(known))}.")
  if not complete:
    hint = DEBIAN_HINT.get(name, f"python -m dfkd_jax.data.prepare {name}")
    raise FileNotFoundError(
        f"Dataset {name!r} in {builder_dir!r} is incomplete: no version folder holds "
        f"dataset_info.json and the {split!r} split's array_record files (an interrupted "
        f"prepare?). Delete {builder_dir!r} and prepare it again: {hint}")


@functools.lru_cache(maxsize=8)
def _cached_uint8(name: str, split: str, data_dir: str, limit: int | None = None):
  images, labels = _read_uint8(name, split, data_dir, limit)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def load_split(name: str, split: str, data_dir: str | None = None, pad_to: int | None = None,
               limit: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads a TFDS split into memory, normalised with the dataset's training constants.

  Args:
    name: dataset name (see `DATASETS`).
    split: TFDS split, e.g. "train", "test", "train[:1000]" is NOT supported; use `limit`.
    data_dir: TFDS data dir (default `default_data_dir()`).
    pad_to: optional square size to zero-pad to (e.g. 32 for 28x28 Fashion-MNIST and LeNet-5).
    limit: keep only the first `limit` examples (TFDS order, which is shuffled at build time).

  Returns:
    (images float32 [N, H, W, C] normalised, labels int32 [N]).
  """
  info = get_info(name)
  # Decode only the first `limit` examples (decoding a whole split costs seconds).
  images, labels = _cached_uint8(info.tfds_name, split, data_dir or default_data_dir(),
                                 limit or None)
  x = normalize(images, info)
  if pad_to:
    # Pad in normalised space with the value of a black pixel, so padding looks like background.
    black = (0.0 - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    x = pad_images(x - black, pad_to) + black
  return x, np.array(labels)
