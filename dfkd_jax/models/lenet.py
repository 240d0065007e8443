"""LeNet-5 and LeNet-5-half, DAFL's MNIST teacher/student pair.

Layers (VALID padding): conv5x5(c1) -> ReLU -> maxpool2 -> conv5x5(c2) -> ReLU
-> maxpool2 -> conv5x5(c3) -> ReLU -> linear(h) -> ReLU -> linear(K), with
(c1, c2, c3, h) = (6, 16, 120, 84) for LeNet-5 and (3, 8, 60, 42) for the half.
The `_bn` variants put a BatchNorm after every conv and after the hidden linear
layer (before the ReLU), and drop the biases of the layers that BN follows.

Input size. The layers are those of a 32x32 LeNet: on 32x32 the third conv
produces a 1x1 map. Inputs smaller than 32 in height or width (such as raw
28x28 MNIST / Fashion-MNIST) raise a `ValueError`: pad them to 32x32 (e.g.
2 pixels of zero padding per side, as DAFL's resize to 32 does in effect).
Larger inputs are accepted: the third conv's output map is then averaged over
space before the linear layers, which is the identity at 32x32.

Outputs follow the dfkd_jax model contract: `(logits, aux)` with
`aux["feature"]` the hidden h-dimensional activation (after its ReLU; 84-d or
42-d, float32) and `aux["stages"]` the outputs of the three conv blocks.

Exact parameter counts (10 / 100 classes): LeNet-5 61,706 / 69,356 on 1
channel (62,006 / 69,656 on 3 channels); LeNet-5-half 15,738 / 19,608 on 1
channel (15,888 / 19,758 on 3). The BN variants (BN scale and bias count as
parameters; running statistics do not): LeNet-5-bn 61,932 / 69,582 on 1 channel
(62,232 / 69,882 on 3); LeNet-5-half-bn 15,851 / 19,721 on 1 channel
(16,001 / 19,871 on 3).
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfkd_jax.models import conv as conv_lib
from dfkd_jax.models import norm as norm_lib
from dfkd_jax.models.resnet_cifar import conv_kernel_init

MIN_SIZE = 32


def _pool_windows(x: jax.Array) -> tuple[jax.Array, ...]:
  """The four elements of every 2x2 window (row-major), floor-cropped."""
  h, w = x.shape[1] // 2 * 2, x.shape[2] // 2 * 2
  return (x[:, 0:h:2, 0:w:2], x[:, 0:h:2, 1:w:2], x[:, 1:h:2, 0:w:2], x[:, 1:h:2, 1:w:2])


def _pool_with_argmax(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Window maxima and the index (0-3, row-major) of each window's first maximum."""
  a, b, c, d = _pool_windows(x)
  top, bottom = jnp.maximum(a, b), jnp.maximum(c, d)
  top_i = jnp.where(b > a, 1, 0).astype(jnp.int8)
  bottom_i = jnp.where(d > c, 3, 2).astype(jnp.int8)
  return jnp.maximum(top, bottom), jnp.where(bottom > top, bottom_i, top_i)


@jax.custom_vjp
def max_pool_2x2(x: jax.Array) -> jax.Array:
  """`nn.max_pool(x, (2, 2), strides=(2, 2))` (VALID, NHWC), with a cheap gradient.

  Same values and the same gradient as `nn.max_pool` (the whole cotangent goes
  to the first maximum of each window in row-major order, as XLA's
  select-and-scatter and PyTorch do), but the backward pass is four selects on
  an int8 argmax saved by the forward pass and one interleaving copy instead of
  a select-and-scatter, which XLA:CPU runs slowly (about a fifth of a LeNet
  DeepInversion step). The argmax is saved rather than re-derived by comparing
  inputs with the maxima: XLA may recompute the input in another fusion with
  different rounding, and float equality would then drop gradients.
  """
  return _pool_with_argmax(x)[0]


def _max_pool_fwd(x):
  out, argmax = _pool_with_argmax(x)
  return out, (argmax, x.shape)


def _max_pool_bwd(res, g):
  argmax, shape = res
  zero = jnp.zeros_like(g)
  grads = [jnp.where(argmax == k, g, zero) for k in range(4)]
  n, h, w, ch = g.shape
  dx = jnp.stack(grads, axis=3).reshape(n, h, w, 2, 2, ch)  # [.., row, col, ..]
  dx = dx.transpose(0, 1, 3, 2, 4, 5).reshape(n, 2 * h, 2 * w, ch)
  pad = ((0, 0), (0, shape[1] - 2 * h), (0, shape[2] - 2 * w), (0, 0))
  # Materialised (barrier): fused into its consumer, the interleave was recomputed per use.
  return (jax.lax.optimization_barrier(jnp.pad(dx, pad)),)


max_pool_2x2.defvjp(_max_pool_fwd, _max_pool_bwd)


class LeNet5(nn.Module):
  """LeNet-5 (optionally with BatchNorm) for inputs of at least 32x32.

  Attributes:
    num_classes: number of logits.
    widths: (conv1, conv2, conv3, hidden) widths.
    use_bn: insert BatchNorm after every conv and the hidden linear layer.
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int = 10
  widths: Sequence[int] = (6, 16, 120, 84)
  use_bn: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """Returns `(logits, {"feature", "stages"})` for an NHWC batch `x`.

    Raises:
      ValueError: if the input is smaller than 32x32.
    """
    height, width = x.shape[1], x.shape[2]
    if height < MIN_SIZE or width < MIN_SIZE:
      raise ValueError(
          f"LeNet-5 needs inputs of at least {MIN_SIZE}x{MIN_SIZE}, got "
          f"{height}x{width}; pad 28x28 MNIST-style images to 32x32 "
          "(2 pixels per side).")
    c1, c2, c3, hidden = self.widths
    conv = functools.partial(
        conv_lib.Conv, kernel_size=(5, 5), padding="VALID", use_bias=not self.use_bn,
        dtype=self.dtype, kernel_init=conv_kernel_init)
    norm = functools.partial(
        norm_lib.BatchNorm, use_running_average=not train, momentum=0.9,
        epsilon=1e-5, dtype=self.dtype)

    def maybe_norm(y: jax.Array, name: str) -> jax.Array:
      return norm(name=name)(y) if self.use_bn else y

    stages = []
    x = nn.relu(maybe_norm(conv(c1, name="conv1")(x), "bn1"))
    x = max_pool_2x2(x)
    stages.append(x)
    x = nn.relu(maybe_norm(conv(c2, name="conv2")(x), "bn2"))
    x = max_pool_2x2(x)
    stages.append(x)
    x = nn.relu(maybe_norm(conv(c3, name="conv3")(x), "bn3"))
    stages.append(x)
    x = jnp.mean(x, axis=(1, 2))  # Identity at 32x32 (1x1 map).
    x = nn.Dense(hidden, use_bias=not self.use_bn, dtype=self.dtype,
                 name="hidden")(x)
    feature = nn.relu(maybe_norm(x, "bn4")).astype(jnp.float32)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="fc")(feature)
    return logits, {"feature": feature, "stages": tuple(stages)}


lenet5 = functools.partial(LeNet5, widths=(6, 16, 120, 84), use_bn=False)
lenet5_half = functools.partial(LeNet5, widths=(3, 8, 60, 42), use_bn=False)
lenet5_bn = functools.partial(LeNet5, widths=(6, 16, 120, 84), use_bn=True)
lenet5_half_bn = functools.partial(LeNet5, widths=(3, 8, 60, 42), use_bn=True)
