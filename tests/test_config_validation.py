"""Every config field's range is checked once, up front (`config_blocks.validate`, called by
`train.train_and_evaluate` before anything is written); booleans must be booleans."""
import copy
import importlib.util
import os
import re
import subprocess

import ml_collections
import pytest

import helpers
from dfkd_jax import config_blocks
from dfkd_jax import methods
from dfkd_jax import train


def _config_module(name):
  spec = importlib.util.spec_from_file_location("validation_cfg_" + name[:-3],
                                                os.path.join(helpers.CONFIGS_DIR, name))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("name", ["fashion_mnist_lenet5.py", "fashion_mnist_resnet20.py"])
def test_every_shipped_config_is_valid(name):
  module = _config_module(name)
  for method in methods.ALL_METHODS:
    for extra in ("", ",tiny"):
      if method == "kd_condensed":
        extra += ",condensed=set.npz"  # the file is read only when the run starts
      config_blocks.validate(module.get_config(f"method={method}{extra}"))


# (method, dotted field, bad value, what the message must say)
BAD = [
    ("dfad", "distill.num_iters", 0, "> 0"),
    ("dfad", "distill.num_iters", -5, "> 0"),
    ("dfad", "distill.batch_size", -128, "> 0"),
    ("dfad", "distill.latent_dim", 0, "> 0"),
    ("dfad", "distill.student_steps", 0, "> 0"),
    ("dfad", "distill.log_every", 0, "> 0"),
    ("dfad", "distill.eval_every", 0, "> 0"),
    ("dfad", "distill.checkpoint_every", 0, "> 0"),
    ("dfad", "distill.time_budget_s", -1.0, ">= 0"),
    ("dfad", "distill.student_ema", 1.0, "in [0, 1)"),
    ("dfad", "max_to_keep", 0, "> 0"),
    ("dfad", "optimizer.lr", -1.0, "> 0"),
    ("dfad", "optimizer.lr", float("nan"), "> 0"),
    ("dfad", "optimizer.momentum", 1.5, "in [0, 1)"),
    ("dfad", "optimizer.weight_decay", -1e-4, ">= 0"),
    ("dfad", "gen_optimizer.b1", 1.0, "in [0, 1)"),
    ("dfad", "generator.ngf", 0, "> 0"),
    ("dfad", "loss.bn", -1.0, ">= 0"),
    ("dfad", "loss.kd_temperature", 0.0, "> 0"),
    ("dfad", "num_devices", -1, ">= 0"),
    ("dfad", "test_limit", -1, ">= 0"),
    ("dfad", "condensed.batch", 0, "> 0"),
    ("mb_dfkd", "mb_dfkd.slots", 0, "> 0"),
    ("nayer", "nayer.g_steps", 0, "> 0"),
    ("nayer", "nayer.warmup", -1, ">= 0"),
    ("fast", "fast.k", 0, "> 0"),
    ("deepinversion", "deepinversion.iterations", 0, "> 0"),
    ("deepinversion", "deepinversion.student_jitter", -1, ">= 0"),
    ("pre_dfkd", "pre_dfkd.vae_steps", -1, ">= 0"),
    ("teacher", "batch_size", 0, "> 0"),
    ("teacher", "num_epochs", 0, "> 0"),
    ("teacher", "num_steps", -5, ">= 0"),
]


@pytest.mark.parametrize("method,field,value,must", BAD)
def test_out_of_range_values_are_one_clear_error(method, field, value, must, tmp_path):
  config = _config_module("fashion_mnist_lenet5.py").get_config(f"method={method},tiny")
  node = config
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  node[leaf] = value
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=r"Invalid config: .*") as e:
    train.train_and_evaluate(config, str(workdir))
  assert f"{field}={value!r} (must be {must})" in str(e.value)
  assert not workdir.exists()  # nothing written


def test_several_bad_fields_are_named_together():
  config = _config_module("fashion_mnist_lenet5.py").get_config("method=dfad,tiny")
  config.distill.num_iters, config.optimizer.lr = 0, -1.0
  with pytest.raises(ValueError, match=r"distill.num_iters=0 .*optimizer.lr=-1.0"):
    config_blocks.validate(config)


@pytest.mark.parametrize("text,value", [("true", True), ("True", True), ("1", True),
                                        ("yes", True), ("false", False), ("0", False),
                                        ("no", False), ("off", False)])
def test_booleans_parse(text, value):
  assert config_blocks.parse_bool(text, "tiny") is value


@pytest.mark.parametrize("text", ["ture", "flase", "", "2", "y"])
def test_a_boolean_typo_is_an_error_not_false(text):
  with pytest.raises(ValueError, match=r"is not a boolean"):
    config_blocks.parse_bool(text, "tiny")
  config = _config_module("fashion_mnist_lenet5.py").get_config("method=dfad")
  with pytest.raises(ValueError, match=r"is not a boolean"):
    config_blocks.set_dotted(config, f"distill.save_images={text}")
  if text:
    with pytest.raises(ValueError, match=r"tiny=.* is not a boolean"):
      _config_module("fashion_mnist_lenet5.py").get_config(f"method=dfad,tiny={text}")


def test_command_line_range_error_is_one_line_and_writes_nothing(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.run(
      helpers.cli_command("dfkd_jax.cli.main",
                          f"--config={os.path.join(helpers.REPO_ROOT, helpers.TEACHER_CONFIG)}"
                          ":method=teacher,tiny", "--config.num_epochs=0",
                          f"--workdir={workdir}"),
      cwd=helpers.REPO_ROOT, env=helpers.cli_env(), capture_output=True, text=True, timeout=120,
      check=False)
  assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and "num_epochs=0 (must be > 0)" in lines[0], proc.stderr
  assert not workdir.exists()


def _numeric_fields(config, prefix=""):
  for key, value in config.items():
    path = prefix + key
    if isinstance(value, ml_collections.ConfigDict):
      yield from _numeric_fields(value, path + ".")
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      yield path, value


def _violations(must):
  """Values that break a rule, by what the rule says (NaN breaks every rule)."""
  return {"> 0": [0, -1, -1e9], ">= 0": [-1, -1e-9], "in [0, 1)": [1.0, -0.1, 7.0],
          "in [0, 1]": [1.5, -0.1]}[must] + [float("nan")]


@pytest.mark.parametrize("method", helpers.ALL_METHODS)
def test_every_numeric_field_of_every_method_is_range_checked(method):
  """Fuzz over the whole config: every numeric field (at the full and the tiny budget) has a
  range rule (or is listed as unconstrained), and each out-of-range value of each field (zero,
  negative, huge negative, NaN, 1 for a fraction) is rejected by name; the shipped value passes.
  A new config field without a rule fails here."""
  for extra in ("", ",tiny"):
    config = _config_module("fashion_mnist_lenet5.py").get_config(f"method={method}{extra}")
    config_blocks.validate(config)
    for path, value in _numeric_fields(config):
      if path.rsplit(".", 1)[-1] in config_blocks.UNCONSTRAINED:
        continue
      rule = config_blocks.range_rule(path)
      assert rule is not None, f"{path} (= {value!r}) has no range rule in config_blocks"
      _, must = rule
      for bad in _violations(must):
        broken = copy.deepcopy(config)
        node = broken
        *parents, leaf = path.split(".")
        for p in parents:
          node = node[p]
        if isinstance(value, int) and not (bad == bad and bad == int(bad)):
          continue  # an int field cannot hold NaN or a fraction
        node[leaf] = type(value)(bad)
        with pytest.raises(ValueError, match=re.escape(f"{path}={node[leaf]!r} (must be")):
          config_blocks.validate(broken)
