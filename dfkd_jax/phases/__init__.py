"""Phase factories: small pure functions `(state, key) -> (state, metrics)` composed into methods.

Each phase differentiates only its own model's parameters and stops gradients into the others
where the method says so. Factories take static configuration (Python numbers, loss names,
batch sizes) and the mesh; every array lives in the `DFKDState` (the parts a phase reads are built by the `*_part`
functions next to it: `pool_part` here, `replay.bank_part`, `replay.vae_part`,
`guidance.parts`, `methods.base.generator_part`), never in a closure.

Synthesis losses (docs/methods.md §0.2, §10) are assembled by `synthesis_terms` from weights
`w.{oh, ie, act, adv, bn, tv, l2, ce}`; a zero weight skips the term (and the forward pass it
needs). The adversarial term is written so that MINIMISING it maximises teacher/student
disagreement: `l1` -> -l1_logits, `kl` -> -kl_elem, `js` / `js_batch` -> js_adv (elementwise /
batch-mean reduction).
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

from dfkd_jax.ops import augment
from dfkd_jax.ops import bn_stats
from dfkd_jax.phases import guidance as guidance_lib
from dfkd_jax.ops import losses
from dfkd_jax.ops import buffers
from dfkd_jax import parallel
from dfkd_jax import state as state_lib

ADV_TYPES = ("l1", "kl", "js", "js_batch", "masked_kl")
KD_TYPES = ("kl", "dafl_kd", "kl_elem", "l1")
BN_FORMS = ("l2", "gauss_kl")


@dataclasses.dataclass(frozen=True)
class SynthesisWeights:
  """Weights of the synthesis loss terms; 0 disables a term."""
  oh: float = 0.0
  ie: float = 0.0
  act: float = 0.0
  adv: float = 0.0
  bn: float = 0.0
  tv: float = 0.0
  l2: float = 0.0
  ce: float = 0.0
  adv_type: str = "l1"
  adv_temperature: float = 3.0
  adv_detach_teacher: bool = False
  bn_form: str = "l2"
  first_bn_scale: float = 1.0

  def __post_init__(self):
    if self.adv_type not in ADV_TYPES:
      raise ValueError(f"Unknown adv_type {self.adv_type!r}; valid: {', '.join(ADV_TYPES)}.")
    if self.bn_form not in BN_FORMS:
      raise ValueError(f"Unknown bn_form {self.bn_form!r}; valid: {', '.join(BN_FORMS)}.")


def kd_loss(kind: str, teacher_logits, student_logits, temperature: float = 1.0):
  """Student distillation loss by name: kl (τ²-scaled Hinton), dafl_kd, kl_elem, l1."""
  if kind == "kl":
    return losses.kd_kl(teacher_logits, student_logits, temperature)
  if kind == "dafl_kd":
    return losses.dafl_kd(teacher_logits, student_logits)
  if kind == "kl_elem":
    return losses.kl_elem(teacher_logits, student_logits)
  if kind == "l1":
    return losses.l1_logits(teacher_logits, student_logits)
  raise ValueError(f"Unknown kd loss {kind!r}; valid: {', '.join(KD_TYPES)}.")


def adversarial_term(kind: str, teacher_logits, student_logits, temperature: float):
  """A term whose minimisation maximises teacher/student disagreement."""
  if kind == "l1":
    return -losses.l1_logits(teacher_logits, student_logits)
  if kind == "kl":
    return -losses.kl_elem(teacher_logits, student_logits)
  if kind == "js":
    return losses.js_adv(student_logits, teacher_logits, temperature, reduction="elementwise")
  if kind == "js_batch":
    return losses.js_adv(student_logits, teacher_logits, temperature, reduction="batch")
  if kind == "masked_kl":
    return losses.adv_masked_kl(student_logits, teacher_logits)
  raise ValueError(f"Unknown adv_type {kind!r}; valid: {', '.join(ADV_TYPES)}.")


def student_forward(student, params, x, train: bool):
  """Student logits and aux; in train mode also its new batch_stats (else the old ones)."""
  variables = {"params": params, "batch_stats": student.batch_stats}
  if train and student.batch_stats:
    (logits, aux), new_vars = student.apply_fn(variables, x, train=True, mutable=["batch_stats"])
    return logits, aux, new_vars["batch_stats"]
  logits, aux = student.apply_fn(variables, x, train=train)
  return logits, aux, student.batch_stats


def momentum_bn_stats(stats, memory_stats, rho: float):
  """Fast/NAYER "bn_mmt" (docs/methods.md §11.3): the batch moments mixed with the moments kept
  from earlier synthesis batches, `(1 - rho) * stats + rho * sg(memory)`, once `memory` is set.

  `memory_stats` is `{"stats": tree like stats, "ready": bool}`; before the first batch is
  recorded (`ready` False) the plain batch moments are used."""
  ready = memory_stats["ready"]
  return jax.tree.map(
      lambda cur, old: jnp.where(ready, (1.0 - rho) * cur + rho * jax.lax.stop_gradient(old), cur),
      stats, memory_stats["stats"])


def update_bn_memory(memory_stats, stats, rho: float):
  """Records a synthesis batch's BN-input moments into the bn_mmt memory (EMA with weight rho on
  the old value; the first batch is copied)."""
  ready = memory_stats["ready"]
  new = jax.tree.map(lambda old, cur: jnp.where(ready, rho * old + (1.0 - rho) * cur, cur),
                     memory_stats["stats"], jax.lax.stop_gradient(stats))
  return {"stats": new, "ready": jnp.ones((), bool)}


def synthesis_terms(w: SynthesisWeights, x, state, *, labels=None, student_train: bool = True,
                    bn_memory=None, bn_momentum: float = 0.0):
  """Synthesis loss terms on images x (gradient flows to x through the frozen teacher).

  Returns (total, terms dict, aux) where aux holds the teacher logits, the student's new
  batch_stats (when the student ran in train mode) and, with `w.bn`, the captured BN-input
  moments (`"bn_stats"`). With `bn_memory` (see `momentum_bn_stats`) and `bn_momentum > 0` the BN
  term matches the momentum-mixed moments instead of the batch's own.
  """
  teacher = state.teacher
  terms = {}
  bn_aux = {}
  if w.bn:
    (t_logits, t_aux), stats, order = bn_stats.capture_bn_inputs(
        teacher.apply_fn, teacher.variables, x, train=False)
    bn_aux = {"bn_stats": stats}
    if bn_memory is not None and bn_momentum:
      stats = momentum_bn_stats(stats, bn_memory, bn_momentum)
    if w.bn_form == "l2":
      terms["bn"] = losses.bn_l2(stats, teacher.batch_stats, first_layer_scale=w.first_bn_scale,
                                 order=order)
    else:
      terms["bn"] = losses.bn_gauss_kl(stats, teacher.batch_stats)
  else:
    t_logits, t_aux = teacher(x)
  if w.oh:
    terms["oh"] = losses.dafl_oh(t_logits)
  if w.ie:
    terms["ie"] = losses.dafl_ie(t_logits)
  if w.act:
    terms["act"] = losses.dafl_act(t_aux["feature"])
  if w.tv:
    terms["tv"] = losses.tv_l2(x)
  if w.l2:
    terms["l2"] = losses.img_l2(x)
  if w.ce:
    if labels is None:
      raise ValueError("loss.ce > 0 needs target labels: only deepinversion/adi synthesise "
                       "for given labels; set --config.loss.ce=0 for generator methods.")
    terms["ce"] = losses.cross_entropy(t_logits, labels)
  new_student_bs = state.student.batch_stats
  if w.adv:
    s_logits, _, new_student_bs = student_forward(state.student, state.student.params, x,
                                                  train=student_train)
    t_for_adv = jax.lax.stop_gradient(t_logits) if w.adv_detach_teacher else t_logits
    terms["adv"] = adversarial_term(w.adv_type, t_for_adv, s_logits, w.adv_temperature)
  weights = dataclasses.asdict(w)
  total = sum(weights[k] * v for k, v in terms.items())
  return total, terms, {"teacher_logits": t_logits, "student_batch_stats": new_student_bs,
                        **bn_aux}


def latents(key, batch: int, dim: int, mesh):
  """A global latent batch z ~ N(0, I), sharded over the mesh's data axis."""
  return parallel.shard_batch(jax.random.normal(key, (batch, dim)), mesh)


