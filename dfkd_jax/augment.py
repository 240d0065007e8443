"""Key-driven, differentiable image augmentations for NHWC batches.

Every function takes an explicit PRNG key, is a pure function of (key, x), runs under ``jax.jit``
with static Python hyper-parameters, and is differentiable with respect to the image x (the
augmentations are permutations, masks and affine colour maps of the pixels), so gradients reach the
pixels being optimised (DeepInversion) or the generator.

- ``jitter_flip``: DeepInversion's augmentation (methods.md §5). One random roll (circular
  shift) (dy, dx) ~ U{−j, …, j}² and, optionally, one horizontal flip with probability ½, both
  shared by the whole batch as in the official code:  x̃ = flip^b(roll(x, (dy, dx))).
- ``diff_augment``: DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN
  Training", NeurIPS 2020; methods.md §8), with per-sample random parameters:
    color:       x ← x + (u_b − ½)                   (brightness),
                 x ← (x − x̄_pix)·2u_s + x̄_pix        (saturation; x̄_pix: per-pixel channel mean),
                 x ← (x − x̄_img)·(u_c + ½) + x̄_img   (contrast; x̄_img: per-image mean),
                 with u_b, u_s, u_c ~ U(0, 1);
    translation: integer shift (ty, tx) ~ U{−r, …, r}², r = round(size/8), vacated pixels zeroed;
    cutout:      a square of side round(size/2), centred uniformly (clipped at the borders), zeroed.
  With C = 1 the saturation step is the identity (the channel mean is the pixel itself).

Nothing happens at import time.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

_POLICIES = ("color", "translation", "cutout")


def _check_nhwc(x: jax.Array) -> None:
  if x.ndim != 4:
    raise ValueError(f"expected an NHWC batch of rank 4, got shape {tuple(x.shape)}")


def jitter_flip(key: jax.Array, x: jax.Array, max_shift: int, flip: bool = True) -> jax.Array:
  """DeepInversion jitter: one random roll and an optional random horizontal flip for the batch.

  x̃ = flip^b(roll(x, (dy, dx), axes=(H, W))), with dy, dx ~ U{−max_shift, …, max_shift} and
  b ~ Bernoulli(½) (b = 0 when ``flip=False``). As in the official DeepInversion code, the shift and
  the flip are drawn once and shared by every image of the batch; the roll is circular (pixels that
  leave one side re-enter on the other), so the map is a permutation of the pixels and invertible.

  Args:
    key: PRNG key.
    x: images, [B, H, W, C].
    max_shift: j, the largest shift in pixels (a Python int).
    flip: whether to draw a random horizontal flip.

  Returns:
    The augmented batch, same shape and dtype as x.
  """
  _check_nhwc(x)
  max_shift = int(max_shift)
  if max_shift < 0:
    raise ValueError(f"max_shift must be >= 0, got {max_shift}")
  k_dy, k_dx, k_flip = jax.random.split(key, 3)
  if max_shift > 0:
    dy = jax.random.randint(k_dy, (), -max_shift, max_shift + 1)
    dx = jax.random.randint(k_dx, (), -max_shift, max_shift + 1)
    x = jnp.roll(x, (dy, dx), axis=(1, 2))
  if flip:
    do_flip = jax.random.bernoulli(k_flip)
    x = jnp.where(do_flip, x[:, :, ::-1, :], x)
  return x


def _uniform(key: jax.Array, batch: int, dtype: jnp.dtype) -> jax.Array:
  return jax.random.uniform(key, (batch, 1, 1, 1), dtype=jnp.float32).astype(dtype)


def _color(key: jax.Array, x: jax.Array) -> jax.Array:
  """Per-sample brightness, saturation and contrast (DiffAugment "color")."""
  k_b, k_s, k_c = jax.random.split(key, 3)
  batch = x.shape[0]
  x = x + (_uniform(k_b, batch, x.dtype) - 0.5)
  pix_mean = jnp.mean(x, axis=-1, keepdims=True)
  x = (x - pix_mean) * (2.0 * _uniform(k_s, batch, x.dtype)) + pix_mean
  img_mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  x = (x - img_mean) * (_uniform(k_c, batch, x.dtype) + 0.5) + img_mean
  return x


def _translation(key: jax.Array, x: jax.Array, ratio: float) -> jax.Array:
  """Per-sample integer translation by up to round(ratio·size) pixels, zero fill."""
  batch, height, width, _ = x.shape
  ry, rx = int(height * ratio + 0.5), int(width * ratio + 0.5)
  k_y, k_x = jax.random.split(key)
  ty = jax.random.randint(k_y, (batch,), -ry, ry + 1)
  tx = jax.random.randint(k_x, (batch,), -rx, rx + 1)
  # Output pixel (i, j) of sample b reads input pixel (i − ty_b, j − tx_b), or 0 outside the image.
  src_y = jnp.arange(height)[None, :] - ty[:, None]            # [B, H]
  src_x = jnp.arange(width)[None, :] - tx[:, None]             # [B, W]
  valid = (((src_y >= 0) & (src_y < height))[:, :, None]
           & ((src_x >= 0) & (src_x < width))[:, None, :])     # [B, H, W]
  b = jnp.arange(batch)[:, None, None]
  rows = jnp.clip(src_y, 0, height - 1)[:, :, None]
  cols = jnp.clip(src_x, 0, width - 1)[:, None, :]
  gathered = x[b, rows, cols]
  return jnp.where(valid[..., None], gathered, jnp.zeros((), x.dtype))


def _cutout(key: jax.Array, x: jax.Array, ratio: float) -> jax.Array:
  """Per-sample zeroed square of side round(ratio·size), centre uniform, clipped at the borders."""
  batch, height, width, _ = x.shape
  sy, sx = int(height * ratio + 0.5), int(width * ratio + 0.5)
  k_y, k_x = jax.random.split(key)
  # Centres range over [0, size + (1 − side mod 2)), so an odd square can hang off either side.
  cy = jax.random.randint(k_y, (batch,), 0, height + (1 - sy % 2))
  cx = jax.random.randint(k_x, (batch,), 0, width + (1 - sx % 2))
  lo_y, lo_x = cy - sy // 2, cx - sx // 2
  rows = jnp.arange(height)[None, :]
  cols = jnp.arange(width)[None, :]
  in_y = (rows >= lo_y[:, None]) & (rows < lo_y[:, None] + sy)   # [B, H]
  in_x = (cols >= lo_x[:, None]) & (cols < lo_x[:, None] + sx)   # [B, W]
  cut = in_y[:, :, None] & in_x[:, None, :]                      # [B, H, W]
  return jnp.where(cut[..., None], jnp.zeros((), x.dtype), x)


def diff_augment(key: jax.Array, x: jax.Array,
                 policy: str | Sequence[str] = ("color", "translation", "cutout"),
                 translation_ratio: float = 0.125, cutout_ratio: float = 0.5) -> jax.Array:
  """DiffAugment with per-sample random parameters, applied in ``policy`` order.

  color: x ← x + (u_b − ½); x ← (x − x̄_pix)·2u_s + x̄_pix; x ← (x − x̄_img)·(u_c + ½) + x̄_img,
  with u_b, u_s, u_c ~ U(0, 1) per sample (x̄_pix: mean over channels per pixel; x̄_img: mean over
  H, W, C per image).
  translation: x̃[b, i, j] = x[b, i − ty_b, j − tx_b] (0 outside), ty_b, tx_b ~ U{−r, …, r},
  r = round(translation_ratio · size).
  cutout: x̃[b] = x[b] with a square of side round(cutout_ratio · size) set to 0; its centre is
  uniform over the image (the square is clipped at the borders).

  Args:
    key: PRNG key.
    x: images, [B, H, W, C] (C = 1 or 3, or any C).
    policy: sequence of ``"color"``, ``"translation"``, ``"cutout"``, or a comma-separated string.
    translation_ratio: largest translation as a fraction of the image size (1/8).
    cutout_ratio: side of the cutout square as a fraction of the image size (1/2).

  Returns:
    The augmented batch, same shape and dtype as x.

  Raises:
    ValueError: on an unknown policy name or a non-NHWC input.
  """
  _check_nhwc(x)
  if isinstance(policy, str):
    policy = tuple(p.strip() for p in policy.split(",") if p.strip())
  unknown = [p for p in policy if p not in _POLICIES]
  if unknown:
    raise ValueError(f"unknown DiffAugment policy {unknown}; choose from {_POLICIES}")
  keys = jax.random.split(key, max(len(policy), 1))
  for k, name in zip(keys, policy):
    if name == "color":
      x = _color(k, x)
    elif name == "translation":
      x = _translation(k, x, translation_ratio)
    else:
      x = _cutout(k, x, cutout_ratio)
  return x
