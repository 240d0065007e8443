"""The one training loop of every mode: supervised (teacher, scratch, kd_real, kd_condensed) and
every data-free method.

A mode brings a jitted, donated step (`jit_step`), an evaluation and its schedule (`Schedule`);
`run` does the rest once for all of them: config.json, checkpoint/restore (the frozen teacher is
not stored, only its sha256, and resuming with another teacher is an error), the NaN guard (the
finiteness of every metric is folded into a device scalar and checked at log, eval and checkpoint
time, so a bad state is never checkpointed), logging and progress, the training clock
(compilation included; evaluations, pictures and checkpoints excluded), an optional wall-clock
budget, and closing everything on the way out. The test split is only reported, never used to
choose anything.
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import os
import time
from typing import Any, Callable

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax.io import files
from dfkd_jax.io import checkpointing
from dfkd_jax import compile as compile_lib
from dfkd_jax import config_blocks
from dfkd_jax import parallel
from dfkd_jax.io import logging_utils
from dfkd_jax import numerics as numerics_lib


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN/inf; the last good checkpoint is kept."""


class WorkdirBusyError(RuntimeError):
  """Another process is running in the same workdir."""


class ConfigMismatchError(ValueError):
  """A resumed run's config differs from its checkpoint's in what the computation depends on."""


# Config fields (by their last name) that a resume may change: the bookkeeping ones and the
# evaluation subset. Any other difference stops a resume, except fields the checkpoint's config
# lacks (added by a later version of the library).
RESUMABLE_FIELDS = config_blocks.BOOKKEEPING_FIELDS | {"test_limit"}
# The condensed set is part of the checkpointed state: its file may move.
RESUMABLE_PATHS = frozenset({"condensed.path"})
# Run lengths: a resume may grow them when asked to (`Schedule.extend`, `--extend_budget`).
BUDGET_FIELDS = frozenset({"num_iters", "num_steps", "num_epochs"})


def config_differences(saved: dict, current: dict, ignore=frozenset()) -> list[str]:
  """`key: saved -> current` for every field that differs, except `RESUMABLE_FIELDS` and the
  field names in `ignore`."""
  a, b = config_blocks.flatten(saved), config_blocks.flatten(current)
  out = []
  for key in sorted(set(a) | set(b)):
    name = key.rsplit(".", 1)[-1]
    if name in RESUMABLE_FIELDS or name in ignore or key in RESUMABLE_PATHS:
      continue
    if key not in a:  # a field added by a later version of the library: its default is used
      continue
    if a.get(key, "<absent>") != b.get(key, "<absent>"):
      out.append(f"{key}: {a.get(key, '<absent>')!r} -> {b.get(key, '<absent>')!r}")
  return out


_HELD_LOCKS: dict[str, list] = {}  # realpath of workdir -> [open lock file, depth]


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """Holds an exclusive lock on `workdir/.lock` (re-entrant within this process: the run modes
  take it around the whole run, the loop again around its part). The kernel drops it when the
  process ends, however it ends; raises WorkdirBusyError if another process holds it."""
  os.makedirs(workdir, exist_ok=True)
  if not parallel.is_main_process():  # a multi-process run: process 0 holds it for all
    yield
    return
  key = os.path.realpath(workdir)
  if key in _HELD_LOCKS:
    _HELD_LOCKS[key][1] += 1
  else:
    _HELD_LOCKS[key] = [_lock_file(workdir), 1]
  try:
    yield
  finally:
    _HELD_LOCKS[key][1] -= 1
    if not _HELD_LOCKS[key][1]:
      _HELD_LOCKS.pop(key)[0].close()


