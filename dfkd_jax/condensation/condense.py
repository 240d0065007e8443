r"""Builds the condensed set D_c of docs/methods.md §8: Distribution Matching (§9) or a few-shot sample.

  python -m dfkd_jax.condensation.condense --kind dm --ipc 10 --pad_to 32 --iters 20000 \
      --out runs/condensed/fmnist_dm_ipc10.npz
  python -m dfkd_jax.condensation.condense --kind fewshot --k 10 --pad_to 32 \
      --out runs/condensed/fmnist_fewshot_k10.npz

DM is not data-free: it runs on the data owner's side, on the real training split, and needs no
teacher. Every iteration draws a freshly initialised ConvNet-3 ψ (never trained); for each class
c it samples a real batch R_c, applies one DSA draw A shared by R_c and the synthetic images S_c
of the class, and the synthetic images take one SGD step (lr 1, momentum 0.5) on

  L = Σ_c ‖ mean_{x∈R_c} ψ(A(x)) − mean_{s∈S_c} ψ(A(s)) ‖².

The few-shot kind keeps k real training images per class, drawn with --seed (the indices into the
train split are recorded in the file's meta).

Both write `--out` (a .npz read by `dfkd_jax.condensation.condensed_set.load_condensed`) in the
teacher's normalised input space (the same normalisation and --pad_to as the teacher's data), and a PNG
grid of the images next to it (`<out without .npz>.png`, one row per class).
"""
from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
import functools
import os
import sys
import time
from typing import Any, NamedTuple

import numpy as np

DEFAULT_STRATEGY = "color_crop_cutout_flip_scale_rotate"


class DMResult(NamedTuple):
  """Output of `distribution_matching`.

  Attributes:
    images: float32 [K * ipc, H, W, C] synthetic images, class-major (class c at c*ipc:(c+1)*ipc).
    labels: int32 [K * ipc].
    losses: float32 [iterations], the matching loss L of every iteration (before its step).
    init_images: float32 [K * ipc, H, W, C], the starting images.
    seconds_per_iteration: wall time per iteration after the first (compiling) one; NaN if fewer
      than two iterations ran.
    real_batch: the real images per class and iteration actually used (min(real_batch, smallest
      class)).
  """
  images: np.ndarray
  labels: np.ndarray
  losses: np.ndarray
  init_images: np.ndarray
  seconds_per_iteration: float
  real_batch: int


# ------------------------------------------------------------------------------- data helpers


def group_by_class(images: np.ndarray, labels: np.ndarray, num_classes: int) -> list[np.ndarray]:
  """Splits [N, H, W, C] images into one array per class 0..num_classes-1 (TFDS order kept).

  Raises:
    ValueError: if a class has no image or a label is out of range.
  """
  labels = np.asarray(labels)
  if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(f"labels span [{labels.min()}, {labels.max()}], outside [0, {num_classes})")
  groups = [np.asarray(images)[labels == c] for c in range(num_classes)]
  empty = [c for c, g in enumerate(groups) if not len(g)]
  if empty:
    raise ValueError(f"no training images of class(es) {empty}: raise --train_limit "
                     "(or use the whole split)")
  return groups


def fewshot_indices(labels: np.ndarray, k: int, num_classes: int, seed: int) -> np.ndarray:
  """Indices of k examples of every class, drawn without replacement with `seed`.

  Args:
    labels: [N] labels of the split the indices refer to.
    k: examples per class.
    num_classes: K.
    seed: numpy seed; the same (labels, k, seed) always gives the same indices.

  Returns:
    int64 [K * k], class-major (class c at c*k:(c+1)*k), ascending within a class.

  Raises:
    ValueError: if k < 1 or a class has fewer than k examples.
  """
  if k < 1:
    raise ValueError(f"--k must be >= 1, got {k}")
  labels = np.asarray(labels)
  rng = np.random.default_rng(seed)
  chosen = []
  for c in range(num_classes):
    pool = np.flatnonzero(labels == c)
    if len(pool) < k:
      raise ValueError(f"class {c} has only {len(pool)} training images, fewer than --k {k}: "
                       "lower --k or raise --train_limit")
    chosen.append(np.sort(rng.choice(pool, size=k, replace=False)))
  return np.concatenate(chosen)


