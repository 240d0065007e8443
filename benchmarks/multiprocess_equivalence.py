r"""Per-step agreement of a tiny teacher run by 2 processes x 2 devices and by 1 process x 4
devices (the numbers of benchmarks/RESULTS.md §11), for both data placements.

  python benchmarks/multiprocess_equivalence.py [--steps 8]

Prints, per logged step, the largest relative difference of the logged losses and the test
accuracies of both runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from dfkd_jax.cli import launch_local  # pylint: disable=wrong-import-position

CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet5.py")


def _run(workdir, num_processes, devices, placement, steps):
  procs = launch_local.start(
      [f"--config={CONFIG}:method=teacher,tiny", f"--workdir={workdir}",
       "--config.log_every=1", f"--config.num_steps={steps}", f"--config.eval_every={steps}",
       f"--config.data_placement={placement}"], num_processes, devices, 30, cwd=ROOT)
  results = launch_local.wait(procs, 900)
  if any(rc for rc, _, _ in results):
    raise SystemExit("a run failed:\n" + "\n".join(err[-1500:] for _, _, err in results))
  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    return [json.loads(line) for line in f]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--steps", type=int, default=8)
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    for placement in ("replicated", "sharded"):
      one = _run(os.path.join(tmp, placement, "one"), 1, 4, placement, args.steps)
      two = _run(os.path.join(tmp, placement, "two"), 2, 2, placement, args.steps)
      print(f"data_placement={placement}: 1 x 4 against 2 x 2")
      for a, b in zip(one, two):
        if "loss" in a:
          rel = max(abs(a[k] - b[k]) / max(abs(a[k]), 1e-12) for k in ("loss", "ce"))
          print(f"  step {a['step']}: loss {a['loss']:.7f} / {b['loss']:.7f}, largest "
                f"relative difference {rel:.1e}")
        if "test/accuracy" in a:
          print(f"  step {a['step']}: test accuracy {a['test/accuracy']:.2f} / "
                f"{b['test/accuracy']:.2f} %")
  return 0


if __name__ == "__main__":
  sys.exit(main())