def generate(generator, params, z, mesh):
  """G(z) in training mode (batch statistics, as in all official codes); returns (x, new bs)."""
  variables = {"params": params, "batch_stats": generator.batch_stats}
  x, new_vars = generator.apply_fn(variables, z, train=True, mutable=["batch_stats"])
  return parallel.shard_batch(x, mesh), new_vars["batch_stats"]


@dataclasses.dataclass(frozen=True)
class FusedStudent:
  """DAFL's student update inside the generator step, on the same images.

  Attributes:
    kd: student loss name (see `kd_loss`).
    temperature: for `kd="kl"`.
    grad_to_generator: let the student loss's gradient reach the generator (DAFL's code: no).
    extras: as in `student_step` (e.g. condensed samples), added with their weights.
  """
  kd: str
  temperature: float = 1.0
  grad_to_generator: bool = False
  extras: tuple = ()


def _draw_extras(extras, state, key):
  """`[(x_extra, weight, name), ...]` of `student_step`-style extras, x stop-gradiented."""
  out = []
  for i, (name, fn) in enumerate(extras):
    xe, we = fn(state, jax.random.fold_in(key, 1000 + i))
    out.append((jax.lax.stop_gradient(xe), we, name))
  return out


def _parts_kd(kd: str, temperature: float, t_logits, s_logits, sizes, drawn,
              normalize=()) -> tuple[jax.Array, dict]:
  """The KD loss over a batch of concatenated parts: the main batch (`sizes[0]` rows) and each
  drawn extra (its own KD loss, metric `<name>_loss`, added with its weight; those named in
  `normalize` are averaged with the main batch, see `student_step`). Returns (loss, parts)."""
  bounds = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
  seg = lambda a, i: a[bounds[i]:bounds[i + 1]]  # noqa: E731
  loss = kd_loss(kd, seg(t_logits, 0), seg(s_logits, 0), temperature)
  parts = {"kd": loss}
  added, norm = 0.0, 1.0
  for i, (_, w, name) in enumerate(drawn, start=1):
    part = kd_loss(kd, seg(t_logits, i), seg(s_logits, i), temperature)
    parts[f"{name}_loss"] = part
    if name in normalize:
      loss, norm = loss + w * part, norm + w
    else:
      added = added + w * part
  return loss / norm + added, parts


