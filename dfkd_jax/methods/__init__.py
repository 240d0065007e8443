"""The method registry: the one place that lists the methods.

`METHODS[name]` is a `MethodSpec`: the builder (`ctx -> Method(init, step)`), the function that
writes the method's default config blocks (called by `configs/common.distill`), and what the
method optimises. The CLI, the configs, the demo, the tests and the benchmarks derive their method
lists from `METHODS` and `SUPERVISED_METHODS`; registering a new data-free method here is all it
takes for them (and for the tests parametrised over the registry) to pick it up.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import ml_collections

from dfkd_jax import types
from dfkd_jax.methods import base
from dfkd_jax.methods import fast_nayer
from dfkd_jax.methods import generative
from dfkd_jax.methods import inversion
from dfkd_jax.methods import replay
from dfkd_jax.methods.base import Context


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """One data-free method: `build(ctx)` makes its jitted-step pieces, `defaults(config)` writes
  its published default config blocks onto the shared data-free blocks, `generator` says whether
  it trains a generator (else it optimises pixels)."""
  build: Callable[[Context], types.Method]
  defaults: Callable[[ml_collections.ConfigDict], None]
  generator: bool
  summary: str


# The registry, in the order the demo runs them: the best measured first (benchmarks/RESULTS.md
# §9 and the time-to-accuracy tables), so a demo stopped early has shown the recipes worth using.
METHODS: dict[str, MethodSpec] = {
    "nayer": MethodSpec(fast_nayer.make_nayer, fast_nayer.nayer_defaults, True,
                        "label-embedding generator with re-drawn noisy layers, image pool"),
    "fast": MethodSpec(fast_nayer.make_fast, fast_nayer.fast_defaults, True,
                       "meta-learned generator, k adaptation steps per batch, image pool"),
    "dfad": MethodSpec(generative.make_dfad, generative.dfad_defaults, True,
                       "adversarial generator (L1 on logits), several student steps per G step"),
    "mb_dfkd": MethodSpec(replay.make_mb_dfkd, replay.mb_dfkd_defaults, True,
                          "adversarial generator + BN matching + a memory bank"),
    "dafl": MethodSpec(generative.make_dafl, generative.dafl_defaults, True,
                       "generator: one-hot + information entropy + activation; student KL"),
    "zskt": MethodSpec(generative.make_zskt, generative.zskt_defaults, True,
                       "adversarial generator (KL) + attention transfer"),
    "deepinversion": MethodSpec(inversion.make_deepinversion, inversion.deepinversion_defaults,
                                False, "pixels: CE + BatchNorm-statistics matching + TV prior"),
    "adi": MethodSpec(inversion.make_deepinversion, inversion.adi_defaults, False,
                      "DeepInversion + the Jensen-Shannon competition term"),
    "pre_dfkd": MethodSpec(replay.make_pre_dfkd, replay.pre_dfkd_defaults, True,
                           "generator + a VAE replaying the synthetic stream"),
}

# Real-data modes, trained by `dfkd_jax.train.supervised` (kd_* distil the teacher's soft labels).
SUPERVISED_METHODS = ("teacher", "scratch", "kd_real", "kd_condensed")
KD_METHODS = ("kd_real", "kd_condensed")
ALL_METHODS = SUPERVISED_METHODS + tuple(METHODS)


def check_method(name: str) -> None:
  """Raises a ValueError listing the valid methods unless `name` is a data-free method."""
  if name not in METHODS:
    raise ValueError(f"Unknown method {name!r}. Valid data-free methods: "
                     f"{', '.join(sorted(METHODS))} (and {', '.join(SUPERVISED_METHODS)} for "
                     "supervised runs).")


__all__ = ["ALL_METHODS", "KD_METHODS", "METHODS", "MethodSpec", "SUPERVISED_METHODS", "Context",
           "check_method", "base"]
