"""One outer iteration of each data-free method in eager PyTorch (`TorchMethod`), mirroring the
library's JAX step, and its sources of randomness: fresh PyTorch draws (`TorchRandom`, timing)
or the JAX step's own draws recomputed from its PRNG keys (`JaxKeys`, the parity check)."""
from __future__ import annotations

import jax
import numpy as np
import torch
import torch.nn.functional as F

from dfkd_jax import optim

from .losses import BNCapture, t_adv, t_ie, t_kd, t_l1, t_oh, t_tv_l2
from .models import IMAGE_SHAPE, NUM_CLASSES, TorchGenerator, TorchVAE, torch_model
from .weights import _t, load_generator, load_model, load_vae


# ============================================================================ randomness


class TorchRandom:
  """Fresh PyTorch draws (timing runs). `path` (the JAX key path) is ignored."""

  def normal(self, shape, path=(), image=False):
    del path
    if image:  # NHWC shape -> NCHW tensor
      b, h, w, c = shape
      return torch.randn(b, c, h, w)
    return torch.randn(*shape)

  def randint(self, low, high, shape, path=()):
    del path
    return torch.randint(low, high, shape)

  def randint_scalar(self, low, high, path=()):
    del path
    return int(torch.randint(low, high, ()))


class JaxKeys:
  """The JAX step's own draws, recomputed on the host from its PRNG keys (check mode).

  A path lists, from the iteration key `fold_in(state.rng, step)`, the `fold_in` indices (ints)
  and `("split", n, i)` steps that `dfkd_jax` applies (combinators.sequence / repeat, phases,
  replay); the PyTorch steps below name the path of each draw.
  """

  def __init__(self, rng, step: int):
    self.base = jax.random.fold_in(rng, step)

  def key(self, path):
    k = self.base
    for p in path:
      k = jax.random.split(k, p[1])[p[2]] if isinstance(p, tuple) else jax.random.fold_in(k, p)
    return k

  def normal(self, shape, path=(), image=False):
    x = _t(jax.random.normal(self.key(path), shape))
    return x.permute(0, 3, 1, 2).contiguous() if image else x

  def randint(self, low, high, shape, path=()):
    return torch.from_numpy(np.array(jax.random.randint(self.key(path), shape, low, high)))

  def randint_scalar(self, low, high, path=()):
    return int(jax.random.randint(self.key(path), (), low, high))


# ============================================================================ PyTorch methods


class frozen_params:  # pylint: disable=invalid-name
  """Context: `module`'s parameters need no gradient (generator steps through the student)."""

  def __init__(self, module):
    self.params = list(module.parameters())

  def __enter__(self):
    for p in self.params:
      p.requires_grad_(False)

  def __exit__(self, *exc):
    for p in self.params:
      p.requires_grad_(True)


def _grad_norm(params):
  return torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params if p.grad is not None))


def _torch_optimizer(cfg, params):
  if cfg.get("grad_clip", 0.0) or cfg.get("nesterov", False):
    raise ValueError("compare_torch does not implement gradient clipping or Nesterov momentum.")
  if cfg.name == "sgd":
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.get("momentum", 0.9) or 0.0,
                           weight_decay=cfg.get("weight_decay", 0.0))
  return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.get("b1", 0.9), cfg.get("b2", 0.999)),
                          weight_decay=cfg.get("weight_decay", 0.0))


