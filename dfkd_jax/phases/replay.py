"""Replay phases: MB-DFKD's memory bank (docs/methods.md §6) and PRE-DFKD's generative pseudo replay
with a VAE (docs/methods.md §7). Both keep the student from forgetting what it learned on earlier
generator distributions; they differ in what they store:

- memory bank: `slots` stored batches of `slot_size` synthetic images (`buffers.bank_init`),
  `slots * slot_size * H * W * C * 4` bytes, constant once full;
- VAE: E_m and G_m parameters (constant); G_m generates the replay samples on demand.

Every function here is a phase factory (static settings in, `(state, key) -> (state, metrics)`
out) or an extra for `phases.student_step`.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dfkd_jax.phases import combinators
from dfkd_jax.ops import losses
from dfkd_jax.ops import buffers
from dfkd_jax import optim
from dfkd_jax import phases
from dfkd_jax import precision
from dfkd_jax import state as state_lib


# ----------------------------------------------------------------------------- memory bank


def bank_push_phase(*, every: int, slot_size: int, latent_dim: int, mesh):
  """At the end of every `every`-th outer iteration (0, every, 2 every, ...), store a fresh
  batch of `slot_size` generator samples in the bank.

  MB-DFKD's reference code stores the first 128 images of the epoch's last novel batch; the
  generator is not updated during the student steps, so a fresh draw after them has the same
  distribution and saves keeping that batch around (our choice).
  """

  def push(state, key):
    x = phases.sample_generator(state, key, slot_size, latent_dim, mesh)
    return state.with_parts(bank=buffers.bank_push(state.bank, x, mesh)), {}

  pushed = combinators.when(lambda state, _: state.step % every == 0, push)

  def phase(state, key):
    state, _ = pushed(state, key)
    return state, {"slots_filled": state.bank.count.astype(jnp.float32)}

  return phase


def bank_part(slots: int, slot_size: int) -> state_lib.Part:
  """The "bank" part: an empty memory bank of `slots` batches of `slot_size` images."""
  return state_lib.Part("bank",
                        lambda key, ctx: buffers.bank_init(slots, slot_size, ctx.image_shape))


def bank_extra(batch: int):
  """`student_step` extra: one uniformly drawn filled slot, weight slot_size / batch (so with
  `normalize=True` the loss is the KD loss over the concatenation), 0 while the bank is empty."""

  def extra(state, key):
    x, valid = buffers.bank_sample(state.bank, key)
    return x, valid.astype(jnp.float32) * (state.bank.slot_size / batch)

  return extra


# ----------------------------------------------------------------------------- VAE replay


@dataclasses.dataclass(frozen=True)
class VAEReplay:
  """Static settings of PRE-DFKD's memory generator.

  Attributes:
    memory_batch: replay samples per student step (B/8 in the official code).
    latent_dim: d of the VAE.
    vae_input: novel images fed to the VAE per step (B/2).
    z_lr: the one Adam step on the memory latents (0.02).
    w_ie, w_oh: weights of the class-balancing terms on the memory samples (5, 1).
    kl_weight: weight of the VAE KL (1e-5).
    leak_z_grad_into_vae: add the gradient of the latent-step loss w.r.t. G_m to the VAE
      update, as the official code does by accident (docs/methods.md §7 (c)).
  """
  memory_batch: int
  latent_dim: int
  vae_input: int
  z_lr: float = 0.02
  w_ie: float = 5.0
  w_oh: float = 1.0
  kl_weight: float = 1e-5
  leak_z_grad_into_vae: bool = False


def vae_part(module, optimizer) -> state_lib.Part:
  """The "vae" part: `module` (a `models.VAE`) with the `optimizer` config block over
  `distill.num_iters` updates."""

  def init(key, ctx):
    x0 = jnp.zeros((1, *ctx.image_shape), jnp.float32)
    variables = module.init({"params": jax.random.fold_in(key, 101)}, x0,
                            jax.random.fold_in(key, 102), train=False)
    return state_lib.TrainState.create(
        apply_fn=precision.apply_for(module.apply, ctx.config),
        params=variables["params"], batch_stats=variables.get("batch_stats", {}),
        tx=optim.make_optimizer(optimizer, ctx.config.distill.num_iters))

  return state_lib.Part("vae", init)


def decode(vae, params, batch_stats, z, train: bool):
  """G_m(z); in train mode also the decoder's new BN statistics (else the given ones)."""
  variables = {"params": params, "batch_stats": batch_stats}
  if train:
    x, new = vae.apply_fn(variables, z, train=True, method="decode", mutable=["batch_stats"])
    return x, new["batch_stats"]
  return vae.apply_fn(variables, z, train=False, method="decode"), batch_stats


