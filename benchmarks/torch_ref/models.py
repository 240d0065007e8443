"""PyTorch twins (NCHW) of the JAX models that the comparison uses: the classifiers of the two
teacher -> student pairs (LeNet-5-BN, CIFAR ResNets; `torch_model`), the DAFL / DFAD / PRE-DFKD
generator (with spectral norm, `SNConv2d`) and PRE-DFKD's VAE."""
from __future__ import annotations

import functools

import torch
from torch import nn as tnn
import torch.nn.functional as F

IMAGE_SHAPE = (32, 32, 1)  # Fashion-MNIST at 32x32 (NHWC on the JAX side)
NUM_CLASSES = 10
LENET_WIDTHS = {"lenet5_bn": (6, 16, 120, 84), "lenet5_half_bn": (3, 8, 60, 42)}
# dfkd_jax.models.resnet_cifar: (blocks per stage, widths).
RESNET_SHAPES = {"resnet8": ((1, 1, 1), (16, 32, 64)), "resnet20": ((3, 3, 3), (16, 32, 64)),
                 "resnet32": ((5, 5, 5), (16, 32, 64))}


class TorchLeNet5(tnn.Module):
  """LeNet-5 with BatchNorm (dfkd_jax.models.lenet, NCHW): returns (logits, hidden feature)."""

  def __init__(self, widths, num_classes=NUM_CLASSES, channels=1):
    super().__init__()
    c1, c2, c3, hidden = widths
    self.conv1, self.bn1 = tnn.Conv2d(channels, c1, 5, bias=False), tnn.BatchNorm2d(c1)
    self.conv2, self.bn2 = tnn.Conv2d(c1, c2, 5, bias=False), tnn.BatchNorm2d(c2)
    self.conv3, self.bn3 = tnn.Conv2d(c2, c3, 5, bias=False), tnn.BatchNorm2d(c3)
    self.hidden, self.bn4 = tnn.Linear(c3, hidden, bias=False), tnn.BatchNorm1d(hidden)
    self.fc = tnn.Linear(hidden, num_classes)

  def forward(self, x):
    x = F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 2)
    x = F.max_pool2d(F.relu(self.bn2(self.conv2(x))), 2)
    x = F.relu(self.bn3(self.conv3(x)))
    feature = F.relu(self.bn4(self.hidden(x.flatten(1))))  # 1x1 map at 32x32
    return self.fc(feature), feature


class TorchBasicBlock(tnn.Module):
  """`resnet_cifar.BasicBlock` (NCHW): post-activation, bias-free 3x3 convs with padding 1 (the
  first with the block's stride), BN eps 1e-5 and running-average momentum 0.1 (Flax 0.9), and
  a 1x1 conv + BN projection shortcut ("option B", not He et al.'s zero-padding "option A")
  whenever the stride or the width changes. BN call order: bn1, bn2, shortcut_bn."""

  def __init__(self, cin, cout, stride):
    super().__init__()
    bn = functools.partial(tnn.BatchNorm2d, eps=1e-5, momentum=0.1)
    self.conv1 = tnn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
    self.bn1 = bn(cout)
    self.conv2 = tnn.Conv2d(cout, cout, 3, padding=1, bias=False)
    self.bn2 = bn(cout)
    self.shortcut_conv = self.shortcut_bn = None
    if stride != 1 or cin != cout:
      self.shortcut_conv = tnn.Conv2d(cin, cout, 1, stride=stride, bias=False)
      self.shortcut_bn = bn(cout)

  def forward(self, x):
    y = F.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x))
    return F.relu(y + x)


class TorchResNetCifar(tnn.Module):
  """`resnet_cifar.ResNet` (NCHW): 3x3 stem conv + BN + ReLU, no max-pool, stages of
  `TorchBasicBlock`s (the first stage stride 1, later ones stride 2 in their first block),
  global average pool, linear. Returns (logits, pooled feature): `aux["feature"]` of the JAX
  model, which DAFL's activation term reads."""

  def __init__(self, stage_sizes, widths, num_classes=NUM_CLASSES, channels=1):
    super().__init__()
    self.stem_conv = tnn.Conv2d(channels, widths[0], 3, padding=1, bias=False)
    self.stem_bn = tnn.BatchNorm2d(widths[0], eps=1e-5, momentum=0.1)
    self.block_names, cin = [], widths[0]
    for i, (n_blocks, width) in enumerate(zip(stage_sizes, widths)):
      for j in range(n_blocks):
        name = f"layer{i + 1}_{j}"  # the Flax module names
        self.add_module(name, TorchBasicBlock(cin, width, 2 if i > 0 and j == 0 else 1))
        self.block_names.append(name)
        cin = width
    self.fc = tnn.Linear(cin, num_classes)

  def forward(self, x):
    x = F.relu(self.stem_bn(self.stem_conv(x)))
    for name in self.block_names:
      x = getattr(self, name)(x)
    feature = x.mean((2, 3))
    return self.fc(feature), feature