def generator_step(w: SynthesisWeights, *, batch: int, latent_dim: int, mesh,
                   faithful_bn: bool = True, fused_student: FusedStudent | None = None,
                   z_key: Callable | None = None, guidance=None):
  """One generator update on a fresh latent batch.

  Args:
    w: synthesis loss weights.
    batch, latent_dim: latent batch shape.
    mesh: device mesh (the batch is sharded over `data`).
    faithful_bn: keep the student's BN running statistics updated by its train-mode forward
      inside this step, as the official codes do (docs/methods.md §0.3).
    fused_student: DAFL: also update the student on the same images in this step
      (`FusedStudent`).
    z_key: optional `z_key(state) -> key` to share one latent batch with other phases (ZSKT).
    guidance: a `guidance.GuidanceSpec` with a discriminator: add `lambda_fa * L_FA` to the
      generator loss and take one discriminator step on this batch (docs/methods.md §8).
  """
  adversarial_guidance = guidance is not None and guidance.adversarial

  def phase(state, key):
    zk = z_key(state) if z_key is not None else key
    z = latents(zk, batch, latent_dim, mesh)
    g = state.generator
    drawn = _draw_extras(fused_student.extras, state, key) if fused_student else []

    def g_loss(g_params, s_params):
      x, g_bs = generate(g, g_params, z, mesh)
      total, terms, aux = synthesis_terms(w, x, state)
      if adversarial_guidance:
        y_hat = jnp.argmax(jax.lax.stop_gradient(aux["teacher_logits"]), -1)
        fa, h = guidance_lib.alignment_loss(guidance, state, jax.random.fold_in(key, 11), x,
                                            y_hat)
        terms["fa"] = fa
        total = total + guidance.lambda_fa * fa
        aux = {**aux, "h": jax.lax.stop_gradient(h), "y": y_hat}
      s_out = {}
      if fused_student is not None:
        f = fused_student
        x_s = x if f.grad_to_generator else jax.lax.stop_gradient(x)
        t_logits = jax.lax.stop_gradient(aux["teacher_logits"])
        if drawn:
          x_e = jnp.concatenate([xe for xe, _, _ in drawn], 0)
          x_s = jnp.concatenate([x_s, x_e], 0)
          t_logits = jnp.concatenate(
              [t_logits, jax.lax.stop_gradient(state.teacher(x_e)[0])], 0)
        s_logits, _, s_bs = student_forward(state.student, s_params, x_s, train=True)
        n = x.shape[0]
        s_loss, parts = _parts_kd(f.kd, f.temperature, t_logits, s_logits,
                                  [n] + [xe.shape[0] for xe, _, _ in drawn], drawn)
        for _, _, name in drawn:
          terms[f"student_{name}_loss"] = parts[f"{name}_loss"]
        s_out = {"loss": s_loss, "batch_stats": s_bs,
                 "agree": losses.accuracy(s_logits[:n], jnp.argmax(t_logits[:n], -1)) * 100.0}
        total = total + s_loss
      return total, (terms, g_bs, aux, s_out)

    if fused_student is None:
      (total, (terms, g_bs, aux, _)), g_grads = jax.value_and_grad(g_loss, has_aux=True)(
          g.params, state.student.params)
      s_grads = None
    else:
      (total, (terms, g_bs, aux, s_out)), (g_grads, s_grads) = jax.value_and_grad(
          g_loss, argnums=(0, 1), has_aux=True)(g.params, state.student.params)
    new_g = g.apply_gradients(g_grads, batch_stats=g_bs)
    student = state.student
    metrics = {f"{k}": v for k, v in terms.items()}
    if fused_student is not None:
      student = student.apply_gradients(s_grads, batch_stats=s_out["batch_stats"])
      metrics["student_loss"] = s_out["loss"]
      metrics["agree"] = s_out["agree"]
      metrics["loss"] = total - s_out["loss"]
    else:
      metrics["loss"] = total
      if w.adv and faithful_bn:
        student = student.replace(batch_stats=aux["student_batch_stats"])
    metrics["grad_norm"] = optax.tree.norm(g_grads)
    state = state.with_parts(generator=new_g).replace(student=student)
    if adversarial_guidance:
      state, d_metrics = guidance_lib.discriminator_step(
          guidance, state, jax.random.fold_in(key, 12), aux["h"], aux["y"])
      metrics.update(d_metrics)
    return state, metrics

  return phase


