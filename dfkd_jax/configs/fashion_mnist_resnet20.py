r"""Fashion-MNIST, ResNet-20 teacher -> ResNet-8 student (the small residual pair for CPUs).

Images are padded from 28x28 to 32x32. Teacher: 5 epochs, no augmentation: 93.31 % test
accuracy in about 33 minutes on 2 CPU cores (benchmarks/RESULTS.md).

  python -m dfkd_jax.cli.main --config=configs/fashion_mnist_resnet20.py:method=teacher \
      --workdir=runs/fashion_mnist_resnet20/teacher
  python -m dfkd_jax.cli.main --config=configs/fashion_mnist_resnet20.py:method=dfad \
      --workdir=runs/fashion_mnist_resnet20/dfad

Argument keys: method, teacher_workdir, tiny, epochs (teacher epochs).
"""

from dfkd_jax.configs import common


def get_config(arg: str | None = None):
  args = common.parse_arg(arg, method="teacher", tiny=False, epochs=5,
                          teacher_workdir="runs/fashion_mnist_resnet20/teacher",
                          **common.DATA_FREE_ARGS)
  c = common.base(args.method)
  c.seed = args.seed
  c.dataset = "fashion_mnist"
  c.pad_to = 32
  c.teacher.model = "resnet20"
  c.teacher.workdir = args.teacher_workdir
  c.student.model = "resnet8"
  c.batch_size = 128
  c.num_epochs = args.epochs
  c.augment = "none"  # crop_flip is available; 5 epochs without it reached 93.31 %
  c.optimizer = common.optimizer("sgd", lr=0.1, momentum=0.9, weight_decay=5e-4,
                                 schedule="cosine")
  c.checkpoint_every = 200
  if args.method == "kd_condensed":
    common.kd_condensed(c, args.condensed)
  if common.is_data_free(args.method):
    common.distill(c, args.method)
    c.distill.batch_size = 128
    c.generator.ngf = 32
    c.distill.unroll = True  # XLA:CPU: conv gradients inside while loops are slow
    common.scale_replay(c)
    if args.method in ("fast", "nayer"):
      common.cpu_fast_nayer(c, args.method)
    elif args.method in ("deepinversion", "adi"):
      common.cpu_deepinversion(c)
    common.data_free_options(c, args)
  if args.tiny:
    common.tiny_small(c, args.method)
  return c
