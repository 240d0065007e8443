"""Tests of dfkd_jax.ops.bn_stats.capture_bn_inputs on small conv + BatchNorm models."""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dfkd_jax.ops import bn_stats
from dfkd_jax.ops import losses


class Block(nn.Module):
  """Conv + BN in a submodule, so the captured tree is nested."""

  @nn.compact
  def __call__(self, x, train):
    x = nn.Conv(3, (3, 3), name="conv")(x)
    return nn.BatchNorm(use_running_average=not train, name="bn")(x)


class TwoLayer(nn.Module):
  """conv -> BN ('z_bn') -> relu -> Block(conv -> BN) -> pooled dense.

  The names make the call order (z_bn, a_block/bn) differ from the sorted order.
  """

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(4, (3, 3), name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, name="z_bn")(x)
    x = nn.relu(x)
    x = Block(name="a_block")(x, train)
    return nn.Dense(5, name="head")(jnp.mean(x, axis=(1, 2)))


class NoBN(nn.Module):

  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(3)(x.reshape(x.shape[0], -1))


class Twice(nn.Module):
  """Calls the same BatchNorm twice."""

  @nn.compact
  def __call__(self, x, train=False):
    bn = nn.BatchNorm(use_running_average=not train, name="bn")
    return bn(2.0 * bn(x) + 1.0)


def _setup(batch=4):
  model = TwoLayer()
  x = jax.random.normal(jax.random.key(0), (batch, 5, 5, 2))
  variables = model.init(jax.random.key(1), x)
  # Non-trivial running statistics, so BN1's normalisation matters for BN2's input.
  k1, k2, k3, k4 = jax.random.split(jax.random.key(2), 4)
  bs = {
      "z_bn": {"mean": jax.random.normal(k1, (4,)),
               "var": jnp.exp(jax.random.normal(k2, (4,)))},
      "a_block": {"bn": {"mean": jax.random.normal(k3, (3,)),
                         "var": jnp.exp(jax.random.normal(k4, (3,)))}},
  }
  variables = {"params": variables["params"], "batch_stats": bs}
  return model, variables, x


def _moments(h):
  h = np.asarray(h, np.float64).reshape(-1, h.shape[-1])
  n, c = h.shape
  mean = np.array([sum(h[i, j] for i in range(n)) / n for j in range(c)])
  var = np.array([sum((h[i, j] - mean[j]) ** 2 for i in range(n)) / n for j in range(c)])
  return mean, var


def test_capture_matches_manual_computation():
  model, variables, x = _setup()
  params, bs = variables["params"], variables["batch_stats"]
  out, stats, order = bn_stats.capture_bn_inputs(model, variables, x, train=False)

  # By hand: the input of z_bn is conv1(x);
  # the input of a_block/bn is conv(relu(BN_eval(conv1(x)))).
  h1 = nn.Conv(4, (3, 3)).apply({"params": params["conv1"]}, x)
  bn1 = params["z_bn"]
  normed = (np.asarray(h1) - np.asarray(bs["z_bn"]["mean"])) / np.sqrt(
      np.asarray(bs["z_bn"]["var"]) + 1e-5) * np.asarray(bn1["scale"]) + np.asarray(bn1["bias"])
  h2 = nn.Conv(3, (3, 3)).apply({"params": params["a_block"]["conv"]}, np.maximum(normed, 0.0))

  for path, h in ((("z_bn",), h1), (("a_block", "bn"), h2)):
    mean, var = _moments(h)
    leaf = bn_stats.get_layer(stats, path)
    assert leaf["mean"].dtype == jnp.float32
    np.testing.assert_allclose(leaf["mean"], mean, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(leaf["var"], var, rtol=1e-4, atol=1e-5)

  # The model itself is unchanged by the interceptor.
  np.testing.assert_allclose(out, model.apply(variables, x, train=False), rtol=1e-6)


def test_tree_structure_and_call_order():
  model, variables, x = _setup()
  _, stats, order = bn_stats.capture_bn_inputs(model.apply, variables, x, train=False)
  assert jax.tree.structure(stats) == jax.tree.structure(variables["batch_stats"])
  assert order == (("z_bn",), ("a_block", "bn"))
  assert bn_stats.layer_paths(stats) == (("a_block", "bn"), ("z_bn",))


def test_gradient_flows_to_input():
  model, variables, x = _setup()

  def loss(x):
    _, stats, order = bn_stats.capture_bn_inputs(model, variables, x, train=False)
    return losses.bn_l2(stats, variables["batch_stats"], first_layer_scale=10.0, order=order)

  g = jax.jit(jax.grad(loss))(x)
  assert g.shape == x.shape
  assert bool(jnp.all(jnp.isfinite(g)))
  assert float(jnp.abs(g).sum()) > 0.0


def test_no_batchnorm_raises():
  model = NoBN()
  x = jnp.ones((2, 3, 3, 1))
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="model has no nn.BatchNorm layers"):
    bn_stats.capture_bn_inputs(model, variables, x)


