"""Shared type aliases and the `Method` pair."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax

PRNGKey = jax.Array
PyTree = Any
Metrics = dict[str, jax.Array]
# A phase maps (state, key) to (new state, metrics). It is traced inside the jitted outer step.
Phase = Callable[[Any, PRNGKey], tuple[Any, Metrics]]


class Method(NamedTuple):
  """A DFKD method: `init(key) -> DFKDState` and `step(state) -> (state, metrics)`.

  `step` runs ONE outer iteration; `train.distill.make_step` jits it once with the state donated.
  """
  init: Callable[[PRNGKey], Any]
  step: Callable[[Any], tuple[Any, Metrics]]
