"""PyTorch twins of the library's classifiers, for checking imported teachers.

Each twin is a plain `torch.nn` module (NCHW, no torchvision) that computes exactly what the
Flax model of the same registry name computes (`dfkd_jax.models`), and whose `state_dict()`
keys follow one of the public PyTorch layouts that `dfkd_jax.io.torch_import` reads. The twins
define the conversion: a state_dict loaded into a twin and the same file converted by
`torch_import` give the same logits (tests/io/test_torch_import.py), so a conversion that passes
that check is the PyTorch model, not an approximation of it.

Layouts (the `layout` argument; `torch_import.LAYOUTS` lists which apply to which model):

* "dafl" for LeNet-5 / LeNet-5-half: `conv1`, `conv2`, `conv3`, `fc1` (hidden), `fc2` (logits),
  as in DAFL's MNIST teachers; the BN variants add `bn1`..`bn3` after the convs and `bn4` after
  `fc1`. The BN variants' convs and `fc1` have no bias unless `lenet_bias=True` (a LeNet with BN
  added to DAFL's layers keeps PyTorch's default biases; the importer folds them into the BN
  running means, which is exact).
* "cmi" for LeNet-5 / LeNet-5-half (CMI / Fast-Datafree copies): `features.0/3/6` (convs),
  `fc.0` (hidden), `fc.2` (logits).
* "dafl" for the CIFAR ResNets (DAFL, CMI, Fast, DeepInversion ResNet-18/34): `conv1`, `bn1`,
  `layerS.B.{conv1,bn1,conv2,bn2}`, the projection `layerS.B.shortcut.0` (1x1 conv) and `.1`
  (BN), `linear`.
* "resnet_tiny" for the CIFAR ResNets (CMI / Fast `resnet_tiny`, from RepDistiller): the same
  blocks with the projection under `downsample.0/.1` and the logits layer `fc`.
* "wrn" for the Wide ResNets (ZSKT, CMI, Fast): `conv1`, `blockG.layer.B.{bn1, conv1, bn2,
  conv2, convShortcut}`, the final `bn1`, `fc`.
* "torchvision" for MobileNetV2: torchvision's key layout (`features.0.0/.1` stem,
  `features.K.conv...` inverted residuals, `features.18.0/.1` head, `classifier.1`), with the
  CIFAR strides of `dfkd_jax.models.mobilenetv2` (stride-1 stem and second stage).

Where our architecture differs from a published one the twin is OUR architecture (with the
published key names), and `torch_import`'s docstring says what differs. Torch is imported at
the top: `torch_import` imports this module only when torch is installed.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
import torch.nn.functional as F

LENET_WIDTHS = {"lenet5": (6, 16, 120, 84), "lenet5_half": (3, 8, 60, 42),
                "lenet5_bn": (6, 16, 120, 84), "lenet5_half_bn": (3, 8, 60, 42)}
RESNET_SHAPES = {"resnet8": ((1, 1, 1), (16, 32, 64)), "resnet20": ((3, 3, 3), (16, 32, 64)),
                 "resnet32": ((5, 5, 5), (16, 32, 64)),
                 "resnet18": ((2, 2, 2, 2), (64, 128, 256, 512)),
                 "resnet34": ((3, 4, 6, 3), (64, 128, 256, 512))}
WRN_SHAPES = {"wrn16_1": (16, 1), "wrn16_2": (16, 2), "wrn40_1": (40, 1), "wrn40_2": (40, 2)}
# dfkd_jax.models.mobilenetv2.CIFAR_CONFIG: (expansion t, channels c, repeats n, stride s).
MOBILENETV2_CONFIG = ((1, 16, 1, 1), (6, 24, 2, 1), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
                      (6, 160, 3, 2), (6, 320, 1, 1))


class LeNet5(nn.Module):
  """LeNet-5 (`dfkd_jax.models.lenet`): three VALID 5x5 convs with ReLU (max-pool 2 after the
  first two), a hidden linear layer with ReLU, a logits layer; BatchNorm before every ReLU when
  `use_bn`. The conv3 map (1x1 at 32x32) is averaged over space, as the Flax model does, which
  is DAFL's flatten at 32x32."""

  def __init__(self, widths: Sequence[int], num_classes: int, in_channels: int, use_bn: bool,
               layout: str = "dafl", lenet_bias: bool = False):
    super().__init__()
    c1, c2, c3, hidden = widths
    self.use_bn, self.layout = use_bn, layout
    bias = lenet_bias or not use_bn
    if layout == "dafl":
      self.conv1 = nn.Conv2d(in_channels, c1, 5, bias=bias)
      self.bn1 = nn.BatchNorm2d(c1) if use_bn else None
      self.conv2 = nn.Conv2d(c1, c2, 5, bias=bias)
      self.bn2 = nn.BatchNorm2d(c2) if use_bn else None
      self.conv3 = nn.Conv2d(c2, c3, 5, bias=bias)
      self.bn3 = nn.BatchNorm2d(c3) if use_bn else None
      self.fc1 = nn.Linear(c3, hidden, bias=bias)
      self.bn4 = nn.BatchNorm1d(hidden) if use_bn else None
      self.fc2 = nn.Linear(hidden, num_classes)
    elif layout == "cmi" and not use_bn:
      self.features = nn.Sequential(
          nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
          nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
          nn.Conv2d(c2, c3, 5), nn.ReLU())
      self.fc = nn.Sequential(nn.Linear(c3, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))
    else:
      raise ValueError(f"No LeNet-5 twin with layout {layout!r} (use_bn={use_bn}).")

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    if self.layout == "cmi":
      return self.fc(self.features(x).mean((2, 3)))

    def norm(bn, y):
      return bn(y) if bn is not None else y

    x = F.max_pool2d(F.relu(norm(self.bn1, self.conv1(x))), 2)
    x = F.max_pool2d(F.relu(norm(self.bn2, self.conv2(x))), 2)
    x = F.relu(norm(self.bn3, self.conv3(x))).mean((2, 3))
    return self.fc2(F.relu(norm(self.bn4, self.fc1(x))))


