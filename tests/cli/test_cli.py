"""`python -m dfkd_jax.cli.main`: --help, the modes (train / evaluate / condense) and their errors.

(Config-override errors of mode=train are tested in test_configs.py.)
"""
import json
import os
import re
import subprocess
import sys

import pytest

import helpers
from dfkd_jax.io import model_io
from dfkd_jax import train

MAIN = "dfkd_jax.cli.main"
TINY_TEACHER = os.path.join(helpers.REPO_ROOT, helpers.TEACHER_CONFIG) + ":method=teacher,tiny"


def _run_in(cwd, *args):
  return subprocess.run(helpers.cli_command(MAIN, *args), cwd=cwd, env=helpers.cli_env(),
                        capture_output=True, text=True, timeout=120, check=False)


def _one_line_error(proc, *fragments):
  """Exit status 2 and exactly one `error:` line on stderr holding `fragments`, no traceback."""
  assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-2000:])
  assert "Traceback" not in proc.stderr
  lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
  for fragment in fragments:
    assert fragment in lines[0], (fragment, lines[0])
  return lines[0]


def _files(folder):
  return {p: os.path.getmtime(p) for p in (str(q) for q in folder.rglob("*"))}


# ------------------------------------------------------------------------------------- --help


def test_help_lists_modes_and_config_files():
  proc = helpers.run_cli(MAIN, "--help", timeout=120)
  assert proc.returncode == 0, proc.stderr
  out = proc.stdout
  modes = out.split("Modes (--mode):")[1].split("\n\n")[0]
  for mode in ("train", "evaluate", "condense"):
    assert re.search(rf"^  {mode} ", modes, re.M), (mode, modes)
  configs = helpers.config_files()
  assert configs
  for path in configs:
    with open(path, encoding="utf-8") as f:
      first_line = re.match(r'\s*r?"""(.*)', f.read()).group(1).strip()
    line = next(ln for ln in out.splitlines() if os.path.basename(path) in ln)
    assert first_line and first_line in line, (first_line, line)
  assert "common.py" not in out
  for flag in ("--mode", "--config", "--workdir", "--model_dir", "--teacher_dir", "--dataset",
               "--split", "--data_dir", "--limit"):
    assert f"  {flag}:" in out, flag


def test_help_works_from_another_directory(tmp_path):
  proc = _run_in(tmp_path, "-h")
  assert proc.returncode == 0, proc.stderr
  assert "fashion_mnist_lenet5.py" in proc.stdout  # the repository's configs/, by absolute path


# ------------------------------------------------------------------------------ usage errors


@pytest.mark.parametrize("args,fragments", [
    ((), ("--mode=train needs --config and --workdir",)),
    ((f"--config={TINY_TEACHER}",), ("needs --workdir",)),
    (("--mode=evaluate",), ("--mode=evaluate needs --model_dir",)),
    (("--mode=evaluate", "--model_dir=x", "--workdir=y"), ("--workdir", "not used by",
                                                            "--mode=evaluate")),
    (("--mode=train", f"--config={TINY_TEACHER}", "--workdir=y", "--limit=5"),
     ("--limit", "not used by --mode=train")),
    (("--mode=bogus",), ("train", "evaluate", "condense")),
    (("--mode=condense", "--ipc", "3"), ("ipc", "after `--`")),
    (("--mode=evaluate", "--model_dir=x", "stray"), ("unexpected arguments: stray",)),
])
def test_usage_errors_are_one_line(args, fragments, tmp_path):
  proc = _run_in(tmp_path, *args)
  _one_line_error(proc, *fragments)
  assert not list(tmp_path.iterdir())  # nothing was written


def test_evaluate_missing_model_is_one_line_error(tmp_path):
  proc = helpers.run_cli(MAIN, "--mode=evaluate", f"--model_dir={tmp_path / 'nothing'}")
  _one_line_error(proc, "No model checkpoint", "nothing")


