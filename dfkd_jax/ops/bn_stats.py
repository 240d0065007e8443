"""Capture of the statistics of BatchNorm *inputs*, without editing the model.

DeepInversion/ADI (docs/methods.md §5) and MB-DFKD match, for every teacher BatchNorm layer l, the
per-channel moments of the layer's input against the layer's running statistics:

  μ_l(x)  = (1/N) Σ_n x_{n,c}                 (mean over every axis except the feature axis),
  σ²_l(x) = (1/N) Σ_n (x_{n,c} − μ_l(x)_c)²   (biased variance),

where n runs over the batch and spatial positions (N = B·H·W for an NHWC conv feature map).

How it works (style.md §1.4): the model runs under ``nn.intercept_methods`` with an interceptor
that acts on every ``nn.BatchNorm.__call__``. Before the layer runs, the interceptor computes μ and
σ² of the layer's input in float32 and ``sow``s them into the collection ``"bn_inputs"`` of that
BatchNorm module, under the names ``"mean"`` and ``"var"``, with a ``reduce_fn`` that overwrites.
The captured collection therefore has exactly the tree structure of the model's ``batch_stats``
collection (same nested module names, leaves ``{"mean": [C], "var": [C]}``), so a BN-matching loss
is one walk over two trees with the same paths (see ``losses.bn_l2`` and ``losses.bn_gauss_kl``).

Properties:
- The model is unchanged and normalises exactly as it would without the interceptor; a teacher
  called with ``train=False`` uses its running averages (DeepInversion's inference-mode hooks).
- The moments are differentiable functions of the input x, so gradients flow from a BN-matching loss
  back to the pixels (DeepInversion) or to a generator.
- Under ``jax.jit`` with x sharded over a mesh axis, ``jnp.mean`` over the batch is a global-batch
  mean (XLA inserts the collectives), so the moments are global-batch statistics with no ``pmean``.
- A BatchNorm module called more than once in one forward pass: the *last* call's moments are kept
  (the overwrite ``reduce_fn``); the call order lists the layer once, at the position of its *first*
  call.
- The call order of the layers (``order``, a tuple of module paths) is recorded at trace time, so a
  loss can single out "the first BN layer" (DeepInversion multiplies that layer's term by 10). JAX
  flattens dicts in sorted-key order, so the order cannot be read back from the tree itself.

Nothing happens at import time.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfkd_jax import numerics as numerics_lib
from dfkd_jax.models import norm as norm_lib

PyTree = Any
LayerPath = tuple[str, ...]

BN_INPUTS = "bn_inputs"
"""Name of the variable collection that receives the captured moments."""

NO_BN_MESSAGE = (
    "model has no nn.BatchNorm layers; BN-statistics matching needs a teacher with BatchNorm")


def _overwrite(previous: Any, new: Any) -> Any:
  """``sow`` reduce_fn that keeps only the newest value (the default appends to a tuple)."""
  del previous
  return new


def _feature_axes(axis: int | Sequence[int], ndim: int) -> tuple[int, ...]:
  """Normalises a BatchNorm ``axis`` attribute to a tuple of non-negative axes."""
  axes = (axis,) if isinstance(axis, int) else tuple(axis)
  return tuple(a % ndim for a in axes)


def input_moments(x: jax.Array, feature_axis: int | Sequence[int] = -1
                  ) -> tuple[jax.Array, jax.Array]:
  """Per-feature mean and biased variance of ``x`` in float32.

  μ_c = mean_n x_{n,c};  σ²_c = mean_n (x_{n,c} − μ_c)², with n running over every axis except the
  feature axis (or axes).

  Args:
    x: input array of any float dtype; it is cast to float32.
    feature_axis: the feature axis or axes (BatchNorm's ``axis`` attribute, default last).

  Returns:
    ``(mean, var)``, each with the shape of the feature axes of ``x``.
  """
  x = jnp.asarray(x, jnp.float32)
  features = _feature_axes(feature_axis, x.ndim)
  if features == (x.ndim - 1,) and numerics_lib.current().batch_norm == "auto":
    # Column sums as matrix products on CPU (see dfkd_jax.models.norm); the same two-pass moments.
    n = float(x.size // x.shape[-1])  # a float: a count past int32 would not trace
    mean = norm_lib.column_sums(x) / n
    return mean, norm_lib.column_sums(jnp.square(x - mean)) / n
  reduce_axes = tuple(a for a in range(x.ndim) if a not in features)
  mean = jnp.mean(x, axis=reduce_axes, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=reduce_axes)
  return jnp.squeeze(mean, axis=reduce_axes), var


def capture_bn_inputs(
    apply_fn_or_module: nn.Module | Callable[..., Any],
    variables: PyTree,
    x: jax.Array,
    *args: Any,
    extra_mutable: Sequence[str] = (),
    **kwargs: Any,
) -> tuple[Any, PyTree, tuple[LayerPath, ...]]:
  """Runs a Linen model and records the moments of the input of every ``nn.BatchNorm`` call.

  For each BatchNorm layer l, in float32 and over every axis except the layer's feature axis:
  μ_l = mean(x_l), σ²_l = mean((x_l − μ_l)²) (biased), where x_l is the layer's input.

  The natural use is the frozen teacher in inference mode, e.g.
  ``logits, stats, order = capture_bn_inputs(model, variables, x, train=False)`` with
  ``variables = {"params": p, "batch_stats": bs}``:
  only the ``"bn_inputs"`` collection is mutable, so the running statistics are not touched (a model
  run in training mode must also list ``"batch_stats"`` in ``extra_mutable``).

  Args:
    apply_fn_or_module: a Linen module, or a Linen ``apply`` function (e.g. ``model.apply``) that
      accepts ``(variables, x, *args, mutable=..., **kwargs)``.
    variables: the model variables (``{"params": ..., "batch_stats": ...}``).
    x: the model input; gradients flow from the returned moments to it.
    *args: further positional arguments of the model call.
    extra_mutable: further collections to make mutable (e.g. ``("batch_stats",)`` for a model in
      training mode). When non-empty, ``outputs`` is ``(model_outputs, mutated)``, where
      ``mutated`` is a dict of those collections, as returned by Linen's ``apply``.
    **kwargs: further keyword arguments of the model call (e.g. ``train=False``).

  Returns:
    ``(outputs, stats, order)``:
      outputs: what the model returns (see ``extra_mutable``).
      stats: a nested dict with the structure of the model's ``batch_stats``; each BatchNorm
        module's leaf is ``{"mean": [C], "var": [C]}`` (float32). A layer called several times
        keeps its last call's moments.
      order: tuple of module paths (tuples of names, e.g. ``("block1", "bn1")``) in the order of
        each layer's first call. ``order[0]`` is the first BatchNorm the input meets. This is
        static Python data, known at trace time.

  Raises:
    ValueError: if the model calls no ``nn.BatchNorm`` layer.
  """
  if isinstance(apply_fn_or_module, nn.Module):
    apply_fn = apply_fn_or_module.apply
  else:
    apply_fn = apply_fn_or_module

  order: list[LayerPath] = []

  def interceptor(next_fun, call_args, call_kwargs, context):
    if isinstance(context.module, nn.BatchNorm) and context.method_name == "__call__":
      module = context.module
      inputs = call_args[0] if call_args else call_kwargs["x"]
      mean, var = input_moments(inputs, module.axis)
      module.sow(BN_INPUTS, "mean", mean, reduce_fn=_overwrite)
      module.sow(BN_INPUTS, "var", var, reduce_fn=_overwrite)
      path = tuple(str(p) for p in module.scope.path)
      if path not in order:
        order.append(path)
    return next_fun(*call_args, **call_kwargs)

  # A stale capture passed back in as a variable collection must not leak into this one.
  variables = {k: v for k, v in dict(variables).items() if k != BN_INPUTS}
  mutable = [BN_INPUTS, *extra_mutable]
  with nn.intercept_methods(interceptor):
    outputs, mutated = apply_fn(variables, x, *args, mutable=mutable, **kwargs)

  mutated = dict(mutated)
  stats = mutated.pop(BN_INPUTS, None)
  if not order or not stats:
    raise ValueError(NO_BN_MESSAGE)
  if extra_mutable:
    outputs = (outputs, mutated)
  return outputs, _to_dict(stats), tuple(order)


def _to_dict(tree: PyTree) -> PyTree:
  """Converts nested (Frozen)dicts to plain nested dicts."""
  if hasattr(tree, "items"):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def layer_paths(tree: PyTree) -> tuple[LayerPath, ...]:
  """Paths of the BatchNorm layers in a ``batch_stats``-shaped tree, sorted by name.

  A layer is a dict node holding both ``"mean"`` and ``"var"``.

  Args:
    tree: a nested dict such as a model's ``batch_stats`` or the ``stats`` of ``capture_bn_inputs``.

  Returns:
    The sorted tuple of layer paths (tuples of names).
  """
  paths: list[LayerPath] = []

  def walk(node: Any, prefix: LayerPath) -> None:
    if not hasattr(node, "items"):
      return
    if "mean" in node and "var" in node:
      paths.append(prefix)
      return
    for k, v in node.items():
      walk(v, prefix + (str(k),))

  walk(tree, ())
  return tuple(sorted(paths))


def get_layer(tree: PyTree, path: LayerPath) -> Any:
  """Returns the node of a nested dict at ``path``."""
  node = tree
  for k in path:
    node = node[k]
  return node
