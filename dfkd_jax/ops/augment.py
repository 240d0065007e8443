"""Key-driven, differentiable image augmentations for NHWC batches.

Every function takes an explicit PRNG key, is a pure function of (key, x), runs under ``jax.jit``
with static Python hyper-parameters, and is differentiable with respect to the image x (the
augmentations are permutations, masks and affine colour maps of the pixels), so gradients reach the
pixels being optimised (DeepInversion) or the generator.

- ``jitter_flip``: DeepInversion's augmentation (docs/methods.md §5). One random roll (circular
  shift) (dy, dx) ~ U{−j, …, j}² and, optionally, one horizontal flip with probability ½, both
  shared by the whole batch as in the official code:  x̃ = flip^b(roll(x, (dy, dx))).
- ``diff_augment``: DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN
  Training", NeurIPS 2020; docs/methods.md §8), with per-sample random parameters:
    color:       x ← x + (u_b − ½)                   (brightness),
                 x ← (x − x̄_pix)·2u_s + x̄_pix        (saturation; x̄_pix: per-pixel channel mean),
                 x ← (x − x̄_img)·(u_c + ½) + x̄_img   (contrast; x̄_img: per-image mean),
                 with u_b, u_s, u_c ~ U(0, 1);
    translation: integer shift (ty, tx) ~ U{−r, …, r}², r = round(size/8), vacated pixels zeroed;
    cutout:      a square of side round(size/2), centred uniformly (clipped at the borders), zeroed.
  With C = 1 the saturation step is the identity (the channel mean is the pixel itself).
- ``dsa``: Differentiable Siamese Augmentation as Distribution Matching uses it (docs/methods.md §9):
  one family of color / crop / cutout / flip / scale / rotate per call, parameters shared by the
  batch, so the same key applies the same transform to a real and a synthetic batch.

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


def _roll_hw(x: jax.Array, shift: jax.Array) -> jax.Array:
  """`jnp.roll(x, shift, axis=(1, 2))` for a traced int32 `shift` of shape [2].

  Computed as two matrix products with one-hot permutation matrices, which is
  exact for finite pixels (each output is one input times 1.0 plus zeros).
  `jnp.roll` with a traced shift concatenates the batch with itself and slices
  it; XLA fuses whatever produced the batch into that concatenation and so
  computes it twice, and the roll's transpose is a dynamic-update-slice into a
  doubled buffer: in a DeepInversion pixel step the roll of the gradient (with
  the input layer's gradient fused into it) took a quarter of the step on
  XLA:CPU. A dot is never fused that way, and its transpose is again a dot.
  """
  h, w = x.shape[1], x.shape[2]
  rows = jax.nn.one_hot((jnp.arange(h) - shift[0]) % h, h, dtype=x.dtype)  # [out, in]
  cols = jax.nn.one_hot((jnp.arange(w) - shift[1]) % w, w, dtype=x.dtype)
  x = jnp.einsum("ih,bhwc->biwc", rows, x, precision=jax.lax.Precision.HIGHEST)
  return jnp.einsum("jw,biwc->bijc", cols, x, precision=jax.lax.Precision.HIGHEST)


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
    x = _roll_hw(x, jnp.stack([dy, dx]))
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


# ----------------------------------------------------------------- DSA (Siamese augmentation)

DSA_STRATEGY = "color_crop_cutout_flip_scale_rotate"
_DSA_FAMILIES = ("color", "crop", "cutout", "flip", "scale", "rotate")


def _dsa_color(key: jax.Array, x: jax.Array) -> jax.Array:
  """Brightness, saturation and contrast with one (u_b, u_s, u_c) ~ U(0, 1)³ for the batch."""
  u_b, u_s, u_c = (u.astype(x.dtype) for u in jax.random.uniform(key, (3,)))
  x = x + (u_b - 0.5)
  pix_mean = jnp.mean(x, axis=-1, keepdims=True)
  x = (x - pix_mean) * (2.0 * u_s) + pix_mean
  img_mean = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  return (x - img_mean) * (u_c + 0.5) + img_mean


def _dsa_crop(key: jax.Array, x: jax.Array, ratio: float) -> jax.Array:
  """One integer shift (ty, tx) ~ U{−r, …, r}² for the batch, r = round(ratio·size), zero fill."""
  _, height, width, _ = x.shape
  ry, rx = int(height * ratio + 0.5), int(width * ratio + 0.5)
  k_y, k_x = jax.random.split(key)
  ty = jax.random.randint(k_y, (), -ry, ry + 1)
  tx = jax.random.randint(k_x, (), -rx, rx + 1)
  # x̃[i, j] = x[i − ty, j − tx]: pad by r with zeros, then slice from (r − ty, r − tx).
  padded = jnp.pad(x, ((0, 0), (ry, ry), (rx, rx), (0, 0)))
  return jax.lax.dynamic_slice(padded, (0, ry - ty, rx - tx, 0), x.shape)


def _dsa_cutout(key: jax.Array, x: jax.Array, ratio: float) -> jax.Array:
  """One zeroed square of side round(ratio·size) for the batch, centre uniform (clipped)."""
  _, height, width, _ = x.shape
  sy, sx = int(height * ratio + 0.5), int(width * ratio + 0.5)
  k_y, k_x = jax.random.split(key)
  cy = jax.random.randint(k_y, (), 0, height + (1 - sy % 2))
  cx = jax.random.randint(k_x, (), 0, width + (1 - sx % 2))
  rows = jnp.arange(height) - (cy - sy // 2)
  cols = jnp.arange(width) - (cx - sx // 2)
  cut = (((rows >= 0) & (rows < sy))[:, None] & ((cols >= 0) & (cols < sx))[None, :])
  return jnp.where(cut[None, :, :, None], jnp.zeros((), x.dtype), x)


def _dsa_flip(key: jax.Array, x: jax.Array, prob: float) -> jax.Array:
  """Horizontal flip of the whole batch with probability ``prob``."""
  return jnp.where(jax.random.bernoulli(key, prob), x[:, :, ::-1, :], x)


def _affine_sample(x: jax.Array, matrix: jax.Array) -> jax.Array:
  """Bilinear resampling of every image by one 2×2 map in normalised coordinates, zero outside.

  As PyTorch's ``affine_grid`` + ``grid_sample`` with ``align_corners=True`` (the DSA code): an
  output pixel at normalised position (u, v) ∈ [−1, 1]² (u along the width) reads the input at
  (u', v') = matrix · (u, v); pixel centres 0 and size − 1 sit at −1 and +1.
  """
  _, height, width, _ = x.shape
  v = jnp.linspace(-1.0, 1.0, height) if height > 1 else jnp.zeros((1,))
  u = jnp.linspace(-1.0, 1.0, width) if width > 1 else jnp.zeros((1,))
  vv, uu = jnp.meshgrid(v, u, indexing="ij")                     # [H, W]
  src_u = matrix[0, 0] * uu + matrix[0, 1] * vv
  src_v = matrix[1, 0] * uu + matrix[1, 1] * vv
  px = (src_u + 1.0) * (0.5 * (width - 1))                       # input column, fractional
  py = (src_v + 1.0) * (0.5 * (height - 1))                      # input row, fractional
  x0, y0 = jnp.floor(px), jnp.floor(py)
  out = jnp.zeros_like(x)
  for dy in (0, 1):
    for dx in (0, 1):
      yi, xi = y0 + dy, x0 + dx
      w = (1.0 - jnp.abs(py - yi)) * (1.0 - jnp.abs(px - xi))    # bilinear tap weight
      valid = (yi >= 0) & (yi <= height - 1) & (xi >= 0) & (xi <= width - 1)
      w = jnp.where(valid, w, 0.0).astype(x.dtype)
      rows = jnp.clip(yi, 0, height - 1).astype(jnp.int32)
      cols = jnp.clip(xi, 0, width - 1).astype(jnp.int32)
      out = out + x[:, rows, cols, :] * w[None, :, :, None]
  return out


def _dsa_scale(key: jax.Array, x: jax.Array, ratio: float) -> jax.Array:
  """Zoom by (s_x, s_y) ~ U(1/ratio, ratio)², one draw for the batch, bilinear, zero fill."""
  s = jax.random.uniform(key, (2,), minval=1.0 / ratio, maxval=ratio)
  return _affine_sample(x, jnp.diag(s))


def _dsa_rotate(key: jax.Array, x: jax.Array, degrees: float) -> jax.Array:
  """Rotation by θ ~ U(−degrees, degrees), one draw for the batch, bilinear, zero fill."""
  theta = jax.random.uniform(key, (), minval=-degrees, maxval=degrees) * (jnp.pi / 180.0)
  cos, sin = jnp.cos(theta), jnp.sin(theta)
  return _affine_sample(x, jnp.array([[cos, sin], [-sin, cos]]))


def dsa_families(strategy: str | Sequence[str]) -> tuple[str, ...]:
  """The DSA families of ``strategy`` ("color_crop_…" or a sequence), validated."""
  if isinstance(strategy, str):
    strategy = tuple(s for s in strategy.split("_") if s)
  strategy = tuple(strategy)
  unknown = [s for s in strategy if s not in _DSA_FAMILIES]
  if unknown:
    raise ValueError(f"unknown DSA family {unknown}; choose from {_DSA_FAMILIES} "
                     f"(joined by '_', e.g. {DSA_STRATEGY!r})")
  return strategy


def dsa(key: jax.Array, x: jax.Array, strategy: str | Sequence[str] = DSA_STRATEGY, *,
        crop_ratio: float = 0.125, cutout_ratio: float = 0.5, flip_prob: float = 0.5,
        scale_ratio: float = 1.2, rotate_degrees: float = 15.0) -> jax.Array:
  """Differentiable Siamese Augmentation (Zhao & Bilen, ICML 2021), as Distribution Matching uses it.

  Each call picks ONE family of ``strategy`` uniformly at random and applies it with parameters
  drawn from ``key`` and shared by the whole batch (the official code's single-family mode with a
  seed). Calling ``dsa`` with the same key on two batches (the real and the synthetic images of a
  class) therefore applies the same transform to both ("Siamese"). The families:

    color:  x ← x + (u_b − ½); x ← (x − x̄_pix)·2u_s + x̄_pix; x ← (x − x̄_img)·(u_c + ½) + x̄_img,
            u_b, u_s, u_c ~ U(0, 1) (x̄_pix: channel mean per pixel; x̄_img: mean per image);
    crop:   integer shift (ty, tx) ~ U{−r, …, r}², r = round(crop_ratio · size), zero fill;
    cutout: a square of side round(cutout_ratio · size), centre uniform, zeroed;
    flip:   horizontal flip with probability ``flip_prob``;
    scale:  zoom (s_x, s_y) ~ U(1/scale_ratio, scale_ratio)² about the centre;
    rotate: rotation by θ ~ U(−rotate_degrees, rotate_degrees) about the centre;
  scale and rotate resample bilinearly (PyTorch ``grid_sample``, ``align_corners=True``) with
  zeros outside the image. Every family is differentiable with respect to x; the family is chosen
  with ``lax.switch``, so the function runs under ``jax.jit`` and ``vmap`` (with ``strategy`` and
  the ratios static).

  Args:
    key: PRNG key; the same key gives the same transform on any batch of the same image size.
    x: images, [B, H, W, C].
    strategy: families joined by "_" (default "color_crop_cutout_flip_scale_rotate") or a
      sequence of family names; an empty strategy is the identity.
    crop_ratio: largest shift as a fraction of the size (1/8).
    cutout_ratio: side of the cutout square as a fraction of the size (1/2).
    flip_prob: probability of the horizontal flip (½).
    scale_ratio: largest zoom factor (1.2).
    rotate_degrees: largest rotation angle in degrees (15).

  Returns:
    The augmented batch, same shape and dtype as x.

  Raises:
    ValueError: on an unknown family or a non-NHWC input.
  """
  _check_nhwc(x)
  families = dsa_families(strategy)
  if not families:
    return x
  branches = {
      "color": _dsa_color,
      "crop": lambda k, x: _dsa_crop(k, x, crop_ratio),
      "cutout": lambda k, x: _dsa_cutout(k, x, cutout_ratio),
      "flip": lambda k, x: _dsa_flip(k, x, flip_prob),
      "scale": lambda k, x: _dsa_scale(k, x, scale_ratio),
      "rotate": lambda k, x: _dsa_rotate(k, x, rotate_degrees),
  }
  k_family, k_params = jax.random.split(key)
  if len(families) == 1:
    return branches[families[0]](k_params, x)
  index = jax.random.randint(k_family, (), 0, len(families))
  return jax.lax.switch(index, [branches[f] for f in families], k_params, x)
