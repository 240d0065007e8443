r"""Step throughput of every method and of supervised teacher training, on this machine.

  python benchmarks/bench_steps.py --pairs lenet,resnet --batch 256 [--methods dafl,dfad]
  python benchmarks/bench_steps.py --pairs lenet --methods dfad --batch 32,64,128,256
  python benchmarks/bench_steps.py --devices 2 ...    # fake CPU devices (XLA_FLAGS)
  python benchmarks/bench_steps.py --conv_grads xla ...  # JAX's own conv gradients

Data-free steps use a randomly initialised teacher (speed does not depend on its weights).
For each (pair, method): compile time of the first call, then the median wall time of
`--repeats` timed outer iterations (after one warm-up), reported as iterations/s and student
images/s. Prints a markdown table with the machine, date and command.

`--batch` takes a comma-separated list (the global batch, sharded over the devices: scaling with
batch size); `--devices N` runs on N fake XLA:CPU devices (it sets
`--xla_force_host_platform_device_count` before JAX starts: scaling with devices, one process
per device count); `--conv_grads` selects `dfkd_jax.models.conv`'s gradient mode (default
auto: canonical-layout conv gradients on CPU; `xla`: JAX's own, the state before issue 6).
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


def _early_devices(argv) -> None:
  """`--devices N` must reach XLA before JAX initialises its backends."""
  for i, arg in enumerate(argv):
    value = arg.split("=", 1)[1] if arg.startswith("--devices=") else (
        argv[i + 1] if arg == "--devices" and i + 1 < len(argv) else None)
    if value is not None and int(value) > 1:
      os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                                 f" --xla_force_host_platform_device_count={int(value)}")


_early_devices(sys.argv[1:])

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dfkd_jax.train import distill  # noqa: E402
from dfkd_jax import models  # noqa: E402
from dfkd_jax import numerics as numerics_lib  # noqa: E402
from dfkd_jax import parallel  # noqa: E402
from dfkd_jax import state as state_lib  # noqa: E402
from dfkd_jax.cli import demo  # noqa: E402

PAIRS = {
    "lenet": ("configs/fashion_mnist_lenet5.py", "lenet5_bn", "lenet5_half_bn", (32, 32, 1)),
    "resnet": ("configs/fashion_mnist_lenet5.py", "resnet20", "resnet8", (32, 32, 1)),
}
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def machine() -> str:
  return (f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, jax {jax.__version__}, {jax.devices()[0].platform}")


def time_method(pair: str, method: str, batch: int, repeats: int, ngf: int, di_iters: int,
                student_steps: int | None, unroll: bool = False):
  cfg_path, t_name, s_name, shape = PAIRS[pair]
  config = demo.load_config(os.path.join(ROOT, cfg_path), f"method={method}")
  config.teacher.model, config.student.model = t_name, s_name
  config.distill.batch_size = batch
  config.distill.unroll = unroll
  config.generator.ngf = ngf
  config.deepinversion.iterations = di_iters
  config.deepinversion.pool_size = max(config.deepinversion.pool_size, batch)
  if student_steps is not None and method != "dafl":
    config.distill.student_steps = student_steps
  t_module = models.get_model(t_name, num_classes=10)
  params, bs = state_lib.init_model(t_module, jax.random.key(1), jnp.zeros((1, *shape)))
  teacher = state_lib.FrozenModel(params=params, batch_stats=bs, apply_fn=t_module.apply)
  mesh = parallel.make_mesh()
  ctx, step, state, _ = distill.assemble(config, mesh=mesh, teacher=teacher, image_shape=shape,
                                         num_classes=10, seed=0)
  t0 = time.perf_counter()
  state, m = step(state)
  jax.block_until_ready(m)
  compile_s = time.perf_counter() - t0
  state, m = step(state)
  jax.block_until_ready(m)
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    state, m = step(state)
    jax.block_until_ready(m)
    times.append(time.perf_counter() - t0)
  med = statistics.median(times)
  images = batch * config.distill.student_steps
  return {"pair": f"{t_name} -> {s_name}", "method": method, "batch": batch,
          "student_steps": config.distill.student_steps,
          "inner": (f"{config.deepinversion.iterations} inversion iters"
                    if method in ("deepinversion", "adi") else f"ngf {ngf}"),
          "compile_s": compile_s, "median_s": med, "it_per_s": 1.0 / med,
          "student_img_per_s": images / med}


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--pairs", default="lenet,resnet")
  p.add_argument("--methods", default="dafl,dfad,zskt,deepinversion,adi")
  p.add_argument("--batch", default="256", help="global batch size(s), comma-separated")
  p.add_argument("--devices", type=int, default=1, help="fake XLA:CPU devices")
  p.add_argument("--conv_grads", default="auto", choices=numerics_lib.CONV_GRADS)
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--ngf", type=int, default=32)
  p.add_argument("--di_iters", type=int, default=20)
  p.add_argument("--student_steps", type=int, default=None,
                 help="override student steps per iteration (default: the method's)")
  p.add_argument("--unroll", action="store_true", help="unroll the inner student repeats")
  args = p.parse_args()
  # This script's numerics, for the rest of the process.
  contextlib.ExitStack().enter_context(numerics_lib.use(conv_grads=args.conv_grads))
  if jax.device_count() != args.devices:
    raise SystemExit(f"--devices {args.devices} but JAX sees {jax.device_count()} devices")
  import chex  # pylint: disable=g-import-not-at-top
  print(f"Machine: {machine()}; date {datetime.date.today()}; command: python "
        + " ".join(sys.argv), flush=True)
  print("\n| pair | method | batch | devices | conv grads | student steps/it | inner | unroll | "
        "compile (s) | median step (s) | it/s | student img/s |\n"
        "|---|---|---|---|---|---|---|---|---|---|---|---|", flush=True)
  for pair in args.pairs.split(","):
    for method in args.methods.split(","):
      for batch in (int(b) for b in args.batch.split(",")):
        chex.clear_trace_counter()
        r = time_method(pair, method, batch, args.repeats, args.ngf, args.di_iters,
                        args.student_steps, args.unroll)
        print(f"| {r['pair']} | {r['method']} | {r['batch']} | {jax.device_count()} | "
              f"{args.conv_grads} | {r['student_steps']} | {r['inner']} | {args.unroll} | "
              f"{r['compile_s']:.1f} | {r['median_s']:.3f} | {r['it_per_s']:.2f} | "
              f"{r['student_img_per_s']:.0f} |", flush=True)


if __name__ == "__main__":
  main()
