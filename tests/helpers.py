"""Shared test utilities: config loading exactly as the CLI does it, CLI subprocesses, data checks.

Imported by the test modules as `import helpers` (pytest puts `tests/` on `sys.path`).
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import shlex
import subprocess
import sys
from typing import Sequence
import warnings

from absl import flags
from ml_collections import config_flags
import pytest

from dfkd_jax import methods

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS_DIR = os.path.join(REPO_ROOT, "configs")
FMNIST_IDX_DIR = "/usr/share/datasets/fashion-mnist"
TEACHER_CONFIG = "configs/fashion_mnist_lenet5.py"

# From the registry (kd_condensed needs a condensed set, so the generic config tests skip it).
SUPERVISED_METHODS = tuple(m for m in methods.SUPERVISED_METHODS if m != "kd_condensed")
DATA_FREE_METHODS = tuple(methods.METHODS)
ALL_METHODS = SUPERVISED_METHODS + DATA_FREE_METHODS


def config_files() -> list[str]:
  """Every config file in configs/ (absolute paths) except the shared `common.py` and the
  package's `__init__.py`."""
  return sorted(p for p in glob.glob(os.path.join(CONFIGS_DIR, "*.py"))
                if os.path.basename(p) not in ("common.py", "__init__.py"))


def _abs_config(spec: str) -> str:
  """'configs/x.py:arg' -> '/abs/repo/configs/x.py:arg' (relative paths are repo-relative)."""
  path, sep, arg = spec.partition(":")
  if not os.path.isabs(path):
    path = os.path.join(REPO_ROOT, path)
  return path + sep + arg


def load_config(spec: str, overrides: Sequence[str] = ()):
  """Loads a config as `python -m dfkd_jax.cli.main` does: `--config=<spec>` plus `--config.k=v`.

  Uses a fresh `FlagValues` (the global absl FLAGS are untouched), so any error that the CLI
  would raise while parsing the config or an override is raised here too.

  Args:
    spec: 'configs/<file>.py:<arg string>' (repo-relative or absolute path).
    overrides: extra flags, e.g. ['--config.num_steps=4'].

  Returns:
    The parsed ConfigDict (unlocked, so tests may edit it further).
  """
  argv = ["dfkd_jax", f"--config={_abs_config(spec)}", *overrides]
  fv = flags.FlagValues()
  holder = config_flags.DEFINE_config_file("config", None, "Config file.", flag_values=fv,
                                           lock_config=False, sys_argv=argv)
  with warnings.catch_warnings():
    # ml_collections loads config files with the deprecated `load_module()`.
    warnings.filterwarnings("ignore", "the load_module", DeprecationWarning)
    fv(argv)
  return holder.value


def tiny_teacher_config(**updates):
  """The tiny Fashion-MNIST LeNet-5 teacher config, with `updates` applied."""
  config = load_config(f"{TEACHER_CONFIG}:method=teacher,tiny")
  config.update(updates)
  return config


def docstring_commands(path: str) -> list[list[str]]:
  """The `python -m dfkd_jax.cli.main ...` commands quoted in a config's module docstring.

  Backslash-continued lines are joined; each command is returned as its argv (after `-m
  dfkd_jax.cli.main`).
  """
  with open(path, encoding="utf-8") as f:
    text = f.read()
  doc = re.match(r'\s*r?"""(.*?)"""', text, re.S)
  if doc is None:
    return []
  joined = re.sub(r"\\\n\s*", " ", doc.group(1))
  commands = []
  for line in joined.splitlines():
    line = line.strip()
    if line.startswith("python -m dfkd_jax.cli.main"):
      commands.append(shlex.split(line)[3:])
  return commands


def cli_env(**extra) -> dict[str, str]:
  """The environment for CLI subprocesses: this process's (8 fake devices, compile cache)."""
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  env.pop("DFKD_DEBUG", None)
  env.update(extra)
  return env


def cli_command(module: str, *args: str) -> list[str]:
  return [sys.executable, "-m", module, *args]


def run_cli(module: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
  """Runs `python -m <module> <args>` from the repo root; returns the completed process."""
  return subprocess.run(cli_command(module, *args), cwd=REPO_ROOT, env=cli_env(),
                        capture_output=True, text=True, timeout=timeout, check=False)


def sha256_file(path: str) -> str:
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def require_fashion_mnist(data_dir: str | None = None) -> None:
  """Fails (never skips) with the prepare command if Fashion-MNIST is not prepared for TFDS."""
  data_dir = data_dir or os.environ.get("TFDS_DATA_DIR",
                                        os.path.expanduser("~/tensorflow_datasets"))
  if not glob.glob(os.path.join(data_dir, "fashion_mnist", "*", "dataset_info.json")):
    pytest.fail(
        f"Fashion-MNIST is not prepared in the TFDS data dir {data_dir!r}; these tests need it. "
        "Prepare it first (bash .ci/setup does): python -m dfkd_jax.data.prepare fashion_mnist "
        f"--from {FMNIST_IDX_DIR}", pytrace=False)


def require_idx_files() -> None:
  """Fails with the fix if the Debian Fashion-MNIST IDX files are not installed."""
  if not os.path.isfile(os.path.join(FMNIST_IDX_DIR, "train-images-idx3-ubyte.gz")):
    pytest.fail(f"The Fashion-MNIST IDX files are not in {FMNIST_IDX_DIR}: apt-get install "
                "dataset-fashion-mnist (bash .ci/setup does).", pytrace=False)
