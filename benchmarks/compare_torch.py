r"""JAX vs PyTorch: one outer iteration of each data-free method, timed side by side.

  python benchmarks/compare_torch.py [--pair lenet|resnet]
      [--methods dafl,dfad,deepinversion,mb_dfkd,pre_dfkd] [--batch 128] [--repeats 5]
      [--warmup 2] [--threads 2] [--di_iters 20] [--di_student_steps 10] [--out_md FILE]
  python benchmarks/compare_torch.py --check [--pair lenet|resnet] [--methods ...]
  python benchmarks/compare_torch.py --methods deepinversion --conv_grads xla
  python benchmarks/compare_torch.py --memory --methods pre_dfkd --batch 256 \
      --config_arg faithful --set generator.ngf=64 --set distill.student_steps=10 [...]

Needs PyTorch (CPU): `pip install -e '.[bench]'` (or `pip install 'torch<=2.13.0' --index-url
https://download.pytorch.org/whl/cpu`). PyTorch is never imported by the package itself; the
PyTorch side lives in benchmarks/torch_ref/ (models, weight copies, losses, `TorchMethod`, the
parity check).

What is compared. Fashion-MNIST budgets (32x32x1 images, generator ngf 32, batch 128) of one
teacher -> student pair (`--pair`, a randomly initialised teacher):
- `lenet` (default): `configs/fashion_mnist_lenet5.py`, LeNet-5-BN -> LeNet-5-half-BN, latent 100.
- `resnet`: `configs/fashion_mnist_resnet20.py`, ResNet-20 -> ResNet-8 (`resnet_cifar`: 3x3
  stem, post-activation basic blocks, 1x1 conv + BN projection shortcuts where the shape
  changes, not He et al.'s zero-padding ones; pooled feature; PyTorch twin `TorchResNetCifar`),
  with the config's own method budgets (latents 100 / 256 (dfad) / 1000 (mb_dfkd, pre_dfkd);
  mb_dfkd and pre_dfkd 10 student steps, pre_dfkd 4 VAE steps and a VAE latent of 1000).
- JAX: the library's real jitted outer step (`distill.build` + `wrap_step` + `make_step`, state
  donated), with the config's own inner-loop settings (lenet: unrolled student repeats except
  DeepInversion's, which are a `lax.scan`; resnet: every student repeat unrolled; the inversion
  loop is always a `lax.scan`).
- PyTorch: a plain eager reimplementation (`torch_ref.methods.TorchMethod`) of the same
  per-iteration work, written the way the official code does it (`nn.Module`s, one `backward()`
  per update, `torch.optim`), with the same models, batch, number of generator / student / VAE /
  pixel steps, losses, optimisers and hyper-parameters, read from the same config. Where the
  official scripts do work that the algorithm does not need, this version does what the JAX step
  does instead (so both sides do the same arithmetic): the teacher's parameters need no gradient,
  synthetic images for student steps are drawn under `torch.no_grad()`, generator steps compute no
  student-parameter gradients, and the PRE-DFKD latent step differentiates the latents only (the
  library default `pre_dfkd.leak_z_grad_into_vae=False`). It mirrors the library's semantics where
  they differ from the official code (the generator's spectral-norm vector is stored only by
  generator steps; MB-DFKD concatenates a masked, zero-filled slot while the bank is empty; the
  adversarial JS term is not detached from the teacher unless `loss.adv_detach_teacher`); none of
  these changes the cost of a steady-state iteration.
- One outer iteration: dafl 1 fused G+S step; dfad 5 S + 1 G; deepinversion 1 synthesis round of
  `--di_iters` Adam pixel steps + `--di_student_steps` KD steps (the configs' 200 + 100 (lenet)
  or 2000 + 400 (resnet) would take minutes per PyTorch round on this CPU); mb_dfkd 1 G + 5 S
  (resnet: 10 S) (+ bank push); pre_dfkd 1 G + 5 (resnet: 10) KD steps with memory inference,
  the first 2 (resnet: 4) with a VAE step.

Protocol: both frameworks in one process, PyTorch with `torch.set_num_threads(--threads)` and
`OMP_WAIT_POLICY=PASSIVE` unless set (see torch_ref/__init__.py), XLA:CPU with its default thread
pool; JAX's first call (trace + compile + run) is timed apart, then `--warmup` untimed iterations
of each, then `--repeats` timed iterations alternating JAX and PyTorch (the order swaps every
repeat), so background load hits both alike. Reported: median wall time of each, ratio torch / jax
(>= 1: JAX is faster), JAX compile + first call, XLA's buffer assignment for the step (temp =
working memory beyond the state), and the peak RSS growth during one extra iteration of each
framework (after `malloc_trim(0)`, sampled from /proc/self/statm every 2 ms: a lower bound), plus
the process's RSS high-water mark (resource.getrusage, both frameworks together, compilation
included).

`--config_arg` and `--set FIELD=VALUE` (repeatable) change the config of both sides alike (the
PyTorch twin reads the same config): e.g. the official PRE-DFKD per-iteration work is
`--methods pre_dfkd --batch 256 --config_arg faithful --set generator.ngf=64 --set
distill.latent_dim=1000 --set distill.student_steps=10 --set pre_dfkd.vae_steps=4 --set
pre_dfkd.vae_latent_dim=1000 --set pre_dfkd.memory_batch=32`.

`--memory` measures memory instead of time, each framework x method in a fresh process (so one
framework's high-water mark cannot hide the other's): RSS after set-up (both frameworks imported,
the models and state built, the other framework's caches dropped), the peak RSS sampled while
JAX traces and compiles the step (trace and compile timed apart), the peak over the first call
and `--repeats` iterations, and the step's peak growth over the set-up RSS (the memory the step
itself needs, compilation included); with XLA's temp buffers. `--compile_cache DIR` gives the JAX
side the persistent compilation cache (a second run loads the step instead of compiling it).
XLA flags (`XLA_FLAGS=...`) reach the child processes.

`--check` (and tests/benchmarks/test_compare_torch.py): the numerical parity check of
`torch_ref.parity.check_method` instead of timing (tiny config, same weights and random draws,
two outer iterations; the first to `--rtol`, the second to `--rtol_later`).

`--conv_grads xla` gives the JAX side JAX's own convolution gradients instead of the library's
CPU-fast ones (`dfkd_jax.models.conv`); `DFKD_XLA_CPU_YNN=default` gives it XLA's default
compiler options instead of the library's (`dfkd_jax.compile`), `DFKD_BATCH_NORM=xla` Flax's
own BatchNorm instead of `dfkd_jax.models.norm`'s: together, the library as it was
before issue 6's changes (apart from LeNet's max-pool and the jitter roll, which are rewritten
in place). `--profile METHOD` and `--conv_loop_demo` are forwarded to
benchmarks/profile_step.py.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import os
import resource
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402

try:  # torch_ref sets OMP_WAIT_POLICY before it imports torch
  from torch_ref.methods import TorchMethod, TorchRandom  # noqa: E402
except ImportError as e:  # pragma: no cover
  raise SystemExit(f"compare_torch.py: {e}") from e

import torch  # noqa: E402

import profile_step  # noqa: E402
from torch_ref.parity import METHODS, PAIR_NAMES, _HostState  # noqa: E402
from torch_ref.parity import check_method, jax_setup, random_teacher  # noqa: E402
from dfkd_jax import numerics as numerics_lib  # noqa: E402


# ============================================================================ timing


def _rss_bytes() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
  """Peak RSS growth over a block (after `malloc_trim`), sampled every `interval` s by a thread
  (a lower bound: short peaks between samples are missed)."""

  def __init__(self, interval=0.002):
    self.interval, self.peak, self._stop = interval, 0, threading.Event()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      time.sleep(self.interval)

  def __enter__(self):
    _trim()  # hand the allocator's free pages back first, so the growth is the block's peak
    self.base = self.peak = _rss_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())
    self.delta = self.peak - self.base


def _xla_memory(step, state):
  """XLA's buffer assignment of the compiled step: (temp bytes, argument bytes) or None."""
  import chex  # pylint: disable=g-import-not-at-top
  try:
    chex.clear_trace_counter()
    ma = step.lower(state).compile().memory_analysis()
    return ma.temp_size_in_bytes, ma.argument_size_in_bytes
  except Exception:  # pylint: disable=broad-except
    return None


