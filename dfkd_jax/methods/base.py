"""What every method builder receives: the context, the generator part and the state initialiser."""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from dfkd_jax.phases import guidance as guidance_lib
from dfkd_jax import models as models_lib
from dfkd_jax import optim
from dfkd_jax import phases
from dfkd_jax import precision
from dfkd_jax import state as state_lib
from dfkd_jax.data import datasets
from dfkd_jax.state import Part


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
  `config.pixel_mean/pixel_std` when set, else the teacher's recorded normalisation, else the
  dataset's training normalisation (`datasets.dataset_info`)."""
  teacher = config.get("teacher")
  given = datasets.given_normalization(config, teacher.get("workdir") if teacher else None)
  if given:
    return given
  try:
    info = datasets.dataset_info(config)
  except ValueError as e:
    raise ValueError(f"{e} For a data-free run the generators also need the teacher's input "
                     "normalisation: set config.pixel_mean and config.pixel_std (per channel, "
                     "[0, 1] units).") from e
  return tuple(info.mean), tuple(info.std)


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


def generator_part(ctx: Context, module: nn.Module | None = None, sample_input=None) -> Part:
  """The "generator" part: `module` (default `make_generator(ctx)`) with `config.gen_optimizer`
  over `distill.num_iters` updates; `sample_input` is a sample generator input (default latents
  `[2, distill.latent_dim]`)."""
  module = make_generator(ctx) if module is None else module

  def init(key, ctx):
    cfg = ctx.config
    z0 = (jnp.zeros((2, cfg.distill.latent_dim), jnp.float32) if sample_input is None
          else sample_input)
    variables = module.init(jax.random.split(key, 3)[1], z0, train=False)
    return state_lib.TrainState.create(
        apply_fn=precision.apply_for(module.apply, cfg),
        params=variables["params"], batch_stats=variables.get("batch_stats", {}),
        tx=optim.make_optimizer(cfg.gen_optimizer, cfg.distill.num_iters))

  return Part("generator", init)


def init_state(key, ctx: Context, parts: Sequence[Part] = (), *,
               student_updates: int | None = None) -> state_lib.DFKDState:
  """A fresh student around the frozen teacher, plus the method's `parts` and, when
  `config.guidance` asks for it, the guidance parts (condensed set, discriminator).

  Args:
    key: PRNG key (the student, the run's rng and every part derive their keys from it).
    ctx: the method context.
    parts: the method's own state pieces (`dfkd_jax.state.Part`), e.g. `generator_part(ctx)`,
      `phases.pool_part(n)`, `replay.bank_part(...)`, `replay.vae_part(...)`.
    student_updates: the student's optimizer steps in the run, for its schedule (default
      `num_iters * student_steps`; methods with a warm-up without student steps pass fewer).
  """
  cfg = ctx.config
  k_s, _, k_rng = jax.random.split(key, 3)
  x0 = jnp.zeros((1, *ctx.image_shape), jnp.float32)
  s_params, s_bs = state_lib.init_model(ctx.student_module, k_s, x0)
  total_student_updates = (cfg.distill.num_iters * cfg.distill.student_steps
                           if student_updates is None else student_updates)
  student = state_lib.TrainState.create(
      apply_fn=precision.apply_for(ctx.student_module.apply, cfg),
      params=s_params, batch_stats=s_bs,
      tx=optim.make_optimizer(cfg.optimizer, total_student_updates))
  parts = tuple(parts) + guidance_lib.parts(ctx.guidance)
  names = [p.name for p in parts]
  if len(set(names)) != len(names):
    raise ValueError(f"Two state parts share a name: {names}.")
  shadowed = [n for n in names if hasattr(state_lib.DFKDState, n) or n in
              state_lib.DFKDState.__dataclass_fields__]
  if shadowed:
    raise ValueError(f"State part name(s) {shadowed} are DFKDState's own attributes; rename "
                     "the part.")
  return state_lib.DFKDState(step=jnp.zeros((), jnp.int32), rng=k_rng, teacher=ctx.teacher,
                             student=student, parts={p.name: p.init(key, ctx) for p in parts})


def shared_z_key(state):
  """One latent batch per outer iteration, shared by phases (ZSKT)."""
  return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 7919)


def condensed_extras(ctx: Context) -> tuple:
  """Student-step extras for `config.guidance` ("condensed" or "naive"): condensed samples."""
  spec = ctx.guidance
  return () if spec is None else (("condensed", guidance_lib.student_extra(spec)),)
