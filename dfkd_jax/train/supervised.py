"""Supervised training on real data: the teacher, and the two upper bounds for a student
(trained from scratch on the labels, or by KD from the teacher on the real images).

`config.method`: "teacher" trains `config.teacher.model`; "scratch" and "kd_real" train
`config.student.model` (kd_real needs `config.teacher.workdir`). "kd_condensed" is the lower
bound of condensed-sample guidance (docs/methods.md §8): KD from the teacher on the small condensed
set `config.condensed.path` alone (tiled to fill a batch, DiffAugment-ed with
`config.augment="diffaugment"`), the test split only for reporting. One jitted, donated step per
iteration; the epoch permutation is drawn on device once per epoch; batches are gathered on
device and sharded over the mesh's `data` axis.
"""
from __future__ import annotations

import os

import chex
from flax import struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dfkd_jax.io import files
from dfkd_jax.ops import augment as augment_lib
from dfkd_jax.condensation import condensed_set as condensed_lib
from dfkd_jax.train import evaluation
from dfkd_jax.train import loop as loop_lib
from dfkd_jax.ops import losses
from dfkd_jax.methods import KD_METHODS, SUPERVISED_METHODS
from dfkd_jax.io import model_io
from dfkd_jax import models as models_lib
from dfkd_jax import optim
from dfkd_jax import parallel
from dfkd_jax import precision
from dfkd_jax import state as state_lib
from dfkd_jax.data import datasets



class SupervisedState(struct.PyTreeNode):
  step: jax.Array
  rng: jax.Array
  model: state_lib.TrainState
  teacher: state_lib.FrozenModel | None = None


def augment_batch(key, x, kind: str):
  """'none'; 'crop_flip': random 4-pixel-padded crop and horizontal flip, per sample;
  'diffaugment': DiffAugment (color, translation, cutout)."""
  if kind == "none":
    return x
  if kind == "diffaugment":
    return augment_lib.diff_augment(key, x)
  if kind != "crop_flip":
    raise ValueError(f"Unknown augment {kind!r}; valid: none, crop_flip, diffaugment.")
  b, h, w, _ = x.shape
  k1, k2 = jax.random.split(key)
  pad = 4
  xp = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="edge")
  offs = jax.random.randint(k1, (b, 2), 0, 2 * pad + 1)
  crop = jax.vmap(lambda im, o: jax.lax.dynamic_slice(im, (o[0], o[1], 0), (h, w, x.shape[-1])))
  x = crop(xp, offs)
  flip = jax.random.bernoulli(k2, 0.5, (b, 1, 1, 1))
  return jnp.where(flip, x[:, :, ::-1], x)


def make_train_step(config, mesh, steps_per_epoch: int, sharded: bool = False):
  """Returns step(state, images, labels, perm) -> (state, metrics): one SGD step.

  Replicated data: `perm` [n] is one permutation of the split and the batch its next
  `batch_size` entries. Sharded data (`sharded`): `images`/`labels` are split over the mesh's
  devices, `perm` [devices, rows per device] permutes each device's rows, and each device takes
  its next `batch_size / devices` rows: the global batch is assembled where the data lie.
  """
  batch_size = config.batch_size
  kd = config.method in KD_METHODS
  temperature = config.kd.temperature
  alpha = config.kd.alpha
  devices = mesh.devices.size

  def select(images, labels, perm, i):
    if not sharded:
      idx = jax.lax.dynamic_slice_in_dim(perm, i * batch_size, batch_size)
      return images[idx], labels[idx]
    per = batch_size // devices
    idx = jax.lax.dynamic_slice_in_dim(perm, i * per, per, axis=1)  # [devices, per]
    rows = perm.shape[1]
    take = jax.vmap(lambda a, j: a[j])
    x = take(images.reshape(devices, rows, *images.shape[1:]), idx)
    y = take(labels.reshape(devices, rows), idx)
    return x.reshape(batch_size, *images.shape[1:]), y.reshape(batch_size)

  def step(state: SupervisedState, images, labels, perm):
    i = state.step % steps_per_epoch
    x, y = select(images, labels, perm, i)
    x = parallel.shard_batch(x, mesh)
    y = parallel.shard_batch(y, mesh)
    key = jax.random.fold_in(state.rng, state.step)
    x = augment_batch(key, x, config.augment)
    t_logits = None
    if kd:
      t_logits, _ = state.teacher(x)
      t_logits = jax.lax.stop_gradient(t_logits)
    m = state.model

    def loss_fn(params):
      (logits, _), new_vars = m.apply_fn({"params": params, "batch_stats": m.batch_stats}, x,
                                         train=True, mutable=["batch_stats"])
      ce = losses.cross_entropy(logits, y)
      if kd:
        loss = alpha * losses.kd_kl(t_logits, logits, temperature) + (1 - alpha) * ce
      else:
        loss = ce
      return loss, (logits, new_vars["batch_stats"], ce)

    (loss, (logits, bs, ce)), grads = jax.value_and_grad(loss_fn, has_aux=True)(m.params)
    new_model = m.apply_gradients(grads, batch_stats=bs)
    metrics = {"loss": loss, "ce": ce, "train_accuracy": losses.accuracy(logits, y) * 100.0}
    return state.replace(step=state.step + 1, model=new_model), metrics

  return step


