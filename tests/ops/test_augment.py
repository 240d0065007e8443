"""Tests of dfkd_jax.ops.augment: shapes, determinism, randomness, differentiability,
invertibility."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.ops import augment


def _images(c=3, b=4, h=8, w=8, seed=0):
  return jax.random.normal(jax.random.key(seed), (b, h, w, c))


def _find_jitter_params(x, y, max_shift):
  """All (dy, dx, flip) with flip(roll(x)) == y for the WHOLE batch (brute force, numpy)."""
  x, y = np.asarray(x), np.asarray(y)
  found = []
  for dy in range(-max_shift, max_shift + 1):
    for dx in range(-max_shift, max_shift + 1):
      rolled = np.roll(x, (dy, dx), axis=(1, 2))
      for flip in (False, True):
        cand = rolled[:, :, ::-1, :] if flip else rolled
        if np.array_equal(cand, y):
          found.append((dy, dx, flip))
  return found


# ----------------------------------------------------------------- jitter_flip


def test_jitter_flip_shape_determinism_and_keys():
  x = _images()
  y1 = augment.jitter_flip(jax.random.key(1), x, 2)
  y2 = augment.jitter_flip(jax.random.key(1), x, 2)
  assert y1.shape == x.shape and y1.dtype == x.dtype
  np.testing.assert_array_equal(y1, y2)
  others = [augment.jitter_flip(jax.random.key(k), x, 2) for k in range(2, 8)]
  assert any(not np.array_equal(y1, o) for o in others)


def test_jitter_flip_is_invertible_roll_and_flip_shared_by_batch():
  x = _images(b=3)
  flips = set()
  for k in range(12):
    y = augment.jitter_flip(jax.random.key(k), x, 2)
    params = _find_jitter_params(x, y, 2)
    assert len(params) == 1, params  # one (dy, dx, flip) for the whole batch, |shift| <= 2
    dy, dx, flip = params[0]
    flips.add(flip)
    # Invert: undo the flip, then the roll.
    y = np.asarray(y)
    back = np.roll(y[:, :, ::-1, :] if flip else y, (-dy, -dx), axis=(1, 2))
    np.testing.assert_array_equal(back, np.asarray(x))
  assert flips == {False, True}


def test_jitter_flip_identity_and_no_flip():
  x = _images()
  np.testing.assert_array_equal(augment.jitter_flip(jax.random.key(0), x, 0, flip=False), x)
  for k in range(6):
    y = augment.jitter_flip(jax.random.key(k), x, 1, flip=False)
    assert all(not f for _, _, f in _find_jitter_params(x, y, 1))


def test_jitter_flip_gradient_is_a_permutation():
  x = _images()
  w = jax.random.normal(jax.random.key(9), x.shape)
  g = jax.grad(lambda x: jnp.sum(w * augment.jitter_flip(jax.random.key(3), x, 2)))(x)
  assert float(jnp.abs(g).sum()) > 0.0
  np.testing.assert_allclose(np.sort(np.ravel(g)), np.sort(np.ravel(w)), rtol=1e-6)


def test_jitter_flip_jit():
  x = _images()
  f = jax.jit(augment.jitter_flip, static_argnames=("max_shift", "flip"))
  np.testing.assert_array_equal(f(jax.random.key(5), x, max_shift=2),
                                augment.jitter_flip(jax.random.key(5), x, 2))


# ----------------------------------------------------------------- diff_augment


@pytest.mark.parametrize("c", [1, 3])
def test_diff_augment_shape_determinism_keys(c):
  x = _images(c=c)
  y1 = augment.diff_augment(jax.random.key(1), x)
  y2 = augment.diff_augment(jax.random.key(1), x)
  y3 = augment.diff_augment(jax.random.key(2), x)
  assert y1.shape == x.shape and y1.dtype == x.dtype
  np.testing.assert_array_equal(y1, y2)
  assert not np.allclose(y1, y3)
  assert bool(jnp.all(jnp.isfinite(y1)))


@pytest.mark.parametrize("c", [1, 3])
@pytest.mark.parametrize("policy", [("color",), ("translation",), ("cutout",),
                                    ("color", "translation", "cutout")])
def test_diff_augment_gradients_nonzero(c, policy):
  x = _images(c=c)
  w = jax.random.normal(jax.random.key(9), x.shape)
  g = jax.grad(lambda x: jnp.sum(w * augment.diff_augment(jax.random.key(4), x, policy)))(x)
  assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).sum()) > 0.0


def test_diff_augment_color_per_sample_brightness():
  # On a zero image saturation and contrast are the identity: each sample is u_b − ½, constant.
  x = jnp.zeros((6, 4, 4, 3))
  y = np.asarray(augment.diff_augment(jax.random.key(0), x, ("color",)))
  per_sample = y.reshape(6, -1)
  np.testing.assert_allclose(per_sample, per_sample[:, :1] * np.ones_like(per_sample), atol=1e-6)
  assert np.all(np.abs(per_sample[:, 0]) <= 0.5)
  assert len(np.unique(np.round(per_sample[:, 0], 6))) > 1  # per-sample parameters


def test_diff_augment_translation_zero_fill_per_sample():
  b, h, w = 8, 16, 16
  x = jnp.ones((b, h, w, 1))
  y = np.asarray(augment.diff_augment(jax.random.key(0), x, ("translation",)))
  r = 2  # round(16 / 8)
  shapes = set()
  for i in range(b):
    ones = y[i, :, :, 0] > 0.5
    rows, cols = np.where(ones)
    ty, tx = h - (rows.max() - rows.min() + 1), w - (cols.max() - cols.min() + 1)
    assert ones.sum() == (h - ty) * (w - tx)   # a single rectangle survives, the rest is zero
    assert 0 <= ty <= r and 0 <= tx <= r
    assert set(np.unique(y[i])) <= {0.0, 1.0}
    shapes.add((rows.min(), cols.min(), rows.max(), cols.max()))
  assert len(shapes) > 1  # per-sample shifts
  # Content moves: a translated image equals a shifted copy of the input.
  x = _images(c=1, b=4, h=16, w=16)
  y = np.asarray(augment.diff_augment(jax.random.key(1), x, ("translation",)))
  xn = np.asarray(x)
  for i in range(4):
    ok = False
    for dy in range(-r, r + 1):
      for dx in range(-r, r + 1):
        shifted = np.zeros_like(xn[i])
        src = xn[i, max(0, -dy):h - max(0, dy), max(0, -dx):w - max(0, dx)]
        shifted[max(0, dy):max(0, dy) + src.shape[0], max(0, dx):max(0, dx) + src.shape[1]] = src
        ok |= np.allclose(shifted, y[i])
    assert ok


def test_diff_augment_cutout_square():
  b, h = 16, 16
  x = jnp.ones((b, h, h, 3))
  y = np.asarray(augment.diff_augment(jax.random.key(0), x, ("cutout",)))
  side = 8
  counts, corners = [], set()
  for i in range(b):
    zero = y[i, :, :, 0] == 0.0
    assert np.array_equal(zero[..., None].repeat(3, -1), y[i] == 0.0)  # all channels zeroed
    rows, cols = np.where(zero)
    assert len(rows) > 0
    hh, ww = rows.max() - rows.min() + 1, cols.max() - cols.min() + 1
    assert hh <= side and ww <= side and zero.sum() == hh * ww  # a (clipped) square
    counts.append(zero.sum())
    corners.add((rows.min(), cols.min()))
  assert max(counts) == side * side  # some squares lie fully inside the image
  assert len(corners) > 1  # per-sample positions


def test_diff_augment_jit_and_policy_string():
  x = _images(c=1)
  f = jax.jit(augment.diff_augment, static_argnames=("policy",))
  np.testing.assert_allclose(f(jax.random.key(3), x, policy="color,translation,cutout"),
                             augment.diff_augment(jax.random.key(3), x), rtol=1e-6, atol=1e-6)
  with pytest.raises(ValueError, match="unknown DiffAugment policy"):
    augment.diff_augment(jax.random.key(3), x, ("colour",))
