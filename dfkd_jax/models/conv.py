"""Convolutions whose gradients stay fast inside `lax.scan` on XLA:CPU.

Why. XLA:CPU runs a convolution as a fast Eigen/YNNPACK kernel only when it is
in the canonical NHWC/HWIO layout. Its `ConvCanonicalization` pass rewrites
other convolutions into that layout, but (measured on jaxlib 0.10.2) only in
the entry computation: it does not visit while-loop bodies. The convolutions
that JAX's autodiff emits for a conv's gradients are not canonical (the input
gradient uses a flipped kernel in `01oi` order, the kernel gradient
`f01b_i01o->01bf`), so inside a `lax.scan` (DeepInversion's pixel loop, the
student/VAE repeats) they run as naive loop nests, 6-30x slower than the same
gradients outside a loop (benchmarks/RESULTS.md, "conv gradients in loops").

What. `conv_general_dilated` is a drop-in for `lax.conv_general_dilated` with a
custom VJP that, on CPU, writes both gradients as canonical NHWC/HWIO
convolutions itself (explicit transposes around them, each behind a
`lax.optimization_barrier` so that the algebraic simplifier cannot fold the
transposes back into non-canonical dimension numbers). This is exactly the
rewrite XLA applies outside loops, done by hand so that it also happens inside
them. The choice is made per platform at lowering time with
`lax.platform_dependent`: on GPU and TPU the VJP is JAX's own, unchanged.

Scope. Only plain float32 NHWC/HWIO convolutions take this path (any strides
and explicit or string padding; no dilation, no feature/batch groups, default
precision); anything else (depthwise convs, bfloat16, other layouts) goes to
`lax.conv_general_dilated` untouched. The input gradient of a convolution with
at most `COL2IM_MAX_CHANNELS` input channels (image layers, LeNet-5-half's
second conv), or whose output is smaller than its kernel (LeNet's third conv),
is a matmul plus a col2im sum instead (faster than either convolution form for
those shapes, measured in a scan: benchmarks/RESULTS.md §8). Forward-mode
autodiff (`jax.jvp`, `jax.jacfwd`) is not defined for a custom-VJP function;
the library never uses it, and `conv_grads="xla"` restores plain
convolutions.

Selecting. `dfkd_jax.numerics` holds the mode (`Numerics.conv_grads`, read when a
model is traced): "auto" (default: the canonical VJP on CPU, JAX's elsewhere), "canonical"
(on every platform, for testing), or "xla" (plain `lax.conv_general_dilated`, no custom VJP,
and Flax's own bias add instead of `add_bias`). Scope it with
`numerics.use(conv_grads=...)`; the environment variable `DFKD_CONV_GRADS` sets the default.

The models of this package (`lenet`, `resnet_cifar`, `mobilenetv2`,
`generators`, `vae`, `convnet`) build their convolutions with `Conv`, i.e.
`nn.Conv(..., conv_general_dilated=conv_general_dilated)`; parameters and
numerics are those of `nn.Conv` (tests/models/test_conv.py).
"""

from collections.abc import Sequence
import functools

import flax.linen as nn
from flax.linen import dtypes as flax_dtypes
import jax
from jax import lax
import jax.numpy as jnp

from dfkd_jax import numerics as numerics_lib
from dfkd_jax.models import norm as norm_lib

COL2IM_MAX_CHANNELS = 3  # the input gradient as matmul + col2im up to this many input channels
COL2IM_SMALL_OUTPUT = True  # ... and for outputs smaller than the kernel
_NHWC = ("NHWC", "HWIO", "NHWC")
_ONES = (1, 1)

def _mode() -> str:
  """The conv-gradient mode in scope (`dfkd_jax.numerics`), read when a model is traced."""
  return numerics_lib.current().conv_grads


def _nhwc_conv(x, w, strides, padding, **kwargs):
  return lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=_NHWC, **kwargs)


def _dilated(size: int, factor: int) -> int:
  return 0 if size == 0 else 1 + factor * (size - 1)


def _grad_paddings(in_size, k_size, stride, out_size, pad):
  """Per spatial dim: the paddings of the input-gradient and kernel-gradient
  convolutions (JAX's own rules, `lax`'s conv VJP, for undilated convs)."""
  lo = pad[0]
  out_dilated = _dilated(out_size, stride)
  dx_before = k_size - lo - 1
  dx_after = in_size + k_size - 1 - out_dilated - dx_before
  dw_after = out_dilated - in_size + k_size - lo - 1
  return (dx_before, dx_after), (lo, dw_after)


