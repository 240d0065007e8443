"""Tests of the CPU-fast gradients: `dfkd_jax.models.conv`, LeNet's max-pool, the jitter roll.

The custom VJP must give the gradients of `lax.conv_general_dilated` (values and
both gradients, every stride/padding shape the models use, inside and outside a
`lax.scan`), the models built on it must be the same functions with the same
parameters as with plain convolutions, and inside a scan every convolution of
the compiled CPU program must be in XLA's fast canonical layout (which is the
point: XLA leaves JAX's own gradient convolutions non-canonical in loops).
LeNet's 2x2 max-pool and DeepInversion's jitter roll have hand-written
gradients too; they must equal JAX's exactly, ties included.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dfkd_jax.ops import augment
from dfkd_jax import models
from dfkd_jax import numerics
from dfkd_jax.models import conv as conv_lib
from dfkd_jax.models import lenet

_DN = ("NHWC", "HWIO", "NHWC")
# (in channels, out channels, kernel, stride, padding, size): LeNet's 5x5 VALID
# image layer, ResNet's 3x3 SAME and strided convs, the VAE's explicit strided
# padding, odd sizes with stride 2, 1x1 shortcuts, asymmetric padding, few
# input channels (the col2im input gradient) with strides that do not divide.
_CASES = [
    (1, 6, 5, 1, "VALID", 12),
    (3, 8, 3, 1, "SAME", 9),
    (16, 32, 3, 2, ((1, 1), (1, 1)), 8),
    (8, 4, 3, 2, "SAME", 7),
    (5, 7, 1, 2, "VALID", 6),
    (6, 6, 3, 1, ((2, 0), (0, 1)), 5),
    (2, 4, 3, 2, "SAME", 7),
    (3, 5, 4, 3, ((1, 2), (0, 1)), 10),
]


def _loss(conv, stride, padding):
  def loss(x, w):
    y = conv(x, w, (stride, stride), padding, dimension_numbers=_DN)
    return jnp.sum(jnp.sin(y))
  return loss


def _inputs(cin, cout, k, size, batch=3):
  x = jax.random.normal(jax.random.key(0), (batch, size, size, cin))
  w = jax.random.normal(jax.random.key(1), (k, k, cin, cout)) / k
  return x, w


@pytest.mark.parametrize("mode", ["auto", "canonical"])
@pytest.mark.parametrize("cin,cout,k,stride,padding,size", _CASES)
def test_value_and_gradients_match_lax(mode, cin, cout, k, stride, padding, size,
                                       numerics_scope):
  numerics_scope(conv_grads=mode)
  x, w = _inputs(cin, cout, k, size)
  want = jax.jit(jax.value_and_grad(_loss(jax.lax.conv_general_dilated, stride, padding),
                                    (0, 1)))(x, w)
  got = jax.jit(jax.value_and_grad(_loss(conv_lib.conv_general_dilated, stride, padding),
                                   (0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def _sgd_scan(conv, x, w0, steps=3):
  loss = _loss(conv, 2, "SAME")

  def body(w, _):
    value, g = jax.value_and_grad(loss, 1)(x, w)
    return w - 1e-2 * g, value
  return jax.jit(lambda w: jax.lax.scan(body, w, None, length=steps))


def test_gradients_match_lax_inside_scan(numerics_scope):
  numerics_scope(conv_grads="auto")
  x, w = _inputs(8, 16, 3, 8)
  want = _sgd_scan(jax.lax.conv_general_dilated, x, w)(w)
  got = _sgd_scan(conv_lib.conv_general_dilated, x, w)(w)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


def _conv_dim_labels(compiled_text: str) -> list[str]:
  return re.findall(r"convolution\(.*?dim_labels=([^,\s]+)", compiled_text)


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="an XLA:CPU layout property")
def test_scan_gradient_convolutions_are_canonical_on_cpu(numerics_scope):
  numerics_scope(conv_grads="auto")
  x, w = _inputs(16, 16, 3, 8)  # above COL2IM_MAX_CHANNELS: the input gradient is a conv

  def body(carry, _):  # both gradients (input and kernel) are used
    x_, w_ = carry
    gx, gw = jax.grad(_loss(conv_lib.conv_general_dilated, 1, "SAME"), (0, 1))(x_, w_)
    return (x_ - 1e-2 * gx, w_ - 1e-2 * gw), None
  step = jax.jit(lambda c: jax.lax.scan(body, c, None, length=2)[0])
  text = step.lower((x, w)).compile().as_text()
  labels = _conv_dim_labels(text)
  assert len(labels) >= 3, text  # forward, input gradient, kernel gradient
  assert set(labels) == {"b01f_01io->b01f"}, labels


def test_xla_mode_is_plain_lax(numerics_scope):
  numerics_scope(conv_grads="xla")
  x, w = _inputs(4, 4, 3, 6)
  jaxpr = jax.make_jaxpr(jax.grad(_loss(conv_lib.conv_general_dilated, 1, "SAME"), 1))(x, w)
  assert "custom_vjp" not in str(jaxpr)
  numerics_scope(conv_grads="auto")
  jaxpr = jax.make_jaxpr(jax.grad(_loss(conv_lib.conv_general_dilated, 1, "SAME"), 1))(x, w)
  assert "custom_vjp" in str(jaxpr) or "optimization_barrier" in str(jaxpr)


def test_unsupported_convolutions_pass_through():
  x, w = _inputs(4, 4, 3, 6)
  depthwise = jnp.ones((3, 3, 1, 4))
  got = conv_lib.conv_general_dilated(x, depthwise, (1, 1), "SAME", dimension_numbers=_DN,
                                      feature_group_count=4)
  want = jax.lax.conv_general_dilated(x, depthwise, (1, 1), "SAME", dimension_numbers=_DN,
                                      feature_group_count=4)
  np.testing.assert_array_equal(got, want)
  got = conv_lib.conv_general_dilated(x.astype(jnp.bfloat16), w.astype(jnp.bfloat16), (1, 1),
                                      "SAME", dimension_numbers=_DN)
  assert got.dtype == jnp.bfloat16


def test_bad_mode_names_the_choices():
  with pytest.raises(ValueError, match="auto.*canonical.*xla"):
    numerics.Numerics(conv_grads="fast")


@pytest.mark.parametrize("name,channels", [("lenet5_half_bn", 1), ("resnet8", 3)])
def test_models_equal_with_plain_convolutions(name, channels, numerics_scope):
  x = jax.random.normal(jax.random.key(2), (4, 32, 32, channels))
  results = {}
  for mode in ("xla", "canonical"):
    numerics_scope(conv_grads=mode)
    module = models.get_model(name, num_classes=10)
    variables = module.init(jax.random.key(0), x)

    def loss(params, inputs, module=module, variables=variables):
      (logits, _), _ = module.apply({**variables, "params": params}, inputs, train=True,
                                    mutable=["batch_stats"])
      return jnp.sum(jax.nn.log_softmax(logits)[:, 0])
    results[mode] = (variables, jax.jit(jax.value_and_grad(loss, (0, 1)))(
        variables["params"], x))
  (vars_a, out_a), (vars_b, out_b) = results["xla"], results["canonical"]
  assert jax.tree.structure(vars_a) == jax.tree.structure(vars_b)
  for a, b in zip(jax.tree.leaves(vars_a), jax.tree.leaves(vars_b)):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(jax.tree.leaves(out_a), jax.tree.leaves(out_b)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=1e-5)


@pytest.mark.parametrize("shape", [(4, 28, 28, 6), (3, 11, 9, 2)])
@pytest.mark.parametrize("jit", [False, True])
def test_lenet_max_pool_matches_flax_with_ties(shape, jit):
  # ReLU outputs rounded to 0.1: many tied windows, where the cotangent must go to
  # the first maximum in row-major order (XLA's select-and-scatter, PyTorch).
  x = jnp.round(jax.nn.relu(jax.random.normal(jax.random.key(0), shape)), 1)
  g = jax.random.normal(jax.random.key(1), (shape[0], shape[1] // 2, shape[2] // 2, shape[3]))

  def vjp(pool):
    y, back = jax.vjp(pool, x)
    return y, back(g)[0]
  want = vjp(lambda v: nn.max_pool(v, (2, 2), strides=(2, 2)))
  got = (jax.jit(vjp, static_argnums=0) if jit else vjp)(lenet.max_pool_2x2)
  np.testing.assert_array_equal(got[0], want[0])
  np.testing.assert_array_equal(got[1], want[1])


@pytest.mark.parametrize("shift", [(0, 0), (2, -3), (-5, 7)])
def test_jitter_roll_gradient_is_the_inverse_roll(shift):
  x = jax.random.normal(jax.random.key(0), (2, 7, 9, 3))
  g = jax.random.normal(jax.random.key(1), x.shape)
  s = jnp.array(shift, jnp.int32)
  y, back = jax.jit(lambda v: jax.vjp(lambda u: augment._roll_hw(u, s), v))(x)
  np.testing.assert_array_equal(y, jnp.roll(x, shift, axis=(1, 2)))
  np.testing.assert_array_equal(back(g)[0], jnp.roll(g, (-shift[0], -shift[1]), axis=(1, 2)))


@pytest.mark.parametrize("spectral_norm", [False, True])
def test_generator_equal_with_plain_convolutions(spectral_norm, numerics_scope):
  """Generator convs have biases: `add_bias` (column-sum gradient) must be Flax's `y += bias`."""
  z = jax.random.normal(jax.random.key(2), (8, 16))
  ct = jax.random.normal(jax.random.key(3), (8, 16, 16, 1))
  results = {}
  for mode in ("xla", "auto"):
    numerics_scope(conv_grads=mode)
    gen = models.Generator(img_size=16, channels=1, ngf=8, spectral_norm=spectral_norm)
    variables = gen.init(jax.random.key(0), z, train=True)

    def loss(params, z, gen=gen, variables=variables):
      out, _ = gen.apply({**variables, "params": params}, z, train=True,
                         mutable=["batch_stats", "spectral_norm"] if spectral_norm
                         else ["batch_stats"])
      return jnp.sum(out * ct)
    results[mode] = (variables, jax.jit(jax.value_and_grad(loss, (0, 1)))(
        variables["params"], z))
  (vars_a, out_a), (vars_b, out_b) = results["xla"], results["auto"]
  assert jax.tree.structure(vars_a) == jax.tree.structure(vars_b)
  for a, b in zip(jax.tree.leaves(out_a), jax.tree.leaves(out_b)):
    np.testing.assert_allclose(b, a, rtol=2e-4, atol=2e-4)
  numerics_scope(conv_grads="auto")
  jaxpr = str(jax.make_jaxpr(lambda z: models.Generator(img_size=16, channels=1, ngf=8).init(
      jax.random.key(0), z, train=True))(z))
  assert "custom_vjp" in jaxpr


