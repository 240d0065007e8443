"""Shared config blocks and the `key=value,flag` argument parser used by every config file."""
from __future__ import annotations

import ml_collections

from dfkd_jax import methods as methods_lib
from dfkd_jax.config_blocks import loss_block, optimizer, parse_bool  # noqa: F401  (re-exported)


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
      out[key] = parse_bool(value, key)
    else:
      out[key] = type(default)(value)
  return out


def base(method: str) -> ml_collections.ConfigDict:
  """Fields every run has; dataset/model files fill in the rest."""
  c = ml_collections.ConfigDict()
  c.method = method
  c.label = method         # how reports name the run (data-free configs refine it)
  c.seed = 0
  c.dataset = "fashion_mnist"
  c.data_dir = ""          # "" -> $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.pad_to = 0             # e.g. 32 to pad 28x28 Fashion-MNIST for LeNet-5
  c.num_devices = 0        # 0 -> all local devices
  c.train_limit = 0        # >0: use only the first N train examples (tests)
  c.test_limit = 0         # >0: evaluate on the first N test examples (tests)
  # Real training data on the devices: replicated | sharded (each process reads and holds its
  # devices' rows) | auto (sharded with several processes); dfkd_jax.train.supervised.
  c.data_placement = "auto"
  # Persistent XLA compilation cache: "auto" ($DFKD_COMPILE_CACHE or ~/.cache/dfkd_jax/xla),
  # a folder, or "off" (dfkd_jax.compile.enable_cache).
  c.compile_cache = "auto"
  # Compute dtype of every model: float32 | bfloat16 (float32 parameters, optimiser states,
  # BatchNorm statistics and losses; dfkd_jax.precision). For GPUs and TPUs.
  c.dtype = "float32"
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
  # How convolution gradients, training-mode BatchNorm, XLA:CPU options and the generators'
  # upsampling convs are emitted (dfkd_jax.numerics); "" -> the DFKD_* environment variable,
  # else the default.
  c.numerics = ml_collections.ConfigDict(dict(conv_grads="", batch_norm="", xla_cpu_ynn="",
                                              upsample_conv=""))
  return c


def is_data_free(method: str) -> bool:
  """Whether `method` is a registered data-free method (read live: a method registered into
  `dfkd_jax.methods.METHODS` after this module was imported counts too)."""
  return method in methods_lib.METHODS


def distill(c: ml_collections.ConfigDict, method: str) -> ml_collections.ConfigDict:
  """Adds the data-free blocks to `c`, then the method's published defaults (its registry entry
  in `dfkd_jax.methods`, which sits next to its builder; docs/methods.md).

  Budgets are in outer iterations; `distill.student_steps` is the number of student updates per
  iteration. The MNIST-scale defaults of each paper are used (Fashion-MNIST is MNIST-sized).
  """
  c.distill = ml_collections.ConfigDict(dict(
      num_iters=1000, batch_size=256, latent_dim=100, student_steps=1, log_every=50,
      eval_every=100, checkpoint_every=200, save_images=True,
      # Fully unroll the inner student repeats (see combinators.repeat): faster on XLA:CPU,
      # where conv gradients inside while loops are slow; keep False for long repeats.
      unroll=False,
      # > 0: stop after this many seconds of training (compilation included, evaluation
      # excluded), evaluate and finish (time-to-accuracy benchmarks); 0: run num_iters.
      time_budget_s=0.0,
      # > 0: also keep an exponential moving average of the student's weights (and BN
      # statistics), updated once per outer iteration with this decay, warm-started as
      # min(decay, (1 + t) / (10 + t)); it is evaluated next to the student (summary.json
      # `ema`, metric test/accuracy_ema). 0: none.
      student_ema=0.0))
  c.generator = ml_collections.ConfigDict(dict(
      kind="dafl", ngf=64, bn_eps=0.8, spectral_norm=False, final_tanh=True,
      weight_init="default"))
  c.gen_optimizer = optimizer("adam", lr=1e-3, momentum=0.0, weight_decay=0.0,
                              schedule="constant")
  c.faithful_bn = True
  # The teacher's input normalisation (per channel, [0, 1] units) for the sigmoid generators
  # (fast, nayer, generator.kind=sigmoid); () -> the dataset's own (dfkd_jax.data.datasets).
  c.pixel_mean = ()
  c.pixel_std = ()
  c.dafl = ml_collections.ConfigDict(dict(kd_grad_to_generator=False))
  c.deepinversion = ml_collections.ConfigDict(dict(
      iterations=2000, lr=0.05, b1=0.9, b2=0.999, jitter=2, flip=False, pool_size=256 * 50,
      # the student's view of pooled images: random shift of up to this many pixels / flips
      student_jitter=0, student_flip=False))
  c.loss = loss_block()
  # Condensed-sample guidance (docs/methods.md §8) on any method: "none" | "condensed" (feature
  # alignment with a projection discriminator + condensed samples in the student batches) |
  # "naive" (condensed samples in the student batches only: the "host + CS" baseline).
  c.guidance = "none"
  c.condensed = ml_collections.ConfigDict(dict(
      path="",            # .npz from `python -m dfkd_jax.condensation.condense` (DM or few-shot)
      lambda_fa=1.0,      # weight of the feature-alignment term in the synthesis loss
      weight=1.0,         # w_c: weight of the KD loss on condensed samples
      batch=128,          # condensed images per student step (<= |D_c|, drawn with replacement)
      augment=True,       # DiffAugment (color, translation, cutout) on both sides
      d_lr=2e-4, d_b1=0.5, d_b2=0.999, d_hidden=512))
  c.mb_dfkd = ml_collections.ConfigDict(dict(slots=10, slot_size=128, push_every=180))
  c.pre_dfkd = ml_collections.ConfigDict(dict(
      memory_batch=128, vae_input=512, vae_steps=4, vae_latent_dim=1000, vae_ngf=64,
      vae_bn_eps=1e-5, encoder_normalize="none", leak_z_grad_into_vae=False, z_lr=0.02,
      kl_weight=1e-5,
      vae_optimizer=optimizer("adam", lr=0.02 / 40, momentum=0.0, weight_decay=0.0,
                              schedule="constant")))
  methods_lib.check_method(method)
  methods_lib.METHODS[method].defaults(c)
  return c


