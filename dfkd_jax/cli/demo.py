r"""The README's main job: train a Fashion-MNIST teacher, the real-data bounds, then distil a
student data-free with every method, and print one results table.

  python -m dfkd_jax.cli.demo --workdir runs/demo [--methods dafl,dfad] [--tiny]

Each run lives in its own folder under --workdir and is resumed if interrupted (re-run the same
command); finished runs are not repeated.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

from dfkd_jax import cli
from dfkd_jax import methods
from dfkd_jax.io import files
from dfkd_jax.io import report

# Every data-free method, in the registry's order (the best measured first).
DEFAULT_METHODS = tuple(methods.METHODS)
CONFIG = os.path.join(cli.CONFIGS_DIR, "fashion_mnist_lenet5.py")


def load_config(path: str, arg: str):
  """Loads `get_config(arg)` from a config file path (as `--config=path:arg` does)."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  path = cli.resolve_config(path)  # a shipped config's bare name works too
  spec = importlib.util.spec_from_file_location("dfkd_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


def _run(name: str, arg: str, workdir: str, config_path: str, overrides=None) -> dict:
  from dfkd_jax import train  # pylint: disable=g-import-not-at-top
  summary_path = os.path.join(workdir, "summary.json")
  if os.path.exists(summary_path):
    print(f"== {name}: already done ({summary_path})", flush=True)
    with open(summary_path, encoding="utf-8") as f:
      return json.load(f)
  print(f"== {name}", flush=True)
  config = load_config(config_path, arg)
  for k, v in (overrides or {}).items():
    config[k] = v
  return train.train_and_evaluate(config, workdir)


def results_table(rows: list[tuple[str, dict]]) -> str:
  """Markdown table of `(name, summary)` rows: `dfkd_jax.io.report.markdown_table`, one run each."""
  return report.markdown_table({name: [summary] for name, summary in rows})


def main(argv=None) -> int:
  from dfkd_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  compile_lib.memory_scheduler()  # before JAX starts its backends
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--workdir", default=None,
                      help="default runs/demo (runs/demo_tiny with --tiny)")
  parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
  parser.add_argument("--config", default=CONFIG)
  parser.add_argument("--tiny", action="store_true", help="a few steps per run (smoke test)")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  tiny = ",tiny" if args.tiny else ""
  args.workdir = args.workdir or ("runs/demo_tiny" if args.tiny else "runs/demo")
  t0 = time.time()
  teacher_dir = os.path.join(args.workdir, "teacher")
  rows = []
  try:
    rows.append(("teacher (real data)", _run("teacher", "method=teacher" + tiny, teacher_dir,
                                             args.config)))
    rows.append(("student from scratch (real data, upper bound)", _run(
        "scratch", "method=scratch" + tiny, os.path.join(args.workdir, "scratch"), args.config)))
    rows.append(("student KD on real data (upper bound)", _run(
        "kd_real", f"method=kd_real,teacher_workdir={teacher_dir}" + tiny,
        os.path.join(args.workdir, "kd_real"), args.config)))
    for m in filter(None, args.methods.split(",")):
      rows.append((f"{m} (data-free)", _run(
          m, f"method={m},teacher_workdir={teacher_dir}" + tiny,
          os.path.join(args.workdir, m), args.config)))
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  table = results_table(rows)
  files.write_atomic(os.path.join(args.workdir, "results.md"), table + "\n")
  print(f"\nResults (Fashion-MNIST, {rows[0][1].get('model', 'teacher')} teacher; "
        f"total {time.time() - t0:.0f} s; run folders in {args.workdir}):\n")
  print(table)
  return 0


if __name__ == "__main__":
  sys.exit(main())
