"""End-to-end runs of every data-free method on Fashion-MNIST with a tiny trained teacher.

Needs the Fashion-MNIST TFDS dataset (`python -m dfkd_jax.data.prepare fashion_mnist`); the
tests are skipped without it. The teacher is trained once per session (`method=teacher,tiny`).
In-process runs use the 8 fake CPU devices of conftest; the command-line runs use 1 device
unless a test sets XLA_FLAGS itself.
"""
import hashlib
import importlib.util
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import helpers
import pytest

from dfkd_jax.io import checkpointing
from dfkd_jax.train import distill
from dfkd_jax import methods
from dfkd_jax.io import model_io
from dfkd_jax import numerics
from dfkd_jax import train
from dfkd_jax.data import datasets

pytestmark = pytest.mark.slow

ROOT = helpers.REPO_ROOT
CONFIG_FILE = os.path.join("configs", "fashion_mnist_lenet5.py")
METHODS = tuple(methods.METHODS)  # every registered method runs end to end


def _have_fashion_mnist():
  try:
    datasets.load_split("fashion_mnist", "test", None, 32, limit=8)
  except Exception:  # pylint: disable=broad-except
    return False
  return True


def get_config(arg):
  spec = importlib.util.spec_from_file_location("fashion_mnist_lenet5_cfg",
                                                os.path.join(ROOT, CONFIG_FILE))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(arg)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory):
  """A tiny LeNet-5-BN teacher trained on a slice of Fashion-MNIST (8 steps)."""
  if not _have_fashion_mnist():
    pytest.skip("Fashion-MNIST TFDS dataset not prepared")
  workdir = str(tmp_path_factory.mktemp("teacher"))
  train.train_and_evaluate(get_config("method=teacher,tiny"), workdir)
  return workdir


_RUNS = {}


def _eval_steps(d):
  """The iterations at which a run of `d.num_iters` evaluates (every eval_every, and the last)."""
  return [i for i in range(1, d.num_iters + 1) if i % d.eval_every == 0 or i == d.num_iters]


@pytest.fixture(scope="session")
def distill_run(teacher_dir, tmp_path_factory):
  """`distill_run(method)` -> (workdir, summary) of the tiny in-process run (cached)."""

  def run(method):
    if method not in _RUNS:
      workdir = str(tmp_path_factory.mktemp(method))
      config = get_config(f"method={method},tiny,teacher_workdir={teacher_dir}")
      _RUNS[method] = (workdir, train.train_and_evaluate(config, workdir))
    return _RUNS[method]

  return run


@pytest.mark.parametrize("method", METHODS)
def test_tiny_run_writes_summary_pictures_and_student(method, distill_run, teacher_dir):
  workdir, summary = distill_run(method)
  config = get_config(f"method={method},tiny")
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    on_disk = json.load(f)
  assert on_disk["iterations"] == config.distill.num_iters == summary["iterations"]
  for key in ("final", "mu", "sigma2", "best", "iterations_per_second"):
    assert isinstance(on_disk[key], float) and math.isfinite(on_disk[key]), key
  series = on_disk["accuracy_series"]
  assert on_disk["eval_steps"] == _eval_steps(config.distill)
  assert len(series) == len(on_disk["eval_steps"]) >= 2
  assert on_disk["final"] == series[-1] and on_disk["best"] == max(series)
  assert min(series) <= on_disk["mu"] <= max(series) and on_disk["sigma2"] >= 0
  assert on_disk["iterations_per_second"] > 0
  assert on_disk["num_devices"] == 8
  with open(os.path.join(teacher_dir, model_io.META), encoding="utf-8") as f:
    assert on_disk["teacher_sha256"] == json.load(f)["sha256"]
  for name in ("synthetic.png", "accuracy.png", model_io.META, model_io.WEIGHTS):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  _, student, meta = model_io.load_model(workdir, role="student", expect_model="lenet5_half_bn",
                                         expect_classes=10)
  assert meta["method"] == method and meta["test_accuracy"] == on_disk["final"]
  assert student.params
  # The run's numerics, traceable from both files (the environment's defaults here).
  assert on_disk["numerics"] == meta["numerics"] == numerics.Numerics.from_env().to_dict()


# --------------------------------------------------------------- exact resume after SIGKILL


def _cli(args, env_extra=None):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # 1 device unless set
  env.update(env_extra or {})
  return [sys.executable, "-m", "dfkd_jax.cli.main", *args], env


