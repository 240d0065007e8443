"""`jit` with the XLA:CPU compiler options that make this library's steps fast.

On CPU, jaxlib 0.10 hands convolutions to YNNPACK ("ynn_fusion" in profiles)
by default. For the convolution shapes of these models YNNPACK reached 55-65
GFLOP/s where XLA's Eigen convolutions reach 100-165 GFLOP/s on the same two
cores (a generator conv, 128x32x32x64 -> 32, forward + both gradients: 260 ms
vs 126-131 ms; benchmarks/RESULTS.md). `compiler_options()` therefore turns
YNNPACK fusions off (the option's value is the empty list), per compilation:
nothing global is changed, and other jitted code in the process is
unaffected. Measured on whole steps (LeNet pair, batch 128): DAFL 0.364 s ->
0.259 s, DeepInversion 0.501 s -> 0.460 s; keeping YNNPACK for single matrix
products only (`LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`) was in between.

The options are used only when the default backend is CPU, and only if this
jaxlib accepts them (checked once by compiling a tiny function; a jaxlib that
renamed the option gets a warning and XLA's defaults). The value comes from
the numerics in scope (`dfkd_jax.numerics`, `Numerics.xla_cpu_ynn`, read when a
step is built): `none` (the default: the empty list, no YNNPACK), `default`
(XLA's own choice), or an enum name such as `LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`
passed as the option's value.

Every jitted training step of the library (`distill.make_step`, the supervised
trainer, dataset condensation) is built with `jit`.
"""

from __future__ import annotations

import functools
import os
from typing import Any, Callable
import warnings

import jax

from dfkd_jax import numerics as numerics_lib

YNN_OPTION = "xla_cpu_experimental_ynn_fusion_type"


@functools.cache
def _supported(options: tuple[tuple[str, str], ...]) -> bool:
  try:
    jax.jit(lambda x: x + 1, compiler_options=dict(options)).lower(1.0).compile()
    return True
  except Exception as e:  # pylint: disable=broad-except
    warnings.warn(f"dfkd_jax: XLA:CPU rejected the compiler options {dict(options)} ({e}); "
                  "using XLA's defaults (convolutions may be about 2x slower). Set "
                  "numerics.xla_cpu_ynn='default' (DFKD_XLA_CPU_YNN=default) to silence this.",
                  stacklevel=3)
    return False


def compiler_options() -> dict[str, Any] | None:
  """The compiler options for a jitted step on the default backend (None: XLA's own)."""
  if jax.default_backend() != "cpu":
    return None
  value = numerics_lib.current().xla_cpu_ynn
  if value == "default":
    return None
  value = "" if value == "none" else value  # the empty list: no YNNPACK fusions
  options = ((YNN_OPTION, value),)
  return dict(options) if _supported(options) else None


def jit(fun: Callable[..., Any], **kwargs) -> Callable[..., Any]:
  """`jax.jit(fun, **kwargs)` with `compiler_options()` (unless given explicitly)."""
  kwargs.setdefault("compiler_options", compiler_options())
  return jax.jit(fun, **kwargs)


# XLA:CPU's concurrency-optimised scheduler starts independent work early, so the unrolled inner
# steps of a method keep each other's buffers alive: without it, a PRE-DFKD step at the official
# per-iteration work needs 679 MiB of XLA temp buffers instead of 1973 at the same speed
# (benchmarks/RESULTS.md §13). It is read when the CPU client starts (a per-compilation option of
# the same name is accepted and ignored), so it is a process setting: `memory_scheduler()`.
SCHEDULER_FLAG = "xla_cpu_enable_concurrency_optimized_scheduler"


def memory_scheduler() -> bool:
  """Turns XLA:CPU's concurrency-optimised scheduler off for this process, by adding
  `--xla_cpu_enable_concurrency_optimized_scheduler=false` to `XLA_FLAGS`; returns whether the
  flag is in effect. Only possible before JAX starts its backends (the command lines call it
  first thing); a `XLA_FLAGS` that already names the flag is the user's choice and is kept
  (`...=true` restores XLA's scheduler). The order of operations changes, their values do not
  (every method's tiny run is bit-identical either way, RESULTS.md §13)."""
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  flags = os.environ.get("XLA_FLAGS", "")
  if SCHEDULER_FLAG in flags:
    return f"{SCHEDULER_FLAG}=false" in flags.replace("False", "false")
  if xla_bridge.backends_are_initialized():
    return False
  os.environ["XLA_FLAGS"] = (flags + f" --{SCHEDULER_FLAG}=false").strip()
  return True


CACHE_ENV = "DFKD_COMPILE_CACHE"


def default_cache_dir() -> str:
  """`$DFKD_COMPILE_CACHE`, else `$XDG_CACHE_HOME/dfkd_jax/xla` (~/.cache/dfkd_jax/xla)."""
  if os.environ.get(CACHE_ENV):
    return os.environ[CACHE_ENV]
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dfkd_jax", "xla")


def enable_cache(path: str = "auto", min_compile_seconds: float = 1.0) -> str | None:
  """Turns on JAX's persistent compilation cache in `path` ("auto": `default_cache_dir()`;
  "" or "off": leave it as it is); returns the folder in use (None when off).

  A re-run or resume of the same config then loads its compiled steps from disk instead of
  compiling them (benchmarks/RESULTS.md §12). Compilations shorter than `min_compile_seconds`
  are not stored. The entries are keyed by the computation, the compiler options, the device
  kind and the jax/jaxlib versions, so a stale entry is never used; the folder can be deleted at
  any time. A user's own `jax_compilation_cache_dir` setting is kept.
  """
  if path in ("", "off", "none"):
    return None
  if jax.config.jax_compilation_cache_dir:  # already chosen (by the user or an earlier run)
    return jax.config.jax_compilation_cache_dir
  path = default_cache_dir() if path == "auto" else path
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    warnings.warn(f"dfkd_jax: no compilation cache ({path!r}: {e.strerror}); every run compiles "
                  f"its steps. Set config.compile_cache or ${CACHE_ENV} to a writable folder.",
                  stacklevel=2)
    return None
  jax.config.update("jax_compilation_cache_dir", path)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_seconds)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
  return path
