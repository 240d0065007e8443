"""Image generators of DAFL, DFAD, ZSKT and PRE-DFKD (docs/methods.md §2-§4, §7).

`Generator` is the DAFL / DFAD / PRE-DFKD architecture (image size s, latent d,
ngf = 64 in all three official codes):

  Linear(d -> 2ngf (s/4)^2) -> reshape -> BN(2ngf, eps 1e-5)
  -> x2 nearest -> Conv3x3(2ngf -> 2ngf) -> BN(eps=bn_eps) -> LeakyReLU(0.2)
  -> x2 nearest -> Conv3x3(2ngf -> ngf) -> BN(eps=bn_eps) -> LeakyReLU(0.2)
  -> Conv3x3(ngf -> C) -> tanh (optional) -> BN(C, affine=False, eps 1e-5)

* DAFL: `bn_eps=0.8` (PyTorch `BatchNorm2d(n, 0.8)`), the default.
* DFAD ("GeneratorA"): `bn_eps=1e-5`.
* PRE-DFKD novel generator: `bn_eps=0.8, spectral_norm=True,
  weight_init="uniform008"`; its memory generator (VAE decoder) is the same
  without spectral normalisation.

`ZSKTGenerator` is ZSKT's generator: Linear(d -> 2ngf n0^2) -> BN -> nearest
resize n0 -> s/2 -> Conv(2ngf) -> BN -> LReLU -> x2 -> Conv(ngf) -> BN ->
LReLU -> Conv(C) -> BN(C, affine=False), with n0 = round(10 s / 32) (10 for
32x32; all BN eps 1e-5) and no tanh.

Conventions:
* Generators run BN with batch statistics when `train=True` (the official
  codes always do) and update the running averages in `batch_stats`;
  `train=False` uses the running averages.
* The linear output is reshaped channel-major, `[B, 2ngf, s/4, s/4]`, and then
  transposed to NHWC, so a PyTorch generator's linear weights map over
  unchanged.
* Exact x2 nearest upsampling (`upsample_nearest_2x`) is a broadcast and a
  reshape, which is cheaper than `jax.image.resize` and equal to it. With
  `numerics.upsample_conv="subpixel"` an upsampling followed by a 3x3 conv is
  computed without the upsampled map, phase by phase on the small one
  (`conv.upsample2x_conv`: about half those convs' FLOPs, the same function up
  to float rounding, the same parameters). ZSKT's
  x1.6 step uses `jax.image.resize(..., "nearest")`, whose half-pixel
  index rounding differs from PyTorch's `floor(i / 1.6)` for 6 of the 16
  output rows/columns; both duplicate 6 of the 10 input rows/columns.
* Spectral norm: `flax.linen.SpectralNorm` around each of the three 3x3 convs,
  one power iteration per call; `u` and `sigma` live in `batch_stats` and are
  updated only when `train=True` (with `train=False` a power iteration from
  the stored `u` still runs but nothing is stored, whereas PyTorch's eval mode
  reuses the stored vectors as is).
* `weight_init="default"` reproduces PyTorch's default initialisation used by
  the official DAFL/DFAD/ZSKT code: weights U(+-1/sqrt(fan_in))
  (Kaiming-uniform with a = sqrt(5)) and biases U(+-1/sqrt(fan_in));
  `weight_init="uniform008"` is PRE-DFKD's U(-0.08, 0.08) weights with zero
  biases. (The attribute is `weight_init`, not `init`, because a field named
  `init` would shadow `nn.Module.init`.) BN layers start at
  scale 1, bias 0 in both cases.
* The output is always float32; `dtype` sets the compute dtype of the hidden
  layers.

Exact parameter counts (32x32x3, ngf = 64): d = 1000 (DAFL/PRE-DFKD):
8,423,939 (docs/methods.md's 8.42 M; spectral norm adds no parameters, only
`batch_stats` state); d = 256 (DFAD): 2,329,091; ZSKTGenerator at d = 100:
1,516,547.
"""

import functools
import math
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfkd_jax import numerics as numerics_lib
from dfkd_jax.models import conv as conv_lib
from dfkd_jax.models import norm as norm_lib

Initializer = Callable[..., jax.Array]

INITS = ("default", "uniform008")


