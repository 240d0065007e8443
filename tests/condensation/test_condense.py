"""Tests of dataset condensation: DSA, ConvNet-3, Distribution Matching, few-shot sampling, the
condensed-set file format and its loader, and the `python -m dfkd_jax.condensation.condense` CLI."""

import json
import os

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.ops import augment
from dfkd_jax.condensation import condense
from dfkd_jax.condensation import condensed_set as condensed
from dfkd_jax import models
from dfkd_jax.data import datasets
from dfkd_jax.models import convnet

_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")
# Jitted once per (shape, strategy): eager dispatch of lax.switch branches is slow on CPU.
_dsa = jax.jit(augment.dsa, static_argnames=("strategy",))


def _images(c=1, b=4, h=16, w=16, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, h, w, c))


@pytest.fixture(scope="module")
def fmnist_small():
  """The first 600 Fashion-MNIST training images at their native 28x28 (normalised)."""
  helpers.require_fashion_mnist()
  return datasets.load_split("fashion_mnist", "train", limit=600)


# ----------------------------------------------------------------- DSA


@pytest.mark.parametrize("strategy", list(_FAMILIES) + [augment.DSA_STRATEGY])
def test_dsa_same_key_same_transform_on_two_batches(strategy):
  # Siamese: the parameters are shared by the batch, so transforming a real batch and a synthetic
  # batch separately with one key equals transforming them together.
  real, syn = _images(b=5, seed=1), _images(b=2, seed=2)
  for k in range(8):
    key = jax.random.key(k)
    both = _dsa(key, jnp.concatenate([real, syn]), strategy=strategy)
    np.testing.assert_allclose(_dsa(key, real, strategy=strategy), both[:5], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_dsa(key, syn, strategy=strategy), both[5:], rtol=1e-5, atol=1e-5)
  outs = [np.asarray(_dsa(jax.random.key(k), real, strategy=strategy)) for k in range(8)]
  assert any(not np.allclose(outs[0], o) for o in outs[1:])  # the key matters


@pytest.mark.parametrize("strategy", list(_FAMILIES) + [augment.DSA_STRATEGY])
def test_dsa_differentiable_and_jittable(strategy):
  x = _images(c=3)
  w = jax.random.normal(jax.random.key(9), x.shape)
  grad = jax.jit(jax.grad(lambda x, key: jnp.sum(w * augment.dsa(key, x, strategy))))
  for k in range(3):
    g = grad(x, jax.random.key(k))
    assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(g).sum()) > 0.0
  # Eager and jitted agree.
  np.testing.assert_allclose(_dsa(jax.random.key(0), x, strategy=strategy),
                             augment.dsa(jax.random.key(0), x, strategy), rtol=1e-5, atol=1e-5)


def test_dsa_picks_one_family_per_call():
  # Flip and crop only: every output is a flip of the whole batch, or one shift of the whole batch.
  x = np.asarray(_images(b=3, h=16, w=16))
  seen = set()
  for k in range(24):
    y = np.asarray(_dsa(jax.random.key(k), jnp.asarray(x), strategy="flip_crop"))
    if np.array_equal(y, x[:, :, ::-1]):
      seen.add("flip")
      continue
    matches = []
    for dy in range(-2, 3):
      for dx in range(-2, 3):
        shifted = np.zeros_like(x)
        src = x[:, max(0, -dy):16 - max(0, dy), max(0, -dx):16 - max(0, dx)]
        shifted[:, max(0, dy):max(0, dy) + src.shape[1], max(0, dx):max(0, dx) + src.shape[2]] = src
        matches.append(np.array_equal(shifted, y))
    assert any(matches), k  # one shift (|t| <= round(16/8) = 2) shared by the batch
    seen.add("flip" if np.array_equal(y, x) else "crop")
  assert seen == {"flip", "crop"}


def test_dsa_geometric_families():
  ones = jnp.ones((2, 17, 17, 1))
  for k in range(6):
    key = jax.random.key(k)
    # Rotation (|θ| <= 15°) and zoom keep the centre and stay in [0, 1] (bilinear, zero fill).
    for fam in ("rotate", "scale"):
      y = np.asarray(_dsa(key, ones, strategy=fam))
      assert np.allclose(y[:, 8, 8], 1.0) and y.min() >= -1e-6 and y.max() <= 1 + 1e-6
      np.testing.assert_array_equal(y[0], y[1])  # shared by the batch
    # Cutout: one square of side round(17/2) = 9 (clipped) zeroed in every image alike.
    y = np.asarray(_dsa(key, ones, strategy="cutout"))
    zero = y[..., 0] == 0
    np.testing.assert_array_equal(zero[0], zero[1])
    rows, cols = np.where(zero[0])
    hh, ww = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert hh <= 9 and ww <= 9 and zero[0].sum() == hh * ww
  # A 90° rotation through the same sampler is an exact rot90 (pixel centres map to centres).
  x = _images(b=2, h=9, w=9)
  m = jnp.array([[0.0, 1.0], [-1.0, 0.0]])
  np.testing.assert_allclose(augment._affine_sample(x, m), jnp.rot90(x, 3, axes=(1, 2)),
                             atol=1e-5)
  np.testing.assert_allclose(augment._affine_sample(x, jnp.eye(2)), x, atol=1e-5)
  # Some rotation actually rotates: the corners of a ones image fall outside and drop.
  corners = [float(_dsa(jax.random.key(k), ones, strategy="rotate")[0, 0, 0, 0])
             for k in range(6)]
  assert min(corners) < 0.99


