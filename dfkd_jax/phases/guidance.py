"""Condensed-sample-guided model inversion (docs/methods.md §8), as pieces any host method wires in.

A small condensed set D_c (dataset-distillation output, e.g.
`python -m dfkd_jax.condensation.condense`, or k real images per class) is the state part
"condensed" (`{"images", "labels"}`, see `parts`). With `config.guidance="condensed"`:

- a class-conditional projection discriminator D (`models.discriminator`) scores teacher
  penultimate features h = f_T(A(x)), A = DiffAugment (color, translation, cutout);
- the host's synthesis update minimises its own loss plus `lambda_fa * L_FA`, with
  L_FA = -mean_s D(h_s, y_s) (y_s = the host's target labels, or argmax T(x));
- after each synthesis update, one hinge-loss D step on that update's (detached) synthetic
  features and an equal-size condensed batch drawn with replacement:
  L_D = mean max(0, 1 - D(h_c, y_c)) + mean max(0, 1 + D(h_s, y_s));
- every student step adds `batch` augmented condensed images with the host's KD loss, weight
  `weight` (w_c).

`config.guidance="naive"` is the "host + CS" baseline: only the last point (no D, no L_FA).
The teacher is never updated: L_FA reaches the generator (or the pixels) through the frozen
teacher's forward pass.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax

from dfkd_jax.ops import augment
from dfkd_jax import state as state_lib
from dfkd_jax.models import discriminator as disc_lib

MODES = ("none", "condensed", "naive")


@dataclasses.dataclass(frozen=True)
class GuidanceSpec:
  """Static guidance settings (from `config.guidance` and `config.condensed`)."""
  mode: str = "condensed"
  lambda_fa: float = 1.0
  weight: float = 1.0
  batch: int = 128
  augment: bool = True

  def __post_init__(self):
    if self.mode not in MODES[1:]:
      raise ValueError(f"Unknown guidance {self.mode!r}; valid: {', '.join(MODES)}.")

  @property
  def adversarial(self) -> bool:
    return self.mode == "condensed"


def spec_from_config(config, num_devices: int = 1, num_images: int | None = None):
  """`None` for `guidance="none"`, else a GuidanceSpec.

  The per-step condensed batch is min(condensed.batch, |D_c|) rounded down to a multiple of the
  device count (at least one image per device), so the student batch stays evenly shardable.
  """
  mode = config.get("guidance", "none")
  if mode not in MODES:
    raise ValueError(f"Unknown guidance {mode!r}; valid: {', '.join(MODES)}.")
  if mode == "none":
    return None
  c = config.condensed
  n = c.batch if num_images is None else min(c.batch, num_images)
  n = max(num_devices, n // num_devices * num_devices)
  return GuidanceSpec(mode=mode, lambda_fa=c.lambda_fa, weight=c.weight, batch=n,
                      augment=c.augment)


def _augment(spec: GuidanceSpec, key, x):
  return augment.diff_augment(key, x) if spec.augment else x


def condensed_batch(state, key, n: int):
  """n condensed images and labels drawn uniformly with replacement."""
  images, labels = state.condensed["images"], state.condensed["labels"]
  idx = jax.random.randint(key, (n,), 0, images.shape[0])
  return images[idx], labels[idx]


def teacher_features(state, x):
  """The frozen teacher's pooled penultimate features f_T(x)."""
  _, aux = state.teacher(x)
  return aux["feature"]


def discriminate(state, params, h, y, update_stats: bool = False):
  """D(h, y) with parameters `params`; returns (logits, the discriminator's new batch_stats)."""
  d = state.discriminator
  variables = {"params": params, "batch_stats": d.batch_stats}
  if update_stats:
    out, new = d.apply_fn(variables, h, y, update_stats=True, mutable=["batch_stats"])
    return out, new["batch_stats"]
  return d.apply_fn(variables, h, y), d.batch_stats