def sharded_data(config) -> bool:
  """Whether the training split is split over the devices (`config.data_placement`): "auto"
  shards it in a multi-process run (each process reads and holds only its devices' rows) and
  replicates it on one process (every device holds it; the batch is drawn from the whole split,
  as in all single-process results)."""
  placement = config.get("data_placement", "auto")
  if placement not in ("auto", "replicated", "sharded"):
    raise ValueError(f"config.data_placement={placement!r}; valid: auto, replicated, sharded.")
  if config.method == "kd_condensed":  # a condensed set is a few images: always replicated
    return False
  return placement == "sharded" or (placement == "auto" and jax.process_count() > 1)


def _model_name(config) -> str:
  return config.teacher.model if config.method == "teacher" else config.student.model


def train_supervised(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains on the real train split and evaluates on the test split; returns the summary."""
  if config.method not in SUPERVISED_METHODS:
    raise ValueError(f"train_supervised handles {SUPERVISED_METHODS}, not {config.method!r}.")
  info = datasets.dataset_info(config, config.teacher.workdir if config.method in (
      "kd_real", "kd_condensed") else None)
  mesh = parallel.make_mesh(config.num_devices or None)
  parallel.check_divisible(config.batch_size, mesh)
  data_dir = config.data_dir or None
  sharded = sharded_data(config)
  devices = mesh.devices.size
  if config.method == "kd_condensed":
    x_train, y_train, _ = condensed_lib.load_condensed(
        config.condensed.path, image_shape=info.image_shape(config.pad_to or None),
        num_classes=info.num_classes)
    reps = -(-config.batch_size // x_train.shape[0])  # tile a tiny set up to one batch
    x_train, y_train = np.tile(x_train, (reps, 1, 1, 1)), np.tile(y_train, reps)
    n = x_train.shape[0]
  elif sharded:  # this process reads only the rows of its devices (the remainder is dropped)
    n = datasets.split_size(config.dataset, "train", data_dir, config.train_limit or None, info)
    n = n // devices * devices
    x_train, y_train = datasets.load_split(
        config.dataset, "train", data_dir, config.pad_to or None,
        limit=config.train_limit or None, info=info, rows=parallel.process_rows(n, mesh))
  else:
    x_train, y_train = datasets.load_split(config.dataset, "train", data_dir,
                                           config.pad_to or None,
                                           limit=config.train_limit or None, info=info)
    n = x_train.shape[0]
  if n < config.batch_size:
    raise ValueError(f"batch_size={config.batch_size} exceeds the {n} training examples.")
  steps_per_epoch = n // config.batch_size
  total_steps = config.num_steps or steps_per_epoch * config.num_epochs
  eval_every = config.eval_every or steps_per_epoch

  name = _model_name(config)
  module = models_lib.get_model(name, num_classes=info.num_classes)
  rng = jax.random.key(config.seed)
  init_key, state_key = jax.random.split(rng)
  params, batch_stats = state_lib.init_model(module, init_key, jnp.asarray(x_train[:1]))
  dtype = precision.compute_dtype(config)
  tx = optim.make_optimizer(config.optimizer, total_steps)
  teacher = None
  teacher_meta = None
  if config.method in KD_METHODS:
    _, teacher, teacher_meta = model_io.load_model(
        config.teacher.workdir, role="teacher", expect_model=config.teacher.model,
        expect_classes=info.num_classes, expect_channels=x_train.shape[-1],
        hint="Train one first with method=teacher.")
    if tuple(teacher_meta["input_shape"]) != tuple(x_train.shape[1:]):
      raise ValueError(f"The teacher expects inputs {tuple(teacher_meta['input_shape'])} but the "
                       f"data are {tuple(x_train.shape[1:])} (check config.pad_to).")
    teacher = teacher.replace(apply_fn=precision.mixed_apply(teacher.apply_fn, dtype))
  model = state_lib.TrainState.create(apply_fn=precision.mixed_apply(module.apply, dtype),
                                      params=params, batch_stats=batch_stats, tx=tx)
  state = SupervisedState(step=jnp.zeros((), jnp.int32), rng=state_key, model=model,
                          teacher=teacher)
  state = parallel.replicate(state, mesh)
  if sharded:
    images = parallel.from_process_rows(x_train, mesh, n)
    labels = parallel.from_process_rows(y_train, mesh, n)

    def permutations(key, epoch):  # one permutation of each device's rows
      keys = jax.random.split(jax.random.fold_in(key, epoch), devices)
      return jax.vmap(lambda k: jax.random.permutation(k, n // devices))(keys).astype(jnp.int32)

    perm_fn = jax.jit(permutations, out_shardings=parallel.batch_sharding(mesh))
  else:
    images = parallel.replicate(jnp.asarray(x_train), mesh)
    labels = parallel.replicate(jnp.asarray(y_train), mesh)
    perm_fn = jax.jit(lambda key, epoch: jax.random.permutation(jax.random.fold_in(key, epoch),
                                                                n).astype(jnp.int32))
  del x_train, y_train
  test = evaluation.place_test_split(config, info, mesh, images.shape[1:])

  # A run builds its own step; forget traces of earlier runs in this process (same source).
  chex.clear_trace_counter()
  train_step = loop_lib.jit_step(make_train_step(config, mesh, steps_per_epoch, sharded))
  perm_key = jax.random.fold_in(state_key, 1)
  perm = {}  # the current epoch's permutation, drawn on device once per epoch

  def step_fn(state, it):
    epoch = it // steps_per_epoch
    if epoch not in perm:
      perm.clear()
      perm[epoch] = perm_fn(perm_key, epoch)
    return train_step(state, images, labels, perm[epoch])

  def evaluate(state):
    return evaluation.evaluate(state.model.apply_fn, state.model.variables, test,
                               teacher=state.teacher)

  schedule = loop_lib.Schedule(config.method, total_steps, config.log_every, eval_every,
                               config.checkpoint_every, config.max_to_keep,
                               extend=bool(config.get("extend_budget", False)))
  out = loop_lib.run(schedule, state, step_fn, evaluate, workdir,
                     config_json=config.to_json_best_effort(indent=2),
                     teacher_sha256=teacher_meta["sha256"] if teacher_meta else None)
  state, history, step = out.state, out.history, out.steps
  final = {"accuracy": history["accuracy"][-1], "agreement": history["agreement"][-1]}
  summary = {
      "method": config.method, "label": config.get("label", config.method), "model": name,
      "dataset": config.dataset, "steps": step,
      "test_accuracy": final["accuracy"], **evaluation.robustness(history["accuracy"]),
      **out.common_summary(),
      "steps_per_second": out.steps_per_second,
      "images_per_second": (out.steps_per_second * config.batch_size
                            if out.steps_per_second else None),
      "num_params": state_lib.num_params(state.model.params),
      "num_devices": int(mesh.devices.size), "seed": config.seed,
      "dtype": jnp.dtype(dtype).name,
  }
  if final["agreement"] is not None:
    summary["teacher_agreement"] = final["agreement"]
  if teacher_meta is not None:
    summary["teacher_sha256"] = teacher_meta["sha256"]
  summary["sha256"] = model_io.export_model(
      workdir, model_name=name, num_classes=info.num_classes, input_shape=images.shape[1:],
      dataset=datasets.canonical_name(config.dataset),
      params=state.model.params, batch_stats=state.model.batch_stats,
      extra={"test_accuracy": final["accuracy"], "method": config.method,
             **datasets.normalization_record(info, config.pad_to, config.data_dir)})
  files.write_json(os.path.join(workdir, "summary.json"), summary)
  print(f"[{config.method}] {name} on {config.dataset}: test accuracy {final['accuracy']:.2f}% "
        f"after {step} steps ({summary['train_seconds']:.0f} s).", flush=True)
  return summary
