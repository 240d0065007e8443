"""The numerics settings of a run, as one explicit object: how convolution gradients and
training-mode BatchNorm are emitted, and which XLA:CPU compiler options the steps get.

Four switches decide how fast the steps are, and whether a run is bit-comparable with
plain JAX/Flax (`models/conv.py`, `models/norm.py`, `compile.py` say why each exists):

- `conv_grads`: "auto" (the canonical-layout convolution VJP on CPU, JAX's own elsewhere),
  "canonical" (on every platform, for tests), "xla" (plain `lax.conv_general_dilated`).
- `batch_norm`: "auto" (batch statistics as matrix products on CPU) or "xla" (Flax's own).
- `xla_cpu_ynn`: the XLA:CPU YNNPACK fusion option for jitted steps: "none" (no YNNPACK
  fusions, the default), "default" (XLA's own choice), or an enum name such as
  `LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT`.
- `upsample_conv`: how a generator's x2 nearest upsampling followed by a 3x3 conv is computed
  (every platform): "direct" (the default: upsample, then convolve, as the official codes do)
  or "subpixel" (the same function as one 2x2 convolution per output phase on the small map,
  `models.conv.upsample2x_conv`: about half the FLOPs of those convs; equal up to float
  rounding, so a run's numbers move as with another summation order).

A run chooses them once (`from_config`: the config's `numerics` block, where an empty field
falls back to the environment variables `DFKD_CONV_GRADS`, `DFKD_BATCH_NORM`, `DFKD_XLA_CPU_YNN`,
`DFKD_UPSAMPLE_CONV`, then to the defaults above) and scopes them with `use(numerics)` around everything it traces;
nothing global is mutated. The models read `current()` when they are traced, `compile.jit`
when a step is built, so a step keeps the numerics it was built and traced under. Every
summary.json and model.json records `current().to_dict()`.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import os
from typing import Iterator, Mapping

CONV_GRADS = ("auto", "canonical", "xla")
BATCH_NORM = ("auto", "xla")
UPSAMPLE_CONV = ("direct", "subpixel")
_ENV = {"conv_grads": "DFKD_CONV_GRADS", "batch_norm": "DFKD_BATCH_NORM",
        "xla_cpu_ynn": "DFKD_XLA_CPU_YNN", "upsample_conv": "DFKD_UPSAMPLE_CONV"}


@dataclasses.dataclass(frozen=True)
class Numerics:
  """The numerics of a run (see the module docstring); validated on construction."""
  conv_grads: str = "auto"
  batch_norm: str = "auto"
  xla_cpu_ynn: str = "none"
  upsample_conv: str = "direct"

  def __post_init__(self):
    for field, allowed in (("conv_grads", CONV_GRADS), ("batch_norm", BATCH_NORM),
                           ("upsample_conv", UPSAMPLE_CONV)):
      value = getattr(self, field)
      if value not in allowed:
        raise ValueError(f"numerics.{field} must be one of {allowed}, got {value!r} (set "
                         f"config.numerics.{field} or the {_ENV[field]} environment variable).")
    if not isinstance(self.xla_cpu_ynn, str) or not self.xla_cpu_ynn:
      raise ValueError(f"numerics.xla_cpu_ynn must be 'none', 'default' or an XLA enum name, "
                       f"got {self.xla_cpu_ynn!r}.")

  @classmethod
  def from_env(cls, environ: Mapping[str, str] | None = None) -> "Numerics":
    """The defaults, overridden by the `DFKD_*` environment variables that are set."""
    environ = os.environ if environ is None else environ
    values = {f: environ[v] for f, v in _ENV.items() if environ.get(v)}
    if values.get("xla_cpu_ynn") == "":
      values["xla_cpu_ynn"] = "none"
    return cls(**values)

  @classmethod
  def from_config(cls, config, environ: Mapping[str, str] | None = None) -> "Numerics":
    """`config.numerics` (a block of the four fields; empty ones and a missing block fall
    back to `from_env`)."""
    base = cls.from_env(environ)
    block = config.get("numerics", None) if hasattr(config, "get") else None
    if not block:
      return base
    chosen = {f: block.get(f) for f in _ENV if block.get(f)}
    unknown = set(block.keys()) - set(_ENV)
    if unknown:
      raise ValueError(f"config.numerics has unknown fields {sorted(unknown)}; the fields are "
                       f"{sorted(_ENV)}.")
    return dataclasses.replace(base, **chosen)

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


_DEFAULT = Numerics.from_env()
_CURRENT: contextvars.ContextVar[Numerics | None] = contextvars.ContextVar(
    "dfkd_jax_numerics", default=None)


def current() -> Numerics:
  """The numerics in scope: the innermost `use(...)`, else the environment's (read at import)."""
  scoped = _CURRENT.get()
  return _DEFAULT if scoped is None else scoped


@contextlib.contextmanager
def use(numerics: Numerics | None = None, **fields) -> Iterator[Numerics]:
  """Scopes `numerics` (or the current ones with `fields` replaced) for the code inside.

  Functions traced inside the block use these settings; a function already compiled keeps
  its own. Example: `with numerics.use(conv_grads="xla"): ...`.
  """
  chosen = dataclasses.replace(numerics or current(), **fields)
  token = _CURRENT.set(chosen)
  try:
    yield chosen
  finally:
    _CURRENT.reset(token)
