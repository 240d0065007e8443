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
    image_key: the TFDS feature holding the image.
    label_key: the TFDS feature holding the class label.
  """
  tfds_name: str
  num_classes: int
  channels: int
  image_size: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  test_split: str = "test"
  image_key: str = "image"
  label_key: str = "label"

  def image_shape(self, pad_to: int | None = None) -> tuple[int, int, int]:
    """[H, W, C] of the images as runs see them (zero-padded to `pad_to` when given)."""
    size = pad_to or self.image_size
    return (size, size, self.channels)


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


NPZ_PREFIX = "npz:"
FOLDER_PREFIX = "folder:"
NPZ_SPLITS = ("train", "test")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def is_array_source(name: str) -> bool:
  """Whether `name` is a dataset of the user's files ("npz:..." or "folder:...")."""
  return name.startswith((NPZ_PREFIX, FOLDER_PREFIX))


def get_info(name: str, mean=None, std=None, data_dir: str | None = None) -> DatasetInfo:
  """Returns the `DatasetInfo` of `name`, or raises a ValueError listing the valid names.

  `name` is a built-in TFDS name (`DATASETS`), `"npz:/path/file.npz"` or `"folder:/path"` (see
  `array_info`), or any
  other TFDS image-classification dataset prepared (array_record) in `data_dir` (see
  `tfds_info`). `mean`/`std` (per channel, [0, 1] units) replace the normalisation when given
  (a data-free run takes its teacher's).
  """
  if is_array_source(name):
    info = array_info(name, mean, std)
  elif name not in DATASETS:
    folder = os.path.join(data_dir or default_data_dir(), name)
    if not os.path.isdir(folder):
      raise ValueError(
          f"Unknown dataset {name!r}: not built in ({', '.join(sorted(DATASETS))}), not "
          f"'npz:/path/file.npz' (arrays x_train, y_train, x_test, y_test), and not a TFDS "
          f"dataset prepared in {data_dir or default_data_dir()!r} (build one with `tfds build "
          f"{name} --file_format=array_record --data_dir <dir>` and set config.data_dir).")
    info = tfds_info(name, data_dir or default_data_dir(), mean, std)
  else:
    info = DATASETS[name]
    if mean is not None and std is not None:
      info = dataclasses.replace(info, mean=tuple(mean), std=tuple(std))
  return info


def given_normalization(config, teacher_workdir: str | None = None):
  """`(mean, std)` fixed for the run, or None: `config.pixel_mean` / `config.pixel_std` when
  set, else the one recorded in the teacher's model.json (`teacher_workdir`; the teacher was
  trained with it)."""
  mean = tuple(config.get("pixel_mean", ()) or ())
  std = tuple(config.get("pixel_std", ()) or ())
  if mean and std:
    return mean, std
  if teacher_workdir:
    try:
      with open(os.path.join(teacher_workdir, "model.json"), encoding="utf-8") as f:
        norm = json.load(f).get("normalization") or {}
      if norm.get("mean") and norm.get("std"):
        return tuple(norm["mean"]), tuple(norm["std"])
    except (OSError, ValueError, AttributeError):
      pass  # no readable model.json here: model_io reports that where it matters
  return None


def dataset_info(config, teacher_workdir: str | None = None) -> DatasetInfo:
  """The `DatasetInfo` of `config.dataset` with the input normalisation a run must use:
  `given_normalization` when there is one, else the dataset's own."""
  mean, std = given_normalization(config, teacher_workdir) or (None, None)
  return get_info(config.dataset, mean, std, config.get("data_dir") or None)


def canonical_name(name: str) -> str:
  """`name` as model.json keeps it: an npz dataset by its absolute path (so a model's folder
  can be evaluated from any directory)."""
  if is_array_source(name):
    prefix, _, path = name.partition(":")
    return f"{prefix}:{os.path.abspath(os.path.expanduser(path))}"
  return name