class TorchMethod:
  """One outer iteration of a method in eager PyTorch, mirroring the JAX step.

  Built from the same config and the JAX initial state (weights copied). `step(rng)` runs one
  outer iteration and returns its metrics under the JAX step's names. With `schedules=True`
  the learning rates follow the optax schedules of the JAX step (the check); otherwise they stay
  at their base values (timing: a schedule costs nothing).
  """

  def __init__(self, method, config, state, schedules=False):
    self.method, self.cfg, self.it = method, config, 0
    self.d, self.w = config.distill, config.loss
    self.teacher = torch_model(config.teacher.model)
    self.student = torch_model(config.student.model)
    load_model(self.teacher, state.teacher.params, state.teacher.batch_stats)
    load_model(self.student, state.student.params, state.student.batch_stats)
    self.teacher.eval().requires_grad_(False)
    self.student.train()
    self.capture = BNCapture(self.teacher)
    self.opt_s = _torch_optimizer(config.optimizer, self.student.parameters())
    n_it = self.d.num_iters
    self.schedules = {}
    if schedules:
      self.schedules["s"] = optim.make_schedule(config.optimizer, n_it * self.d.student_steps)
    self.counts = {"s": 0, "g": 0, "v": 0}
    self.g = None
    if state.has("generator"):
      gc = config.generator
      if gc.kind != "dafl" or not gc.final_tanh:
        raise ValueError("compare_torch implements the DAFL/PRE-DFKD generator only.")
      self.g = TorchGenerator(IMAGE_SHAPE[0], IMAGE_SHAPE[2], gc.ngf, self.d.latent_dim,
                              gc.bn_eps, gc.spectral_norm)
      load_generator(self.g, state.generator.params, state.generator.batch_stats)
      self.g.train()
      self.opt_g = _torch_optimizer(config.gen_optimizer, self.g.parameters())
      if schedules:
        self.schedules["g"] = optim.make_schedule(config.gen_optimizer, n_it)
    if method == "deepinversion":
      self.pool = torch.zeros(config.deepinversion.pool_size, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2])
      self.pool_cursor = self.pool_count = 0
    if method == "mb_dfkd":
      mb = config.mb_dfkd
      self.bank = torch.zeros(mb.slots, mb.slot_size, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2])
      self.bank_cursor = self.bank_count = 0
    if method == "pre_dfkd":
      p = config.pre_dfkd
      self.vae = TorchVAE(IMAGE_SHAPE[0], IMAGE_SHAPE[2], p.vae_latent_dim, p.vae_ngf,
                          p.vae_bn_eps, p.encoder_normalize)
      load_vae(self.vae, state.vae.params, state.vae.batch_stats)
      self.opt_v = _torch_optimizer(p.vae_optimizer, self.vae.parameters())
      if schedules:
        self.schedules["v"] = optim.make_schedule(p.vae_optimizer, n_it)
    if self.cfg.get("guidance", "none") != "none":
      raise ValueError("compare_torch does not implement condensed-sample guidance.")

  # ---------------------------------------------------------------- shared pieces

  def _update(self, which, opt):
    if which in self.schedules:  # optax evaluates the schedule at the update count
      for group in opt.param_groups:
        group["lr"] = float(self.schedules[which](self.counts[which]))
    opt.step()
    self.counts[which] += 1

  def sample(self, rng, path, n=None):
    """sg(G(z)) in training mode (batch statistics); the spectral-norm vectors are not stored."""
    z = rng.normal((n or self.d.batch_size, self.d.latent_dim), path)
    sn = self.g.sn_convs()
    for m in sn:
      m.update_u = False
    with torch.no_grad():
      x = self.g(z)
    for m in sn:
      m.update_u = True
    return x

  def student_step(self, x, extras=(), kd="l1", temperature=1.0):
    """`phases.student_step`: one update on [x; extras] ((name, x_e, w_e) each, averaged with
    the main batch: with w_e = n_e / B this is the loss over the concatenation)."""
    xx = torch.cat([x] + [xe for _, xe, _ in extras]) if extras else x
    with torch.no_grad():
      t = self.teacher(xx)[0]
    s = self.student(xx)[0]
    n = x.shape[0]
    loss = main = t_kd(kd, t[:n], s[:n], temperature)
    metrics, norm, start = {"kd": main}, 1.0, n
    for name, xe, we in extras:
      m = xe.shape[0]
      part = t_kd(kd, t[start:start + m], s[start:start + m], temperature)
      metrics[f"{name}_loss"] = part
      loss, norm, start = loss + we * part, norm + we, start + m
    loss = loss / norm
    self.opt_s.zero_grad(set_to_none=True)
    loss.backward()
    self._update("s", self.opt_s)
    metrics["loss"] = loss
    metrics["agree"] = (s[:n].argmax(1) == t[:n].argmax(1)).float().mean() * 100.0
    return metrics

  def synthesis_terms(self, x, labels=None, student_train=True):
    """`phases.synthesis_terms`: (total, terms) on images x (gradient flows to x)."""
    w, terms = self.w, {}
    if w.bn:
      self.capture.stats, self.capture.active = [], True
    t, feat = self.teacher(x)
    self.capture.active = False
    if w.bn:
      if w.bn_form != "l2":
        raise ValueError("compare_torch implements bn_form='l2' only.")
      terms["bn"] = self.capture.bn_l2(w.first_bn_scale)
    if w.oh:
      terms["oh"] = t_oh(t)
    if w.ie:
      terms["ie"] = t_ie(t)
    if w.act:
      terms["act"] = -feat.abs().mean()
    if w.tv:
      terms["tv"] = t_tv_l2(x)
    if w.l2 or w.at_beta:
      raise ValueError("compare_torch does not implement the l2 prior or attention transfer.")
    if w.ce:
      terms["ce"] = F.cross_entropy(t, labels)
    if w.adv:
      self.student.train(student_train)
      with frozen_params(self.student):
        s = self.student(x)[0]
      self.student.train()
      terms["adv"] = t_adv(w.adv_type, t.detach() if w.adv_detach_teacher else t, s,
                           w.adv_temperature)
    total = sum(getattr(w, k) * v for k, v in terms.items())
    return total, terms, t

  def generator_step(self, rng, path):
    """`phases.generator_step` without a fused student: one Adam step of G on a fresh z."""
    z = rng.normal((self.d.batch_size, self.d.latent_dim), path)
    total, terms, _ = self.synthesis_terms(self.g(z))
    self.opt_g.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = _grad_norm(self.g.parameters())
    self._update("g", self.opt_g)
    return {**terms, "loss": total, "grad_norm": grad_norm}

  # ---------------------------------------------------------------- methods

  def step(self, rng):
    metrics = getattr(self, f"_step_{self.method}")(rng)
    self.it += 1
    return {k: torch.as_tensor(v).detach() for k, v in metrics.items()}

  def _step_dafl(self, rng):
    """DAFL: one fused step; G on oh/ie/act of x = G(z), S on KL(T || S) of sg(x)."""
    if self.cfg.dafl.kd_grad_to_generator:
      raise ValueError("compare_torch implements dafl.kd_grad_to_generator=False only.")
    z = rng.normal((self.d.batch_size, self.d.latent_dim), (0,))
    x = self.g(z)
    gen, terms, t = self.synthesis_terms(x)
    s = self.student(x.detach())[0]
    s_loss = t_kd(self.w.kd, t.detach(), s, self.w.kd_temperature)
    self.opt_g.zero_grad(set_to_none=True)
    self.opt_s.zero_grad(set_to_none=True)
    (gen + s_loss).backward()
    grad_norm = _grad_norm(self.g.parameters())
    self._update("g", self.opt_g)
    self._update("s", self.opt_s)
    agree = (s.argmax(1) == t.argmax(1)).float().mean() * 100.0
    return _prefix("dafl", {**terms, "loss": gen, "student_loss": s_loss, "agree": agree,
                            "grad_norm": grad_norm})

  def _step_dfad(self, rng):
    """DFAD: `student_steps` L1 steps on fresh sg(G(z)), then one G step on -L1."""
    out = [self.student_step(self.sample(rng, (0, i)), kd=self.w.kd)
           for i in range(self.d.student_steps)]
    gen = self.generator_step(rng, (1,))
    return {**_prefix("student", _mean(out)), **_prefix("generator", gen)}

  def _step_deepinversion(self, rng):
    """One synthesis round (Adam on pixels, jittered views) + `student_steps` KD steps."""
    return {**self.di_synthesis(rng), **self.di_students(rng)}

  def di_synthesis(self, rng):
    """DeepInversion's synthesis round: `iterations` Adam steps on fresh pixels, then a push."""
    di, b = self.cfg.deepinversion, self.d.batch_size
    if di.flip or di.get("student_jitter", 0) or di.get("student_flip", False):
      raise ValueError("compare_torch implements deepinversion.flip=False and no student "
                       "augmentation (student_jitter=0, student_flip=False) only.")
    labels = torch.arange(b) % NUM_CLASSES
    px = rng.normal((b, *IMAGE_SHAPE), (0, ("split", 2, 0)), image=True).requires_grad_(True)
    opt = torch.optim.Adam([px], lr=di.lr, betas=(di.b1, di.b2))
    first = last = None
    for i in range(di.iterations):
      view = px
      if di.jitter:
        base = (0, ("split", 2, 1), i)
        dy = rng.randint_scalar(-di.jitter, di.jitter + 1, base + (("split", 3, 0),))
        dx = rng.randint_scalar(-di.jitter, di.jitter + 1, base + (("split", 3, 1),))
        view = torch.roll(px, shifts=(dy, dx), dims=(2, 3))
      total, terms, _ = self.synthesis_terms(view, labels=labels, student_train=False)
      opt.zero_grad(set_to_none=True)
      total.backward()
      opt.step()
      last = {**terms, "loss": total}
      first = first or last
    idx = (self.pool_cursor + torch.arange(b)) % self.pool.shape[0]
    self.pool[idx] = px.detach()
    self.pool_cursor = (self.pool_cursor + b) % self.pool.shape[0]
    self.pool_count = min(self.pool_count + b, self.pool.shape[0])
    return _prefix("synth", {**last, "loss_first": first["loss"]})

  def di_students(self, rng):
    """DeepInversion's `student_steps` KD steps on batches drawn from the pool."""
    b, out = self.d.batch_size, []
    for i in range(self.d.student_steps):
      x = self.pool[rng.randint(0, max(self.pool_count, 1), (b,), (1, i))]
      out.append(self.student_step(x, kd=self.w.kd, temperature=self.w.kd_temperature))
    return _prefix("student", _mean(out))

  def _step_mb_dfkd(self, rng):
    """1 G step (+ BN matching), `student_steps` L1 steps on [novel; one bank slot], push."""
    mb, b = self.cfg.mb_dfkd, self.d.batch_size
    gen = self.generator_step(rng, (0,))
    out = []
    for i in range(self.d.student_steps):
      x = self.sample(rng, (1, i))
      slot = rng.randint_scalar(0, max(self.bank_count, 1), (1, i, 1000))
      w = (mb.slot_size / b) if self.bank_count else 0.0
      out.append(self.student_step(x, [("replay", self.bank[slot], w)], kd=self.w.kd))
    if self.it % mb.push_every == 0:
      self.bank[self.bank_cursor] = self.sample(rng, (2,), n=mb.slot_size)
      self.bank_cursor = (self.bank_cursor + 1) % mb.slots
      self.bank_count = min(self.bank_count + 1, mb.slots)
    return {**_prefix("generator", gen), **_prefix("student", _mean(out)),
            "bank/slots_filled": torch.tensor(float(self.bank_count))}

  # ---- PRE-DFKD

  def _infer_memory(self, rng, path, train):
    """Class-balanced memory inference: z ~ N(0, I), one fresh Adam step on L_z, x_m = G_m(z)."""
    p, dec = self.cfg.pre_dfkd, self.vae.decoder
    dec.train(train)
    z = rng.normal((p.memory_batch, p.vae_latent_dim), path).requires_grad_(True)
    t = self.teacher(dec(z))[0]
    lz = (5.0 * t_ie(t) + 1.0 * t_oh(t) + F.mse_loss(torch.var(z, dim=0), torch.ones(z.shape[1]))
          + F.mse_loss(torch.mean(z, dim=0), torch.zeros(z.shape[1])))
    leak = p.leak_z_grad_into_vae and train
    wrt = [z] + (list(dec.parameters()) if leak else [])
    grads = torch.autograd.grad(lz, wrt)
    z.grad = grads[0]
    opt_z = torch.optim.Adam([z], lr=p.z_lr)
    opt_z.step()
    with torch.no_grad():
      x_m = dec(z)
    dec.train()
    return x_m, (grads[1:] if leak else None), lz

  def _vae_update(self, rng, path, x_novel):
    """One VAE step on [first vae_input novel images; memory samples]."""
    p = self.cfg.pre_dfkd
    x_m, leak, lz = self._infer_memory(rng, path + (("split", 2, 0),), train=True)
    n, m = p.vae_input, p.memory_batch
    first = self.it == 0
    x_in = torch.cat([x_novel[:n], x_novel[n:n + m] if first else x_m]).detach()
    with torch.no_grad():
      t_in = self.teacher(x_in)[0]
    self.vae.train()
    eps = rng.normal((n + m, p.vae_latent_dim), path + (("split", 2, 1),))
    x_hat, mu, logvar = self.vae(x_in, eps)
    pixel = (x_hat - x_in).abs().mean()
    logit = t_l1(t_in, self.teacher(x_hat)[0])
    kl = torch.mean(-0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1))
    loss = pixel + logit + p.kl_weight * kl
    self.opt_v.zero_grad(set_to_none=True)
    loss.backward()
    if leak is not None and not first:
      for param, g in zip(self.vae.decoder.parameters(), leak):
        param.grad.add_(g)
    self._update("v", self.opt_v)
    return {"loss": loss, "pixel": pixel, "logit": logit, "kl": kl, "memory_z_loss": lz}

  def _step_pre_dfkd(self, rng):
    """1 G step, then `student_steps` KD steps (memory inference + L1 on [novel; memory]),
    the first `pre_dfkd.vae_steps` of them followed by a VAE step."""
    p, d = self.cfg.pre_dfkd, self.d
    out = {**_prefix("generator", self.generator_step(rng, (0,)))}
    phases_ = []
    if p.vae_steps:
      phases_.append(("kd_vae", p.vae_steps, True))
    if d.student_steps > p.vae_steps:
      phases_.append(("kd", d.student_steps - p.vae_steps, False))
    for ph, (name, n, with_vae) in enumerate(phases_, start=1):
      ms = []
      for i in range(n):
        x = self.sample(rng, (ph, i, 0))
        x_m, _, _ = self._infer_memory(rng, (ph, i, 1, 1000), train=False)
        m = self.student_step(x, [("memory", x_m, p.memory_batch / d.batch_size)], kd="l1")
        if with_vae:
          m.update({f"vae_{k}": v for k, v in self._vae_update(rng, (ph, i, 2), x).items()})
        ms.append(m)
      out.update(_prefix(name, _mean(ms)))
    return out


def _prefix(name, metrics):
  return {f"{name}/{k}": v for k, v in metrics.items()}


def _mean(list_of_metrics):
  return {k: torch.stack([torch.as_tensor(m[k], dtype=torch.float32) for m in list_of_metrics])
          .mean() for k in list_of_metrics[0]}
