"""Tests of supervised training (teacher / kd_real): outputs, data parallelism, tracing, resuming.

One tiny teacher is trained per module (in process) and shared: its files are checked, it is the
uninterrupted reference for the kill-and-resume test and the teacher of the kd_real run.
"""
import glob
import json
import os
import shutil
import subprocess
import time

import chex
import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.train import evaluation
from dfkd_jax.io import model_io
from dfkd_jax import models as models_lib
from dfkd_jax import optim
from dfkd_jax import parallel
from dfkd_jax import state as state_lib
from dfkd_jax.train import supervised
from dfkd_jax import train
from dfkd_jax.data import datasets

# Long enough that a kill right after the step-4 checkpoint always lands mid-run.
_NUM_STEPS = 24


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
  """(workdir, summary) of a tiny teacher trained in process for `_NUM_STEPS` steps."""
  helpers.require_fashion_mnist()
  workdir = str(tmp_path_factory.mktemp("teacher"))
  config = helpers.tiny_teacher_config(num_steps=_NUM_STEPS)
  summary = train.train_and_evaluate(config, workdir)
  return workdir, summary


def _read_json(path):
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def test_teacher_run_outputs(teacher_run):
  workdir, summary = teacher_run
  assert summary == _read_json(os.path.join(workdir, "summary.json"))
  assert summary["steps"] == _NUM_STEPS
  assert summary["model"] == "lenet5_bn" and summary["method"] == "teacher"
  assert summary["num_devices"] == 8
  # 24 steps of 64 images already beat chance (10%) by far.
  assert 30.0 < summary["test_accuracy"] <= 100.0
  assert summary["eval_steps"] == list(range(4, _NUM_STEPS + 1, 4))
  assert summary["accuracy_series"][-1] == summary["test_accuracy"]
  assert summary["final"] == summary["test_accuracy"]

  meta = _read_json(os.path.join(workdir, model_io.META))
  assert meta["model"] == "lenet5_bn" and meta["num_classes"] == 10
  assert meta["input_shape"] == [32, 32, 1] and meta["dataset"] == "fashion_mnist"
  assert meta["sha256"] == summary["sha256"]
  assert helpers.sha256_file(os.path.join(workdir, model_io.WEIGHTS)) == summary["sha256"]

  with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
    records = [json.loads(line) for line in f if line.strip()]
  assert records
  assert [r["step"] for r in records if "loss" in r] == list(range(4, _NUM_STEPS + 1, 4))
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  # memory against run length: the process's RSS at every logged step, and its peak
  rss = [r["host_rss_mib"] for r in records]
  assert all(50 < m < 64 * 1024 for m in rss)
  assert summary["host_peak_rss_bytes"] >= max(rss) * 2 ** 20 * 0.999
  assert records[-1]["test/accuracy"] == summary["test_accuracy"]

  events = glob.glob(os.path.join(workdir, "tb", "events.out.tfevents.*"))
  assert events and os.path.getsize(events[0]) > 0
  assert os.path.isfile(os.path.join(workdir, "config.json"))
  assert os.path.isdir(os.path.join(workdir, "checkpoints", str(_NUM_STEPS)))


def test_exported_teacher_reloads_with_same_accuracy(teacher_run):
  workdir, summary = teacher_run
  _, frozen, meta = model_io.load_model(workdir, expect_model="lenet5_bn", expect_classes=10,
                                        expect_channels=1)
  assert meta["sha256"] == summary["sha256"]
  x, y = datasets.load_split("fashion_mnist", "test", pad_to=32, limit=512)
  acc = evaluation.evaluate(frozen.apply_fn, frozen.variables, jnp.asarray(x), jnp.asarray(y))
  assert acc["accuracy"] == summary["test_accuracy"]