def test_dsa_rejects_unknown_family():
  with pytest.raises(ValueError, match="unknown DSA family"):
    augment.dsa(jax.random.key(0), _images(), "color_zoom")
  np.testing.assert_array_equal(augment.dsa(jax.random.key(0), _images(), ""), _images())


# ----------------------------------------------------------------- ConvNet-3


def test_convnet3_contract_and_size():
  module = models.get_model("convnet3", 10)
  x = jnp.zeros((2, 32, 32, 1))
  variables = jax.jit(module.init)(jax.random.key(0), x)
  apply = jax.jit(module.apply, static_argnames=("train",))
  assert set(variables) == {"params"}  # instance norm: no batch statistics
  count = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(variables))
  assert count == 317_706
  logits, aux = apply(variables, jax.random.normal(jax.random.key(1), x.shape), train=True)
  assert logits.shape == (2, 10) and aux["feature"].shape == (2, 2048)
  assert [s.shape for s in aux["stages"]] == [(2, 16, 16, 128), (2, 8, 8, 128), (2, 4, 4, 128)]
  # PyTorch default init: U(±1/sqrt(fan_in)).
  k2 = np.asarray(variables["params"]["conv2"]["kernel"])
  assert np.abs(k2).max() <= 1 / np.sqrt(9 * 128) + 1e-7
  assert np.abs(k2).max() > 0.9 / np.sqrt(9 * 128)
  # Every image is embedded independently of its batch (instance norm).
  xb = jax.random.normal(jax.random.key(2), (3, 32, 32, 1))
  f_all = apply(variables, xb)[1]["feature"]
  f_one = apply(variables, xb[:1])[1]["feature"]
  np.testing.assert_allclose(f_all[:1], f_one, rtol=1e-4, atol=1e-5)


# ----------------------------------------------------------------- Distribution Matching


def test_dm_reduces_the_matching_loss(fmnist_small):
  images, labels = fmnist_small
  groups = condense.group_by_class(images, labels, 10)[:3]  # 3 classes, unequal counts
  assert len({len(g) for g in groups}) > 1
  model = convnet.ConvNet(num_classes=3, width=16, depth=2)
  result = condense.distribution_matching(
      jax.random.key(0), groups, ipc=2, iterations=20, model=model, real_batch=32, lr=1.0,
      init="noise", strategy="color_crop_flip", log_every=1000, print_fn=None)
  assert result.images.shape == (6, 28, 28, 1) and result.images.dtype == np.float32
  np.testing.assert_array_equal(result.labels, [0, 0, 1, 1, 2, 2])
  assert result.losses.shape == (20,) and np.all(np.isfinite(result.losses))
  assert result.real_batch == 32
  # The per-iteration loss (fresh network each time) falls ...
  assert result.losses[-5:].mean() < 0.5 * result.losses[:5].mean()
  # ... and so does a fixed-network distance to the real class means (no augmentation).
  key, real = jax.random.key(123), [g[:48] for g in groups]
  before = condense.embedding_distance(key, real, result.init_images.reshape(3, 2, 28, 28, 1),
                                       model=model)
  after = condense.embedding_distance(key, real, result.images.reshape(3, 2, 28, 28, 1),
                                      model=model)
  assert after < 0.5 * before, (before, after)


def test_dm_real_init_and_bad_options(fmnist_small):
  images, labels = fmnist_small
  groups = condense.group_by_class(images, labels, 10)[:2]
  init, chosen = condense.initial_images(np.random.default_rng(0), groups, 3, "real")
  assert init.shape == (2, 3, 28, 28, 1)
  for c in range(2):
    np.testing.assert_array_equal(init[c], groups[c][chosen[c]])
  with pytest.raises(ValueError, match="fewer than --ipc"):
    condense.initial_images(np.random.default_rng(0), groups, 10_000, "real")
  with pytest.raises(ValueError, match="ipc >= 1"):
    condense.distribution_matching(jax.random.key(0), groups, 0, 1, print_fn=None)


# ----------------------------------------------------------------- few-shot