# ---------------------------------------------------------------------------- mode=evaluate


@pytest.fixture(scope="module")
def tiny_teacher(tmp_path_factory):
  """A tiny trained LeNet-5 teacher (8 steps; evaluated on the first 512 test images)."""
  helpers.require_fashion_mnist()
  workdir = tmp_path_factory.mktemp("cli_teacher")
  summary = train.train_and_evaluate(helpers.tiny_teacher_config(), str(workdir))
  return workdir, summary


@pytest.mark.slow
def test_evaluate_reproduces_the_run_accuracy_and_writes_nothing(tiny_teacher):
  workdir, summary = tiny_teacher
  before = _files(workdir)
  proc = helpers.run_cli(MAIN, "--mode=evaluate", f"--model_dir={workdir}",
                         f"--teacher_dir={workdir}", "--limit=512")
  assert proc.returncode == 0, proc.stderr
  assert f"accuracy: {summary['test_accuracy']:.2f}%" in proc.stdout
  assert "teacher agreement: 100.00%" in proc.stdout  # the teacher agrees with itself
  assert "fashion_mnist test, 512 examples" in proc.stdout
  assert _files(workdir) == before


@pytest.mark.slow
def test_evaluate_other_split_and_mismatched_dataset(tiny_teacher):
  workdir, _ = tiny_teacher
  proc = helpers.run_cli(MAIN, "--mode=evaluate", f"--model_dir={workdir}", "--split=train",
                         "--limit=100")
  assert proc.returncode == 0, proc.stderr
  assert re.search(r"fashion_mnist train, 100 examples\naccuracy: \d+\.\d\d%\n$", proc.stdout)
  assert "teacher agreement" not in proc.stdout
  proc = helpers.run_cli(MAIN, "--mode=evaluate", f"--model_dir={workdir}", "--dataset=cifar10")
  _one_line_error(proc, "does not fit 'cifar10'")


@pytest.mark.slow
def test_evaluate_teacher_with_another_input_shape_is_rejected(tiny_teacher, tmp_path):
  workdir, _ = tiny_teacher
  other = tmp_path / "other"
  other.mkdir()
  for name in (model_io.WEIGHTS, model_io.META):
    (other / name).write_bytes((workdir / name).read_bytes())
  meta = json.loads((other / model_io.META).read_text())
  meta["input_shape"] = [36, 36, 1]
  (other / model_io.META).write_text(json.dumps(meta))
  proc = helpers.run_cli(MAIN, "--mode=evaluate", f"--model_dir={workdir}",
                         f"--teacher_dir={other}", "--limit=64")
  _one_line_error(proc, "The teacher expects inputs (36, 36, 1)")


# ---------------------------------------------------------------------------- mode=condense


def test_condense_passes_the_arguments_after_double_dash():
  proc = helpers.run_cli(MAIN, "--mode=condense", "--", "--help", timeout=120)
  assert proc.returncode == 0, proc.stderr
  assert "--ipc" in proc.stdout and "--kind" in proc.stdout  # dfkd_jax.condensation.condense's own help
  proc = helpers.run_cli(MAIN, "--mode=condense", "--", "--kind", "bogus", timeout=120)
  assert proc.returncode == 2 and "bogus" in proc.stderr


@pytest.mark.slow
def test_condense_fewshot_writes_the_set(tmp_path):
  helpers.require_fashion_mnist()
  out = tmp_path / "fewshot.npz"
  proc = helpers.run_cli(MAIN, "--mode=condense", "--", "--kind", "fewshot", "--k", "2",
                         "--pad_to", "32", "--train_limit", "512", "--out", str(out))
  assert proc.returncode == 0, proc.stderr
  assert out.is_file() and (tmp_path / "fewshot.png").is_file()


# ------------------------------------------------------------------- config files that fail