class ResNetBlock(nn.Module):
  """`resnet_cifar.BasicBlock`: post-activation, two bias-free 3x3 convs (the first carries the
  stride), and a 1x1 conv + BN projection (registered as `projection_name`) when the stride or
  the width changes; identity otherwise."""

  def __init__(self, cin: int, cout: int, stride: int, projection_name: str):
    super().__init__()
    self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.projection_name = projection_name
    if stride != 1 or cin != cout:
      self.add_module(projection_name, nn.Sequential(
          nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout)))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
    projection = getattr(self, self.projection_name, None)
    return F.relu(y + (projection(x) if projection is not None else x))


class ResNet(nn.Module):
  """`resnet_cifar.ResNet`: 3x3 stem conv + BN + ReLU (no max-pool), stages `layer1..` of
  `ResNetBlock`s (stride 2 in the first block of every stage but the first), global average
  pool, logits layer (`linear` in the "dafl" layout, `fc` in "resnet_tiny")."""

  def __init__(self, stage_sizes: Sequence[int], widths: Sequence[int], num_classes: int,
               in_channels: int, layout: str = "dafl"):
    super().__init__()
    if layout not in ("dafl", "resnet_tiny"):
      raise ValueError(f"No ResNet twin with layout {layout!r}.")
    projection_name, self.head_name = (("shortcut", "linear") if layout == "dafl"
                                       else ("downsample", "fc"))
    self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
    self.bn1 = nn.BatchNorm2d(widths[0])
    cin, self.stages = widths[0], []
    for i, (blocks, width) in enumerate(zip(stage_sizes, widths)):
      stage = nn.Sequential(*[
          ResNetBlock(cin if j == 0 else width, width, 2 if i > 0 and j == 0 else 1,
                      projection_name) for j in range(blocks)])
      self.add_module(f"layer{i + 1}", stage)
      self.stages.append(stage)
      cin = width
    self.add_module(self.head_name, nn.Linear(cin, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = F.relu(self.bn1(self.conv1(x)))
    for stage in self.stages:
      x = stage(x)
    return getattr(self, self.head_name)(x.mean((2, 3)))


class WideBlock(nn.Module):
  """`resnet_cifar.WideBasicBlock`: pre-activation BN-ReLU-conv twice; when the width changes
  the shortcut is a bias-free 1x1 conv (`convShortcut`) of the pre-activated input, otherwise
  the raw input. Attributes are registered in the published order (bn1, conv1, bn2, conv2,
  convShortcut) so that `state_dict()` lists them in that order."""

  def __init__(self, cin: int, cout: int, stride: int):
    super().__init__()
    self.bn1 = nn.BatchNorm2d(cin)
    self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, bias=False)
    self.convShortcut = (  # pylint: disable=invalid-name
        nn.Conv2d(cin, cout, 1, stride=stride, bias=False) if cin != cout else None)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    act = F.relu(self.bn1(x))
    y = self.conv2(F.relu(self.bn2(self.conv1(act))))
    return y + (self.convShortcut(act) if self.convShortcut is not None else x)


class WideGroup(nn.Module):
  """One WRN group, its blocks under `layer` (the published `NetworkBlock`)."""

  def __init__(self, blocks: int, cin: int, cout: int, stride: int):
    super().__init__()
    self.layer = nn.Sequential(*[WideBlock(cin if j == 0 else cout, cout,
                                           stride if j == 0 else 1) for j in range(blocks)])

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.layer(x)


class WideResNet(nn.Module):
  """`resnet_cifar.WideResNet` (WRN-depth-k): bias-free 3x3 stem conv (16 channels), groups
  `block1..3` of 16k / 32k / 64k channels, final BN-ReLU (`bn1`), global average pool, `fc`."""

  def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int):
    super().__init__()
    n = (depth - 4) // 6
    widths = (16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor)
    self.conv1 = nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False)
    self.block1 = WideGroup(n, widths[0], widths[1], 1)
    self.block2 = WideGroup(n, widths[1], widths[2], 2)
    self.block3 = WideGroup(n, widths[2], widths[3], 2)
    self.bn1 = nn.BatchNorm2d(widths[3])
    self.fc = nn.Linear(widths[3], num_classes)

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    x = self.block3(self.block2(self.block1(self.conv1(x))))
    return self.fc(F.relu(self.bn1(x)).mean((2, 3)))


