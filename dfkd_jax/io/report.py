r"""Compares finished runs: one markdown table and one accuracy plot from their `summary.json`.

  python -m dfkd_jax.io.report runs/demo/* [--out_md F] [--out_png F] [--title T]

Runs are grouped by `summary["label"]` if present, else by `method` (plus `guidance` when it is
set and not "none"), and within a label by their settings (config.json but the seed): the runs of
a group are the seeds of one setting; runs of one label with other settings get rows of their
own, named by the fields that differ. Each table row gives the
final accuracy as mean ± std over seeds and the means of the other numbers. A folder given
without a `summary.json` is skipped with a note, unless its sub-folders hold runs (so
`python -m dfkd_jax.io.report runs/demo` works too).

The functions are pure and importable (notebooks use them): `load_runs`, `group_runs`,
`aggregate`, `markdown_table`, `curve_band`, `plot_groups`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
from typing import Iterable, Sequence

import numpy as np

from dfkd_jax import config_blocks

SUMMARY = "summary.json"
RUN_DIR = "run_dir"  # key added by `load_runs`: the folder the summary came from


def _read_summary(path: str) -> dict:
  with open(path, encoding="utf-8") as f:
    summary = json.load(f)
  if not isinstance(summary, dict):
    raise ValueError(f"{path}: not a JSON object")
  summary[RUN_DIR] = os.path.dirname(path)
  return summary


def load_runs(paths: Iterable[str], warn=None) -> list[dict]:
  """Reads `summary.json` of each run folder in `paths` (in order).

  A path may also be a `summary.json` file, or a folder whose direct sub-folders are runs. Paths
  that hold no run, and unreadable summaries, are skipped with a note to `warn` (default: a
  line on stderr).

  Args:
    paths: run folders.
    warn: `warn(message)` for skipped paths.

  Returns:
    The summaries, each with its folder under the key `"run_dir"`.
  """
  warn = warn or (lambda msg: print(f"note: {msg}", file=sys.stderr))
  runs = []
  for path in paths:
    if os.path.isfile(path) and os.path.basename(path) == SUMMARY:
      candidates = [path]
    elif os.path.isdir(path):
      own = os.path.join(path, SUMMARY)
      if os.path.isfile(own):
        candidates = [own]
      else:
        candidates = sorted(os.path.join(path, d, SUMMARY) for d in os.listdir(path)
                            if os.path.isfile(os.path.join(path, d, SUMMARY)))
        if not candidates:
          warn(f"skipped {path}: no {SUMMARY} (an unfinished or non-run folder)")
    else:
      warn(f"skipped {path}: " + ("not a folder" if os.path.exists(path) else "no such folder"))
      candidates = []
    for summary_path in candidates:
      try:
        runs.append(_read_summary(summary_path))
      except (OSError, ValueError) as e:
        warn(f"skipped {summary_path}: unreadable ({e})")
  return runs


def run_label(summary: dict) -> str:
  """`label`, else `method` (+ `guidance` unless absent or "none"), else the folder name."""
  if summary.get("label"):
    return str(summary["label"])
  method = summary.get("method") or os.path.basename(summary.get(RUN_DIR, "")) or "run"
  guidance = summary.get("guidance")
  if guidance and guidance != "none":
    return f"{method}+{guidance}"
  return str(method)


# Fields that do not make two runs different settings (seeds are what a row averages over).
_NOT_A_SETTING = config_blocks.BOOKKEEPING_FIELDS | {"seed"}


def _setting(summary: dict) -> dict:
  """The run's config (its folder's config.json, flattened) without seeds and bookkeeping; the
  summary's models when there is no config.json."""
  config = {}
  path = os.path.join(summary.get(RUN_DIR, ""), "config.json")
  try:
    with open(path, encoding="utf-8") as f:
      config = config_blocks.flatten(json.load(f))
  except (OSError, ValueError):
    config = {k: summary[k] for k in ("model", "teacher", "student") if k in summary}
  return {k: v for k, v in config.items() if k.rsplit(".", 1)[-1] not in _NOT_A_SETTING}


