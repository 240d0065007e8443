"""Image folders: dataset="folder:/path" with train/ and test/, one sub-folder per class."""
import os

import numpy as np
import pytest

from dfkd_jax.data import datasets

Image = pytest.importorskip("PIL.Image")


def _write(root, split, cls, i, array):
  folder = root / split / cls
  folder.mkdir(parents=True, exist_ok=True)
  Image.fromarray(array).save(folder / f"{i}.png")


def _make(root, classes=("cat", "dog", "owl"), per_class=4, size=12, rgb=True, splits=("train",
                                                                                        "test")):
  rng = np.random.default_rng(0)
  shape = (size, size, 3) if rgb else (size, size)
  arrays = {}
  for split in splits:
    for c, cls in enumerate(classes):
      for i in range(per_class):
        a = rng.integers(0, 256, shape, dtype=np.uint8)
        _write(root, split, cls, i, a)
        arrays.setdefault(split, []).append((c, a))
  return arrays


def test_a_class_folder_tree_reads_like_arrays(tmp_path):
  written = _make(tmp_path)
  name = f"folder:{tmp_path}"
  info = datasets.get_info(name)
  assert (info.num_classes, info.channels, info.image_size) == (3, 3, 12)
  x_train = np.stack([a for _, a in written["train"]])
  np.testing.assert_allclose(info.mean, (x_train / 255.0).reshape(-1, 3).mean(0), rtol=1e-6)
  x, y = datasets.load_split(name, "test")
  assert x.shape == (12, 12, 12, 3)
  np.testing.assert_array_equal(y, [c for c, _ in written["test"]])  # cat=0, dog=1, owl=2
  expected = (written["test"][5][1] / 255.0 - np.asarray(info.mean)) / np.asarray(info.std)
  np.testing.assert_allclose(x[5], expected, atol=1e-5)
  assert datasets.canonical_name(name) == f"folder:{tmp_path}"


def test_a_test_only_grayscale_folder_with_a_class_list(tmp_path):
  """Data-free runs need only test/; classes.txt keeps the labels when a class is missing."""
  _make(tmp_path, classes=("b", "c"), rgb=False, splits=("test",))
  (tmp_path / "classes.txt").write_text("a\nb\nc\n")
  info = datasets.get_info(f"folder:{tmp_path}", mean=[0.5], std=[0.5])
  assert (info.num_classes, info.channels) == (3, 1)
  _, y = datasets.load_split(f"folder:{tmp_path}", "test", info=info)
  assert sorted(set(y.tolist())) == [1, 2]


@pytest.mark.parametrize("damage,fragment", [
    ("no_test", "no test/ folder"),
    ("odd_size", "resize the images"),
    ("unknown_class", "not among the classes"),
    ("broken_image", "cannot read"),
    ("empty_split", "holds no images"),
])
def test_bad_folders_are_one_clear_error(tmp_path, damage, fragment):
  _make(tmp_path, per_class=2)
  if damage == "no_test":
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(tmp_path / "test")
  elif damage == "odd_size":
    _write(tmp_path, "test", "dog", 9, np.zeros((10, 12, 3), np.uint8))
  elif damage == "unknown_class":
    _write(tmp_path, "test", "yak", 0, np.zeros((12, 12, 3), np.uint8))
  elif damage == "broken_image":
    (tmp_path / "test" / "owl" / "9.png").write_bytes(b"not a png")
  elif damage == "empty_split":
    for cls in ("cat", "dog", "owl"):
      for f in os.listdir(tmp_path / "test" / cls):
        os.remove(tmp_path / "test" / cls / f)
  with pytest.raises(ValueError, match=fragment):
    datasets.get_info(f"folder:{tmp_path}")


def test_a_missing_folder_and_a_changed_folder(tmp_path):
  with pytest.raises(FileNotFoundError, match="does not exist"):
    datasets.get_info(f"folder:{tmp_path / 'nothing'}")
  _make(tmp_path, per_class=1)
  assert datasets.get_info(f"folder:{tmp_path}").num_classes == 3
  _write(tmp_path, "train", "zebra", 0, np.zeros((12, 12, 3), np.uint8))  # a new class folder
  assert datasets.get_info(f"folder:{tmp_path}").num_classes == 4  # not a stale cache
