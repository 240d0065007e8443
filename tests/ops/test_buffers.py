"""Tests of the functional image pool (`buffers.ImageBuffer`)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.ops import buffers

SHAPE = (2, 2, 1)


def _images(values):
  """A batch of constant images, image i filled with values[i] (identifiable after a push)."""
  return jnp.stack([jnp.full(SHAPE, v, jnp.float32) for v in values])


def _ids(images):
  return np.asarray(images)[:, 0, 0, 0].tolist()


def test_init_is_empty():
  pool = buffers.pool_init(5, SHAPE)
  assert pool.capacity == 5
  assert pool.images.shape == (5, *SHAPE)
  assert int(pool.cursor) == 0 and int(pool.count) == 0


def test_push_wraps_around_in_order():
  pool = buffers.pool_init(5, SHAPE)
  pool = buffers.add(pool, _images([1, 2, 3]))
  assert _ids(pool.images) == [1, 2, 3, 0, 0]
  assert int(pool.cursor) == 3 and int(pool.count) == 3
  pool = buffers.add(pool, _images([4, 5, 6]))
  # 4 and 5 fill the end; 6 wraps to slot 0 and overwrites the oldest image (1).
  assert _ids(pool.images) == [6, 2, 3, 4, 5]
  assert int(pool.cursor) == 1 and int(pool.count) == 5


def test_push_under_jit_matches_eager():
  pool = buffers.pool_init(5, SHAPE)
  push = jax.jit(buffers.add)
  for batch in ([1, 2, 3], [4, 5, 6], [7, 8]):
    pool = push(pool, _images(batch))
  assert _ids(pool.images) == [6, 7, 8, 4, 5]
  assert int(pool.cursor) == 3 and int(pool.count) == 5


def test_push_casts_to_pool_dtype():
  pool = buffers.pool_init(3, SHAPE, dtype=jnp.bfloat16)
  pool = buffers.add(pool, _images([1.5]))
  assert pool.images.dtype == jnp.bfloat16
  assert _ids(pool.images) == [1.5, 0, 0]


def test_sample_only_from_filled_entries():
  pool = buffers.pool_init(8, SHAPE)
  pool = buffers.add(pool, _images([11, 12, 13]))
  draws = _ids(jax.jit(buffers.sample, static_argnums=2)(pool, jax.random.key(0), 300))
  # Never an empty (zero) slot, and with 300 draws every filled entry shows up.
  assert set(draws) == {11, 12, 13}


def test_sample_after_wrap_covers_whole_pool():
  pool = buffers.pool_init(4, SHAPE)
  pool = buffers.add(pool, _images([1, 2, 3]))
  pool = buffers.add(pool, _images([4, 5]))
  draws = _ids(buffers.sample(pool, jax.random.key(1), 300))
  assert set(draws) == {2, 3, 4, 5}


def test_sample_shape_and_key_dependence():
  pool = buffers.add(buffers.pool_init(16, SHAPE), _images(range(1, 17)))
  a = buffers.sample(pool, jax.random.key(0), 32)
  b = buffers.sample(pool, jax.random.key(1), 32)
  assert a.shape == (32, *SHAPE)
  assert not np.array_equal(a, b)
  np.testing.assert_array_equal(a, buffers.sample(pool, jax.random.key(0), 32))


def test_empty_pool_sample_is_index_zero():
  pool = buffers.pool_init(4, SHAPE)
  draws = buffers.sample(pool, jax.random.key(0), 10)
  np.testing.assert_array_equal(draws, np.zeros((10, *SHAPE)))


def test_push_more_than_capacity_raises():
  pool = buffers.pool_init(5, SHAPE)
  with pytest.raises(ValueError, match="capacity 5"):
    buffers.add(pool, _images(range(6)))


def test_push_exactly_capacity():
  pool = buffers.add(buffers.pool_init(3, SHAPE), _images([1, 2]))
  pool = buffers.add(pool, _images([7, 8, 9]))
  # Slots 2, 0, 1 receive 7, 8, 9; the cursor comes back to 2.
  assert _ids(pool.images) == [8, 9, 7]
  assert int(pool.cursor) == 2 and int(pool.count) == 3


# ----------------------------------------------------------------------------- memory bank


def _batch(value, n=4):
  """A batch of n images; image i of the batch holds value + i / 100 (slot order visible)."""
  return jnp.stack([jnp.full(SHAPE, value + i / 100, jnp.float32) for i in range(n)])


def _slot_ids(bank):
  return np.round(np.asarray(bank.images)[:, 0, 0, 0, 0], 2).tolist()


def test_bank_push_wraps_around_oldest_first():
  bank = buffers.bank_init(3, 2, SHAPE)
  assert bank.slots == 3 and bank.slot_size == 2 and int(bank.count) == 0
  push = jax.jit(buffers.bank_push)
  for v in (1, 2, 3, 4, 5):
    bank = push(bank, _batch(v))
  # Slots hold pushes 4, 5, 3: the 4th and 5th overwrote the two oldest (1, 2).
  assert _slot_ids(bank) == [4, 5, 3]
  assert int(bank.cursor) == 2 and int(bank.count) == 3
  # A slot stores the FIRST slot_size images of the pushed batch, in order.
  np.testing.assert_allclose(np.asarray(bank.images)[0, :, 0, 0, 0], [4.0, 4.01])
  assert bank.nbytes == 3 * 2 * 4 * 4


def test_bank_samples_only_filled_slots_and_flags_empty():
  bank = buffers.bank_init(5, 2, SHAPE)
  x, valid = buffers.bank_sample(bank, jax.random.key(0))
  assert not bool(valid) and x.shape == (2, *SHAPE) and not np.any(np.asarray(x))
  bank = buffers.bank_push(buffers.bank_push(bank, _batch(7)), _batch(8))
  sample = jax.jit(buffers.bank_sample)
  seen = set()
  for i in range(60):
    x, valid = sample(bank, jax.random.key(i))
    assert bool(valid)
    seen.add(round(float(x[0, 0, 0, 0]), 2))
  assert seen == {7.0, 8.0}  # both filled slots, never an empty one


def test_bank_rejects_bad_pushes():
  bank = buffers.bank_init(2, 4, SHAPE)
  with pytest.raises(ValueError, match="slot of 4 images from a batch of 3"):
    buffers.bank_push(bank, _batch(1, n=3))
  with pytest.raises(ValueError, match="do not fit"):
    buffers.bank_push(bank, jnp.zeros((4, 3, 3, 1)))
  with pytest.raises(ValueError, match="slots >= 1"):
    buffers.bank_init(0, 4, SHAPE)


def test_pool_and_bank_are_one_buffer_type():
  """The pool and the bank share `add`/`sample`: a bank item is a whole slot."""
  pool, bank = buffers.pool_init(4, SHAPE), buffers.bank_init(4, 2, SHAPE)
  assert type(pool) is type(bank) and pool.batch_axis is None and bank.batch_axis == 0
  bank = buffers.add(bank, jnp.stack([_batch(5, n=2), _batch(6, n=2)]))
  assert _slot_ids(bank) == [5, 6, 0, 0] and int(bank.count) == 2
  drawn = buffers.sample(bank, jax.random.key(0), 16)
  assert drawn.shape == (16, 2, *SHAPE)
  assert set(np.round(np.asarray(drawn)[:, 0, 0, 0, 0], 2).tolist()) <= {5.0, 6.0}
  with pytest.raises(ValueError, match="do not fit"):
    buffers.add(pool, _batch(1, n=2)[None])


@pytest.mark.multidevice
def test_bank_push_keeps_slot_axis_sharded_like_a_batch():
  from dfkd_jax import parallel  # pylint: disable=g-import-not-at-top
  mesh = parallel.make_mesh(8)
  bank = buffers.bank_init(2, 8, SHAPE)
  bank = bank.place(mesh)
  bank = jax.jit(lambda b, x: buffers.bank_push(b, x, mesh))(bank, _batch(3, n=8))
  assert bank.images.sharding.is_equivalent_to(bank.sharding(mesh), 5)
  assert {s.data.shape for s in bank.images.addressable_shards} == {(2, 1, *SHAPE)}
