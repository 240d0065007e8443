"""Data-free distillation runs: builds a method's state and step and trains it in the shared
loop (`dfkd_jax.train.loop`).

Each outer iteration is ONE jitted call of `method.step` with the `DFKDState` donated; inner
repeats are `lax.scan`s inside it. The loop never syncs with the host between log points (the
NaN guard is a device scalar checked at log/eval/checkpoint time). The real test split is used
only to report accuracy, never to choose a checkpoint.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import chex
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfkd_jax.io import files
from dfkd_jax.condensation import condensed_set as condensed_lib
from dfkd_jax.train import evaluation
from dfkd_jax import precision
from dfkd_jax.train import loop as loop_lib
from dfkd_jax import methods as methods_lib
from dfkd_jax.io import model_io
from dfkd_jax import models as models_lib
from dfkd_jax import parallel
from dfkd_jax import phases
from dfkd_jax import state as state_lib
from dfkd_jax.io import viz
from dfkd_jax.data import datasets


NonFiniteLossError = loop_lib.NonFiniteLossError  # re-exported (raised by the loop)


def context(config: ml_collections.ConfigDict, mesh=None, teacher=None, image_shape=None,
            num_classes=None):
  """Loads the teacher (unless given) and the condensed set; returns `(ctx, teacher_meta)`
  (`teacher_meta` is None for a given teacher). No dataset is loaded."""
  methods_lib.check_method(config.method)  # before reading the method's config blocks
  info = datasets.dataset_info(config, config.teacher.workdir if teacher is None else None)
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
  teacher = teacher.replace(apply_fn=precision.apply_for(teacher.apply_fn, config))
  student_module = models_lib.get_model(config.student.model, num_classes=num_classes)
  condensed = None
  if config.get("guidance", "none") != "none":
    if not config.condensed.path:
      raise ValueError(f"config.guidance={config.guidance!r} needs config.condensed.path (an "
                       ".npz from `python -m dfkd_jax.condensation.condense`).")
    images, labels, _ = condensed_lib.load_condensed(
        config.condensed.path, image_shape=tuple(image_shape), num_classes=num_classes)
    condensed = (images, labels)
  ctx = methods_lib.Context(config=config, teacher=teacher, student_module=student_module,
                            num_classes=num_classes, image_shape=tuple(image_shape), mesh=mesh,
                            condensed=condensed)
  return ctx, teacher_meta


def build(config: ml_collections.ConfigDict, mesh=None, teacher=None, image_shape=None,
          num_classes=None):
  """`(ctx, method, teacher_meta)`: the context and the registry's `Method(init, step)` for
  `config.method` (its step takes `(state, key)`; `assemble` makes the jitted outer step)."""
  ctx, teacher_meta = context(config, mesh, teacher, image_shape, num_classes)
  return ctx, methods_lib.METHODS[config.method].build(ctx), teacher_meta


class Assembled(NamedTuple):
  """What running `config.method` needs: its context, jitted outer step and placed state."""
  ctx: methods_lib.Context
  step: Callable  # (state) -> (state, metrics), state donated
  state: object
  teacher_meta: dict | None


def assemble(config: ml_collections.ConfigDict, *, mesh=None, teacher=None, image_shape=None,
             num_classes=None, seed: int | None = None, max_traces: int = 1) -> Assembled:
  """Context, method (from the registry), per-iteration keys, the initial state placed on the
  mesh (seed: `config.seed` unless given) and the jitted, donated outer step."""
  ctx, teacher_meta = context(config, mesh, teacher, image_shape, num_classes)
  method = wrap_step(with_student_ema(methods_lib.METHODS[config.method].build(ctx),
                                      config.distill.get("student_ema", 0.0)))
  state = place_state(method.init(jax.random.key(config.seed if seed is None else seed)),
                      ctx.mesh)
  chex.clear_trace_counter()  # a run builds its own step; earlier runs share its source
  return Assembled(ctx, make_step(method, max_traces), state, teacher_meta)


def make_step(method, max_traces: int = 1):
  """The jitted outer step: `(state) -> (state, metrics)`, state donated, step counter advanced."""

  def step(state):
    state, metrics = method.step(state)
    return state.replace(step=state.step + 1), metrics

  return loop_lib.jit_step(step, max_traces)


def ema_decay(decay: float, step):
  """The EMA decay at outer iteration `step`: min(decay, (1 + step) / (10 + step)), so the first
  iterations do not keep the initial weights for long."""
  step = jnp.asarray(step, jnp.float32)
  return jnp.minimum(decay, (1.0 + step) / (10.0 + step))


def with_student_ema(method, decay: float):
  """`method` plus the state part "student_ema" (`{"params", "batch_stats"}`): an exponential
  moving average of the student's weights and BN statistics, updated after every outer
  iteration (`ema_decay`). `decay` 0 returns `method` unchanged. Training never reads the
  average; `train_distill` evaluates it next to the student (our choice, docs/methods.md §13)."""
  if not decay:
    return method
  if not 0.0 < decay < 1.0:
    raise ValueError(f"distill.student_ema={decay} must be in (0, 1) (e.g. 0.9), or 0 for none.")

  def student_weights(state):
    return {"params": state.student.params, "batch_stats": state.student.batch_stats}

  def init(key):
    state = method.init(key)
    return state.with_parts(student_ema=jax.tree.map(jnp.copy, student_weights(state)))

  def step(state, key):
    state, metrics = method.step(state, key)
    d = ema_decay(decay, state.step)
    ema = jax.tree.map(lambda e, w: d * e + (1.0 - d) * w, state.student_ema,
                       student_weights(state))
    return state.with_parts(student_ema=ema), metrics

  return method._replace(init=init, step=step)


def _iteration_key(state):
  return jax.random.fold_in(state.rng, state.step)


def wrap_step(method):
  """Feeds each outer iteration its key `fold_in(rng, step)`."""
  body = method.step
  return method._replace(step=lambda state: body(state, _iteration_key(state)))


def synthetic_preview(state, ctx, n: int):
  """A few synthetic images (for the PNG grid), in [0, 1] units."""
  key = jax.random.fold_in(state.rng, 10 ** 6)
  if state.has("pool"):  # the newest pool entries (Fast/NAYER also have a generator)
    x = state.pool.images[(state.pool.cursor - 1 - jnp.arange(n)) % state.pool.capacity]
  elif state.has("generator"):
    x = phases.sample_generator(state, key, max(n, ctx.mesh.devices.size), ctx.d.latent_dim,
                                ctx.mesh)[:n]
  else:
    return None
  return x


def place_state(state, mesh):
  """Replicates the state over the mesh, except the parts that place themselves (a `place(mesh)`
  method: the memory bank is sharded like a batch)."""
  state = parallel.replicate(state, mesh)
  return state.replace(parts={name: part.place(mesh) if hasattr(part, "place") else part
                              for name, part in state.parts.items()})


def images_per_iteration(config) -> int:
  """Synthetic images the student sees per outer iteration (for the unbounded-store estimate)."""
  return int(config.distill.batch_size * config.distill.student_steps)


def replay_bytes(state) -> int:
  """Bytes of the replay store: memory bank, image pool, or VAE parameters (0 if none)."""
  if state.has("bank"):
    return state.bank.nbytes
  if state.has("vae"):
    return state_lib.tree_bytes(state.vae.params)
  if state.has("pool"):
    return state_lib.tree_bytes(state.pool.images)
  return 0


def train_distill(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Distils `config.student.model` from the teacher in `config.teacher.workdir` data-free."""
  info = datasets.dataset_info(config, config.teacher.workdir)
  ctx, step_fn, state, teacher_meta = assemble(config)
  mesh = ctx.mesh
  test = evaluation.place_test_split(config, info, mesh, ctx.image_shape)
  d = config.distill

  preview = jax.jit(functools.partial(synthetic_preview, ctx=ctx, n=64))

  def evaluate(state):
    ev = evaluation.evaluate(state.student.apply_fn, state.student.variables, test,
                             teacher=state.teacher)
    if state.has("student_ema"):
      ema = state.student_ema
      ev["accuracy_ema"] = evaluation.evaluate(
          state.student.apply_fn, state_lib.model_variables(ema["params"], ema["batch_stats"]),
          test)["accuracy"]
    return ev

  def pictures(state, it, logger):
    if d.save_images:
      x = preview(state)
      if x is not None:
        grid = viz.image_grid(datasets.denormalize(parallel.to_host(x), info))
        viz.save_png(os.path.join(workdir, "synthetic.png"), grid)
        logger.image("synthetic", it, grid)

  budget = float(d.get("time_budget_s", 0.0) or 0.0)
  schedule = loop_lib.Schedule(config.method, d.num_iters, d.log_every, d.eval_every,
                               d.checkpoint_every, config.max_to_keep, budget,
                               extend=bool(config.get("extend_budget", False)))
  out = loop_lib.run(
      schedule, state, lambda s, _: step_fn(s), evaluate, workdir,
      config_json=config.to_json_best_effort(indent=2),
      teacher_sha256=teacher_meta["sha256"] if teacher_meta else None, on_eval=pictures,
      print_keys=lambda m: [k for k in m if k.endswith("loss") or k.endswith("agree")])
  state, history, it = out.state, out.history, out.steps
  stats = evaluation.robustness(history["accuracy"])
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
      "ema": ({**evaluation.robustness(history["accuracy_ema"]),
               "decay": d.student_ema, "accuracy_series": history["accuracy_ema"]}
              if history.get("accuracy_ema") else None),
      **out.common_summary(),
      "time_budget_s": budget or None,
      "iterations_per_second": out.steps_per_second,
      "num_devices": int(mesh.devices.size), "seed": config.seed,
      "dtype": jnp.dtype(precision.compute_dtype(config)).name,
      "teacher_sha256": teacher_meta["sha256"] if teacher_meta else None,
      "teacher_accuracy": teacher_meta.get("test_accuracy") if teacher_meta else None,
  }
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  if history["accuracy"]:
    viz.plot_curves(os.path.join(workdir, "accuracy.png"),
                    {config.method: (history["eval_steps"], history["accuracy"])},
                    title=f"{config.method}: {config.teacher.model} -> {config.student.model}")
  model_io.export_model(workdir, model_name=config.student.model, num_classes=ctx.num_classes,
                        input_shape=ctx.image_shape,
                        dataset=datasets.canonical_name(config.dataset),
                        params=state.student.params, batch_stats=state.student.batch_stats,
                        extra={"test_accuracy": stats["final"], "method": config.method,
                               **datasets.normalization_record(info, config.pad_to,
                                                               config.data_dir)})
  print(f"[{config.method}] final {stats['final']:.2f}%  mu {stats['mu']:.2f}  sigma2 "
        f"{stats['sigma2']:.2f}  (best, test-selected: {stats['best']:.2f})  "
        f"{history['train_seconds']:.0f} s", flush=True)
  return summary