def memory_latent_loss(spec: VAEReplay, state, params, batch_stats, z, train: bool):
  """L_z = w_ie ie(T(G_m(z))) + w_oh oh(T(G_m(z))) + MSE(Var(z), 1) + MSE(Mean(z), 0).

  Var is the unbiased per-dimension batch variance (PyTorch's `var`).
  """
  x, bs = decode(state.vae, params, batch_stats, z, train)
  t_logits, _ = state.teacher(x)
  moments = (jnp.mean(jnp.square(jnp.var(z, axis=0, ddof=1) - 1.0))
             + jnp.mean(jnp.square(jnp.mean(z, axis=0))))
  loss = spec.w_ie * losses.dafl_ie(t_logits) + spec.w_oh * losses.dafl_oh(t_logits) + moments
  return loss, bs


def infer_memory(spec: VAEReplay, state, key, train: bool, param_grads: bool = False):
  """Class-balanced memory-sample inference: z ~ N(0, I), one Adam step (fresh state) on L_z,
  then x_m = sg(G_m(z)).

  Returns (x_m, grads of L_z w.r.t. the VAE parameters (None unless `param_grads`), the
  decoder's BN statistics after the forward passes, L_z).
  """
  vae = state.vae
  z = jax.random.normal(key, (spec.memory_batch, spec.latent_dim))
  argnums = (0, 1) if param_grads else 0
  (lz, bs), grads = jax.value_and_grad(
      lambda z_, p_: memory_latent_loss(spec, state, p_, vae.batch_stats, z_, train),
      argnums=argnums, has_aux=True)(z, vae.params)
  gz, gp = grads if param_grads else (grads, None)
  tx = optax.adam(spec.z_lr)
  updates, _ = tx.update(gz, tx.init(z), z)
  z = optax.apply_updates(z, updates)
  x_m, bs = decode(vae, vae.params, bs, z, train)
  return jax.lax.stop_gradient(x_m), gp, bs, lz


def memory_extra(spec: VAEReplay, batch: int):
  """`student_step` extra: `memory_batch` freshly inferred replay samples (G_m in eval mode),
  weight memory_batch / batch (with `normalize=True`: L1 over [x_novel; x_m])."""

  def extra(state, key):
    x_m, _, _, _ = infer_memory(spec, state, key, train=False)
    return x_m, jnp.asarray(spec.memory_batch / batch, jnp.float32)

  return extra


def vae_update(spec: VAEReplay, state, key, x_novel):
  """One VAE step (docs/methods.md §7 (c)) on the first `vae_input` novel images plus freshly
  inferred memory samples; in the very first outer iteration, where the official code feeds
  novel images only, the memory part is filled with further novel images (static shapes).

  L = L1(x_hat, x_in) + L1(T(x_hat), sg(T(x_in))) + kl_weight * KL, one Adam step on E_m, G_m.
  """
  vae = state.vae
  k_m, k_eps = jax.random.split(key)
  x_m, leak, bs, lz = infer_memory(spec, state, k_m, train=True,
                                   param_grads=spec.leak_z_grad_into_vae)
  first = state.step == 0
  n, m = spec.vae_input, spec.memory_batch
  x_in = jnp.concatenate([x_novel[:n], jnp.where(first, x_novel[n:n + m], x_m)], 0)
  x_in = jax.lax.stop_gradient(x_in)
  t_in = jax.lax.stop_gradient(state.teacher(x_in)[0])

  def loss_fn(params):
    (x_hat, mu, logvar), new = vae.apply_fn({"params": params, "batch_stats": bs}, x_in, k_eps,
                                            train=True, mutable=["batch_stats"])
    pixel = jnp.mean(jnp.abs(x_hat - x_in))
    logit = losses.l1_logits(t_in, state.teacher(x_hat)[0])
    kl = losses.vae_kl(mu, logvar)
    return pixel + logit + spec.kl_weight * kl, (new["batch_stats"], pixel, logit, kl)

  (loss, (new_bs, pixel, logit, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      vae.params)
  if spec.leak_z_grad_into_vae:
    grads = jax.tree.map(lambda g, l: g + jnp.where(first, 0.0, l), grads, leak)
  new_vae = vae.apply_gradients(grads, batch_stats=new_bs)
  metrics = {"loss": loss, "pixel": pixel, "logit": logit, "kl": kl, "memory_z_loss": lz}
  return state.with_parts(vae=new_vae), metrics


def pre_dfkd_kd_step(spec: VAEReplay, *, batch: int, latent_dim: int, mesh, with_vae: bool,
                     extras: tuple = ()):
  """One PRE-DFKD KD step: a fresh novel batch, the student's L1 step on [x_novel; x_m] (plus
  any further `extras`, e.g. condensed samples), and, if `with_vae`, a VAE step on the same
  novel batch."""

  def phase(state, key):
    x = phases.sample_generator(state, jax.random.fold_in(key, 0), batch, latent_dim, mesh)
    student = phases.student_step(lambda s, k: x, kd="l1",
                                  extras=(("memory", memory_extra(spec, batch)),) + extras,
                                  normalize=("memory",))
    state, metrics = student(state, jax.random.fold_in(key, 1))
    if with_vae:
      state, vm = vae_update(spec, state, jax.random.fold_in(key, 2), x)
      metrics.update({f"vae_{k}": v for k, v in vm.items()})
    return state, metrics

  return phase
