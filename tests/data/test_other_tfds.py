"""Any TFDS image-classification dataset prepared in the data dir works by name, with no
library edit: classes, shape, feature names and splits come from its metadata, the
normalisation from its train split."""
import json
import os
import shutil

import numpy as np
import pytest

import helpers
from dfkd_jax.data import datasets


def _renamed_copy(data_dir, name):
  """The prepared Fashion-MNIST, copied under another dataset name (as `tfds build` of a
  dataset the library does not know would leave it)."""
  helpers.require_fashion_mnist()
  src = os.path.join(datasets.default_data_dir(), "fashion_mnist", "3.0.1")
  dst = os.path.join(data_dir, name, "1.0.0")
  shutil.copytree(src, dst)
  for f in os.listdir(dst):
    if f.startswith("fashion_mnist-"):
      os.rename(os.path.join(dst, f), os.path.join(dst, f.replace("fashion_mnist", name, 1)))
  meta_path = os.path.join(dst, "dataset_info.json")
  meta = json.load(open(meta_path))
  meta["name"], meta["version"] = name, "1.0.0"
  json.dump(meta, open(meta_path, "w"))
  return dst


def test_an_unknown_prepared_tfds_dataset_is_read_by_name(tmp_path):
  _renamed_copy(str(tmp_path), "my_clothes")
  info = datasets.get_info("my_clothes", data_dir=str(tmp_path))
  assert (info.num_classes, info.channels, info.image_size, info.test_split) == (10, 1, 28, "test")
  assert info.mean[0] == pytest.approx(0.2860, abs=1e-4)  # computed from its train split
  assert info.std[0] == pytest.approx(0.3530, abs=1e-4)
  x, y = datasets.load_split("my_clothes", "test", str(tmp_path), pad_to=32, limit=64)
  ref_x, ref_y = datasets.load_split("fashion_mnist", "test", pad_to=32, limit=64,
                                     info=datasets.get_info("fashion_mnist", info.mean, info.std))
  np.testing.assert_array_equal(y, ref_y)
  np.testing.assert_allclose(x, ref_x, atol=1e-6)


def _fake_metadata(tmp_path, features, splits=("train", "test"), supervised=None):
  folder = tmp_path / "odd" / "1.0.0"
  folder.mkdir(parents=True)
  (folder / "features.json").write_text(json.dumps({"featuresDict": {"features": features}}))
  meta = {"name": "odd", "splits": [{"name": s} for s in splits]}
  if supervised:
    meta["supervisedKeys"] = {"tuple": {"items": [{"featureKey": k} for k in supervised]}}
  (folder / "dataset_info.json").write_text(json.dumps(meta))


def _image(dims):
  return {"pythonClassName": "tensorflow_datasets.core.features.image_feature.Image",
          "image": {"shape": {"dimensions": [str(d) for d in dims]}, "dtype": "uint8"}}


def _label(n):
  return {"pythonClassName": "tensorflow_datasets.core.features.class_label_feature.ClassLabel",
          "classLabel": {"numClasses": str(n)}}


def test_feature_names_and_splits_come_from_the_metadata(tmp_path):
  _fake_metadata(tmp_path, {"img": _image([64, 64, 3]), "thumb": _image([8, 8, 3]),
                            "target": _label(37)}, splits=("train", "validation"),
                 supervised=("img", "target"))
  info = datasets.get_info("odd", mean=[0.5] * 3, std=[0.25] * 3, data_dir=str(tmp_path))
  assert (info.image_key, info.label_key, info.num_classes) == ("img", "target", 37)
  assert (info.image_size, info.channels, info.test_split) == (64, 3, "validation")


@pytest.mark.parametrize("features,splits,fragment", [
    ({"img": _image([32, 32, 3])}, ("train", "test"), "one Image and one ClassLabel"),
    ({"img": _image([None, None, 3]), "y": _label(5)}, ("train", "test"), "not supported"),
    ({"img": _image([32, 24, 3]), "y": _label(5)}, ("train", "test"), "not supported"),
    ({"img": _image([32, 32, 3]), "y": _label(5)}, ("train",), "no test or validation"),
    ({"img": _image([32, 32, 3]), "y": _label(5)}, ("test",), "no train split"),
])
def test_datasets_that_cannot_be_read_say_why(tmp_path, features, splits, fragment):
  _fake_metadata(tmp_path, features, splits)
  with pytest.raises(ValueError, match=fragment):
    datasets.get_info("odd", data_dir=str(tmp_path))


def test_an_unknown_unprepared_name_says_how_to_build_it(tmp_path):
  with pytest.raises(ValueError, match=r"tfds build nothing_here --file_format=array_record"):
    datasets.get_info("nothing_here", data_dir=str(tmp_path))
