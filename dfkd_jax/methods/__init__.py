"""Method registry: `config.method` -> builder(ctx) -> `Method(init, step)`."""
from __future__ import annotations

from dfkd_jax.methods import base
from dfkd_jax.methods import generative
from dfkd_jax.methods import inversion
from dfkd_jax.methods import replay
from dfkd_jax.methods.base import Context

METHODS = {
    "dafl": generative.make_dafl,
    "dfad": generative.make_dfad,
    "zskt": generative.make_zskt,
    "deepinversion": inversion.make_deepinversion,
    "adi": inversion.make_deepinversion,
    "mb_dfkd": replay.make_mb_dfkd,
    "pre_dfkd": replay.make_pre_dfkd,
}


def check_method(name: str) -> None:
  """Raises a ValueError listing the valid methods unless `name` is a data-free method."""
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}. Valid data-free methods: "
                     f"{', '.join(sorted(METHODS))} (and teacher, scratch, kd_real, kd_condensed for "
                     "supervised runs).")


def make_method(ctx: Context):
  check_method(ctx.config.method)
  return METHODS[ctx.config.method](ctx)


__all__ = ["METHODS", "Context", "check_method", "make_method", "base"]