def normalization_record(info: DatasetInfo, pad_to: int | None, data_dir: str | None) -> dict:
  """What model.json keeps so that evaluation needs nothing but the model's folder."""
  return {"normalization": {"mean": list(info.mean), "std": list(info.std)},
          "pad_to": int(pad_to or 0), "data_dir": data_dir or ""}


# ------------------------------------------------------------------ other TFDS datasets


def _tfds_features(name: str, data_dir: str) -> tuple[str, dict, dict]:
  """(version folder, features.json, dataset_info.json) of the newest complete version."""
  builder_dir = os.path.join(data_dir, name)
  for version in sorted(os.listdir(builder_dir), reverse=True):
    folder = os.path.join(builder_dir, version)
    paths = [os.path.join(folder, f) for f in ("features.json", "dataset_info.json")]
    if all(os.path.isfile(p) for p in paths):
      try:
        with open(paths[0], encoding="utf-8") as f, open(paths[1], encoding="utf-8") as g:
          return folder, json.load(f), json.load(g)
      except (OSError, ValueError) as e:
        raise ValueError(f"Dataset {name!r}: {folder} has unreadable metadata ({e}); prepare "
                         "it again.") from e
  raise FileNotFoundError(f"Dataset {name!r} in {builder_dir!r} is incomplete: no version folder "
                          "holds features.json and dataset_info.json; prepare it again.")


def tfds_info(name: str, data_dir: str, mean=None, std=None) -> DatasetInfo:
  """`DatasetInfo` of a TFDS image-classification dataset that is not built in, from its
  prepared metadata: the image and label features (the supervised keys, else the one Image
  and the one ClassLabel feature), shape (square, 1 or 3 channels) and class count; the test
  split ("test", else "validation"/"val"); the normalisation computed from the "train" split
  (once per process) unless `mean`/`std` are given."""
  folder, features, meta = _tfds_features(name, data_dir)
  feats = features.get("featuresDict", {}).get("features", {})
  kind = {k: str(v.get("pythonClassName", "")).rsplit(".", 1)[-1] for k, v in feats.items()}
  keys = [i.get("featureKey") for i in
          (meta.get("supervisedKeys") or {}).get("tuple", {}).get("items", [])]
  images = [k for k in keys if kind.get(k) == "Image"] or [k for k in feats if kind[k] == "Image"]
  labels = ([k for k in keys if kind.get(k) == "ClassLabel"]
            or [k for k in feats if kind[k] == "ClassLabel"])
  if len(images) != 1 or len(labels) != 1:
    raise ValueError(f"Dataset {name!r} is not an image classification dataset this library can "
                     f"read: it needs one Image and one ClassLabel feature (features: "
                     f"{', '.join(f'{k} ({v})' for k, v in kind.items())}).")
  dims = feats[images[0]].get("image", {}).get("shape", {}).get("dimensions", [])
  try:
    h, w, c = (int(d) for d in dims)
  except (TypeError, ValueError):
    h = w = c = -1
  if h <= 0 or h != w or c not in (1, 3):
    raise ValueError(f"Dataset {name!r}: images of shape {dims} are not supported (square, a "
                     "fixed size, 1 or 3 channels); convert the data to an .npz (dataset="
                     "'npz:...') at a fixed size.")
  num_classes = int(feats[labels[0]]["classLabel"]["numClasses"])
  splits = [sp["name"] for sp in meta.get("splits", [])]
  test = next((sp for sp in ("test", "validation", "val") if sp in splits), None)
  if test is None:
    raise ValueError(f"Dataset {name!r} has no test or validation split (splits: "
                     f"{', '.join(splits)}).")
  info = DatasetInfo(name, num_classes, c, h, (0.0,) * c, (1.0,) * c, test, images[0], labels[0])
  if mean is None or std is None:
    if "train" not in splits:
      raise ValueError(f"Dataset {name!r} has no train split to compute the input normalisation "
                       "from: set config.pixel_mean / config.pixel_std.")
    mean, std = _tfds_channel_stats(name, data_dir, os.path.getmtime(folder), images[0],
                                    labels[0])
  return dataclasses.replace(info, mean=tuple(float(v) for v in mean),
                             std=tuple(float(v) for v in std))


