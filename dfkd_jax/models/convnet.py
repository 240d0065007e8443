"""ConvNet-3, the embedding network of Distribution Matching (docs/methods.md §9).

Layers: 3 x [Conv3x3 (width 128, SAME padding, with bias) -> instance norm -> ReLU -> 2x2 average
pool], flatten, then a linear classifier. The instance norm is a GroupNorm with one group per
channel and a learnt per-channel scale and bias (the official DM code's `instancenorm`), so the
network has no batch statistics and every image is embedded independently of the rest of its
batch. On 32x32 inputs the flattened embedding is 4 * 4 * 128 = 2048-d.

Initialisation follows PyTorch's defaults (the DM code draws its embedding networks from them):
conv and linear weights and biases are U(-1/sqrt(fan_in), 1/sqrt(fan_in)); norm scale 1, bias 0.

Outputs follow the dfkd_jax model contract: `(logits, aux)` with `aux["feature"]` the flattened
embedding (float32; DM's ψ) and `aux["stages"]` the outputs of the three blocks.

Exact parameter counts (32x32 inputs, 10 / 100 classes): 320,010 / 504,420 on 3 channels;
317,706 / 502,116 on 1 channel.
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfkd_jax.models import conv as conv_lib

# PyTorch's default kaiming_uniform(a=sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
torch_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_bias_init(fan_in: int) -> nn.initializers.Initializer:
  """PyTorch's default bias initialiser, U(-1/sqrt(fan_in), 1/sqrt(fan_in))."""
  bound = 1.0 / max(1, fan_in) ** 0.5

  def init(key: jax.Array, shape: Sequence[int], dtype: Any = jnp.float32) -> jax.Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


class ConvNet(nn.Module):
  """DM's ConvNet-D (depth 3 by default) with instance norm and average pooling.

  Attributes:
    num_classes: number of logits.
    width: channels of every conv (128).
    depth: number of conv blocks (3).
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int = 10
  width: int = 128
  depth: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """Returns `(logits, {"feature", "stages"})` for an NHWC batch `x`.

    `train` is accepted for the model contract; the network behaves the same in both modes.
    """
    del train  # No BatchNorm, no dropout.
    stages = []
    for i in range(self.depth):
      fan_in = 9 * x.shape[-1]
      x = conv_lib.Conv(self.width, (3, 3), padding="SAME", dtype=self.dtype,
                  kernel_init=torch_kernel_init, bias_init=torch_bias_init(fan_in),
                  name=f"conv{i + 1}")(x)
      x = nn.GroupNorm(num_groups=None, group_size=1, epsilon=1e-5, dtype=self.dtype,
                       name=f"norm{i + 1}")(x)
      x = nn.relu(x)
      x = nn.avg_pool(x, (2, 2), strides=(2, 2))
      stages.append(x)
    feature = x.reshape((x.shape[0], -1)).astype(jnp.float32)
    logits = nn.Dense(self.num_classes, dtype=jnp.float32, kernel_init=torch_kernel_init,
                      bias_init=torch_bias_init(feature.shape[-1]), name="fc")(feature)
    return logits, {"feature": feature, "stages": tuple(stages)}


convnet3 = functools.partial(ConvNet, width=128, depth=3)
