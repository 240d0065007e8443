"""The two fast inversion hosts (docs/methods.md §11, §12): Fast-DFKD and NAYER.

Both synthesise a short batch per outer iteration with a generator whose output is
`(sigmoid(.) - mean) / std` (the teacher's normalised input range), push the lowest-loss batch of
that synthesis into an image pool, and then train the student on pool samples:

- `fast`: a meta-generator θ; every iteration copies θ, adapts the copy and a fresh latent batch
  for `fast.k` Adam steps, keeps the best batch, and moves θ with the SUM of the k inner
  gradients (the official code's "FOMAML"), through the generator's own optimizer (Adam,
  lr = lr_g·k, b1 0.5).
- `nayer`: a generator over constant label embeddings whose first layer (the "noisy layer") is
  re-drawn before every synthesis loop; `nayer.g_loops` loops of `nayer.g_steps` Adam steps (a
  fresh Adam each loop) per iteration; the whole generator is re-initialised every
  `nayer.g_life` iterations.

The synthesis loss is `w_bn·bn_l2 (momentum-mixed, ρ = loss_bn_momentum) + w_ce·CE(T, y) +
w_adv·adv_masked_kl`, with T and S in inference mode; the adversarial term is off during the
`warmup` iterations, in which the student does not train either. Student steps: KD on
jittered pool samples. Condensed-sample guidance works by config alone, as on the other hosts:
the feature-alignment term joins every synthesis step, the discriminator steps with it, and the
student steps add condensed samples.

Our choices (documented in docs/methods.md §11.5/§12.5): class-balanced labels for Fast (the
official code draws them uniformly), a ring-buffer pool of `pool_size` images (the official pool
only grows), a batch-shared circular jitter for synthesis and student views (the official codes
use per-sample zero-padded crops and flips; flips are off for Fashion-MNIST), and the student's
cosine schedule spanning exactly its post-warm-up updates.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from dfkd_jax.ops import augment
from dfkd_jax.ops import bn_stats
from dfkd_jax.phases import combinators
from dfkd_jax import config_blocks
from dfkd_jax.phases import guidance as guidance_lib
from dfkd_jax.ops import buffers
from dfkd_jax import models as models_lib
from dfkd_jax import parallel
from dfkd_jax import phases
from dfkd_jax import state as state_lib
from dfkd_jax.methods import base
from dfkd_jax.types import Method

LABEL_EMBEDDINGS = ("one_hot", "gaussian", "file")


# --------------------------------------------------------------------------- shared pieces


def bn_memory_init(teacher, image_shape) -> dict:
  """An empty bn_mmt memory (`phases.momentum_bn_stats`): zeros shaped like the teacher's
  captured BN-input moments, and `ready` False."""
  x = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
  shapes = jax.eval_shape(
      lambda v, x: bn_stats.capture_bn_inputs(teacher.apply_fn, v, x, train=False)[1],
      teacher.variables, x)
  return {"stats": jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes),
          "ready": jnp.zeros((), bool)}


def _loop(n: int, body, carry, unroll: bool, chunk: int = 0):
  """`carry = body(carry, i)` for i < n: a Python loop (`unroll`, or n = 1) or a `lax.scan`
  (see `combinators.repeat` for why CPU configs unroll). With `unroll` and 0 < chunk < n: a
  scan over n // chunk chunks of `chunk` unrolled steps, then the remainder unrolled (the
  compile time of about `chunk` steps instead of n)."""
  def unrolled(carry, start, count):
    for i in range(count):
      carry = body(carry, jnp.asarray(start, jnp.int32) + i)
    return carry

  if unroll and 0 < chunk < n:
    q, r = divmod(n, chunk)
    carry = jax.lax.scan(lambda c, j: (unrolled(c, j * chunk, chunk), None), carry,
                         jnp.arange(q))[0]
    return unrolled(carry, q * chunk, r)
  if unroll or n == 1:
    return unrolled(carry, 0, n)
  return jax.lax.scan(lambda c, i: (body(c, i), None), carry, jnp.arange(n))[0]


def _synthesis_loss(w, state, x, key, labels, *, adv_on, jitter, rho, guidance):
  """The Fast/NAYER synthesis loss on generator output x: (total, (terms, bn_stats, h))."""
  view = augment.jitter_flip(key, x, jitter, False) if jitter else x
  total, terms, aux = phases.synthesis_terms(
      w, view, state, labels=labels, student_train=False, bn_memory=state.bn_memory,
      bn_momentum=rho)
  if w.adv:  # the adversarial term waits for the warm-up to end
    total = total - (1.0 - adv_on.astype(jnp.float32)) * w.adv * terms["adv"]
  h = None
  if guidance is not None and guidance.adversarial:
    fa, h = guidance_lib.alignment_loss(guidance, state, jax.random.fold_in(key, 11), view,
                                        labels)
    terms["fa"] = fa
    total = total + guidance.lambda_fa * fa
  return total, (terms, aux.get("bn_stats"), h)


def _finish_synthesis(state, best_x, stats, rho, metrics):
  """bn_mmt memory update from the last forward, best batch into the pool."""
  bn_memory = state.bn_memory
  if stats is not None and rho:
    bn_memory = phases.update_bn_memory(bn_memory, stats, rho)
  pool = buffers.add(state.pool, jax.lax.stop_gradient(best_x))
  return state.with_parts(pool=pool, bn_memory=bn_memory), metrics


def _pool_image_shape(state):
  """The image shape [H, W, C] of the pool."""
  return state.pool.images.shape[1:]


def _keep_best(best, loss, x):
  best_loss, best_x = best
  better = loss < best_loss
  return jnp.where(better, loss, best_loss), jnp.where(better, x, best_x)


def _student(ctx: base.Context, cfg_block, warmup: int):
  d, cfg = ctx.d, ctx.config
  jitter, flip = cfg_block.student_jitter, bool(cfg_block.get("student_flip", False))

  def sample(state, key):
    return phases.sample_pool(state, key, d.batch_size, ctx.mesh, jitter, flip)

  step = phases.student_step(sample, kd=cfg.loss.kd, temperature=cfg.loss.kd_temperature,
                             extras=base.condensed_extras(ctx))
  chunk = cfg_block.student_chunk
  if chunk and chunk < d.student_steps:
    if d.student_steps % chunk:
      raise ValueError(f"distill.student_steps={d.student_steps} must be a multiple of "
                       f"student_chunk={chunk} (or set student_chunk=0).")
    # a scan over unrolled chunks: compile time of `chunk` steps, few while-loop iterations
    steps = combinators.repeat(d.student_steps // chunk,
                               combinators.repeat(chunk, step, unroll=True))
  else:
    steps = combinators.repeat(d.student_steps, step, unroll=d.unroll)
  return combinators.when(lambda s, _: s.step >= warmup, steps)


def _disc_step(guidance, state, key, h, labels):
  if guidance is None or not guidance.adversarial:
    return state, {}
  return guidance_lib.discriminator_step(guidance, state, key, jax.lax.stop_gradient(h), labels)


def _check_common(ctx, block, name):
  d = ctx.d
  if block.warmup >= d.num_iters:
    raise ValueError(f"{name}.warmup={block.warmup} leaves no student training in "
                     f"distill.num_iters={d.num_iters}: use a smaller warm-up or more iterations.")
  if block.pool_size < d.batch_size:
    raise ValueError(f"{name}.pool_size={block.pool_size} must hold at least one batch "
                     f"({d.batch_size}).")


def _init(ctx, block, generator, generator_input):
  parts = (base.generator_part(ctx, generator, generator_input), phases.pool_part(block.pool_size),
           state_lib.Part("bn_memory", lambda key, ctx: bn_memory_init(ctx.teacher,
                                                                       ctx.image_shape)))
  return functools.partial(base.init_state, ctx=ctx, parts=parts,
                           student_updates=(ctx.d.num_iters - block.warmup) * ctx.d.student_steps)


# --------------------------------------------------------------------------- Fast-DFKD


def fast_synthesis(w: phases.SynthesisWeights, *, batch: int, latent_dim: int, num_classes: int,
                   k: int, lr_g: float, lr_z: float, warmup: int, bn_momentum: float,
                   jitter: int, mesh, guidance=None, unroll: bool = True):
  """One Fast-k synthesis round and the meta step (docs/methods.md §11.3).

  θ' = θ and a fresh z ~ N(0, I) are adapted by fresh Adams (lr_g, lr_z; b1 0.5) for k steps;
  the batch with the lowest loss (measured before each step's update) goes into the pool; the
  generator's optimizer then steps θ with the sum of the k inner gradients.
  """
  labels = phases.inversion_labels(batch, num_classes)
  tx_g, tx_z = optax.adam(lr_g, b1=0.5), optax.adam(lr_z, b1=0.5)

  def phase(state, key):
    g = state.generator
    k_z, k_loop = jax.random.split(key)
    z = phases.latents(k_z, batch, latent_dim, mesh)
    y = parallel.shard_batch(labels, mesh)
    adv_on = state.step >= warmup

    def loss_fn(theta, z, st, kk):
      x, g_bs = phases.generate(g, theta, z, mesh)
      total, (terms, stats, h) = _synthesis_loss(w, st, x, kk, y, adv_on=adv_on, jitter=jitter,
                                                 rho=bn_momentum, guidance=guidance)
      return total, (x, g_bs, terms, stats, h)

    def body(carry, i):
      theta, z, og, oz, gsum, best, disc, _, _, _ = carry
      kk = jax.random.fold_in(k_loop, i)
      st = guidance_lib.with_discriminator(state, disc)
      (total, (x, g_bs, terms, stats, h)), (gt, gz) = jax.value_and_grad(
          loss_fn, argnums=(0, 1), has_aux=True)(theta, z, st, kk)
      best = _keep_best(best, total, jax.lax.stop_gradient(x))
      gsum = jax.tree.map(jnp.add, gsum, gt)
      ug, og = tx_g.update(gt, og, theta)
      uz, oz = tx_z.update(gz, oz, z)
      st, d_metrics = _disc_step(guidance, st, jax.random.fold_in(kk, 12), h, y)
      return (optax.apply_updates(theta, ug), optax.apply_updates(z, uz), og, oz, gsum, best,
              guidance_lib.discriminator_of(st), g_bs, stats, {"loss": total, **terms, **d_metrics})

    init_x = jnp.zeros((batch, *_pool_image_shape(state)), jnp.float32)
    carry = (g.params, z, tx_g.init(g.params), tx_z.init(z),
             jax.tree.map(jnp.zeros_like, g.params), (jnp.inf, init_x), guidance_lib.discriminator_of(state),
             g.batch_stats, None, None)
    # one traced step fixes the carry's structure (stats, metrics) for the loop
    carry = body(carry, jnp.asarray(0, jnp.int32))
    carry = _loop(k - 1, lambda c, i: body(c, i + 1), carry, unroll) if k > 1 else carry
    _, _, _, _, gsum, (best_loss, best_x), disc, g_bs, stats, metrics = carry
    state = guidance_lib.with_discriminator(
        state.with_parts(generator=g.apply_gradients(gsum, batch_stats=g_bs)), disc)
    metrics = {**metrics, "best_loss": best_loss, "meta_grad_norm": optax.tree.norm(gsum)}
    return _finish_synthesis(state, best_x, stats, bn_momentum, metrics)

  return phase


def make_fast(ctx: base.Context) -> Method:
  d, cfg, f = ctx.d, ctx.config, ctx.config.fast
  _check_common(ctx, f, "fast")
  if f.k < 1:
    raise ValueError(f"fast.k={f.k} must be >= 1 (the inner adaptation steps per batch).")
  h, _, c = ctx.image_shape
  mean, std = base.pixel_normalisation(cfg)
  generator = models_lib.FastGenerator(img_size=h, channels=c, ngf=cfg.generator.ngf,
                                       mean=mean, std=std)
  synth = fast_synthesis(
      base.synthesis_weights(cfg.loss), batch=d.batch_size, latent_dim=d.latent_dim,
      num_classes=ctx.num_classes, k=f.k, lr_g=f.lr_g, lr_z=f.lr_z, warmup=f.warmup,
      bn_momentum=cfg.loss.bn_momentum, jitter=f.synth_jitter, mesh=ctx.mesh,
      guidance=ctx.guidance, unroll=d.unroll)
  body = combinators.sequence(("synth", synth), ("student", _student(ctx, f, f.warmup)))
  return Method(init=_init(ctx, f, generator, None), step=body)


def fast_defaults(c) -> None:
  """Fast-2 on the CIFAR R34->R18 script: 10 bn (ρ 0.9) + 0.5 CE + 1.33 adv; KD τ 20; S SGD 0.2
  wd 1e-4 cosine; meta Adam lr_g·k b1 0.5; z d = 256; warm-up 20 rounds; 400 S steps."""
  c.loss = config_blocks.loss_block(bn=10.0, ce=0.5, adv=1.33, adv_type="masked_kl",
                                    bn_momentum=0.9, kd="kl", kd_temperature=20.0)
  c.fast = ml_collections.ConfigDict(dict(k=2, lr_g=5e-3, lr_z=0.015, warmup=20,
                                          pool_size=256 * 220, synth_jitter=4,
                                          student_jitter=4, student_flip=False,
                                          student_chunk=0))
  c.distill.update(dict(num_iters=220, batch_size=256, latent_dim=256, student_steps=400))
  c.generator.ngf = 64
  c.gen_optimizer = config_blocks.optimizer("adam", lr=5e-3 * 2, momentum=0.0,
                                            weight_decay=0.0, schedule="constant", b1=0.5)
  c.optimizer = config_blocks.optimizer("sgd", lr=0.2, momentum=0.9, weight_decay=1e-4,
                                        schedule="cosine")


# --------------------------------------------------------------------------- NAYER


def label_embeddings(kind: str, num_classes: int, *, size: int = 512, path: str = "",
                     seed: int = 0) -> np.ndarray:
  """The constant NAYER generator input per class, [K, L] float32.

  `one_hot` (L = K), `gaussian` (seeded N(0, 1), L = `size`), or `file`: a `.npy` of shape
  [K, L] (e.g. text-encoder embeddings of the class names, made elsewhere).
  """
  if kind == "one_hot":
    return np.eye(num_classes, dtype=np.float32)
  if kind == "gaussian":
    return np.random.default_rng(seed).standard_normal((num_classes, size)).astype(np.float32)
  if kind == "file":
    if not path:
      raise ValueError("nayer.label_emb='file' needs nayer.label_emb_path=<file.npy> of shape "
                       f"[{num_classes}, L].")
    try:
      table = np.load(path)
    except (OSError, ValueError) as e:
      raise ValueError(f"Cannot read the label embeddings {path!r}: {e}") from e
    if table.ndim != 2 or table.shape[0] != num_classes:
      raise ValueError(f"Label embeddings {path!r} have shape {table.shape}; expected "
                       f"[{num_classes}, L] (one row per class).")
    if not np.all(np.isfinite(table)):
      raise ValueError(f"Label embeddings {path!r} contain NaN or inf.")
    return table.astype(np.float32)
  raise ValueError(f"Unknown nayer.label_emb {kind!r}; valid: {', '.join(LABEL_EMBEDDINGS)}.")


def redraw_noisy(params, key):
  """New noisy layers: kernel ~ N(0, 1), bias 0 (the rest of the generator is kept)."""
  params = dict(params)
  params["noisy_kernel"] = jax.random.normal(key, params["noisy_kernel"].shape,
                                             params["noisy_kernel"].dtype)
  params["noisy_bias"] = jnp.zeros_like(params["noisy_bias"])
  return params


def nayer_synthesis(w: phases.SynthesisWeights, generator, embeddings: np.ndarray, *, batch: int,
                    num_classes: int, g_steps: int, g_loops: int, g_life: int, lr: float,
                    warmup: int, bn_momentum: float, jitter: int, mesh, guidance=None,
                    unroll: bool = True, chunk: int = 0):
  """One NAYER iteration's synthesis (docs/methods.md §12.3): every `g_life` iterations a
  freshly initialised generator; then `g_loops` loops of (re-drawn noisy layers, a fresh Adam,
  `g_steps` steps, best batch into the pool, bn_mmt memory update)."""
  labels = phases.inversion_labels(batch, num_classes)
  emb = jnp.asarray(embeddings)[labels]
  tx = optax.adam(lr, b1=0.5)

  def phase(state, key):
    g = state.generator
    k_reset, k_loops = jax.random.split(key)
    reset = (state.step % g_life == 0) & (state.step > 0)

    def fresh(_):  # initialised only in the iterations that reset (lax.cond)
      v = generator.init(k_reset, emb, train=False)
      return v["params"], v.get("batch_stats", {})

    params, g_bs = jax.lax.cond(reset, fresh, lambda _: (g.params, g.batch_stats), None)
    e = parallel.shard_batch(emb, mesh)
    y = parallel.shard_batch(labels, mesh)
    adv_on = state.step >= warmup
    gs = g.replace(batch_stats=g_bs)

    def loss_fn(p, st, kk):
      x, new_bs = phases.generate(gs, p, e, mesh)
      total, (terms, stats, h) = _synthesis_loss(w, st, x, kk, y, adv_on=adv_on, jitter=jitter,
                                                 rho=bn_momentum, guidance=guidance)
      return total, (x, new_bs, terms, stats, h)

    metrics = {}
    for loop in range(g_loops):
      k_loop = jax.random.fold_in(k_loops, loop)
      params = redraw_noisy(params, jax.random.fold_in(k_loop, 1))

      def body(carry, i, k_loop=k_loop, state=state):
        p, opt, best, disc, _, _, _ = carry
        kk = jax.random.fold_in(k_loop, 100 + i)
        st = guidance_lib.with_discriminator(state, disc)
        (total, (x, new_bs, terms, stats, h)), grads = jax.value_and_grad(
            loss_fn, has_aux=True)(p, st, kk)
        best = _keep_best(best, total, jax.lax.stop_gradient(x))
        updates, opt = tx.update(grads, opt, p)
        st, d_metrics = _disc_step(guidance, st, jax.random.fold_in(kk, 12), h, y)
        return (optax.apply_updates(p, updates), opt, best, guidance_lib.discriminator_of(st),
                new_bs, stats,
                {"loss": total, **terms, **d_metrics})

      init_x = jnp.zeros((batch, *_pool_image_shape(state)), jnp.float32)
      carry = body((params, tx.init(params), (jnp.inf, init_x), guidance_lib.discriminator_of(state), g_bs, None,
                    None), jnp.asarray(0, jnp.int32))
      if g_steps > 1:
        carry = _loop(g_steps - 1, lambda c, i: body(c, i + 1), carry, unroll, chunk)
      params, _, (best_loss, best_x), disc, g_bs, stats, metrics = carry
      state = guidance_lib.with_discriminator(state, disc)
      state, metrics = _finish_synthesis(state, best_x, stats, bn_momentum,
                                         {**metrics, "best_loss": best_loss})
    state = state.with_parts(generator=state.generator.replace(params=params, batch_stats=g_bs,
                                                               step=g.step + 1))
    return state, {**metrics, "reset": reset.astype(jnp.float32)}

  return phase


def make_nayer(ctx: base.Context) -> Method:
  d, cfg, n = ctx.d, ctx.config, ctx.config.nayer
  _check_common(ctx, n, "nayer")
  for key in ("g_steps", "g_loops", "g_life"):
    if n[key] < 1:
      raise ValueError(f"nayer.{key}={n[key]} must be >= 1.")
  if n.pool_size < d.batch_size * n.g_loops:
    raise ValueError(f"nayer.pool_size={n.pool_size} must hold one iteration's "
                     f"{n.g_loops} x {d.batch_size} images.")
  table = label_embeddings(n.label_emb, ctx.num_classes, size=n.label_emb_size,
                           path=n.label_emb_path, seed=cfg.seed)
  h, _, c = ctx.image_shape
  mean, std = base.pixel_normalisation(cfg)
  layers = -(-d.batch_size // ctx.num_classes)
  generator = models_lib.NoisyLayerGenerator(
      num_layers=layers, num_classes=ctx.num_classes, emb_size=n.emb_size, img_size=h,
      channels=c, ngf=cfg.generator.ngf, mean=mean, std=std)
  synth = nayer_synthesis(
      base.synthesis_weights(cfg.loss), generator, table, batch=d.batch_size,
      num_classes=ctx.num_classes, g_steps=n.g_steps, g_loops=n.g_loops, g_life=n.g_life,
      lr=n.lr_g, warmup=n.warmup, bn_momentum=cfg.loss.bn_momentum, jitter=n.synth_jitter,
      mesh=ctx.mesh, guidance=ctx.guidance, unroll=d.unroll, chunk=n.synth_chunk)
  body = combinators.sequence(("synth", synth), ("student", _student(ctx, n, n.warmup)))
  sample_input = jnp.asarray(table)[phases.inversion_labels(d.batch_size, ctx.num_classes)]
  return Method(init=_init(ctx, n, generator, sample_input), step=body)


def nayer_defaults(c) -> None:
  """The CIFAR-10 script: 10 bn (ρ 0.9) + 0.5 CE + 1.33 adv; KD τ 20; B_syn 400 (the student
  batch here too), g_steps 30, g_loops 2, g_life 10, Adam 4e-3 b1 0.5; warm-up 20; 400 S steps;
  S SGD 0.2 wd 1e-4 cosine. The warm-up's 10 loops per iteration (gwp_loops) are not modelled:
  `g_loops` is the same in every iteration (docs/methods.md §12.5)."""
  c.loss = config_blocks.loss_block(bn=10.0, ce=0.5, adv=1.33, adv_type="masked_kl",
                                    bn_momentum=0.9, kd="kl", kd_temperature=20.0)
  c.nayer = ml_collections.ConfigDict(dict(
      g_steps=30, g_loops=2, g_life=10, lr_g=4e-3, warmup=20, pool_size=400 * 2 * 120,
      label_emb="gaussian", label_emb_size=512, label_emb_path="", emb_size=1000,
      synth_jitter=4, student_jitter=4, student_flip=False, student_chunk=0, synth_chunk=0))
  c.distill.update(dict(num_iters=120, batch_size=400, student_steps=400))
  c.generator.ngf = 64
  c.optimizer = config_blocks.optimizer("sgd", lr=0.2, momentum=0.9, weight_decay=1e-4,
                                        schedule="cosine")
