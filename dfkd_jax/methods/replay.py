"""The replay methods (docs/methods.md §6-§7), each one outer iteration of the PRE-DFKD loop:

- MB-DFKD (`mb_dfkd`): 1 generator step (oh + 5 ie + 0.1 act + js_adv(τ=3, elementwise mean)
  + w_bn * BN-statistics matching, `loss.bn_form` "l2" (DeepInversion form, default) or
  "gauss_kl"), then `student_steps` L1 steps, each on a fresh novel batch plus one replayed
  memory-bank slot (masked while the bank is empty); at the end of every
  `mb_dfkd.push_every`-th iteration a slot of fresh samples is pushed into the bank.
  `loss.adv_type="l1"` gives the DFAD-style adversarial term instead of JS.
- PRE-DFKD (`pre_dfkd`): 1 novel-generator step (the same loss; the official code has no BN
  term, which `faithful` restores), then
  `student_steps` KD steps, each: a fresh novel batch, class-balanced memory inference from the
  VAE, an L1 step on [novel; memory], and for the first `pre_dfkd.vae_steps` of them a VAE step
  on that novel batch.

Both take condensed-sample guidance (`config.guidance`) like the other generator hosts.
"""
from __future__ import annotations

import functools

from dfkd_jax.phases import combinators
from dfkd_jax import config_blocks
from dfkd_jax import phases
from dfkd_jax.phases import replay
from dfkd_jax.methods import base
from dfkd_jax.models import vae as vae_lib
from dfkd_jax.types import Method


def _generator_step(ctx: base.Context):
  d, cfg = ctx.d, ctx.config
  return phases.generator_step(base.synthesis_weights(cfg.loss), batch=d.batch_size,
                               latent_dim=d.latent_dim, mesh=ctx.mesh,
                               faithful_bn=cfg.faithful_bn, guidance=ctx.guidance)


def make_mb_dfkd(ctx: base.Context) -> Method:
  d, mb = ctx.d, ctx.config.mb_dfkd
  n_dev = ctx.mesh.devices.size
  if mb.slot_size > d.batch_size or mb.slot_size % n_dev:
    raise ValueError(f"mb_dfkd.slot_size={mb.slot_size} must be at most distill.batch_size="
                     f"{d.batch_size} and a multiple of the {n_dev} devices.")
  if mb.push_every < 1:
    raise ValueError(f"mb_dfkd.push_every must be >= 1, got {mb.push_every}.")
  student = phases.student_step(
      lambda state, key: phases.sample_generator(state, key, d.batch_size, d.latent_dim,
                                                 ctx.mesh),
      kd=ctx.config.loss.kd,
      extras=(("replay", replay.bank_extra(d.batch_size)),) + base.condensed_extras(ctx),
      normalize=("replay",))
  body = combinators.sequence(
      ("generator", _generator_step(ctx)),
      ("student", combinators.repeat(d.student_steps, student, unroll=d.unroll)),
      ("bank", replay.bank_push_phase(every=mb.push_every, slot_size=mb.slot_size,
                                      latent_dim=d.latent_dim, mesh=ctx.mesh)))
  init = functools.partial(base.init_state, ctx=ctx, parts=(
      base.generator_part(ctx), replay.bank_part(mb.slots, mb.slot_size)))
  return Method(init=init, step=body)


def vae_module(ctx: base.Context) -> vae_lib.VAE:
  p = ctx.config.pre_dfkd
  h, _, c = ctx.image_shape
  return vae_lib.VAE(img_size=h, channels=c, latent_dim=p.vae_latent_dim, ngf=p.vae_ngf,
                     bn_eps=p.vae_bn_eps, normalize=p.encoder_normalize)


def make_pre_dfkd(ctx: base.Context) -> Method:
  d, p = ctx.d, ctx.config.pre_dfkd
  if not 0 <= p.vae_steps <= d.student_steps:
    raise ValueError(f"pre_dfkd.vae_steps={p.vae_steps} must be between 0 and "
                     f"distill.student_steps={d.student_steps}.")
  if p.vae_input + p.memory_batch > d.batch_size:
    raise ValueError(f"pre_dfkd.vae_input + memory_batch ({p.vae_input} + {p.memory_batch}) "
                     f"must not exceed distill.batch_size={d.batch_size}.")
  if ctx.image_shape[0] % 8:
    raise ValueError(f"PRE-DFKD's VAE needs an image size divisible by 8, got "
                     f"{ctx.image_shape[0]} (set config.pad_to).")
  spec = replay.VAEReplay(memory_batch=p.memory_batch, latent_dim=p.vae_latent_dim,
                          vae_input=p.vae_input, z_lr=p.z_lr, kl_weight=p.kl_weight,
                          leak_z_grad_into_vae=p.leak_z_grad_into_vae)
  kd = functools.partial(replay.pre_dfkd_kd_step, spec, batch=d.batch_size,
                         latent_dim=d.latent_dim, mesh=ctx.mesh,
                         extras=base.condensed_extras(ctx))
  phases_ = [("generator", _generator_step(ctx))]
  if p.vae_steps:
    phases_.append(("kd_vae", combinators.repeat(p.vae_steps, kd(with_vae=True),
                                                 unroll=d.unroll)))
  if d.student_steps > p.vae_steps:
    phases_.append(("kd", combinators.repeat(d.student_steps - p.vae_steps, kd(with_vae=False),
                                             unroll=d.unroll)))
  init = functools.partial(base.init_state, ctx=ctx, parts=(
      base.generator_part(ctx), replay.vae_part(vae_module(ctx), p.vae_optimizer)))
  return Method(init=init, step=combinators.sequence(*phases_))


def replay_defaults(c, *, bank: bool) -> None:
  """The PRE-DFKD loop (docs/methods.md): B 1024, d 1000, 1 G step + 10 L1 student steps per
  iteration; G = PRE-DFKD's novel generator (spectral norm, U(-.08, .08) init), Adam 0.02; S SGD
  0.1 (cosine); the teacher logits detached in the JS term, as the official code. MB-DFKD
  (`bank=True`) replays its memory bank, PRE-DFKD its VAE.

  Our choice for both: the generator also matches the teacher's BatchNorm statistics, 10 bn_l2
  (MB-DFKD's paper names such a constraint without its form or weight; PRE-DFKD's official
  code has none, and without it its student ends 37.64 % after 5 minutes on Fashion-MNIST where
  MB-DFKD's reaches 75.25 %, benchmarks/RESULTS.md §9). `faithful` removes it from PRE-DFKD."""
  del bank  # the same synthesis loss for both
  c.loss = config_blocks.loss_block(oh=1.0, ie=5.0, act=0.1, adv=1.0, adv_type="js",
                                    adv_temperature=3.0, adv_detach_teacher=True,
                                    bn=10.0, kd="l1")
  c.distill.batch_size = 1024
  c.distill.latent_dim = 1000
  c.distill.student_steps = 10
  c.generator.update(dict(spectral_norm=True, weight_init="uniform008", bn_eps=1e-5))
  c.gen_optimizer.lr = 0.02
  c.optimizer = config_blocks.optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                                        schedule="cosine")


def mb_dfkd_defaults(c) -> None:
  replay_defaults(c, bank=True)


def pre_dfkd_defaults(c) -> None:
  replay_defaults(c, bank=False)
