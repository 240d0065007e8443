"""BatchNorm whose batch statistics and their gradients are matrix products on XLA:CPU.

Why. A training-mode BatchNorm reduces its input over every axis but the
channels, forward (mean, mean of squares) and backward (the sums of the
cotangent and of cotangent x normalised input that autodiff derives from the
broadcasts). On XLA:CPU (jaxlib 0.10) such reductions are rewritten into a
`reduce-window` plus a small reduce, which runs as a strided loop nest: in a
profile of the ResNet-20 -> ResNet-8 DAFL step they took 44 % of the op time
(15-22 ms each for a [128, 16, 16, 32] input; benchmarks/RESULTS.md §8). The
same column sums written as a matrix-vector product `ones[N] @ x[N, C]` run as
an Eigen GEMV.

What. `BatchNorm` is `flax.linen.BatchNorm` (same attributes, parameters,
`batch_stats`, running-average update, `use_fast_variance` arithmetic with the
variance clipped at 0) whose training-mode call goes through `batch_norm_train`,
a custom-VJP function written with `column_sums`, which is that matrix product
on CPU and `jnp.sum` on other platforms (chosen at lowering time with
`lax.platform_dependent`). Its backward is the textbook BatchNorm gradient, plus
the terms for cotangents of the returned batch mean and variance. Anything
outside the plain case (evaluation mode, masks, `axis_name`, a feature axis
other than the last, non-float32 inputs or dtypes, exact variance) is
`flax.linen.BatchNorm` itself, unchanged; so is every call traced under
`numerics.use(batch_norm="xla")` (`DFKD_BATCH_NORM=xla` in the environment sets
that default). Being a subclass,
it is found by `dfkd_jax.ops.bn_stats.capture_bn_inputs` like any `nn.BatchNorm`.
Forward-mode autodiff (`jax.jvp`) is not defined for a custom-VJP function; the
library never uses it.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from dfkd_jax import numerics as numerics_lib

def _mode() -> str:
  """The BatchNorm mode in scope (`dfkd_jax.numerics`), read when a model is traced."""
  return numerics_lib.current().batch_norm


def _dot_sums(a: jax.Array) -> jax.Array:
  a = a.reshape(-1, a.shape[-1])
  return jnp.dot(jnp.ones((a.shape[0],), a.dtype), a, precision=lax.Precision.HIGHEST)


def _reduce_sums(a: jax.Array) -> jax.Array:
  return jnp.sum(a.reshape(-1, a.shape[-1]), axis=0)


def column_sums(a: jax.Array) -> jax.Array:
  """Sums of `a` over every axis but the last: `[..., C] -> [C]` (a GEMV on CPU)."""
  return lax.platform_dependent(a, cpu=_dot_sums, default=_reduce_sums)


def _moments(x):
  n = float(x.size // x.shape[-1])  # a float: a count past int32 would not trace
  mean = column_sums(x) / n
  var = jnp.maximum(0.0, column_sums(x * x) / n - mean * mean)
  return mean, var


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x: jax.Array, scale: jax.Array, bias: jax.Array,
                     epsilon: float) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Training-mode BatchNorm over every axis but the last: `(y, batch mean, batch variance)`.

  `y = (x - mean) * (rsqrt(var + epsilon) * scale) + bias`, the arithmetic of
  `flax.linen.BatchNorm` with `use_fast_variance` (var = E[x^2] - E[x]^2, >= 0).
  """
  return _bn_fwd(x, scale, bias, epsilon)[0]


def _bn_fwd(x, scale, bias, epsilon):
  mean, var = _moments(x)
  mul = lax.rsqrt(var + epsilon) * scale
  return ((x - mean) * mul + bias, mean, var), (x, mean, var, scale)


def _bn_bwd(epsilon, res, cotangents):
  x, mean, var, scale = res
  dy, dmean, dvar = cotangents
  n = float(x.size // x.shape[-1])  # a float: a count past int32 would not trace
  rstd = lax.rsqrt(var + epsilon)
  centred = x - mean
  xhat = centred * rstd
  dbias = column_sums(dy)
  dscale = column_sums(dy * xhat)
  dx = (scale * rstd) * (dy - dbias / n - xhat * (dscale / n))
  dx = dx + dmean / n + centred * (2.0 * dvar / n)
  return dx, dscale, dbias


batch_norm_train.defvjp(_bn_fwd, _bn_bwd)


class BatchNorm(nn.BatchNorm):
  """`flax.linen.BatchNorm` with `batch_norm_train` in training mode (see the module docstring)."""

  @nn.compact
  def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
    use_ra = nn.merge_param("use_running_average", self.use_running_average,
                            use_running_average)
    last = self.axis in (-1, x.ndim - 1)
    plain = (_mode() == "auto" and not use_ra and mask is None and self.axis_name is None and last
             and self.use_fast_variance and self.force_float32_reductions
             and x.dtype == jnp.float32 and self.dtype in (None, jnp.float32)
             and self.param_dtype == jnp.float32)
    if not plain:
      return super().__call__(x, use_running_average=use_running_average, mask=mask)
    features = (x.shape[-1],)
    ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), features)
    ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), features)
    scale = (self.param("scale", self.scale_init, features, self.param_dtype) if self.use_scale
             else jnp.ones(features, jnp.float32))
    bias = (self.param("bias", self.bias_init, features, self.param_dtype) if self.use_bias
            else jnp.zeros(features, jnp.float32))
    y, mean, var = batch_norm_train(x, scale, bias, self.epsilon)
    if not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    return y