def _small_step_setup(batch_size=16, n=64, augment="crop_flip"):
  config = helpers.tiny_teacher_config(batch_size=batch_size, augment=augment)
  module = models_lib.get_model("lenet5_bn", num_classes=10)
  key = jax.random.key(0)
  kx, ky, kinit, kstate = jax.random.split(key, 4)
  images = jax.random.normal(kx, (n, 32, 32, 1))
  labels = jax.random.randint(ky, (n,), 0, 10)
  params, batch_stats = state_lib.init_model(module, kinit, images[:1])
  tx = optim.make_optimizer(config.optimizer, 10)
  state = supervised.SupervisedState(
      step=jnp.zeros((), jnp.int32), rng=kstate,
      model=state_lib.TrainState.create(apply_fn=module.apply, params=params,
                                        batch_stats=batch_stats, tx=tx))
  perm = jax.random.permutation(jax.random.key(1), n).astype(jnp.int32)
  return config, state, images, labels, perm, n // batch_size


def test_step_on_8_devices_equals_1_device():
  assert jax.device_count() == 8, "conftest should give 8 fake CPU devices"
  config, state, images, labels, perm, steps_per_epoch = _small_step_setup()
  results = {}
  for num_devices in (8, 1):
    mesh = parallel.make_mesh(num_devices)
    step = jax.jit(supervised.make_train_step(config, mesh, steps_per_epoch))
    s = parallel.replicate(state, mesh)
    args = [parallel.replicate(a, mesh) for a in (images, labels, perm)]
    losses = []
    for _ in range(2):  # the second step also exercises the momentum buffer
      s, metrics = step(s, *args)
      losses.append(float(metrics["loss"]))
    for leaf in jax.tree.leaves(s.model.params):
      assert len(leaf.sharding.device_set) == num_devices
    results[num_devices] = (jax.device_get(s.model.params), jax.device_get(s.model.batch_stats),
                            losses, int(s.step))
  p8, bs8, l8, step8 = results[8]
  p1, bs1, l1, step1 = results[1]
  assert step8 == step1 == 2
  np.testing.assert_allclose(l8, l1, rtol=1e-5)
  chex.assert_trees_all_close(p8, p1, rtol=1e-4, atol=1e-6)
  chex.assert_trees_all_close(bs8, bs1, rtol=1e-4, atol=1e-6)
  # The step did change the parameters (the comparison above is not vacuous).
  p0 = jax.device_get(state.model.params)
  diffs = jax.tree.leaves(jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), p8, p0))
  assert max(diffs) > 1e-4


def test_sharded_step_equals_the_replicated_step_on_the_same_rows():
  """data_placement=sharded: each device draws its share of the batch from its own rows; the
  step equals the replicated step given the same global rows in the same order."""
  config, state, images, labels, _, _ = _small_step_setup(batch_size=16, n=64)
  mesh = parallel.make_mesh(8)
  rows = 64 // 8
  local = jnp.stack([jax.random.permutation(jax.random.key(d), rows) for d in range(8)])
  local = local.astype(jnp.int32)
  steps_per_epoch = rows // 2
  sharded_step = jax.jit(supervised.make_train_step(config, mesh, steps_per_epoch, sharded=True))
  replicated_step = jax.jit(supervised.make_train_step(config, mesh, steps_per_epoch))
  # The replicated permutation visiting the same rows: step i takes 2 rows of every device.
  glob = jnp.concatenate([(jnp.arange(8)[:, None] * rows + local[:, 2 * i:2 * i + 2]).ravel()
                          for i in range(steps_per_epoch)])
  s1 = parallel.replicate(state, mesh)
  a1 = (parallel.put(images, parallel.batch_sharding(mesh)),
        parallel.put(labels, parallel.batch_sharding(mesh)),
        parallel.put(local, parallel.batch_sharding(mesh)))
  s2 = parallel.replicate(state, mesh)
  a2 = [parallel.replicate(a, mesh) for a in (images, labels, glob)]
  for _ in range(2):
    s1, m1 = sharded_step(s1, *a1)
    s2, m2 = replicated_step(s2, *a2)
    assert float(m1["loss"]) == pytest.approx(float(m2["loss"]), rel=1e-5)
  chex.assert_trees_all_close(jax.device_get(s1.model.params), jax.device_get(s2.model.params),
                              rtol=1e-4, atol=1e-6)


