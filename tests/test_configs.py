"""Tests of the config files and of the CLI's config handling (no training)."""
import importlib.util
import os

import helpers
import ml_collections
import pytest

_CONFIG_IDS = [os.path.basename(p) for p in helpers.config_files()]


def _import_config_module(path):
  spec = importlib.util.spec_from_file_location(
      "cfg_" + os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_there_are_config_files():
  assert helpers.config_files(), f"no config files in {helpers.CONFIGS_DIR}"


@pytest.mark.parametrize("tiny", [False, True], ids=["full", "tiny"])
@pytest.mark.parametrize("method", helpers.ALL_METHODS)
@pytest.mark.parametrize("path", helpers.config_files(), ids=_CONFIG_IDS)
def test_every_config_loads_with_every_method(path, method, tiny):
  arg = f"method={method}" + (",tiny" if tiny else "")
  config = helpers.load_config(f"{path}:{arg}")
  assert isinstance(config, ml_collections.ConfigDict)
  assert config.method == method
  assert config.batch_size > 0
  for key in ("dataset", "teacher", "student", "optimizer", "num_devices", "seed"):
    assert key in config, f"{path}:{arg} lacks config.{key}"
  if method in helpers.DATA_FREE_METHODS:
    assert config.distill.num_iters > 0
    assert config.distill.batch_size > 0
  if tiny:
    # Tests and notebooks rely on tiny runs being small.
    assert 0 < config.train_limit <= 4096
    assert 0 < config.test_limit <= 4096
    assert 0 < config.num_steps <= 64
    if method in helpers.DATA_FREE_METHODS:
      assert config.distill.num_iters <= 20
  else:
    assert config.train_limit == 0 and config.test_limit == 0


@pytest.mark.parametrize("path", helpers.config_files(), ids=_CONFIG_IDS)
def test_unknown_config_argument_lists_valid_keys(path):
  module = _import_config_module(path)
  with pytest.raises(ValueError, match="Unknown config argument 'bogus'") as e:
    module.get_config("method=teacher,bogus=1")
  for key in ("method", "tiny"):
    assert key in str(e.value)


@pytest.mark.parametrize("path", helpers.config_files(), ids=_CONFIG_IDS)
def test_docstring_commands_parse(path):
  commands = helpers.docstring_commands(path)
  assert commands, f"{path}: no 'python -m dfkd_jax.cli.main' command in its docstring"
  for argv in commands:
    config_flags = [a for a in argv if a.startswith("--config")]
    others = [a for a in argv if not a.startswith("--config")]
    assert all(a.startswith("--workdir=") for a in others), (path, argv)
    assert any(a.startswith("--workdir=") for a in others), f"{path}: {argv} lacks --workdir"
    spec = config_flags[0].split("=", 1)[1]
    config = helpers.load_config(spec, config_flags[1:])
    method = spec.partition(":")[2].partition("method=")[2].split(",")[0]
    assert config.method == method


def test_cli_rejects_unknown_override(tmp_path):
  proc = helpers.run_cli(
      "dfkd_jax.cli.main", f"--config={helpers.TEACHER_CONFIG}:method=teacher,tiny",
      "--config.nonexistent=1", f"--workdir={tmp_path / 'run'}", timeout=120)
  assert proc.returncode != 0
  assert "nonexistent" in proc.stderr
  assert not (tmp_path / "run").exists()


def test_cli_rejects_unknown_method(tmp_path):
  proc = helpers.run_cli(
      "dfkd_jax.cli.main", f"--config={helpers.TEACHER_CONFIG}:method=bogus,tiny",
      f"--workdir={tmp_path / 'run'}", timeout=180)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Unknown method" in proc.stderr
  for method in helpers.ALL_METHODS:
    assert method in proc.stderr, f"valid method {method!r} not listed in: {proc.stderr}"
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("method,paper_term,bn", [("dfad", "adv", 1.0), ("dafl", "oh", 1.0),
                                                  ("pre_dfkd", "oh", 10.0), ("zskt", "adv", 1.0)])
def test_generator_hosts_match_batchnorm_statistics_unless_faithful(method, paper_term, bn):
  default = helpers.load_config(f"{helpers.TEACHER_CONFIG}:method={method}")
  faithful = helpers.load_config(f"{helpers.TEACHER_CONFIG}:method={method},faithful")
  assert default.loss.bn == bn and default.loss[paper_term] == 1.0
  assert faithful.loss.bn == 0.0 and faithful.loss[paper_term] == 1.0
