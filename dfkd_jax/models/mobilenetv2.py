"""MobileNetV2 adapted to 32x32 inputs (CIFAR).

Variant. The blocks are those of the paper (Sandler et al., 2018) and of
torchvision: inverted residuals with a linear bottleneck and ReLU6, no
expansion conv when the expansion factor t is 1, and an identity residual
only when the stride is 1 and the width is unchanged (no conv shortcuts);
then a 1x1 conv to 1280 channels, global average pool and a linear layer. No
dropout before the classifier. The CIFAR adaptation follows the common
kuangliu/pytorch-cifar strides: the stem is a stride-1 3x3 conv (32 channels)
and the first stride-2 bottleneck stage (t=6, c=24, n=2) has stride 1, so the
network downsamples 8x in total (32 -> 4 pixels) instead of 32x.

Stages. `aux["stages"]` holds the feature map at the end of each resolution:
after the 24-, 32-, 96- and 320-channel bottleneck stages, i.e. 32x32, 16x16,
8x8 and 4x4 maps for a 32x32 input, the same resolutions as the CIFAR
ResNet-18/34 stages. `aux["feature"]` is the pooled 1280-d feature (float32).

Exact parameter counts: 2,236,682 (10 classes), 2,351,972 (100 classes).
"""

from collections.abc import Sequence
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfkd_jax.models.resnet_cifar import make_conv_and_norm
from dfkd_jax.models.resnet_cifar import pool_and_classify

ModuleDef = Callable[..., nn.Module]

# (expansion t, channels c, repeats n, stride s); the second row has stride 1
# instead of the paper's 2 (CIFAR adaptation).
CIFAR_CONFIG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
  """Rounds a channel count to a multiple of `divisor` (at most -10%)."""
  new_value = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if new_value < 0.9 * value:
    new_value += divisor
  return new_value


class InvertedResidual(nn.Module):
  """MobileNetV2 inverted-residual block with a linear bottleneck.

  Attributes:
    features: output channels.
    strides: stride of the depthwise conv.
    expansion: expansion factor t.
    conv: bias-free conv partial.
    norm: BatchNorm partial.
  """
  features: int
  strides: int
  expansion: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to an NHWC batch."""
    in_features = x.shape[-1]
    hidden = int(round(in_features * self.expansion))
    y = x
    if self.expansion != 1:
      y = self.conv(hidden, (1, 1), padding=0, name="expand_conv")(y)
      y = nn.relu6(self.norm(name="expand_bn")(y))
    y = self.conv(hidden, (3, 3), (self.strides, self.strides), padding=1,
                  feature_group_count=hidden, name="dw_conv")(y)
    y = nn.relu6(self.norm(name="dw_bn")(y))
    y = self.conv(self.features, (1, 1), padding=0, name="project_conv")(y)
    y = self.norm(name="project_bn")(y)
    if self.strides == 1 and in_features == self.features:
      y = y + x
    return y


class MobileNetV2(nn.Module):
  """MobileNetV2 for 32x32 inputs (see the module docstring for the variant).

  Attributes:
    num_classes: number of logits.
    width_mult: channel multiplier (1.0 gives the standard network).
    config: rows of (t, c, n, s) bottleneck stages.
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int = 10
  width_mult: float = 1.0
  config: Sequence[tuple[int, int, int, int]] = CIFAR_CONFIG
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """Returns `(logits, {"feature", "stages"})` for an NHWC batch `x`."""
    conv, norm = make_conv_and_norm(self.dtype, train)
    stem = _make_divisible(32 * self.width_mult)
    last = _make_divisible(1280 * max(1.0, self.width_mult))
    x = conv(stem, (3, 3), padding=1, name="stem_conv")(x)
    x = nn.relu6(norm(name="stem_bn")(x))
    stages = []
    for i, (t, c, n, s) in enumerate(self.config):
      width = _make_divisible(c * self.width_mult)
      for j in range(n):
        x = InvertedResidual(width, s if j == 0 else 1, t, conv, norm,
                             name=f"stage{i + 1}_{j}")(x)
      next_stride = self.config[i + 1][3] if i + 1 < len(self.config) else 2
      if next_stride != 1:  # Last stage at this resolution.
        stages.append(x)
    x = conv(last, (1, 1), padding=0, name="head_conv")(x)
    x = nn.relu6(norm(name="head_bn")(x))
    logits, feature = pool_and_classify(x, self.num_classes)
    return logits, {"feature": feature, "stages": tuple(stages)}


mobilenetv2 = functools.partial(MobileNetV2)
