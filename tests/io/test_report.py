"""dfkd_jax.io.report: loading, grouping, the markdown table, the accuracy plot and the command."""
import json
import os

import numpy as np
import pytest

import helpers
from dfkd_jax.cli import demo
from dfkd_jax.io import report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _distill(method="dafl", seed=0, final=70.0, series=(60.0, 70.0), steps=(50, 100), **extra):
  return {"method": method, "seed": seed, "iterations": steps[-1], "final": final,
          "mu": float(np.mean(series)), "sigma2": float(np.var(series)), "best": max(series),
          "final_teacher_agreement": final + 2.0, "accuracy_series": list(series),
          "eval_steps": list(steps), "train_seconds": 100.0 + 10 * seed, **extra}


def _write(folder, summary):
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, report.SUMMARY), "w", encoding="utf-8") as f:
    json.dump(summary, f)
  return str(folder)


def _row(table, label):
  rows = [ln for ln in table.splitlines() if ln.startswith(f"| {label} |")]
  assert len(rows) == 1, table
  return [cell.strip() for cell in rows[0].strip("|").split("|")]


# ------------------------------------------------------------------------------------ loading


def test_load_runs_skips_folders_without_summary(tmp_path):
  a = _write(tmp_path / "a", _distill())
  (tmp_path / "unfinished").mkdir()
  notes = []
  runs = report.load_runs([a, str(tmp_path / "unfinished"), str(tmp_path / "missing")],
                          warn=notes.append)
  assert [r["run_dir"] for r in runs] == [a]
  assert len(notes) == 2 and "unfinished" in notes[0] and "missing" in notes[1]


def test_load_runs_expands_a_parent_folder_and_accepts_summary_files(tmp_path):
  _write(tmp_path / "runs" / "x", _distill("dafl"))
  _write(tmp_path / "runs" / "y", _distill("dfad"))
  runs = report.load_runs([str(tmp_path / "runs")], warn=pytest.fail)
  assert [r["method"] for r in runs] == ["dafl", "dfad"]
  runs = report.load_runs([str(tmp_path / "runs" / "y" / report.SUMMARY)], warn=pytest.fail)
  assert [r["method"] for r in runs] == ["dfad"]


def test_load_runs_notes_a_corrupt_summary(tmp_path):
  (tmp_path / "bad").mkdir()
  (tmp_path / "bad" / report.SUMMARY).write_text("{not json")
  notes = []
  assert report.load_runs([str(tmp_path / "bad")], warn=notes.append) == []
  assert "unreadable" in notes[0]


# ----------------------------------------------------------------------------------- grouping


def test_group_runs_by_label_else_method_and_guidance():
  runs = [_distill("dafl", 0), _distill("dafl", 1),
          _distill("dafl", 0, guidance="condensed"), _distill("dafl", 0, guidance="none"),
          _distill("dfad", 0, label="DFAD + bn_l2"), _distill("dfad", 1, label="DFAD + bn_l2")]
  groups = report.group_runs(runs)
  assert list(groups) == ["dafl", "dafl+condensed", "DFAD + bn_l2"]
  assert [len(v) for v in groups.values()] == [3, 1, 2]


# -------------------------------------------------------------------------------------- table


def test_markdown_table_mean_std_over_seeds_and_units():
  groups = {"dafl": [_distill(seed=0, final=70.0, replay_bytes=2 * 2 ** 20),
                     _distill(seed=1, final=72.0, replay_bytes=2 * 2 ** 20)]}
  table = report.markdown_table(groups)
  header = table.splitlines()[0]
  for column in ("seeds", "final acc.", "mu", "sigma^2", "test-selected", "teacher agreement",
                 "time (s)", "iterations", "replay memory (MiB)"):
    assert column in header
  row = _row(table, "dafl")
  assert row[1] == "2"
  assert row[2] == "71.00 ± 1.00"  # mean ± population std of 70 and 72
  assert row[3] == "65.00" and row[4] == "25.00" and row[5] == "70.00"
  assert row[6] == "73.00"  # agreement: mean of 72 and 74
  assert row[7] == "105"  # mean of 100 and 110 s
  assert row[8] == "100" and row[9] == "2.00"
  assert len(row) == len(header.strip("|").split("|"))


def test_markdown_table_handles_supervised_runs_and_missing_keys():
  supervised = {"method": "teacher", "test_accuracy": 90.5, "steps": 1404,
                "accuracy_series": [88.0, 90.5], "eval_steps": [468, 936]}
  table = report.markdown_table({"teacher": [supervised], "empty": [{"method": "x"}],
                                 "nan": [_distill(final=float("nan"))]})
  row = _row(table, "teacher")
  assert row[1:3] == ["1", "90.50"] and row[8] == "1404"
  assert row[6] == "-" and row[9] == "-"  # no teacher agreement, no replay memory
  assert _row(table, "empty")[2:] == ["-"] * 8
  assert _row(table, "nan")[2] == "-"  # NaN accuracies are missing, not averaged


def test_demo_table_is_the_report_table():
  rows = [("teacher (real data)", {"final": 90.0, "test_accuracy": 90.0}),
          ("dafl (data-free)", _distill())]
  assert demo.results_table(rows) == report.markdown_table(
      {name: [summary] for name, summary in rows})


