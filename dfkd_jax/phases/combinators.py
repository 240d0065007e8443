"""Combinators that compose phases, optax-style.

- `sequence(("g", gen), ("s", stu))` runs phases in order, threading the state; each gets its own
  key `fold_in(key, i)` and its metrics are prefixed (`g/loss`).
- `repeat(n, phase)` runs a phase n times in `lax.scan` (compile time independent of n); the
  metrics are averaged over the repeats. The phase may take the loop index (`with_index=True`).
- `when(pred, phase)` runs a phase under `lax.cond` on a traced predicate of (state, index).
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from dfkd_jax.types import Metrics, Phase


def sequence(*named_phases: tuple[str, Phase]) -> Phase:
  """Runs `(name, phase)` pairs in order; metric keys become `name/key`."""

  def run(state, key):
    metrics: Metrics = {}
    for i, (name, phase) in enumerate(named_phases):
      state, m = phase(state, jax.random.fold_in(key, i))
      metrics.update({f"{name}/{k}" if name else k: v for k, v in m.items()})
    return state, metrics

  return run


def repeat(n: int, phase: Callable, with_index: bool = False, same_key: bool = False,
           unroll: bool = False) -> Phase:
  """Runs `phase` n times with `lax.scan`; returns the mean of each metric over the repeats.

  Args:
    n: number of repeats (static).
    phase: `phase(state, key)` or, with `with_index`, `phase(state, key, index)`.
    with_index: pass the (traced) repeat index.
    same_key: give every repeat the same key (ZSKT's student steps reuse one latent batch).
    unroll: trace the phase n times in a Python loop instead of a `lax.scan` (compile time
      grows with n). On XLA:CPU, convolution gradients inside a while loop run 6-27x slower
      than outside one (measured on jax 0.10.2, see benchmarks/RESULTS.md), so CPU configs
      unroll short inner loops. n = 1 is always traced without a loop: a length-1
      `lax.scan` still compiles to a while loop (it made a PRE-DFKD step with one VAE step
      30x slower).
  """
  if n < 1:
    raise ValueError(f"repeat needs n >= 1, got {n}.")

  def run(state, key):
    def body(carry, i):
      k = key if same_key else jax.random.fold_in(key, i)
      args = (carry, k, i) if with_index else (carry, k)
      return phase(*args)

    if n == 1 or unroll:  # a Python loop: no while loop in the program at all
      outs = []
      for i in range(n):
        state, m = body(state, jnp.asarray(i, jnp.int32))
        outs.append(m)
      return state, jax.tree.map(lambda *ms: jnp.mean(jnp.stack(ms), axis=0), *outs)
    state, metrics = jax.lax.scan(body, state, jnp.arange(n))
    return state, jax.tree.map(lambda m: jnp.mean(m, axis=0), metrics)

  return run


def when(pred: Callable, phase: Callable, with_index: bool = False) -> Callable:
  """Runs `phase` if `pred(state, index)` (traced bool) is true, else passes the state through.

  Metrics of a skipped phase are zeros of the same structure.
  """

  def run(state, key, index=None):
    args = (key, index) if with_index else (key,)
    _, abstract_metrics = jax.eval_shape(phase, state, *args)

    def skip(s):
      return s, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract_metrics)

    return jax.lax.cond(pred(state, index), lambda s: phase(s, *args), skip, state)

  return run