def faithful_pre_dfkd(c: ml_collections.ConfigDict) -> None:
  """The official PRE-DFKD code's quirks (docs/methods.md §7), instead of our corrected defaults:
  BN eps 0.8 in the generators' hidden BNs and the VAE, the latent-step gradient leaking into
  G_m's update, and the encoder input L2-normalised along the image height."""
  c.generator.bn_eps = 0.8
  c.pre_dfkd.update(dict(vae_bn_eps=0.8, leak_z_grad_into_vae=True, encoder_normalize="height"))


def scale_replay(c: ml_collections.ConfigDict) -> None:
  """Keeps the replay sizes at the official ratios to distill.batch_size (B/8 replayed images
  per step, B/2 novel images per VAE step), for configs that shrink the batch."""
  b = c.distill.batch_size
  c.mb_dfkd.slot_size = b // 8
  c.pre_dfkd.memory_batch = b // 8
  c.pre_dfkd.vae_input = b // 2


def guidance(c: ml_collections.ConfigDict, mode: str, path: str) -> None:
  """Turns on condensed-sample guidance ("condensed" / "naive") with the set at `path`."""
  if mode not in ("none", "condensed", "naive"):
    raise ValueError(f"Unknown guidance {mode!r}; valid: none, condensed, naive.")
  c.guidance = mode
  if mode != "none":
    if not path:
      raise ValueError(f"guidance={mode} needs a condensed set: add condensed=<file.npz> "
                       "(make one with `python -m dfkd_jax.condensation.condense`).")
    c.condensed.path = path


def cpu_fast_nayer(c: ml_collections.ConfigDict, method: str) -> None:
  """Fast-2 / NAYER sized for 2 CPU cores on 32x32 grayscale pairs (docs/methods.md §11.5,
  §12.5): B 128, 45 outer iterations (5 warm-up), 100 student steps per iteration in scanned
  chunks of 5 unrolled steps, student SGD 0.05 (wd 1e-4, cosine), jitter 2 without flips.
  NAYER: 10 generator steps, 1 loop per iteration, generator life 5, one-hot embeddings into
  noisy layers of width 256. w_bn 10 with rho 0.9 as in the papers' scripts."""
  d = c.distill
  d.update(dict(batch_size=128, num_iters=45, student_steps=100, eval_every=5, unroll=True))
  c.generator.ngf = 32
  c.optimizer.update(dict(lr=0.05, weight_decay=1e-4))
  block = c[method]
  block.update(dict(warmup=5, pool_size=128 * 45, synth_jitter=2, student_jitter=2,
                    student_chunk=5))
  if method == "nayer":
    block.update(dict(g_steps=10, g_loops=1, g_life=5, label_emb="one_hot", emb_size=256))