def group_runs(runs: Sequence[dict]) -> dict[str, list[dict]]:
  """{label: [summaries]} in order of first appearance (see `run_label`).

  Runs that share a label but not their settings (config.json, seeds and bookkeeping aside)
  are not seeds of one row: each setting gets its own row, labelled with the fields in which
  the settings differ (e.g. `dafl [generator.kind=sigmoid]`).
  """
  by_label: dict[str, list[list]] = {}  # label -> [[setting, runs], ...]
  for summary in runs:
    setting = _setting(summary)
    variants = by_label.setdefault(run_label(summary), [])
    for variant in variants:
      if variant[0] == setting:
        variant[1].append(summary)
        break
    else:
      variants.append([setting, [summary]])
  groups: dict[str, list[dict]] = {}
  for label, variants in by_label.items():
    if len(variants) == 1:
      groups[label] = variants[0][1]
      continue
    keys = sorted({k for a in variants for b in variants
                   for k in set(a[0]) | set(b[0]) if a[0].get(k) != b[0].get(k)})
    for setting, members in variants:
      shown = ", ".join(f"{k}={setting.get(k, '-')}" for k in keys[:3])
      more = f", +{len(keys) - 3} more" if len(keys) > 3 else ""
      groups[f"{label} [{shown}{more}]"] = members
  return groups


def _number(value) -> float | None:
  if isinstance(value, bool) or not isinstance(value, (int, float)):
    return None
  return None if math.isnan(value) else float(value)


def _first(summary: dict, *keys: str) -> float | None:
  for key in keys:
    value = _number(summary.get(key))
    if value is not None:
      return value
  return None


# Table quantities: name -> the summary keys that hold it (supervised runs name some differently).
FIELDS = {
    "final": ("final", "test_accuracy"),
    "mu": ("mu",),
    "sigma2": ("sigma2",),
    "best": ("best",),
    "agreement": ("final_teacher_agreement", "teacher_agreement"),
    "train_seconds": ("train_seconds",),
    "iterations": ("iterations", "steps"),
    "replay_bytes": ("replay_bytes",),
}


def aggregate(groups: dict[str, list[dict]]) -> list[dict]:
  """One dict per group: `label`, `seeds`, and for every field of `FIELDS` its mean over the
  runs that have it (None if none has), plus `final_std` (population std over seeds; 0 for one
  seed) and `final_values`."""
  rows = []
  for label, runs in groups.items():
    row = {"label": label, "seeds": len(runs)}
    for name, keys in FIELDS.items():
      values = [v for v in (_first(s, *keys) for s in runs) if v is not None]
      row[name] = float(np.mean(values)) if values else None
      if name == "final":
        row["final_values"] = values
        row["final_std"] = float(np.std(values)) if values else None
    rows.append(row)
  return rows


def _fmt(value, digits: int = 2) -> str:
  return "-" if value is None else f"{value:.{digits}f}"


def markdown_table(groups: dict[str, list[dict]]) -> str:
  """The comparison table, one row per group (missing numbers show as "-")."""
  lines = ["| run | seeds | final acc. (%) | mu (%) | sigma^2 | best, test-selected (%) | "
           "teacher agreement (%) | time (s) | iterations | replay memory (MiB) |",
           "|---|---|---|---|---|---|---|---|---|---|"]
  for r in aggregate(groups):
    final = _fmt(r["final"])
    if r["final"] is not None and len(r["final_values"]) > 1:
      final += f" ± {r['final_std']:.2f}"
    replay = None if r["replay_bytes"] is None else r["replay_bytes"] / 2 ** 20
    lines.append(f"| {r['label']} | {r['seeds']} | {final} | {_fmt(r['mu'])} | "
                 f"{_fmt(r['sigma2'])} | {_fmt(r['best'])} | {_fmt(r['agreement'])} | "
                 f"{_fmt(r['train_seconds'], 0)} | {_fmt(r['iterations'], 0)} | "
                 f"{_fmt(replay)} |")
  return "\n".join(lines)


X_AXES = ("iteration", "images", "seconds")


