"""Training: `train_and_evaluate(config, workdir)`, the one entry point for every mode.

- `loop`: the one run loop (checkpoints, NaN guard, clock, evaluation logging, summary fields);
- `supervised`: teacher, scratch, kd_real and kd_condensed runs on real data;
- `distill`: every data-free method of the registry (`dfkd_jax.methods.METHODS`);
- `evaluation`: test accuracy, teacher agreement and the robustness statistics (final, mu, sigma2).

The submodules are imported on first use: they pull in the data pipeline (TFDS).
"""
from __future__ import annotations

import ml_collections

from dfkd_jax import config_blocks
from dfkd_jax import numerics as numerics_lib
from dfkd_jax.methods import SUPERVISED_METHODS


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Runs `config.method` in `workdir` (resuming if it holds a checkpoint); returns the summary.

  Everything is traced under the run's numerics (`config.numerics`, `dfkd_jax.numerics`).
  """
  # pylint: disable=g-import-not-at-top
  config_blocks.validate(config)  # every range, before anything is written
  from dfkd_jax import compile as compile_lib
  compile_lib.enable_cache(config.get("compile_cache", "auto"))
  from dfkd_jax.train import loop
  # One process per workdir, for the whole run (summary and export included).
  with loop.workdir_lock(workdir), numerics_lib.use(numerics_lib.Numerics.from_config(config)):
    if config.method in SUPERVISED_METHODS:
      from dfkd_jax.train import supervised
      return supervised.train_supervised(config, workdir)
    from dfkd_jax.train import distill
    return distill.train_distill(config, workdir)
