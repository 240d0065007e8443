"""`train_and_evaluate(config, workdir)`: the one entry point for every method."""
from __future__ import annotations

import ml_collections

from dfkd_jax import numerics as numerics_lib
from dfkd_jax import supervised


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.method` in `workdir` (resuming if it holds a checkpoint); returns the summary.

  Everything is traced under the run's numerics (`config.numerics`, `dfkd_jax.numerics`).
  """
  with numerics_lib.use(numerics_lib.Numerics.from_config(config)):
    if config.method in supervised.SUPERVISED_METHODS:
      return supervised.train_supervised(config, workdir)
    from dfkd_jax import distill  # pylint: disable=g-import-not-at-top
    return distill.train_distill(config, workdir)