# ------------------------------------------------------------------------------------- curves


def test_curve_band_mean_min_max_over_the_union_of_steps():
  runs = [_distill(series=(10.0, 20.0, 30.0), steps=(1, 2, 3)),
          _distill(series=(14.0, 40.0), steps=(1, 3)), {"method": "no series"}]
  steps, mean, low, high = report.curve_band(runs)
  np.testing.assert_array_equal(steps, [1, 2, 3])
  np.testing.assert_allclose(mean, [12.0, 20.0, 35.0])
  np.testing.assert_allclose(low, [10.0, 20.0, 30.0])
  np.testing.assert_allclose(high, [14.0, 20.0, 40.0])
  assert report.curve_band([{"method": "x"}]) is None


def test_plot_groups_writes_a_png_with_one_line_per_group(tmp_path):
  groups = {"a": [_distill(seed=0), _distill(seed=1, series=(50.0, 80.0))],
            "b": [_distill("dfad")], "no curve": [{"method": "x"}]}
  path = tmp_path / "sub" / "plot.png"
  fig = report.plot_groups(groups, str(path), title="t")
  assert path.read_bytes()[:8] == PNG_MAGIC
  ax = fig.axes[0]
  assert [line.get_label() for line in ax.get_lines()] == ["a (n=2)", "b"]
  assert len(ax.collections) == 1  # the min-max band of the 2-seed group only
  np.testing.assert_allclose(ax.get_lines()[0].get_ydata(), [55.0, 75.0])


# ------------------------------------------------------------------------------------ command


def test_command_writes_table_and_plot(tmp_path):
  runs = tmp_path / "runs"
  _write(runs / "dafl_s0", _distill(seed=0, final=70.0))
  _write(runs / "dafl_s1", _distill(seed=1, final=72.0))
  _write(runs / "dfad", _distill("dfad", final=50.0))
  (runs / "unfinished").mkdir()
  out_md = tmp_path / "out" / "report.md"
  proc = helpers.run_cli("dfkd_jax.io.report", *sorted(str(p) for p in runs.iterdir()),
                         "--out_md", str(out_md), "--title", "My runs", timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "| dafl | 2 | 71.00 ± 1.00 |" in proc.stdout and "| dfad | 1 | 50.00 |" in proc.stdout
  assert out_md.read_text(encoding="utf-8").startswith("## My runs\n\n| run |")
  assert "skipped" in proc.stderr and "unfinished" in proc.stderr
  assert (runs / "report.png").read_bytes()[:8] == PNG_MAGIC  # default: next to the runs


def test_command_without_runs_is_a_one_line_error(tmp_path):
  (tmp_path / "empty").mkdir()
  proc = helpers.run_cli("dfkd_jax.io.report", str(tmp_path / "empty"), "--out_png", "",
                         timeout=120)
  assert proc.returncode == 2
  errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
  assert len(errors) == 1 and "no summary.json" in errors[0]
  assert "Traceback" not in proc.stderr
  assert not list(tmp_path.rglob("*.png"))


def test_curve_band_on_the_images_axis_scales_each_run_and_skips_runs_without_it():
  runs = [{"eval_steps": [1, 2], "accuracy_series": [10.0, 20.0], "images_per_iteration": 640},
          {"eval_steps": [5], "accuracy_series": [30.0]}]  # e.g. a supervised run
  steps, mean, _, _ = report.curve_band(runs, x="images")
  np.testing.assert_array_equal(steps, [640, 1280])
  np.testing.assert_array_equal(mean, [10.0, 20.0])
  with pytest.raises(ValueError, match="Unknown x axis"):
    report.curve_band(runs, x="epochs")


def test_runs_of_one_label_with_other_settings_are_not_seeds_of_one_row(tmp_path):
  """Three DAFL variants and a run with another student share the label "dafl": four rows,
  each named by what differs; seeds of one setting still share a row."""
  def run(name, seed, **config):
    folder = tmp_path / name
    folder.mkdir()
    base = {"seed": seed, "label": "dafl", "student": {"model": "lenet5_half_bn"},
            "generator": {"kind": "default"}, "distill": {"log_every": 25}}
    for key, value in config.items():
      section, field = key.split("__")
      base[section][field] = value
    (folder / "config.json").write_text(json.dumps(base))
    return {**_distill("dafl", seed), "label": "dafl", report.RUN_DIR: str(folder)}

  runs = [run("a0", 0), run("a1", 1, distill__log_every=5),  # logging is not a setting
          run("b0", 0, generator__kind="sigmoid"), run("b1", 1, generator__kind="sigmoid"),
          run("c0", 0, student__model="resnet8")]
  groups = report.group_runs(runs)
  assert list(groups) == [
      "dafl [generator.kind=default, student.model=lenet5_half_bn]",
      "dafl [generator.kind=sigmoid, student.model=lenet5_half_bn]",
      "dafl [generator.kind=default, student.model=resnet8]"]
  assert [len(v) for v in groups.values()] == [2, 2, 1]
