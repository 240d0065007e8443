"""Jitted evaluation over an in-memory test split, and the robustness statistics of docs/methods.md §1."""
from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from dfkd_jax import parallel



@dataclasses.dataclass(frozen=True)
class EvalSplit:
  """A labelled split laid out for data-parallel evaluation.

  `images` [n_pad, ...] and `labels` [n_pad] are split over the mesh's `data` axis (each device
  holds one consecutive block, each process the blocks of its devices, so a process loads only
  its rows); rows from `n` on are padding with label -1. An evaluation batch takes `per_device`
  rows from every device's block: each device evaluates only its own examples.
  """
  images: jax.Array
  labels: jax.Array
  n: int
  per_device: int
  mesh: Mesh


def place_split(load_rows: Callable, n: int, image_shape, mesh: Mesh,
                batch_size: int = 500) -> EvalSplit:
  """Places an `n`-example split for `evaluate`: `load_rows(start, stop)` returns the
  (images, labels) of examples [start, stop) (numpy); each process calls it for its rows only.

  The global batch is `batch_size` rounded up to a multiple of the device count; the split is
  padded to whole batches.
  """
  if n < 1:
    raise ValueError("The evaluation split is empty (check config.test_limit and the dataset).")
  devices = mesh.devices.size
  per_device = -(-min(batch_size, n) // devices)
  n_pad = -(-n // (per_device * devices)) * per_device * devices
  start, stop = parallel.process_rows(n_pad, mesh)
  if start < n:
    x, y = load_rows(start, min(stop, n))
  else:
    x, y = np.zeros((0, *image_shape), np.float32), np.zeros((0,), np.int32)
  pad = stop - start - len(y)
  x = np.concatenate([np.asarray(x, np.float32), np.zeros((pad, *image_shape), np.float32)])
  y = np.concatenate([np.asarray(y, np.int32), np.full((pad,), -1, np.int32)])
  return EvalSplit(parallel.from_process_rows(x, mesh, n_pad),
                   parallel.from_process_rows(y, mesh, n_pad), n, per_device, mesh)


def place_arrays(images, labels, mesh: Mesh | None = None, batch_size: int = 500) -> EvalSplit:
  """`place_split` for a split already in memory (every process passes all of it)."""
  images, labels = np.asarray(images), np.asarray(labels)
  mesh = mesh or parallel.make_mesh()
  return place_split(lambda a, b: (images[a:b], labels[a:b]), int(labels.shape[0]),
                     images.shape[1:], mesh, batch_size)


def place_test_split(config, info, mesh: Mesh, image_shape) -> EvalSplit:
  """The run's test split (`config.dataset`, `info.test_split`, `config.test_limit`, padded to
  `config.pad_to`) for `evaluate`; each process reads only its rows."""
  from dfkd_jax.data import datasets  # pylint: disable=g-import-not-at-top
  data_dir = config.data_dir or None
  n = datasets.split_size(config.dataset, info.test_split, data_dir, config.test_limit or None,
                          info)

  def rows(start, stop):
    return datasets.load_split(config.dataset, info.test_split, data_dir, config.pad_to or None,
                               limit=config.test_limit or None, info=info, rows=(start, stop))

  return place_split(rows, n, tuple(image_shape), mesh)


@functools.partial(jax.jit, static_argnames=("apply_fn", "teacher_apply_fn", "per_device",
                                             "mesh"))
def _eval_counts(variables, images, labels, teacher_variables, *, apply_fn, teacher_apply_fn,
                 per_device, mesh):
  """Sums (correct, agree-with-teacher) over the split with lax.map; no host sync."""
  devices = mesh.devices.size
  steps = images.shape[0] // (devices * per_device)

  def batches(a):  # [devices * steps * per_device, ...] -> [steps, devices * per_device, ...]
    a = a.reshape(devices, steps, per_device, *a.shape[1:]).swapaxes(0, 1)
    a = a.reshape(steps, devices * per_device, *a.shape[3:])
    spec = P(None, parallel.DATA_AXIS)
    return jax.lax.with_sharding_constraint(a, NamedSharding(mesh, spec))

  def one(args):
    x, y = args
    valid = y >= 0
    logits, _ = apply_fn(variables, x, train=False)
    pred = jnp.argmax(logits, -1)
    correct = jnp.sum((pred == y) & valid)
    if teacher_apply_fn is None:
      agree = jnp.zeros((), jnp.int32)
    else:
      t_logits, _ = teacher_apply_fn(teacher_variables, x, train=False)
      agree = jnp.sum((pred == jnp.argmax(t_logits, -1)) & valid)
    return correct, agree

  correct, agree = jax.lax.map(one, (batches(images), batches(labels)))
  return jnp.sum(correct), jnp.sum(agree)


def evaluate(apply_fn: Callable, variables, split, labels=None, *, batch_size: int = 500,
             teacher=None) -> dict[str, float]:
  """Accuracy (%) on `split` (an `EvalSplit`, or images with `labels`); with `teacher` (a
  FrozenModel), also top-1 agreement (%). Every device evaluates its share of the split; one
  compiled shape per split."""
  if not isinstance(split, EvalSplit):
    split = place_arrays(split, labels, batch_size=batch_size)
  t_apply = None if teacher is None else teacher.apply_fn
  t_vars = None if teacher is None else teacher.variables
  c, a = _eval_counts(variables, split.images, split.labels, t_vars, apply_fn=apply_fn,
                      teacher_apply_fn=t_apply, per_device=split.per_device, mesh=split.mesh)
  correct, agree = (int(v) for v in parallel.to_host(jnp.stack([c, a])))
  out = {"accuracy": 100.0 * correct / split.n}
  if teacher is not None:
    out["agreement"] = 100.0 * agree / split.n
  return out


def robustness(accuracies) -> dict[str, float]:
  """docs/methods.md §1: final, mu (mean over evaluations), sigma2 (population variance), best.

  `best` is a test-selected oracle: report it labelled as such, never as the headline.
  """
  a = np.asarray(list(accuracies), np.float64)
  if a.size == 0:
    return {"final": float("nan"), "mu": float("nan"), "sigma2": float("nan"),
            "best": float("nan")}
  return {"final": float(a[-1]), "mu": float(a.mean()), "sigma2": float(a.var()),
          "best": float(a.max())}
