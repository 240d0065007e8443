"""Tests of the data layer: IDX parsing and validation, offline preparation, TFDS loading."""
import gzip
import hashlib
import os
import shutil
import struct

import helpers
import numpy as np
import pytest

from dfkd_jax.data import datasets
from dfkd_jax.data import idx
from dfkd_jax.data import prepare

_STEMS = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
          "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
  header = struct.pack(">I", magic) + struct.pack(">" + "I" * arr.ndim, *arr.shape)
  return header + np.ascontiguousarray(arr, np.uint8).tobytes()


def _write(folder, stem, payload: bytes, compress: bool = True):
  path = os.path.join(folder, stem + (".gz" if compress else ""))
  with open(path, "wb") as f:
    f.write(gzip.compress(payload) if compress else payload)
  return path


def _write_images(folder, stem, n, compress=True):
  images = (np.arange(n * 28 * 28) % 256).astype(np.uint8).reshape(n, 28, 28)
  return _write(folder, stem, _idx_bytes(images, idx.IMAGES_MAGIC), compress)


def _write_labels(folder, stem, labels, compress=True):
  return _write(folder, stem, _idx_bytes(np.asarray(labels), idx.LABELS_MAGIC), compress)


@pytest.fixture
def small_idx_folder(tmp_path):
  """A valid folder of four small IDX files (20 train, 10 test examples), gzip-compressed."""
  folder = tmp_path / "idx"
  folder.mkdir()
  _write_images(folder, "train-images-idx3-ubyte", 20)
  _write_labels(folder, "train-labels-idx1-ubyte", np.arange(20) % 10)
  _write_images(folder, "t10k-images-idx3-ubyte", 10)
  _write_labels(folder, "t10k-labels-idx1-ubyte", np.arange(10))
  return str(folder)


@pytest.fixture(scope="module")
def real_idx():
  helpers.require_idx_files()
  return helpers.FMNIST_IDX_DIR


# --- idx.parse -------------------------------------------------------------------------------


def test_parse_real_files(real_idx):
  train_x = idx.parse(idx.find(real_idx, "train-images-idx3-ubyte"), "images")
  train_y = idx.parse(idx.find(real_idx, "train-labels-idx1-ubyte"), "labels")
  test_x = idx.parse(idx.find(real_idx, "t10k-images-idx3-ubyte"), "images")
  test_y = idx.parse(idx.find(real_idx, "t10k-labels-idx1-ubyte"), "labels")
  assert train_x.shape == (60000, 28, 28) and train_x.dtype == np.uint8
  assert train_y.shape == (60000,) and train_y.dtype == np.uint8
  assert test_x.shape == (10000, 28, 28)
  assert test_y.shape == (10000,)
  # Fashion-MNIST is balanced: 6000 / 1000 examples per class.
  np.testing.assert_array_equal(np.bincount(train_y), [6000] * 10)
  np.testing.assert_array_equal(np.bincount(test_y), [1000] * 10)
  assert 0 < train_x.mean() < 255


def test_parse_raw_and_gzip_agree(tmp_path):
  raw = _write_labels(tmp_path, "raw", [3, 1, 4], compress=False)
  gz = _write_labels(tmp_path, "gz", [3, 1, 4], compress=True)
  np.testing.assert_array_equal(idx.parse(raw, "labels"), [3, 1, 4])
  np.testing.assert_array_equal(idx.parse(gz, "labels"), [3, 1, 4])


def test_parse_trailing_bytes(tmp_path):
  path = _write(tmp_path, "x", _idx_bytes(np.zeros(3), idx.LABELS_MAGIC) + b"\0\0")
  with pytest.raises(idx.IDXError, match="2 unexpected trailing bytes"):
    idx.parse(path, "labels")


def test_parse_too_short(tmp_path):
  path = _write(tmp_path, "x", b"\0\0\x08", compress=False)
  with pytest.raises(idx.IDXError, match="too short"):
    idx.parse(path, "labels")


# --- prepare.validate_idx_folder ---------------------------------------------------------------


def test_validate_real_folder(real_idx):
  shapes = prepare.validate_idx_folder(real_idx)
  assert shapes == {"train-images-idx3-ubyte": (60000, 28, 28),
                    "train-labels-idx1-ubyte": (60000,),
                    "t10k-images-idx3-ubyte": (10000, 28, 28),
                    "t10k-labels-idx1-ubyte": (10000,)}


