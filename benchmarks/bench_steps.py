r"""Step throughput of every method and of supervised teacher training, on this machine.

  python benchmarks/bench_steps.py --pairs lenet,resnet --batch 256 [--methods dafl,dfad]
  python benchmarks/bench_steps.py --pairs lenet --methods dfad --batch 32,64,128,256
  python benchmarks/bench_steps.py --devices 2 ...    # fake CPU devices (XLA_FLAGS)
  python benchmarks/bench_steps.py --conv_grads xla ...  # JAX's own conv gradients
  python benchmarks/bench_steps.py --pairs r34_r18,wrn40_2_wrn16_2 --dtype float32,bfloat16 \
      --methods dafl,deepinversion,mb_dfkd,pre_dfkd,fast,nayer   # the CIFAR pairs (GPU check)

Data-free steps use a randomly initialised teacher (speed does not depend on its weights).
For each (pair, method): compile time of the first call, then the median wall time of
`--repeats` timed outer iterations (after one warm-up), reported as iterations/s and student
images/s. Prints a markdown table with the machine, date and command.

`--batch` takes a comma-separated list (the global batch, sharded over the devices: scaling with
batch size); `--devices N` runs on N fake XLA:CPU devices (it sets
`--xla_force_host_platform_device_count` before JAX starts: scaling with devices, one process
per device count); `--conv_grads` selects `dfkd_jax.models.conv`'s gradient mode (default
auto: canonical-layout conv gradients on CPU; `xla`: JAX's own, the state before issue 6).

The CIFAR pairs (`r34_r18`, `wrn40_2_wrn16_2`: 32x32x3, `configs/cifar.py` at its budgets) are
for accelerators. `--dtype` lists compute dtypes (`config.dtype`). Each row also gives XLA's
FLOP count of one outer iteration (`cost_analysis`) and the fraction of the device's peak it
reaches: the dense tensor-core peak of the dtype for known GPUs (`PEAK_TFLOPS`; float32 steps
run their products in TF32 on these GPUs, JAX's default precision), or `--peak_tflops`; on a CPU,
the rate XLA's own 2048 x 2048 matrix product reaches there (measured before each row, so it
sees the same load: the practical peak of the machine rather than a nominal one). XLA counts a
while loop's body once, so for a step with a scanned loop (`lax.scan` student steps, the
inversion rounds) the FLOP columns are marked ">=" (lower bounds); `--unroll` traces the student
loops without one.
`--max_minutes` stops starting new rows after that long (the rows so far are printed).
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import re
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
    "r34_r18": ("configs/cifar.py", "resnet34", "resnet18", (32, 32, 3)),
    "wrn40_2_wrn16_2": ("configs/cifar.py", "wrn40_2", "wrn16_2", (32, 32, 3)),
}
# Dense tensor-core peaks (TFLOP/s) by device kind: bfloat16, and TF32 for float32 products.
PEAK_TFLOPS = {
    "H100": {"bfloat16": 989.0, "float32": 494.5},
    "H200": {"bfloat16": 989.0, "float32": 494.5},
    "A100": {"bfloat16": 312.0, "float32": 156.0},
}


def measured_matmul_tflops(dtype: str = "float32", n: int = 2048, repeats: int = 5) -> float:
  """The best TFLOP/s of XLA's [n, n] x [n, n] product on the default device (over `repeats`
  timed calls after a warm-up): the practical peak of a CPU, whose nominal peak is not listed."""
  a = jnp.ones((n, n), dtype)
  f = jax.jit(lambda x: x @ x)
  jax.block_until_ready(f(a))
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(f(a))
    best = min(best, time.perf_counter() - t0)
  return 2 * n ** 3 / best / 1e12


def peak_tflops(dtype: str, given: float | None) -> float | None:
  """`given`; else the listed dense peak of a known GPU; else (CPU) XLA's measured matmul rate."""
  if given:
    return given
  kind = jax.devices()[0].device_kind
  for name, peaks in PEAK_TFLOPS.items():
    if name in kind:
      return peaks[dtype]
  if jax.default_backend() == "cpu":
    return measured_matmul_tflops(dtype)
  return None
ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def machine() -> str:
  return (f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, jax {jax.__version__}, {jax.devices()[0].platform}")


def time_method(pair: str, method: str, batch: int, repeats: int, ngf: int, di_iters: int,
                student_steps: int | None, unroll: bool = False, dtype: str = "float32"):
  cfg_path, t_name, s_name, shape = PAIRS[pair]
  arg = f"method={method}" + (f",pair={pair}" if cfg_path.endswith("cifar.py") else "")
  config = demo.load_config(os.path.join(ROOT, cfg_path), arg)
  config.teacher.model, config.student.model = t_name, s_name
  config.dtype = dtype
  config.distill.batch_size = batch
  config.distill.unroll = unroll
  if ngf:
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
                                         num_classes=10, seed=0, max_traces=2)
  t0 = time.perf_counter()  # compile: lowering + XLA compilation + the first call
  compiled = step.lower(state).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  # XLA's cost analysis counts a while loop's body once, not once per trip: a step with a
  # loop (a scanned student or inversion loop) reports a lower bound of its FLOPs
  loops = has_while_loop(compiled.as_text())
  # XLA counts the FLOPs of one device's (partitioned) program: the step's are that times the
  # mesh size
  flops = float((cost or {}).get("flops", 0.0)) * mesh.devices.size or None
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
                    if method in ("deepinversion", "adi") else f"ngf {config.generator.ngf}"),
          "compile_s": compile_s, "median_s": med, "it_per_s": 1.0 / med,
          "student_img_per_s": images / med, "dtype": dtype, "flops": flops,
          "tflops_per_s": flops / med / 1e12 if flops else None, "flops_lower_bound": loops}