def work_description(method, config) -> str:
  d = config.distill
  if method == "dafl":
    return "1 fused G+S step"
  if method == "dfad":
    return f"{d.student_steps} S + 1 G"
  if method == "deepinversion":
    return (f"{config.deepinversion.iterations} pixel steps (scan) + {d.student_steps} S "
            f"({'unrolled' if d.unroll else 'scan'})")
  if method == "mb_dfkd":
    return f"1 G + {d.student_steps} S (+B/8 replay)"
  return (f"1 G + {d.student_steps} S (+B/8 memory), {config.pre_dfkd.vae_steps} VAE")


def time_method(method, args):
  config = profile_step.step_config(method, args)
  step, state = jax_setup(config, random_teacher(pair=args.pair), pair=args.pair)
  runner = TorchMethod(method, config, _HostState(state))
  rng = TorchRandom()
  load0 = os.getloadavg()[0]

  def run_jax():
    nonlocal state
    state, m = step(state)
    jax.block_until_ready((state, m))

  t0 = time.perf_counter()
  run_jax()
  jax_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  runner.step(rng)
  torch_first = time.perf_counter() - t0
  for _ in range(args.warmup):
    run_jax()
    runner.step(rng)
  tj, tt = [], []
  for r in range(args.repeats):
    order = (("jax", run_jax), ("torch", lambda: runner.step(rng)))
    for name, fn in (order if r % 2 == 0 else order[::-1]):
      t0 = time.perf_counter()
      fn()
      (tj if name == "jax" else tt).append(time.perf_counter() - t0)
  with RSSPeak() as mem_j:
    run_jax()
  with RSSPeak() as mem_t:
    runner.step(rng)
  xla = _xla_memory(step, state)
  med_j, med_t = statistics.median(tj), statistics.median(tt)
  return {"method": method, "work": work_description(method, config), "jax_s": med_j,
          "torch_s": med_t, "ratio": med_t / med_j, "jax_first_s": jax_first,
          "torch_first_s": torch_first, "jax_times": tj, "torch_times": tt,
          "xla_temp": xla[0] if xla else None, "xla_args": xla[1] if xla else None,
          "rss_jax": mem_j.delta, "rss_torch": mem_t.delta,
          "load": (load0, os.getloadavg()[0])}