# ---------------------------------------------------------------- x2 upsampling + 3x3 conv


def _upsample_then_conv(x, w, *args, **kwargs):
  return conv_lib.conv_general_dilated(models.upsample_nearest_2x(x), w, *args, **kwargs)


@pytest.mark.parametrize("padding", ["SAME", ((1, 1), (1, 1))])
@pytest.mark.parametrize("h,w_,cin,cout", [(4, 4, 8, 6), (5, 3, 3, 2), (1, 1, 4, 4)])
def test_upsample2x_conv_is_upsample_then_conv(padding, h, w_, cin, cout):
  """Values and both gradients, rectangular and 1-pixel maps, in and outside a scan."""
  x = jax.random.normal(jax.random.key(0), (2, h, w_, cin))
  w = jax.random.normal(jax.random.key(1), (3, 3, cin, cout)) / 3
  ct = jax.random.normal(jax.random.key(2), (2, 2 * h, 2 * w_, cout))

  def loss(conv):
    return lambda x, w: jnp.sum(conv(x, w, (1, 1), padding, dimension_numbers=_DN) * ct)
  want = jax.jit(jax.value_and_grad(loss(_upsample_then_conv), (0, 1)))(x, w)
  got = jax.jit(jax.value_and_grad(loss(conv_lib.upsample2x_conv), (0, 1)))(x, w)
  for a, b in zip(jax.tree.leaves(want), jax.tree.leaves(got)):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)

  def body(conv):
    def step(w, _):
      value, g = jax.value_and_grad(loss(conv), 1)(x, w)
      return w - 1e-2 * g, value
    return jax.jit(lambda w: jax.lax.scan(step, w, None, length=2))
  for a, b in zip(jax.tree.leaves(body(_upsample_then_conv)(w)),
                  jax.tree.leaves(body(conv_lib.upsample2x_conv)(w))):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel,strides,padding", [
    ((5, 5), (1, 1), ((2, 2), (2, 2))), ((3, 3), (2, 2), ((1, 1), (1, 1))),
    ((3, 3), (1, 1), "VALID")])