def sample_generator(state, key, batch: int, latent_dim: int, mesh):
  """sg(G(z)) for student steps (G's running statistics are not updated: G always uses batch
  statistics, so they are never read)."""
  x, _ = generate(state.generator, state.generator.params, latents(key, batch, latent_dim, mesh),
                  mesh)
  return jax.lax.stop_gradient(x)


def student_step(sample: Callable, *, kd: str, temperature: float = 1.0, at_beta: float = 0.0,
                 extras: tuple = (), normalize: tuple[str, ...] = ()):
  """One student update on `sample(state, key)` images with teacher soft targets.

  Args:
    sample: `sample(state, key) -> x` (already stop-gradiented).
    kd: student loss name (see `kd_loss`).
    temperature: for `kd="kl"`.
    at_beta: weight of the attention-transfer term over the stage outputs (ZSKT: 250); on the
      main batch only.
    extras: `((name, fn), ...)` with `fn(state, key) -> (x_extra, weight)`: more images
      (replayed memory, condensed samples) appended to the batch, so the teacher and the
      student each run ONE forward pass over the concatenation. Each part has its own KD loss
      (metric `<name>_loss`), added with its (traced) weight.
    normalize: names of extras averaged with the main batch: (main + sum_i w_i l_i) /
      (1 + sum_i w_i) over those extras. With `w_i = n_i / B` this is exactly the KD loss over
      the concatenated batch (MB-DFKD, PRE-DFKD replay); a zero weight (an empty memory bank)
      then gives the main batch's loss alone. Other extras are added after the average.
  """

  def phase(state, key):
    x = sample(state, key)
    drawn = _draw_extras(extras, state, key)
    sizes = [x.shape[0]] + [xe.shape[0] for xe, _, _ in drawn]
    if drawn:
      x = jnp.concatenate([x] + [xe for xe, _, _ in drawn], 0)
    t_logits, t_aux = state.teacher(x)
    t_logits = jax.lax.stop_gradient(t_logits)
    s = state.student

    def loss_fn(params):
      s_logits, s_aux, bs = student_forward(s, params, x, train=True)
      loss, parts = _parts_kd(kd, temperature, t_logits, s_logits, sizes, drawn, normalize)
      if at_beta:
        main = lambda stages: [a[:sizes[0]] for a in stages]  # noqa: E731
        at = losses.attention_transfer(main(t_aux["stages"]), main(s_aux["stages"]),
                                       beta=at_beta)
        parts["at"] = at
        loss = loss + at
      return loss, (s_logits[:sizes[0]], bs, parts)

    (loss, (s_logits, bs, parts)), grads = jax.value_and_grad(loss_fn, has_aux=True)(s.params)
    metrics = {"loss": loss, **parts,
               "agree": losses.accuracy(s_logits, jnp.argmax(t_logits[:sizes[0]], -1)) * 100.0}
    return state.replace(student=s.apply_gradients(grads, batch_stats=bs)), metrics

  return phase


