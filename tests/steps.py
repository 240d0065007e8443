"""Step-level test helpers shared by the method, phase, replay, guidance and registry tests:
the repository's tiny configs, a random lenet5_bn teacher, built method steps, cached tiny runs of
every registered method, host copies and tree comparisons. No data are needed.

Imported as `import steps` (pytest puts `tests/` on `sys.path`); the run cache is shared by every
test module in the session.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from dfkd_jax import methods as methods_lib
from dfkd_jax import models
from dfkd_jax import parallel
from dfkd_jax import state as state_lib
from dfkd_jax.train import distill

METHODS = tuple(methods_lib.METHODS)  # every registered method is tested
GENERATIVE = tuple(m for m, spec in methods_lib.METHODS.items() if spec.generator)
IMAGE_SHAPE = (32, 32, 1)
NUM_CLASSES = 10
STEPS = 3
DEVICES = 8
_CONFIG_PATH = os.path.join(os.path.dirname(__file__), os.pardir, "configs",
                            "fashion_mnist_lenet5.py")


def config_module():
  spec = importlib.util.spec_from_file_location("fashion_mnist_lenet5_cfg", _CONFIG_PATH)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def tiny_config(method):
  """The repository's tiny config for `method` (what the end-to-end tests run)."""
  return config_module().get_config(f"method={method},tiny")


@dataclasses.dataclass
class Run:
  """Host copies of the state before and after each step, the metrics, and the number of times
  the step function was traced after each step."""
  config: Any
  states: list
  metrics: list
  traces: list


_TEACHER = {}
_RUNS = {}


def random_teacher():
  """A fresh (never donated) copy of one randomly initialised lenet5_bn teacher."""
  if not _TEACHER:
    module = models.get_model("lenet5_bn", num_classes=NUM_CLASSES)
    params, batch_stats = state_lib.init_model(module, jax.random.key(1),
                                               jnp.zeros((1, *IMAGE_SHAPE)))
    _TEACHER.update(module=module, host=jax.device_get((params, batch_stats)))
  params, batch_stats = jax.tree.map(jnp.array, _TEACHER["host"])
  return state_lib.FrozenModel(params=params, batch_stats=batch_stats,
                               apply_fn=_TEACHER["module"].apply)


def host(tree):
  """A host (numpy) copy of a state; PRNG keys become their raw key data."""

  def leaf(x):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(x)

  return jax.tree.map(leaf, tree)


def build(method, num_devices=DEVICES, config=None):
  config = config or tiny_config(method)
  mesh = parallel.make_mesh(num_devices)
  ctx, m, _ = distill.build(config, mesh=mesh, teacher=random_teacher(),
                            image_shape=IMAGE_SHAPE, num_classes=NUM_CLASSES)
  return ctx, distill.wrap_step(m)


def run(method, num_devices=DEVICES, steps=STEPS) -> Run:
  """Builds `method`, runs `steps` outer steps of `distill.make_step` (cached per method/mesh)."""
  key = (method, num_devices, steps)
  if key not in _RUNS:
    ctx, m = build(method, num_devices)
    state = distill.place_state(m.init(jax.random.key(0)), ctx.mesh)
    traces = []
    body = m.step

    def counted(state):
      traces.append(None)  # runs once per trace, never when a compiled step is reused
      return body(state)

    chex.clear_trace_counter()
    step_fn = distill.make_step(m._replace(step=counted))  # chex.assert_max_traces(n=1) inside
    states, metrics, num_traces = [host(state)], [], []
    for _ in range(steps):
      state, mets = step_fn(state)  # the input state is donated
      states.append(host(state))
      metrics.append(jax.device_get(mets))
      num_traces.append(len(traces))
    _RUNS[key] = Run(ctx.config, states, metrics, num_traces)
  return _RUNS[key]


def _leaf_pairs(a, b):
  a, b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(a) == len(b) > 0
  return zip(a, b)


def tree_allclose(a, b, **kwargs):
  return all(np.allclose(x, y, **kwargs) for x, y in _leaf_pairs(a, b))


def tree_equal(a, b):
  return all(np.array_equal(x, y) for x, y in _leaf_pairs(a, b))


BATCH = 16
LATENT = 16
def small_config(method):
  """The tiny config with a smaller batch and latent (phase-level tests)."""
  c = config_module().get_config(f"method={method},tiny")
  c.distill.batch_size = BATCH
  c.distill.latent_dim = LATENT
  c.deepinversion.iterations = 2
  return c


def teacher_with(apply_fn=None):
  """A random lenet5_bn teacher whose apply function may be replaced (probes)."""
  module = models.get_model("lenet5_bn", num_classes=NUM_CLASSES)
  params, batch_stats = state_lib.init_model(module, jax.random.key(1),
                                             jnp.zeros((1, *IMAGE_SHAPE)))
  return state_lib.FrozenModel(params=params, batch_stats=batch_stats,
                               apply_fn=apply_fn or module.apply)


def build_small(method, teacher=None, num_devices=1):
  """(ctx, method, fresh state) for the tiny config of `method` on a 1-device mesh."""
  ctx, m, _ = distill.build(small_config(method), mesh=parallel.make_mesh(num_devices),
                            teacher=teacher or teacher_with(), image_shape=IMAGE_SHAPE,
                            num_classes=NUM_CLASSES)
  return ctx, m, m.init(jax.random.key(0))