def test_repeated_call_last_wins():
  model = Twice()
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 2))
  variables = model.init(jax.random.key(1), x)
  _, stats, order = bn_stats.capture_bn_inputs(model, variables, x)
  assert order == (("bn",),)
  # Running stats are (0, 1) and scale/bias (1, 0): the second input is 2·x/sqrt(1 + eps) + 1.
  second = 2.0 * np.asarray(x) / np.sqrt(1.0 + 1e-5) + 1.0
  mean, var = _moments(second)
  np.testing.assert_allclose(stats["bn"]["mean"], mean, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(stats["bn"]["var"], var, rtol=1e-5, atol=1e-6)


def test_train_mode_with_extra_mutable_and_low_precision_input():
  model, variables, x = _setup()
  (out, mutated), stats, _ = bn_stats.capture_bn_inputs(
      model, variables, x.astype(jnp.bfloat16), train=True, extra_mutable=("batch_stats",))
  assert set(mutated) == {"batch_stats"}
  assert stats["z_bn"]["mean"].dtype == jnp.float32
  assert jax.tree.structure(mutated["batch_stats"]) == jax.tree.structure(stats)
  # Without extra_mutable, a model in training mode cannot update its running averages.
  with pytest.raises(flax.errors.ModifyScopeVariableError):
    bn_stats.capture_bn_inputs(model, variables, x, train=True)


@pytest.mark.multidevice
def test_sharded_stats_are_global_batch_stats():
  # CPU devices: tests/conftest.py makes 8 fake ones (also on a machine with an accelerator).
  devices = jax.devices("cpu")
  if len(devices) < 2:
    pytest.skip("needs several (fake) CPU devices; tests/conftest.py sets 8")
  n = len(devices)
  model, variables, x = _setup(batch=2 * n)
  variables, x = jax.device_put((variables, x), devices[0])

  def fn(variables, x):
    _, stats, order = bn_stats.capture_bn_inputs(model, variables, x, train=False)
    loss = losses.bn_l2(stats, variables["batch_stats"], first_layer_scale=10.0, order=order)
    return stats, loss

  fn_jit = jax.jit(fn)
  grad_jit = jax.jit(jax.grad(lambda v, x: fn(v, x)[1], argnums=1))

  stats_1, loss_1 = fn_jit(variables, x)
  grad_1 = grad_jit(variables, x)

  mesh = Mesh(np.array(devices), ("data",))
  x_sh = jax.device_put(x, NamedSharding(mesh, P("data")))
  v_sh = jax.device_put(variables, NamedSharding(mesh, P()))
  assert len(x_sh.sharding.device_set) == n
  stats_n, loss_n = fn_jit(v_sh, x_sh)
  grad_n = grad_jit(v_sh, x_sh)

  for a, b in zip(jax.tree.leaves(stats_1), jax.tree.leaves(stats_n)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(loss_1, loss_n, rtol=1e-5)
  np.testing.assert_allclose(grad_1, grad_n, rtol=1e-4, atol=1e-7)

  # Sanity check that the comparison can fail: one shard's statistics differ from the global ones.
  stats_shard, _ = fn_jit(variables, x[:2])
  assert not np.allclose(stats_shard["z_bn"]["mean"], stats_1["z_bn"]["mean"], atol=1e-3)
