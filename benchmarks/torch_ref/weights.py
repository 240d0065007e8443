"""Copies JAX weights (numpy trees) into the PyTorch twins of `torch_ref.models`: conv kernels
HWIO -> OIHW, Dense kernels [in, out] -> [out, in], BN scale/bias/running statistics,
spectral-norm vectors, and the VAE encoder's flatten order (NHWC -> NCHW)."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn as tnn

from .models import SNConv2d, TorchGenerator, TorchLeNet5, TorchResNetCifar, TorchVAE


def _t(a) -> torch.Tensor:
  return torch.from_numpy(np.array(a, dtype=np.float32))


@torch.no_grad()
def _load_conv(conv, p):
  conv.weight.copy_(_t(p["kernel"]).permute(3, 2, 0, 1))  # HWIO -> OIHW
  if conv.bias is not None:
    conv.bias.copy_(_t(p["bias"]))


@torch.no_grad()
def _load_dense(linear, p, kernel=None):
  linear.weight.copy_(_t(p["kernel"] if kernel is None else kernel).t())  # [in, out] -> [out, in]
  if linear.bias is not None:
    linear.bias.copy_(_t(p["bias"]))


@torch.no_grad()
def _load_bn(bn, p, s):
  if bn.affine:
    bn.weight.copy_(_t(p["scale"]))
    bn.bias.copy_(_t(p["bias"]))
  bn.running_mean.copy_(_t(s["mean"]))
  bn.running_var.copy_(_t(s["var"]))


def load_lenet(net: TorchLeNet5, params, batch_stats):
  for i in (1, 2, 3):
    _load_conv(getattr(net, f"conv{i}"), params[f"conv{i}"])
  _load_dense(net.hidden, params["hidden"])
  _load_dense(net.fc, params["fc"])
  for i in (1, 2, 3, 4):
    _load_bn(getattr(net, f"bn{i}"), params[f"bn{i}"], batch_stats[f"bn{i}"])


def load_resnet(net: TorchResNetCifar, params, batch_stats):
  _load_conv(net.stem_conv, params["stem_conv"])
  _load_bn(net.stem_bn, params["stem_bn"], batch_stats["stem_bn"])
  for name in net.block_names:
    block, p, s = getattr(net, name), params[name], batch_stats[name]
    for conv, bn in (("conv1", "bn1"), ("conv2", "bn2"), ("shortcut_conv", "shortcut_bn")):
      if getattr(block, conv) is not None:
        _load_conv(getattr(block, conv), p[conv])
        _load_bn(getattr(block, bn), p[bn], s[bn])
  if set(params) != {"stem_conv", "stem_bn", "fc", *net.block_names}:
    raise ValueError(f"Not a {len(net.block_names)}-block CIFAR ResNet: {sorted(params)}.")
  _load_dense(net.fc, params["fc"])


def load_model(net: tnn.Module, params, batch_stats):
  """Copies a JAX classifier's weights into its `torch_model` twin."""
  if isinstance(net, TorchLeNet5):
    load_lenet(net, params, batch_stats)
  else:
    load_resnet(net, params, batch_stats)


@torch.no_grad()
def load_generator(g: TorchGenerator, params, batch_stats):
  _load_dense(g.linear, params["linear"])  # Flax reshapes channel-major: no permutation
  for i in (1, 2, 3):
    conv = getattr(g, f"conv{i}")
    _load_conv(conv, params[f"block{i}"]["conv"])
    if isinstance(conv, SNConv2d):
      conv.u.copy_(_t(batch_stats[f"block{i}"]["sn"]["conv/kernel/u"]).reshape(-1))
  for name in ("bn0", "bn1", "bn2", "bn_out"):
    _load_bn(getattr(g, name), params.get(name, {}), batch_stats[name])


def load_vae(vae: TorchVAE, params, batch_stats):
  load_generator(vae.decoder, params["decoder"], batch_stats["decoder"])
  enc, p, s = vae.encoder, params["encoder"], batch_stats["encoder"]
  for i in (1, 2, 3):
    _load_conv(getattr(enc, f"conv{i}"), p[f"conv{i}"])
    _load_bn(getattr(enc, f"bn{i}"), p[f"bn{i}"], s[f"bn{i}"])
  for name in ("mu", "logvar"):
    # Flax flattens NHWC (h, w, c); PyTorch flattens NCHW (c, h, w): permute the kernel rows.
    k = np.asarray(p[name]["kernel"])
    c = enc.conv3.out_channels
    side = int(round((k.shape[0] // c) ** 0.5))
    k = k.reshape(side, side, c, -1).transpose(2, 0, 1, 3).reshape(k.shape[0], -1)
    _load_dense(getattr(enc, name), p[name], kernel=k)
