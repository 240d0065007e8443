r"""Command line of dfkd_jax: train (default), evaluate a saved model, condense, import a
PyTorch teacher.

  python -m dfkd_jax.cli.main --config=configs/<file>.py:method=<m> --workdir=<dir> [--config.<k>=<v>]
  python -m dfkd_jax.cli.main --mode=evaluate --model_dir=<run> [--teacher_dir=<run>] [--limit=N]
  python -m dfkd_jax.cli.main --mode=condense -- <arguments of dfkd_jax.condensation.condense>
  python -m dfkd_jax.cli.main --mode=import_torch -- <arguments of dfkd_jax.io.torch_import>

This module only parses flags and sets process-wide JAX options; all work happens in
`dfkd_jax.train.train_and_evaluate` (and `dfkd_jax.condensation.condense.main`), which notebooks
and tests import directly.
"""
from __future__ import annotations

import ast
import glob
import errno
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

from dfkd_jax import cli
from dfkd_jax import methods

FLAGS = flags.FLAGS
MODES = {
    "train": "(default) run the config's method: teacher, scratch, kd_real (real data), "
             "kd_condensed or a data-free one",
    "evaluate": "accuracy of a saved model (--model_dir) and its agreement with a teacher "
                "(--teacher_dir); writes nothing",
    "condense": "dfkd_jax.condensation.condense; its arguments follow `--` (see --mode=condense "
                "-- --help)",
    "import_torch": "a PyTorch state_dict -> a model folder (dfkd_jax.io.torch_import); its "
                    "arguments follow `--` (see --mode=import_torch -- --help)",
}
_PASS_THROUGH_MODES = ("condense", "import_torch")  # their arguments follow `--`
config_flags.DEFINE_config_file("config", None, "mode=train: config file (path.py:arg).",
                                lock_config=True)
flags.DEFINE_enum("mode", "train", list(MODES), "What to do (see the modes above).")
flags.DEFINE_bool("extend_budget", False,
                  "mode=train: resuming a run may lengthen it (distill.num_iters, num_steps, "
                  "num_epochs larger than its checkpoint's); its learning-rate schedules are "
                  "re-sized from the resumed step on. Without it a changed length is refused.")
flags.DEFINE_string("workdir", None,
                    "mode=train: run folder (created; resumed if it holds a checkpoint).")
flags.DEFINE_string("model_dir", None,
                    "mode=evaluate: run folder holding model.msgpack + model.json.")
flags.DEFINE_string("teacher_dir", None,
                    "mode=evaluate: teacher run folder, for the teacher agreement.")
flags.DEFINE_string("dataset", None, "mode=evaluate: dataset (default: the one in model.json).")
flags.DEFINE_string("split", None, "mode=evaluate: split (default: the dataset's test split).")
flags.DEFINE_string("data_dir", None,
                    "mode=evaluate: TFDS data dir (default $TFDS_DATA_DIR or "
                    "~/tensorflow_datasets).")
flags.DEFINE_integer("limit", 0, "mode=evaluate: only the first N examples (0: all).",
                     lower_bound=0)
flags.DEFINE_string("coordinator", None,
                    "multi-process run: host:port of process 0's coordinator (with "
                    "--num_processes and --process_id; every process gets the same command).")
flags.DEFINE_integer("num_processes", None, "multi-process run: number of processes.",
                     lower_bound=1)
flags.DEFINE_integer("process_id", None, "multi-process run: this process's index (0 writes "
                     "the files).", lower_bound=0)
flags.DEFINE_bool("distributed", False,
                  "multi-process run on a cluster JAX detects (TPU pod slice, SLURM, Open MPI): "
                  "no other flag needed.")
flags.DEFINE_integer("heartbeat_timeout_s", 100,
                     "multi-process run: a process silent this long counts as dead and the "
                     "others stop (relaunch the same command to resume).", lower_bound=1)
_MODE_FLAGS = {"train": ("config", "workdir", "extend_budget", "coordinator", "num_processes",
                         "process_id", "distributed", "heartbeat_timeout_s"),
               "evaluate": ("model_dir", "teacher_dir", "dataset", "split", "data_dir", "limit"),
               "condense": (), "import_torch": ()}
_OWN_FLAGS = ("mode", *(name for names in _MODE_FLAGS.values() for name in names))
_HELP_FLAGS = ("-h", "--help", "-help", "--helpshort", "-?")


class UsageError(ValueError):
  """A wrong combination of flags."""


