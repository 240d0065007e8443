r"""Command line: `python -m dfkd_jax.main --config=configs/<file>.py:method=<m> --workdir=<dir>`.

This module only parses flags and sets process-wide JAX options; all work happens in
`dfkd_jax.train.train_and_evaluate`, which notebooks and tests import directly.
"""
from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file (path.py:arg).", lock_config=True)
flags.DEFINE_string("workdir", None, "Run folder (created; resumed if it holds a checkpoint).")


def _main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  from dfkd_jax import train  # pylint: disable=g-import-not-at-top
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (ValueError, FileNotFoundError, RuntimeError) as e:
    if os.environ.get("DFKD_DEBUG"):
      raise
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
  """absl flag parsing with one-line errors for bad config overrides (no traceback)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):  # config file raised: keep its message
      lines = [lines[0], lines[-1]]
    print("error: " + " ".join(lines), file=sys.stderr)
  except AttributeError as e:  # ml_collections: the override names no field of the config
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config field {e} (in {' '.join(bad)}); see the config file for the "
          "valid fields.", file=sys.stderr)
  except (TypeError, ValueError) as e:  # wrong type for a field, or get_config rejected its arg
    print(f"error: bad --config value: {e}", file=sys.stderr)
  sys.exit(2)


def run():
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