def alignment_loss(spec: GuidanceSpec, state, key, x, y):
  """L_FA = -mean D(f_T(A(x)), y); returns (L_FA, h) (h feeds the discriminator step)."""
  h = teacher_features(state, _augment(spec, key, x))
  logits, _ = discriminate(state, state.discriminator.params, h, y)
  return -jnp.mean(logits), h


def discriminator_step(spec: GuidanceSpec, state, key, h_syn, y_syn):
  """One hinge-loss step of D on detached synthetic features and as many condensed samples."""
  k_c, k_a = jax.random.split(key)
  n = h_syn.shape[0]
  xc, yc = condensed_batch(state, k_c, n)
  h = jax.lax.stop_gradient(
      jnp.concatenate([teacher_features(state, _augment(spec, k_a, xc)), h_syn], 0))
  y = jnp.concatenate([yc, y_syn.astype(yc.dtype)], 0)
  d = state.discriminator

  def loss_fn(params):
    logits, bs = discriminate(state, params, h, y, update_stats=True)
    real = jnp.mean(jax.nn.relu(1.0 - logits[:n]))
    fake = jnp.mean(jax.nn.relu(1.0 + logits[n:]))
    return real + fake, (bs, real, fake)

  (loss, (bs, real, fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(d.params)
  new_d = d.apply_gradients(grads, batch_stats=bs)
  return state.with_parts(discriminator=new_d), {"d_loss": loss, "d_real": real, "d_fake": fake}


def student_extra(spec: GuidanceSpec):
  """`student_step` extra: `spec.batch` augmented condensed images with weight w_c."""

  def extra(state, key):
    k_c, k_a = jax.random.split(key)
    xc, _ = condensed_batch(state, k_c, spec.batch)
    return _augment(spec, k_a, xc), jnp.asarray(spec.weight, jnp.float32)

  return extra


def init_discriminator(key, spec: GuidanceSpec, teacher, image_shape, num_classes: int,
                       config) -> state_lib.TrainState | None:
  """A fresh discriminator TrainState (Adam) sized to the teacher's feature width."""
  if not spec.adversarial:
    return None
  x0 = jnp.zeros((2, *image_shape), jnp.float32)
  feat = jax.eval_shape(lambda x: teacher(x)[1]["feature"], x0)
  c = config.condensed
  module = disc_lib.ProjectionDiscriminator(num_classes=num_classes, hidden=c.d_hidden)
  variables = module.init(key, jnp.zeros((2, feat.shape[-1]), jnp.float32),
                          jnp.zeros((2,), jnp.int32))
  return state_lib.TrainState.create(
      apply_fn=module.apply, params=variables["params"],
      batch_stats=variables.get("batch_stats", {}),
      tx=optax.adam(c.d_lr, b1=c.d_b1, b2=c.d_b2))


def discriminator_of(state):
  """The "discriminator" part, or None without adversarial guidance (what synthesis loops carry)."""
  return state.parts.get("discriminator")


def with_discriminator(state, disc):
  """`state` with its discriminator part replaced by `disc` (unchanged when `disc` is None)."""
  return state if disc is None else state.with_parts(discriminator=disc)


def parts(spec: GuidanceSpec | None) -> tuple[state_lib.Part, ...]:
  """The state parts guidance adds to any host (none without guidance): "condensed" (the
  condensed set `{"images", "labels"}` from `ctx.condensed`) and, for adversarial guidance,
  "discriminator"."""
  if spec is None:
    return ()

  def condensed(key, ctx):
    del key
    images, labels = ctx.condensed
    return {"images": jnp.asarray(images, jnp.float32), "labels": jnp.asarray(labels, jnp.int32)}

  def discriminator(key, ctx):
    return init_discriminator(jax.random.fold_in(key, 103), spec, ctx.teacher, ctx.image_shape,
                              ctx.num_classes, ctx.config)

  out = (state_lib.Part("condensed", condensed),)
  if spec.adversarial:
    out += (state_lib.Part("discriminator", discriminator),)
  return out
