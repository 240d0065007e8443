"""Class-conditional projection discriminator on teacher features (docs/methods.md §8).

D(h, y) = SN-Linear(512 -> 1)(phi(h)) + <E_y, phi(h)>, with
phi = SN-Linear(F -> 512) -> LReLU(.2) -> SN-Linear(512 -> 512) -> LReLU(.2) and E a spectrally
normalised class embedding (a bias-free SN-Linear on the one-hot label; Miyato & Koyama, ICLR
2018). Spectral-norm power-iteration vectors live in `batch_stats` and are updated only with
`update_stats=True` (the discriminator's own step).
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp


class ProjectionDiscriminator(nn.Module):
  num_classes: int
  hidden: int = 512

  @nn.compact
  def __call__(self, h: jax.Array, y: jax.Array, update_stats: bool = False) -> jax.Array:
    """Scores features h [B, F] with labels y [B] (int): returns [B] logits."""

    def sn_dense(features, x, name, use_bias=True):
      return nn.SpectralNorm(nn.Dense(features, use_bias=use_bias), name=name)(
          x, update_stats=update_stats)

    h = h.astype(jnp.float32)
    phi = nn.leaky_relu(sn_dense(self.hidden, h, "fc1"), 0.2)
    phi = nn.leaky_relu(sn_dense(self.hidden, phi, "fc2"), 0.2)
    out = sn_dense(1, phi, "out")[:, 0]
    embed = sn_dense(self.hidden, jax.nn.one_hot(y, self.num_classes), "embed", use_bias=False)
    return out + jnp.sum(embed * phi, axis=-1)