def test_validate_small_valid_folder(small_idx_folder):
  shapes = prepare.validate_idx_folder(small_idx_folder)
  assert shapes["train-images-idx3-ubyte"] == (20, 28, 28)
  assert shapes["t10k-labels-idx1-ubyte"] == (10,)


def test_validate_missing_folder(tmp_path):
  with pytest.raises(prepare.PrepareError, match="does not exist") as e:
    prepare.validate_idx_folder(str(tmp_path / "nope"))
  assert "dataset-fashion-mnist" in str(e.value)
  assert "train-images-idx3-ubyte.gz" in str(e.value)


def test_validate_missing_file(small_idx_folder):
  os.remove(os.path.join(small_idx_folder, "t10k-labels-idx1-ubyte.gz"))
  with pytest.raises(prepare.PrepareError, match=r"missing t10k-labels-idx1-ubyte\.gz"):
    prepare.validate_idx_folder(small_idx_folder)


def test_validate_bad_magic_on_real_copy(real_idx, tmp_path):
  folder = tmp_path / "copy"
  shutil.copytree(real_idx, folder)
  labels = folder / "train-labels-idx1-ubyte.gz"
  raw = bytearray(gzip.decompress(labels.read_bytes()))
  raw[3] = 0x99  # magic 2049 -> 2201
  labels.write_bytes(gzip.compress(bytes(raw)))
  with pytest.raises(prepare.PrepareError, match="bad magic number 2201") as e:
    prepare.validate_idx_folder(str(folder))
  assert "train-labels-idx1-ubyte" in str(e.value)


def test_validate_images_and_labels_swapped(small_idx_folder):
  """An images file where labels are expected is caught by its magic number."""
  os.replace(os.path.join(small_idx_folder, "t10k-images-idx3-ubyte.gz"),
             os.path.join(small_idx_folder, "t10k-labels-idx1-ubyte.gz"))
  _write_images(small_idx_folder, "t10k-images-idx3-ubyte", 10)
  with pytest.raises(prepare.PrepareError, match="bad magic number 2051.*expected 2049"):
    prepare.validate_idx_folder(small_idx_folder)


def test_validate_truncated_payload(small_idx_folder):
  payload = _idx_bytes(np.zeros((10, 28, 28)), idx.IMAGES_MAGIC)
  _write(small_idx_folder, "t10k-images-idx3-ubyte", payload[:-100])
  with pytest.raises(prepare.PrepareError, match="truncated") as e:
    prepare.validate_idx_folder(small_idx_folder)
  assert "t10k-images-idx3-ubyte" in str(e.value)
  assert "7840" in str(e.value)  # the promised size


def test_validate_truncated_raw_file(small_idx_folder):
  os.remove(os.path.join(small_idx_folder, "train-labels-idx1-ubyte.gz"))
  payload = _idx_bytes(np.arange(20) % 10, idx.LABELS_MAGIC)
  _write(small_idx_folder, "train-labels-idx1-ubyte", payload[:-5], compress=False)
  with pytest.raises(prepare.PrepareError, match="truncated.*file has 15"):
    prepare.validate_idx_folder(small_idx_folder)


