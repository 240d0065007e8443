r"""Replay memory of each mechanism as a run grows (issue 4 / issue 6 "scaling"): PRE-DFKD's VAE
(parameters: constant), MB-DFKD's memory bank (constant once full) and an unbounded store of
every synthetic image the student has seen (what replaying "everything" would need).

  python benchmarks/replay_memory.py

Sizes are computed from the real modules (`jax.eval_shape`, no weights materialised) for the
configs' own settings: the Fashion-MNIST CPU config (32x32x1, B 128) and the official CIFAR
settings (32x32x3, B 1024, d 1000, 400 epochs x 36 iterations x 10 student steps).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from dfkd_jax import state as state_lib
from dfkd_jax.models import vae as vae_lib

MIB = 2 ** 20


def vae_bytes(size, channels, latent, ngf) -> int:
  module = vae_lib.VAE(img_size=size, channels=channels, latent_dim=latent, ngf=ngf)
  shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0)},
                                              jnp.zeros((2, size, size, channels)),
                                              jax.random.key(1), train=False))
  return state_lib.tree_bytes(shapes["params"])


def rows():
  settings = [
      # name, image shape, batch, VAE latent, VAE ngf, bank slots, slot size, iterations,
      # student steps per iteration
      ("Fashion-MNIST CPU config", (32, 32, 1), 128, 100, 32, 10, 16, 120, 5),
      ("CIFAR, official settings", (32, 32, 3), 1024, 1000, 64, 10, 128, 400 * 36, 10),
  ]
  for name, (h, w, c), batch, latent, ngf, slots, slot, iters, steps in settings:
    image = h * w * c * 4
    yield (name, vae_bytes(h, c, latent, ngf), slots * slot * image,
           [(f, f * iters * steps * batch * image) for f in (0.1, 1.0)])


def main():
  print("| setting | PRE-DFKD VAE params | MB-DFKD bank (full) | unbounded store at 10% of the "
        "run | unbounded store at the end |")
  print("|---|---|---|---|---|")
  for name, vae, bank, store in rows():
    print(f"| {name} | {vae / MIB:.1f} MiB | {bank / MIB:.2f} MiB | {store[0][1] / MIB:,.0f} MiB "
          f"| {store[1][1] / MIB:,.0f} MiB |")


if __name__ == "__main__":
  main()
