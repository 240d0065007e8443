"""The one data-free distillation loop shared by every method.

Each outer iteration is ONE jitted call of `method.step` with the `DFKDState` donated; inner
repeats are `lax.scan`s inside it. The loop never syncs with the host between log points: the
finiteness of all losses is folded into a device scalar and checked at log/eval/checkpoint
time, so a NaN stops the run before a bad state is checkpointed. The real test split is used
only to report accuracy, never to choose a checkpoint.
"""
from __future__ import annotations

import functools
import json
import os
import time

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfkd_jax import checkpointing
from dfkd_jax import compile as compile_lib
from dfkd_jax import condensed as condensed_lib
from dfkd_jax import evaluation
from dfkd_jax import logging_utils
from dfkd_jax import memory
from dfkd_jax import methods as methods_lib
from dfkd_jax import model_io
from dfkd_jax import models as models_lib
from dfkd_jax import parallel
from dfkd_jax import phases
from dfkd_jax import state as state_lib
from dfkd_jax import viz
from dfkd_jax.data import datasets


class NonFiniteLossError(FloatingPointError):
  """A loss became NaN/inf; the last good checkpoint is kept."""


def build(config: ml_collections.ConfigDict, mesh=None, teacher=None, image_shape=None,
          num_classes=None):
  """Loads the teacher and builds `(ctx, method)` for `config` (no data loading)."""
  methods_lib.check_method(config.method)  # before reading the method's config blocks
  info = datasets.get_info(config.dataset)
  mesh = mesh or parallel.make_mesh(config.num_devices or None)
  parallel.check_divisible(config.distill.batch_size, mesh, "distill.batch_size")
  num_classes = num_classes or info.num_classes
  size = config.pad_to or info.image_size
  image_shape = image_shape or (size, size, info.channels)
  teacher_meta = None
  if teacher is None:
    if not config.teacher.workdir:
      raise ValueError("config.teacher.workdir is empty: point it at a trained teacher run "
                       "(train one with method=teacher).")
    _, teacher, teacher_meta = model_io.load_model(
        config.teacher.workdir, role="teacher", expect_model=config.teacher.model,
        expect_classes=num_classes, expect_channels=image_shape[-1],
        hint="Train one first with method=teacher.")
    if tuple(teacher_meta["input_shape"]) != tuple(image_shape):
      raise ValueError(f"The teacher expects inputs {tuple(teacher_meta['input_shape'])} but the "
                       f"config gives {tuple(image_shape)} (check config.pad_to).")
  student_module = models_lib.get_model(config.student.model, num_classes=num_classes)
  condensed = None
  if config.get("guidance", "none") != "none":
    if not config.condensed.path:
      raise ValueError(f"config.guidance={config.guidance!r} needs config.condensed.path (an "
                       ".npz from `python -m dfkd_jax.condense`).")
    images, labels, _ = condensed_lib.load_condensed(
        config.condensed.path, image_shape=tuple(image_shape), num_classes=num_classes)
    condensed = (images, labels)
  ctx = methods_lib.Context(config=config, teacher=teacher, student_module=student_module,
                            num_classes=num_classes, image_shape=tuple(image_shape), mesh=mesh,
                            condensed=condensed)
  return ctx, methods_lib.make_method(ctx), teacher_meta


def _finite(metrics) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(v)) for v in jax.tree.leaves(metrics)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.array(True)


def make_step(method, max_traces: int = 1):
  """The jitted outer step: `(state) -> (state, metrics)`, state donated, step counter advanced."""

  def step(state):
    state, metrics = method.step(state)
    metrics["finite"] = _finite(metrics)
    return state.replace(step=state.step + 1), metrics

  return compile_lib.jit(chex.assert_max_traces(step, max_traces), donate_argnums=0)


def _iteration_key(state):
  return jax.random.fold_in(state.rng, state.step)


def wrap_step(method):
  """Feeds each outer iteration its key `fold_in(rng, step)`."""
  body = method.step
  return method._replace(step=lambda state: body(state, _iteration_key(state)))


def synthetic_preview(state, ctx, n: int):
  """A few synthetic images (for the PNG grid), in [0, 1] units."""
  key = jax.random.fold_in(state.rng, 10 ** 6)
  if state.pool is not None:  # the newest pool entries (Fast/NAYER also have a generator)
    x = state.pool.images[(state.pool.cursor - 1 - jnp.arange(n)) % state.pool.capacity]
  elif state.generator is not None:
    x = phases.sample_generator(state, key, max(n, ctx.mesh.devices.size), ctx.d.latent_dim,
                                ctx.mesh)[:n]
  else:
    return None
  return x


