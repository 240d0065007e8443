"""benchmarks/compare_runs.py: before/after identity of run folders."""
import json
import os
import sys

import helpers

sys.path.insert(0, os.path.join(helpers.REPO_ROOT, "benchmarks"))
import compare_runs  # noqa: E402  pylint: disable=g-import-not-at-top


def _run(root, name, records, final=50.0):
  d = root / name
  d.mkdir(parents=True)
  (d / "summary.json").write_text(json.dumps({"final": final, "mu": 40.0, "sigma2": 1.0}))
  (d / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")


def test_identical_runs_pass_and_clock_fields_are_ignored(tmp_path):
  _run(tmp_path / "a", "dfad", [{"step": 1, "time": 1.0, "dfad/loss": 0.5}])
  _run(tmp_path / "b", "dfad", [{"step": 1, "time": 9.0, "dfad/loss": 0.5}])
  assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 0


def test_a_changed_metric_is_reported(tmp_path, capsys):
  _run(tmp_path / "a", "dfad", [{"step": 1, "dfad/loss": 0.5}])
  _run(tmp_path / "b", "dfad", [{"step": 1, "dfad/loss": 0.5000001}])
  _run(tmp_path / "a", "only_before", [{"step": 1}])
  assert compare_runs.main([str(tmp_path / "a"), str(tmp_path / "b")]) == 1
  out = capsys.readouterr().out
  assert "| dfad | 50.00 | 50.00 |" in out and out.rstrip().endswith("| NO |")
  assert "only_before" not in out


def test_bad_arguments(tmp_path):
  assert compare_runs.main([str(tmp_path)]) == 2
  assert compare_runs.main([str(tmp_path), str(tmp_path / "missing")]) == 2
