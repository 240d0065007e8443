r"""Start-up with and without the persistent compilation cache (dfkd_jax.compile.enable_cache).

For each method: two identical short runs (the method's full config, a few iterations) in fresh
workdirs sharing one empty cache folder. The first compiles and stores its steps; the second
loads them. Records the loop's compile_seconds (compilation + first iteration) and the whole
process's wall time (imports, data, compilation, the iterations, export).

  python benchmarks/compile_cache.py --methods teacher,dafl,dfad,mb_dfkd,fast,nayer \
      --out benchmarks/results/compile_cache.json
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet5.py")


def _run(method, workdir, cache, teacher, iters):
  env = dict(os.environ, DFKD_COMPILE_CACHE=cache, TF_CPP_MIN_LOG_LEVEL="3")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  if method == "teacher":
    flags = [f"--config={CONFIG}:method=teacher", f"--config.num_steps={iters}",
             f"--config.eval_every={iters}"]
  else:
    flags = [f"--config={CONFIG}:method={method},teacher_workdir={teacher}",
             f"--config.distill.num_iters={iters}", f"--config.distill.eval_every={iters}",
             f"--config.distill.log_every={iters}"]
    if method in ("fast", "nayer"):  # a warm-up shorter than the run (its steps compile too)
      flags.append(f"--config.{method}.warmup=1")
  t0 = time.perf_counter()
  p = subprocess.run([sys.executable, "-m", "dfkd_jax.cli.main", *flags, f"--workdir={workdir}"],
                     cwd=ROOT, env=env, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if p.returncode:
    raise SystemExit(f"{method} failed:\n{p.stderr[-2000:]}")
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    s = json.load(f)
  return {"compile_seconds": s["compile_seconds"], "process_seconds": wall}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", default="teacher,dafl,dfad,deepinversion,mb_dfkd,pre_dfkd,"
                      "fast,nayer")
  parser.add_argument("--teacher", default=os.path.join(ROOT, "runs/fashion_mnist_lenet5/teacher"))
  parser.add_argument("--iters", type=int, default=2)
  parser.add_argument("--out", default=None)
  args = parser.parse_args(argv)
  rows = {}
  if args.out and os.path.exists(args.out):  # keep the methods of an earlier call
    with open(args.out, encoding="utf-8") as f:
      rows = json.load(f)["methods"]
  with tempfile.TemporaryDirectory() as tmp:
    for m in args.methods.split(","):
      cache = os.path.join(tmp, m, "cache")
      first = _run(m, os.path.join(tmp, m, "first"), cache, args.teacher, args.iters)
      second = _run(m, os.path.join(tmp, m, "second"), cache, args.teacher, args.iters)
      size = sum(os.path.getsize(os.path.join(cache, f)) for f in os.listdir(cache))
      rows[m] = {"first": first, "second": second, "cache_bytes": size}
      print(f"{m}: compile {first['compile_seconds']:.1f} -> {second['compile_seconds']:.1f} s, "
            f"process {first['process_seconds']:.1f} -> {second['process_seconds']:.1f} s, "
            f"cache {size / 2**20:.1f} MiB", flush=True)
  print("\n| method | compile + first iteration, cold (s) | warm cache (s) | process, cold (s) "
        "| warm (s) | cache (MiB) |\n|---|---|---|---|---|---|")
  for m, r in rows.items():
    print(f"| {m} | {r['first']['compile_seconds']:.1f} | {r['second']['compile_seconds']:.1f} | "
          f"{r['first']['process_seconds']:.1f} | {r['second']['process_seconds']:.1f} | "
          f"{r['cache_bytes'] / 2**20:.1f} |")
  if args.out:
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump({"machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                 "date": datetime.date.today().isoformat(),
                 "command": "python benchmarks/compile_cache.py " + " ".join(argv or sys.argv[1:]),
                 "methods": rows}, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
