"""Jitted evaluation over an in-memory test split, and the robustness statistics of docs/methods.md §1."""
from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np



@functools.partial(jax.jit, static_argnames=("apply_fn", "teacher_apply_fn", "batch_size"))
def _eval_counts(variables, images, labels, teacher_variables, *, apply_fn, teacher_apply_fn,
                 batch_size):
  """Sums (correct, agree-with-teacher) over all full batches with lax.map; no host sync."""
  n = images.shape[0] // batch_size * batch_size
  xb = images[:n].reshape(-1, batch_size, *images.shape[1:])
  yb = labels[:n].reshape(-1, batch_size)

  def one(args):
    x, y = args
    logits, _ = apply_fn(variables, x, train=False)
    pred = jnp.argmax(logits, -1)
    correct = jnp.sum(pred == y)
    if teacher_apply_fn is None:
      agree = jnp.zeros((), jnp.int32)
    else:
      t_logits, _ = teacher_apply_fn(teacher_variables, x, train=False)
      agree = jnp.sum(pred == jnp.argmax(t_logits, -1))
    return correct, agree

  correct, agree = jax.lax.map(one, (xb, yb))
  return jnp.sum(correct), jnp.sum(agree)


def evaluate(apply_fn: Callable, variables, images, labels, *, batch_size: int = 500,
             teacher=None) -> dict[str, float]:
  """Accuracy (%) on (images, labels); with `teacher` (a FrozenModel), also top-1 agreement (%).

  The split is processed in full batches plus one remainder batch (two compiled shapes at most).
  """
  n = int(images.shape[0])
  batch_size = min(batch_size, n)
  t_apply = None if teacher is None else teacher.apply_fn
  t_vars = None if teacher is None else teacher.variables
  c, a = _eval_counts(variables, images, labels, t_vars, apply_fn=apply_fn,
                      teacher_apply_fn=t_apply, batch_size=batch_size)
  correct, agree = int(c), int(a)
  rem = n % batch_size
  if rem:
    c2, a2 = _eval_counts(variables, images[n - rem:], labels[n - rem:], t_vars,
                          apply_fn=apply_fn, teacher_apply_fn=t_apply, batch_size=rem)
    correct, agree = correct + int(c2), agree + int(a2)
  out = {"accuracy": 100.0 * correct / n}
  if teacher is not None:
    out["agreement"] = 100.0 * agree / n
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