def test_sharded_placement_trains_a_teacher(tmp_path):
  """A whole run with the training split split over the 8 devices (each holds 1/8 of it)."""
  helpers.require_fashion_mnist()
  config = helpers.tiny_teacher_config(num_steps=8)
  config.data_placement = "sharded"
  summary = train.train_and_evaluate(config, str(tmp_path))
  assert summary["num_devices"] == 8 and summary["steps"] == 8
  assert summary["test_accuracy"] > 20.0  # 10 % is chance
  config.data_placement = "everywhere"
  with pytest.raises(ValueError, match="data_placement='everywhere'; valid: auto, replicated"):
    train.train_and_evaluate(config, str(tmp_path / "bad"))


@pytest.mark.parametrize("num_devices", [1, 3, 8])
def test_evaluation_splits_the_examples_over_the_devices(num_devices):
  """Counts equal a direct computation for a split that fills neither the batch nor the
  devices evenly (padding rows never count), on 1, 3 and 8 devices."""
  module = models_lib.get_model("lenet5_bn", num_classes=10)
  images = jax.random.normal(jax.random.key(0), (37, 32, 32, 1))
  labels = jax.random.randint(jax.random.key(1), (37,), 0, 10)
  params, batch_stats = state_lib.init_model(module, jax.random.key(2), images[:1])
  variables = state_lib.model_variables(params, batch_stats)
  logits, _ = module.apply(variables, images, train=False)
  pred = np.argmax(np.asarray(logits), -1)
  mesh = parallel.make_mesh(num_devices)
  split = evaluation.place_arrays(images, labels, mesh, batch_size=10)
  assert split.images.shape[0] % (num_devices * split.per_device) == 0
  assert len(split.images.sharding.device_set) == num_devices
  ev = evaluation.evaluate(module.apply, variables, split)
  assert ev["accuracy"] == pytest.approx(100.0 * np.sum(pred == np.asarray(labels)) / 37)


def test_step_traces_once():
  config, state, images, labels, perm, steps_per_epoch = _small_step_setup(augment="none")
  mesh = parallel.make_mesh()
  chex.clear_trace_counter()
  step = jax.jit(chex.assert_max_traces(
      supervised.make_train_step(config, mesh, steps_per_epoch), n=1), donate_argnums=0)
  s = parallel.replicate(state, mesh)
  args = [parallel.replicate(a, mesh) for a in (images, labels, perm)]
  for _ in range(steps_per_epoch + 2):  # crosses an epoch boundary (step % steps_per_epoch)
    s, metrics = step(s, *args)
  assert int(s.step) == steps_per_epoch + 2
  assert np.isfinite(float(metrics["loss"]))
  # A new permutation of the same shape (next epoch) does not retrace either.
  s, _ = step(s, args[0], args[1], parallel.replicate(perm[::-1], mesh))
  # ... but a changed shape would, and the guard catches it.
  with pytest.raises(AssertionError):
    step(s, args[0][:32], args[1][:32], args[2][:32])
  chex.clear_trace_counter()