# While loops that JAX's PRNG emits (threefry hashing, bits to floats): no FLOPs to miss.
_PRNG_LOOP = re.compile(r"threefry|random_bits|_uniform|_normal|_randint|random_split")


def has_while_loop(hlo_text: str) -> bool:
  """Whether a compiled HLO module contains a while loop other than the PRNG's (its FLOP count
  is then too low: XLA counts a loop body once)."""
  return any(not _PRNG_LOOP.search(line)
             for line in hlo_text.splitlines() if re.search(r"\bwhile\(", line))


def main():
  from dfkd_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  compile_lib.memory_scheduler()  # as the command lines do, before JAX starts its backends
  p = argparse.ArgumentParser()
  p.add_argument("--pairs", default="lenet,resnet")
  p.add_argument("--methods", default="dafl,dfad,zskt,deepinversion,adi")
  p.add_argument("--batch", default="256", help="global batch size(s), comma-separated")
  p.add_argument("--devices", type=int, default=1, help="fake XLA:CPU devices")
  p.add_argument("--conv_grads", default=numerics_lib.current().conv_grads,
                 choices=numerics_lib.CONV_GRADS)
  p.add_argument("--upsample_conv", default=numerics_lib.current().upsample_conv,
                 choices=numerics_lib.UPSAMPLE_CONV,
                 help="the generators' x2 upsampling + 3x3 conv: direct or subpixel")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--ngf", type=int, default=32, help="generator width (0: the config's own)")
  p.add_argument("--di_iters", type=int, default=20)
  p.add_argument("--student_steps", type=int, default=None,
                 help="override student steps per iteration (default: the method's)")
  p.add_argument("--unroll", action="store_true", help="unroll the inner student repeats")
  p.add_argument("--dtype", default="float32", help="compute dtype(s), comma-separated")
  p.add_argument("--peak_tflops", type=float, default=None,
                 help="the device's peak TFLOP/s (default: PEAK_TFLOPS for known GPUs)")
  p.add_argument("--max_minutes", type=float, default=0.0,
                 help="start no new row after this many minutes (0: no limit)")
  args = p.parse_args()
  start = time.perf_counter()
  # This script's numerics, for the rest of the process.
  numerics_scope = contextlib.ExitStack()  # held until main returns: a dropped stack
  # would close the scope at once (the generator of `use` is finalised with it)
  numerics_scope.enter_context(numerics_lib.use(conv_grads=args.conv_grads,
                                                       upsample_conv=args.upsample_conv))
  if jax.device_count() != args.devices:
    raise SystemExit(f"--devices {args.devices} but JAX sees {jax.device_count()} devices")
  import chex  # pylint: disable=g-import-not-at-top
  print(f"Machine: {machine()}; date {datetime.date.today()}; JAX numerics "
        f"{numerics_lib.current().to_dict()}; command: python " + " ".join(sys.argv), flush=True)
  print("\n| pair | method | dtype | batch | devices | conv grads | student steps/it | inner | "
        "unroll | compile (s) | median step (s) | it/s | student img/s | TFLOP/it | TFLOP/s | "
        "of peak (TFLOP/s) |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        flush=True)
  for pair in args.pairs.split(","):
    for method in args.methods.split(","):
      for dtype in args.dtype.split(","):
        for batch in (int(b) for b in args.batch.split(",")):
          if args.max_minutes and time.perf_counter() - start > 60 * args.max_minutes:
            print(f"(stopped: --max_minutes {args.max_minutes} reached before {pair} {method} "
                  f"{dtype} {batch})", flush=True)
            return
          chex.clear_trace_counter()
          r = time_method(pair, method, batch, args.repeats, args.ngf, args.di_iters,
                          args.student_steps, args.unroll, dtype)
          peak = peak_tflops(dtype, args.peak_tflops)
          tf = r["tflops_per_s"]
          ge = ">=" if r["flops_lower_bound"] else ""  # XLA counted each loop body once
          print(f"| {r['pair']} | {r['method']} | {dtype} | {r['batch']} | "
                f"{jax.device_count()} | {numerics_lib.current().conv_grads} | "
                f"{r['student_steps']} | "
                f"{r['inner']} | {args.unroll} | {r['compile_s']:.1f} | {r['median_s']:.3f} | "
                f"{r['it_per_s']:.2f} | {r['student_img_per_s']:.0f} | "
                f"{ge}{r['flops'] / 1e12 if r['flops'] else float('nan'):.3f} | "
                f"{ge}{tf if tf else float('nan'):.3f} | "
                f"{f'{ge}{tf / peak:.1%} of {peak:.3f}' if tf and peak else '-'} |", flush=True)


if __name__ == "__main__":
  main()
