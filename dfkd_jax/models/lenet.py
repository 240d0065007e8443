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

from dfkd_jax.models.resnet_cifar import conv_kernel_init

MIN_SIZE = 32


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
        nn.Conv, kernel_size=(5, 5), padding="VALID", use_bias=not self.use_bn,
        dtype=self.dtype, kernel_init=conv_kernel_init)
    norm = functools.partial(
        nn.BatchNorm, use_running_average=not train, momentum=0.9,
        epsilon=1e-5, dtype=self.dtype)

    def maybe_norm(y: jax.Array, name: str) -> jax.Array:
      return norm(name=name)(y) if self.use_bn else y

    stages = []
    x = nn.relu(maybe_norm(conv(c1, name="conv1")(x), "bn1"))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
    stages.append(x)
    x = nn.relu(maybe_norm(conv(c2, name="conv2")(x), "bn2"))
    x = nn.max_pool(x, (2, 2), strides=(2, 2))
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
