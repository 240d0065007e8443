"""CIFAR ResNets (He et al. and the DAFL/CMI ResNet-18/34) and Wide ResNets.

Every classifier follows the dfkd_jax model contract:
`apply(variables, x, train=...) -> (logits, aux)`, with `x` a normalised NHWC
float32 batch, `logits` float32 `[B, num_classes]` and
`aux = {"feature": [B, F] float32 pooled penultimate feature,
"stages": tuple of stage outputs}`. BatchNorm state lives in `batch_stats`.

Families (parameter counts are exact, for 32x32x3 inputs, 10 / 100 classes):

* `ResNet` with `stage_sizes=(2, 2, 2, 2)` / `(3, 4, 6, 3)` and widths
  64..512: the CIFAR ResNet-18 / ResNet-34 of DAFL, CMI and Fast (3x3 stride-1
  stem, no max-pool, BasicBlocks, 1x1 conv + BN projection shortcuts, global
  average pool, linear). ResNet-18: 11,173,962 / 11,220,132. ResNet-34:
  21,282,122 / 21,328,292. Four stages at 32, 16, 8 and 4 pixels.
* `ResNet` with widths 16/32/64 and n = 1, 3, 5 blocks per stage: the CIFAR
  ResNet-8/20/32 of He et al. (2016). He et al. use zero-padding identity
  shortcuts ("option A"); we use 1x1 conv + BN projection shortcuts when the
  shape changes ("option B", as in the CMI/Fast `resnet_tiny` students),
  which adds 2,752 parameters: ResNet-8: 78,042 / 83,892; ResNet-20:
  272,474 / 278,324 (He et al. quote 0.27M); ResNet-32: 466,906 / 472,756.
  Three stages at 32, 16 and 8 pixels.
* `WideResNet` WRN-d-k (Zagoruyko & Komodakis 2016; the ZSKT/CMI variant):
  pre-activation blocks, widths 16, 16k, 32k, 64k, 1x1 conv shortcuts (no BN)
  when the width changes, final BN-ReLU, global average pool, linear;
  dropout 0 by default. WRN-16-1: 175,066 / 180,916; WRN-16-2: 691,674 /
  703,284; WRN-40-1: 563,930 / 569,780; WRN-40-2: 2,243,546 / 2,255,156.
  Three stages (raw group outputs, before the final BN-ReLU, as ZSKT's
  attention term uses them).

Initialisation: convolutions use Kaiming-normal with fan-out (the
initialisation of the PyTorch reference models); BN scale 1, bias 0; the
linear layers use Flax's default (LeCun normal, zero bias). The logits layer
and the pooled feature are always float32, whatever `dtype`; the stage outputs
are in the compute dtype.
"""

from collections.abc import Sequence
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from dfkd_jax.models import conv as conv_lib
from dfkd_jax.models import norm as norm_lib

ModuleDef = Callable[..., nn.Module]

# Kaiming-normal, fan-out, ReLU gain: PyTorch `kaiming_normal_(mode="fan_out")`.
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def make_conv_and_norm(dtype: Any, train: bool) -> tuple[ModuleDef, ModuleDef]:
  """Returns the bias-free conv and the BatchNorm partials shared by the zoo.

  Args:
    dtype: compute dtype (parameters stay float32).
    train: if True, BatchNorm uses batch statistics and updates its running
      averages in `batch_stats`; otherwise it uses the running averages.

  Returns:
    `(conv, norm)`: `functools.partial`s of `conv_lib.Conv` and `norm_lib.BatchNorm` (`nn.BatchNorm` with CPU-fast statistics).
  """
  conv = functools.partial(
      conv_lib.Conv, use_bias=False, dtype=dtype, kernel_init=conv_kernel_init)
  norm = functools.partial(
      norm_lib.BatchNorm, use_running_average=not train, momentum=0.9,
      epsilon=1e-5, dtype=dtype)
  return conv, norm


def pool_and_classify(
    x: jax.Array, num_classes: int) -> tuple[jax.Array, jax.Array]:
  """Global average pool in float32, then a float32 linear layer `fc`.

  Must be called from inside a compact method.

  Args:
    x: `[B, H, W, F]` final feature map.
    num_classes: number of logits.

  Returns:
    `(logits [B, num_classes], feature [B, F])`, both float32.
  """
  feature = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
  logits = nn.Dense(num_classes, dtype=jnp.float32, name="fc")(feature)
  return logits, feature


