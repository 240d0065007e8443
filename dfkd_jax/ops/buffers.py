"""One functional store of synthetic images, `ImageBuffer`, for every method that keeps some.

An `ImageBuffer` is a fixed-capacity ring buffer of *items* of one shape with one interface:
`add(buffer, items)` writes a batch of items at the cursor (the oldest are overwritten once it is
full) and `sample(buffer, key, n)` draws n items uniformly, with replacement, from the filled
part. Two constructors choose the item:

- `pool_init(capacity, image_shape)`, the image pool (DeepInversion, ADI, Fast, NAYER): an item
  is one image; the pool is replicated over the mesh.
- `bank_init(slots, slot_size, image_shape)`, the memory bank (MB-DFKD, docs/methods.md §6): an
  item is one stored batch (a *slot*) of `slot_size` images, sharded like a batch over the mesh's
  data axis. `bank_push` / `bank_sample` say the same in slots: store the first `slot_size`
  images of a batch; draw one filled slot and a `valid` flag, False while the bank is empty
  (callers mask the replay loss with it).

All functions are pure and jit-friendly; with the state donated, XLA updates the buffers in
place. A buffer is a part of `DFKDState`, so it is checkpointed and restored with it.
"""
from __future__ import annotations

from flax import struct
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from dfkd_jax import parallel


class ImageBuffer(struct.PyTreeNode):
  """A ring buffer of `capacity` items of shape `item_shape` (see the module docstring).

  `batch_axis` (static) is the item axis that holds a batch of images, sharded over the mesh's
  data axis (the bank: 0); None keeps the whole buffer replicated (the pool).
  """
  images: jax.Array   # [capacity, *item_shape]
  cursor: jax.Array   # next write position
  count: jax.Array    # number of filled items (<= capacity)
  batch_axis: int | None = struct.field(pytree_node=False, default=None)

  @property
  def capacity(self) -> int:
    return self.images.shape[0]

  @property
  def item_shape(self) -> tuple[int, ...]:
    return tuple(self.images.shape[1:])

  @property
  def nbytes(self) -> int:
    return int(self.images.size * self.images.dtype.itemsize)

  # The memory bank's names for the same quantities.
  slots = capacity

  @property
  def slot_size(self) -> int:
    return self.images.shape[1]

  def sharding(self, mesh) -> NamedSharding | None:
    """The images' sharding on `mesh` (None: replicated)."""
    if self.batch_axis is None:
      return None
    spec = [None] * self.images.ndim
    spec[1 + self.batch_axis] = parallel.DATA_AXIS
    return NamedSharding(mesh, P(*spec))

  def place(self, mesh) -> "ImageBuffer":
    """The buffer on `mesh` (used by `train.distill.place_state` after replication)."""
    sharding = self.sharding(mesh)
    return self if sharding is None else self.replace(
        images=parallel.put(self.images, sharding))


def init(capacity: int, item_shape, dtype=jnp.float32, batch_axis: int | None = None
         ) -> ImageBuffer:
  """An empty buffer of `capacity` zero items of shape `item_shape`."""
  if capacity < 1:
    raise ValueError(f"A buffer needs a capacity of at least 1, got {capacity}.")
  return ImageBuffer(images=jnp.zeros((capacity, *item_shape), dtype),
                     cursor=jnp.zeros((), jnp.int32), count=jnp.zeros((), jnp.int32),
                     batch_axis=batch_axis)


def add(buffer: ImageBuffer, items: jax.Array, mesh=None) -> ImageBuffer:
  """Writes `items` ([n, *item_shape], n <= capacity) at the cursor, wrapping around.

  With `mesh` (inside jit), the images keep the buffer's sharding (`ImageBuffer.sharding`).
  """
  n = items.shape[0]
  if n > buffer.capacity:
    raise ValueError(f"Cannot add {n} items to a buffer of capacity {buffer.capacity}.")
  if tuple(items.shape[1:]) != buffer.item_shape:
    raise ValueError(f"Items of shape {tuple(items.shape[1:])} do not fit a buffer of "
                     f"{buffer.item_shape} items.")
  items = items.astype(buffer.images.dtype)
  if n == 1:  # one item (a bank slot): an in-place dynamic update, no scatter
    images = jax.lax.dynamic_update_index_in_dim(buffer.images, items[0], buffer.cursor, 0)
  else:
    images = buffer.images.at[(buffer.cursor + jnp.arange(n)) % buffer.capacity].set(items)
  sharding = buffer.sharding(mesh) if mesh is not None else None
  if sharding is not None:
    images = jax.lax.with_sharding_constraint(images, sharding)
  return buffer.replace(images=images, cursor=(buffer.cursor + n) % buffer.capacity,
                        count=jnp.minimum(buffer.count + n, buffer.capacity))


def sample(buffer: ImageBuffer, key: jax.Array, n: int) -> jax.Array:
  """n items drawn uniformly (with replacement) from the filled part.

  An empty buffer returns item 0 (zeros) n times; callers mask on `buffer.count > 0`.
  """
  idx = jax.random.randint(key, (n,), 0, jnp.maximum(buffer.count, 1))
  return buffer.images[idx]


# ----------------------------------------------------------------------------- the image pool


def pool_init(capacity: int, image_shape, dtype=jnp.float32) -> ImageBuffer:
  """An empty image pool: `capacity` single images, replicated over the mesh."""
  return init(capacity, image_shape, dtype)


# ----------------------------------------------------------------------------- the memory bank


def bank_init(slots: int, slot_size: int, image_shape, dtype=jnp.float32) -> ImageBuffer:
  """An empty memory bank: `slots` stored batches of `slot_size` images each."""
  if slots < 1 or slot_size < 1:
    raise ValueError(f"A memory bank needs slots >= 1 and slot_size >= 1, got {slots} and "
                     f"{slot_size} (config.mb_dfkd.slots / slot_size).")
  return init(slots, (slot_size, *image_shape), dtype, batch_axis=0)


def bank_push(bank: ImageBuffer, batch: jax.Array, mesh=None) -> ImageBuffer:
  """Stores `batch[:slot_size]` as one slot (`add` of one item); the oldest slot goes when full."""
  if batch.shape[0] < bank.slot_size:
    raise ValueError(f"Cannot fill a slot of {bank.slot_size} images from a batch of "
                     f"{batch.shape[0]}: lower mb_dfkd.slot_size or raise the batch size.")
  return add(bank, batch[None, :bank.slot_size], mesh)


def bank_sample(bank: ImageBuffer, key: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One filled slot drawn uniformly (`sample` of one item), and `valid` (False while empty)."""
  return sample(bank, key, 1)[0], bank.count > 0
