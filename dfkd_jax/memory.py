"""Fixed-capacity, functional stores of synthetic images, kept in `DFKDState`.

`ImagePool` (DeepInversion/ADI): a ring buffer of single images; `push` writes a batch at the
cursor (wrapping), `sample` draws uniformly from the filled part. All functions are pure and
jit-friendly; with the state donated, XLA updates the buffer in place.
"""
from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp


class ImagePool(struct.PyTreeNode):
  images: jax.Array   # [capacity, H, W, C]
  cursor: jax.Array   # next write position
  count: jax.Array    # number of filled entries (<= capacity)

  @property
  def capacity(self) -> int:
    return self.images.shape[0]


def pool_init(capacity: int, image_shape, dtype=jnp.float32) -> ImagePool:
  return ImagePool(images=jnp.zeros((capacity, *image_shape), dtype),
                   cursor=jnp.zeros((), jnp.int32), count=jnp.zeros((), jnp.int32))


def pool_push(pool: ImagePool, batch: jax.Array) -> ImagePool:
  """Writes `batch` at the cursor, wrapping around; the oldest entries are overwritten."""
  n = batch.shape[0]
  if n > pool.capacity:
    raise ValueError(f"Cannot push {n} images into a pool of capacity {pool.capacity}.")
  idx = (pool.cursor + jnp.arange(n)) % pool.capacity
  images = pool.images.at[idx].set(batch.astype(pool.images.dtype))
  return pool.replace(images=images, cursor=(pool.cursor + n) % pool.capacity,
                      count=jnp.minimum(pool.count + n, pool.capacity))


def pool_sample(pool: ImagePool, key: jax.Array, n: int) -> jax.Array:
  """Draws n images uniformly (with replacement) from the filled entries.

  An empty pool returns zeros-filled draws from index 0; callers mask on `pool.count > 0`.
  """
  idx = jax.random.randint(key, (n,), 0, jnp.maximum(pool.count, 1))
  return pool.images[idx]
