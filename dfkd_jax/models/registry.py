"""Model registry: classifier name -> constructor.

`get_model(name, num_classes, **kwargs)` builds a classifier that follows the
dfkd_jax model contract, `apply(variables, x, train=...) -> (logits, aux)` with
`aux = {"feature": [B, F], "stages": tuple}`; see the family modules for the
architectures and their exact parameter counts.
"""

from typing import Any, Callable

import flax.linen as nn

from dfkd_jax.models import convnet
from dfkd_jax.models import lenet
from dfkd_jax.models import mobilenetv2 as mobilenetv2_lib
from dfkd_jax.models import resnet_cifar

MODELS: dict[str, Callable[..., nn.Module]] = {
    # DAFL's MNIST pair (32x32 inputs), with and without BatchNorm.
    "lenet5": lenet.lenet5,
    "lenet5_half": lenet.lenet5_half,
    "lenet5_bn": lenet.lenet5_bn,
    "lenet5_half_bn": lenet.lenet5_half_bn,
    # He et al. CIFAR ResNets (16/32/64 widths, projection shortcuts).
    "resnet8": resnet_cifar.resnet8,
    "resnet20": resnet_cifar.resnet20,
    "resnet32": resnet_cifar.resnet32,
    # DAFL/CMI CIFAR ResNets (64..512 widths).
    "resnet18": resnet_cifar.resnet18,
    "resnet34": resnet_cifar.resnet34,
    # Wide ResNets WRN-depth-k.
    "wrn16_1": resnet_cifar.wrn16_1,
    "wrn16_2": resnet_cifar.wrn16_2,
    "wrn40_1": resnet_cifar.wrn40_1,
    "wrn40_2": resnet_cifar.wrn40_2,
    # MobileNetV2, CIFAR variant.
    "mobilenetv2": mobilenetv2_lib.mobilenetv2,
    # Distribution Matching's ConvNet-3 (instance norm, average pooling).
    "convnet3": convnet.convnet3,
}


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
  """Builds the registered classifier `name`.

  Args:
    name: a key of `MODELS`, e.g. "resnet34" or "wrn40_2".
    num_classes: number of logits.
    **kwargs: further module attributes, e.g. `dtype=jnp.bfloat16`.

  Returns:
    The (unbound) Flax module.

  Raises:
    ValueError: if `name` is not registered; the message lists valid names.
  """
  if name not in MODELS:
    raise ValueError(
        f"Unknown model name {name!r}; valid names: "
        f"{', '.join(sorted(MODELS))}.")
  return MODELS[name](num_classes=num_classes, **kwargs)
