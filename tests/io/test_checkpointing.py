"""Tests of `dfkd_jax.io.checkpointing`: exact round trips and clear errors for damaged
checkpoints."""
import gc
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.io import checkpointing

# A failed Orbax restore leaves read coroutines behind; collecting them is noisy but harmless.
pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")


@pytest.fixture(autouse=True)
def _collect_garbage():
  yield
  gc.collect()


def _state(seed: int):
  k = jax.random.key(seed)
  return {
      "step": jnp.asarray(seed, jnp.int32),
      "rng": jax.random.fold_in(k, 7),
      "params": {"w": jax.random.normal(k, (3, 4)), "b": jnp.arange(4, dtype=jnp.float32)},
      "count": jnp.asarray([seed, seed + 1], jnp.int32),
  }


def _assert_tree_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      assert jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key), y.dtype
      assert str(x.dtype) == str(y.dtype)
      x, y = jax.random.key_data(x), jax.random.key_data(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _save_steps(directory, steps, max_to_keep=3):
  ckpt = checkpointing.Checkpointer(directory, max_to_keep=max_to_keep)
  for s in steps:
    ckpt.save(s, _state(s), {"accuracy": [float(s)] * s, "note": f"step {s}"})
  ckpt.wait()
  return ckpt


def test_roundtrip_with_typed_key_and_meta(tmp_path):
  directory = str(tmp_path / "ckpt")
  ckpt = _save_steps(directory, [1, 2])
  assert ckpt.all_steps() == [1, 2]
  assert ckpt.latest_step() == 2
  ckpt.close()

  # A fresh Checkpointer (as after a restart) restores into a template with other values.
  fresh = checkpointing.Checkpointer(directory)
  restored, meta = fresh.restore(_state(0))
  _assert_tree_equal(restored, _state(2))
  assert meta == {"accuracy": [2.0, 2.0], "note": "step 2"}
  # The restored key is a usable typed key that draws the same numbers as the original.
  np.testing.assert_array_equal(jax.random.uniform(restored["rng"], (5,)),
                                jax.random.uniform(_state(2)["rng"], (5,)))
  restored1, meta1 = fresh.restore(_state(0), step=1)
  _assert_tree_equal(restored1, _state(1))
  assert meta1["accuracy"] == [1.0]
  fresh.close()


def test_max_to_keep(tmp_path):
  ckpt = _save_steps(str(tmp_path / "ckpt"), [1, 2, 3, 4], max_to_keep=2)
  assert ckpt.all_steps() == [3, 4]
  ckpt.close()


def test_restore_without_checkpoint_raises(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "empty"))
  assert ckpt.latest_step() is None
  with pytest.raises(checkpointing.CheckpointError, match="No checkpoint"):
    ckpt.restore(_state(0))
  ckpt.close()


@pytest.mark.parametrize("damage", ["truncate_all", "truncate_data"])
def test_corrupt_latest_checkpoint_names_step_and_way_out(tmp_path, damage):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1, 2]).close()
  state_dir = os.path.join(directory, "2", "state")
  damaged = 0
  for root, _, files in os.walk(state_dir):
    for name in files:
      if damage == "truncate_data" and os.path.basename(root) != "d":
        continue
      path = os.path.join(root, name)
      with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) // 2)
      damaged += 1
  assert damaged > 0, f"nothing to damage under {state_dir}"

  ckpt = checkpointing.Checkpointer(directory)
  assert ckpt.latest_step() == 2
  with pytest.raises(checkpointing.CheckpointError) as e:
    ckpt.restore(_state(0))
  msg = str(e.value)
  assert "step 2" in msg
  assert "[1]" in msg and "resume from step 1" in msg
  assert os.path.join(directory, "2") in msg
  # The earlier checkpoint is intact and restores exactly.
  restored, meta = ckpt.restore(_state(0), step=1)
  _assert_tree_equal(restored, _state(1))
  assert meta["note"] == "step 1"
  ckpt.close()


def test_corrupt_only_checkpoint_says_start_over(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [5]).close()
  with open(os.path.join(directory, "5", "state", "_METADATA"), "w", encoding="utf-8") as f:
    f.write("{not json")
  ckpt = checkpointing.Checkpointer(directory)
  with pytest.raises(checkpointing.CheckpointError, match="step 5.*No earlier checkpoint"):
    ckpt.restore(_state(0))
  ckpt.close()


def test_incompatible_template_raises_checkpoint_error(tmp_path):
  directory = str(tmp_path / "ckpt")
  _save_steps(directory, [1]).close()
  ckpt = checkpointing.Checkpointer(directory)
  other = _state(0)
  other["params"]["w"] = jnp.zeros((5, 4))  # e.g. a config with another model width
  with pytest.raises(checkpointing.CheckpointError, match="step 1"):
    ckpt.restore(other)
  ckpt.close()
