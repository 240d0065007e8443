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
  assert meta == {"accuracy": [2.0, 2.0], "note": "step 2",
                  "state_sha256": checkpointing.tree_sha256(_state(2))}
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


def _data_files(directory, step):
  out = []
  for root, _, files in os.walk(os.path.join(directory, str(step), "state")):
    if os.path.basename(root) == "d":
      out += [os.path.join(root, name) for name in files]
  return out


def _big_state(seed: int):
  """Incompressible weights: stored close to raw, so flipped bytes change values silently."""
  return {"w": jax.random.normal(jax.random.key(seed), (256, 64)),
          "step": jnp.asarray(seed, jnp.int32)}


def test_flipped_bytes_in_array_data_never_restore_other_values(tmp_path):
  """A flipped byte anywhere in the stored array data either fails the restore (unreadable, or
  the checksum: an error naming the step and the earlier intact one) or changes nothing that is
  read back; it never restores other values (Orbax alone reads some such flips back as other
  weights: those are the checksum errors counted here)."""
  import shutil  # pylint: disable=g-import-not-at-top
  directory = str(tmp_path / "ckpt")
  ckpt = checkpointing.Checkpointer(directory)
  for step in (1, 2):
    ckpt.save(step, _big_state(step), {})
  ckpt.close()
  files = _data_files(directory, 2)
  assert files
  checksum_errors = 0
  for f_index, path in enumerate(files):
    size = os.path.getsize(path)
    for offset in sorted({int(size * q) for q in (0.2, 0.4, 0.6, 0.8)}):
      trial = str(tmp_path / f"trial_{f_index}_{offset}")
      shutil.copytree(directory, trial)
      trial_path = os.path.join(trial, os.path.relpath(path, directory))
      data = bytearray(open(trial_path, "rb").read())
      data[offset] ^= 0x10
      open(trial_path, "wb").write(bytes(data))
      ckpt = checkpointing.Checkpointer(trial)
      try:
        restored, _ = ckpt.restore(_big_state(0))
        _assert_tree_equal(restored, _big_state(2))  # the flip hit nothing that is read back
      except checkpointing.CheckpointError as e:  # unreadable, or the checksum
        assert "step 2" in str(e) and "resume from step 1" in str(e)
        checksum_errors += isinstance(e, checkpointing.CorruptCheckpointError)
      finally:
        ckpt.close()
  assert checksum_errors, "no flip reached the checksum"


def test_checksum_covers_every_leaf_and_key_data():
  a = checkpointing.tree_sha256(_state(1))
  assert a == checkpointing.tree_sha256(_state(1)) and a != checkpointing.tree_sha256(_state(2))
  other_key = {**_state(1), "rng": jax.random.fold_in(jax.random.key(1), 8)}
  assert checkpointing.tree_sha256(other_key) != a
  as_int = {**_state(1), "count": _state(1)["count"].astype(jnp.int64 if jax.config.x64_enabled
                                                             else jnp.uint32)}
  assert checkpointing.tree_sha256(as_int) != a  # dtype is part of the checksum
