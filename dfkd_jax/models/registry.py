"""Model registry: classifier name -> constructor.

`get_model(name, num_classes, **kwargs)` builds a classifier that follows the
dfkd_jax model contract, `apply(variables, x, train=...) -> (logits, aux)` with
`aux = {"feature": [B, F], "stages": tuple}`; see the family modules for the
architectures and their exact parameter counts.
"""

import importlib
import inspect
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
  """Builds the classifier `name`: a registered one, or the user's by import path.

  Args:
    name: a key of `MODELS`, e.g. "resnet34" or "wrn40_2"; or `"package.module:Attr"`, where
      `Attr` is a Flax Linen module class or a function returning a module instance, called
      as `Attr(num_classes=num_classes, **kwargs)` (see `ImportedModel`).
    num_classes: number of logits.
    **kwargs: further module attributes, e.g. `dtype=jnp.bfloat16`.

  Returns:
    The (unbound) Flax module.

  Raises:
    ValueError: if `name` is not registered and not an importable path; the message lists
      valid names or says what failed to import.
  """
  if ":" in name:
    return ImportedModel(name, num_classes, tuple(sorted(kwargs.items())))
  if name not in MODELS:
    raise ValueError(
        f"Unknown model name {name!r} (give a registered name, or your own module as "
        f"'package.module:ClassName'); valid names: {', '.join(sorted(MODELS))}.")
  return MODELS[name](num_classes=num_classes, **kwargs)


def import_model(path: str) -> Callable[..., nn.Module]:
  """The module class (or factory) at `path` = "package.module:Attr"; ValueError otherwise."""
  module_name, _, attr = path.partition(":")
  if not module_name or not attr:
    raise ValueError(f"Model path {path!r} must have the form 'package.module:ClassName'.")
  try:
    module = importlib.import_module(module_name)
  except ImportError as e:
    raise ValueError(
        f"Model {path!r}: cannot import {module_name!r} ({e}). Make it importable: install its "
        "package, or add its folder to PYTHONPATH (the current directory is on the path for "
        "`python -m`).") from e
  target = module
  for part in attr.split("."):
    if not hasattr(target, part):
      raise ValueError(f"Model {path!r}: {module_name!r} has no attribute {attr!r}.")
    target = getattr(target, part)
  if not callable(target):
    raise ValueError(f"Model {path!r} is a {type(target).__name__}, not a module class or "
                     "a function returning one.")
  return target


class ImportedModel(nn.Module):
  """A user's classifier, named by import path, under the library's model contract.

  The user's module (built as `Attr(num_classes=..., **kwargs)`) is called as
  `module(x, train=train)` (or `module(x)` when its `__call__` takes no `train`) and may
  return either `(logits, aux)` with `aux = {"feature": [B, F], "stages": tuple of [B, H, W,
  C]}` (the contract of the built-in models) or plain logits `[B, num_classes]`. For plain
  logits the aux entries are the logits themselves (our choice, so that every method runs):
  the terms that read features (DAFL's activation loss, ZSKT's attention transfer, the
  condensed-guidance feature match) then act on the logits; return real features for the
  published behaviour. Training-mode BatchNorm must be `flax.linen.BatchNorm` (or a subclass)
  with its statistics in the "batch_stats" collection, which the BN-matching losses read.
  Parameters live under the submodule name "net".
  """
  import_path: str
  num_classes: int
  kwargs: tuple = ()

  @nn.compact
  def __call__(self, x, train: bool = False):
    factory = import_model(self.import_path)
    if isinstance(factory, type):
      net = factory(num_classes=self.num_classes, **dict(self.kwargs), name="net")
    else:  # a function returning a module instance: re-parented here under the name "net"
      net = factory(num_classes=self.num_classes, **dict(self.kwargs))
      if isinstance(net, nn.Module):
        net = net.clone(parent=self, name="net")
    if not isinstance(net, nn.Module):
      raise ValueError(f"Model {self.import_path!r} returned a {type(net).__name__}, not a Flax "
                       "Linen module.")
    takes_train = "train" in inspect.signature(type(net).__call__).parameters
    out = net(x, train=train) if takes_train else net(x)
    if isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], dict):
      return out
    logits = out
    if getattr(logits, "ndim", 0) != 2 or logits.shape[-1] != self.num_classes:
      raise ValueError(f"Model {self.import_path!r} must return logits [batch, {self.num_classes}] "
                       f"or (logits, aux); it returned {getattr(logits, 'shape', type(out))}.")
    return logits, {"feature": logits, "stages": (logits[:, None, None, :],)}

