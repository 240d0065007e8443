r"""CIFAR-10 / CIFAR-100 with the teacher -> student pairs of the Fast-DFKD and NAYER papers, at
the papers' budgets (for accelerators; on a CPU use `tiny` only).

Pairs: `r34_r18` (ResNet-34 -> ResNet-18) and `wrn40_2_wrn16_2` (WRN-40-2 -> WRN-16-2). The
datasets come through TFDS (`cifar10`, `cifar100`; prepare them with `tfds build` on a machine
that can download them, then point `data_dir` at the copy).

Teacher (200 epochs, SGD 0.1 cosine, random crop + flip):
  python -m dfkd_jax.cli.main --config=configs/cifar.py:method=teacher,dataset=cifar10,pair=r34_r18 \
      --workdir=runs/cifar10_r34_r18/teacher
Fast-2 and NAYER-100 (docs/methods.md §11.5, §12.4; Fast-5/10: add fast_k=5 or fast_k=10):
  python -m dfkd_jax.cli.main --config=configs/cifar.py:method=fast,dataset=cifar10,pair=r34_r18,teacher_workdir=runs/cifar10_r34_r18/teacher \
      --workdir=runs/cifar10_r34_r18/fast
  python -m dfkd_jax.cli.main --config=configs/cifar.py:method=nayer,dataset=cifar100,pair=wrn40_2_wrn16_2,teacher_workdir=runs/cifar100_wrn/teacher \
      --workdir=runs/cifar100_wrn/nayer
Any other data-free method runs at its registry defaults, e.g. method=deepinversion.

Argument keys: method, dataset (cifar10|cifar100), pair (r34_r18|wrn40_2_wrn16_2), fast_k
(2|5|10), teacher_workdir, tiny, seed, guidance, condensed, faithful.
"""

from dfkd_jax.configs import common

PAIRS = {"r34_r18": ("resnet34", "resnet18"), "wrn40_2_wrn16_2": ("wrn40_2", "wrn16_2")}
# Fast-k settings of the official scripts: k -> (lr_g, lr_z); the meta rate is lr_g * k.
FAST_K = {2: (5e-3, 0.015), 5: (3e-3, 0.01), 10: (2e-3, 0.01)}


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, method="teacher", tiny=False, dataset="cifar10", pair="r34_r18",
                          fast_k=2, teacher_workdir="runs/cifar/teacher",
                          **common.DATA_FREE_ARGS)
  if args.dataset not in ("cifar10", "cifar100"):
    raise ValueError(f"Unknown dataset {args.dataset!r}; valid: cifar10, cifar100.")
  if args.pair not in PAIRS:
    raise ValueError(f"Unknown pair {args.pair!r}; valid: {', '.join(PAIRS)}.")
  if args.fast_k not in FAST_K:
    raise ValueError(f"Unknown fast_k {args.fast_k}; valid: {', '.join(map(str, FAST_K))}.")
  c = common.base(args.method)
  c.seed = args.seed
  c.dataset = args.dataset
  c.teacher.model, c.student.model = PAIRS[args.pair]
  c.teacher.workdir = args.teacher_workdir
  c.batch_size = 128
  c.num_epochs = 200
  c.augment = "crop_flip"
  c.optimizer = common.optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                                 schedule="cosine")
  c.log_every = 200
  c.checkpoint_every = 2000
  if args.method == "kd_condensed":
    common.kd_condensed(c, args.condensed)
  if common.is_data_free(args.method):
    common.distill(c, args.method)
    c.distill.eval_every = 10 if args.method in ("fast", "nayer") else 100
    c.distill.log_every = c.distill.eval_every
    c.distill.checkpoint_every = c.distill.eval_every
    if args.method == "fast":
      k = args.fast_k
      lr_g, lr_z = FAST_K[k]
      c.fast.update(dict(k=k, lr_g=lr_g, lr_z=lr_z))
      c.gen_optimizer.lr = lr_g * k
    if args.method == "fast" and args.pair == "wrn40_2_wrn16_2":
      c.loss.update(dict(ce=0.4, adv=1.1))  # the Fast scripts' WRN weights
    common.data_free_options(c, args)
  if args.tiny:
    common.tiny_small(c, args.method)
  return c