def config_files() -> list[tuple[str, str]]:
  """(path, first docstring line) of every config file (the shipped ones, `dfkd_jax/configs`,
  and `./configs/*.py`, but `common.py`); paths are shown relative to the current directory
  when below it (a shipped config can also be named by its bare name)."""
  found = {}
  for folder in (cli.CONFIGS_DIR, os.path.abspath("configs")):
    for path in sorted(glob.glob(os.path.join(folder, "*.py"))):
      if (os.path.basename(path) in ("common.py", "__init__.py") or path in found
          or os.path.realpath(path) in map(os.path.realpath, found)):
        continue
      try:
        with open(path, encoding="utf-8") as f:
          doc = ast.get_docstring(ast.parse(f.read())) or ""
      except (OSError, SyntaxError, ValueError):
        doc = ""
      found[path] = next((ln.strip() for ln in doc.splitlines() if ln.strip()), "")
  out = []
  for path, line in found.items():
    rel = os.path.relpath(path)
    out.append((path if rel.startswith("..") else rel, line))
  return out


def usage() -> str:
  """The --help text: usage, modes, config files, flags."""
  title, commands = __doc__.split("\n\n")[:2]
  lines = [title, "", "Usage:", commands.rstrip(), "", "Modes (--mode):"]
  lines += [f"  {name:<9} {text}" for name, text in MODES.items()]
  lines += ["", "Methods (method=<m>):", "  real data: " + ", ".join(methods.SUPERVISED_METHODS)]
  lines += [f"  {name:<13} {spec.summary}" for name, spec in methods.METHODS.items()]
  lines += ["", "Config files (--config=<file or shipped name>:method=<m>[,tiny]; any field "
            "can be overridden with --config.<field>=<value>):"]
  configs = config_files()
  width = max([len(p) for p, _ in configs] + [0])
  lines += [f"  {p:<{width}}  {doc}" for p, doc in configs] or ["  (none found in ./configs)"]
  lines += ["", "Flags:"]
  for name in _OWN_FLAGS:
    flag = FLAGS[name]
    default = "" if flag.default in (None, "") else f" (default: {flag.default})"
    lines.append(f"  --{name}: {flag.help}{default}")
  lines += ["", "Run `python -m dfkd_jax.io.report <run folders>` to compare finished runs."]
  return "\n".join(lines)


_USER_OS_ERRORS = (FileNotFoundError, PermissionError, NotADirectoryError, IsADirectoryError,
                   FileExistsError)


def _user_error(e: BaseException) -> bool:
  """Whether `e` is the user's to fix (printed as one line) rather than an internal error."""
  if isinstance(e, OSError):
    return isinstance(e, _USER_OS_ERRORS) or e.errno in (errno.ENOSPC, errno.EROFS, errno.EDQUOT)
  if isinstance(e, FloatingPointError):
    from dfkd_jax.train import loop  # pylint: disable=g-import-not-at-top
    return isinstance(e, loop.NonFiniteLossError)
  return True


def _one_line(e: BaseException) -> str:
  return " ".join(ln.strip() for ln in str(e).splitlines() if ln.strip())


def _loaded_config():
  """FLAGS.config, loaded now. An existing file is loaded (and its errors reported, by
  `_parse_flags`) at flag parsing; ml_collections defers a file it could not open, which would
  otherwise surface as a traceback at first use: here it is a ValueError naming the file."""
  given = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  path = given.split(":", 1)[0]
  if path and not os.path.isfile(path):
    raise ValueError(f"--config: no config file {path!r} (from {os.getcwd()}); the shipped ones "
                     "are in configs/, e.g. --config=configs/fashion_mnist_lenet5.py:method=dafl.")
  try:
    config = FLAGS.config
    list(config.keys())  # a deferred file is loaded on first access
    return config
  except Exception as e:  # pylint: disable=broad-except  (an unreadable file)
    raise ValueError(f"--config: loading {path!r} failed: {type(e).__name__}: "
                     f"{_one_line(e)}") from e


