"""The generator-based baselines, each a few lines of wiring (docs/methods.md §2-§4, §10).

- DAFL: one fused step: G minimises oh/ie/act on x = G(z); S minimises KL(T‖S) (τ=1) on sg(x)
  (`dafl.kd_grad_to_generator=True` reproduces the earlier revision without the detach).
- DFAD: `student_steps` S steps (L1 on logits, fresh z each), then 1 G step maximising L1.
- ZSKT: 1 G step maximising the elementwise KL, then `student_steps` S steps (KL + β·AT) on
  G(z) recomputed from the SAME z after the G update.

Each takes condensed-sample guidance (`config.guidance`, docs/methods.md §8) by config alone: the
generator step adds the feature-alignment term and a discriminator step, and every student
update adds condensed samples (see `dfkd_jax.phases.guidance`).
"""
from __future__ import annotations

import functools

from dfkd_jax.phases import combinators
from dfkd_jax import config_blocks
from dfkd_jax import phases
from dfkd_jax.methods import base
from dfkd_jax.types import Method


def _wrap(ctx, body, generator) -> Method:
  return Method(init=functools.partial(base.init_state, ctx=ctx,
                                     parts=(base.generator_part(ctx, generator),)), step=body)


def _sample(ctx, z_key=None):
  d = ctx.d
  if z_key is None:
    return lambda state, key: phases.sample_generator(state, key, d.batch_size, d.latent_dim,
                                                      ctx.mesh)
  return lambda state, key: phases.sample_generator(state, z_key(state), d.batch_size,
                                                    d.latent_dim, ctx.mesh)


def make_dafl(ctx: base.Context) -> Method:
  d, cfg = ctx.d, ctx.config
  phase = phases.generator_step(
      base.synthesis_weights(cfg.loss), batch=d.batch_size, latent_dim=d.latent_dim,
      mesh=ctx.mesh, faithful_bn=cfg.faithful_bn,
      fused_student=phases.FusedStudent(cfg.loss.kd, cfg.loss.kd_temperature,
                                        cfg.dafl.kd_grad_to_generator,
                                        tuple(base.condensed_extras(ctx))),
      guidance=ctx.guidance)
  if d.student_steps != 1:
    raise ValueError("DAFL updates G and S together once per iteration: set "
                     "config.distill.student_steps=1.")
  return _wrap(ctx, combinators.sequence(("dafl", phase)), base.make_generator(ctx))


def make_dfad(ctx: base.Context) -> Method:
  d, cfg = ctx.d, ctx.config
  student = phases.student_step(_sample(ctx), kd=cfg.loss.kd, temperature=cfg.loss.kd_temperature,
                                extras=base.condensed_extras(ctx))
  gen = phases.generator_step(base.synthesis_weights(cfg.loss), batch=d.batch_size,
                              latent_dim=d.latent_dim, mesh=ctx.mesh, faithful_bn=cfg.faithful_bn,
                              guidance=ctx.guidance)
  body = combinators.sequence(
      ("student", combinators.repeat(d.student_steps, student, unroll=d.unroll)),
      ("generator", gen))
  return _wrap(ctx, body, base.make_generator(ctx))


def make_zskt(ctx: base.Context) -> Method:
  d, cfg = ctx.d, ctx.config
  gen = phases.generator_step(base.synthesis_weights(cfg.loss), batch=d.batch_size,
                              latent_dim=d.latent_dim, mesh=ctx.mesh, faithful_bn=cfg.faithful_bn,
                              z_key=base.shared_z_key, guidance=ctx.guidance)
  student = phases.student_step(_sample(ctx, base.shared_z_key), kd=cfg.loss.kd,
                                temperature=cfg.loss.kd_temperature, at_beta=cfg.loss.at_beta,
                                extras=base.condensed_extras(ctx))
  body = combinators.sequence(
      ("generator", gen),
      ("student", combinators.repeat(d.student_steps, student, same_key=True,
                                      unroll=d.unroll)))
  return _wrap(ctx, body, base.make_generator(ctx))


# Default config blocks (applied by `configs/common.distill` through the registry).


def dafl_defaults(c) -> None:
  """MNIST script defaults: oh 1, ie 5, act 0.1; G Adam 0.2; S Adam 2e-3; KL, tau 1.

  Our choice: the generator also matches the teacher's BatchNorm statistics (`loss.bn = 1`);
  without it the generator's images saturate into flat blobs outside the teacher's input range
  and the student stays near 26 % on Fashion-MNIST (72.36 % with it, benchmarks/RESULTS.md §9).
  `faithful` restores the paper's loss."""
  c.loss = config_blocks.loss_block(oh=1.0, ie=5.0, act=0.1, kd="dafl_kd", bn=1.0)
  c.gen_optimizer.lr = 0.2
  c.optimizer = config_blocks.optimizer("adam", lr=2e-3, momentum=0.0, weight_decay=0.0,
                                        schedule="constant")


def dfad_defaults(c) -> None:
  """5 S steps (L1) then 1 G step (-L1); S SGD 0.1, G Adam 1e-3, both x0.1 at 20% and 40% of the
  budget (epochs 100 and 200 of 500); BN eps 1e-5; latent d = 256.

  Our choice: the generator also matches the teacher's BatchNorm statistics (`loss.bn = 1`, as
  MB-DFKD does); without it the adversarial game collapses on Fashion-MNIST (10.16 % final
  against 77.80 % with it, benchmarks/RESULTS.md §9). `faithful` restores the paper's loss."""
  c.loss = config_blocks.loss_block(adv=1.0, adv_type="l1", kd="l1", bn=1.0)
  c.distill.student_steps = 5
  c.distill.latent_dim = 256
  c.generator.bn_eps = 1e-5
  c.optimizer = config_blocks.optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                                        schedule="step", milestones=(0.2, 0.4))
  c.gen_optimizer.schedule = "step"
  c.gen_optimizer.milestones = (0.2, 0.4)


def zskt_defaults(c) -> None:
  """1 G step (-KL elementwise) + 10 S steps on the same z (KL + 250 AT); Adam 1e-3 / 2e-3.

  Our choice: the generator also matches the teacher's BatchNorm statistics (`loss.bn = 1`, as
  DAFL and DFAD); on Fashion-MNIST one 5-minute run reaches 78.07 % with it against 57.43 %
  without (and 70.76 % without after 15 minutes), benchmarks/RESULTS.md §9. `faithful`
  restores the paper's loss."""
  c.loss = config_blocks.loss_block(adv=1.0, adv_type="kl", kd="kl_elem", at_beta=250.0,
                                    bn=1.0)
  c.distill.student_steps = 10
  c.distill.batch_size = 128
  c.generator.kind = "zskt"
  c.generator.bn_eps = 1e-5
  c.gen_optimizer = config_blocks.optimizer("adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
                                            schedule="cosine", grad_clip=5.0)
  c.optimizer = config_blocks.optimizer("adam", lr=2e-3, momentum=0.0, weight_decay=0.0,
                                        schedule="cosine", grad_clip=5.0)