def test_fewshot_indices_k_per_class_deterministic(fmnist_small):
  _, labels = fmnist_small
  idx = condense.fewshot_indices(labels, 5, 10, seed=0)
  assert idx.shape == (50,) and len(set(idx.tolist())) == 50
  assert idx.min() >= 0 and idx.max() < len(labels)
  np.testing.assert_array_equal(labels[idx], np.repeat(np.arange(10), 5))
  np.testing.assert_array_equal(idx, condense.fewshot_indices(labels, 5, 10, seed=0))
  assert not np.array_equal(idx, condense.fewshot_indices(labels, 5, 10, seed=1))
  with pytest.raises(ValueError, match="fewer than --k"):
    condense.fewshot_indices(labels, 1000, 10, seed=0)


def test_fewshot_cli_in_process(tmp_path, capsys):
  helpers.require_fashion_mnist()
  out = str(tmp_path / "sub" / "fs.npz")
  assert condense.main(["--kind", "fewshot", "--k", "3", "--seed", "7", "--pad_to", "32",
                        "--train_limit", "600", "--out", out]) == 0
  images, labels, meta = condensed.load_condensed(out, image_shape=(32, 32, 1), num_classes=10)
  assert os.path.isfile(str(tmp_path / "sub" / "fs.png"))
  assert meta["kind"] == "fewshot" and meta["seed"] == 7 and meta["ipc"] == 3
  np.testing.assert_array_equal(np.bincount(labels, minlength=10), [3] * 10)
  # All from the train split, at the recorded indices, in the teacher's input space.
  train_x, train_y = datasets.load_split("fashion_mnist", "train", pad_to=32, limit=600)
  np.testing.assert_array_equal(images, train_x[meta["indices"]])
  np.testing.assert_array_equal(labels, train_y[meta["indices"]])
  assert "Wrote" in capsys.readouterr().out


# ----------------------------------------------------------------- file format and loader