def _col2im_dx(w, dy, in_hw, strides, padding):
  """The input gradient of a conv as a matmul + col2im.

  `z = dy @ w^T` (a canonical dot: [B*Ho*Wo, Cout] x [Cout, KH*KW*Cin]) gives
  every kernel tap's contribution; each tap's slice is scattered back to its
  input positions (interior padding by the stride) and summed, all in one XLA
  loop fusion. `z` is KH*KW times the input's size, so this is used only where
  the convolution formulation is slow: few input channels (a convolution with
  few output channels runs badly on XLA:CPU) or an output smaller than the
  kernel (the convolution would mostly multiply padding zeros; LeNet's conv3).
  """
  kh, kw = w.shape[:2]
  ho, wo = dy.shape[1:3]
  z = jnp.einsum("bhwo,xyio->bhwxyi", dy, w)
  full_h, full_w = (ho - 1) * strides[0] + kh, (wo - 1) * strides[1] + kw
  zero = jnp.zeros((), z.dtype)
  taps = [lax.pad(z[:, :, :, i, j, :], zero, ((0, 0, 0), (i, kh - 1 - i, strides[0] - 1),
                                              (j, kw - 1 - j, strides[1] - 1), (0, 0, 0)))
          for i in range(kh) for j in range(kw)]
  # A reduction over the stacked taps, not a chain of adds: XLA:CPU fuses a chain of
  # adds of pads into every consumer (recomputing all taps per use, e.g. four times in
  # a max-pool gradient), but keeps a reduction as its own fusion.
  full = jnp.sum(jnp.stack(taps), axis=0)
  (lo_h, hi_h), (lo_w, hi_w) = padding
  # `full` covers padded-input rows [0, full_h); rows beyond it (a stride that does
  # not divide the padded size) get no gradient; then drop the padding.
  full = lax.pad(full, zero,
                 ((0, 0, 0), (0, in_hw[0] + lo_h + hi_h - full_h, 0),
                  (0, in_hw[1] + lo_w + hi_w - full_w, 0), (0, 0, 0)))
  return full[:, lo_h:lo_h + in_hw[0], lo_w:lo_w + in_hw[1], :]


def _canonical_bwd(x, w, dy, strides, padding):
  """(dx, dw) of an NHWC/HWIO conv as canonical NHWC/HWIO convolutions."""
  bar = lax.optimization_barrier
  pads = [_grad_paddings(x.shape[1 + i], w.shape[i], strides[i], dy.shape[1 + i], padding[i])
          for i in range(2)]
  dx_pad, dw_pad = [p[0] for p in pads], [p[1] for p in pads]
  small_output = dy.shape[1] < w.shape[0] or dy.shape[2] < w.shape[1]
  if x.shape[-1] <= COL2IM_MAX_CHANNELS or (COL2IM_SMALL_OUTPUT and small_output):
    dx = _col2im_dx(w, dy, x.shape[1:3], strides, padding)
  else:  # dy, dilated by the stride, correlated with the flipped, io-swapped kernel
    wt = bar(jnp.transpose(jnp.flip(w, (0, 1)), (0, 1, 3, 2)))
    dx = bar(_nhwc_conv(dy, wt, _ONES, dx_pad, lhs_dilation=strides))
  # dW: x (channels as the batch, the batch as features) correlated with dy (dilated by the
  # stride, the batch as input features).
  xt = bar(jnp.transpose(x, (3, 1, 2, 0)))
  dyt = bar(jnp.transpose(dy, (1, 2, 0, 3)))
  dw = bar(_nhwc_conv(xt, dyt, _ONES, dw_pad, rhs_dilation=strides))
  return dx.astype(x.dtype), jnp.transpose(dw, (1, 2, 0, 3)).astype(w.dtype)


