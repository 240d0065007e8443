r"""Time to accuracy: data-free methods under one wall-clock budget, over seeds.

  python benchmarks/time_to_accuracy.py --methods fast,nayer,mb_dfkd --budget 300 --seeds 0 \
      --teacher runs/fashion_mnist_lenet5/teacher --out benchmarks/results/tta_lenet5_300s.json

For each method the schedule is sized to the budget: a short calibration run (cached per method,
config and machine in `<out dir>/rates.json`) measures iterations per second and compile time,
and the run's `distill.num_iters` is set so that training fills the budget (the learning-rate
schedules end with it); `distill.time_budget_s` stops a run that is slower than predicted.
Evaluations (full test set) come every ~`--eval_seconds` of training and do not count against
the budget; the training clock includes compilation. Reported per run: accuracy at the fixed
points (60, 120, 300, 600, 900 s: the last evaluation at or before each), final accuracy, μ
(mean over the run's evaluations), and the first second at which accuracy reached each
`--thresholds` value; per method: mean ± std over seeds. The JSON keeps every run's full
(seconds, accuracy) series; `--plot` draws accuracy against seconds.

The markdown table of result files (for RESULTS.md and the README):

  python benchmarks/time_to_accuracy.py table benchmarks/results/tta_lenet5_300s.json

and the README's result tables, each between `<!-- tta: benchmarks/results/FILE.json -->` and
`<!-- /tta -->`, regenerated in place from the committed files:

  python benchmarks/time_to_accuracy.py readme

(`... plot FILE.json` redraws a file's plot, e.g. after a row was relabelled.)

Runs live in `--workdir/<budget>s/<method>/seed<k>`; a finished run is not repeated, a killed one
resumes. Test accuracy is only reported, never used to choose anything.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet5.py")
POINTS = (60, 120, 300, 600, 900)


def load_config(path: str, arg: str, overrides=()):
  """The config file's `get_config(arg)` with the `--set field.path=value` overrides applied."""
  from dfkd_jax import config_blocks  # pylint: disable=g-import-not-at-top
  from dfkd_jax.cli import demo  # pylint: disable=g-import-not-at-top
  config = demo.load_config(path, arg)
  for item in overrides:
    config_blocks.set_dotted(config, item)
  return config


def machine() -> str:
  return f"{platform.node() or 'host'}: {os.cpu_count()} CPU cores, {platform.machine()}"


def _git_commit() -> str | None:
  try:
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                           check=True, capture_output=True, text=True).stdout.strip()
    return head + ("-dirty" if dirty else "")
  except (OSError, subprocess.CalledProcessError):
    return None