def test_resume_after_kill_equals_uninterrupted(teacher_run, tmp_path):
  ref_dir, ref = teacher_run
  workdir = tmp_path / "killed"
  args = (f"--config={helpers.TEACHER_CONFIG}:method=teacher,tiny",
          f"--config.num_steps={_NUM_STEPS}", f"--workdir={workdir}")
  log_path = tmp_path / "first.log"
  with open(log_path, "w", encoding="utf-8") as log:
    proc = subprocess.Popen(helpers.cli_command("dfkd_jax.cli.main", *args), cwd=helpers.REPO_ROOT,
                            env=helpers.cli_env(), stdout=log, stderr=subprocess.STDOUT)
    try:
      first_ckpt = workdir / "checkpoints" / "4"
      deadline = time.monotonic() + 240
      while not first_ckpt.is_dir():
        assert proc.poll() is None, f"run ended before its first checkpoint:\n" \
            f"{log_path.read_text()[-3000:]}"
        assert time.monotonic() < deadline, "no checkpoint after 240 s"
        time.sleep(0.005)
    finally:
      proc.kill()
      proc.wait()
  assert not (workdir / "summary.json").exists(), "the run finished before it was killed"

  second = helpers.run_cli("dfkd_jax.cli.main", *args, timeout=300)
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resumed from step" in second.stdout, second.stdout[-3000:]
  resumed_at = int(second.stdout.split("Resumed from step ")[1].split()[0])
  assert 4 <= resumed_at < _NUM_STEPS

  got = _read_json(workdir / "summary.json")
  for key in ("steps", "test_accuracy", "accuracy_series", "eval_steps", "sha256"):
    assert got[key] == ref[key], key
  assert (helpers.sha256_file(workdir / "model.msgpack")
          == helpers.sha256_file(os.path.join(ref_dir, "model.msgpack")))


def test_kd_real(teacher_run, tmp_path):
  teacher_dir, teacher_summary = teacher_run
  config = helpers.load_config(f"{helpers.TEACHER_CONFIG}:method=kd_real,tiny",
                               [f"--config.teacher.workdir={teacher_dir}"])
  summary = train.train_and_evaluate(config, str(tmp_path / "kd"))
  assert summary["method"] == "kd_real" and summary["model"] == "lenet5_half_bn"
  assert 0.0 <= summary["teacher_agreement"] <= 100.0
  assert summary["teacher_agreement"] > 20.0  # well above chance after 8 KD steps
  assert summary["teacher_sha256"] == teacher_summary["sha256"]
  meta = _read_json(tmp_path / "kd" / model_io.META)
  assert meta["model"] == "lenet5_half_bn" and meta["method"] == "kd_real"


def test_kd_real_wrong_teacher_architecture(teacher_run, tmp_path):
  teacher_dir, _ = teacher_run
  config = helpers.tiny_teacher_config(method="kd_real")
  config.teacher.workdir = teacher_dir
  config.teacher.model = "resnet8"
  with pytest.raises(model_io.ModelLoadError) as e:
    train.train_and_evaluate(config, str(tmp_path / "kd"))
  msg = str(e.value)
  assert "'lenet5_bn'" in msg and "'resnet8'" in msg
  assert "--config.teacher.model=lenet5_bn" in msg


def test_kd_real_missing_teacher(tmp_path):
  helpers.require_fashion_mnist()
  config = helpers.tiny_teacher_config(method="kd_real")
  config.teacher.workdir = str(tmp_path / "no_teacher")
  with pytest.raises(model_io.ModelLoadError, match="No teacher checkpoint") as e:
    train.train_and_evaluate(config, str(tmp_path / "kd"))
  assert "method=teacher" in str(e.value)
  assert str(tmp_path / "no_teacher") in str(e.value)


def test_batch_size_not_divisible_by_devices(tmp_path):
  config = helpers.tiny_teacher_config(batch_size=12, num_devices=0)
  with pytest.raises(ValueError, match="divisible") as e:
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert "batch_size=12" in str(e.value) and "8 devices" in str(e.value)


def test_too_many_devices_requested(tmp_path):
  config = helpers.tiny_teacher_config(num_devices=16)
  with pytest.raises(ValueError, match="16 devices but only 8"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_rerun_of_finished_run_completes(teacher_run, tmp_path):
  """Re-running a finished (or killed-after-final-save) run must not fail on the existing
  final checkpoint; it re-exports the same model."""
  workdir, summary = teacher_run
  copy = str(tmp_path / "again")
  shutil.copytree(workdir, copy)
  os.remove(os.path.join(copy, "summary.json"))
  again = train.train_and_evaluate(helpers.tiny_teacher_config(num_steps=_NUM_STEPS), copy)
  assert again["test_accuracy"] == summary["test_accuracy"]
  assert again["sha256"] == summary["sha256"]