def test_validate_truncated_gzip_stream(small_idx_folder):
  path = os.path.join(small_idx_folder, "train-images-idx3-ubyte.gz")
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[:len(data) // 2])
  with pytest.raises(prepare.PrepareError, match="corrupt or truncated gzip stream"):
    prepare.validate_idx_folder(small_idx_folder)


def test_validate_count_mismatch(small_idx_folder):
  _write_labels(small_idx_folder, "t10k-labels-idx1-ubyte", np.arange(7))
  with pytest.raises(prepare.PrepareError,
                     match="t10k has 10 images but 7 labels; the files do not belong together"):
    prepare.validate_idx_folder(small_idx_folder)


def test_validate_label_out_of_range(small_idx_folder):
  _write_labels(small_idx_folder, "train-labels-idx1-ubyte", [0] * 19 + [10])
  with pytest.raises(prepare.PrepareError, match=r"train labels contain 10, expected 0\.\.9"):
    prepare.validate_idx_folder(small_idx_folder)


# --- prepare.prepare --------------------------------------------------------------------------


def test_prepare_corrupt_folder_writes_nothing(small_idx_folder, tmp_path):
  _write_labels(small_idx_folder, "t10k-labels-idx1-ubyte", np.arange(7))
  data_dir = tmp_path / "tfds"
  with pytest.raises(prepare.PrepareError, match="do not belong together"):
    prepare.prepare("fashion_mnist", small_idx_folder, data_dir=str(data_dir))
  assert not (data_dir / "fashion_mnist").exists()
  assert not data_dir.exists() or not os.listdir(data_dir)


def test_prepare_non_release_files_leave_no_dataset(small_idx_folder, tmp_path):
  """Valid IDX files that are not the official release fail TFDS's checksum: nothing is left."""
  data_dir = tmp_path / "tfds"
  with pytest.raises(prepare.PrepareError, match="checksum.*byte-identical"):
    prepare.prepare("fashion_mnist", small_idx_folder, data_dir=str(data_dir))
  leftovers = [os.path.join(r, n) for r, ds, fs in os.walk(data_dir) for n in ds + fs]
  assert not leftovers, leftovers


def test_prepare_from_rejected_for_downloaded_datasets(tmp_path):
  with pytest.raises(prepare.PrepareError, match="--from is supported"):
    prepare.prepare("cifar10", str(tmp_path), data_dir=str(tmp_path / "tfds"))


def _tfds_checksums(name):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  path = os.path.join(os.path.dirname(tfds.__file__), "url_checksums", f"{name}.txt")
  out = {}
  with open(path, encoding="utf-8") as f:
    for line in f:
      if line.strip():
        _, size, digest, filename = line.split()
        out[filename] = (int(size), digest)
  return out


def test_upstream_gzip_restores_release_bytes(real_idx):
  checksums = _tfds_checksums("fashion_mnist")
  assert set(checksums) == {s + ".gz" for s in _STEMS}
  for stem in _STEMS:
    with open(idx.find(real_idx, stem), "rb") as f:
      raw = f.read()
    restored = prepare.upstream_gzip(raw, stem,
                                     prepare._UPSTREAM_MTIME["fashion_mnist"][stem.split("-")[0]])
    size, digest = checksums[stem + ".gz"]
    assert len(restored) == size, stem
    assert hashlib.sha256(restored).hexdigest() == digest, stem
    assert gzip.decompress(restored) == gzip.decompress(raw)
    # Idempotent: an upstream file (FNAME set) is passed through unchanged.
    assert prepare.upstream_gzip(restored, stem, 0) == restored


def test_upstream_gzip_rejects_non_gzip():
  with pytest.raises(prepare.PrepareError, match="not a gzip file"):
    prepare.upstream_gzip(b"\0\0\x08\x01", "x", 0)


def test_prepare_cli_missing_folder():
  proc = helpers.run_cli("dfkd_jax.data.prepare", "fashion_mnist", "--from", "/nonexistent",
                         timeout=120)
  assert proc.returncode == 2
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1, proc.stderr
  assert lines[0].startswith("error: ")
  assert "/nonexistent" in lines[0] and "dataset-fashion-mnist" in lines[0]
  assert "Traceback" not in proc.stderr


# --- datasets --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def prepared():
  helpers.require_fashion_mnist()


def test_load_split_shapes_and_normalisation(prepared):
  del prepared
  x, y = datasets.load_split("fashion_mnist", "test", limit=2000)
  assert x.shape == (2000, 28, 28, 1) and x.dtype == np.float32
  assert y.shape == (2000,) and y.dtype == np.int32
  assert set(np.unique(y)) == set(range(10))
  assert abs(float(x.mean())) < 0.1
  assert 0.9 < float(x.std()) < 1.1
  info = datasets.get_info("fashion_mnist")
  black = -info.mean[0] / info.std[0]
  white = (1 - info.mean[0]) / info.std[0]
  np.testing.assert_allclose(x.min(), black, rtol=1e-6)
  np.testing.assert_allclose(x.max(), white, rtol=1e-6)
  np.testing.assert_allclose(datasets.denormalize(x, info).min(), 0.0, atol=1e-6)


def test_load_split_limit_is_a_prefix(prepared):
  del prepared
  x_small, y_small = datasets.load_split("fashion_mnist", "test", limit=100)
  x_big, y_big = datasets.load_split("fashion_mnist", "test", limit=300)
  assert x_small.shape[0] == 100
  np.testing.assert_array_equal(x_small, x_big[:100])
  np.testing.assert_array_equal(y_small, y_big[:100])


def test_load_split_pad_to_32(prepared):
  del prepared
  x28, _ = datasets.load_split("fashion_mnist", "test", limit=64)
  x32, _ = datasets.load_split("fashion_mnist", "test", limit=64, pad_to=32)
  assert x32.shape == (64, 32, 32, 1) and x32.dtype == np.float32
  info = datasets.get_info("fashion_mnist")
  black = datasets.normalize(np.zeros((1, 1, 1, 1), np.uint8), info).item()
  assert x28.min() == black  # the background of the images themselves
  np.testing.assert_allclose(x32[:, 2:30, 2:30], x28, atol=1e-6)
  border = np.concatenate([x32[:, :2].ravel(), x32[:, 30:].ravel(),
                           x32[:, :, :2].ravel(), x32[:, :, 30:].ravel()])
  np.testing.assert_array_equal(border, black)
  with pytest.raises(ValueError, match="pad_to must be >= 28"):
    datasets.load_split("fashion_mnist", "test", limit=4, pad_to=20)


def test_load_split_missing_dataset_names_prepare_command(tmp_path):
  with pytest.raises(FileNotFoundError) as e:
    datasets.load_split("fashion_mnist", "test", data_dir=str(tmp_path), limit=4)
  msg = str(e.value)
  assert "python -m dfkd_jax.data.prepare fashion_mnist --from /usr/share/datasets/fashion-mnist" \
      in msg
  assert str(tmp_path) in msg


def test_unknown_dataset_lists_valid_names():
  with pytest.raises(ValueError, match="Unknown dataset 'imagenet'") as e:
    datasets.load_split("imagenet", "test")
  for name in datasets.DATASETS:
    assert name in str(e.value)


@pytest.mark.parametrize("layout", ["empty", "version_without_info", "info_without_split"])
def test_incomplete_dataset_folder_is_an_error_and_never_downloads(layout, tmp_path,
                                                                   monkeypatch):
  """An empty or half-prepared TFDS folder (a killed prepare) is a FileNotFoundError naming the
  folder and the fix, raised without touching the network."""
  import socket  # pylint: disable=g-import-not-at-top

  def no_network(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")

  monkeypatch.setattr(socket.socket, "connect", no_network)
  monkeypatch.setattr(socket, "create_connection", no_network)
  builder = tmp_path / "fashion_mnist"
  builder.mkdir()
  if layout != "empty":
    version = builder / "3.0.1"
    version.mkdir()
    (version / "fashion_mnist-train.array_record-00000-of-00001").write_bytes(b"")
    if layout == "info_without_split":
      (version / "dataset_info.json").write_text("{}")
  datasets._cached_uint8.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(FileNotFoundError, match=r"incomplete.*'test'.*prepare") as e:
    datasets.load_split("fashion_mnist", "test", str(tmp_path), 32, limit=8)
  assert str(builder) in str(e.value)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["fashion_mnist"]  # nothing written


def test_damaged_array_record_names_the_file_and_the_fix(tmp_path):
  src = os.path.join(datasets.default_data_dir(), "fashion_mnist", "3.0.1")
  if not os.path.isdir(src):
    pytest.skip("Fashion-MNIST TFDS dataset not prepared")
  dst = tmp_path / "fashion_mnist" / "3.0.1"
  dst.mkdir(parents=True)
  for name in os.listdir(src):
    if "train.array_record" not in name:  # the test split is enough
      shutil.copy(os.path.join(src, name), dst / name)
  record = next(p for p in dst.iterdir() if "test.array_record" in p.name)
  data = bytearray(record.read_bytes())
  for i in range(1000, len(data), 997):
    data[i] ^= 0xFF
  record.write_bytes(bytes(data))
  datasets._cached_uint8.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(RuntimeError, match=r"are damaged\. Delete .* prepare it again") as e:
    datasets.load_split("fashion_mnist", "test", str(tmp_path), 32)
  assert record.name in str(e.value)


def test_unknown_split_names_the_valid_ones(tmp_path):
  version = tmp_path / "fashion_mnist" / "3.0.1"
  version.mkdir(parents=True)
  (version / "dataset_info.json").write_text(
      '{"splits": [{"name": "train"}, {"name": "test"}]}')
  (version / "fashion_mnist-test.array_record-00000-of-00001").write_bytes(b"")
  datasets._cached_uint8.cache_clear()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"no split 'tset'.*valid: test, train"):
    datasets.load_split("fashion_mnist", "tset", str(tmp_path), 32)