def test_upsample2x_conv_refuses_other_convolutions(kernel, strides, padding):
  x, w = jnp.ones((1, 4, 4, 2)), jnp.ones((*kernel, 2, 2))
  with pytest.raises(ValueError, match="only a 3x3, stride-1, padding-1"):
    conv_lib.upsample2x_conv(x, w, strides, padding, dimension_numbers=_DN)


@pytest.mark.parametrize("name", ["generator", "generator_sn", "zskt", "fast"])
def test_generators_subpixel_equal_direct(name, numerics_scope):
  """Same parameters, the same images and gradients up to float rounding; the upsampled map
  is never built."""
  build = {
      "generator": lambda: models.Generator(img_size=16, channels=1, ngf=8),
      "generator_sn": lambda: models.Generator(img_size=16, channels=1, ngf=8,
                                               spectral_norm=True),
      "zskt": lambda: models.ZSKTGenerator(img_size=16, channels=1, ngf=8),
      "fast": lambda: models.FastGenerator(img_size=16, channels=1, ngf=8)}[name]
  z = jax.random.normal(jax.random.key(2), (8, 16))
  ct = jax.random.normal(jax.random.key(3), (8, 16, 16, 1))
  results = {}
  for mode in ("direct", "subpixel"):
    numerics_scope(upsample_conv=mode)
    gen = build()
    variables = gen.init(jax.random.key(0), z, train=True)

    def loss(params, gen=gen, variables=variables):
      out, _ = gen.apply({**variables, "params": params}, z, train=True,
                         mutable=["batch_stats", "spectral_norm"])
      return jnp.sum(out * ct), out
    grads = jax.jit(jax.grad(loss, has_aux=True))(variables["params"])
    results[mode] = variables, grads
  (vars_a, (grad_a, out_a)), (vars_b, (grad_b, out_b)) = results["direct"], results["subpixel"]
  for a, b in zip(jax.tree.leaves(vars_a), jax.tree.leaves(vars_b)):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(out_b, out_a, rtol=1e-4, atol=1e-4)
  # atol on the gradients' scale: a conv bias before a BatchNorm has a gradient of zero up to
  # float noise, which differs between the two summation orders.
  scale = max(float(np.max(np.abs(a))) for a in jax.tree.leaves(grad_a))
  for a, b in zip(jax.tree.leaves(grad_a), jax.tree.leaves(grad_b)):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5 * scale)
  for mode, built in (("direct", True), ("subpixel", False)):
    numerics_scope(upsample_conv=mode)
    jaxpr = str(jax.make_jaxpr(lambda z: build().init(jax.random.key(0), z, train=True))(z))
    assert ("f32[8,16,16,16]" in jaxpr) == built  # block2's upsampled input (16 ch., 16x16)