def _xla_bwd(x, w, dy, strides, padding):
  return jax.vjp(lambda x_, w_: _nhwc_conv(x_, w_, strides, padding), x, w)[1](dy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv(x, w, strides, padding, everywhere):
  del everywhere
  return _nhwc_conv(x, w, strides, padding)


def _conv_fwd(x, w, strides, padding, everywhere):
  return _conv(x, w, strides, padding, everywhere), (x, w)


def _conv_bwd(strides, padding, everywhere, res, dy):
  x, w = res
  canonical = functools.partial(_canonical_bwd, strides=strides, padding=padding)
  if everywhere:
    return canonical(x, w, dy)
  xla = functools.partial(_xla_bwd, strides=strides, padding=padding)
  return lax.platform_dependent(x, w, dy, cpu=canonical, default=xla)


_conv.defvjp(_conv_fwd, _conv_bwd)


def _is_nhwc(dimension_numbers, ndim: int) -> bool:
  if dimension_numbers is None or ndim != 4:
    return False
  if all(isinstance(d, str) for d in dimension_numbers):
    return tuple(dimension_numbers) == _NHWC
  dn = dimension_numbers
  return (tuple(dn.lhs_spec), tuple(dn.rhs_spec), tuple(dn.out_spec)) == (
      (0, 3, 1, 2), (3, 2, 0, 1), (0, 3, 1, 2))


def conv_general_dilated(lhs, rhs, window_strides: Sequence[int], padding,
                         lhs_dilation=None, rhs_dilation=None, dimension_numbers=None,
                         feature_group_count: int = 1, batch_group_count: int = 1,
                         precision=None, preferred_element_type=None):
  """`lax.conv_general_dilated` with loop-friendly gradients on CPU.

  Same signature and forward result as `lax.conv_general_dilated`; plain
  float32 NHWC/HWIO convolutions get the custom VJP described in the module
  docstring, everything else is passed through.
  """
  plain = (_mode() != "xla" and _is_nhwc(dimension_numbers, lhs.ndim)
           and tuple(lhs_dilation or _ONES) == _ONES and tuple(rhs_dilation or _ONES) == _ONES
           and feature_group_count == 1 and batch_group_count == 1
           and lhs.dtype == jnp.float32 and rhs.dtype == jnp.float32
           and precision is None and preferred_element_type is None)
  if not plain:
    return lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
        feature_group_count=feature_group_count, batch_group_count=batch_group_count,
        precision=precision, preferred_element_type=preferred_element_type)
  strides = tuple(int(s) for s in window_strides)
  if isinstance(padding, str):
    padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
  padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return _conv(lhs, rhs, strides, padding, _mode() == "canonical")


@jax.custom_vjp
def add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """`y + bias` over the last axis; the bias gradient is `norm.column_sums` (a GEMV on CPU:
  XLA:CPU runs the (batch, H, W) reduction of a conv bias's gradient as a slow reduce-window,
  up to 23 ms for a generator's [128, 32, 32, 32] output)."""
  return y + bias


def _add_bias_fwd(y, bias):
  return y + bias, None


def _add_bias_bwd(_, g):
  return g, norm_lib.column_sums(g)


add_bias.defvjp(_add_bias_fwd, _add_bias_bwd)


class _BiasAddedByColumnSums:
  """The bias as `nn.Conv` sees it after `promote_dtype`: Flax adds it as
  `y += bias.reshape((1, 1, 1, C))`, which becomes `add_bias(y, bias)` (via `__radd__`, as a JAX
  array defers to an operand type it does not know)."""

  def __init__(self, value):
    self.value = value
    self.ndim, self.shape, self.dtype = value.ndim, value.shape, value.dtype

  def reshape(self, *shape):
    del shape
    return self

  def __radd__(self, y):
    return add_bias(y, self.value)


def _promote_dtype(*args, dtype=None, inexact=True):
  inputs, kernel, bias = flax_dtypes.promote_dtype(*args, dtype=dtype, inexact=inexact)
  if (_mode() != "xla" and bias is not None and bias.ndim == 1 and inputs.ndim == 4
      and bias.dtype == jnp.float32):
    bias = _BiasAddedByColumnSums(bias)
  return inputs, kernel, bias


Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated,
                         promote_dtype=_promote_dtype)
Conv.__doc__ = ("`flax.linen.Conv` with `conv_general_dilated` (CPU-fast gradients in loops) "
                "and a bias whose gradient is a column sum (`add_bias`).")



# ============================================================================ x2 upsample + conv

def _phase_taps(k, phase: int):
  """The two taps of output phase `phase` along `k`'s first axis (a kernel's 3 rows or columns).

  A 3x3 'SAME' conv of the x2 nearest-upsampled map reads only two input rows per output row:
  y[2i] = K0 x[i-1] + (K1 + K2) x[i] and y[2i+1] = (K0 + K1) x[i] + K2 x[i+1] (columns alike).
  Plain float32 additions, so no matmul precision setting (TF32, bfloat16 passes) touches them.
  """
  return (k[0], k[1] + k[2]) if phase == 0 else (k[0] + k[1], k[2])


