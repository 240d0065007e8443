"""Fixed-capacity, functional stores of synthetic images, kept in `DFKDState`.

- `ImagePool` (DeepInversion/ADI): a ring buffer of single images; `pool_push` writes a batch at
  the cursor (wrapping), `pool_sample` draws images uniformly from the filled part.
- `MemoryBank` (MB-DFKD, docs/methods.md §6): a ring buffer of *slots*, each one stored batch of
  `slot_size` images; `bank_push` stores the first `slot_size` images of a batch in the slot at
  the cursor (overwriting the oldest when full), `bank_sample` returns one filled slot drawn
  uniformly plus a `valid` flag that is False while the bank is empty (callers mask the replay
  loss with it).

All functions are pure and jit-friendly; with the state donated, XLA updates the buffers in
place. Both live in `DFKDState`, so they are checkpointed and restored with it.
"""
from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from dfkd_jax import parallel


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


class MemoryBank(struct.PyTreeNode):
  images: jax.Array   # [slots, slot_size, H, W, C]
  cursor: jax.Array   # next slot to write
  count: jax.Array    # number of filled slots (<= slots)

  @property
  def slots(self) -> int:
    return self.images.shape[0]

  @property
  def slot_size(self) -> int:
    return self.images.shape[1]

  @property
  def nbytes(self) -> int:
    return int(self.images.size * self.images.dtype.itemsize)


def bank_init(slots: int, slot_size: int, image_shape, dtype=jnp.float32) -> MemoryBank:
  """An empty bank of `slots` slots of `slot_size` images each."""
  if slots < 1 or slot_size < 1:
    raise ValueError(f"A memory bank needs slots >= 1 and slot_size >= 1, got {slots} and "
                     f"{slot_size} (config.mb_dfkd.slots / slot_size).")
  return MemoryBank(images=jnp.zeros((slots, slot_size, *image_shape), dtype),
                    cursor=jnp.zeros((), jnp.int32), count=jnp.zeros((), jnp.int32))


def bank_sharding(mesh) -> NamedSharding:
  """Bank images are sharded like a batch: the slot axis is split over the `data` axis."""
  return NamedSharding(mesh, P(None, parallel.DATA_AXIS))


def bank_push(bank: MemoryBank, batch: jax.Array, mesh=None) -> MemoryBank:
  """Stores `batch[:slot_size]` in the slot at the cursor; the oldest slot goes when full.

  With `mesh` (inside jit), the images stay sharded as `bank_sharding(mesh)`.
  """
  if batch.shape[0] < bank.slot_size:
    raise ValueError(f"Cannot fill a slot of {bank.slot_size} images from a batch of "
                     f"{batch.shape[0]}: lower mb_dfkd.slot_size or raise the batch size.")
  if batch.shape[1:] != bank.images.shape[2:]:
    raise ValueError(f"Images of shape {batch.shape[1:]} do not fit a bank of "
                     f"{bank.images.shape[2:]} images.")
  slot = batch[:bank.slot_size].astype(bank.images.dtype)
  images = jax.lax.dynamic_update_index_in_dim(bank.images, slot, bank.cursor, 0)
  if mesh is not None:
    images = jax.lax.with_sharding_constraint(images, bank_sharding(mesh))
  return bank.replace(images=images, cursor=(bank.cursor + 1) % bank.slots,
                      count=jnp.minimum(bank.count + 1, bank.slots))


def bank_sample(bank: MemoryBank, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One filled slot drawn uniformly, and `valid` (False while the bank is empty).

  An empty bank returns slot 0 (zeros); multiply the replay loss by `valid`.
  """
  i = jax.random.randint(key, (), 0, jnp.maximum(bank.count, 1))
  return jax.lax.dynamic_index_in_dim(bank.images, i, 0, keepdims=False), bank.count > 0