@pytest.mark.parametrize("content,fragments", [
    (None, ["no config file", "missing.py", "configs/"]),
    ("x = (\n", ["is not valid Python", "line 1"]),
    ("def get_config(arg=None):\n  raise KeyError('boom')\n", ["failed", "KeyError", "boom"]),
])
def test_a_config_file_that_cannot_load_is_one_line(content, fragments, tmp_path):
  path = tmp_path / "missing.py"
  if content is not None:
    path.write_text(content)
  proc = _run_in(str(tmp_path), f"--config={path}", f"--workdir={tmp_path / 'run'}")
  _one_line_error(proc, *fragments)
  assert not (tmp_path / "run").exists()


def test_an_empty_workdir_is_one_line(tmp_path):
  proc = _run_in(str(tmp_path), f"--config={TINY_TEACHER}", "--workdir=")
  assert proc.returncode != 0 and "Traceback" not in proc.stderr
  assert "--workdir is empty" in proc.stderr, proc.stderr


def test_a_workdir_that_cannot_be_written_is_one_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("")
  proc = _run_in(str(tmp_path), f"--config={TINY_TEACHER}", f"--workdir={blocker / 'run'}")
  _one_line_error(proc, "a_file")


@pytest.mark.slow
def test_a_longer_resume_needs_extend_budget(tiny_teacher, tmp_path):
  """Resuming a finished 8-step run at 12 steps: refused in one line that names
  --extend_budget; with the flag it trains the 4 further steps."""
  import shutil  # pylint: disable=g-import-not-at-top
  workdir = tmp_path / "run"
  shutil.copytree(tiny_teacher[0], workdir)
  args = (f"--config={TINY_TEACHER}", "--config.num_steps=12", f"--workdir={workdir}")
  refused = helpers.run_cli(MAIN, *args)
  _one_line_error(refused, "num_steps: 8 -> 12", "--extend_budget")
  proc = helpers.run_cli(MAIN, *args, "--extend_budget")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "Extending the run: num_steps 8 -> 12" in proc.stdout
  summary = json.load(open(workdir / "summary.json"))
  assert summary["steps"] == 12
  assert [(x["from_step"], x["to_step"]) for x in summary["launches"]] == [(0, 8), (8, 12)]


@pytest.mark.slow
def test_a_batch_too_large_for_memory_is_one_line_with_what_to_lower(tiny_teacher, tmp_path):
  """4 million synthetic images per batch: XLA cannot allocate the step (1.3 TB); the error
  says so on one line and names the batch-size fields (no int32 overflow on the way)."""
  config = (os.path.join(helpers.REPO_ROOT, helpers.TEACHER_CONFIG)
            + f":method=dafl,tiny,teacher_workdir={tiny_teacher[0]}")
  proc = helpers.run_cli(MAIN, f"--config={config}", "--config.distill.batch_size=4000000",
                         f"--workdir={tmp_path / 'run'}")
  _one_line_error(proc, "Out of memory", "lower the batch size", "--config.distill.batch_size")


_DISK_FULL_AT_SUMMARY = """
import errno, sys
from dfkd_jax.io import files
real = files.write_json
def full(path, obj, indent=2):
  if path.endswith("summary.json"):
    raise OSError(errno.ENOSPC, "No space left on device", path)
  return real(path, obj, indent)
files.write_json = full
from dfkd_jax.cli import main
main.run()
"""


@pytest.mark.slow
def test_a_full_disk_at_the_end_of_a_run_is_one_line_and_the_rerun_finishes(tmp_path):
  """ENOSPC while writing summary.json (the run's last file): one line naming the file and
  the cause, exit 2, no partial or temporary file; the same command again resumes the finished
  run from its last checkpoint and writes the summary (no training repeated)."""
  workdir = tmp_path / "run"
  args = (f"--config={TINY_TEACHER}", f"--workdir={workdir}")
  proc = subprocess.run([sys.executable, "-c", _DISK_FULL_AT_SUMMARY, *args],
                        cwd=helpers.REPO_ROOT, env=helpers.cli_env(), capture_output=True,
                        text=True, timeout=300, check=False)
  _one_line_error(proc, "No space left on device", "summary.json")
  assert not (workdir / "summary.json").exists()
  assert not [f for f in os.listdir(workdir) if ".tmp" in f]
  again = helpers.run_cli(MAIN, *args)
  assert again.returncode == 0, again.stderr[-2000:]
  assert "Resumed from step 8" in again.stdout
  summary = json.load(open(workdir / "summary.json"))
  assert summary["steps"] == 8 and len(summary["launches"]) == 1


