"""What every method builder receives, and the shared state initialiser."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dfkd_jax.phases import guidance as guidance_lib
from dfkd_jax.ops import buffers
from dfkd_jax import models as models_lib
from dfkd_jax import optim
from dfkd_jax import phases
from dfkd_jax import state as state_lib
from dfkd_jax.data import datasets


@dataclasses.dataclass(frozen=True)
class Context:
  """Static facts a method builder needs (no arrays except the teacher's weights)."""
  config: ml_collections.ConfigDict
  teacher: state_lib.FrozenModel
  student_module: nn.Module
  num_classes: int
  image_shape: tuple[int, int, int]
  mesh: Any
  condensed: Any = None   # (images, labels) numpy arrays when config.guidance != "none"

  @property
  def guidance(self):
    """The `guidance.GuidanceSpec` of this run, or None."""
    n = None if self.condensed is None else len(self.condensed[1])
    return guidance_lib.spec_from_config(self.config, self.mesh.devices.size, n)

  @property
  def d(self) -> ml_collections.ConfigDict:
    return self.config.distill


def synthesis_weights(cfg: ml_collections.ConfigDict) -> phases.SynthesisWeights:
  """`config.loss` -> SynthesisWeights (unknown keys are rejected by the frozen dataclass)."""
  fields = {f.name for f in dataclasses.fields(phases.SynthesisWeights)}
  return phases.SynthesisWeights(**{k: v for k, v in cfg.to_dict().items() if k in fields})


def pixel_normalisation(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) that map the generators' [0, 1] pixels to the teacher's input space:
  `config.pixel_mean/pixel_std` when set, else the dataset's training normalisation."""
  mean, std = tuple(config.get("pixel_mean", ()) or ()), tuple(config.get("pixel_std", ()) or ())
  if mean and std:
    return mean, std
  if config.dataset in datasets.DATASETS:
    info = datasets.get_info(config.dataset)
    return tuple(info.mean), tuple(info.std)
  raise ValueError(f"Dataset {config.dataset!r} has no known normalisation: set "
                   "config.pixel_mean and config.pixel_std (the per-channel mean and std, in [0, 1] "
                   "units, that the teacher's inputs were normalised with).")


def make_generator(ctx: Context) -> nn.Module:
  g = ctx.config.generator
  h, _, c = ctx.image_shape
  if g.kind == "dafl":
    return models_lib.Generator(img_size=h, channels=c, ngf=g.ngf, bn_eps=g.bn_eps,
                                spectral_norm=g.spectral_norm, final_tanh=g.final_tanh,
                                weight_init=g.weight_init)
  if g.kind == "zskt":
    return models_lib.ZSKTGenerator(img_size=h, channels=c, ngf=g.ngf, bn_eps=g.bn_eps,
                                    weight_init=g.weight_init)
  if g.kind == "sigmoid":
    # The Fast/NAYER decoder on a latent: sigmoid pixels mapped by the dataset normalisation,
    # so the images span exactly the teacher's input range (docs/methods.md §11.2).
    mean, std = pixel_normalisation(ctx.config)
    return models_lib.FastGenerator(img_size=h, channels=c, ngf=g.ngf, mean=mean, std=std)
  raise ValueError(f"Unknown generator kind {g.kind!r}; valid: dafl, zskt, sigmoid.")


def init_state(key, ctx: Context, *, generator: nn.Module | None = None,
               pool_capacity: int = 0, bank: tuple[int, int] | None = None,
               vae: tuple[nn.Module, Any] | None = None, generator_input=None,
               method_state: Callable | None = None,
               student_updates: int | None = None) -> state_lib.DFKDState:
  """Fresh student (and generator / pool / memory bank / VAE / discriminator) around the
  frozen teacher.

  Args:
    key: PRNG key.
    ctx: the method context.
    generator: generator module (generator methods).
    pool_capacity: image pool size (DeepInversion/ADI).
    bank: `(slots, slot_size)` of an MB-DFKD memory bank.
    vae: `(module, optimizer config)` of a PRE-DFKD memory generator.
    generator_input: a sample generator input (default: latents `[2, distill.latent_dim]`).
    method_state: `method_state(teacher) -> pytree`, the method's own state (or None).
    student_updates: the student's optimizer steps in the run, for its schedule (default
      `num_iters * student_steps`; methods with a warm-up without student steps pass fewer).
  """
  cfg = ctx.config
  k_s, k_g, k_rng = jax.random.split(key, 3)
  x0 = jnp.zeros((1, *ctx.image_shape), jnp.float32)
  s_params, s_bs = state_lib.init_model(ctx.student_module, k_s, x0)
  total_student_updates = (cfg.distill.num_iters * cfg.distill.student_steps
                           if student_updates is None else student_updates)
  student = state_lib.TrainState.create(
      apply_fn=ctx.student_module.apply, params=s_params, batch_stats=s_bs,
      tx=optim.make_optimizer(cfg.optimizer, total_student_updates))
  gen_state = None
  if generator is not None:
    z0 = (jnp.zeros((2, cfg.distill.latent_dim), jnp.float32) if generator_input is None
          else generator_input)
    variables = generator.init(k_g, z0, train=False)
    gen_state = state_lib.TrainState.create(
        apply_fn=generator.apply, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=optim.make_optimizer(cfg.gen_optimizer, cfg.distill.num_iters))
  pool = buffers.pool_init(pool_capacity, ctx.image_shape) if pool_capacity else None
  bank_state = buffers.bank_init(*bank, ctx.image_shape) if bank else None
  vae_state = None
  if vae is not None:
    module, opt_cfg = vae
    variables = module.init({"params": jax.random.fold_in(key, 101)}, x0,
                            jax.random.fold_in(key, 102), train=False)
    vae_state = state_lib.TrainState.create(
        apply_fn=module.apply, params=variables["params"],
        batch_stats=variables.get("batch_stats", {}),
        tx=optim.make_optimizer(opt_cfg, cfg.distill.num_iters))
  spec, disc, condensed = ctx.guidance, None, None
  if spec is not None:
    images, labels = ctx.condensed
    condensed = {"images": jnp.asarray(images, jnp.float32),
                 "labels": jnp.asarray(labels, jnp.int32)}
    disc = guidance_lib.init_discriminator(jax.random.fold_in(key, 103), spec, ctx.teacher,
                                           ctx.image_shape, ctx.num_classes, cfg)
  return state_lib.DFKDState(step=jnp.zeros((), jnp.int32), rng=k_rng, teacher=ctx.teacher,
                             student=student, generator=gen_state, pool=pool, bank=bank_state,
                             vae=vae_state, discriminator=disc, condensed=condensed,
                             method_state=method_state(ctx.teacher) if method_state else None)


def shared_z_key(state):
  """One latent batch per outer iteration, shared by phases (ZSKT)."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 7919)


def condensed_extras(ctx: Context) -> tuple:
  """Student-step extras for `config.guidance` ("condensed" or "naive"): condensed samples."""
  spec = ctx.guidance
  return () if spec is None else (("condensed", guidance_lib.student_extra(spec)),)
