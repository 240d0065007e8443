"""The time-to-accuracy benchmark's bookkeeping (benchmarks/time_to_accuracy.py)."""
import json
import os
import sys

import helpers
import pytest

sys.path.insert(0, os.path.join(helpers.REPO_ROOT, "benchmarks"))
import time_to_accuracy as tta  # noqa: E402  pylint: disable=g-import-not-at-top


def test_accuracy_at_fixed_seconds_is_the_last_evaluation_before_them():
  clock, acc = [30.0, 70.0, 130.0], [50.0, 80.0, 85.0]
  assert tta.at_points(clock, acc, [20, 60, 120, 300]) == {
      "20": None, "60": 50.0, "120": 80.0, "300": 85.0}


def test_time_to_threshold():
  clock, acc = [30.0, 70.0, 130.0], [50.0, 80.0, 85.0]
  assert tta.time_to(clock, acc, 80.0) == 70.0
  assert tta.time_to(clock, acc, 90.0) is None


def test_aggregate_over_seeds_skips_missing_values():
  runs = [{"final": 80.0, "mu": 70.0, "at_seconds": {"60": 50.0}, "time_to": {"84": None}},
          {"final": 82.0, "mu": 72.0, "at_seconds": {"60": None}, "time_to": {"84": None}}]
  out = tta.aggregate(runs, [60], [84.0])
  assert out["final"] == {"mean": 81.0, "std": 1.0, "n": 2}
  assert out["at_seconds"]["60"] == {"mean": 50.0, "std": 0.0, "n": 1}
  assert out["time_to"]["84"] is None


def test_unknown_method_is_a_clear_error(tmp_path, capsys):
  assert tta.main(["--methods", "nope", "--out", str(tmp_path / "r.json")]) == 2
  assert "Unknown method 'nope'" in capsys.readouterr().err


def test_bad_override_is_a_clear_error_before_any_run(tmp_path, capsys):
  teacher = tmp_path / "teacher"
  teacher.mkdir()
  assert tta.main(["--methods", "nayer", "--set", "nayer.g_stepz=3", "--teacher", str(teacher),
                   "--out", str(tmp_path / "r.json")]) == 2
  err = capsys.readouterr().err
  assert "no field 'g_stepz' in nayer" in err and "g_steps" in err
  assert not (tmp_path / "r.json").exists()


def test_overrides_are_typed_by_the_field():
  from dfkd_jax import config_blocks  # pylint: disable=g-import-not-at-top
  config = tta.load_config(tta.CONFIG, "method=nayer", ["nayer.g_steps=3", "loss.bn=2",
                                                       "distill.unroll=false"])
  assert config.nayer.g_steps == 3 and isinstance(config.nayer.g_steps, int)
  assert config.loss.bn == 2.0 and isinstance(config.loss.bn, float)
  assert config.distill.unroll is False
  for bad, match in [("nayer.g_steps", "field.path=value"), ("nope.x=1", "no config block"),
                     ("loss=1", "not a scalar")]:
    with pytest.raises(ValueError, match=match):
      config_blocks.set_dotted(config, bad)


def test_markdown_table_orders_methods_by_final_accuracy():
  def entry(final, n=1):
    return {"summary": {"final": {"mean": final, "std": 0.5, "n": n},
                        "mu": {"mean": final - 5, "std": 0.1, "n": n},
                        "at_seconds": {"60": None}, "time_to": {"84": None}}}
  result = {"points_seconds": [60], "thresholds": [84.0],
            "methods": {"slow": entry(70.0), "good": entry(85.0, n=3)}}
  lines = tta.markdown_table(result).splitlines()
  assert lines[0].startswith("| method | seeds | final")
  assert lines[2].startswith("| good | 3 | 85.00 ± 0.50 | 80.00 ± 0.10 | - | - | - |")
  assert lines[3].startswith("| slow | 1 | 70.00 |")


