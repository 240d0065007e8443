"""Tests of `dfkd_jax.train.loop`, the one training loop: the teacher is never checkpointed, resuming
with another teacher is a clear error, a resumed run ends like an uninterrupted one, and a NaN
stops the run before it is checkpointed."""
import json
import os

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


def _run(workdir, num_steps, teacher_value=3.0, sha="a" * 64, scale=1.0):
  chex.clear_trace_counter()  # each run builds its own step, as the real modes do
  jitted = loop.jit_step(_step)
  state = _State(step=jnp.int32(0), w=jnp.zeros(4), teacher=jnp.full((5,), teacher_value))
  seen_teacher = []

  def evaluate(s):
    seen_teacher.append(float(s.teacher[0]))
    return {"accuracy": float(s.w[0])}

  schedule = loop.Schedule("toy", num_steps, log_every=2, eval_every=2, checkpoint_every=2)
  out = loop.run(schedule, state, lambda s, it: jitted(s, jnp.float32(scale)), evaluate,
                 str(workdir), config_json=json.dumps({"toy": True}), teacher_sha256=sha)
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