def place_state(state, mesh):
  """Replicates the state over the mesh, except the memory bank, sharded like a batch."""
  state = parallel.replicate(state, mesh)
  if state.bank is not None:
    state = state.replace(bank=state.bank.replace(
        images=jax.device_put(state.bank.images, memory.bank_sharding(mesh))))
  return state


def images_per_iteration(config) -> int:
  """Synthetic images the student sees per outer iteration (for the unbounded-store estimate)."""
  return int(config.distill.batch_size * config.distill.student_steps)


def replay_bytes(state) -> int:
  """Bytes of the replay store: memory bank, image pool, or VAE parameters (0 if none)."""
  if state.bank is not None:
    return state.bank.nbytes
  if state.vae is not None:
    return state_lib.tree_bytes(state.vae.params)
  if state.pool is not None:
    return state_lib.tree_bytes(state.pool.images)
  return 0


def train_distill(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Distils `config.student.model` from the teacher in `config.teacher.workdir` data-free."""
  info = datasets.get_info(config.dataset)
  ctx, method, teacher_meta = build(config)
  mesh = ctx.mesh
  x_test, y_test = datasets.load_split(config.dataset, info.test_split, config.data_dir or None,
                                       config.pad_to or None, limit=config.test_limit or None)
  test_images = parallel.replicate(jnp.asarray(x_test), mesh)
  test_labels = parallel.replicate(jnp.asarray(y_test), mesh)
  d = config.distill
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as f:
    f.write(config.to_json_best_effort(indent=2))

  method = wrap_step(method)
  state = place_state(method.init(jax.random.key(config.seed)), mesh)
  ckpt = checkpointing.Checkpointer(os.path.join(workdir, "checkpoints"), config.max_to_keep)
  history = {"eval_steps": [], "accuracy": [], "agreement": [], "train_seconds": 0.0,
             "eval_seconds": 0.0, "eval_clock": []}
  if ckpt.latest_step() is not None:
    state, history = ckpt.restore(state)
    print(f"Resumed from iteration {int(state.step)} ({workdir}/checkpoints).", flush=True)
  chex.clear_trace_counter()  # a run builds its own step; earlier runs share its source
  step_fn = make_step(method)
  preview = jax.jit(functools.partial(synthetic_preview, ctx=ctx, n=64))
  logger = logging_utils.RunLogger(workdir, d.num_iters, name=config.method)

  budget = float(d.get("time_budget_s", 0.0) or 0.0)
  clock = {"t0": None, "base": 0.0, "excluded": 0.0}

  def train_clock() -> float:
    """Seconds of training so far (compilation included; evaluations, pictures and
    checkpoints excluded), summed over resumed segments of the run."""
    if clock["t0"] is None:
      return clock["base"]
    return clock["base"] + time.perf_counter() - clock["t0"] - clock["excluded"]

  def do_eval(it):
    t0 = time.perf_counter()
    ev = evaluation.evaluate(state.student.apply_fn, state.student.variables, test_images,
                             test_labels, teacher=state.teacher)
    history.setdefault("eval_clock", []).append(round(train_clock() - (time.perf_counter() - t0),
                                                      3))
    history["eval_steps"].append(it)
    history["accuracy"].append(ev["accuracy"])
    history["agreement"].append(ev["agreement"])
    history["eval_seconds"] += time.perf_counter() - t0
    logger.write(it, {"test/accuracy": ev["accuracy"], "test/teacher_agreement": ev["agreement"]})
    return ev

  def check_finite(it, finite, metrics):
    if not bool(finite):
      ckpt.wait()
      last = ckpt.latest_step()
      bad = {k: float(v) for k, v in jax.device_get(metrics).items() if not np.isfinite(v)}
      raise NonFiniteLossError(
          f"Non-finite loss by iteration {it} ({bad or 'an earlier iteration'}); the run is "
          f"stopped. Last good checkpoint: {last if last is not None else 'none'} in "
          f"{ckpt.directory}. Lower the learning rates or loss weights and resume.")

  it = int(state.step)
  finite = jnp.array(True)
  t_compile = None
  t_start = time.perf_counter()
  clock.update(t0=t_start, base=float(history.get("clock_seconds", 0.0)))
  metrics = {}
  stopped_early = False
  try:
    while it < d.num_iters:
      t0 = time.perf_counter()
      state, metrics = step_fn(state)
      finite = jnp.logical_and(finite, metrics["finite"])
      it += 1
      if t_compile is None:
        jax.block_until_ready(metrics)
        t_compile = time.perf_counter() - t0
        logger.start(it)
      if budget:
        # A wall-clock budget needs the device to have finished: one sync per iteration, only
        # in runs with `distill.time_budget_s` set (benchmarks).
        jax.block_until_ready(metrics)
        stopped_early = train_clock() >= budget and it < d.num_iters
      last = it == d.num_iters or stopped_early
      if it % d.log_every == 0 or last:
        check_finite(it, finite, metrics)
        logger.write(it, jax.device_get(metrics),
                     print_keys=[k for k in metrics if k.endswith("loss") or k.endswith("agree")])
      t_side = time.perf_counter()  # evaluation, pictures, checkpoints: off the train clock
      if it % d.eval_every == 0 or last:
        check_finite(it, finite, metrics)
        do_eval(it)
        if d.save_images:
          x = preview(state)
          if x is not None:
            grid = viz.image_grid(np.asarray(datasets.denormalize(x, info)))
            viz.save_png(os.path.join(workdir, "synthetic.png"), grid)
            logger.image("synthetic", it, grid)
      if (it % d.checkpoint_every == 0) and not last:
        check_finite(it, finite, metrics)
        history["train_seconds"] += time.perf_counter() - t_start
        t_start = time.perf_counter()
        history["clock_seconds"] = train_clock()
        ckpt.save(it, state, history)
      clock["excluded"] += time.perf_counter() - t_side
      if stopped_early:
        print(f"[{config.method}] time budget of {budget:.0f} s reached at iteration {it} of "
              f"{d.num_iters}.", flush=True)
        break
    history["train_seconds"] += time.perf_counter() - t_start
    history["clock_seconds"] = train_clock()
    ckpt.save_final(it, state, history)
  finally:
    ckpt.close()
    logger.close()

  stats = evaluation.robustness(history["accuracy"])
  train_seconds = history["train_seconds"]
  peak = None
  try:
    mem = jax.local_devices()[0].memory_stats() or {}
    peak = mem.get("peak_bytes_in_use")
  except Exception:  # pylint: disable=broad-except
    pass
  summary = {
      "method": config.method, "label": config.get("label", config.method),
      "guidance": config.get("guidance", "none"),
      "condensed": config.condensed.path if config.get("guidance", "none") != "none" else None,
      "replay_bytes": replay_bytes(state),
      "images_per_iteration": images_per_iteration(config),
      "dataset": config.dataset, "teacher": config.teacher.model,
      "student": config.student.model, "iterations": it, **stats,
      "best_note": "best is test-selected (oracle); headline numbers are final and mu",
      "final_teacher_agreement": history["agreement"][-1] if history["agreement"] else None,
      "accuracy_series": history["accuracy"], "eval_steps": history["eval_steps"],
      "agreement_series": history["agreement"],
      "train_seconds": train_seconds, "eval_seconds": history["eval_seconds"],
      "eval_clock_seconds": history.get("eval_clock", []),
      "clock_seconds": history.get("clock_seconds"),
      "time_budget_s": budget or None, "stopped_by_time_budget": stopped_early,
      "compile_seconds": t_compile,
      "iterations_per_second": logger.rate(it) if t_compile is not None else None,
      "peak_bytes": peak, "num_devices": int(mesh.devices.size), "seed": config.seed,
      "teacher_sha256": teacher_meta["sha256"] if teacher_meta else None,
      "teacher_accuracy": teacher_meta.get("test_accuracy") if teacher_meta else None,
  }
  with open(os.path.join(workdir, "summary.json"), "w", encoding="utf-8") as f:
    json.dump(summary, f, indent=2)
  if history["accuracy"]:
    viz.plot_curves(os.path.join(workdir, "accuracy.png"),
                    {config.method: (history["eval_steps"], history["accuracy"])},
                    title=f"{config.method}: {config.teacher.model} -> {config.student.model}")
  model_io.export_model(workdir, model_name=config.student.model, num_classes=ctx.num_classes,
                        input_shape=ctx.image_shape, dataset=config.dataset,
                        params=state.student.params, batch_stats=state.student.batch_stats,
                        extra={"test_accuracy": stats["final"], "method": config.method})
  print(f"[{config.method}] final {stats['final']:.2f}%  mu {stats['mu']:.2f}  sigma2 "
        f"{stats['sigma2']:.2f}  (best, test-selected: {stats['best']:.2f})  "
        f"{train_seconds:.0f} s", flush=True)
  return summary