def _resume_args(teacher_dir, workdir):
  return [f"--config={CONFIG_FILE}:method=dfad,tiny,teacher_workdir={teacher_dir}",
          f"--workdir={workdir}", "--config.distill.num_iters=12",
          "--config.distill.checkpoint_every=4"]


def _sha256(path):
  with open(path, "rb") as f:
    return hashlib.sha256(f.read()).hexdigest()


def _wait_for_checkpoint(workdir, proc, fail_if_done=False, timeout=300):
  """Polls until `workdir/checkpoints/4` or `/8` exists (Orbax renames a finished save into
  place, so the folder's existence means the checkpoint is complete)."""
  ckpts = os.path.join(workdir, "checkpoints")
  deadline = time.monotonic() + timeout
  while not any(os.path.isdir(os.path.join(ckpts, s)) for s in ("4", "8")):
    if proc.poll() is not None:
      assert not fail_if_done, "the run ended before its first checkpoint"
      return
    assert time.monotonic() < deadline, "no checkpoint appeared"
    time.sleep(0.02)


def test_resume_after_sigkill_is_exact(teacher_dir, tmp_path):
  ref_dir, cut_dir = str(tmp_path / "uninterrupted"), str(tmp_path / "interrupted")
  cmd, env = _cli(_resume_args(teacher_dir, ref_dir))
  reference = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
  # Start the second run once the first has compiled everything (its first checkpoint is
  # written after the first evaluation): it then reads the persistent compilation cache.
  _wait_for_checkpoint(ref_dir, reference)
  cmd, env = _cli(_resume_args(teacher_dir, cut_dir))
  victim = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
  _wait_for_checkpoint(cut_dir, victim, fail_if_done=True)
  victim.send_signal(signal.SIGKILL)
  victim.wait()
  assert victim.returncode == -signal.SIGKILL
  assert not os.path.exists(os.path.join(cut_dir, "summary.json")), "killed too late"

  resumed = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "Resumed from step" in resumed.stdout
  out, _ = reference.communicate(timeout=300)
  assert reference.returncode == 0, out[-3000:]

  summaries = []
  for d in (ref_dir, cut_dir):
    with open(os.path.join(d, "summary.json"), encoding="utf-8") as f:
      summaries.append(json.load(f))
  ref, cut = summaries
  d = get_config("method=dfad,tiny").distill
  d.num_iters = 12
  assert ref["iterations"] == cut["iterations"] == 12
  assert ref["eval_steps"] == cut["eval_steps"] == _eval_steps(d)
  assert ref["accuracy_series"] == cut["accuracy_series"]
  assert ref["agreement_series"] == cut["agreement_series"]
  metas = []
  for d in (ref_dir, cut_dir):
    with open(os.path.join(d, model_io.META), encoding="utf-8") as f:
      metas.append(json.load(f))
    assert metas[-1]["sha256"] == _sha256(os.path.join(d, model_io.WEIGHTS))
  assert metas[0]["sha256"] == metas[1]["sha256"]


def test_mb_dfkd_resume_with_a_partly_filled_bank_is_exact(teacher_dir, tmp_path):
  """An MB-DFKD run resumed from iteration 2 (bank: 1 of 3 slots filled) ends exactly as the
  uninterrupted run: the bank, its cursor and count are checkpointed with the state."""

  def config():
    c = get_config(f"method=mb_dfkd,tiny,teacher_workdir={teacher_dir}")
    c.mb_dfkd.update(dict(slots=3, push_every=2))
    c.distill.update(dict(num_iters=6, checkpoint_every=2, eval_every=2))
    c.max_to_keep = 5
    return c

  ref_dir, cut_dir = str(tmp_path / "ref"), str(tmp_path / "cut")
  ref = train.train_and_evaluate(config(), ref_dir)
  shutil.copytree(ref_dir, cut_dir)
  ckpts = os.path.join(cut_dir, "checkpoints")
  for step in checkpointing.Checkpointer(ckpts).all_steps():
    if step > 2:  # as if killed just after the checkpoint of iteration 2
      shutil.rmtree(os.path.join(ckpts, str(step)))
  for name in ("summary.json", model_io.META, model_io.WEIGHTS):
    os.remove(os.path.join(cut_dir, name))
  cut = train.train_and_evaluate(config(), cut_dir)
  assert ref["replay_bytes"] == cut["replay_bytes"] == 3 * 8 * 32 * 32 * 4
  assert ref["accuracy_series"] == cut["accuracy_series"]
  with open(os.path.join(ref_dir, model_io.META), encoding="utf-8") as f:
    ref_sha = json.load(f)["sha256"]
  with open(os.path.join(cut_dir, model_io.META), encoding="utf-8") as f:
    assert json.load(f)["sha256"] == ref_sha