def test_student_ema_is_recorded_and_gets_its_own_table_row():
  summary = {"seed": 0, "iterations": 3, "final": 80.0, "mu": 70.0, "best": 81.0,
             "eval_clock_seconds": [50.0, 100.0, 150.0], "accuracy_series": [60.0, 81.0, 80.0],
             "ema": {"final": 82.0, "mu": 72.0, "decay": 0.9,
                     "accuracy_series": [55.0, 78.0, 82.0]}}
  config = tta.load_config(tta.CONFIG, "method=dfad,tiny")
  record = tta.run_record(summary, config, [80.0], [60, 120])
  assert record["ema"]["at_seconds"] == {"60": 55.0, "120": 78.0}
  assert record["ema"]["time_to"] == {"80": 150.0} and record["time_to"] == {"80": 100.0}
  agg = tta.aggregate([record, {**record, "ema": {**record["ema"], "final": 84.0}}], [60, 120],
                      [80.0])
  assert agg["ema"]["final"] == {"mean": 83.0, "std": 1.0, "n": 2}
  result = {"points_seconds": [60, 120], "thresholds": [80.0],
            "methods": {"dfad": {"summary": agg, "runs": [record]}}}
  lines = tta.markdown_table(result).splitlines()
  assert lines[2].startswith("| dfad | 2 | 80.00 ± 0.00 |")
  assert lines[3].startswith("| dfad, student EMA | 2 | 83.00 ± 1.00 | 72.00 ± 0.00 |")


def test_memory_against_run_length_is_read_from_the_log(tmp_path):
  records = [{"step": 5, "time": 1.0, "host_rss_mib": 900.5}, {"step": 5, "test/accuracy": 50.0},
             {"step": 10, "time": 2.0, "host_rss_mib": 901.0, "loss": 1.0}]
  (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
  assert tta.rss_series(str(tmp_path)) == {"steps": [5, 10], "mib": [900.5, 901.0]}
  assert tta.rss_series(str(tmp_path / "missing")) is None
  summary = {"seed": 0, "iterations": 10, "final": 50.0, "mu": 50.0, "best": 50.0,
             "host_peak_rss_bytes": 2 ** 30}
  config = tta.load_config(tta.CONFIG, "method=dfad,tiny")
  record = tta.run_record(summary, config, [80.0], [60], str(tmp_path))
  assert record["host_peak_rss_bytes"] == 2 ** 30 and record["rss"]["mib"] == [900.5, 901.0]


def test_readme_blocks_are_regenerated_from_their_result_files(tmp_path):
  doc = tmp_path / "README.md"
  name = "benchmarks/results/tta_lenet5_900s.json"
  doc.write_text(f"intro\n<!-- tta: {name} -->\nstale table\n<!-- /tta -->\noutro\n")
  assert tta.main(["readme", str(doc)]) == 0
  text = doc.read_text()
  assert "stale table" not in text and text.startswith("intro\n") and text.endswith("outro\n")
  assert tta.result_section(os.path.join(helpers.REPO_ROOT, name)) in text
  assert "| fast | 3 |" in text
  doc.write_text("no blocks\n")
  assert tta.main(["readme", str(doc)]) == 1


def test_a_finished_run_of_another_config_is_not_reused(tmp_path):
  config = tta.load_config(tta.CONFIG, "method=zskt,tiny")
  (tmp_path / "summary.json").write_text(json.dumps({"final": 1.0}))
  (tmp_path / "config.json").write_text(config.to_json())
  assert tta._train(config, str(tmp_path)) == {"final": 1.0}  # the same config: reused
  changed = tta.load_config(tta.CONFIG, "method=zskt,tiny", ["loss.bn=0"])
  with pytest.raises(SystemExit, match=r"another config \(loss.bn: 1.0 -> 0.0\)"):
    tta._train(changed, str(tmp_path))


def test_calibration_cache_key_follows_the_config():
  """A changed default (here: an override) changes the fingerprint, so a cached rate of the old
  config is not reused; the same config gives the same fingerprint."""
  a = tta.load_config(tta.CONFIG, "method=deepinversion")
  b = tta.load_config(tta.CONFIG, "method=deepinversion")
  c = tta.load_config(tta.CONFIG, "method=deepinversion", ["deepinversion.iterations=200"])
  assert tta.config_fingerprint(a) == tta.config_fingerprint(b)
  assert tta.config_fingerprint(a) != tta.config_fingerprint(c)


def test_calibration_cache_key_follows_numerics_from_the_environment(monkeypatch):
  """DFKD_UPSAMPLE_CONV changes the run without changing the config: the key must see it."""
  config = tta.load_config(tta.CONFIG, "method=dafl")
  monkeypatch.delenv("DFKD_UPSAMPLE_CONV", raising=False)
  direct = tta.config_fingerprint(config)
  monkeypatch.setenv("DFKD_UPSAMPLE_CONV", "subpixel")
  assert tta.config_fingerprint(config) != direct
  monkeypatch.setenv("DFKD_UPSAMPLE_CONV", "direct")
  assert tta.config_fingerprint(config) == direct
