r"""What each CPU optimisation of issue 6 gives, on the library's real jitted steps.

  python benchmarks/ablate_cpu.py [--pair lenet|resnet] [--methods dafl,deepinversion]
      [--batch 128] [--repeats 5] [--di_iters 20] [--di_student_steps 10]

Builds the same outer step (`distill.build` + `wrap_step` + `make_step`, random teacher, the
Fashion-MNIST config of the pair, the compare_torch.py budgets) once per variant, each variant
adding one change to the previous one:

  0 before      JAX's own conv gradients, `nn.max_pool`, `jnp.roll`, XLA's compiler defaults
  1 +canonical  conv gradients as canonical NHWC/HWIO convs (`dfkd_jax.models.conv`), the
                input gradient always a convolution
  2 +col2im     input gradients of few-channel / small-output convs as matmul + col2im
  3 +maxpool    LeNet's 2x2 max-pool with a saved-argmax gradient (`lenet.max_pool_2x2`)
  4 +roll       DeepInversion's jitter roll as permutation matmuls (`augment._roll_hw`)
  5 +no-ynn     YNNPACK fusions off for the step (`dfkd_jax.compile`)
  6 +bn-dot     BatchNorm statistics and their gradients as matrix products
                (`dfkd_jax.models.norm`): the library as shipped
  7 +subpixel   the generators' x2 upsampling + 3x3 conv per output phase on the small map
                (`numerics.upsample_conv="subpixel"`, opt-in; `conv.upsample2x_conv`)

Every variant is traced and compiled under its own settings, then the compiled steps are timed
round-robin (one iteration of each variant per round, `--repeats` rounds after one warm-up
round), so background load hits all of them alike. Prints the median per variant and its
speed-up over the first variant listed (`--variants`, default 0). Needs no PyTorch.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dfkd_jax.ops import augment  # noqa: E402
from dfkd_jax.cli import demo  # noqa: E402
from dfkd_jax.train import distill  # noqa: E402
from dfkd_jax import models  # noqa: E402
from dfkd_jax import numerics as numerics_lib  # noqa: E402
from dfkd_jax import parallel  # noqa: E402
from dfkd_jax import state as state_lib  # noqa: E402
from dfkd_jax.models import conv as conv_lib  # noqa: E402
from dfkd_jax.models import lenet  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
PAIRS = {"lenet": ("fashion_mnist_lenet5.py", "lenet5_bn"),
         "resnet": ("fashion_mnist_resnet20.py", "resnet20")}
SHAPE = (32, 32, 1)
VARIANTS = ("0 before", "1 +canonical", "2 +col2im", "3 +maxpool", "4 +roll", "5 +no-ynn",
            "6 +bn-dot", "7 +subpixel")
_SHIPPED = {"pool": lenet.max_pool_2x2, "roll": augment._roll_hw,  # pylint: disable=protected-access
            "channels": conv_lib.COL2IM_MAX_CHANNELS}


def _flax_pool(x):
  return nn.max_pool(x, (2, 2), strides=(2, 2))


def _jnp_roll(x, shift):
  return jnp.roll(x, (shift[0], shift[1]), axis=(1, 2))


@contextlib.contextmanager
def variant_settings(index: int):
  """Library settings of variant `index` (0-7) while a step is traced and compiled."""
  conv_lib.COL2IM_MAX_CHANNELS = _SHIPPED["channels"] if index >= 2 else 0
  conv_lib.COL2IM_SMALL_OUTPUT = index >= 2
  lenet.max_pool_2x2 = _SHIPPED["pool"] if index >= 3 else _flax_pool
  augment._roll_hw = _SHIPPED["roll"] if index >= 4 else _jnp_roll  # pylint: disable=protected-access
  try:
    with numerics_lib.use(conv_grads="auto" if index >= 1 else "xla",
                          batch_norm="auto" if index >= 6 else "xla",
                          xla_cpu_ynn="none" if index >= 5 else "default",
                          upsample_conv="subpixel" if index >= 7 else "direct"):
      yield
  finally:
    conv_lib.COL2IM_MAX_CHANNELS, conv_lib.COL2IM_SMALL_OUTPUT = _SHIPPED["channels"], True
    lenet.max_pool_2x2 = _SHIPPED["pool"]
    augment._roll_hw = _SHIPPED["roll"]  # pylint: disable=protected-access


def build(pair: str, method: str, args, index: int):
  """(step, state, compile seconds) of variant `index`, compiled under its settings."""
  config_file, teacher_name = PAIRS[pair]
  config = demo.load_config(os.path.join(ROOT, "configs", config_file), f"method={method}")
  config.distill.batch_size = args.batch
  if method in ("mb_dfkd", "pre_dfkd"):
    config.mb_dfkd.slot_size = config.pre_dfkd.memory_batch = args.batch // 8
    config.pre_dfkd.vae_input = args.batch // 2
  if method == "deepinversion":
    config.deepinversion.iterations = args.di_iters
    config.distill.student_steps = args.di_student_steps
    config.deepinversion.pool_size = max(config.deepinversion.pool_size, args.batch)
  module = models.get_model(teacher_name, num_classes=10)
  params, bs = state_lib.init_model(module, jax.random.key(1), jnp.zeros((1, *SHAPE)))
  teacher = state_lib.FrozenModel(params=params, batch_stats=bs, apply_fn=module.apply)
  mesh = parallel.make_mesh(1)
  with variant_settings(index):
    _, step, state, _ = distill.assemble(config, mesh=mesh, teacher=teacher, image_shape=SHAPE,
                                         num_classes=10, seed=0)
    t0 = time.perf_counter()
    state, metrics = step(state)
    jax.block_until_ready((state, metrics))
  return step, state, time.perf_counter() - t0


def main(argv=None) -> int:
  from dfkd_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  compile_lib.memory_scheduler()  # as the command lines do, before JAX starts its backends
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--pair", default="lenet", choices=sorted(PAIRS))
  p.add_argument("--methods", default="dafl,deepinversion")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--di_iters", type=int, default=20)
  p.add_argument("--di_student_steps", type=int, default=10)
  p.add_argument("--variants", default=",".join(str(i) for i in range(len(VARIANTS))))
  args = p.parse_args(argv)
  indices = [int(v) for v in args.variants.split(",")]
  print(f"Machine: {platform.node()} {platform.machine()}, {os.cpu_count()} cores, jax "
        f"{jax.__version__} ({jax.devices()[0].platform}); date {datetime.date.today()}; pair "
        f"{args.pair}; command: python " + " ".join(sys.argv), flush=True)
  print("\n| method | variant | compile + first call (s) | median step (s) | vs "
        f"{VARIANTS[indices[0]]} | load (1-min) |\n|---|---|---|---|---|---|", flush=True)
  for method in args.methods.split(","):
    built = {i: build(args.pair, method, args, i) for i in indices}
    states = {i: b[1] for i, b in built.items()}
    times = {i: [] for i in indices}
    for round_ in range(args.repeats + 1):
      order = indices if round_ % 2 == 0 else indices[::-1]
      for i in order:
        t0 = time.perf_counter()
        states[i], metrics = built[i][0](states[i])
        jax.block_until_ready((states[i], metrics))
        if round_ > 0:
          times[i].append(time.perf_counter() - t0)
    base = statistics.median(times[indices[0]])
    load = os.getloadavg()[0]
    for i in indices:
      med = statistics.median(times[i])
      print(f"| {method} | {VARIANTS[i]} | {built[i][2]:.1f} | {med:.3f} | {base / med:.2f}x | "
            f"{load:.2f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