def upsample2x_conv(lhs, rhs, window_strides: Sequence[int], padding, lhs_dilation=None,
                    rhs_dilation=None, dimension_numbers=None, feature_group_count: int = 1,
                    batch_group_count: int = 1, precision=None, preferred_element_type=None):
  """A 3x3 stride-1 'SAME' convolution of the x2 nearest-upsampled `lhs`, on `lhs` itself.

  `upsample2x_conv(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC/HWIO)` equals
  `conv(upsample_nearest_2x(x), w, ...)` up to float rounding: each of the four output phases
  (even/odd row x even/odd column) reads a 2x2 neighbourhood of `x` with taps that are sums of
  `w`'s. Per row phase, one 2x2 VALID convolution of `x` (padded by one row above or below and
  one column on each side) computes both column phases as 2 x Cout output channels; the column
  phases are cropped by one pixel and everything is interleaved. At 8 -> 16 and 16 -> 32 pixels
  that is 50 % and 47 % of the direct convolution's FLOPs, and the upsampled map (4x the input)
  is never built, in the forward pass or the gradient. (Measured against one convolution for all
  four phases, cropped per phase, and four aligned convolutions: this split was the fastest
  of the three and needed the least XLA temporary memory of the three, forward and backward, in
  a PRE-DFKD generator at batch 256 on the 2-core CPU; with XLA:CPU's scheduler flag of
  `compile.memory_scheduler` its forward + backward needs more temporaries than the direct
  form, 580 against 362 MiB: benchmarks/RESULTS.md §13.) Same signature as `lax.conv_general_dilated` (what `nn.Conv`
  calls); only that one configuration is accepted.

  Raises:
    ValueError: for any other kernel size, stride, padding, dilation or layout.
  """
  pads = padding if isinstance(padding, str) else tuple(tuple(int(v) for v in p) for p in padding)
  if (lhs.ndim != 4 or tuple(rhs.shape[:2]) != (3, 3) or not _is_nhwc(dimension_numbers, 4)
      or tuple(window_strides) != _ONES or pads not in ("SAME", ((1, 1), (1, 1)))
      or tuple(lhs_dilation or _ONES) != _ONES or tuple(rhs_dilation or _ONES) != _ONES
      or feature_group_count != 1 or batch_group_count != 1):
    raise ValueError("upsample2x_conv computes only a 3x3, stride-1, padding-1 NHWC/HWIO "
                     f"convolution; got kernel {rhs.shape}, strides {window_strides}, padding "
                     f"{padding}, dimension numbers {dimension_numbers}.")
  b, h, w, _ = lhs.shape
  cout = rhs.shape[-1]
  rows = []
  for a in (0, 1):  # row phase a reads rows (i - 1, i) or (i, i + 1)
    # Row taps (2 x [3 kernel columns, Cin, Cout]) -> per row tap, each column phase's taps.
    taps = [[_phase_taps(row_tap, c) for c in (0, 1)] for row_tap in _phase_taps(rhs, a)]
    # [2, 2, Cin, 2 Cout]: row tap r, column tap s, output channels (column phase c, Cout)
    kernel = jnp.stack([jnp.stack([jnp.concatenate([by_phase[c][s] for c in (0, 1)], -1)
                                   for s in (0, 1)]) for by_phase in taps])
    xp = jnp.pad(lhs, ((0, 0), (1 - a, a), (1, 1), (0, 0)))
    z = conv_general_dilated(xp, kernel, _ONES, ((0, 0), (0, 0)), dimension_numbers=_NHWC,
                             precision=precision, preferred_element_type=preferred_element_type)
    z = z.reshape(b, h, w + 1, 2, cout)  # column phase c reads columns (j - 1 + c, j + c)
    rows.append(jnp.stack([z[:, :, c:c + w, c] for c in (0, 1)], axis=3))
  return jnp.stack(rows, axis=2).reshape(b, 2 * h, 2 * w, cout)


UpsampleConv = functools.partial(nn.Conv, conv_general_dilated=upsample2x_conv,
                                 promote_dtype=_promote_dtype)
UpsampleConv.__doc__ = ("`Conv` applied to the x2 nearest upsampling of its input, computed "
                        "phase by phase on the input (`upsample2x_conv`); takes the small map.")