def upsample_nearest_2x(x: jax.Array) -> jax.Array:
  """Exact x2 nearest-neighbour upsampling of an NHWC batch.

  Equals `jax.image.resize(x, (B, 2H, 2W, C), "nearest")` (and PyTorch's
  `interpolate(scale_factor=2)`), but is a broadcast plus a reshape.

  Args:
    x: `[B, H, W, C]`.

  Returns:
    `[B, 2H, 2W, C]`, each input pixel repeated in a 2x2 block.
  """
  b, h, w, c = x.shape
  x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c))
  return x.reshape(b, 2 * h, 2 * w, c)


def _uniform(bound: float) -> Initializer:
  """Initializer drawing from U(-bound, bound)."""

  def init(key: jax.Array, shape: tuple[int, ...],
           dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _layer_inits(init: str, fan_in: int) -> tuple[Initializer, Initializer]:
  """Returns `(kernel_init, bias_init)` for a conv/linear layer.

  Args:
    init: "default" (PyTorch's default) or "uniform008" (PRE-DFKD).
    fan_in: inputs per output unit (in_features x kernel area).

  Raises:
    ValueError: for an unknown `init`.
  """
  if init == "default":
    bound = 1.0 / math.sqrt(fan_in)
    return _uniform(bound), _uniform(bound)
  if init == "uniform008":
    return _uniform(0.08), nn.initializers.zeros
  raise ValueError(f"Unknown generator init {init!r}; expected one of {INITS}.")


class _ConvBlock(nn.Module):
  """Conv3x3 (optionally spectrally normalised), with PyTorch-style bias.

  Attributes:
    features: output channels.
    weight_init: "default" or "uniform008".
    spectral_norm: wrap the conv in `nn.SpectralNorm`.
    dtype: compute dtype.
  """
  features: int
  weight_init: str
  spectral_norm: bool
  dtype: Any
  upsample: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    """Applies the 3x3 'SAME' conv (to `upsample_nearest_2x(x)` if `upsample`); SN statistics
    update only if `train`. With `upsample` and `numerics.upsample_conv="subpixel"` the conv
    runs phase by phase on `x` (`conv.upsample2x_conv`); the parameters are the same."""
    kernel_init, bias_init = _layer_inits(self.weight_init, 9 * x.shape[-1])
    conv_cls = conv_lib.Conv
    if self.upsample and numerics_lib.current().upsample_conv == "subpixel":
      conv_cls = conv_lib.UpsampleConv
    elif self.upsample:
      x = upsample_nearest_2x(x)
    conv = conv_cls(self.features, (3, 3), padding=1, dtype=self.dtype,
                    kernel_init=kernel_init, bias_init=bias_init, name="conv")
    if self.spectral_norm:
      return nn.SpectralNorm(conv, n_steps=1, name="sn")(x, update_stats=train)
    return conv(x)


def _check_img_size(img_size: int) -> None:
  """Raises a ValueError unless `img_size` is a positive multiple of 4."""
  if img_size % 4 != 0 or img_size <= 0:
    raise ValueError(
        f"Generator img_size must be a positive multiple of 4, got {img_size}.")


def _project(z: jax.Array, channels: int, size: int, init: str,
             dtype: Any) -> jax.Array:
  """Linear(d -> channels * size^2), reshaped channel-major to NHWC."""
  kernel_init, bias_init = _layer_inits(init, z.shape[-1])
  x = nn.Dense(channels * size * size, dtype=dtype, kernel_init=kernel_init,
               bias_init=bias_init, name="linear")(z)
  x = x.reshape(z.shape[0], channels, size, size)
  return jnp.transpose(x, (0, 2, 3, 1))


class Generator(nn.Module):
  """DAFL/DFAD/PRE-DFKD generator; see the module docstring for the layers.

  Attributes:
    img_size: output height and width s; must be a multiple of 4.
    channels: output channels C.
    ngf: base width; the hidden maps have 2ngf and ngf channels.
    bn_eps: epsilon of the two BNs after the hidden convs (DAFL/PRE-DFKD 0.8,
      DFAD 1e-5); the first and last BN always use 1e-5.
    spectral_norm: spectral normalisation on the three convs (PRE-DFKD).
    final_tanh: apply tanh before the final affine-free BN.
    weight_init: "default" (PyTorch default) or "uniform008" (PRE-DFKD).
      (Named `weight_init`, not `init`, which would shadow `Module.init`.)
    dtype: compute dtype of the hidden layers (parameters stay float32).
  """
  img_size: int = 32
  channels: int = 3
  ngf: int = 64
  bn_eps: float = 0.8
  spectral_norm: bool = False
  final_tanh: bool = True
  weight_init: str = "default"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
    """Maps latents `[B, d]` to images `[B, s, s, C]` (float32).

    Args:
      z: latent batch.
      train: use batch statistics and update `batch_stats` (and spectral-norm
        state); False uses the running averages.

    Raises:
      ValueError: if `img_size` is not a multiple of 4, or `weight_init` is
        unknown.
    """
    _check_img_size(self.img_size)
    norm = functools.partial(norm_lib.BatchNorm, use_running_average=not train,
                             momentum=0.9, dtype=self.dtype)
    conv = functools.partial(_ConvBlock, weight_init=self.weight_init,
                             spectral_norm=self.spectral_norm,
                             dtype=self.dtype)
    x = _project(z, 2 * self.ngf, self.img_size // 4, self.weight_init,
                 self.dtype)
    x = norm(epsilon=1e-5, name="bn0")(x)
    x = conv(2 * self.ngf, upsample=True, name="block1")(x, train)
    x = nn.leaky_relu(norm(epsilon=self.bn_eps, name="bn1")(x), 0.2)
    x = conv(self.ngf, upsample=True, name="block2")(x, train)
    x = nn.leaky_relu(norm(epsilon=self.bn_eps, name="bn2")(x), 0.2)
    x = conv(self.channels, name="block3")(x, train)
    x = x.astype(jnp.float32)
    if self.final_tanh:
      x = jnp.tanh(x)
    return norm_lib.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, use_scale=False, use_bias=False,
                        dtype=jnp.float32, name="bn_out")(x)



