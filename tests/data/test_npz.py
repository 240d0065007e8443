"""Datasets held as numpy arrays: dataset="npz:/path/file.npz" (x_train, y_train, x_test,
y_test), in every mode, with the normalisation computed, recorded and reused."""
import json

import numpy as np
import pytest

import helpers
from dfkd_jax import train
from dfkd_jax.data import datasets


def _images(n, size=28, channels=None, seed=0):
  rng = np.random.default_rng(seed)
  shape = (n, size, size) if channels is None else (n, size, size, channels)
  return rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 10, n).astype(np.int64)


def _save(path, **arrays):
  np.savez(path, **arrays)
  return f"npz:{path}"


def test_info_and_splits_of_an_npz_dataset(tmp_path):
  x_train, y_train = _images(300, channels=3)
  x_test, y_test = _images(50, channels=3, seed=1)
  name = _save(tmp_path / "d.npz", x_train=x_train, y_train=y_train, x_test=x_test,
               y_test=y_test)
  info = datasets.get_info(name)
  assert (info.num_classes, info.channels, info.image_size) == (10, 3, 28)
  pixels = x_train.reshape(-1, 3) / 255.0
  np.testing.assert_allclose(info.mean, pixels.mean(0), rtol=1e-6)
  np.testing.assert_allclose(info.std, pixels.std(0), rtol=1e-5)
  x, y = datasets.load_split(name, "test", limit=20, pad_to=32)
  assert x.shape == (20, 32, 32, 3) and y.dtype == np.int32
  np.testing.assert_array_equal(y, y_test[:20])
  expected = (x_test[:20] / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
  np.testing.assert_allclose(x[:, 2:30, 2:30], expected, atol=1e-5)
  # float pixels in [0, 1] are the same data
  name_f = _save(tmp_path / "f.npz", x_train=x_train / 255.0, y_train=y_train,
                 x_test=x_test / 255.0, y_test=y_test)
  xf, _ = datasets.load_split(name_f, "test", limit=20, pad_to=32)
  np.testing.assert_allclose(xf, x, atol=1e-5)


def test_grayscale_test_only_file_takes_given_or_stored_normalisation(tmp_path):
  x_test, y_test = _images(40)
  name = _save(tmp_path / "t.npz", x_test=x_test, y_test=y_test)
  with pytest.raises(ValueError, match="no training images to compute the input normalisation"):
    datasets.get_info(name)
  info = datasets.get_info(name, mean=[0.3], std=[0.4])
  assert info.channels == 1 and info.mean == (0.3,)
  name2 = _save(tmp_path / "t2.npz", x_test=x_test, y_test=y_test, mean=np.array([0.2]),
                std=np.array([0.5]), num_classes=np.array(12))
  info2 = datasets.get_info(name2)
  assert info2.mean == (0.2,) and info2.std == (0.5,) and info2.num_classes == 12
  with pytest.raises(ValueError, match="needs the train pair"):
    datasets.load_split(name2, "train")
  with pytest.raises(ValueError, match="no split 'validation'"):
    datasets.load_split(name2, "validation")


def _bad_cases():
  x, y = _images(20)
  return [
      (dict(x_train=x, y_train=y), "no x_test/y_test"),
      (dict(x_test=x), "has x_test but no y_test"),
      (dict(x_test=x[:, :, :20], y_test=y), "H == W"),
      (dict(x_test=x.astype(np.int16), y_test=y), "dtype int16"),
      (dict(x_test=x.astype(np.float32), y_test=y), r"float images must be raw pixels in \[0, 1\]"),
      (dict(x_test=x, y_test=y[:10]), "one per image"),
      (dict(x_test=x, y_test=y.astype(np.float32)), "integer labels"),
      (dict(x_test=x, y_test=y - 20), "negative labels"),
      (dict(x_test=x, y_test=y, num_classes=np.array(3)), "labels >= num_classes"),
      (dict(x_train=x[:, :, :, None].repeat(3, -1), y_train=y, x_test=x, y_test=y),
       "differ in shape"),
      (dict(x_test=x, y_test=y, mean=np.array([0.1, 0.2]), std=np.array([1.0, 1.0])),
       "one value per channel"),
  ]


@pytest.mark.parametrize("case", range(len(_bad_cases())))
def test_bad_npz_files_are_one_clear_error(tmp_path, case):
  arrays, fragment = _bad_cases()[case]
  name = _save(tmp_path / "bad.npz", **arrays)
  with pytest.raises(ValueError, match=fragment):
    datasets.get_info(name)


def test_missing_and_non_npz_files(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    datasets.get_info(f"npz:{tmp_path / 'none.npz'}")
  (tmp_path / "text.npz").write_text("not numpy")
  with pytest.raises(ValueError, match="not a readable .npz"):
    datasets.get_info(f"npz:{tmp_path / 'text.npz'}")
  with pytest.raises(ValueError, match="npz:/path/file.npz"):
    datasets.get_info("my_data")


@pytest.mark.slow
def test_teacher_on_npz_then_data_free_on_a_test_only_file_then_evaluate(tmp_path):
  """Fashion-MNIST exported to arrays: a teacher trained from the .npz records its
  normalisation; a data-free run given only x_test/y_test takes it from the teacher; the
  student is re-evaluated from its folder alone (dataset path, padding, normalisation)."""
  helpers.require_fashion_mnist()
  x_tr, y_tr = datasets._cached_uint8("fashion_mnist", "train", datasets.default_data_dir(), 1024)
  x_te, y_te = datasets._cached_uint8("fashion_mnist", "test", datasets.default_data_dir(), 512)
  full = _save(tmp_path / "fm.npz", x_train=x_tr[..., 0], y_train=y_tr, x_test=x_te[..., 0],
               y_test=y_te)
  test_only = _save(tmp_path / "fm_test.npz", x_test=x_te[..., 0], y_test=y_te)
  teacher_dir = tmp_path / "teacher"
  config = helpers.tiny_teacher_config(dataset=full)
  train.train_and_evaluate(config, str(teacher_dir))
  meta = json.load(open(teacher_dir / "model.json"))
  info = datasets.get_info(full)
  assert meta["normalization"] == {"mean": list(info.mean), "std": list(info.std)}
  assert meta["dataset"] == full and meta["pad_to"] == 32
  config = helpers.load_config(f"{helpers.TEACHER_CONFIG}:method=dfad,tiny,"
                               f"teacher_workdir={teacher_dir}")
  config.dataset = test_only
  student_dir = tmp_path / "student"
  summary = train.train_and_evaluate(config, str(student_dir))
  student_meta = json.load(open(student_dir / "model.json"))
  assert student_meta["normalization"] == meta["normalization"]
  from dfkd_jax.cli import main as cli_main  # pylint: disable=g-import-not-at-top
  again = cli_main.evaluate(str(student_dir), limit=config.test_limit)
  assert again["accuracy"] == pytest.approx(summary["final"], abs=1e-6)
