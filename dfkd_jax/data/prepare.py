r"""Prepares a TFDS dataset in the TFDS data dir, offline from local files where possible.

Usage:
  python -m dfkd_jax.data.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist
  python -m dfkd_jax.data.prepare cifar10            # machine with internet: TFDS downloads

`--from` takes a folder with the four standard IDX files
(`{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`), e.g. Debian's `dataset-fashion-mnist`.
Every file is validated (magic number, size, label range, image/label counts) before anything is
written. The Debian .gz files differ from upstream only in their gzip header (the file name field
is stripped and MTIME reset); the header is restored, which makes them byte-identical to the
upstream release, so TFDS's official builder accepts them through its manual-download directory
and verifies its own checksums. The build goes through a temporary directory and TFDS's
`incomplete.*` staging, so a failure leaves no half-written dataset.

Needs TensorFlow (`pip install 'dfkd_jax[prepare]'`) to *build*; reading needs none.
"""
from __future__ import annotations

import argparse
import os
import shutil
import struct
import sys
import tempfile

from dfkd_jax.data import datasets
from dfkd_jax.data import idx

IDX_DATASETS = ("fashion_mnist", "mnist")
# Upstream gzip MTIMEs of the Fashion-MNIST release (environment.md).
_UPSTREAM_MTIME = {"fashion_mnist": {"train": 1504176606, "t10k": 1504176627}}
_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class PrepareError(RuntimeError):
  """Preparation failed; the message says why and how to fix it."""


def validate_idx_folder(folder: str, num_classes: int = 10) -> dict[str, tuple[int, ...]]:
  """Checks the four IDX files in `folder`; returns {stem: shape}. Raises PrepareError."""
  if not os.path.isdir(folder):
    raise PrepareError(
        f"Folder {folder!r} does not exist. For Fashion-MNIST install the Debian package "
        "'dataset-fashion-mnist' (apt-get install dataset-fashion-mnist; files land in "
        "/usr/share/datasets/fashion-mnist) or pass --from a folder holding "
        + ", ".join(s + ".gz" for s in _STEMS) + ".")
  shapes = {}
  arrays = {}
  for stem in _STEMS:
    try:
      path = idx.find(folder, stem)
      arrays[stem] = idx.parse(path, "images" if "images" in stem else "labels")
    except (FileNotFoundError, idx.IDXError) as e:
      raise PrepareError(str(e)) from e
    shapes[stem] = arrays[stem].shape
  for split in ("train", "t10k"):
    images, labels = arrays[f"{split}-images-idx3-ubyte"], arrays[f"{split}-labels-idx1-ubyte"]
    if images.shape[0] != labels.shape[0]:
      raise PrepareError(f"{folder}: {split} has {images.shape[0]} images but {labels.shape[0]} "
                         "labels; the files do not belong together.")
    if labels.size and labels.max() >= num_classes:
      raise PrepareError(f"{folder}: {split} labels contain {int(labels.max())}, expected 0.."
                         f"{num_classes - 1}.")
  return shapes


def upstream_gzip(raw: bytes, name: str, mtime: int) -> bytes:
  """Restores the upstream gzip header (FNAME + MTIME) of a Debian-stripped .gz file."""
  if raw[:2] != b"\x1f\x8b":
    raise PrepareError(f"{name}: not a gzip file; TFDS's builder needs the original .gz files.")
  flags = raw[3]
  if flags & 0x08:  # FNAME already present: assume upstream bytes.
    return raw
  if flags != 0:
    raise PrepareError(f"{name}: unexpected gzip header flags {flags:#x}.")
  header = raw[:3] + bytes([0x08]) + struct.pack("<I", mtime) + raw[8:10]
  return header + name.encode() + b"\0" + raw[10:]


def prepare(name: str, source: str | None = None, data_dir: str | None = None) -> str:
  """Builds TFDS dataset `name` (array_record) in `data_dir`; returns the dataset's folder."""
  info = datasets.get_info(name)
  data_dir = data_dir or datasets.default_data_dir()
  if source is not None:
    if name not in IDX_DATASETS:
      raise PrepareError(f"--from is supported for {IDX_DATASETS} (IDX files); {name!r} is "
                         "downloaded by TFDS: run without --from on a machine with internet.")
    validate_idx_folder(source, info.num_classes)
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    import tensorflow  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise PrepareError("Building a TFDS dataset needs TensorFlow: pip install "
                       "'dfkd_jax[prepare]' (reading a prepared dataset does not).") from e
  os.makedirs(data_dir, exist_ok=True)
  with tempfile.TemporaryDirectory(prefix="dfkd_prepare_") as tmp:
    download_config = None
    if source is not None:
      manual = os.path.join(tmp, "manual")
      os.makedirs(manual)
      mtimes = _UPSTREAM_MTIME.get(name)
      for stem in _STEMS:
        path = idx.find(source, stem)
        with open(path, "rb") as f:
          raw = f.read()
        if mtimes is not None:
          raw = upstream_gzip(raw, stem, mtimes[stem.split("-")[0]])
        with open(os.path.join(manual, stem + ".gz"), "wb") as f:
          f.write(raw)
      download_config = tfds.download.DownloadConfig(manual_dir=manual)
    builder = tfds.builder(info.tfds_name, data_dir=data_dir, file_format="array_record")
    try:
      builder.download_and_prepare(download_dir=os.path.join(tmp, "downloads"),
                                   download_config=download_config)
    except Exception as e:
      # TFDS stages into incomplete.* folders; remove any left behind.
      for root in (os.path.join(data_dir, info.tfds_name),):
        if os.path.isdir(root):
          for entry in os.listdir(root):
            if entry.startswith("incomplete"):
              shutil.rmtree(os.path.join(root, entry), ignore_errors=True)
          if not os.listdir(root):
            # An empty dataset folder would look prepared to `datasets.load_split`.
            os.rmdir(root)
      msg = str(e).splitlines()[0] if str(e) else type(e).__name__
      if "Checksum" in type(e).__name__ or "checksum" in msg.lower():
        msg += (" — the files are not byte-identical to the official release (are they the "
                "original .gz files?).")
      raise PrepareError(f"Building {name!r} failed: {msg}") from e
  return builder.data_dir


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("name", choices=sorted(datasets.DATASETS))
  parser.add_argument("--from", dest="source", default=None,
                      help="folder with the four IDX files (mnist, fashion_mnist)")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  args = parser.parse_args(argv)
  try:
    path = prepare(args.name, args.source, args.data_dir)
  except (PrepareError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"Prepared {args.name} in {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