def _condensed_set(tmp_path):
  """A few-shot set (2 real training images per class) in the teacher's input space."""
  # pylint: disable-next=g-import-not-at-top
  from dfkd_jax.condensation import condensed_set as condensed
  import numpy as np  # pylint: disable=g-import-not-at-top
  x, y = datasets.load_split("fashion_mnist", "train", None, 32, limit=512)
  idx = np.concatenate([np.flatnonzero(y == k)[:2] for k in range(10)])
  path = str(tmp_path / "fewshot.npz")
  condensed.save_condensed(path, x[idx], y[idx], {"kind": "fewshot", "num_classes": 10})
  return path


@pytest.mark.parametrize("mode", ["condensed", "naive"])
def test_tiny_guided_run_end_to_end(teacher_dir, tmp_path, mode):
  path = _condensed_set(tmp_path)
  config = get_config(f"method=dfad,tiny,teacher_workdir={teacher_dir},guidance={mode},"
                      f"condensed={path}")
  summary = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert summary["guidance"] == mode and summary["condensed"] == path
  assert summary["label"] == f"dfad + {mode} (fewshot)"
  assert math.isfinite(summary["final"]) and summary["iterations"] == config.distill.num_iters


def test_student_ema_is_evaluated_next_to_the_student(teacher_dir, tmp_path):
  config = get_config(f"method=dfad,tiny,teacher_workdir={teacher_dir}")
  config.distill.student_ema = 0.5
  summary = train.train_and_evaluate(config, str(tmp_path / "ema"))
  ema = summary["ema"]
  assert ema["decay"] == 0.5 and len(ema["accuracy_series"]) == len(summary["accuracy_series"])
  assert ema["final"] == ema["accuracy_series"][-1] and 0 <= ema["final"] <= 100
  logged = [json.loads(line) for line in open(tmp_path / "ema" / "metrics.jsonl")]
  assert [m["test/accuracy_ema"] for m in logged if "test/accuracy_ema" in m] == \
      ema["accuracy_series"]
  config.distill.student_ema = 1.5
  with pytest.raises(ValueError, match=r"student_ema=1.5 \(must be in \[0, 1\)\)"):
    train.train_and_evaluate(config, str(tmp_path / "bad_ema"))


def test_kd_on_the_condensed_set_alone(teacher_dir, tmp_path):
  path = _condensed_set(tmp_path)
  config = get_config(f"method=kd_condensed,tiny,teacher_workdir={teacher_dir},condensed={path}")
  summary = train.train_and_evaluate(config, str(tmp_path / "kdc"))
  assert summary["method"] == "kd_condensed" and summary["label"] == "kd_condensed (fewshot)"
  assert 0 <= summary["test_accuracy"] <= 100 and "teacher_agreement" in summary


# --------------------------------------------------------------- NaN guard


def test_non_finite_loss_stops_before_checkpointing(distill_run, teacher_dir, tmp_path):
  """Resumes a finished tiny dfad run (N iterations, last checkpoint N) with a poisoned loss
  weight for 2 more iterations: the run must stop with NonFiniteLossError naming checkpoint N,
  and write no checkpoint after it."""
  good_dir, summary = distill_run("dfad")
  last_good = summary["iterations"]
  workdir = str(tmp_path / "nan")
  shutil.copytree(good_dir, workdir)
  config = get_config(f"method=dfad,tiny,teacher_workdir={teacher_dir}")
  config.distill.num_iters = last_good + 2
  config.distill.checkpoint_every = 1  # would save every iteration if the guard let it
  config.loss.adv = float("inf")  # a -inf generator loss, then NaN generator weights
  # Resuming with other settings is refused, so make these the run's own settings (as if it had
  # been started with them and diverged only now).
  meta_path = os.path.join(workdir, "checkpoints", str(last_good), "meta", "metadata")
  with open(meta_path, encoding="utf-8") as f:
    meta = json.load(f)
  meta["run_config"] = json.loads(config.to_json_best_effort())
  with open(meta_path, "w", encoding="utf-8") as f:
    json.dump(meta, f)
  with pytest.raises(distill.NonFiniteLossError) as err:
    train.train_and_evaluate(config, workdir)
  message = str(err.value)
  assert f"Last good checkpoint: {last_good} in" in message
  assert os.path.join(workdir, "checkpoints") in message
  steps = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps()
  assert steps and max(steps) == last_good
  with open(os.path.join(workdir, "summary.json"), encoding="utf-8") as f:
    assert json.load(f)["iterations"] == last_good  # the copied summary, not rewritten


