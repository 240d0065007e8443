"""Optimisers and learning-rate schedules from a config block."""
from __future__ import annotations

import ml_collections
import optax

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("constant", "cosine", "step")


def make_schedule(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """`cfg.schedule`: constant | cosine (over total_steps) | step (x0.1 at cfg.milestones fractions)."""
  lr = cfg.lr
  if cfg.schedule == "constant":
    return optax.constant_schedule(lr)
  if cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(lr, max(1, total_steps))
  if cfg.schedule == "step":
    bounds = {int(f * total_steps): 0.1 for f in cfg.get("milestones", (0.5, 0.75))}
    return optax.piecewise_constant_schedule(lr, bounds)
  raise ValueError(f"Unknown schedule {cfg.schedule!r}; valid: {', '.join(SCHEDULES)}.")


def make_optimizer(cfg: ml_collections.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  """SGD (momentum, coupled L2 weight decay as in PyTorch) or Adam, with optional grad clipping."""
  schedule = make_schedule(cfg, total_steps)
  chain = []
  if cfg.get("grad_clip", 0.0):
    chain.append(optax.clip_by_global_norm(cfg.grad_clip))
  if cfg.name == "sgd":
    if cfg.get("weight_decay", 0.0):
      chain.append(optax.add_decayed_weights(cfg.weight_decay))
    chain.append(optax.sgd(schedule, momentum=cfg.get("momentum", 0.9) or None,
                           nesterov=cfg.get("nesterov", False)))
  elif cfg.name == "adam":
    if cfg.get("weight_decay", 0.0):
      chain.append(optax.add_decayed_weights(cfg.weight_decay))
    chain.append(optax.adam(schedule, b1=cfg.get("b1", 0.9), b2=cfg.get("b2", 0.999)))
  else:
    raise ValueError(f"Unknown optimizer {cfg.name!r}; valid: {', '.join(OPTIMIZERS)}.")
  return optax.chain(*chain)