def curve_band(runs: Sequence[dict], x: str = "iteration"):
  """Accuracy against iteration (or synthetic images seen) over the runs of one group.

  Args:
    runs: the summaries of one group.
    x: "iteration", or "images": iteration x `images_per_iteration` (the student's synthetic
      images; runs without that key are left out), which puts methods with different inner
      loops on one budget axis; or "seconds": the training clock at each evaluation
      (`eval_clock_seconds`, compilation included), rounded to whole seconds, so runs are
      averaged only where their evaluation times coincide (time-to-accuracy runs of one
      method evaluate at the same seconds only by chance: plot them per seed).

  Returns:
    (steps, mean, low, high) as numpy arrays over the sorted union of the runs' `eval_steps`
    (at each step, over the runs evaluated there), or None if no run has a series.
  """
  if x not in X_AXES:
    raise ValueError(f"Unknown x axis {x!r}; valid: {', '.join(X_AXES)}.")
  by_step: dict[int, list[float]] = {}
  for s in runs:
    steps, acc = s.get("eval_steps") or [], s.get("accuracy_series") or []
    if x == "images":
      scale = _number(s.get("images_per_iteration"))
      if scale is None:
        continue
      steps = [t * scale for t in steps]
    elif x == "seconds":
      steps = s.get("eval_clock_seconds") or []
      if len(steps) != len(acc):
        continue
    for step, a in zip(steps, acc):
      if _number(a) is not None:
        by_step.setdefault(int(step), []).append(float(a))
  if not by_step:
    return None
  steps = np.asarray(sorted(by_step))
  values = [by_step[int(t)] for t in steps]
  return (steps, np.asarray([np.mean(v) for v in values]),
          np.asarray([np.min(v) for v in values]), np.asarray([np.max(v) for v in values]))


def plot_groups(groups: dict[str, list[dict]], path: str | None = None, title: str = "",
                x: str = "iteration"):
  """Test accuracy against iteration, one line per group (mean over seeds, min-max shaded).

  Uses a bare matplotlib `Figure` (no pyplot state, any backend), so notebooks can show the
  returned figure inline.

  Args:
    groups: from `group_runs`.
    path: PNG to write (optional).
    title: plot title.
    x: "iteration" or "images" (see `curve_band`).

  Returns:
    The matplotlib Figure.
  """
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top
  fig = Figure(figsize=(6.5, 4), dpi=100)
  ax = fig.subplots()
  plotted = 0
  for label, runs in groups.items():
    band = curve_band(runs, x)
    if band is None:
      continue
    steps, mean, low, high = band
    line, = ax.plot(steps, mean, marker="o", markersize=3,
                    label=f"{label} (n={len(runs)})" if len(runs) > 1 else label)
    if len(runs) > 1:
      ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
    plotted += 1
  if not plotted:
    ax.text(0.5, 0.5, "no accuracy series in these runs", ha="center", va="center",
            transform=ax.transAxes)
  ax.set_xlabel({"iteration": "iteration", "images": "synthetic images seen by the student",
                 "seconds": "training seconds (compilation included)"}[x])
  ax.set_ylabel("test accuracy (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  if plotted:
    ax.legend(fontsize="small")
  fig.tight_layout()
  if path:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp.png"
    fig.savefig(tmp)
    os.replace(tmp, path)
  return fig


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m dfkd_jax.io.report", description=__doc__.split("\n\n")[0],
      epilog="Example: python -m dfkd_jax.io.report runs/demo/* --out_md runs/demo/report.md")
  parser.add_argument("runs", nargs="+", help="run folders (each holding summary.json)")
  parser.add_argument("--out_md", default=None, help="also write the table to this file")
  parser.add_argument("--out_png", default=None,
                      help="accuracy plot (default: report.png in the runs' common parent "
                           "folder; '' for none)")
  parser.add_argument("--title", default="", help="title of the table and the plot")
  parser.add_argument("--x", default="iteration", choices=X_AXES,
                      help="x axis of the plot: outer iteration, or synthetic images seen by "
                           "the student (one budget axis for all methods)")
  args = parser.parse_args(argv)
  runs = load_runs(args.runs)
  if not runs:
    print(f"error: no {SUMMARY} found in the {len(args.runs)} path(s) given "
          f"({' '.join(args.runs[:3])}{' ...' if len(args.runs) > 3 else ''}); pass finished "
          "run folders, e.g. runs/demo/*.", file=sys.stderr)
    return 2
  groups = group_runs(runs)
  table = markdown_table(groups)
  text = (f"## {args.title}\n\n" if args.title else "") + table + "\n"
  print(text, end="")
  try:
    if args.out_md:
      os.makedirs(os.path.dirname(args.out_md) or ".", exist_ok=True)
      with open(args.out_md, "w", encoding="utf-8") as f:
        f.write(text)
      print(f"Wrote {args.out_md}", file=sys.stderr)
    out_png = args.out_png
    if out_png is None:
      parent = os.path.commonpath([os.path.abspath(os.path.dirname(r[RUN_DIR]))
                                   for r in runs])
      out_png = os.path.relpath(os.path.join(parent, "report.png"))
    if out_png:
      plot_groups(groups, out_png, title=args.title, x=args.x)
      print(f"Wrote {out_png}", file=sys.stderr)
  except OSError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0


if __name__ == "__main__":
  sys.exit(main())