# --------------------------------------------------------------- bad input, one line each


def _bad_input_cases(teacher_dir, tmp):
  base = f"--config={CONFIG_FILE}:method=dfad,tiny,teacher_workdir={teacher_dir}"
  return {
      "missing_teacher": ([f"--config={CONFIG_FILE}:method=dfad,tiny,"
                           f"teacher_workdir={tmp}/no_such_teacher"], None,
                          ["No teacher checkpoint", "no_such_teacher", "method=teacher"]),
      "teacher_architecture": ([base, "--config.teacher.model=resnet8"], None,
                               ["lenet5_bn", "resnet8", "--config.teacher.model=lenet5_bn"]),
      "unknown_student": ([base, "--config.student.model=nope"], None,
                          ["'nope'", "lenet5_half_bn", "resnet18", "wrn16_2"]),
      "unknown_method": ([f"--config={CONFIG_FILE}:method=nope,tiny,"
                          f"teacher_workdir={teacher_dir}"], None,
                         ["'nope'", ", ".join(sorted(methods.METHODS))]),
      "indivisible_batch": ([base, "--config.distill.batch_size=12"],
                            {"XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
                            ["distill.batch_size=12", "8 devices"]),
  }


@pytest.fixture(scope="module")
def bad_input_results(teacher_dir, tmp_path_factory):
  """Runs every bad-input command line concurrently; name -> (returncode, stdout, stderr)."""
  tmp = str(tmp_path_factory.mktemp("bad_input"))
  procs = {}
  for name, (args, env_extra, _) in _bad_input_cases(teacher_dir, tmp).items():
    cmd, env = _cli([*args, f"--workdir={tmp}/{name}"], env_extra)
    procs[name] = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True)
  results = {}
  for name, proc in procs.items():
    out, err = proc.communicate(timeout=300)
    results[name] = (proc.returncode, out, err)
  return results


@pytest.mark.parametrize("name", ["missing_teacher", "teacher_architecture", "unknown_student",
                                  "unknown_method", "indivisible_batch"])
def test_bad_input_is_one_line_error(name, bad_input_results, teacher_dir, tmp_path):
  returncode, _, stderr = bad_input_results[name]
  assert returncode == 2, stderr[-3000:]
  assert stderr.startswith("error:"), stderr[-3000:]
  assert "Traceback" not in stderr
  assert len(stderr.strip().splitlines()) == 1, stderr
  for fragment in _bad_input_cases(teacher_dir, str(tmp_path))[name][2]:
    assert fragment in stderr, (fragment, stderr)


def test_rerun_of_finished_distill_run_completes(distill_run, teacher_dir, tmp_path):
  """A finished run re-run with the same command ends with the same summary (no Orbax
  'step already exists' error)."""
  workdir, summary = distill_run("dafl")
  copy = str(tmp_path / "again")
  shutil.copytree(workdir, copy)
  config = get_config(f"method=dafl,tiny,teacher_workdir={teacher_dir}")
  again = train.train_and_evaluate(config, copy)
  assert again["accuracy_series"] == summary["accuracy_series"]
  assert again["final"] == summary["final"]


def test_ce_weight_without_labels_is_a_clear_error(teacher_dir, tmp_path):
  config = get_config(f"method=dfad,tiny,teacher_workdir={teacher_dir}")
  config.loss.ce = 1.0
  with pytest.raises(ValueError, match="loss.ce"):
    train.train_and_evaluate(config, str(tmp_path / "ce"))


def test_time_budget_stops_the_run_and_records_the_training_clock(distill_run, teacher_dir,
                                                                  tmp_path):
  """`distill.time_budget_s` ends a run early (with a final evaluation); every evaluation
  records the training clock, which excludes the evaluations and grows monotonically."""
  _, full = distill_run("dfad")
  clock = full["eval_clock_seconds"]
  assert len(clock) == len(full["accuracy_series"]) and clock == sorted(clock)
  assert 0 < clock[0] <= full["clock_seconds"]
  assert full["stopped_by_time_budget"] is False
  config = get_config(f"method=dfad,tiny,teacher_workdir={teacher_dir}")
  config.distill.time_budget_s = 1e-3  # reached by the first iteration
  summary = train.train_and_evaluate(config, str(tmp_path / "budget"))
  assert summary["stopped_by_time_budget"] is True
  assert summary["iterations"] == 1 < config.distill.num_iters
  assert summary["eval_steps"] == [1] and len(summary["eval_clock_seconds"]) == 1
