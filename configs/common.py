"""Shared config blocks and the `key=value,flag` argument parser used by every config file."""
from __future__ import annotations

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
  """Parses 'method=dafl,tiny' into a ConfigDict, typed by `defaults`.

  A bare word `tiny` sets a boolean default to True; unknown keys raise a ValueError that lists
  the valid ones.
  """
  out = ml_collections.ConfigDict(defaults)
  for part in filter(None, (arg or "").split(",")):
    key, _, value = part.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"Unknown config argument {key!r}; valid: {', '.join(sorted(defaults))}.")
    default = defaults[key]
    if not value:
      if not isinstance(default, bool):
        raise ValueError(f"Config argument {key!r} needs a value ({key}=...).")
      out[key] = True
    elif isinstance(default, bool):
      out[key] = value.lower() in ("1", "true", "yes")
    else:
      out[key] = type(default)(value)
  return out


def optimizer(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
              **kwargs) -> ml_collections.ConfigDict:
  c = dict(name=name, lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
           nesterov=False, grad_clip=0.0, b1=0.9, b2=0.999)
  c.update(kwargs)
  return ml_collections.ConfigDict(c)


def base(method: str) -> ml_collections.ConfigDict:
  """Fields every run has; dataset/model files fill in the rest."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.seed = 0
  c.dataset = "fashion_mnist"
  c.data_dir = ""          # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.pad_to = 0             # e.g. 32 to pad 28x28 Fashion-MNIST for LeNet-5
  c.num_devices = 0        # 0 -> all local devices
  c.train_limit = 0        # >0: use only the first N train examples (tests)
  c.test_limit = 0         # >0: evaluate on the first N test examples (tests)
  c.teacher = ml_collections.ConfigDict(dict(model="lenet5_bn", workdir=""))
  c.student = ml_collections.ConfigDict(dict(model="lenet5_half_bn"))
  # Supervised training (teacher / scratch / kd_real).
  c.batch_size = 128
  c.num_epochs = 2
  c.num_steps = 0          # >0 overrides num_epochs
  c.augment = "none"       # none | crop_flip
  c.optimizer = optimizer()
  c.kd = ml_collections.ConfigDict(dict(temperature=4.0, alpha=0.9))
  c.log_every = 100
  c.eval_every = 0         # steps; 0 -> once per epoch
  c.checkpoint_every = 500
  c.max_to_keep = 2
  return c


DATA_FREE_METHODS = ("dafl", "dfad", "zskt", "deepinversion", "adi")


def loss_block(**overrides) -> ml_collections.ConfigDict:
  """Synthesis-loss weights (0 disables a term) and the student's KD loss."""
  c = dict(oh=0.0, ie=0.0, act=0.0, adv=0.0, bn=0.0, tv=0.0, l2=0.0, ce=0.0,
           adv_type="l1", adv_temperature=3.0, adv_detach_teacher=False, bn_form="l2",
           first_bn_scale=1.0, kd="kl", kd_temperature=1.0, at_beta=0.0)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def distill(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Adds the data-free blocks to `c` with the method's published defaults (methods.md §10).

  Budgets are in outer iterations; `distill.student_steps` is the number of student updates per
  iteration. The MNIST-scale defaults of each paper are used (Fashion-MNIST is MNIST-sized).
  """
  c.distill = ml_collections.ConfigDict(dict(
      num_iters=1000, batch_size=256, latent_dim=100, student_steps=1, log_every=50,
      eval_every=100, checkpoint_every=200, save_images=True,
      # Fully unroll the inner student repeats (see combinators.repeat): faster on XLA:CPU,
      # where conv gradients inside while loops are slow; keep False for long repeats.
      unroll=False))
  c.generator = ml_collections.ConfigDict(dict(
      kind="dafl", ngf=64, bn_eps=0.8, spectral_norm=False, final_tanh=True,
      weight_init="default"))
  c.gen_optimizer = optimizer("adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
                              schedule="constant")
  c.faithful_bn = True
  c.dafl = ml_collections.ConfigDict(dict(kd_grad_to_generator=False))
  c.deepinversion = ml_collections.ConfigDict(dict(
      iterations=2000, lr=0.05, b1=0.9, b2=0.999, jitter=2, flip=False, pool_size=256 * 50))
  c.loss = loss_block()
  if method == "dafl":
    # MNIST script defaults: oh 1, ie 5, act 0.1; G Adam 0.2; S Adam 2e-3; KL, tau 1.
    c.loss = loss_block(oh=1.0, ie=5.0, act=0.1, kd="dafl_kd")
    c.gen_optimizer.lr = 0.2
    c.optimizer = optimizer("adam", lr=2e-3, momentum=0.0, weight_decay=0.0, schedule="constant")
  elif method == "dfad":
    # 5 S steps (L1) then 1 G step (-L1); S SGD 0.1, G Adam 1e-3, both x0.1 at 20% and 40%
    # of the budget (epochs 100 and 200 of 500); BN eps 1e-5; latent d = 256.
    c.loss = loss_block(adv=1.0, adv_type="l1", kd="l1")
    c.distill.student_steps = 5
    c.distill.latent_dim = 256
    c.generator.bn_eps = 1e-5
    c.optimizer = optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="step",
                            milestones=(0.2, 0.4))
    c.gen_optimizer.schedule = "step"
    c.gen_optimizer.milestones = (0.2, 0.4)
  elif method == "zskt":
    # 1 G step (-KL elementwise) + 10 S steps on the same z (KL + 250 AT); Adam 1e-3 / 2e-3.
    c.loss = loss_block(adv=1.0, adv_type="kl", kd="kl_elem", at_beta=250.0)
    c.distill.student_steps = 10
    c.distill.batch_size = 128
    c.generator.kind = "zskt"
    c.generator.bn_eps = 1e-5
    c.gen_optimizer = optimizer("adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
                                schedule="cosine", grad_clip=5.0)
    c.optimizer = optimizer("adam", lr=2e-3, momentum=0.0, weight_decay=0.0, schedule="cosine",
                            grad_clip=5.0)
  elif method in ("deepinversion", "adi"):
    # CE + 10 bn_l2 + 2.5e-5 tv_l2 (CIFAR README); KD tau 3; ADI adds js_adv (batch mean).
    c.loss = loss_block(ce=1.0, bn=10.0, tv=2.5e-5, kd="kl", kd_temperature=3.0,
                        adv=1.0 if method == "adi" else 0.0, adv_type="js_batch")
    c.distill.student_steps = 400
    c.optimizer = optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine")
  else:
    raise ValueError(f"Unknown data-free method {method!r}; valid: {', '.join(DATA_FREE_METHODS)}.")
  return c


def tiny_distill(c: ml_collections.ConfigDict) -> None:
  """Shrinks the data-free blocks to a few seconds of work (tests, notebooks, smoke runs)."""
  c.distill.update(dict(num_iters=6, batch_size=32, log_every=2, eval_every=3,
                        checkpoint_every=2))
  c.generator.ngf = 8
  c.distill.student_steps = min(c.distill.student_steps, 2)
  c.deepinversion.update(dict(iterations=3, pool_size=64))