@functools.lru_cache(maxsize=4)
def _tfds_channel_stats(name, data_dir, mtime, image_key, label_key):
  del mtime  # cache key only
  x, _ = _cached_uint8(name, "train", data_dir, None, image_key, label_key)
  return _pixel_stats(x)


def _pixel_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of NHWC pixels in [0, 1] units (uint8 / 255 or floats)."""
  scale = 255.0 if x.dtype == np.uint8 else 1.0
  sums, squares = np.zeros(x.shape[-1]), np.zeros(x.shape[-1])
  for start in range(0, x.shape[0], 4096):
    chunk = x[start:start + 4096].astype(np.float64) / scale
    sums += chunk.sum(axis=(0, 1, 2))
    squares += np.square(chunk).sum(axis=(0, 1, 2))
  n = x.shape[0] * x.shape[1] * x.shape[2]
  mean = sums / n
  std = np.sqrt(np.maximum(squares / n - mean * mean, 1e-12))
  return tuple(float(v) for v in mean), tuple(float(v) for v in std)


# ---------------------------------------------------------------------------- npz datasets


def _npz_file(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isfile(path):
    raise FileNotFoundError(f"Dataset file {path!r} does not exist (dataset='npz:<path>' names a "
                            ".npz holding x_train, y_train, x_test, y_test).")
  return path


@functools.lru_cache(maxsize=4)
def _npz_arrays(path: str, mtime: float, size: int) -> dict:
  """The arrays of the .npz at `path` (read once per file version), checked."""
  del mtime, size  # cache key only
  try:
    with np.load(path, allow_pickle=False) as f:
      arrays = {k: f[k] for k in f.files}
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f"Dataset file {path!r} is not a readable .npz ({type(e).__name__}: {e}); "
                     "write it with numpy.savez(path, x_train=..., y_train=..., x_test=..., "
                     "y_test=...).") from e
  return _checked(arrays, f"Dataset file {path!r}")


def _checked(arrays: dict, where: str) -> dict:
  """`arrays` (x_/y_ train/test) with every shape, dtype and label rule checked; grayscale
  [N, H, W] images get their channel axis."""
  present = [s for s in NPZ_SPLITS if f"x_{s}" in arrays or f"y_{s}" in arrays]
  if "test" not in present:
    raise ValueError(f"{where} has no x_test/y_test (it holds "
                     f"{', '.join(sorted(arrays)) or 'nothing'}): every run evaluates on them; "
                     "data-free runs need only this pair.")
  shapes = set()
  for split in present:
    for k in (f"x_{split}", f"y_{split}"):
      if k not in arrays:
        raise ValueError(f"{where} has {'y' if k[0] == 'x' else 'x'}_{split} but "
                         f"no {k}: give both arrays of a split.")
    x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
    if x.ndim == 3:
      x = arrays[f"x_{split}"] = x[..., None]  # grayscale [N, H, W]
    if x.ndim != 4 or x.shape[1] != x.shape[2] or x.shape[3] not in (1, 3):
      raise ValueError(f"{where}: x_{split} has shape {x.shape}; images must be "
                       "[N, H, W] or [N, H, W, C] with H == W and C 1 or 3 (pad or crop to a "
                       "square first).")
    if x.dtype == np.uint8:
      pass
    elif np.issubdtype(x.dtype, np.floating):
      lo, hi = float(np.min(x)), float(np.max(x))
      if lo < 0.0 or hi > 1.0:
        raise ValueError(f"{where}: x_{split} is {x.dtype} with values in "
                         f"[{lo:.3g}, {hi:.3g}]; float images must be raw pixels in [0, 1] (the "
                         "library normalises them), or give uint8 in [0, 255].")
    else:
      raise ValueError(f"{where}: x_{split} has dtype {x.dtype}; use uint8 "
                       "[0, 255] or float [0, 1] pixels.")
    if y.ndim != 1 or y.shape[0] != x.shape[0] or not np.issubdtype(y.dtype, np.integer):
      raise ValueError(f"{where}: y_{split} must be integer labels of shape "
                       f"[{x.shape[0]}] (one per image); it is {y.dtype} {y.shape}.")
    if y.size and int(y.min()) < 0:
      raise ValueError(f"{where}: y_{split} has negative labels; labels are "
                       "0 .. num_classes-1.")
    shapes.add(x.shape[1:])
  if len(shapes) > 1:
    raise ValueError(f"{where}: the splits' images differ in shape "
                     f"({sorted(shapes)}).")
  return arrays


# ------------------------------------------------------------------------- image folders


def _folder_root(path: str) -> str:
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise FileNotFoundError(f"Dataset folder {path!r} does not exist (dataset='folder:<path>' "
                            "names a folder with train/ and test/, one sub-folder per class).")
  return path


def _folder_signature(root: str) -> tuple:
  """Changes when a split's or a class folder's contents change (the cache key)."""
  sig = []
  for split in NPZ_SPLITS:
    d = os.path.join(root, split)
    if os.path.isdir(d):
      sig.append((split, os.stat(d).st_mtime_ns,
                  tuple((c, os.stat(os.path.join(d, c)).st_mtime_ns) for c in sorted(
                      os.listdir(d)) if os.path.isdir(os.path.join(d, c)))))
  classes_txt = os.path.join(root, "classes.txt")
  if os.path.isfile(classes_txt):
    sig.append(("classes", os.stat(classes_txt).st_mtime_ns))
  return tuple(sig)


@functools.lru_cache(maxsize=2)
def _folder_arrays(root: str, signature: tuple) -> dict:
  """Decodes `root/{train,test}/<class>/<image>` into the arrays of an .npz dataset.

  Classes are `root/classes.txt` (one name per line) when present, else the sorted class
  folders of train/ (else of test/): a test folder missing a class keeps the others' labels
  only with classes.txt or a train/ folder. Every image must have the size and channel kind
  (grayscale or colour) of the first one.
  """
  del signature  # cache key only
  try:
    from PIL import Image  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ValueError("Image folders need Pillow (a dependency of the package: pip install "
                     "pillow); or convert the images to an .npz (dataset='npz:...').") from e
  splits = [s for s in NPZ_SPLITS if os.path.isdir(os.path.join(root, s))]
  if "test" not in splits:
    raise ValueError(f"Dataset folder {root!r} has no test/ folder (one sub-folder per class): "
                     "every run evaluates on it; data-free runs need only test/.")
  classes_txt = os.path.join(root, "classes.txt")
  if os.path.isfile(classes_txt):
    with open(classes_txt, encoding="utf-8") as f:
      classes = [ln.strip() for ln in f if ln.strip()]
  else:
    first = os.path.join(root, splits[0])
    classes = sorted(c for c in os.listdir(first) if os.path.isdir(os.path.join(first, c)))
  if not classes:
    raise ValueError(f"Dataset folder {root!r}/{splits[0]} has no class sub-folders.")
  index = {c: i for i, c in enumerate(classes)}
  arrays, mode, size = {}, None, None
  for split in splits:
    folder = os.path.join(root, split)
    images, labels = [], []
    for c in sorted(os.listdir(folder)):
      if not os.path.isdir(os.path.join(folder, c)):
        continue
      if c not in index:
        shown = ", ".join(classes[:10]) + (", ..." if len(classes) > 10 else "")
        raise ValueError(f"Dataset folder {root!r}: class folder {split}/{c} is not among the "
                         f"classes ({shown}; from classes.txt or train/).")
      for fname in sorted(os.listdir(os.path.join(folder, c))):
        if not fname.lower().endswith(IMAGE_SUFFIXES):
          continue
        path = os.path.join(folder, c, fname)
        try:
          with Image.open(path) as im:
            if mode is None:
              mode = "L" if im.mode in ("1", "L", "LA", "I", "I;16", "F") else "RGB"
              size = im.size
            if im.size != size:
              raise ValueError(f"Dataset folder {root!r}: {split}/{c}/{fname} is {im.size[0]}x"
                               f"{im.size[1]}, the first image {size[0]}x{size[1]}: resize the "
                               "images to one square size first.")
            images.append(np.asarray(im.convert(mode), np.uint8))
        except OSError as e:
          raise ValueError(f"Dataset folder {root!r}: cannot read {split}/{c}/{fname} ({e}).") \
              from e
        labels.append(index[c])
    if not images:
      suffixes = ", ".join(IMAGE_SUFFIXES)
      raise ValueError(f"Dataset folder {root!r}: {split}/ holds no images ({suffixes}).")
    arrays[f"x_{split}"] = np.stack(images)
    arrays[f"y_{split}"] = np.asarray(labels, np.int32)
  arrays["num_classes"] = np.asarray(len(classes))
  return _checked(arrays, f"Dataset folder {root!r}")


def _version(name: str) -> tuple:
  """What identifies the current contents of an "npz:" or "folder:" dataset (a cache key)."""
  prefix, _, path = name.partition(":")
  if prefix + ":" == FOLDER_PREFIX:
    root = _folder_root(path)
    return (root, _folder_signature(root))
  path = _npz_file(path)
  st = os.stat(path)
  return (path, st.st_mtime_ns, st.st_size)


def _load_arrays(name: str) -> dict:
  """The checked arrays of an "npz:" or "folder:" dataset (decoded once per version)."""
  key = _version(name)
  if name.startswith(FOLDER_PREFIX):
    return _folder_arrays(*key)
  return _npz_arrays(*key)


def array_info(name: str, mean=None, std=None) -> DatasetInfo:
  """`DatasetInfo` of a dataset of the user's files: `"npz:/path/file.npz"` (arrays x_train,
  y_train, x_test, y_test) or `"folder:/path"` (train/ and test/ with one sub-folder of images
  per class).

  Images: uint8 [0, 255] or float [0, 1], shape [N, H, W] or [N, H, W, C] (square, C 1 or 3);
  labels: integers [N]. The class count is the optional scalar array `num_classes` (a folder's
  class list), else the largest label + 1. The normalisation (per channel, [0, 1] units) is, in
  this order: `mean` / `std` given here (a data-free run passes its teacher's), arrays `mean`
  and `std` in the file, or computed from x_train (a test-only set needs one of the first two).
  """
  arrays = _load_arrays(name)
  where = f"Dataset {name!r}"
  x = arrays.get("x_train", arrays["x_test"])
  labels = [arrays[k] for k in ("y_train", "y_test") if k in arrays]
  num_classes = (int(arrays["num_classes"]) if "num_classes" in arrays
                 else max(int(y.max()) for y in labels if y.size) + 1)
  too_large = [k for k in ("y_train", "y_test") if k in arrays and arrays[k].size
               and int(arrays[k].max()) >= num_classes]
  if too_large:
    raise ValueError(f"{where}: {too_large[0]} has labels >= num_classes ({num_classes}).")
  channels = x.shape[-1]
  if mean is None or std is None:
    if "mean" in arrays and "std" in arrays:
      mean, std = arrays["mean"], arrays["std"]
    elif "x_train" in arrays:
      mean, std = _channel_stats(name, _version(name))
    else:
      raise ValueError(
          f"{where} has no training images to compute the input normalisation from: add "
          "arrays 'mean' and 'std' (per channel, pixels in [0, 1]) to the file, or set "
          "config.pixel_mean / config.pixel_std (a data-free run takes its teacher's from the "
          "teacher's model.json).")
  mean = tuple(float(v) for v in np.ravel(mean))
  std = tuple(float(v) for v in np.ravel(std))
  if len(mean) != channels or len(std) != channels or min(std) <= 0:
    raise ValueError(f"{where}: mean {mean} and std {std} must have one value per "
                     f"channel ({channels}), std > 0.")
  return DatasetInfo(canonical_name(name), num_classes, channels, x.shape[1], mean, std)


@functools.lru_cache(maxsize=4)
def _channel_stats(name: str, version: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel mean and std of x_train in [0, 1] units (float64 sums; once per version of
  the data, `_version`)."""
  del version
  return _pixel_stats(_load_arrays(name)["x_train"])


def _read_array_split(name: str, split: str, limit: int | None, rows=None):
  arrays = _load_arrays(name)
  if split not in NPZ_SPLITS:
    raise ValueError(f"Dataset {name!r}: no split {split!r}; a dataset of files has "
                     f"{' and '.join(NPZ_SPLITS)}.")
  if f"x_{split}" not in arrays:
    raise ValueError(f"Dataset {name!r} has no {split} images (x_{split}/y_{split}, or a "
                     f"{split}/ folder): a run on real data (teacher, scratch, kd_real) needs the "
                     f"{split} pair.")
  x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
  if limit:
    x, y = x[:limit], y[:limit]
  if rows is not None:
    x, y = x[rows[0]:rows[1]], y[rows[0]:rows[1]]
  return x, y.astype(np.int32)


def prepare_hint(name: str, data_dir: str) -> str:
  """The command that (re)builds dataset `name` in `data_dir`."""
  if name in DEBIAN_HINT:
    return DEBIAN_HINT[name]
  if name in DATASETS:
    return (f"python -m dfkd_jax.data.prepare {name}   (needs internet and the 'prepare' "
            "extra: pip install 'dfkd_jax[prepare]')")
  return (f"tfds build {name} --file_format=array_record --data_dir {data_dir}   (TFDS's own "
          "builder; needs TensorFlow)")


def default_data_dir() -> str:
  """TFDS data dir: $TFDS_DATA_DIR, else ~/tensorflow_datasets (the TFDS default)."""
  return os.environ.get("TFDS_DATA_DIR", os.path.expanduser("~/tensorflow_datasets"))


def normalize(images_uint8: np.ndarray, info: DatasetInfo) -> np.ndarray:
  """uint8 NHWC in [0, 255] (or float pixels in [0, 1]) -> float32 (x/255 - mean) / std."""
  x = images_uint8.astype(np.float32)
  if images_uint8.dtype == np.uint8:
    x = x / 255.0
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


def _read_uint8(name: str, split: str, data_dir: str, limit: int | None = None,
                image_key: str = "image", label_key: str = "label",
                rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Reads a TFDS split (its first `limit` examples, or all; of those only `rows` [start, stop)
  when given) as uint8 images and int32 labels."""
  import logging  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  absl_logger = logging.getLogger("absl")
  if not any(isinstance(f, _NoOpenCVNotice) for f in absl_logger.filters):
    absl_logger.addFilter(_NoOpenCVNotice())
  builder_dir = os.path.join(data_dir, name)
  if not os.path.isdir(builder_dir):
    hint = prepare_hint(name, data_dir)
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
    first, n = (0, n) if rows is None else (min(rows[0], n), min(rows[1], n))
    for start in range(first, n, chunk):
      examples = source.__getitems__(list(range(start, min(n, start + chunk))))
      images.append(np.stack([np.asarray(ex[image_key], np.uint8) for ex in examples]))
      labels.append(np.asarray([ex[label_key] for ex in examples], np.int32))
  except Exception as e:  # pylint: disable=broad-except  (array_record / decoding errors)
    files = sorted(glob.glob(os.path.join(builder_dir, "*", f"{name}-{split}.array_record*")))
    hint = prepare_hint(name, data_dir)
    raise RuntimeError(
        f"Reading the {split!r} split of {name!r} failed ({type(e).__name__}: "
        f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}): its files "
        f"({', '.join(files) or builder_dir}) are damaged. Delete {builder_dir!r} and prepare it "
        f"again: {hint}") from e
  if not images:  # no rows asked: empty arrays of the split's shape
    shape = source[0][image_key].shape if len(source) else (0,)
    return np.zeros((0, *shape), np.uint8), np.zeros((0,), np.int32)
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
    hint = prepare_hint(name, data_dir)
    raise FileNotFoundError(
        f"Dataset {name!r} in {builder_dir!r} is incomplete: no version folder holds "
        f"dataset_info.json and the {split!r} split's array_record files (an interrupted "
        f"prepare?). Delete {builder_dir!r} and prepare it again: {hint}")


@functools.lru_cache(maxsize=8)
def _cached_uint8(name: str, split: str, data_dir: str, limit: int | None = None,
                  image_key: str = "image", label_key: str = "label", rows=None):
  images, labels = _read_uint8(name, split, data_dir, limit, image_key, label_key, rows)
  images.setflags(write=False)
  labels.setflags(write=False)
  return images, labels


def split_size(name: str, split: str, data_dir: str | None = None, limit: int | None = None,
               info: DatasetInfo | None = None) -> int:
  """How many examples `load_split` returns for (name, split, limit), without decoding them."""
  info = info or get_info(name, data_dir=data_dir)
  if is_array_source(name):
    n = _read_array_split(name, split, None)[1].shape[0]
  else:
    data_dir = data_dir or default_data_dir()
    _check_prepared(info.tfds_name, split, data_dir, os.path.join(data_dir, info.tfds_name))
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    n = len(tfds.data_source(info.tfds_name, split=split, data_dir=data_dir, download=False))
  return min(n, limit) if limit else n


def load_split(name: str, split: str, data_dir: str | None = None, pad_to: int | None = None,
               limit: int | None = None, info: DatasetInfo | None = None,
               rows: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Loads a split into memory, normalised with the dataset's training constants.

  Args:
    name: dataset name (see `get_info`); "npz:..." and "folder:..." have splits "train" and
      "test".
    split: TFDS split, e.g. "train", "test", "train[:1000]" is NOT supported; use `limit`.
    data_dir: TFDS data dir (default `default_data_dir()`).
    pad_to: optional square size to zero-pad to (e.g. 32 for 28x28 Fashion-MNIST and LeNet-5).
    limit: keep only the first `limit` examples (TFDS order, which is shuffled at build time).

    info: the dataset's `DatasetInfo` (default `get_info(name)`); its mean/std normalise.
    rows: only the examples [start, stop) of the (limited) split: what one process of a
      multi-process run holds (a TFDS split reads just those records).

  Returns:
    (images float32 [N, H, W, C] normalised, labels int32 [N]).
  """
  info = info or get_info(name, data_dir=data_dir)
  if is_array_source(name):
    images, labels = _read_array_split(name, split, limit or None, rows)
  else:
    # Decode only the first `limit` examples (decoding a whole split costs seconds).
    images, labels = _cached_uint8(info.tfds_name, split, data_dir or default_data_dir(),
                                   limit or None, info.image_key, info.label_key,
                                   None if rows is None else tuple(rows))
  x = normalize(images, info)
  if pad_to:
    # Pad in normalised space with the value of a black pixel, so padding looks like background.
    black = (0.0 - np.asarray(info.mean, np.float32)) / np.asarray(info.std, np.float32)
    x = pad_images(x - black, pad_to) + black
  return x, np.array(labels)
