r"""The Fashion-MNIST results of benchmarks/RESULTS.md: every host method with and without
condensed-sample guidance, the naive-mixing and KD-on-condensed baselines, at one equal budget,
over seeds.

  python benchmarks/fmnist_results.py --teacher runs/demo/teacher --out runs/results \
      [--seeds 0,1,2] [--only base,condensed_ipc10] [--dry_run]
  python -m dfkd_jax.io.report runs/results/*/* --out_md benchmarks/results_fmnist.md \
      --out_png benchmarks/results_fmnist.png

Equal budget (CPU-sized): 160 student updates of 128 synthetic images per run, about 8
evaluations on the full test set. DAFL: 160 fused iterations; DFAD / MB-DFKD / PRE-DFKD: 32
iterations x 5 student steps; DeepInversion: 8 rounds of 100 pixel steps x 20 student steps.
Condensed sets (made with `python -m dfkd_jax.condensation.condense`, see --condensed_dir): DM IPC 1 and
10, few-shot k = 10. Finished runs (summary.json present) are skipped; a killed run resumes.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet5.py")
HOSTS = ("dafl", "dfad", "deepinversion", "mb_dfkd", "pre_dfkd")
SETS = {"ipc1": "fmnist_dm_ipc1.npz", "ipc10": "fmnist_dm_ipc10.npz",
        "fewshot10": "fmnist_fewshot_k10.npz"}


def budget(c) -> None:
  """The equal budget: 160 student updates of 128 images."""
  d = c.distill
  d.batch_size = 128
  if c.method == "dafl":
    d.num_iters, d.eval_every = 160, 20
  elif c.method == "deepinversion":
    d.num_iters, d.student_steps, d.eval_every = 8, 20, 1
    c.deepinversion.iterations = 100
    c.deepinversion.pool_size = 128 * 8
    # the settings of the recorded runs (RESULTS §7), from before the CPU recipe
    c.deepinversion.lr, c.deepinversion.student_jitter = 0.05, 0
    d.unroll = True
  else:
    d.num_iters, d.student_steps, d.eval_every = 32, 5, 4
    c.mb_dfkd.push_every = 4
  d.log_every = d.eval_every
  d.checkpoint_every = d.num_iters // 2


def plan(teacher: str, condensed_dir: str, seeds, only):
  """(group, run name, config arg) triples, in priority order: every group's first seed, then
  the other seeds of the headline groups (hosts, guidance at IPC 10), then the rest."""
  groups = [("base", "none", None), ("condensed_ipc10", "condensed", "ipc10"),
            ("naive_ipc10", "naive", "ipc10"), ("kd_condensed", None, None),
            ("condensed_ipc1", "condensed", "ipc1"),
            ("condensed_fewshot10", "condensed", "fewshot10"),
            ("naive_fewshot10", "naive", "fewshot10")]
  order = [(seeds[0], g) for g in groups[:6]]
  order += [(seed, g) for seed in seeds[1:] for g in groups[:2]]
  order += [(seeds[0], groups[6])] + [(seed, g) for seed in seeds[1:] for g in groups[2:]]
  runs = []
  for seed, (group, mode, s) in order:
    if group == "kd_condensed":
      for name, f in SETS.items():
        runs.append((group, f"kd_condensed_{name}/seed{seed}",
                     f"method=kd_condensed,seed={seed},"
                     f"condensed={os.path.join(condensed_dir, f)}"))
      continue
    for host in HOSTS:
      if mode == "none":
        runs.append((group, f"{host}/seed{seed}", f"method={host},seed={seed}"))
      else:
        path = os.path.join(condensed_dir, SETS[s])
        runs.append((group, f"{host}+{mode}_{s}/seed{seed}",
                     f"method={host},seed={seed},guidance={mode},condensed={path}"))
  runs = [(g, n, f"{a},teacher_workdir={teacher}") for g, n, a in runs]
  return [r for r in runs if not only or r[0] in only]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--teacher", default="runs/demo/teacher")
  parser.add_argument("--condensed_dir", default="runs/condensed")
  parser.add_argument("--out", default="runs/results")
  parser.add_argument("--seeds", default="0,1,2")
  parser.add_argument("--only", default="", help="comma-separated groups (default: all)")
  parser.add_argument("--dry_run", action="store_true")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_compilation_cache_dir",
                    os.path.expanduser("~/.cache/dfkd_jax/jax_results"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  from dfkd_jax.cli import demo  # pylint: disable=g-import-not-at-top
  from dfkd_jax import train  # pylint: disable=g-import-not-at-top
  seeds = [int(s) for s in args.seeds.split(",")]
  runs = plan(args.teacher, args.condensed_dir, seeds, set(filter(None, args.only.split(","))))
  t0 = time.time()
  for i, (group, name, arg) in enumerate(runs):
    workdir = os.path.join(args.out, name)
    if os.path.exists(os.path.join(workdir, "summary.json")):
      continue
    if "condensed=" in arg and not os.path.exists(arg.split("condensed=")[1].split(",")[0]):
      print(f"-- skip {name}: condensed set not built yet", flush=True)
      continue
    print(f"== [{i + 1}/{len(runs)}] {group}: {name}  ({time.time() - t0:.0f} s)", flush=True)
    if args.dry_run:
      continue
    config = demo.load_config(CONFIG, arg)
    if config.method != "kd_condensed":
      budget(config)
    else:
      config.num_steps, config.eval_every = 300, 30
    train.train_and_evaluate(config, workdir)
  print(f"done in {time.time() - t0:.0f} s", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
