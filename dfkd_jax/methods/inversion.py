"""DeepInversion and ADI (docs/methods.md §5): per outer iteration, one synthesis round of
`deepinversion.iterations` Adam steps on fresh pixels (lax.scan), pushed into an image pool,
then `distill.student_steps` KD steps on batches drawn uniformly from the pool.

ADI is DeepInversion with the competition weight `loss.adv > 0` (`adv_type="js_batch"`, the
batch-mean reduction of the official code, τ = 3).

With `config.guidance="condensed"` (docs/methods.md §8) every inversion iteration adds the
feature-alignment term (labels: the inversion targets) and takes one discriminator step, and the
student steps add condensed samples; `"naive"` adds the condensed samples only.
"""
from __future__ import annotations

import functools

from dfkd_jax.phases import combinators
from dfkd_jax import config_blocks
from dfkd_jax import phases
from dfkd_jax.methods import base
from dfkd_jax.types import Method


def make_deepinversion(ctx: base.Context) -> Method:
  d, cfg, di = ctx.d, ctx.config, ctx.config.deepinversion
  synth = phases.inversion_round(
      base.synthesis_weights(cfg.loss), batch=d.batch_size, image_shape=ctx.image_shape,
      num_classes=ctx.num_classes, iterations=di.iterations, lr=di.lr, b1=di.b1, b2=di.b2,
      jitter=di.jitter, flip=di.flip, mesh=ctx.mesh, guidance=ctx.guidance)
  student = phases.student_step(
      lambda state, key: phases.sample_pool(state, key, d.batch_size, ctx.mesh,
                                            di.student_jitter, di.student_flip),
      kd=cfg.loss.kd, temperature=cfg.loss.kd_temperature, extras=base.condensed_extras(ctx))
  body = combinators.sequence(("synth", synth),
                              ("student", combinators.repeat(d.student_steps, student,
                                                           unroll=d.unroll)))
  init = functools.partial(base.init_state, ctx=ctx, parts=(phases.pool_part(di.pool_size),))
  if di.pool_size < d.batch_size:
    raise ValueError(f"deepinversion.pool_size={di.pool_size} must hold at least one batch "
                     f"({d.batch_size}).")
  return Method(init=init, step=body)


def deepinversion_defaults(c, *, adi: bool = False) -> None:
  """CE + 10 bn_l2 + 2.5e-5 tv_l2 (CIFAR README); KD tau 3; ADI adds js_adv (batch mean)."""
  c.loss = config_blocks.loss_block(ce=1.0, bn=10.0, tv=2.5e-5, kd="kl", kd_temperature=3.0,
                                    adv=1.0 if adi else 0.0, adv_type="js_batch")
  c.distill.student_steps = 400
  c.optimizer = config_blocks.optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                                        schedule="cosine")


def adi_defaults(c) -> None:
  deepinversion_defaults(c, adi=True)