# ------------------------------------------------------------------------------- DM


def _class_index_table(counts: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
  """[K, max_n] int32 global row of every class member (padded with 0), and the counts [K]."""
  counts = np.asarray(counts, np.int64)
  starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
  table = np.zeros((len(counts), int(counts.max())), np.int32)
  for c, (s, n) in enumerate(zip(starts, counts)):
    table[c, :n] = np.arange(s, s + n)
  return table, counts.astype(np.int32)


def _embed_fn(model) -> Callable[[Any, Any], Any]:
  def embed(params, x):
    return model.apply(params, x, train=False)[1]["feature"]
  return embed


def make_dm_step(model, real_images, index_table, counts, n_real: int, *, lr: float,
                 momentum: float, strategy: str = DEFAULT_STRATEGY):
  """The jitted DM iteration: `step((syn, velocity, key)) -> ((syn, velocity, key), loss)`.

  One call does a whole iteration on device: a fresh ψ = `model.init(k_net, ·)`, for each class
  (lax.map) n_real real images sampled without replacement through `index_table` and embedded
  under the class's DSA draw (no gradient), the synthetic images embedded under the same draw
  (vmap over classes), the loss Σ_c ‖mean ψ(real_c) − mean ψ(syn_c)‖² and one SGD-momentum step
  (PyTorch convention: v ← μ·v + g, syn ← syn − lr·v). The carry is donated.

  Args:
    model: Flax module following the model contract; ψ is `aux["feature"]`.
    real_images: [N, H, W, C] jax array, the real images of all classes (on device once).
    index_table: [K, max_n] int32 rows of `real_images` per class (padding ignored).
    counts: [K] int32 members per class.
    n_real: real images per class and iteration (<= min(counts)).
    lr: image learning rate.
    momentum: SGD momentum.
    strategy: DSA strategy.

  Returns:
    The jitted step function.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dfkd_jax.ops import augment  # pylint: disable=g-import-not-at-top
  from dfkd_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top

  augment.dsa_families(strategy)  # Validate early.
  embed = _embed_fn(model)
  num_classes, max_n = index_table.shape
  # Passed as arguments (not closed over), so the real data is not baked into the executable.
  data = (jnp.asarray(real_images), jnp.asarray(index_table),
          jnp.arange(max_n)[None, :] < jnp.asarray(counts)[:, None])            # valid [K, max_n]

  def step(carry, data):
    syn, velocity, key = carry
    real_images, index_table, valid = data
    key, k_net, k_real, k_aug = jax.random.split(key, 4)
    params = model.init(k_net, jnp.zeros((1,) + syn.shape[2:], syn.dtype))
    # Sample without replacement: the n_real members with the smallest uniform scores.
    scores = jnp.where(valid, jax.random.uniform(k_real, valid.shape), 2.0)
    _, pos = jax.lax.top_k(-scores, n_real)                                     # [K, n_real]
    rows = jnp.take_along_axis(index_table, pos, axis=1)
    aug_keys = jax.random.split(k_aug, num_classes)

    def real_mean(args):
      k, r = args
      return jnp.mean(embed(params, augment.dsa(k, real_images[r], strategy)), axis=0)

    target = jax.lax.stop_gradient(jax.lax.map(real_mean, (aug_keys, rows)))    # [K, F]

    def loss_fn(syn):
      def syn_mean(k, s):
        return jnp.mean(embed(params, augment.dsa(k, s, strategy)), axis=0)
      means = jax.vmap(syn_mean)(aug_keys, syn)                                 # [K, F]
      return jnp.sum(jnp.square(target - means))

    loss, grad = jax.value_and_grad(loss_fn)(syn)
    velocity = momentum * velocity + grad
    syn = syn - lr * velocity
    return (syn, velocity, key), loss

  jitted = compile_lib.jit(step, donate_argnums=0)
  return lambda carry: jitted(carry, data)


def initial_images(rng: np.random.Generator, images_by_class: Sequence[np.ndarray], ipc: int,
                   init: str) -> tuple[np.ndarray, list[np.ndarray] | None]:
  """[K, ipc, H, W, C] starting images: random real ones of each class, or N(0, 1) noise.

  Returns:
    (images, per-class chosen positions within `images_by_class[c]`, or None for noise).

  Raises:
    ValueError: on an unknown init or a class with fewer than ipc images (init real).
  """
  shape = images_by_class[0].shape[1:]
  if init == "noise":
    return rng.standard_normal((len(images_by_class), ipc) + shape).astype(np.float32), None
  if init != "real":
    raise ValueError(f"--init must be 'real' or 'noise', got {init!r}")
  chosen, out = [], []
  for c, group in enumerate(images_by_class):
    if len(group) < ipc:
      raise ValueError(f"class {c} has only {len(group)} training images, fewer than --ipc "
                       f"{ipc}: lower --ipc, use --init noise or raise --train_limit")
    pos = np.sort(rng.choice(len(group), size=ipc, replace=False))
    chosen.append(pos)
    out.append(group[pos])
  return np.stack(out).astype(np.float32), chosen


def distribution_matching(key, images_by_class: Sequence[np.ndarray], ipc: int, iterations: int,
                          *, model=None, real_batch: int = 256, lr: float = 1.0,
                          momentum: float = 0.5, init: str = "real",
                          strategy: str = DEFAULT_STRATEGY, init_images: np.ndarray | None = None,
                          log_every: int = 100,
                          print_fn: Callable[[str], None] | None = print) -> DMResult:
  """Dataset condensation by Distribution Matching (Zhao & Bilen, WACV 2023; docs/methods.md §9).

  Args:
    key: JAX PRNG key (networks, real batches, DSA draws).
    images_by_class: K arrays [n_c, H, W, C] of real (normalised) images, one per class, or one
      [K, n, H, W, C] array. They are put on device once.
    ipc: synthetic images per class.
    iterations: SGD steps on the synthetic images (20,000 in the paper).
    model: embedding network (Flax, model contract; ψ = aux["feature"]); default ConvNet-3.
    real_batch: real images per class and iteration (256); capped at the smallest class.
    lr: image learning rate (1.0).
    momentum: SGD momentum (0.5).
    init: "real" (random real images of each class, the default) or "noise" (N(0, 1)).
    strategy: DSA strategy, families joined by "_".
    init_images: optional [K, ipc, H, W, C] starting images (overrides `init`).
    log_every: progress line every this many iterations (and at the first and last).
    print_fn: where progress lines go (None: silent).

  Returns:
    A `DMResult`.

  Raises:
    ValueError: on bad sizes or options.
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dfkd_jax.io.logging_utils import format_seconds  # pylint: disable=g-import-not-at-top
  from dfkd_jax.models import convnet  # pylint: disable=g-import-not-at-top

  groups = [np.asarray(g, np.float32) for g in images_by_class]
  num_classes = len(groups)
  if num_classes < 1 or any(g.ndim != 4 or not len(g) for g in groups):
    raise ValueError("images_by_class must hold K >= 1 non-empty [n_c, H, W, C] arrays")
  if len({g.shape[1:] for g in groups}) != 1:
    raise ValueError(f"classes have different image shapes: {sorted({g.shape[1:] for g in groups})}")
  if ipc < 1 or iterations < 0 or real_batch < 1 or lr <= 0 or not 0 <= momentum < 1:
    raise ValueError(f"need ipc >= 1, iterations >= 0, real_batch >= 1, lr > 0, 0 <= momentum < "
                     f"1; got {ipc}, {iterations}, {real_batch}, {lr}, {momentum}")
  model = model if model is not None else convnet.ConvNet(num_classes=num_classes)
  counts = [len(g) for g in groups]
  n_real = min(real_batch, min(counts))
  key, k_init = jax.random.split(key)
  if init_images is None:
    seed = int(jax.random.randint(k_init, (), 0, 2**31 - 1))
    init_images, _ = initial_images(np.random.default_rng(seed), groups, ipc, init)
  init_images = np.asarray(init_images, np.float32)
  expected = (num_classes, ipc) + groups[0].shape[1:]
  if init_images.shape != expected:
    raise ValueError(f"init_images must have shape {expected}, got {init_images.shape}")

  table, counts_arr = _class_index_table(counts)
  real = jnp.asarray(np.concatenate(groups))
  step = make_dm_step(model, real, table, counts_arr, n_real, lr=lr, momentum=momentum,
                      strategy=strategy)
  carry = (jnp.asarray(init_images), jnp.zeros(init_images.shape, jnp.float32), key)
  emit = print_fn or (lambda _: None)
  emit(f"[dm] {num_classes} classes x {ipc} images/class, {iterations} iterations, real batch "
       f"{n_real}/class, image {'x'.join(map(str, expected[2:]))}, lr {lr}, momentum {momentum}")
  losses = []
  t0 = step0 = None
  for i in range(iterations):
    carry, loss = step(carry)
    losses.append(loss)
    done = i + 1
    if i == 0:
      loss.block_until_ready()  # The first call compiles: time from here.
      t0, step0 = time.perf_counter(), done
    if done == 1 or done % log_every == 0 or done == iterations:
      recent = float(jnp.mean(jnp.stack(losses[-max(1, min(log_every, len(losses))):])))
      elapsed = time.perf_counter() - t0
      rate = (done - step0) / elapsed if done > step0 and elapsed > 0 else float("nan")
      eta = (iterations - done) / rate if rate == rate and rate > 0 else float("nan")
      emit(f"[dm] {done}/{iterations} ({100.0 * done / iterations:4.1f}%) loss={recent:.4g} | "
           f"{rate:.2f} it/s, ETA {format_seconds(eta)}")
  syn = np.asarray(carry[0])
  t1 = time.perf_counter()
  sec = (t1 - t0) / (iterations - step0) if iterations > 1 else float("nan")
  losses = np.asarray(jnp.stack(losses)) if losses else np.zeros((0,), np.float32)
  labels = np.repeat(np.arange(num_classes, dtype=np.int32), ipc)
  return DMResult(syn.reshape((-1,) + syn.shape[2:]), labels, losses,
                  init_images.reshape((-1,) + init_images.shape[2:]), sec, n_real)


def embedding_distance(key, images_by_class: Sequence[np.ndarray], syn_by_class, *, model=None,
                       num_nets: int = 4) -> float:
  """Mean over `num_nets` random ψ of Σ_c ‖mean ψ(real_c) − mean ψ(syn_c)‖², no augmentation.

  A fixed-key diagnostic of how well synthetic images match the real class means (the DM loss
  itself is drawn afresh every iteration and is too noisy to compare across iterations).

  Args:
    key: PRNG key for the networks (use the same key to compare two synthetic sets).
    images_by_class: K arrays [n_c, H, W, C] of real images.
    syn_by_class: K arrays [m_c, H, W, C] (or one [K, m, H, W, C] array) of synthetic images.
    model: embedding network; default ConvNet-3 with K classes.
    num_nets: number of random networks averaged.

  Returns:
    The mean distance (a Python float).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dfkd_jax.models import convnet  # pylint: disable=g-import-not-at-top

  model = model if model is not None else convnet.ConvNet(num_classes=len(images_by_class))
  embed = _embed_fn(model)
  dummy = jnp.zeros((1,) + np.shape(images_by_class[0])[1:], jnp.float32)
  init = jax.jit(model.init)
  nets = [init(k, dummy) for k in jax.random.split(key, num_nets)]
  params = jax.tree.map(lambda *leaves: jnp.stack(leaves), *nets)

  @jax.jit
  def class_distance(params, real, syn):
    def one(p):
      return jnp.sum(jnp.square(jnp.mean(embed(p, real), 0) - jnp.mean(embed(p, syn), 0)))
    return jnp.mean(jax.lax.map(one, params))

  return float(sum(class_distance(params, jnp.asarray(r), jnp.asarray(s))
                   for r, s in zip(images_by_class, syn_by_class)))


# ------------------------------------------------------------------------------- CLI


class _FlagError(Exception):
  pass


class _Parser(argparse.ArgumentParser):
  """argparse with errors raised (printed by `main` as one `error: ...` line, exit code 2)."""

  def error(self, message):
    raise _FlagError(message)


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m dfkd_jax.condensation.condense", description=__doc__.split("\n\n")[0],
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--dataset", default="fashion_mnist", help="TFDS name (dfkd_jax.data.datasets)")
  p.add_argument("--data_dir", default=None,
                 help="TFDS data dir (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
  p.add_argument("--pad_to", type=int, default=0,
                 help="zero-pad images to this square size, as the teacher's data (0: native; "
                      "Fashion-MNIST teachers here use 32)")
  p.add_argument("--kind", choices=("dm", "fewshot"), default="dm")
  p.add_argument("--ipc", type=int, default=10, help="DM: synthetic images per class (1/10/50)")
  p.add_argument("--k", type=int, default=10, help="fewshot: real images per class")
  p.add_argument("--iters", type=int, default=20000, help="DM iterations (paper: 20000)")
  p.add_argument("--real_batch", type=int, default=256, help="DM: real images per class and step")
  p.add_argument("--lr", type=float, default=1.0, help="DM: image learning rate (SGD)")
  p.add_argument("--momentum", type=float, default=0.5, help="DM: SGD momentum")
  p.add_argument("--init", choices=("real", "noise"), default="real",
                 help="DM: start from random real images or N(0, 1) noise")
  p.add_argument("--dsa", default=DEFAULT_STRATEGY, help="DM: DSA strategy (families joined by _)")
  p.add_argument("--net_width", type=int, default=128, help="DM: ConvNet-3 width")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None,
                 help="output .npz (default runs/condensed/<dataset>_<kind>_<ipc|k>.npz)")
  p.add_argument("--train_limit", type=int, default=0,
                 help="use only the first N training images (tests; 0: all)")
  p.add_argument("--log_every", type=int, default=100, help="DM: progress line every N steps")
  return p


def _check_args(args: argparse.Namespace) -> None:
  from dfkd_jax.data import datasets  # pylint: disable=g-import-not-at-top

  info = datasets.get_info(args.dataset, data_dir=args.data_dir)
  checks = [
      (args.ipc >= 1, f"--ipc must be >= 1, got {args.ipc}"),
      (args.k >= 1, f"--k must be >= 1, got {args.k}"),
      (args.iters >= 0, f"--iters must be >= 0, got {args.iters}"),
      (args.real_batch >= 1, f"--real_batch must be >= 1, got {args.real_batch}"),
      (args.lr > 0, f"--lr must be > 0, got {args.lr}"),
      (0 <= args.momentum < 1, f"--momentum must lie in [0, 1), got {args.momentum}"),
      (args.net_width >= 1, f"--net_width must be >= 1, got {args.net_width}"),
      (args.train_limit >= 0, f"--train_limit must be >= 0, got {args.train_limit}"),
      (args.log_every >= 1, f"--log_every must be >= 1, got {args.log_every}"),
      (args.pad_to == 0 or args.pad_to >= info.image_size,
       f"--pad_to must be 0 or >= the native size {info.image_size}, got {args.pad_to}"),
      (args.out.endswith(".npz"), f"--out must end in .npz, got {args.out!r}"),
  ]
  for ok, message in checks:
    if not ok:
      raise ValueError(message)
  from dfkd_jax.ops import augment  # pylint: disable=g-import-not-at-top
  augment.dsa_families(args.dsa)


def _save_grid(path: str, images: np.ndarray, info, ncol: int) -> None:
  from dfkd_jax.io import viz  # pylint: disable=g-import-not-at-top
  from dfkd_jax.data import datasets  # pylint: disable=g-import-not-at-top
  grid = viz.image_grid(np.asarray(datasets.denormalize(images, info)), ncol=ncol)
  viz.save_png(path, grid, scale=2 if ncol > 20 else 3)


def run(args: argparse.Namespace) -> dict:
  """Builds and writes the condensed set described by parsed flags; returns its meta."""
  # pylint: disable-next=g-import-not-at-top
  from dfkd_jax.condensation import condensed_set as condensed
  from dfkd_jax.data import datasets  # pylint: disable=g-import-not-at-top

  info = datasets.get_info(args.dataset, data_dir=args.data_dir)
  t_start = time.perf_counter()
  images, labels = datasets.load_split(args.dataset, "train", args.data_dir,
                                       pad_to=args.pad_to or None,
                                       limit=args.train_limit or None)
  print(f"Loaded {args.dataset} train: {images.shape[0]} images of "
        f"{'x'.join(map(str, images.shape[1:]))} ({time.perf_counter() - t_start:.1f} s)",
        flush=True)
  meta = {"dataset": args.dataset, "pad_to": int(args.pad_to), "kind": args.kind,
          "seed": int(args.seed), "num_classes": info.num_classes, "split": "train",
          "train_limit": int(args.train_limit), "image_shape": list(images.shape[1:])}
  if args.kind == "fewshot":
    idx = fewshot_indices(labels, args.k, info.num_classes, args.seed)
    out_images, out_labels = images[idx], labels[idx].astype(np.int32)
    meta.update(ipc=int(args.k), k=int(args.k), iterations=0, indices=idx.tolist())
    ncol = args.k
  else:
    import jax  # pylint: disable=g-import-not-at-top
    from dfkd_jax.models import convnet  # pylint: disable=g-import-not-at-top
    groups = group_by_class(images, labels, info.num_classes)
    rng = np.random.default_rng(args.seed)
    init_images, chosen = initial_images(rng, groups, args.ipc, args.init)
    class_rows = [np.flatnonzero(labels == c) for c in range(info.num_classes)]
    model = convnet.ConvNet(num_classes=info.num_classes, width=args.net_width)
    result = distribution_matching(
        jax.random.key(args.seed), groups, args.ipc, args.iters, model=model,
        real_batch=args.real_batch, lr=args.lr, momentum=args.momentum, init=args.init,
        strategy=args.dsa, init_images=init_images, log_every=args.log_every,
        print_fn=functools.partial(print, flush=True))
    if not np.all(np.isfinite(result.images)):
      raise RuntimeError("DM diverged (non-finite images): lower --lr")
    out_images, out_labels = result.images, result.labels
    meta.update(
        ipc=int(args.ipc), iterations=int(args.iters), init=args.init, lr=float(args.lr),
        momentum=float(args.momentum), real_batch=int(result.real_batch), dsa=args.dsa,
        net=f"convnet3(width={args.net_width})",
        final_loss=float(np.mean(result.losses[-min(100, len(result.losses)):]))
        if len(result.losses) else None,
        seconds_per_iteration=(None if result.seconds_per_iteration != result.seconds_per_iteration
                               else round(float(result.seconds_per_iteration), 4)),
        init_indices=None if chosen is None else np.concatenate(
            [rows[pos] for rows, pos in zip(class_rows, chosen)]).tolist())
    ncol = args.ipc if args.ipc > 1 else info.num_classes
  meta["seconds_total"] = round(time.perf_counter() - t_start, 2)
  condensed.save_condensed(args.out, out_images, out_labels, meta)
  png = os.path.splitext(args.out)[0] + ".png"
  _save_grid(png, out_images, info, ncol)
  print(f"Wrote {args.out} ({out_images.shape[0]} images, {args.kind}) and {png} "
        f"in {meta['seconds_total']:.1f} s", flush=True)
  return meta


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; `argv` excludes the program name. Returns the exit code."""
  parser = _parser()
  try:
    args = parser.parse_args(argv)
    if args.out is None:
      size = args.ipc if args.kind == "dm" else args.k
      args.out = os.path.join("runs", "condensed",
                              f"{args.dataset}_{args.kind}_{'ipc' if args.kind == 'dm' else 'k'}"
                              f"{size}.npz")
    _check_args(args)
  except (_FlagError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except SystemExit as e:  # --help
    return int(e.code or 0)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    run(args)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    if os.environ.get("DFKD_DEBUG"):
      raise
    print("error: " + " ".join(str(e).split()), file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
