"""PRE-DFKD's memory generator: a VAE in image space (docs/methods.md §7).

`VAE` = `Encoder` E_m + decoder G_m, where G_m is the PRE-DFKD generator (`Generator` with
`bn_eps=0.8`, `weight_init="uniform008"`) without spectral normalisation:

  E_m: [input normalisation] -> Conv3x3(C->64) -> BN(eps .8) -> LReLU(.2)
       -> Conv3x3(64->128) -> BN(eps .8) -> LReLU(.2) -> x0.5 nearest
       -> Conv3x3(128->128, stride 2) -> BN(eps 1e-5) -> x0.5 nearest
       -> flatten (128 (s/8)^2) -> two Linear heads to d (mu, log sigma^2).

Input normalisation (`normalize`):
* "height" (faithful): the official code L2-normalises the input along PyTorch dim 2 of NCHW,
  i.e. the image *height* (axis 1 in NHWC), an odd choice reproduced as is.
* "none" (our default, our choice): no normalisation; the synthetic images are already
  per-channel standardised by the generator's final BatchNorm, so the encoder sees inputs on the
  same scale as the teacher does.

The x0.5 nearest downsampling keeps the even rows and columns (PyTorch's
`interpolate(scale_factor=0.5)`). The stride-2 conv pads one pixel on each side, as PyTorch's
`padding=1`. Flattening is NHWC-major (no PyTorch weight conversion is offered for the VAE).

Methods: `__call__(x, key, train)` -> (x_hat, mu, logvar) with the reparameterisation
z = mu + eps exp(logvar / 2); `encode(x, train)` -> (mu, logvar); `decode(z, train)` -> images.
Select them with `module.apply(variables, ..., method="decode")`.

Parameter counts at d = 1000, 32x32x3, ngf = 64 (checked by tests/phases/test_replay.py): decoder
8,423,939, encoder 4,321,872 (docs/methods.md's 8.42 M and 4.32 M); 12,745,811 in all (48.6 MiB).
"""
from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfkd_jax.models import conv as conv_lib
from dfkd_jax.models import norm as norm_lib
from dfkd_jax.models.generators import Generator
from dfkd_jax.models.generators import _layer_inits

NORMALIZE = ("height", "none")


class Encoder(nn.Module):
  """E_m: images [B, s, s, C] -> (mu, logvar), each [B, latent_dim]."""
  latent_dim: int = 1000
  bn_eps: float = 0.8
  normalize: str = "none"
  weight_init: str = "uniform008"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True):
    if self.normalize not in NORMALIZE:
      raise ValueError(f"Unknown encoder normalize {self.normalize!r}; valid: "
                       f"{', '.join(NORMALIZE)}.")
    if x.shape[1] % 8:
      raise ValueError(f"The VAE encoder needs an image size divisible by 8, got {x.shape[1]}.")
    if self.normalize == "height":
      x = x / jnp.maximum(jnp.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    norm = functools.partial(norm_lib.BatchNorm, use_running_average=not train, momentum=0.9,
                             dtype=self.dtype)

    def conv(features, y, stride=1, name=None):
      k_init, b_init = _layer_inits(self.weight_init, 9 * y.shape[-1])
      return conv_lib.Conv(features, (3, 3), strides=stride, padding=((1, 1), (1, 1)),
                     kernel_init=k_init, bias_init=b_init, dtype=self.dtype, name=name)(y)

    x = nn.leaky_relu(norm(epsilon=self.bn_eps, name="bn1")(conv(64, x, name="conv1")), 0.2)
    x = nn.leaky_relu(norm(epsilon=self.bn_eps, name="bn2")(conv(128, x, name="conv2")), 0.2)
    x = x[:, ::2, ::2]
    x = norm(epsilon=1e-5, name="bn3")(conv(128, x, stride=2, name="conv3"))
    x = x[:, ::2, ::2]
    h = x.reshape(x.shape[0], -1).astype(jnp.float32)
    k_init, b_init = _layer_inits(self.weight_init, h.shape[-1])
    mu = nn.Dense(self.latent_dim, kernel_init=k_init, bias_init=b_init, name="mu")(h)
    logvar = nn.Dense(self.latent_dim, kernel_init=k_init, bias_init=b_init, name="logvar")(h)
    return mu, logvar


class VAE(nn.Module):
  """PRE-DFKD memory generator: `Encoder` + `Generator` decoder (no spectral norm)."""
  img_size: int = 32
  channels: int = 3
  latent_dim: int = 1000
  ngf: int = 64
  bn_eps: float = 0.8
  normalize: str = "none"
  weight_init: str = "uniform008"

  def setup(self):
    self.encoder = Encoder(latent_dim=self.latent_dim, bn_eps=self.bn_eps,
                           normalize=self.normalize, weight_init=self.weight_init)
    self.decoder = Generator(img_size=self.img_size, channels=self.channels, ngf=self.ngf,
                             bn_eps=self.bn_eps, spectral_norm=False, final_tanh=True,
                             weight_init=self.weight_init)

  def encode(self, x, train: bool = True):
    return self.encoder(x, train)

  def decode(self, z, train: bool = True):
    return self.decoder(z, train)

  def __call__(self, x, key, train: bool = True):
    mu, logvar = self.encoder(x, train)
    z = mu + jax.random.normal(key, mu.shape, mu.dtype) * jnp.exp(0.5 * logvar)
    return self.decoder(z, train), mu, logvar