def inversion_labels(batch: int, num_classes: int) -> jax.Array:
  """DeepInversion target labels: `arange(batch) % K`, every class for any batch >= K.

  Unlike the official CIFAR script's hard-coded `[0..9]*25 + [0..5]` (docs/methods.md §5), the list
  follows the configured batch size and class count; class counts differ by at most one.
  """
  if batch < num_classes:
    raise ValueError(f"An inversion batch of {batch} cannot cover all {num_classes} classes: "
                     f"use distill.batch_size >= {num_classes}.")
  return jnp.arange(batch, dtype=jnp.int32) % num_classes


def inversion_round(w: SynthesisWeights, *, batch: int, image_shape, num_classes: int,
                    iterations: int, lr: float, b1: float, b2: float, jitter: int, flip: bool,
                    mesh, guidance=None):
  """DeepInversion/ADI: optimise a fresh batch of pixels for `iterations` Adam steps (lax.scan)
  and push the final iterate into the image pool (docs/methods.md §5).

  Pixels start from N(0, 1); target labels are `inversion_labels(batch, K)` (every class, any
  batch size >= K); each iteration evaluates the loss on a jittered/flipped view. The student,
  used only by the ADI competition term, runs in inference mode. With adversarial `guidance`
  (docs/methods.md §8) every iteration adds `lambda_fa * L_FA` (labels: the targets) and takes one
  discriminator step; the discriminator state rides in the scan carry.
  """
  tx = optax.adam(lr, b1=b1, b2=b2)
  labels = inversion_labels(batch, num_classes)
  adversarial_guidance = guidance is not None and guidance.adversarial

  def phase(state, key):
    init_key, loop_key = jax.random.split(key)
    pixels = parallel.shard_batch(jax.random.normal(init_key, (batch, *image_shape)), mesh)
    y = parallel.shard_batch(labels, mesh)

    def body(carry, i):
      px, opt_state, disc = carry
      k = jax.random.fold_in(loop_key, i)
      st = guidance_lib.with_discriminator(state, disc)

      def loss_fn(p):
        view = augment.jitter_flip(k, p, jitter, flip) if (jitter or flip) else p
        total, terms, _ = synthesis_terms(w, view, st, labels=y, student_train=False)
        h = None
        if adversarial_guidance:
          fa, h = guidance_lib.alignment_loss(guidance, st, jax.random.fold_in(k, 11), view, y)
          terms["fa"] = fa
          total = total + guidance.lambda_fa * fa
        return total, (terms, h)

      (total, (terms, h)), grads = jax.value_and_grad(loss_fn, has_aux=True)(px)
      updates, opt_state = tx.update(grads, opt_state, px)
      px = optax.apply_updates(px, updates)
      if adversarial_guidance:
        st, d_metrics = guidance_lib.discriminator_step(
            guidance, st, jax.random.fold_in(k, 12), jax.lax.stop_gradient(h), y)
        terms = {**terms, **d_metrics}
      return (px, opt_state, guidance_lib.discriminator_of(st)), {"loss": total, **terms}

    (pixels, _, disc), metrics = jax.lax.scan(
        body, (pixels, tx.init(pixels), guidance_lib.discriminator_of(state)),
        jnp.arange(iterations))
    first = jax.tree.map(lambda m: m[0], metrics)
    last = jax.tree.map(lambda m: m[-1], metrics)
    out = {**{f"{k}": v for k, v in last.items()}, "loss_first": first["loss"]}
    state = state.with_parts(pool=buffers.add(state.pool, jax.lax.stop_gradient(pixels)))
    return guidance_lib.with_discriminator(state, disc), out

  return phase


def pool_part(capacity: int) -> state_lib.Part:
  """The "pool" part: an empty `buffers.ImageBuffer` of `capacity` images of the context's shape."""
  return state_lib.Part("pool", lambda key, ctx: buffers.pool_init(capacity, ctx.image_shape))


def sample_pool(state, key, batch: int, mesh, jitter: int = 0, flip: bool = False):
  """`batch` images drawn uniformly from the pool; with `jitter`/`flip`, the batch is rolled by
  one random shift of up to `jitter` pixels and mirrored at random (`augment.jitter_flip`, one
  draw shared by the batch): the student's augmentation of stored synthetic images."""
  augmented = bool(jitter or flip)
  if augmented:
    key, k_aug = jax.random.split(key)
  x = parallel.shard_batch(buffers.sample(state.pool, key, batch), mesh)
  return augment.jitter_flip(k_aug, x, jitter, flip) if augmented else x
