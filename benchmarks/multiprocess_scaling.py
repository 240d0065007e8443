r"""Step time of one run split over 1, 2 and 4 local processes at a fixed global batch.

  python benchmarks/multiprocess_scaling.py --out benchmarks/results/multiprocess_scaling.json

Each configuration is the same data-free run (default: DFAD, LeNet-5-BN -> LeNet-5-half-BN,
global batch 128) on 4 fake CPU devices in all: 1 process x 4 devices, 2 x 2 and 4 x 1, launched
with `dfkd_jax.cli.launch_local`. Reported from process 0's summary.json: steady iterations per
second (compilation excluded), compile seconds, and the ratio to the single process, i.e. the
cost of the cross-process collectives (gloo) on this machine. The configurations run one after
another, in the order given, `--repeats` times (alternating), and the median is kept.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from benchmarks.time_to_accuracy import machine, _git_commit  # noqa: E402  pylint: disable=wrong-import-position
from dfkd_jax.cli import launch_local  # noqa: E402  pylint: disable=wrong-import-position


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--method", default="dfad")
  parser.add_argument("--teacher", default="runs/fashion_mnist_lenet5/teacher")
  parser.add_argument("--iterations", type=int, default=30)
  parser.add_argument("--layouts", default="1x4,2x2,4x1", help="processes x devices, ...")
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument("--out", required=True)
  args = parser.parse_args(argv)
  layouts = [tuple(int(v) for v in item.split("x")) for item in args.layouts.split(",")]
  rates = {lay: [] for lay in layouts}
  compiles = {lay: [] for lay in layouts}
  with tempfile.TemporaryDirectory(prefix="dfkd_mp_") as tmp:
    for r in range(args.repeats):
      for procs, devs in layouts:
        workdir = os.path.join(tmp, f"{procs}x{devs}_{r}")
        cli = [f"--config=fashion_mnist_lenet5:method={args.method},teacher_workdir="
               f"{os.path.abspath(args.teacher)}", f"--workdir={workdir}",
               f"--config.distill.num_iters={args.iterations}",
               f"--config.distill.eval_every={args.iterations}",
               f"--config.distill.log_every={max(1, args.iterations // 3)}",
               f"--config.distill.checkpoint_every={args.iterations}",
               "--config.distill.save_images=false"]
        results = launch_local.wait(launch_local.start(cli, procs, devs, cwd=ROOT), timeout=1800)
        bad = [(i, rc, err[-800:]) for i, (rc, _, err) in enumerate(results) if rc]
        if bad:
          print(f"error: {procs}x{devs} failed: {bad}", file=sys.stderr)
          return 1
        with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
          s = json.load(f)
        rates[(procs, devs)].append(s["iterations_per_second"])
        compiles[(procs, devs)].append(s["compile_seconds"])
        print(f"{procs} process(es) x {devs} device(s): {s['iterations_per_second']:.3f} it/s, "
              f"compile {s['compile_seconds']:.1f} s", flush=True)
  base = statistics.median(rates[layouts[0]])
  rows = [{"processes": p, "devices_per_process": d,
           "iterations_per_second": statistics.median(rates[(p, d)]),
           "all_rates": rates[(p, d)], "compile_seconds": statistics.median(compiles[(p, d)]),
           "relative_to_first": statistics.median(rates[(p, d)]) / base} for p, d in layouts]
  out = {"method": args.method, "iterations": args.iterations, "machine": machine(),
         "date": datetime.date.today().isoformat(), "commit": _git_commit(),
         "command": "python benchmarks/multiprocess_scaling.py " + " ".join(
             argv if argv is not None else sys.argv[1:]), "rows": rows}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(out, f, indent=1)
  print("| processes x devices | it/s (median) | vs first | compile (s) |\n|---|---|---|---|")
  for row in rows:
    print(f"| {row['processes']} x {row['devices_per_process']} | "
          f"{row['iterations_per_second']:.3f} | {row['relative_to_first']:.2f} | "
          f"{row['compile_seconds']:.1f} |")
  return 0


if __name__ == "__main__":
  sys.exit(main())
