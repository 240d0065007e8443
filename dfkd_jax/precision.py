"""Mixed precision: models computed in bfloat16 with float32 parameters and float32 outputs.

`config.dtype` selects the compute dtype of every model of a run (teacher, student, generator,
VAE): "float32" (the default; nothing changes) or "bfloat16". With bfloat16, `mixed_apply` wraps
a Linen `apply`: the float parameters and float inputs are cast to bfloat16 where the model
reads them, and everything the model returns (logits, features, updated BatchNorm statistics,
captured moments) is cast back to float32. So:
- parameters, optimiser states and running BatchNorm statistics stay float32 (the gradient of
  the cast is the float32 gradient of the bfloat16 computation);
- every loss and reduction of the library runs on float32 outputs; BatchNorm computes its batch
  moments in float32 (Flax's `force_float32_reductions`), as do the BN-statistics losses
  (`dfkd_jax.ops.bn_stats`);
- convolutions and matrix products, where the time goes on accelerators, run in bfloat16.

On CPUs bfloat16 is emulated and slower than float32; it is meant for GPUs and TPUs
(benchmarks/RESULTS.md §12 has the loss parity and the CPU timings).
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def compute_dtype(config) -> Any:
  """`config.dtype` as a numpy dtype; ValueError naming the valid values otherwise."""
  name = config.get("dtype", "float32")
  if name not in DTYPES:
    raise ValueError(f"config.dtype={name!r}; valid: {', '.join(DTYPES)}.")
  return DTYPES[name]


def cast_floats(tree, dtype):
  """`tree` with its floating-point arrays cast to `dtype` (integers, booleans, PRNG keys and
  non-arrays unchanged)."""

  def leaf(x):
    if isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jnp.floating):
      return x.astype(dtype)
    return x

  return jax.tree.map(leaf, tree)


@functools.lru_cache(maxsize=None)
def _wrapped(apply_fn: Callable, dtype) -> Callable:

  def apply(variables, *args, **kwargs):
    variables = dict(variables)
    if "params" in variables:
      variables["params"] = cast_floats(variables["params"], dtype)
    out = apply_fn(variables, *cast_floats(args, dtype), **kwargs)
    return cast_floats(out, jnp.float32)

  apply.__name__ = f"{getattr(apply_fn, '__name__', 'apply')}_{jnp.dtype(dtype).name}"
  apply.__wrapped__ = apply_fn
  return apply


def mixed_apply(apply_fn: Callable, dtype) -> Callable:
  """`apply_fn` computing in `dtype` with float32 parameters and outputs (see the module
  docstring); `apply_fn` itself for float32. The same wrapper object is returned for the same
  arguments, so jitted code that takes it as a static argument does not retrace."""
  if jnp.dtype(dtype) == jnp.float32:
    return apply_fn
  return _wrapped(apply_fn, dtype)


def apply_for(apply_fn: Callable, config) -> Callable:
  """`mixed_apply(apply_fn, compute_dtype(config))`: a model's apply at the run's dtype."""
  return mixed_apply(apply_fn, compute_dtype(config))