def _lock_file(workdir: str):
  """Opens `workdir/.lock` and takes the flock; raises WorkdirBusyError if it is held."""
  path = os.path.join(workdir, ".lock")
  f = open(path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.seek(0)
    owner = f.read().strip() or "unknown"
    f.close()
    raise WorkdirBusyError(  # pylint: disable=raise-missing-from
        f"Another run is using {workdir} (process {owner}). Wait for it to finish, stop it, or "
        "use another --workdir.")
  f.seek(0)
  f.truncate()
  f.write(f"{os.getpid()}\n")
  f.flush()
  return f


def _finite(metrics) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def jit_step(step: Callable, max_traces: int = 1):
  """`step(state, *args) -> (state, metrics)` jitted with the state donated, retracing
  asserted (`chex.assert_max_traces`) and `metrics["finite"]` added for the NaN guard."""

  def wrapped(state, *args):
    state, metrics = step(state, *args)
    metrics = dict(metrics)
    metrics["finite"] = _finite(metrics)
    return state, metrics

  return compile_lib.jit(chex.assert_max_traces(wrapped, max_traces), donate_argnums=0)


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When the loop logs, evaluates and checkpoints (in steps), and its optional time budget."""
  name: str
  num_steps: int
  log_every: int
  eval_every: int
  checkpoint_every: int
  max_to_keep: int = 2
  # > 0: stop after this many seconds of training (compilation included, evaluation
  # excluded), evaluate and finish; a sync per step, so only for benchmarks.
  time_budget_s: float = 0.0
  # Resuming may grow the run's length (`BUDGET_FIELDS` of its config): the learning-rate
  # schedules then end at the new length from the resumed step on. Off: any change is refused.
  extend: bool = False


@dataclasses.dataclass
class Result:
  """What a run produced: the final state, its history and the loop's own measurements."""
  state: Any
  history: dict
  steps: int
  compile_seconds: float | None
  steps_per_second: float | None
  stopped_by_time_budget: bool

  def common_summary(self) -> dict:
    """The summary.json fields every mode shares."""
    h = self.history
    peak = None
    try:
      peak = (jax.local_devices()[0].memory_stats() or {}).get("peak_bytes_in_use")
    except Exception:  # pylint: disable=broad-except  (backends without memory stats)
      pass
    return {
        "accuracy_series": h["accuracy"], "eval_steps": h["eval_steps"],
        "agreement_series": h["agreement"],
        "train_seconds": h["train_seconds"], "eval_seconds": h["eval_seconds"],
        "eval_clock_seconds": h["eval_clock"], "clock_seconds": h.get("clock_seconds"),
        "stopped_by_time_budget": self.stopped_by_time_budget,
        "compile_seconds": self.compile_seconds, "peak_bytes": peak,
        # this process's resident-memory high-water mark (host RAM; on CPU, the run's memory);
        # metrics.jsonl has the current value at every logged step (host_rss_mib)
        "host_peak_rss_bytes": logging_utils.host_peak_rss_bytes(),
        # every launch that trained (a resumed run has several): its steps, compilation and
        # training seconds; train_seconds above is their sum, compilation included
        "launches": h.get("launches", []),
        "compile_seconds_total": round(sum(x["compile_seconds"] for x in h.get("launches", [])),
                                       3),
        "numerics": numerics_lib.current().to_dict(),
    }


def new_history() -> dict:
  return {"eval_steps": [], "accuracy": [], "agreement": [], "train_seconds": 0.0,
          "eval_seconds": 0.0, "eval_clock": []}


def run(schedule: Schedule, state, step_fn: Callable, evaluate: Callable, workdir: str, *,
        config_json: str, teacher_sha256: str | None = None,
        on_eval: Callable | None = None, print_keys: Callable | None = None) -> Result:
  """Trains `state` for `schedule.num_steps` steps in `workdir`, resuming from its checkpoint.

  Args:
    schedule: the step counts and budget.
    state: the initial state, placed on the mesh; its frozen `state.teacher` (None when the mode
      has none) is not checkpointed and is put back after a restore.
    step_fn: `step_fn(state, it) -> (state, metrics)` for the 0-based step `it`: a host-side
      closure around a `jit_step` (so it may feed per-epoch arguments; it must not sync).
    evaluate: `evaluate(state) -> {"accuracy": %, "agreement": % (optional), ...}`; further
      keys (e.g. "accuracy_ema") become series of their own in the history.
    workdir: the run folder (config.json, checkpoints/, metrics.jsonl).
    config_json: the resolved config, written as config.json.
    teacher_sha256: its sha256, stored in every checkpoint and checked on resume.
    on_eval: `on_eval(state, it, logger)` after each evaluation (pictures), off the clock.
    print_keys: `print_keys(metrics) -> keys` printed on the progress line (default: the first
      6 but the NaN guard's `finite`).
  """
  with workdir_lock(workdir):
    return _run_locked(schedule, state, step_fn, evaluate, workdir, config_json=config_json,
                       teacher_sha256=teacher_sha256, on_eval=on_eval, print_keys=print_keys)


def _restore(ckpt, target):
  """The newest checkpoint whose arrays pass their checksum: one that fails it is reported,
  moved aside (`Checkpointer.quarantine`) and the next older one tried; raises if none is left.
  Other restore errors (another state structure, unreadable files) are raised as they are."""
  while True:
    try:
      return ckpt.restore(target)
    except checkpointing.CorruptCheckpointError as e:
      if not [s for s in ckpt.all_steps() if s < e.step]:
        raise
      where = ckpt.quarantine(e.step)
      print(f"warning: {str(e).split(' Earlier checkpoints')[0]} It was moved to {where}; "
            "resuming from the previous checkpoint.", flush=True)


def _budget_changes(saved: dict, current: dict) -> dict:
  """{dotted key: (saved, current)} for the run-length fields that differ."""
  a, b = config_blocks.flatten(saved), config_blocks.flatten(current)
  return {k: (a[k], b[k]) for k in sorted(set(a) & set(b))
          if k.rsplit(".", 1)[-1] in BUDGET_FIELDS and a[k] != b[k]}


def _check_resume(ckpt, meta: dict, teacher_sha256, current_config: dict, workdir: str,
                  extend: bool = False) -> None:
  """Before any array is read: the checkpoint's teacher and config must be this run's (with
  `extend`, up to longer run lengths)."""
  saved = meta.get("teacher_sha256")
  if teacher_sha256 and saved and saved != teacher_sha256:
    raise checkpointing.CheckpointError(
        f"The checkpoint in {ckpt.directory} was trained from the teacher with sha256 "
        f"{saved[:12]}…, but config.teacher.workdir now holds {teacher_sha256[:12]}…. Point "
        "config.teacher.workdir at the original teacher, or use a new --workdir.")
  saved_config = meta.get("run_config") or current_config
  budget = _budget_changes(saved_config, current_config)
  diffs = config_differences(saved_config, current_config, BUDGET_FIELDS if extend else ())
  if diffs:
    only_budget = budget and len(diffs) == len(budget)
    raise ConfigMismatchError(
        f"{workdir} holds a run with another config; resuming it with this one would mix two "
        f"runs. Differences (checkpoint -> now): {'; '.join(diffs)}. Resume with the run's own "
        f"settings ({os.path.join(workdir, 'config.json')}) or use a new --workdir" + (
            "; to continue this run for longer, add --extend_budget (the learning-rate "
            "schedules are then re-sized from the resumed step on)." if only_budget else "."))
  shrunk = [f"{k}: {a!r} -> {b!r}" for k, (a, b) in budget.items()
            if not (isinstance(a, (int, float)) and isinstance(b, (int, float)) and b > a)]
  if shrunk:
    raise ConfigMismatchError(
        f"--extend_budget only lengthens a run; {workdir} would get shorter or change kind "
        f"({'; '.join(shrunk)}). Use the run's own length or a new --workdir.")
  if budget:
    print("Extending the run: " + "; ".join(f"{k} {a} -> {b}" for k, (a, b) in budget.items())
          + ". Its learning-rate schedules now end at the new length (so it differs from a "
          "run started at that length).", flush=True)


def _run_locked(schedule, state, step_fn, evaluate, workdir, *, config_json, teacher_sha256,
                on_eval, print_keys) -> Result:
  """`run` inside the workdir lock."""
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), schedule.max_to_keep)
  history = new_history()
  teacher = state.teacher
  current_config = json.loads(config_json)
  if ckpt.latest_step() is not None:
    try:
      _check_resume(ckpt, ckpt.read_meta(), teacher_sha256, current_config, workdir,
                    extend=schedule.extend)
      restored, meta = _restore(ckpt, state.replace(teacher=None))
    except Exception:
      ckpt.close()
      raise
    history = {**history, **meta}
    state = restored.replace(teacher=teacher)
    print(f"Resumed from step {int(state.step)} ({workdir}/checkpoints).", flush=True)
  files.write_atomic(os.path.join(workdir, "config.json"), config_json)
  history["teacher_sha256"] = teacher_sha256
  history["run_config"] = current_config
  logger = logging_utils.RunLogger(workdir, schedule.num_steps, name=schedule.name,
                                   resume_step=int(state.step))

  def save(it):
    ckpt.save(it, state.replace(teacher=None), history)

  budget = float(schedule.time_budget_s or 0.0)
  clock = {"t0": None, "base": 0.0, "excluded": 0.0}

  def train_clock() -> float:
    """Seconds of training so far, summed over resumed segments of the run."""
    if clock["t0"] is None:
      return clock["base"]
    return clock["base"] + time.perf_counter() - clock["t0"] - clock["excluded"]

  def do_eval(it):
    t0 = time.perf_counter()
    ev = evaluate(state)
    history["eval_clock"].append(round(train_clock() - (time.perf_counter() - t0), 3))
    history["eval_steps"].append(it)
    history["accuracy"].append(ev["accuracy"])
    history["agreement"].append(ev.get("agreement"))
    extra = {k: v for k, v in ev.items() if k not in ("accuracy", "agreement")}
    for k, v in extra.items():  # further series (e.g. accuracy_ema), one list per key
      history.setdefault(k, []).append(v)
    history["eval_seconds"] += time.perf_counter() - t0
    logger.write(it, {"test/accuracy": ev["accuracy"], **(
        {"test/teacher_agreement": ev["agreement"]} if "agreement" in ev else {}),
                      **{f"test/{k}": v for k, v in extra.items()}})

  def check_finite(it, finite, metrics):
    if not bool(finite):
      ckpt.wait()
      last = ckpt.latest_step()
      bad = {k: float(v) for k, v in jax.device_get(metrics).items()
             if np.ndim(v) == 0 and not np.isfinite(v)}
      raise NonFiniteLossError(
          f"Non-finite loss by step {it} ({bad or 'an earlier step'}); the run is stopped. "
          f"Last good checkpoint: {last if last is not None else 'none'} in {ckpt.directory}. "
          "Lower the learning rates or loss weights and start a new run (another --workdir): "
          "a resumed run keeps its settings.")

  s = schedule
  it = start_step = int(state.step)
  train_before, earlier_launches = history["train_seconds"], list(history.get("launches", []))

  def record_launch(at_step):
    """This launch's entry in history["launches"] (kept current at each checkpoint, so a
    killed launch still counts the seconds its last checkpoint holds)."""
    history["launches"] = earlier_launches + [{
        "from_step": start_step, "to_step": at_step,
        "compile_seconds": round(t_compile or 0.0, 3),
        "train_seconds": round(history["train_seconds"] - train_before, 3)}]

  finite = jnp.array(True)
  t_compile = None
  t_start = time.perf_counter()
  clock.update(t0=t_start, base=float(history.get("clock_seconds", 0.0)))
  stopped_early = False
  try:
    while it < s.num_steps:
      t0 = time.perf_counter()
      state, metrics = step_fn(state, it)
      finite = jnp.logical_and(finite, metrics["finite"])
      it += 1
      if t_compile is None:
        jax.block_until_ready(metrics)
        t_compile = time.perf_counter() - t0
        logger.start(it)
      if budget:
        # A wall-clock budget needs the device to have finished: one sync per step, only in
        # runs with a time budget (benchmarks).
        jax.block_until_ready(metrics)
        stopped_early = train_clock() >= budget and it < s.num_steps
      last = it == s.num_steps or stopped_early
      if it % s.log_every == 0 or last:
        check_finite(it, finite, metrics)
        logger.write(it, jax.device_get(metrics), print_keys=(
            print_keys(metrics) if print_keys else [k for k in metrics if k != "finite"][:6]))
      t_side = time.perf_counter()  # evaluation, pictures, checkpoints: off the train clock
      if it % s.eval_every == 0 or last:
        check_finite(it, finite, metrics)
        do_eval(it)
        if on_eval is not None:
          on_eval(state, it, logger)
      if (it % s.checkpoint_every == 0) and not last:
        check_finite(it, finite, metrics)
        history["train_seconds"] += time.perf_counter() - t_start
        t_start = time.perf_counter()
        history["clock_seconds"] = train_clock()
        record_launch(it)
        save(it)
      clock["excluded"] += time.perf_counter() - t_side
      if stopped_early:
        print(f"[{s.name}] time budget of {budget:.0f} s reached at step {it} of "
              f"{s.num_steps}.", flush=True)
        break
    if not history["eval_steps"] or history["eval_steps"][-1] != it:
      do_eval(it)  # a resumed finished run without its last evaluation
    history["train_seconds"] += time.perf_counter() - t_start
    history["clock_seconds"] = train_clock()
    if t_compile is not None:  # this launch trained: its compile time and rate; a re-run of a
      rate = logger.rate(it)   # finished run keeps those of the launch that trained
      history["compile_seconds"] = t_compile
      history["steps_per_second"] = rate if rate == rate else None
      record_launch(it)
    if ckpt.latest_step() != it:
      save(it)
  finally:
    ckpt.close()
    logger.close()
  return Result(state=state, history=history, steps=it,
                compile_seconds=history.get("compile_seconds"),
                steps_per_second=history.get("steps_per_second"),
                stopped_by_time_budget=stopped_early)