class BasicBlock(nn.Module):
  """Post-activation ResNet basic block with a conv + BN projection shortcut.

  Attributes:
    features: output channels.
    strides: stride of the first 3x3 conv (and of the projection).
    conv: bias-free conv partial.
    norm: BatchNorm partial.
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to an NHWC batch."""
    s = (self.strides, self.strides)
    y = self.conv(self.features, (3, 3), s, padding=1, name="conv1")(x)
    y = nn.relu(self.norm(name="bn1")(y))
    y = self.conv(self.features, (3, 3), padding=1, name="conv2")(y)
    y = self.norm(name="bn2")(y)
    if self.strides != 1 or x.shape[-1] != self.features:
      x = self.conv(self.features, (1, 1), s, padding=0,
                    name="shortcut_conv")(x)
      x = self.norm(name="shortcut_bn")(x)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """CIFAR ResNet: 3x3 stem, no max-pool, stages of `BasicBlock`s.

  The first stage has stride 1 and every later stage stride 2.

  Attributes:
    num_classes: number of logits.
    stage_sizes: blocks per stage, e.g. (2, 2, 2, 2) for ResNet-18.
    widths: channels per stage; the stem has `widths[0]` channels.
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  widths: Sequence[int] = (64, 128, 256, 512)
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """Returns `(logits, {"feature", "stages"})` for an NHWC batch `x`."""
    if len(self.stage_sizes) != len(self.widths):
      raise ValueError(
          f"stage_sizes {tuple(self.stage_sizes)} and widths "
          f"{tuple(self.widths)} must have the same length.")
    conv, norm = make_conv_and_norm(self.dtype, train)
    x = conv(self.widths[0], (3, 3), padding=1, name="stem_conv")(x)
    x = nn.relu(norm(name="stem_bn")(x))
    stages = []
    for i, (n_blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(width, strides, conv, norm,
                       name=f"layer{i + 1}_{j}")(x)
      stages.append(x)
    logits, feature = pool_and_classify(x, self.num_classes)
    return logits, {"feature": feature, "stages": tuple(stages)}


class WideBasicBlock(nn.Module):
  """Pre-activation wide-ResNet block (BN-ReLU-conv, twice).

  When the width changes, the shortcut is a bias-free 1x1 conv applied to the
  pre-activated input (as in the WRN reference code); otherwise it is the
  identity on the raw input.

  Attributes:
    features: output channels.
    strides: stride of the first 3x3 conv (and of the shortcut).
    conv: bias-free conv partial.
    norm: BatchNorm partial.
    dropout_rate: dropout between the two convs (0 disables it).
    train: enables dropout when `dropout_rate > 0` (needs a 'dropout' rng).
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  dropout_rate: float = 0.0
  train: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Applies the block to an NHWC batch."""
    s = (self.strides, self.strides)
    equal_in_out = x.shape[-1] == self.features
    act = nn.relu(self.norm(name="bn1")(x))
    y = self.conv(self.features, (3, 3), s, padding=1, name="conv1")(act)
    y = nn.relu(self.norm(name="bn2")(y))
    if self.dropout_rate > 0:
      y = nn.Dropout(self.dropout_rate, deterministic=not self.train)(y)
    y = self.conv(self.features, (3, 3), padding=1, name="conv2")(y)
    if equal_in_out:
      if self.strides != 1:
        raise ValueError("An identity shortcut cannot change the resolution.")
      shortcut = x
    else:
      shortcut = self.conv(self.features, (1, 1), s, padding=0,
                           name="shortcut_conv")(act)
    return y + shortcut


class WideResNet(nn.Module):
  """WRN-depth-k for 32x32 inputs (pre-activation, 3 groups).

  Attributes:
    num_classes: number of logits.
    depth: total depth; (depth - 4) must be divisible by 6.
    widen_factor: k; the groups have 16k, 32k and 64k channels.
    dropout_rate: dropout inside each block (default 0, as in ZSKT/CMI).
    dtype: compute dtype (parameters stay float32).
  """
  num_classes: int = 10
  depth: int = 40
  widen_factor: int = 2
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array,
               train: bool = False) -> tuple[jax.Array, dict[str, Any]]:
    """Returns `(logits, {"feature", "stages"})` for an NHWC batch `x`."""
    if (self.depth - 4) % 6 != 0:
      raise ValueError(f"WRN depth must be 6n + 4, got {self.depth}.")
    n = (self.depth - 4) // 6
    widths = (16 * self.widen_factor, 32 * self.widen_factor,
              64 * self.widen_factor)
    conv, norm = make_conv_and_norm(self.dtype, train)
    x = conv(16, (3, 3), padding=1, name="stem_conv")(x)
    stages = []
    for i, width in enumerate(widths):
      for j in range(n):
        strides = 2 if i > 0 and j == 0 else 1
        x = WideBasicBlock(width, strides, conv, norm, self.dropout_rate,
                           train, name=f"block{i + 1}_{j}")(x)
      stages.append(x)
    x = nn.relu(norm(name="final_bn")(x))
    logits, feature = pool_and_classify(x, self.num_classes)
    return logits, {"feature": feature, "stages": tuple(stages)}


resnet8 = functools.partial(ResNet, stage_sizes=(1, 1, 1), widths=(16, 32, 64))
resnet20 = functools.partial(ResNet, stage_sizes=(3, 3, 3), widths=(16, 32, 64))
resnet32 = functools.partial(ResNet, stage_sizes=(5, 5, 5), widths=(16, 32, 64))
resnet18 = functools.partial(
    ResNet, stage_sizes=(2, 2, 2, 2), widths=(64, 128, 256, 512))
resnet34 = functools.partial(
    ResNet, stage_sizes=(3, 4, 6, 3), widths=(64, 128, 256, 512))
wrn16_1 = functools.partial(WideResNet, depth=16, widen_factor=1)
wrn16_2 = functools.partial(WideResNet, depth=16, widen_factor=2)
wrn40_1 = functools.partial(WideResNet, depth=40, widen_factor=1)
wrn40_2 = functools.partial(WideResNet, depth=40, widen_factor=2)