def cpu_deepinversion(c: ml_collections.ConfigDict) -> None:
  """DeepInversion / ADI sized for 2 CPU cores (our choice, docs/methods.md §5): short synthesis
  rounds of 20 Adam steps at lr 0.1 instead of thousands at 0.05, 50 student steps per round on
  a pool of the last 45 batches, the student's view jittered by up to 2 pixels (as Fast-DFKD's).
  Measured on Fashion-MNIST (benchmarks/RESULTS.md §9): 59.82 % -> 81.07 % after 5 minutes."""
  c.distill.student_steps = 50
  c.distill.unroll = False  # 50 scanned student steps: compile time, same speed (RESULTS §8)
  c.deepinversion.update(dict(iterations=20, lr=0.1, student_jitter=2,
                              pool_size=c.distill.batch_size * 45))


def tiny_small(c: ml_collections.ConfigDict, method: str) -> None:
  """The tiny mode of the residual-network configs: 512 train / 256 test images, batch 32,
  4 supervised steps, and the shrunk data-free blocks."""
  c.train_limit, c.test_limit, c.batch_size = 512, 256, 32
  c.num_epochs, c.num_steps = 1, 4
  c.log_every = c.eval_every = c.checkpoint_every = 2
  if is_data_free(method):
    tiny_distill(c)


def tiny_distill(c: ml_collections.ConfigDict) -> None:
  """Shrinks the data-free blocks to a few seconds of work (tests, notebooks, smoke runs)."""
  c.distill.update(dict(num_iters=6, batch_size=32, log_every=2, eval_every=3,
                        checkpoint_every=2))
  c.generator.ngf = 8
  c.distill.student_steps = min(c.distill.student_steps, 2)
  c.distill.latent_dim = min(c.distill.latent_dim, 32)
  c.mb_dfkd.update(dict(slots=2, slot_size=8, push_every=2))
  if "fast" in c:
    c.fast.update(dict(k=2, warmup=0, pool_size=32 * 6))
    c.distill.latent_dim = 16
  if "nayer" in c:
    c.nayer.update(dict(g_steps=2, g_loops=1, g_life=3, warmup=0, pool_size=32 * 6,
                        label_emb="one_hot", emb_size=32))
  c.pre_dfkd.update(dict(memory_batch=8, vae_input=16, vae_steps=1, vae_latent_dim=16,
                         vae_ngf=8))
  c.condensed.update(dict(batch=16, d_hidden=32))
  c.deepinversion.update(dict(iterations=3, pool_size=64))


# Config-file arguments shared by the data-free configs (`method=mb_dfkd,guidance=condensed,...`).
DATA_FREE_ARGS = dict(guidance="none", condensed="", faithful=False, seed=0)
# (`seed` applies to every method; the config files set c.seed from it.)


def data_free_options(c: ml_collections.ConfigDict, args: ml_collections.ConfigDict) -> None:
  """Applies the shared data-free arguments: guidance + condensed set, `faithful` (PRE-DFKD /
  MB-DFKD official-code quirks; DFAD, DAFL, ZSKT and PRE-DFKD without our BatchNorm-matching term); and records a run
  label for reports."""
  if args.faithful:
    faithful_pre_dfkd(c)
    if c.method in ("dfad", "dafl", "pre_dfkd", "zskt"):
      c.loss.bn = 0.0  # the papers' losses, without our BatchNorm-matching term
  guidance(c, args.guidance, args.condensed)
  c.label = c.method
  if args.faithful:
    c.label += " (faithful)"
  if c.guidance != "none":
    name = c.condensed.path.rsplit("/", 1)[-1].removesuffix(".npz")
    c.label += f" + {c.guidance} ({name})"


def kd_condensed(c: ml_collections.ConfigDict, path: str) -> None:
  """KD on a condensed set alone (the lower bound of guidance): `num_steps` student steps on
  the tiled, DiffAugment-ed condensed images with the teacher's soft labels."""
  if not path:
    raise ValueError("method=kd_condensed needs a condensed set: add condensed=<file.npz> "
                     "(make one with `python -m dfkd_jax.condensation.condense`).")
  c.condensed = ml_collections.ConfigDict(dict(path=path))
  c.augment = "diffaugment"
  c.num_steps = 500
  c.eval_every = 50
  c.log_every = 50
  name = path.rsplit("/", 1)[-1].removesuffix(".npz")
  c.label = f"kd_condensed ({name})"