def _conv_bn_relu6(cin: int, cout: int, kernel: int, stride: int = 1,
                   groups: int = 1) -> nn.Sequential:
  """Bias-free conv, BN, ReLU6 as one Sequential (keys `.0` conv, `.1` BN)."""
  return nn.Sequential(nn.Conv2d(cin, cout, kernel, stride, (kernel - 1) // 2, groups=groups,
                                 bias=False), nn.BatchNorm2d(cout), nn.ReLU6())


class InvertedResidual(nn.Module):
  """`mobilenetv2.InvertedResidual`: optional 1x1 expansion (t != 1) with ReLU6, depthwise 3x3
  with ReLU6, linear 1x1 projection + BN, all under `conv`; identity residual when the stride
  is 1 and the width unchanged."""

  def __init__(self, cin: int, cout: int, stride: int, expansion: int):
    super().__init__()
    hidden = int(round(cin * expansion))
    layers = [_conv_bn_relu6(cin, hidden, 1)] if expansion != 1 else []
    layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
               nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout)]
    self.conv = nn.Sequential(*layers)
    self.residual = stride == 1 and cin == cout

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    y = self.conv(x)
    return x + y if self.residual else y


class MobileNetV2(nn.Module):
  """`mobilenetv2.MobileNetV2` (width 1.0, CIFAR strides) in torchvision's key layout: stem,
  17 inverted residuals and the 1x1 head conv under `features`, then `classifier` =
  (Dropout, Linear); dropout is inactive in eval mode, and the Flax model has none."""

  def __init__(self, num_classes: int, in_channels: int,
               config: Sequence[tuple[int, int, int, int]] = MOBILENETV2_CONFIG):
    super().__init__()
    layers, cin = [_conv_bn_relu6(in_channels, 32, 3)], 32
    for t, c, n, s in config:
      for j in range(n):
        layers.append(InvertedResidual(cin, c, s if j == 0 else 1, t))
        cin = c
    layers.append(_conv_bn_relu6(cin, 1280, 1))
    self.features = nn.Sequential(*layers)
    self.classifier = nn.Sequential(nn.Dropout(0.2), nn.Linear(1280, num_classes))

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return self.classifier(self.features(x).mean((2, 3)))


def build_twin(model_name: str, num_classes: int, in_channels: int, layout: str,
               lenet_bias: bool = False) -> nn.Module:
  """The PyTorch twin of the registered classifier `model_name`, in `layout`'s key names.

  Args:
    model_name: a name of `dfkd_jax.models.MODELS` that `torch_import` supports.
    num_classes: number of logits.
    in_channels: input channels.
    layout: a layout of `torch_import.LAYOUTS[model_name]`.
    lenet_bias: LeNet-5-BN variants only: give the convs and the hidden layer biases.

  Returns:
    The module (in training mode, as `torch.nn` builds it; call `.eval()` before comparing).

  Raises:
    ValueError: for an unsupported name or layout.
  """
  if model_name in LENET_WIDTHS:
    return LeNet5(LENET_WIDTHS[model_name], num_classes, in_channels,
                  use_bn=model_name.endswith("_bn"), layout=layout, lenet_bias=lenet_bias)
  if model_name in RESNET_SHAPES:
    return ResNet(*RESNET_SHAPES[model_name], num_classes, in_channels, layout=layout)
  if model_name in WRN_SHAPES and layout == "wrn":
    return WideResNet(*WRN_SHAPES[model_name], num_classes, in_channels)
  if model_name == "mobilenetv2" and layout == "torchvision":
    return MobileNetV2(num_classes, in_channels)
  raise ValueError(f"No PyTorch twin of {model_name!r} in layout {layout!r}.")
