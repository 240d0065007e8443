r"""Are two sets of runs the same? Compares every run folder present in both (by name).

  python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR

For a restructuring that must not move any number: run the same commands (e.g.
`python -m dfkd_jax.cli.demo --tiny --workdir BEFORE_DIR`) on the old and the new code, then
compare. Prints one markdown row per run: final, μ and σ² of each side, and whether the whole
logged series agree exactly (every metric of metrics.jsonl, losses and evaluations alike, at every
logged step; wall-clock fields are left out). Exits 1 when any run differs.
"""
from __future__ import annotations

import json
import os
import sys

# Fields that measure the machine (time, memory), not the computation.
_CLOCK_WORDS = ("time", "second", "clock", "per_s", "it/s", "eta", "rss")


def logged_series(run_dir: str) -> list[dict]:
  """The metrics.jsonl records of a run without their wall-clock fields."""
  out = []
  with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as f:
    for line in f:
      record = json.loads(line)
      out.append({k: v for k, v in record.items()
                  if not any(w in k.lower() for w in _CLOCK_WORDS)})
  return out


def compare(before: str, after: str) -> tuple[list[str], int]:
  """(markdown rows, number of runs that differ) for the runs present in both folders."""
  rows = ["| run | final before | final after | μ before | μ after | σ² before | σ² after | "
          "all logged metrics identical |", "|---|---|---|---|---|---|---|---|"]
  differ = 0
  for run in sorted(os.listdir(before)):
    paths = [os.path.join(d, run, "summary.json") for d in (before, after)]
    if not all(os.path.exists(p) for p in paths):
      continue
    a, b = (json.load(open(p, encoding="utf-8")) for p in paths)
    same = logged_series(os.path.join(before, run)) == logged_series(os.path.join(after, run))
    differ += not same
    cells = [run] + [f"{s[k]:.2f}" for k in ("final", "mu", "sigma2") for s in (a, b)]
    rows.append("| " + " | ".join(cells) + f" | {'yes' if same else 'NO'} |")
  return rows, differ


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  if len(argv) != 2 or not all(os.path.isdir(d) for d in argv):
    print(__doc__.split("\n\n")[0], file=sys.stderr)
    print("usage: python benchmarks/compare_runs.py BEFORE_DIR AFTER_DIR", file=sys.stderr)
    return 2
  rows, differ = compare(*argv)
  print("\n".join(rows))
  if len(rows) == 2:
    print("No run folder with a summary.json is present in both.", file=sys.stderr)
    return 2
  return 1 if differ else 0


if __name__ == "__main__":
  sys.exit(main())
