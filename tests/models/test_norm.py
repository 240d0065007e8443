"""Tests of `dfkd_jax.models.norm.BatchNorm`: the same function, gradients, variables and
running averages as `flax.linen.BatchNorm`, with its column sums as matrix products on CPU."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.ops import bn_stats
from dfkd_jax import numerics
from dfkd_jax.models import norm as norm_lib


def _apply(module, variables, x, train):
  out = module.apply(variables, x, use_running_average=not train,
                     mutable=["batch_stats"] if train else False)
  return out if train else (out, {})


@pytest.mark.parametrize("kwargs", [
    {}, {"use_scale": False, "use_bias": False}, {"epsilon": 0.8, "momentum": 0.5}])
@pytest.mark.parametrize("shape", [(8, 5, 5, 6), (16, 12)])
def test_matches_flax_batch_norm(kwargs, shape):
  x = 3.0 + 2.0 * jax.random.normal(jax.random.key(0), shape)
  cotangent = jax.random.normal(jax.random.key(1), shape)
  ours, flax_bn = norm_lib.BatchNorm(**kwargs), nn.BatchNorm(**kwargs)
  v_ours = ours.init(jax.random.key(2), x, use_running_average=False)
  v_flax = flax_bn.init(jax.random.key(2), x, use_running_average=False)
  assert jax.tree.structure(v_ours) == jax.tree.structure(v_flax)
  if "params" in v_flax:  # non-trivial scale and bias
    v_flax = {**v_flax, "params": jax.tree.map(
        lambda p: p + jax.random.normal(jax.random.key(3), p.shape), v_flax["params"])}
  v_ours = v_flax

  def loss(module, params, x):
    variables = {**v_flax, "params": params} if params else v_flax
    y, new_vars = _apply(module, variables, x, train=True)
    return jnp.sum(y * cotangent), new_vars

  params = v_flax.get("params", {})
  for train in (True, False):
    y_ours = jax.jit(lambda x: _apply(ours, v_ours, x, train)[0])(x)
    y_flax = _apply(flax_bn, v_flax, x, train)[0]
    np.testing.assert_allclose(y_ours, y_flax, rtol=1e-5, atol=1e-5)
  (l_ours, s_ours), g_ours = jax.jit(jax.value_and_grad(
      lambda p, x: loss(ours, p, x), (0, 1), has_aux=True))(params, x)
  (l_flax, s_flax), g_flax = jax.value_and_grad(
      lambda p, x: loss(flax_bn, p, x), (0, 1), has_aux=True)(params, x)
  np.testing.assert_allclose(l_ours, l_flax, rtol=1e-5)
  for a, b in zip(jax.tree.leaves((s_ours, g_ours)), jax.tree.leaves((s_flax, g_flax))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)


def test_gradient_through_returned_statistics():
  # Cotangents of the batch mean and variance (a loss on them) reach x.
  x = jax.random.normal(jax.random.key(0), (6, 4, 3))
  scale, bias = jnp.full((3,), 1.5), jnp.full((3,), 0.2)

  def ours(x):
    y, mean, var = norm_lib.batch_norm_train(x, scale, bias, 1e-5)
    return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 2) + jnp.sum(jnp.cos(var))

  def reference(x):
    mean = jnp.mean(x, (0, 1))
    var = jnp.mean(x * x, (0, 1)) - mean ** 2
    y = (x - mean) * (jax.lax.rsqrt(var + 1e-5) * scale) + bias
    return jnp.sum(jnp.sin(y)) + jnp.sum(mean ** 2) + jnp.sum(jnp.cos(var))
  np.testing.assert_allclose(jax.grad(ours)(x), jax.grad(reference)(x), rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU program property")
def test_cpu_program_has_no_reductions(numerics_scope):
  x = jax.random.normal(jax.random.key(0), (64, 8, 8, 16))
  module = norm_lib.BatchNorm()
  variables = module.init(jax.random.key(1), x, use_running_average=False)

  def loss(params, x):
    y, _ = module.apply({**variables, "params": params}, x, use_running_average=False,
                        mutable=["batch_stats"])
    return jnp.sum(y * y)
  text = jax.jit(jax.grad(loss, (0, 1))).lower(variables["params"], x).compile().as_text()
  assert "reduce-window" not in text and " reduce(" not in text
  numerics_scope(batch_norm="xla")
  text = jax.jit(jax.grad(loss, (0, 1))).lower(variables["params"], x).compile().as_text()
  assert "reduce-window" in text or " reduce(" in text


def test_falls_back_to_flax_outside_the_plain_case():
  x = jax.random.normal(jax.random.key(0), (8, 4, 6)).astype(jnp.bfloat16)
  module = norm_lib.BatchNorm(use_running_average=False, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(1), x)
  y, _ = module.apply(variables, x, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  y_axis = norm_lib.BatchNorm(use_running_average=False, axis=1).init_with_output(
      jax.random.key(1), x.astype(jnp.float32))[0]
  assert y_axis.shape == x.shape


def test_found_by_bn_capture():
  class Net(nn.Module):
    @nn.compact
    def __call__(self, x, train=False):
      return norm_lib.BatchNorm(use_running_average=not train, name="bn")(x)
  x = jax.random.normal(jax.random.key(0), (8, 4, 4, 3))
  variables = Net().init(jax.random.key(1), x)
  _, stats, order = bn_stats.capture_bn_inputs(Net().apply, variables, x)
  assert order == (("bn",),)
  np.testing.assert_allclose(stats["bn"]["mean"], jnp.mean(x, (0, 1, 2)), rtol=1e-5, atol=1e-6)


def test_bad_mode_names_the_choices():
  with pytest.raises(ValueError, match="auto.*xla"):
    numerics.Numerics(batch_norm="fast")
