"""Tests of `combinators`: sequence, repeat and when on a toy state (no models)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.phases import combinators


def _add(amount, name="value"):
  """A phase that adds `amount` to the state and reports the new value."""

  def phase(state, key):
    del key
    state = state + amount
    return state, {name: state}

  return phase


def _times(factor):

  def phase(state, key):
    del key
    return state * factor, {"value": state * factor}

  return phase


def _record_key(state, key):
  """Reports the key's raw bits so that tests can compare the keys phases receive."""
  return state, {"key": jax.random.key_data(key)}


def test_sequence_threads_state_in_order_and_prefixes_metrics():
  body = combinators.sequence(("a", _add(1.0)), ("b", _times(3.0)))
  state, metrics = jax.jit(body)(jnp.float32(2.0), jax.random.key(0))
  # Order matters: (2 + 1) * 3 = 9, whereas (2 * 3) + 1 = 7.
  assert float(state) == 9.0
  assert set(metrics) == {"a/value", "b/value"}
  assert float(metrics["a/value"]) == 3.0
  assert float(metrics["b/value"]) == 9.0


def test_sequence_empty_name_keeps_keys_and_phases_get_distinct_keys():
  body = combinators.sequence(("", _record_key), ("second", _record_key))
  _, metrics = body(jnp.float32(0.0), jax.random.key(0))
  assert set(metrics) == {"key", "second/key"}
  assert not np.array_equal(metrics["key"], metrics["second/key"])


def test_sequence_nested_prefixes():
  inner = combinators.sequence(("g", _add(1.0, "loss")))
  body = combinators.sequence(("outer", inner))
  _, metrics = body(jnp.float32(0.0), jax.random.key(0))
  assert set(metrics) == {"outer/g/loss"}


def test_repeat_runs_n_times_and_averages_metrics():
  body = combinators.repeat(4, _add(1.0))
  state, metrics = jax.jit(body)(jnp.float32(0.0), jax.random.key(0))
  assert float(state) == 4.0
  # The per-repeat values are 1, 2, 3, 4; their mean is 2.5 (not the last value, not the sum).
  assert float(metrics["value"]) == pytest.approx(2.5)
  assert metrics["value"].shape == ()


def test_repeat_passes_the_index():

  def phase(state, key, index):
    del key
    return state + index, {"index": index.astype(jnp.float32)}

  state, metrics = combinators.repeat(5, phase, with_index=True)(jnp.int32(0),
                                                                jax.random.key(0))
  assert int(state) == 0 + 1 + 2 + 3 + 4
  assert float(metrics["index"]) == pytest.approx(2.0)


def _draws_state(n):
  return {"draws": jnp.zeros((n,), jnp.float32)}


def _draw_phase(state, key, index):
  """Stores one uniform draw per repeat, at the repeat's index."""
  draw = jax.random.uniform(key)
  return {"draws": state["draws"].at[index].set(draw)}, {"draw": draw}


@pytest.mark.parametrize("same_key", [True, False])
def test_repeat_same_key(same_key):
  n = 4
  body = combinators.repeat(n, _draw_phase, with_index=True, same_key=same_key)
  key = jax.random.key(3)
  state, _ = jax.jit(body)(_draws_state(n), key)
  draws = np.asarray(state["draws"])
  if same_key:
    # Every repeat sees the outer key itself.
    np.testing.assert_array_equal(draws, np.full(n, float(jax.random.uniform(key))))
  else:
    assert len(set(draws.tolist())) == n


def test_repeat_rejects_zero():
  with pytest.raises(ValueError, match="n >= 1"):
    combinators.repeat(0, _add(1.0))


@pytest.mark.parametrize("threshold,expected_state,expected_metric", [
    (10.0, 6.0, 6.0),   # 1 < 10: runs.
    (0.0, 1.0, 0.0),    # 1 >= 0: skipped, zero metrics of the same structure.
])
def test_when_runs_or_skips_on_state_predicate(threshold, expected_state, expected_metric):
  body = combinators.when(lambda s, i: s < threshold, _add(5.0))
  state, metrics = jax.jit(body)(jnp.float32(1.0), jax.random.key(0))
  assert float(state) == expected_state
  assert set(metrics) == {"value"}
  assert float(metrics["value"]) == expected_metric


def test_when_on_index_inside_repeat():
  # PRE-DFKD-style wiring: repeat(4, when(index < 2, phase)) runs the phase twice.
  gated = combinators.when(lambda s, i: i < 2, lambda s, k, i: (s + 1, {"ran": jnp.float32(1)}),
                           with_index=True)
  body = combinators.repeat(4, gated, with_index=True)
  state, metrics = jax.jit(body)(jnp.int32(0), jax.random.key(0))
  assert int(state) == 2
  # Skipped repeats report zeros, so the mean over the 4 repeats is 0.5.
  assert float(metrics["ran"]) == pytest.approx(0.5)