# ============================================================================ memory


def _trim():
  try:
    ctypes.CDLL("libc.so.6").malloc_trim(0)
  except OSError:
    pass


def memory_child(framework: str, method: str, args) -> dict:
  """One framework's memory in this (fresh) process: RSS after set-up (both frameworks imported,
  models and state built), the peak while compiling (JAX: trace + XLA compile, timed apart), the
  peak over the first call + `--repeats` iterations, XLA's buffer assignment, the high-water."""
  import gc  # pylint: disable=g-import-not-at-top
  config = profile_step.step_config(method, args)
  step, state = jax_setup(config, random_teacher(pair=args.pair), pair=args.pair)
  out = {"framework": framework, "method": method}
  if framework == "torch":
    runner, rng = TorchMethod(method, config, _HostState(state)), TorchRandom()
    del state, step
    gc.collect()
    jax.clear_caches()
    run = lambda: runner.step(rng)  # noqa: E731
  _trim()
  out["rss_setup"] = _rss_bytes()
  if framework == "jax":
    t0 = time.perf_counter()
    with RSSPeak() as mem:
      lowered = step.lower(state)
      t1 = time.perf_counter()
      compiled = lowered.compile()
    out["trace_s"], out["compile_s"] = t1 - t0, time.perf_counter() - t1
    out["rss_compile_peak"] = mem.peak
    ma = compiled.memory_analysis()
    out.update(xla_temp=ma.temp_size_in_bytes, xla_args=ma.argument_size_in_bytes,
               xla_code=ma.generated_code_size_in_bytes)
    del lowered
    gc.collect()
    _trim()
    out["rss_after_compile"] = _rss_bytes()

    def run():
      nonlocal state
      state, m = compiled(state)
      jax.block_until_ready((state, m))
  times = []
  with RSSPeak() as mem:
    for _ in range(args.repeats + 1):
      t0 = time.perf_counter()
      run()
      times.append(time.perf_counter() - t0)
  out["first_s"], out["step_s"] = times[0], statistics.median(times[1:])
  out["rss_run_peak"] = mem.peak
  out["maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return out


MEMORY_HEAD = (
    "| method | framework | RSS after set-up (MiB) | peak while compiling | peak while running | "
    "step's peak growth | XLA temp / code (MiB) | trace + compile (s) | median iteration (s) |\n"
    "|---|---|---|---|---|---|---|---|---|")


def memory_row(r) -> str:
  base, jax_side = r["rss_setup"], r["framework"] == "jax"
  peak = max(r.get("rss_compile_peak", 0), r["rss_run_peak"])
  compile_peak = _mib(r["rss_compile_peak"]) if jax_side else "-"
  xla = f"{_mib(r['xla_temp'])} / {_mib(r['xla_code'])}" if jax_side else "-"
  compile_s = f"{r['trace_s']:.1f} + {r['compile_s']:.1f}" if jax_side else "-"
  return (f"| {r['method']} | {r['framework']} | {_mib(base)} | {compile_peak} | "
          f"{_mib(r['rss_run_peak'])} | **{_mib(peak - base)}** | {xla} | {compile_s} | "
          f"{r['step_s']:.3f} |")


def _drop_flag(argv, flag):
  """`argv` without `flag` and its value (either `flag value` or `flag=value`)."""
  out, skip = [], False
  for a in argv:
    if skip:
      skip = False
    elif a == flag:
      skip = True
    elif not a.startswith(flag + "="):
      out.append(a)
  return out


def memory_table(methods, frameworks, argv) -> list[str]:
  """Runs `memory_child` for each method x framework in a fresh process; returns table rows."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  rows = []
  for m in methods:
    for fw in frameworks:
      cmd = [sys.executable, os.path.abspath(__file__), *argv, "--methods", m,
             "--memory_child", fw]
      res = subprocess.run(cmd, check=True, capture_output=True, text=True)
      r = json.loads(res.stdout.strip().splitlines()[-1])
      rows.append(memory_row(r))
      print(rows[-1], flush=True)
  return rows


def _mib(b):
  return "n/a" if b is None else f"{b / 2 ** 20:.1f}"


def machine() -> str:
  return (f"{profile_step.machine()}, torch {torch.__version__}"
          f" ({torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')})")


TABLE_HEAD = (
    "| method | one outer iteration | JAX median (s) | PyTorch median (s) | torch / jax | "
    "JAX compile + first call (s) | PyTorch first call (s) | XLA temp (MiB) | "
    "RSS growth JAX / PyTorch (MiB) | load (1-min avg) |\n"
    "|---|---|---|---|---|---|---|---|---|---|")


def table_row(r) -> str:
  return (f"| {r['method']} | {r['work']} | {r['jax_s']:.3f} | {r['torch_s']:.3f} | "
          f"**{r['ratio']:.2f}** | {r['jax_first_s']:.1f} | {r['torch_first_s']:.2f} | "
          f"{_mib(r['xla_temp'])} | {_mib(r['rss_jax'])} / {_mib(r['rss_torch'])} | "
          f"{r['load'][0]:.2f} -> {r['load'][1]:.2f} |")


def main(argv=None):
  from dfkd_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  compile_lib.memory_scheduler()  # as the command lines do, before JAX starts its backends
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", default=",".join(METHODS))
  profile_step.add_step_flags(p)  # --pair, --batch, --conv_grads, --upsample_conv, --set, ...
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--out_md", default="", help="also write the markdown table to this file")
  p.add_argument("--check", action="store_true",
                 help="numerical parity check on a tiny config instead of timing")
  p.add_argument("--rtol", type=float, default=1e-4, help="check: first iteration")
  p.add_argument("--rtol_later", type=float, default=5e-3, help="check: second iteration")
  p.add_argument("--profile", default="", metavar="METHOD",
                 help="run benchmarks/profile_step.py (per-op profile of this method's JAX "
                 "step) with these arguments instead")
  p.add_argument("--conv_loop_demo", action="store_true",
                 help="run benchmarks/profile_step.py --conv_loop_demo instead")
  p.add_argument("--memory", action="store_true",
                 help="memory instead of time: each framework x method in a fresh process")
  p.add_argument("--frameworks", default="jax,torch", help="memory: which sides to measure")
  p.add_argument("--compile_cache", default="off",
                 help="memory: JAX's persistent compilation cache folder for the JAX side "
                 "(run twice: the second run loads the step instead of compiling it)")
  p.add_argument("--memory_child", default="", choices=("", "jax", "torch"),
                 help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.profile or args.conv_loop_demo:  # moved to benchmarks/profile_step.py
    return profile_step.main(sys.argv[1:] if argv is None else argv)
  torch.set_num_threads(args.threads)
  # The JAX side's numerics for the rest of this process (a script, not a library call).
  numerics_scope = contextlib.ExitStack()  # held until main returns: a dropped stack
  # would close the scope at once (the generator of `use` is finalised with it)
  numerics_scope.enter_context(numerics_lib.use(conv_grads=args.conv_grads,
                                                       upsample_conv=args.upsample_conv))
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"Unknown method {m!r}; valid: {', '.join(METHODS)}.")
  if args.memory_child:
    import json  # pylint: disable=g-import-not-at-top
    from dfkd_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
    compile_lib.enable_cache(args.compile_cache)
    print(json.dumps(memory_child(args.memory_child, methods[0], args)), flush=True)
    return 0
  header = (f"Machine: {machine()}; date {datetime.date.today()}; "
            f"pair {PAIR_NAMES[args.pair]}; JAX numerics {numerics_lib.current().to_dict()}; "
            "command: python " + " ".join(sys.argv))
  print(header, flush=True)
  if args.check:
    failed = 0
    print("\n| method | iteration | metric | JAX | PyTorch | rel. diff | rtol | ok |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for m in methods:
      for it, k, a, b, tol, ok in check_method(m, rtol=args.rtol, rtol_later=args.rtol_later,
                                               pair=args.pair):
        failed += not ok
        rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
        print(f"| {m} | {it} | {k} | {a:.7g} | {b:.7g} | {rel:.1e} | {tol:g} | "
              f"{'yes' if ok else 'NO'} |", flush=True)
    print(f"\n{'All metrics agree' if not failed else f'{failed} metrics differ'}.")
    return 1 if failed else 0
  if args.memory:
    argv_rest = [a for a in (sys.argv[1:] if argv is None else argv) if a != "--memory"]
    argv_rest = _drop_flag(_drop_flag(argv_rest, "--methods"), "--frameworks")
    print("\n" + MEMORY_HEAD, flush=True)
    rows = memory_table(methods, args.frameworks.split(","), argv_rest)
    if args.out_md:
      with open(args.out_md, "w", encoding="utf-8") as f:
        f.write(header + "\n\n" + MEMORY_HEAD + "\n" + "\n".join(rows) + "\n")
    return 0
  lines = [TABLE_HEAD]
  print("\n" + TABLE_HEAD, flush=True)
  for m in methods:
    r = time_method(m, args)
    lines.append(table_row(r))
    print(lines[-1], flush=True)
    print(f"<!-- {m}: jax {['%.3f' % t for t in r['jax_times']]} torch "
          f"{['%.3f' % t for t in r['torch_times']]} -->", flush=True)
  ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  footer = f"\nProcess RSS high-water mark (getrusage, both frameworks): {ru / 1024:.0f} MiB."
  print(footer, flush=True)
  if args.out_md:
    with open(args.out_md, "w", encoding="utf-8") as f:
      f.write(header + "\n\n" + "\n".join(lines) + "\n" + footer + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