def _decoder_tail(x, conv, norm, ngf: int, channels: int, train: bool,
                  upsample_first: bool) -> jax.Array:
  """The shared end of the ZSKT and Fast/NAYER decoders, built in the caller's compact scope:
  [x2 if `upsample_first`] -> block1 (2 ngf) -> bn1 -> LReLU(0.2) -> x2 -> block2 (ngf) -> bn2
  -> LReLU -> block3."""
  x = conv(2 * ngf, upsample=upsample_first, name="block1")(x, train)
  x = nn.leaky_relu(norm(name="bn1")(x), 0.2)
  x = conv(ngf, upsample=True, name="block2")(x, train)
  x = nn.leaky_relu(norm(name="bn2")(x), 0.2)
  return conv(channels, name="block3")(x, train)

class ZSKTGenerator(nn.Module):
  """ZSKT generator (no tanh; x1.6 then x2 nearest upsampling).

  Attributes:
    img_size: output height and width s; must be a multiple of 4. The first
      map is round(10 s / 32) pixels wide, resized to s/2, then doubled.
    channels: output channels C.
    ngf: base width; the hidden maps have 2ngf and ngf channels.
    bn_eps: epsilon of every BN (ZSKT: PyTorch's default 1e-5).
    weight_init: "default" (PyTorch default) or "uniform008".
    dtype: compute dtype of the hidden layers (parameters stay float32).
  """
  img_size: int = 32
  channels: int = 3
  ngf: int = 64
  bn_eps: float = 1e-5
  weight_init: str = "default"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
    """Maps latents `[B, d]` to images `[B, s, s, C]` (float32).

    Raises:
      ValueError: if `img_size` is not a multiple of 4, or `weight_init` is
        unknown.
    """
    _check_img_size(self.img_size)
    norm = functools.partial(norm_lib.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=self.bn_eps,
                             dtype=self.dtype)
    init_size = max(1, round(10 * self.img_size / 32))
    half = self.img_size // 2
    x = _project(z, 2 * self.ngf, init_size, self.weight_init, self.dtype)
    x = norm(name="bn0")(x)
    x = jax.image.resize(x, (x.shape[0], half, half, x.shape[-1]), "nearest")
    conv = functools.partial(_ConvBlock, weight_init=self.weight_init,
                             spectral_norm=False, dtype=self.dtype)
    x = _decoder_tail(x, conv, norm, self.ngf, self.channels, train, upsample_first=False)
    return norm_lib.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=self.bn_eps, use_scale=False, use_bias=False,
                        dtype=jnp.float32, name="bn_out")(x.astype(jnp.float32))