def _check_flags(argv) -> None:
  """Raises UsageError for flags that do not fit the mode."""
  mode = FLAGS.mode
  given = {name for name in _OWN_FLAGS if FLAGS[name].present}
  if mode == "train":
    missing = [f"--{n}" for n in ("config", "workdir") if n not in given]
    if missing:
      raise UsageError(f"--mode=train needs {' and '.join(missing)} (e.g. --config=configs/"
                       "fashion_mnist_lenet5.py:method=teacher --workdir=runs/teacher); "
                       "see --help.")
  wrong = sorted(given - {"mode", *_MODE_FLAGS[mode]})
  if wrong:
    raise UsageError(f"--{', --'.join(wrong)} not used by --mode={mode}; see --help.")
  if mode == "train" and not FLAGS.workdir.strip():
    raise UsageError("--workdir is empty: name the run folder (e.g. --workdir=runs/my_run).")
  if mode == "evaluate" and not FLAGS.model_dir:
    raise UsageError("--mode=evaluate needs --model_dir=<run folder with model.msgpack and "
                     "model.json>.")
  if mode not in _PASS_THROUGH_MODES and len(argv) > 1:
    raise UsageError(f"unexpected arguments: {' '.join(argv[1:])}")


def evaluate(model_dir: str, teacher_dir: str | None = None, dataset: str | None = None,
             split: str | None = None, data_dir: str | None = None, limit: int = 0) -> dict:
  """Accuracy (%) of the model saved in `model_dir` (and agreement with `teacher_dir`'s).

  Returns:
    {"accuracy", "agreement" (None without a teacher), "num_examples", "dataset", "split",
     "model", "teacher"}.
  """
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from dfkd_jax.train import evaluation  # pylint: disable=g-import-not-at-top
  from dfkd_jax.io import model_io  # pylint: disable=g-import-not-at-top
  from dfkd_jax.data import datasets  # pylint: disable=g-import-not-at-top

  _, model, meta = model_io.load_model(model_dir, role="model",
                                       hint="Pass the folder of a finished run.")
  dataset = dataset or meta.get("dataset")
  if not dataset:
    raise ValueError(f"{model_dir}/{model_io.META} names no dataset: pass --dataset.")
  # The model's own input normalisation (model.json), whatever the dataset: it is what the
  # model was trained on. Older model.json files have none: the dataset's is used.
  norm = meta.get("normalization") or {}
  data_dir = data_dir or meta.get("data_dir") or None
  info = datasets.get_info(dataset, norm.get("mean"), norm.get("std"), data_dir)
  if meta["num_classes"] != info.num_classes or meta["input_shape"][-1] != info.channels:
    raise ValueError(f"The model at {model_dir!r} ({meta['num_classes']} classes, "
                     f"{meta['input_shape'][-1]} channels) does not fit {dataset!r} "
                     f"({info.num_classes} classes, {info.channels} channels).")
  teacher = teacher_meta = None
  if teacher_dir:
    _, teacher, teacher_meta = model_io.load_model(
        teacher_dir, role="teacher", expect_classes=meta["num_classes"],
        expect_channels=meta["input_shape"][-1])
    if list(teacher_meta["input_shape"]) != list(meta["input_shape"]):
      raise ValueError(f"The teacher expects inputs {tuple(teacher_meta['input_shape'])}, the "
                       f"model {tuple(meta['input_shape'])}.")
  size = meta["input_shape"][0]
  split = split or info.test_split
  x, y = datasets.load_split(dataset, split, data_dir,
                             size if size != info.image_size else None, limit=limit or None,
                             info=info)
  ev = evaluation.evaluate(model.apply_fn, model.variables, jnp.asarray(x), jnp.asarray(y),
                           teacher=teacher)
  return {"accuracy": ev["accuracy"], "agreement": ev.get("agreement"),
          "num_examples": int(x.shape[0]), "dataset": dataset, "split": split,
          "model": meta["model"], "teacher": teacher_meta["model"] if teacher_meta else None}


def _evaluate() -> None:
  r = evaluate(FLAGS.model_dir, FLAGS.teacher_dir, FLAGS.dataset, FLAGS.split, FLAGS.data_dir,
               FLAGS.limit)
  print(f"{r['model']} ({FLAGS.model_dir}) on {r['dataset']} {r['split']}, "
        f"{r['num_examples']} examples")
  print(f"accuracy: {r['accuracy']:.2f}%")
  if r["agreement"] is not None:
    print(f"teacher agreement: {r['agreement']:.2f}% ({r['teacher']}, {FLAGS.teacher_dir})")


def _condense(args) -> int:
  try:
    from dfkd_jax.condensation import condense  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise RuntimeError("--mode=condense needs dfkd_jax.condensation.condense, which is not "
                       f"available: {e}")
  return int(condense.main(list(args)) or 0)


