"""`dfkd_jax.io.model_io`: saved models round-trip, and every damaged or mismatched file is a
ModelLoadError naming the file and the fix."""
import hashlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax import models
from dfkd_jax import state as state_lib
from dfkd_jax.io import model_io

SHAPE = (32, 32, 1)


def _export(workdir, name="lenet5_half_bn"):
  module = models.get_model(name, num_classes=10)
  params, batch_stats = state_lib.init_model(module, jax.random.key(0), jnp.zeros((1, *SHAPE)))
  model_io.export_model(str(workdir), model_name=name, num_classes=10, input_shape=SHAPE,
                        dataset="fashion_mnist", params=params, batch_stats=batch_stats)
  return params


def test_round_trip(tmp_path):
  params = _export(tmp_path)
  _, frozen, meta = model_io.load_model(str(tmp_path), expect_model="lenet5_half_bn")
  assert meta["model"] == "lenet5_half_bn"
  for a, b in zip(jax.tree.leaves(frozen.params), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_unreadable_model_json_names_the_file(tmp_path):
  _export(tmp_path)
  (tmp_path / "model.json").write_text("{not json")
  with pytest.raises(model_io.ModelLoadError, match=r"model.json is unreadable.*re-export"):
    model_io.load_model(str(tmp_path))


def test_model_json_without_checksum_is_refused(tmp_path):
  _export(tmp_path)
  meta = json.loads((tmp_path / "model.json").read_text())
  del meta["sha256"]
  (tmp_path / "model.json").write_text(json.dumps(meta))
  with pytest.raises(model_io.ModelLoadError, match=r"model.json lacks sha256"):
    model_io.load_model(str(tmp_path))


def test_weights_of_another_architecture_are_caught_at_load(tmp_path):
  """model.json says lenet5_half_bn, the weights (checksum updated to match) are lenet5_bn's:
  an error naming the first parameter whose shape differs, not a failure at the first step."""
  _export(tmp_path / "big", name="lenet5_bn")
  _export(tmp_path / "small")
  blob = (tmp_path / "big" / "model.msgpack").read_bytes()
  (tmp_path / "small" / "model.msgpack").write_bytes(blob)
  meta = json.loads((tmp_path / "small" / "model.json").read_text())
  meta["sha256"] = hashlib.sha256(blob).hexdigest()
  (tmp_path / "small" / "model.json").write_text(json.dumps(meta))
  with pytest.raises(model_io.ModelLoadError, match=r"has shape .* needs .*do not belong"):
    model_io.load_model(str(tmp_path / "small"))
  assert os.path.exists(tmp_path / "small" / "model.msgpack")
