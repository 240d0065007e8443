"""dfkd_jax: data-free knowledge distillation in purely functional JAX.

Public functional ops (pure functions, usable in any JAX code):

- losses: `kd_kl`, `dafl_kd`, `kl_elem`, `l1_logits`, `js_adv`, `dafl_oh`, `dafl_ie`, `dafl_act`,
  `tv_l2`, `img_l2`, `attention_transfer`, `bn_l2`, `bn_gauss_kl`, `vae_kl`;
- BatchNorm statistics of any Linen model: `capture_bn_inputs`;
- augmentation: `jitter_flip`, `diff_augment`;
- composition: `sequence`, `repeat`, `when`; phases in `dfkd_jax.phases`;
- training: `train_and_evaluate(config, workdir)` (imported lazily: it pulls in TFDS).

Importing this package changes no global JAX configuration.
"""
from dfkd_jax import models
from dfkd_jax import numerics
from dfkd_jax import phases
from dfkd_jax.ops import augment
from dfkd_jax.ops import bn_stats
from dfkd_jax.ops import buffers
from dfkd_jax.ops import losses
from dfkd_jax.ops.augment import diff_augment, jitter_flip
from dfkd_jax.ops.bn_stats import capture_bn_inputs
from dfkd_jax.ops.losses import (attention_transfer, bn_gauss_kl, bn_l2, dafl_act, dafl_ie,
                                 dafl_kd, dafl_oh, img_l2, js_adv, kd_kl, kl_elem, l1_logits,
                                 tv_l2, vae_kl)
from dfkd_jax.phases import combinators
from dfkd_jax.phases.combinators import repeat, sequence, when
from dfkd_jax.state import DFKDState, FrozenModel, TrainState
from dfkd_jax.types import Method

__version__ = "0.1.0"


def train_and_evaluate(config, workdir):
  """Runs `config.method` in `workdir`; see `dfkd_jax.train.train_and_evaluate`."""
  from dfkd_jax import train  # pylint: disable=g-import-not-at-top
  return train.train_and_evaluate(config, workdir)
