"""Tests of `dfkd_jax.train.loop`, the one training loop: the teacher is never checkpointed, resuming
with another teacher is a clear error, a resumed run ends like an uninterrupted one, and a NaN
stops the run before it is checkpointed."""
import json
import os
import subprocess
import sys

import chex
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.io import checkpointing
from dfkd_jax.train import loop


@flax.struct.dataclass
class _State:
  step: jax.Array
  w: jax.Array
  teacher: jax.Array | None


def _step(state, scale):
  w = state.w + scale
  return state.replace(step=state.step + 1, w=w), {"loss": jnp.sum(w)}


def _run(workdir, num_steps, teacher_value=3.0, sha="a" * 64, scale=1.0, config=None,
         width=4, extend=False):
  chex.clear_trace_counter()  # each run builds its own step, as the real modes do
  jitted = loop.jit_step(_step)
  state = _State(step=jnp.int32(0), w=jnp.zeros(width), teacher=jnp.full((5,), teacher_value))
  seen_teacher = []

  def evaluate(s):
    seen_teacher.append(float(s.teacher[0]))
    return {"accuracy": float(s.w[0])}

  schedule = loop.Schedule("toy", num_steps, log_every=2, eval_every=2, checkpoint_every=2,
                           extend=extend)
  out = loop.run(schedule, state, lambda s, it: jitted(s, jnp.float32(scale)), evaluate,
                 str(workdir), config_json=json.dumps(config or {"toy": True}),
                 teacher_sha256=sha)
  return out, seen_teacher


def test_teacher_is_not_in_the_checkpoint_and_is_put_back_on_resume(tmp_path):
  out, _ = _run(tmp_path, 4)
  assert out.steps == 4 and float(out.state.w[0]) == 4.0
  ckpt = checkpointing.Checkpointer(os.path.join(tmp_path, "checkpoints"))
  template = _State(step=jnp.int32(0), w=jnp.zeros(4), teacher=None)
  restored, meta = ckpt.restore(template)  # a template without a teacher fits the checkpoint
  ckpt.close()
  assert restored.teacher is None and meta["teacher_sha256"] == "a" * 64
  np.testing.assert_array_equal(restored.w, np.full(4, 4.0))
  # Resuming for 2 more steps: the teacher evaluated is the one passed in, not a stored copy.
  out, seen = _run(tmp_path, 6, teacher_value=7.0)
  assert out.steps == 6 and float(out.state.w[0]) == 6.0 and seen == [7.0]
  assert out.history["eval_steps"] == [2, 4, 6]
  assert out.history["accuracy"] == [2.0, 4.0, 6.0]


def test_resume_with_another_teacher_is_a_clear_error(tmp_path):
  _run(tmp_path, 2)
  with pytest.raises(checkpointing.CheckpointError, match=r"aaaaaaaaaaaa.*bbbbbbbbbbbb.*--workdir"):
    _run(tmp_path, 4, sha="b" * 64)


def test_non_finite_loss_stops_before_checkpointing(tmp_path):
  with pytest.raises(loop.NonFiniteLossError, match=r"step 2 .*Last good checkpoint: none"):
    _run(tmp_path, 4, scale=float("nan"))
  assert not os.path.isdir(os.path.join(tmp_path, "checkpoints", "2"))


def test_time_budget_stops_and_evaluates(tmp_path):
  chex.clear_trace_counter()
  jitted = loop.jit_step(_step)
  state = _State(step=jnp.int32(0), w=jnp.zeros(4), teacher=None)
  schedule = loop.Schedule("toy", 10_000, 100, 100, 100, time_budget_s=1e-9)
  out = loop.run(schedule, state, lambda s, it: jitted(s, jnp.float32(1.0)),
                 lambda s: {"accuracy": 1.0}, str(tmp_path), config_json="{}")
  assert out.stopped_by_time_budget and out.steps == 1
  assert out.history["eval_steps"] == [1]


def test_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, capsys):
  _run(tmp_path, 4)  # checkpoints at 2 and 4
  meta_path = os.path.join(tmp_path, "checkpoints", "4", "meta", "metadata")
  meta = json.load(open(meta_path))
  meta["state_sha256"] = "0" * 64  # as if the stored arrays no longer matched
  json.dump(meta, open(meta_path, "w"))
  out, _ = _run(tmp_path, 6)
  assert "step 4" in capsys.readouterr().out and out.steps == 6
  assert os.path.isdir(os.path.join(tmp_path, "checkpoints.damaged", "4"))  # kept aside
  assert float(out.state.w[0]) == 6.0 and out.history["eval_steps"] == [2, 4, 6]
  assert out.history["accuracy"] == [2.0, 4.0, 6.0]


def test_resume_with_another_config_names_the_differences(tmp_path):
  base = {"seed": 0, "distill": {"num_iters": 4, "log_every": 2}, "label": "a"}
  _run(tmp_path, 2, config=base)
  changed = {"seed": 1, "distill": {"num_iters": 5, "log_every": 2}, "label": "a"}
  with pytest.raises(loop.ConfigMismatchError,
                     match=r"distill.num_iters: 4 -> 5; seed: 0 -> 1.*--workdir"):
    _run(tmp_path, 4, config=changed)
  assert json.load(open(tmp_path / "config.json")) == base  # not overwritten by the refused run
  # Logging cadence and labels do not change the computation: that resume is allowed.
  # A field the checkpoint's config lacks (added by a later version) takes its default.
  out, _ = _run(tmp_path, 4, config={**base, "distill": {"num_iters": 4, "log_every": 1,
                                                         "added_later": 0.0}, "label": "b"})
  assert out.steps == 4