def test_shipped_configs_resolve_by_bare_name_and_from_any_directory(tmp_path, monkeypatch):
  from dfkd_jax import cli  # pylint: disable=g-import-not-at-top
  shipped = os.path.join(cli.CONFIGS_DIR, "fashion_mnist_lenet5.py")
  monkeypatch.chdir(tmp_path)  # no configs/ here
  assert (cli.resolve_config("fashion_mnist_lenet5:method=dafl,tiny")
          == shipped + ":method=dafl,tiny")
  assert (cli.resolve_config("configs/fashion_mnist_lenet5.py:method=dafl")
          == shipped + ":method=dafl")
  assert cli.resolve_config("fashion_mnist_lenet5") == shipped
  for unchanged in ("common", "nope:method=dafl", "other/dir/x.py:a=1"):
    assert cli.resolve_config(unchanged) == unchanged
  (tmp_path / "mine.py").write_text("def get_config(arg=None):\n  return None\n")
  assert cli.resolve_config("mine.py:x") == "mine.py:x"  # an existing file is kept


@pytest.mark.slow
def test_a_bare_config_name_trains_from_another_directory(tmp_path):
  proc = _run_in(str(tmp_path), "--config=fashion_mnist_lenet5:method=teacher,tiny",
                 "--config.num_steps=2", f"--workdir={tmp_path / 'run'}")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert json.load(open(tmp_path / "run" / "summary.json"))["steps"] == 2


@pytest.mark.slow
def test_the_wheel_ships_the_configs(tmp_path):
  """`pip install` users get the config files (`dfkd_jax/configs/*.py`) in the wheel."""
  import shutil  # pylint: disable=g-import-not-at-top
  import zipfile  # pylint: disable=g-import-not-at-top
  source = tmp_path / "src"  # a copy: building writes build/ next to pyproject.toml
  shutil.copytree(os.path.join(helpers.REPO_ROOT, "dfkd_jax"), source / "dfkd_jax",
                  ignore=shutil.ignore_patterns("__pycache__"))
  for name in ("pyproject.toml", "README.md"):
    shutil.copy(os.path.join(helpers.REPO_ROOT, name), source / name)
  proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                         "-q", "-w", str(tmp_path), str(source)], capture_output=True,
                        text=True, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  (wheel,) = [p for p in os.listdir(tmp_path) if p.endswith(".whl")]
  names = zipfile.ZipFile(tmp_path / wheel).namelist()
  for name in ("fashion_mnist_lenet5.py", "fashion_mnist_resnet20.py", "cifar.py", "common.py"):
    assert f"dfkd_jax/configs/{name}" in names


def test_import_torch_mode_passes_the_arguments_after_double_dash(tmp_path):
  proc = helpers.run_cli(MAIN, "--mode=import_torch", "--", "--help", timeout=120)
  assert proc.returncode == 0 and "--num_classes" in proc.stdout, proc.stderr[-1000:]
  missing = tmp_path / "nothing.pth"
  proc = helpers.run_cli(MAIN, "--mode=import_torch", "--", "--model", "resnet8",
                         "--num_classes", "10", "--input_shape", "32,32,3", "--dataset",
                         "cifar10", "--out", str(tmp_path / "out"), str(missing))
  assert proc.returncode == 2 and "Traceback" not in proc.stderr
  assert "nothing.pth" in proc.stderr, proc.stderr