def _save(path, n=20, shape=(32, 32, 1), num_classes=10, **meta):
  rng = np.random.default_rng(0)
  images = rng.standard_normal((n,) + shape).astype(np.float32)
  labels = (np.arange(n) % num_classes).astype(np.int32)
  meta = {"dataset": "fashion_mnist", "pad_to": shape[0] if shape[0] != 28 else 0, "kind": "dm",
          "ipc": n // num_classes, "seed": 0, "iterations": 5, "num_classes": num_classes, **meta}
  condensed.save_condensed(str(path), images, labels, meta)
  return images, labels


def test_npz_round_trip(tmp_path):
  path = tmp_path / "a" / "b" / "c.npz"
  images, labels = _save(path)
  x, y, meta = condensed.load_condensed(str(path), image_shape=(32, 32, 1), num_classes=10)
  assert x.dtype == np.float32 and y.dtype == np.int32
  np.testing.assert_array_equal(x, images)
  np.testing.assert_array_equal(y, labels)
  assert meta["kind"] == "dm" and meta["num_classes"] == 10 and meta["pad_to"] == 32
  assert meta["created"].endswith("Z") and meta["num_images"] == 20
  assert os.listdir(path.parent) == ["c.npz"]  # no temporary file left behind
  with np.load(str(path), allow_pickle=False) as data:  # plain arrays, no pickles
    assert json.loads(str(data["meta"]))["ipc"] == 2
  # (H, W) alone is accepted too; no checks at all by default.
  condensed.load_condensed(str(path), image_shape=(32, 32))
  condensed.load_condensed(str(path))


def test_loader_shape_mismatch_names_pad_to(tmp_path):
  path = tmp_path / "c.npz"
  _save(path, shape=(28, 28, 1))
  with pytest.raises(condensed.CondensedDataError,
                     match=r"28x28x1 but the teacher expects 32x32x1: rebuild with --pad_to 32"):
    condensed.load_condensed(str(path), image_shape=(32, 32, 1))
  path2 = tmp_path / "d.npz"
  _save(path2, shape=(32, 32, 1))
  with pytest.raises(condensed.CondensedDataError, match=r"--pad_to 0"):
    condensed.load_condensed(str(path2), image_shape=(28, 28, 1))


def test_loader_channel_mismatch(tmp_path):
  path = tmp_path / "c.npz"
  _save(path, shape=(32, 32, 1))
  with pytest.raises(condensed.CondensedDataError, match=r"32x32x1 but the teacher expects "
                                                         r"32x32x3.*--dataset"):
    condensed.load_condensed(str(path), image_shape=(32, 32, 3))


def test_loader_class_count_and_label_range(tmp_path):
  path = tmp_path / "c.npz"
  _save(path)
  with pytest.raises(condensed.CondensedDataError, match=r"10 classes.*teacher has 100"):
    condensed.load_condensed(str(path), num_classes=100)
  # Labels beyond the teacher's classes (the meta record says nothing about classes).
  bad = tmp_path / "bad.npz"
  condensed.save_condensed(str(bad), np.zeros((4, 32, 32, 1)), [0, 1, 2, 12], {"kind": "dm"})
  with pytest.raises(condensed.CondensedDataError, match=r"span \[0, 12\].*\[0, 10\)"):
    condensed.load_condensed(str(bad), num_classes=10)
  neg = tmp_path / "neg.npz"
  condensed.save_condensed(str(neg), np.zeros((2, 32, 32, 1)), [0, -1], {"kind": "dm"})
  with pytest.raises(condensed.CondensedDataError, match="span"):
    condensed.load_condensed(str(neg))


def test_loader_missing_file_and_not_npz(tmp_path):
  with pytest.raises(condensed.CondensedDataError,
                     match=r"does not exist.*dfkd_jax.condensation.condense"):
    condensed.load_condensed(str(tmp_path / "nope.npz"))
  text = tmp_path / "text.npz"
  text.write_text("hello")
  with pytest.raises(condensed.CondensedDataError, match="not a readable .npz"):
    condensed.load_condensed(str(text))


def test_loader_missing_keys_and_bad_arrays(tmp_path):
  path = tmp_path / "c.npz"
  np.savez(str(path), images=np.zeros((2, 8, 8, 1), np.float32), labels=np.zeros(2, np.int32))
  with pytest.raises(condensed.CondensedDataError, match=r"lacks the key\(s\) \['meta'\]"):
    condensed.load_condensed(str(path))
  meta = np.asarray(json.dumps({"num_classes": 10}))
  cases = {
      "rank3": (np.zeros((2, 8, 8), np.float32), np.zeros(2, np.int32), "not \\[N, H, W, C\\]"),
      "n_mismatch": (np.zeros((3, 8, 8, 1), np.float32), np.zeros(2, np.int32), "3 images but"),
      "nan": (np.full((2, 8, 8, 1), np.nan, np.float32), np.zeros(2, np.int32), "non-finite"),
      "empty": (np.zeros((0, 8, 8, 1), np.float32), np.zeros(0, np.int32), "holds no images"),
  }
  for name, (images, labels, pattern) in cases.items():
    p = tmp_path / f"{name}.npz"
    np.savez(str(p), images=images, labels=labels, meta=meta)
    with pytest.raises(condensed.CondensedDataError, match=pattern):
      condensed.load_condensed(str(p))
  with pytest.raises(condensed.CondensedDataError, match="non-finite"):
    condensed.save_condensed(str(tmp_path / "x.npz"), np.full((1, 4, 4, 1), np.inf), [0], {})
  # The errors are ValueErrors, on one line.
  try:
    condensed.load_condensed(str(tmp_path / "nan.npz"))
  except ValueError as e:
    assert "\n" not in str(e)


# ----------------------------------------------------------------- CLI


def test_cli_dm_end_to_end(tmp_path):
  helpers.require_fashion_mnist()
  out = str(tmp_path / "c.npz")
  proc = helpers.run_cli("dfkd_jax.condensation.condense", "--kind", "dm", "--ipc", "1",
                         "--iters", "3", "--train_limit", "512", "--pad_to", "32", "--out", out)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "it/s, ETA" in proc.stdout
  images, labels, meta = condensed.load_condensed(out, image_shape=(32, 32, 1), num_classes=10)
  assert images.shape == (10, 32, 32, 1)
  np.testing.assert_array_equal(labels, np.arange(10))
  assert meta["kind"] == "dm" and meta["ipc"] == 1 and meta["iterations"] == 3
  assert meta["dataset"] == "fashion_mnist" and meta["pad_to"] == 32 and meta["seed"] == 0
  assert os.path.getsize(str(tmp_path / "c.png")) > 0


@pytest.mark.parametrize("argv,pattern", [
    (["--ipc", "0"], "--ipc must be >= 1"),
    (["--kind", "mtt"], "invalid choice"),
    (["--bogus"], "unrecognized arguments"),
    (["--iters", "ten"], "invalid int value"),
    (["--pad_to", "20"], "--pad_to must be 0 or >= the native size 28"),
    (["--dataset", "imagenet"], "Unknown dataset"),
    (["--out", "c.txt"], "must end in .npz"),
    (["--dsa", "color_zoom"], "unknown DSA family"),
])
def test_cli_bad_flags_one_line_exit_2(argv, pattern, capsys):
  assert condense.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1, err
  assert pattern in err


def test_cli_missing_dataset_is_one_line(tmp_path, capsys):
  assert condense.main(["--kind", "fewshot", "--data_dir", str(tmp_path),
                        "--out", str(tmp_path / "c.npz")]) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and err.count("\n") == 1 and "not prepared" in err