def test_a_second_run_on_a_busy_workdir_is_refused_and_a_dead_holder_does_not_block(tmp_path):
  holder = subprocess.Popen(
      [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
       "fcntl.flock(f, fcntl.LOCK_EX); f.write('4242'); f.flush(); print('locked', flush=True); "
       "time.sleep(60)", str(tmp_path / ".lock")], stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(loop.WorkdirBusyError, match=r"Another run is using .*4242"):
      _run(tmp_path, 2)
    assert not os.path.isdir(tmp_path / "checkpoints")
  finally:
    holder.kill()
    holder.wait()
  out, _ = _run(tmp_path, 2)  # the killed holder's lock is gone with it
  assert out.steps == 2


def _logged_steps(workdir):
  return [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_resume_after_a_kill_logs_each_step_once(tmp_path):
  _run(tmp_path, 4)  # logs and evaluates at 2 and 4; checkpoints at 2 and 4
  reference = _logged_steps(tmp_path)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(tmp_path, "checkpoints", "4"))  # killed before its checkpoint
  with open(os.path.join(tmp_path, "metrics.jsonl"), "a") as f:
    f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')  # and a line cut by the kill
  out, _ = _run(tmp_path, 4)
  assert out.steps == 4 and _logged_steps(tmp_path) == reference


def test_rerun_of_a_finished_run_keeps_its_compile_time_and_rate(tmp_path):
  first, _ = _run(tmp_path, 4)
  assert first.compile_seconds is not None and first.steps_per_second is not None
  again, _ = _run(tmp_path, 4)
  assert again.steps == 4
  assert again.compile_seconds == first.compile_seconds
  assert again.steps_per_second == first.steps_per_second


def test_a_config_that_changes_the_state_is_refused_before_any_array_is_read(tmp_path):
  """The checkpoint's config is compared first: a run whose state no longer fits is a
  ConfigMismatchError naming the field, and every checkpoint stays where it was."""
  _run(tmp_path, 4, config={"width": 4})
  before = sorted(os.listdir(tmp_path / "checkpoints"))
  with pytest.raises(loop.ConfigMismatchError, match=r"width: 4 -> 8"):
    _run(tmp_path, 6, config={"width": 8}, width=8)
  assert sorted(os.listdir(tmp_path / "checkpoints")) == before
  assert not os.path.exists(tmp_path / "checkpoints.damaged")


def test_a_longer_run_resumes_only_when_extension_is_asked_for(tmp_path, capsys):
  """A grown run length is refused with a hint at --extend_budget; with it the run continues
  from its checkpoint; a shorter length is refused even then, as is any other change."""
  cfg = lambda n, seed=0: {"seed": seed, "distill": {"num_iters": n}}
  _run(tmp_path, 4, config=cfg(4))
  with pytest.raises(loop.ConfigMismatchError, match=r"num_iters: 4 -> 6.*--extend_budget"):
    _run(tmp_path, 6, config=cfg(6))
  with pytest.raises(loop.ConfigMismatchError, match=r"seed: 0 -> 1"):
    _run(tmp_path, 6, config=cfg(6, seed=1), extend=True)  # extension allows lengths only
  out, _ = _run(tmp_path, 6, config=cfg(6), extend=True)
  assert out.steps == 6 and float(out.state.w[0]) == 6.0  # 4 restored steps + 2 new ones
  assert "Extending the run: distill.num_iters 4 -> 6" in capsys.readouterr().out
  assert [(x["from_step"], x["to_step"]) for x in out.history["launches"]] == [(0, 4), (4, 6)]
  with pytest.raises(loop.ConfigMismatchError, match=r"only lengthens.*num_iters: 6 -> 5"):
    _run(tmp_path, 5, config=cfg(5), extend=True)
  again, _ = _run(tmp_path, 6, config=cfg(6))  # the extended length is now the run's own
  assert again.steps == 6


def test_each_launch_is_accounted_and_the_seconds_add_up(tmp_path):
  """train_seconds is the sum of every training launch's seconds (compilation included), each
  launch listed with its steps and compile time; a re-run of a finished run adds none."""
  _run(tmp_path, 4)
  import shutil  # pylint: disable=g-import-not-at-top
  shutil.rmtree(os.path.join(tmp_path, "checkpoints", "4"))  # killed after step 2's checkpoint
  out, _ = _run(tmp_path, 4)
  launches = out.history["launches"]
  assert [(x["from_step"], x["to_step"]) for x in launches] == [(0, 2), (2, 4)]
  assert all(x["compile_seconds"] > 0 for x in launches)
  assert sum(x["train_seconds"] for x in launches) == pytest.approx(
      out.history["train_seconds"], abs=0.01)
  summary = out.common_summary()
  assert summary["compile_seconds_total"] == pytest.approx(
      sum(x["compile_seconds"] for x in launches), abs=1e-3)
  again, _ = _run(tmp_path, 4)
  assert again.history["launches"] == launches