def _main(argv):
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO.
  try:
    _check_flags(argv)
    if FLAGS.mode == "condense":
      sys.exit(_condense(argv[1:]))
    if FLAGS.mode == "import_torch":
      from dfkd_jax.io import torch_import  # pylint: disable=g-import-not-at-top
      sys.exit(int(torch_import.main(list(argv[1:])) or 0))
    if FLAGS.mode == "evaluate":
      _evaluate()
      return
    from dfkd_jax import parallel  # pylint: disable=g-import-not-at-top
    if parallel.initialize(FLAGS.coordinator, FLAGS.num_processes, FLAGS.process_id,
                           auto=FLAGS.distributed,
                           heartbeat_timeout_s=FLAGS.heartbeat_timeout_s
                           ) and not parallel.is_main_process():
      sys.stdout = open(os.devnull, "w", encoding="utf-8")  # only process 0 reports progress
    from dfkd_jax import train  # pylint: disable=g-import-not-at-top
    config = _loaded_config()
    if FLAGS.extend_budget:
      with config.unlocked():
        config.extend_budget = True
    train.train_and_evaluate(config, FLAGS.workdir)
  except (ValueError, OSError, RuntimeError, FloatingPointError) as e:
    # user errors, files that cannot be read or written (missing, read-only or full disk, a
    # path through a file), and the NaN guard's stop: one line, exit 2; DFKD_DEBUG=1 shows the
    # traceback. Other OS and floating-point errors are internal: traceback.
    if os.environ.get("DFKD_DEBUG") or not _user_error(e):
      raise
    print(f"error: {_one_line(e)}{_out_of_memory_hint(e)}", file=sys.stderr)
    sys.exit(2)


def _out_of_memory_hint(e: BaseException) -> str:
  """What to change when XLA could not allocate (a batch too large for the device)."""
  text = str(e)
  if "RESOURCE_EXHAUSTED" not in text and "Out of memory" not in text:
    return ""
  return (" The run needs more memory than the device has: lower the batch size "
          "(--config.batch_size, --config.distill.batch_size), the model widths (e.g. "
          "--config.generator.ngf), or spread the batch over more devices; a killed run resumes "
          "from its last checkpoint.")


def _parse_flags(argv):
  """absl flag parsing with one-line errors for bad config overrides (no traceback)."""
  try:
    return FLAGS(argv)
  except flags.Error as e:
    lines = [ln for ln in str(e).splitlines() if ln.strip()]
    if any(ln.startswith("Traceback") for ln in lines):  # config file raised: keep its message
      lines = [lines[0], lines[-1]]
    hint = ""
    passing = [m for m in _PASS_THROUGH_MODES if f"--mode={m}" in argv]
    if "Unknown command line flag" in str(e) and passing:
      hint = f" (the arguments of --mode={passing[0]} go after `--`)"
    print("error: " + " ".join(lines) + hint, file=sys.stderr)
  except AttributeError as e:  # ml_collections: the override names no field of the config
    bad = [a for a in argv[1:] if a.startswith("--config.")]
    print(f"error: unknown config field {e} (in {' '.join(bad)}); see the config file for the "
          "valid fields.", file=sys.stderr)
  except (TypeError, ValueError) as e:  # wrong type for a field, or get_config rejected its arg
    print(f"error: bad --config value: {e}", file=sys.stderr)
  except SyntaxError as e:  # the config file is not Python
    print(f"error: --config: {e.filename!r} is not valid Python (line {e.lineno}: {e.msg}).",
          file=sys.stderr)
  except Exception as e:  # pylint: disable=broad-except  (the config file's get_config raised)
    path = next((a.split("=", 1)[1].split(":", 1)[0] for a in argv if a.startswith("--config=")),
                "?")
    print(f"error: --config: loading {path!r} failed: {type(e).__name__}: {_one_line(e)}",
          file=sys.stderr)
  sys.exit(2)


def run():
  from dfkd_jax import compile as compile_lib  # pylint: disable=g-import-not-at-top
  compile_lib.memory_scheduler()  # before JAX starts its backends
  argv = sys.argv[1:]
  ours = argv[:argv.index("--")] if "--" in argv else argv
  if any(a in _HELP_FLAGS for a in ours):
    print(usage())
    sys.exit(0)
  sys.argv = [sys.argv[0], *cli.resolve_config_argv(sys.argv[1:])]
  app.run(_main, flags_parser=_parse_flags)


if __name__ == "__main__":
  run()