class _SigmoidTrunk(nn.Module):
  """The Fast/NAYER decoder (docs/methods.md §11): Linear -> BN -> x2 -> Conv -> BN -> LReLU ->
  x2 -> Conv -> BN -> LReLU -> Conv -> sigmoid, then the teacher's input normalisation.

  The sigmoid puts the images in [0, 1] pixel units and `(x - mean) / std` maps them into the
  teacher's normalised input space, so the generator covers exactly the range real images have
  (the DAFL generator's final tanh + affine-free BN does not: see benchmarks/RESULTS.md §9).
  """
  img_size: int
  channels: int
  ngf: int
  mean: tuple[float, ...]
  std: tuple[float, ...]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, train: bool) -> jax.Array:
    _check_img_size(self.img_size)
    norm = functools.partial(norm_lib.BatchNorm, use_running_average=not train, momentum=0.9,
                             epsilon=1e-5, dtype=self.dtype)
    conv = functools.partial(_ConvBlock, weight_init="default", spectral_norm=False,
                             dtype=self.dtype)
    x = _project(h, 2 * self.ngf, self.img_size // 4, "default", self.dtype)
    x = norm(name="bn0")(x)
    x = _decoder_tail(x, conv, norm, self.ngf, self.channels, train, upsample_first=True)
    pixels = jax.nn.sigmoid(x.astype(jnp.float32))
    return (pixels - jnp.asarray(self.mean, jnp.float32)) / jnp.asarray(self.std, jnp.float32)


class FastGenerator(nn.Module):
  """Fast-DFKD's generator: latent z [B, d] -> normalised images (docs/methods.md §11.2).

  PyTorch-default initialisation (U(+-1/sqrt(fan_in)) weights and biases); every BN eps 1e-5.
  """
  img_size: int = 32
  channels: int = 3
  ngf: int = 64
  mean: tuple[float, ...] = (0.0,)
  std: tuple[float, ...] = (1.0,)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = True) -> jax.Array:
    return _SigmoidTrunk(self.img_size, self.channels, self.ngf, self.mean, self.std,
                         self.dtype, name="trunk")(z, train)


class NoisyLayerGenerator(FastGenerator):
  """NAYER's generator (docs/methods.md §12.2): label embeddings [B, L] -> normalised images.

  h = BN1d(e_y) (batch statistics, learnable affine); row i goes through noisy layer
  `i // num_classes` (a Linear(L -> emb_size), re-drawn by the method before every synthesis
  loop), then the `_SigmoidTrunk` decoder. The noisy layers are stacked into one
  `noisy/kernel [n, L, E]`, `noisy/bias [n, E]` pair and applied with one einsum; a batch that
  is not a multiple of `num_classes` is padded, so its last rows share the last layer.

  Attributes (after `FastGenerator`'s, whose trunk it shares):
    num_layers: noisy layers n (= ceil(batch / num_classes)).
    num_classes: K, the rows served by each noisy layer.
    emb_size: noisy-layer output width (NAYER: 1000).
  """
  num_layers: int = 1
  num_classes: int = 10
  emb_size: int = 1000

  @nn.compact
  def __call__(self, emb: jax.Array, train: bool = True) -> jax.Array:
    b, l = emb.shape
    n, k = self.num_layers, self.num_classes
    if b > n * k:
      raise ValueError(f"A batch of {b} label embeddings needs at least ceil({b}/{k}) noisy "
                       f"layers; the generator has {n}.")
    h = norm_lib.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                           dtype=self.dtype, name="bn_emb")(emb)
    kernel = self.param("noisy_kernel", nn.initializers.normal(1.0), (n, l, self.emb_size))
    bias = self.param("noisy_bias", nn.initializers.zeros, (n, self.emb_size))
    h = jnp.pad(h, ((0, n * k - b), (0, 0))).reshape(n, k, l)
    h = (jnp.einsum("nkl,nle->nke", h, kernel) + bias[:, None, :]).reshape(n * k, -1)[:b]
    return _SigmoidTrunk(self.img_size, self.channels, self.ngf, self.mean, self.std,
                         self.dtype, name="trunk")(h, train)


NOISY_PARAMS = ("noisy_kernel", "noisy_bias")