def _train(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, or returns the summary of the finished run there, if that
  run had the same config (a changed default must not be answered with an old run)."""
  from dfkd_jax import train  # pylint: disable=g-import-not-at-top
  from dfkd_jax.train import loop  # pylint: disable=g-import-not-at-top
  path = os.path.join(workdir, "summary.json")
  if os.path.exists(path):
    saved_config = os.path.join(workdir, "config.json")
    if os.path.exists(saved_config):
      with open(saved_config, encoding="utf-8") as f:
        changed = loop.config_differences(json.load(f), json.loads(config.to_json()))
      if changed:
        raise SystemExit(f"time_to_accuracy.py: {workdir} holds a finished run of another "
                         f"config ({'; '.join(changed[:5])}). Use another --workdir or --label, "
                         "or delete that folder to run it again.")
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  return train.train_and_evaluate(config, workdir)


def config_fingerprint(config) -> str:
  """A short hash of the config's content (sorted JSON), and of the numerics the run will use
  when they are not the defaults (a `DFKD_*` environment variable changes them without
  changing the config)."""
  from dfkd_jax import numerics as numerics_lib  # pylint: disable=g-import-not-at-top
  text = json.dumps(json.loads(config.to_json_best_effort()), sort_keys=True)
  chosen = numerics_lib.Numerics.from_config(config)
  if chosen != numerics_lib.Numerics():
    text += json.dumps(chosen.to_dict(), sort_keys=True)
  return hashlib.sha256(text.encode()).hexdigest()[:12]


def calibrate(method: str, args, rates: dict, rates_path: str) -> dict:
  """Iterations/s and compile seconds of `method` at its config (cached in rates.json).

  The cache key carries a fingerprint of the resolved config, so a changed default (or code
  that changes the config) is calibrated afresh instead of sized from a stale rate."""
  config = load_config(args.config, f"method={method},teacher_workdir={args.teacher}"
                       + (f",{args.config_arg}" if args.config_arg else ""), args.set)
  key = f"{method}|{args.config_arg}|{os.path.basename(args.config)}|{machine()}"
  if args.set:
    key += "|" + ";".join(args.set)
  key += "|config " + config_fingerprint(config)
  if key in rates and rates[key].get("calibration_iterations", 0) >= args.calibrate_iters:
    return rates[key]
  d = config.distill
  if method in config and "warmup" in config[method]:
    config[method].warmup = 0  # time full iterations (synthesis and student steps)
  d.num_iters = args.calibrate_iters
  # evaluations at a third and at the end: the steady rate is taken between them, so the
  # compilation and the first iterations' transients do not enter it
  d.eval_every = d.log_every = max(1, d.num_iters // 3)
  d.checkpoint_every = d.num_iters
  d.save_images = False
  workdir = os.path.join(args.workdir, "calibrate", method)
  if os.path.exists(workdir):
    import shutil  # pylint: disable=g-import-not-at-top
    shutil.rmtree(workdir)
  print(f"== calibrating {method} ({d.num_iters} iterations)", flush=True)
  s = _train(config, workdir)
  # From the training clock at the evaluations (evaluation and checkpointing excluded): the
  # iterations between the first and the last evaluation are steady-state iterations.
  steps, clock = s["eval_steps"], s["eval_clock_seconds"]
  if len(steps) >= 2 and clock[-1] > clock[0]:
    ips = (steps[-1] - steps[0]) / (clock[-1] - clock[0])
  else:  # too few iterations asked: everything after the compiling first one
    ips = (s["iterations"] - 1) / max(s["clock_seconds"] - s["compile_seconds"], 1e-6)
  rate = {"iterations_per_second": ips,
          "compile_seconds": s["compile_seconds"], "calibration_iterations": s["iterations"]}
  rates[key] = rate
  with open(rates_path, "w", encoding="utf-8") as f:
    json.dump(rates, f, indent=2)
  return rate


def sized_config(method: str, seed: int, args, rate: dict):
  """The method's config with num_iters filling the budget and evaluations every ~eval_seconds."""
  config = load_config(args.config, f"method={method},seed={seed},teacher_workdir={args.teacher}"
                       + (f",{args.config_arg}" if args.config_arg else ""), args.set)
  d = config.distill
  default_iters = max(d.num_iters, 1)  # the config's own schedule length
  ips = rate["iterations_per_second"]
  train_s = max(args.budget - rate["compile_seconds"], 0.2 * args.budget)
  d.num_iters = max(2, int(train_s * ips * args.fill))
  if method in config and "warmup" in config[method]:
    # keep the warm-up's share of the default schedule, and the pool per iteration
    block = config[method]
    block.warmup = max(1, int(round(block.warmup / default_iters * d.num_iters)))
    if "pool_size" in block:
      block.pool_size = max(block.pool_size // default_iters * d.num_iters, d.batch_size * 2)
  d.eval_every = max(1, int(round(args.eval_seconds * ips)))
  d.log_every = d.eval_every
  d.checkpoint_every = max(d.eval_every, d.num_iters // 4)
  d.time_budget_s = float(args.budget) * args.hard_stop
  if method == "mb_dfkd":
    config.mb_dfkd.push_every = max(1, min(config.mb_dfkd.push_every, d.num_iters // 10))
  return config


def at_points(clock, acc, points) -> dict:
  """Accuracy of the last evaluation at or before each point (None before the first)."""
  out = {}
  for p in points:
    seen = [a for t, a in zip(clock, acc) if t <= p]
    out[str(p)] = seen[-1] if seen else None
  return out


def time_to(clock, acc, threshold: float):
  for t, a in zip(clock, acc):
    if a >= threshold:
      return t
  return None


def rss_series(workdir: str | None) -> dict | None:
  """(steps, host RSS in MiB) logged in the run's metrics.jsonl: memory against run length."""
  path = os.path.join(workdir or "", "metrics.jsonl")
  if not workdir or not os.path.exists(path):
    return None
  steps, mib = [], []
  with open(path, encoding="utf-8") as f:
    for line in f:
      r = json.loads(line)
      if "host_rss_mib" in r and (not steps or r["step"] > steps[-1]):
        steps.append(r["step"])
        mib.append(r["host_rss_mib"])
  return {"steps": steps, "mib": mib} if steps else None


def run_record(summary: dict, config, thresholds, points, workdir: str | None = None) -> dict:
  clock, acc = summary.get("eval_clock_seconds") or [], summary.get("accuracy_series") or []
  return {
      "seed": summary["seed"], "num_iters_planned": config.distill.num_iters,
      "iterations": summary["iterations"], "final": summary["final"], "mu": summary["mu"],
      "best_test_selected": summary["best"], "clock_seconds": summary.get("clock_seconds"),
      "compile_seconds": summary.get("compile_seconds"),
      "stopped_by_time_budget": summary.get("stopped_by_time_budget"),
      "at_seconds": at_points(clock, acc, points),
      "time_to": {f"{t:g}": time_to(clock, acc, t) for t in thresholds},
      "series": {"seconds": clock, "accuracy": acc},
      "host_peak_rss_bytes": summary.get("host_peak_rss_bytes"),
      "rss": rss_series(workdir),
      **({"ema": {"final": summary["ema"]["final"], "mu": summary["ema"]["mu"],
                  "decay": summary["ema"]["decay"],
                  "at_seconds": at_points(clock, summary["ema"]["accuracy_series"], points),
                  "time_to": {f"{t:g}": time_to(clock, summary["ema"]["accuracy_series"], t)
                              for t in thresholds},
                  "accuracy": summary["ema"]["accuracy_series"]}}
         if summary.get("ema") else {}),
  }


def aggregate(records: list[dict], points, thresholds) -> dict:
  def stats(values):
    v = [x for x in values if x is not None]
    if not v:
      return None
    return {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)}

  ema = [r["ema"] for r in records if r.get("ema")]
  return {"final": stats([r["final"] for r in records]), "mu": stats([r["mu"] for r in records]),
          **({"ema": {"final": stats([e["final"] for e in ema]),
                      "mu": stats([e["mu"] for e in ema]),
                      "at_seconds": {str(p): stats([e["at_seconds"][str(p)] for e in ema])
                                     for p in points},
                      "time_to": {f"{t:g}": stats([e["time_to"][f"{t:g}"] for e in ema])
                                  for t in thresholds}}} if ema else {}),
          "at_seconds": {str(p): stats([r["at_seconds"][str(p)] for r in records])
                         for p in points},
          "time_to": {f"{t:g}": stats([r["time_to"][f"{t:g}"] for r in records])
                      for t in thresholds}}


def plot(result: dict, path: str) -> None:
  """Accuracy against training seconds: one colour per method, one line per seed."""
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6.5, 4), dpi=100)
  ax = fig.subplots()
  for i, (method, entry) in enumerate(result["methods"].items()):
    color = f"C{i % 10}"
    for j, r in enumerate(entry["runs"]):
      s = r["series"]
      fin = entry["summary"]["final"]
      label = (f"{method} ({fin['mean']:.1f} ± {fin['std']:.1f}, n={fin['n']})"
               if j == 0 and fin else None)
      ax.plot(s["seconds"], s["accuracy"], color=color, marker="o", markersize=2,
              linewidth=1, alpha=0.85, label=label)
  teacher = result.get("teacher_accuracy")
  if teacher:
    ax.axhline(teacher, color="k", linestyle="--", linewidth=0.8, label=f"teacher {teacher:.2f}")
  ax.set_xlabel("training seconds (compilation included)")
  ax.set_ylabel("test accuracy (%)")
  ax.set_ylim(0, 100)
  ax.set_title(f"time to accuracy, {result['budget_seconds']} s budget ({result['machine']})",
               fontsize="small")
  ax.grid(alpha=0.3)
  ax.legend(fontsize="x-small", loc="lower right")
  fig.tight_layout()
  fig.savefig(path)


def _fmt(stat, digits=2) -> str:
  if not stat:
    return "-"
  if stat["n"] > 1:
    return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
  return f"{stat['mean']:.{digits}f}"


def markdown_table(result: dict) -> str:
  """One row per method: final, μ, accuracy at the fixed seconds, seconds to each threshold."""
  points, thresholds = result["points_seconds"], result["thresholds"]
  head = (["method", "seeds", "final (%)", "μ (%)", "training s used"]
          + [f"at {p} s" for p in points]
          + [f"s to {t:g} %" for t in thresholds])
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  order = sorted(result["methods"].items(),
                 key=lambda kv: -((kv[1]["summary"]["final"] or {}).get("mean") or 0))
  for m, entry in order:
    used = [r["clock_seconds"] for r in entry.get("runs", []) if r.get("clock_seconds")]
    used = f"{np.mean(used):.0f} ({min(used):.0f}-{max(used):.0f})" if used else "-"
    s = entry["summary"]
    rows.append(_table_row(m, s, used, points, thresholds))
    if s.get("ema"):  # the same runs' student weight average (docs/methods.md §13)
      rows.append(_table_row(f"{m}, student EMA", s["ema"], used, points, thresholds))
  return "\n".join(rows)


def _table_row(name, s, used, points, thresholds) -> str:
  n = (s["final"] or {}).get("n", 0)
  cells = [name, str(n), _fmt(s["final"]), _fmt(s["mu"]), used]
  cells += [_fmt(s["at_seconds"][str(p)], 1) for p in points]
  for t in thresholds:
    st = s["time_to"][f"{t:g}"]
    cells.append("-" if not st else (f"{st['mean']:.0f}" + (f" ({st['n']}/{n})"
                                                            if st["n"] < n else "")))
  return "| " + " | ".join(cells) + " |"


def result_section(path: str) -> str:
  """The commands (with date and commit) and the markdown table of one result file."""
  with open(path, encoding="utf-8") as f:
    result = json.load(f)
  lines = [f"Budget {result['budget_seconds']} s of training per run (schedules sized by a "
           f"calibration run; 'training s used' is what the runs took), {result['machine']}; "
           f"teacher {result.get('teacher_accuracy')} %. Commands (date, commit):"]
  for m, e in result["methods"].items():
    lines.append(f"- {m}: `{e.get('command', result['command'])}` "
                 f"({e.get('date', result['date'])}, {e.get('commit', result['commit'])})")
  return "\n".join(lines) + "\n\n" + markdown_table(result)


BLOCK_RE = re.compile(r"(<!-- tta: (?P<path>\S+) -->\n)(?P<body>.*?)(<!-- /tta -->)", re.S)


def refresh_blocks(path: str) -> int:
  """Rewrites every `<!-- tta: FILE.json -->` ... `<!-- /tta -->` block of the markdown file
  `path` with `result_section(FILE.json)` (FILE relative to the repository root); returns the
  number of blocks. The prose around the blocks is left alone."""
  with open(path, encoding="utf-8") as f:
    text = f.read()
  count = 0

  def body(m):
    nonlocal count
    count += 1
    return m.group(1) + result_section(os.path.join(ROOT, m.group("path"))) + "\n" + m.group(4)

  text = BLOCK_RE.sub(body, text)
  with open(path, "w", encoding="utf-8") as f:
    f.write(text)
  return count


def main(argv=None) -> int:
  if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
  from dfkd_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  compile_lib.memory_scheduler()  # as the command lines do, before JAX starts its backends
  if argv is None:
    argv = sys.argv[1:]
  if argv and argv[0] == "table":
    # python benchmarks/time_to_accuracy.py table <result.json> ...: the markdown tables
    for path in argv[1:]:
      print(result_section(path) + "\n")
    return 0
  if argv and argv[0] == "plot":
    # python benchmarks/time_to_accuracy.py plot <result.json> ...: redraw the .png next to each
    for path in argv[1:]:
      with open(path, encoding="utf-8") as f:
        plot(json.load(f), os.path.splitext(path)[0] + ".png")
    return 0
  if argv and argv[0] == "readme":
    # python benchmarks/time_to_accuracy.py readme [README.md]: refresh its result blocks
    path = argv[1] if len(argv) > 1 else os.path.join(ROOT, "README.md")
    n = refresh_blocks(path)
    print(f"{path}: {n} result block(s) regenerated")
    return 0 if n else 1
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--methods", required=True, help="comma-separated data-free methods")
  parser.add_argument("--budget", type=int, default=300, help="training seconds per run")
  parser.add_argument("--seeds", default="0")
  parser.add_argument("--teacher", default="runs/fashion_mnist_lenet5/teacher")
  parser.add_argument("--config", default=CONFIG)
  parser.add_argument("--config_arg", default="", help="extra config arguments (k=v,...)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="config override, e.g. --set nayer.g_steps=5 (repeatable)")
  parser.add_argument("--label", default="",
                      help="suffix of the methods' names in the JSON and run folders (variants)")
  parser.add_argument("--workdir", default="runs/tta")
  parser.add_argument("--out", required=True, help="JSON result file")
  parser.add_argument("--plot", default=None, help="PNG (default: the --out path with .png)")
  parser.add_argument("--eval_seconds", type=float, default=20.0)
  parser.add_argument("--calibrate_iters", type=int, default=12)
  parser.add_argument("--fill", type=float, default=0.95,
                      help="fraction of the predicted iterations to plan (headroom)")
  parser.add_argument("--hard_stop", type=float, default=1.1,
                      help="stop a run at this multiple of the budget")
  parser.add_argument("--thresholds", default="80,84,87")
  args = parser.parse_args(argv)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.set_verbosity(logging.WARNING)
  sys.path.insert(0, ROOT)
  from dfkd_jax import methods as methods_lib  # pylint: disable=g-import-not-at-top
  names = [m for m in args.methods.split(",") if m]
  for m in names:
    try:
      methods_lib.check_method(m)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  if not os.path.exists(os.path.join(args.teacher, "model.json")) and not os.path.isdir(
      args.teacher):
    print(f"error: no teacher in {args.teacher}; train one with `python -m dfkd_jax.cli.main "
          f"--config={os.path.relpath(args.config, ROOT)}:method=teacher "
          f"--workdir={args.teacher}`.", file=sys.stderr)
    return 2
  seeds = [int(s) for s in args.seeds.split(",")]
  thresholds = [float(t) for t in args.thresholds.split(",")]
  points = [p for p in POINTS if p <= args.budget * args.hard_stop] or [args.budget]
  out_dir = os.path.dirname(os.path.abspath(args.out))
  os.makedirs(out_dir, exist_ok=True)
  rates_path = os.path.join(out_dir, "rates.json")
  rates = {}
  if os.path.exists(rates_path):
    with open(rates_path, encoding="utf-8") as f:
      rates = json.load(f)
  result = {"budget_seconds": args.budget, "machine": machine(),
            "date": datetime.date.today().isoformat(), "commit": _git_commit(),
            "command": "python benchmarks/time_to_accuracy.py " + " ".join(argv),
            "protocol": __doc__.split("\n\n")[1].replace("\n", " "),
            "points_seconds": points, "thresholds": thresholds, "methods": {}}
  if os.path.exists(args.out):  # keep the methods of an earlier call (one file per budget)
    with open(args.out, encoding="utf-8") as f:
      result["methods"] = json.load(f).get("methods", {})
  for m in names:  # a bad --set fails here, before any run
    try:
      load_config(args.config, f"method={m},teacher_workdir={args.teacher}"
                  + (f",{args.config_arg}" if args.config_arg else ""), args.set)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  t0 = time.time()
  for m in names:
    name = m + args.label
    commit = _git_commit()  # per method: a file may collect methods from several calls
    rate = calibrate(m, args, rates, rates_path)
    records = []
    for seed in seeds:
      config = sized_config(m, seed, args, rate)
      workdir = os.path.join(args.workdir, f"{args.budget}s", name, f"seed{seed}")
      print(f"== {name} seed {seed}: {config.distill.num_iters} iterations planned for "
            f"{args.budget} s", flush=True)
      summary = _train(config, workdir)
      result["teacher_accuracy"] = summary.get("teacher_accuracy")
      records.append(run_record(summary, config, thresholds, points, workdir))
    result["methods"][name] = {"runs": records,
                               "summary": aggregate(records, points, thresholds),
                               "rate": rate, "commit": commit, "overrides": list(args.set),
                               "date": datetime.date.today().isoformat(),
                               "command": result["command"]}
    with open(args.out, "w", encoding="utf-8") as f:
      json.dump(result, f, indent=1)
    plot(result, args.plot or os.path.splitext(args.out)[0] + ".png")
    fin = result["methods"][name]["summary"]["final"]
    print(f"== {name}: final {fin['mean']:.2f} ± {fin['std']:.2f} over {fin['n']} seed(s) "
          f"({time.time() - t0:.0f} s so far); wrote {args.out}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