def torch_model(name: str) -> tnn.Module:
  """The PyTorch twin of the registered classifier `name` (LeNet-5-BN pair or CIFAR ResNets)."""
  if name in LENET_WIDTHS:
    return TorchLeNet5(LENET_WIDTHS[name])
  if name in RESNET_SHAPES:
    return TorchResNetCifar(*RESNET_SHAPES[name])
  raise ValueError(f"compare_torch has no PyTorch model {name!r}; valid: "
                   f"{', '.join([*LENET_WIDTHS, *RESNET_SHAPES])}.")


class SNConv2d(tnn.Conv2d):
  """3x3 conv with spectral normalisation, one power iteration per call (the arithmetic of
  `torch.nn.utils.spectral_norm` and of `flax.linen.SpectralNorm(n_steps=1)`). The vector `u`
  is stored only when `update_u` is set and the module trains (the library stores it in
  generator steps only)."""

  def __init__(self, cin, cout):
    super().__init__(cin, cout, 3, padding=1)
    self.register_buffer("u", F.normalize(torch.randn(cout), dim=0))
    self.update_u = True

  def forward(self, x):
    w = self.weight.reshape(self.out_channels, -1)
    with torch.no_grad():
      v = F.normalize(w.t() @ self.u, dim=0, eps=1e-12)
      u = F.normalize(w @ v, dim=0, eps=1e-12)
      if self.training and self.update_u:
        self.u.copy_(u)
    sigma = torch.dot(u, w @ v)
    return F.conv2d(x, self.weight / sigma, self.bias, padding=1)


class TorchGenerator(tnn.Module):
  """DAFL / DFAD / PRE-DFKD generator (dfkd_jax.models.generators.Generator)."""

  def __init__(self, img_size, channels, ngf, latent_dim, bn_eps, spectral_norm):
    super().__init__()
    self.init_size = img_size // 4
    conv = SNConv2d if spectral_norm else (lambda i, o: tnn.Conv2d(i, o, 3, padding=1))
    self.linear = tnn.Linear(latent_dim, 2 * ngf * self.init_size ** 2)
    self.bn0 = tnn.BatchNorm2d(2 * ngf)
    self.conv1, self.bn1 = conv(2 * ngf, 2 * ngf), tnn.BatchNorm2d(2 * ngf, eps=bn_eps)
    self.conv2, self.bn2 = conv(2 * ngf, ngf), tnn.BatchNorm2d(ngf, eps=bn_eps)
    self.conv3 = conv(ngf, channels)
    self.bn_out = tnn.BatchNorm2d(channels, affine=False)

  def forward(self, z):
    x = self.linear(z).view(z.shape[0], -1, self.init_size, self.init_size)
    x = F.interpolate(self.bn0(x), scale_factor=2)
    x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
    x = F.interpolate(x, scale_factor=2)
    x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
    return self.bn_out(torch.tanh(self.conv3(x)))

  def sn_convs(self):
    return [m for m in (self.conv1, self.conv2, self.conv3) if isinstance(m, SNConv2d)]


class TorchEncoder(tnn.Module):
  """PRE-DFKD encoder E_m (dfkd_jax.models.vae.Encoder): returns (mu, logvar)."""

  def __init__(self, img_size, channels, latent_dim, bn_eps, normalize):
    super().__init__()
    self.normalize = normalize
    self.conv1, self.bn1 = tnn.Conv2d(channels, 64, 3, padding=1), tnn.BatchNorm2d(64, eps=bn_eps)
    self.conv2, self.bn2 = tnn.Conv2d(64, 128, 3, padding=1), tnn.BatchNorm2d(128, eps=bn_eps)
    self.conv3, self.bn3 = tnn.Conv2d(128, 128, 3, stride=2, padding=1), tnn.BatchNorm2d(128)
    flat = 128 * (img_size // 8) ** 2
    self.mu, self.logvar = tnn.Linear(flat, latent_dim), tnn.Linear(flat, latent_dim)

  def forward(self, x):
    if self.normalize == "height":
      x = F.normalize(x, p=2, dim=2)
    x = F.leaky_relu(self.bn1(self.conv1(x)), 0.2)
    x = F.leaky_relu(self.bn2(self.conv2(x)), 0.2)
    x = F.interpolate(x, scale_factor=0.5)
    x = F.interpolate(self.bn3(self.conv3(x)), scale_factor=0.5)
    h = x.flatten(1)
    return self.mu(h), self.logvar(h)


class TorchVAE(tnn.Module):
  """PRE-DFKD memory generator: encoder + decoder (generator without spectral norm)."""

  def __init__(self, img_size, channels, latent_dim, ngf, bn_eps, normalize):
    super().__init__()
    self.encoder = TorchEncoder(img_size, channels, latent_dim, bn_eps, normalize)
    self.decoder = TorchGenerator(img_size, channels, ngf, latent_dim, bn_eps, False)

  def forward(self, x, eps):
    mu, logvar = self.encoder(x)
    return self.decoder(mu + eps * torch.exp(0.5 * logvar)), mu, logvar
