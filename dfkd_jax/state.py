"""Functional train states: one `TrainState` per trainable model, `FrozenModel` for the teacher."""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax
from flax import struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


def model_variables(params, batch_stats) -> dict:
  """Linen variables dict; `batch_stats` is left out for models without BatchNorm."""
  return {"params": params, "batch_stats": batch_stats} if batch_stats else {"params": params}


class TrainState(struct.PyTreeNode):
  """Parameters, BatchNorm statistics and optimiser state of one trainable model.

  `apply_fn` and `tx` are static (not checkpointed); everything else is a pytree leaf.
  """
  step: jax.Array
  params: PyTree
  batch_stats: PyTree
  opt_state: PyTree
  apply_fn: Callable = struct.field(pytree_node=False)
  tx: optax.GradientTransformation = struct.field(pytree_node=False)

  @classmethod
  def create(cls, *, apply_fn, params, batch_stats, tx) -> "TrainState":
    return cls(step=jnp.zeros((), jnp.int32), params=params, batch_stats=batch_stats,
               opt_state=tx.init(params), apply_fn=apply_fn, tx=tx)

  def apply_gradients(self, grads, batch_stats=None) -> "TrainState":
    """One optimiser update; `batch_stats` (if given) replaces the BN running statistics."""
    updates, opt_state = self.tx.update(grads, self.opt_state, self.params)
    params = optax.apply_updates(self.params, updates)
    return self.replace(step=self.step + 1, params=params, opt_state=opt_state,
                        batch_stats=self.batch_stats if batch_stats is None else batch_stats)

  @property
  def variables(self) -> dict:
    return model_variables(self.params, self.batch_stats)


class FrozenModel(struct.PyTreeNode):
  """A frozen model (the teacher): parameters and running BN statistics, no optimiser."""
  params: PyTree
  batch_stats: PyTree
  apply_fn: Callable = struct.field(pytree_node=False)

  @property
  def variables(self) -> dict:
    return model_variables(self.params, self.batch_stats)

  def __call__(self, x, train: bool = False):
    """Inference-mode forward pass (running BN statistics): returns (logits, aux)."""
    return self.apply_fn(self.variables, x, train=train)


def init_model(module: flax.linen.Module, key: jax.Array, sample_input: jax.Array,
               **kwargs) -> tuple[PyTree, PyTree]:
  """Initialises a Linen module; returns (params, batch_stats) (batch_stats may be {})."""
  variables = module.init(key, sample_input, train=False, **kwargs)
  return variables["params"], variables.get("batch_stats", {})


def num_params(params: PyTree) -> int:
  """Total number of scalars in a parameter tree."""
  return int(sum(x.size for x in jax.tree.leaves(params)))


def tree_bytes(tree: PyTree) -> int:
  """Total bytes of the arrays in a tree."""
  return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree)))


class Part(NamedTuple):
  """One piece of a method's state, kept in `DFKDState.parts[name]`.

  `init(key, ctx) -> pytree` builds it from the run's initialisation key (each part derives its
  own key from it) and the method context (`dfkd_jax.methods.Context`). A method lists the parts
  its phases read (a generator, an image pool, a memory bank, a VAE, a discriminator, its own
  small state); `dfkd_jax.methods.base.init_state` builds them, so a new piece needs no edit of
  this class or of a central initialiser. A part's value may define `place(mesh) -> value` to
  choose its own placement on the mesh (the memory bank is sharded like a batch); everything else
  is replicated.
  """
  name: str
  init: Callable[[jax.Array, Any], PyTree]


class DFKDState(struct.PyTreeNode):
  """Everything a data-free distillation run needs to resume exactly.

  The core every method has (step, rng, frozen teacher, student) plus the method's own `parts`
  (`Part`s by name: "generator", "pool", "bank", "vae", "discriminator", "condensed", ...). A part
  reads as an attribute (`state.generator`); `with_parts(generator=g)` replaces parts. All
  synthetic data are a function of (rng, step), so this pytree (checkpointed whole, less the
  teacher) is the run. Per-phase keys are `fold_in(fold_in(rng, step), phase_id)`.
  """
  step: jax.Array
  rng: jax.Array
  teacher: FrozenModel
  student: TrainState
  parts: dict = struct.field(default_factory=dict)

  def __getattr__(self, name: str):
    # Only reached when `name` is not a field: look it up among the parts.
    if name.startswith("__") or name == "parts":
      raise AttributeError(name)
    parts = self.__dict__.get("parts") or {}
    if name in parts:
      return parts[name]
    raise AttributeError(f"This method's state has no part {name!r} (its parts: "
                         f"{sorted(parts) or 'none'}); phases that read it need a method that "
                         f"lists the part (see dfkd_jax.state.Part).")

  def has(self, name: str) -> bool:
    """Whether the state holds part `name`."""
    return name in self.parts

  def with_parts(self, **parts) -> "DFKDState":
    """A copy with the named parts replaced (or added)."""
    return self.replace(parts={**self.parts, **parts})
