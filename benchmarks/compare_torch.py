r"""JAX vs PyTorch: one outer iteration of each data-free method, timed side by side.

  python benchmarks/compare_torch.py [--pair lenet|resnet]
      [--methods dafl,dfad,deepinversion,mb_dfkd,pre_dfkd] [--batch 128] [--repeats 5]
      [--warmup 2] [--threads 2] [--di_iters 20] [--di_student_steps 10] [--out_md FILE]
  python benchmarks/compare_torch.py --check [--pair lenet|resnet] [--methods ...]
  python benchmarks/compare_torch.py --methods deepinversion --conv_grads xla
  python benchmarks/compare_torch.py --conv_loop_demo
  python benchmarks/compare_torch.py --profile deepinversion [--pair resnet] [--conv_grads xla]

Needs PyTorch (CPU): `pip install -e '.[bench]'` (or `pip install 'torch<=2.13.0' --index-url
https://download.pytorch.org/whl/cpu`). PyTorch is never imported by the package itself.

What is compared. Fashion-MNIST budgets (32x32x1 images, generator ngf 32, batch 128) of one
teacher -> student pair (`--pair`, a randomly initialised teacher):
- `lenet` (default): `configs/fashion_mnist_lenet5.py`, LeNet-5-BN -> LeNet-5-half-BN, latent 100.
- `resnet`: `configs/fashion_mnist_resnet20.py`, ResNet-20 -> ResNet-8 (`resnet_cifar`: 3x3
  stem, post-activation basic blocks, 1x1 conv + BN projection shortcuts where the shape
  changes, not He et al.'s zero-padding ones; pooled feature; PyTorch twin `TorchResNetCifar`),
  with the config's own method budgets (latents 100 / 256 (dfad) / 1000 (mb_dfkd, pre_dfkd);
  mb_dfkd and pre_dfkd 10 student steps, pre_dfkd 4 VAE steps and a VAE latent of 1000).
- JAX: the library's real jitted outer step (`distill.build` + `wrap_step` + `make_step`, state
  donated), with the config's own inner-loop settings (lenet: unrolled student repeats except
  DeepInversion's, which are a `lax.scan`; resnet: every student repeat unrolled; the inversion
  loop is always a `lax.scan`).
- PyTorch: a plain eager reimplementation (below) of the same per-iteration work, written the way
  the official code does it (`nn.Module`s, one `backward()` per update, `torch.optim`), with the
  same models, batch, number of generator / student / VAE / pixel steps, losses, optimisers and
  hyper-parameters, read from the same config. Where the official scripts do work that the
  algorithm does not need, this version does what the JAX step does instead (so both sides do
  the same arithmetic): the teacher's parameters need no gradient, synthetic images for student
  steps are drawn under `torch.no_grad()`, generator steps compute no student-parameter
  gradients, and the PRE-DFKD latent step differentiates the latents only (the library default
  `pre_dfkd.leak_z_grad_into_vae=False`). It mirrors the library's semantics where they differ
  from the official code (the generator's spectral-norm vector is stored only by generator
  steps; MB-DFKD concatenates a masked, zero-filled slot while the bank is empty; the adversarial
  JS term is not detached from the teacher unless `loss.adv_detach_teacher`); none of these
  changes the cost of a steady-state iteration.
- One outer iteration: dafl 1 fused G+S step; dfad 5 S + 1 G; deepinversion 1 synthesis round of
  `--di_iters` Adam pixel steps + `--di_student_steps` KD steps (the configs' 200 + 100 (lenet)
  or 2000 + 400 (resnet) would take minutes per PyTorch round on this CPU); mb_dfkd 1 G + 5 S
  (resnet: 10 S) (+ bank push); pre_dfkd 1 G + 5 (resnet: 10) KD steps with memory inference,
  the first 2 (resnet: 4) with a VAE step.

Protocol: both frameworks in one process, PyTorch with `torch.set_num_threads(--threads)` and
`OMP_WAIT_POLICY=PASSIVE` unless set (see below), XLA:CPU with its default thread pool; JAX's
first call (trace + compile + run) is timed apart, then `--warmup` untimed iterations of each,
then `--repeats` timed iterations alternating JAX and PyTorch (the order swaps every repeat), so
background load hits both alike. Reported: median wall time of each, ratio torch / jax (>= 1: JAX
is faster), JAX compile + first call, XLA's buffer assignment for the step (temp = working memory
beyond the state), and the peak RSS growth during one extra iteration of each framework (after
`malloc_trim(0)`, sampled from /proc/self/statm every 2 ms: a lower bound), plus the process's
RSS high-water mark (resource.getrusage, both frameworks together, compilation included).

`--check` (and tests/test_compare_torch.py): on the pair's tiny config, copies the JAX initial
weights into the PyTorch modules (NHWC -> NCHW, Dense kernels transposed, BN scale/bias/running
stats and eps, spectral-norm vectors), replays the JAX step's own random draws (latents, jitter,
pool and bank indices, VAE noise: same PRNG keys), runs two outer iterations in each framework
and compares every loss metric of the JAX step: the first iteration to `--rtol` (default 1e-4)
relative, the second, which also checks gradients and optimiser updates, to `--rtol_later`
(default 5e-3: Adam's first steps amplify float noise, see `check_method`).

`--conv_grads xla` gives the JAX side JAX's own convolution gradients instead of the library's
CPU-fast ones (`dfkd_jax.models.conv`); `DFKD_XLA_CPU_YNN=default` gives it XLA's default
compiler options instead of the library's (`dfkd_jax.compile`), `DFKD_BATCH_NORM=xla` Flax's
own BatchNorm instead of `dfkd_jax.models.norm`'s: together, the library as it was
before issue 6's changes (apart from LeNet's max-pool and the jitter roll, which are rewritten
in place). `--conv_loop_demo` times a ResNet-8 training step in a `lax.scan` both ways.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import datetime
import functools
import os
import platform
import resource
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

# PyTorch's OpenMP threads spin-wait between parallel regions by default; with a concurrent job
# on this 2-core machine that made its steps 3-11x slower and erratic (benchmarks/RESULTS.md).
# Wait passively unless the caller chose a policy (OMP_WAIT_POLICY=ACTIVE restores the default).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
  import torch  # noqa: E402
  from torch import nn as tnn  # noqa: E402
  import torch.nn.functional as F  # noqa: E402
except ImportError as e:  # pragma: no cover
  raise SystemExit("compare_torch.py needs PyTorch: pip install -e '.[bench]'") from e

from dfkd_jax.cli import demo  # noqa: E402
from dfkd_jax.train import distill  # noqa: E402
from dfkd_jax import models  # noqa: E402
from dfkd_jax import numerics as numerics_lib  # noqa: E402
from dfkd_jax import optim  # noqa: E402
from dfkd_jax import parallel  # noqa: E402
from dfkd_jax import state as state_lib  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_lenet5.py")
# Teacher -> student pairs: (config file, teacher model, student model).
PAIRS = {
    "lenet": (CONFIG, "lenet5_bn", "lenet5_half_bn"),
    "resnet": (os.path.join(ROOT, "configs", "fashion_mnist_resnet20.py"), "resnet20", "resnet8"),
}
PAIR_NAMES = {"lenet": "LeNet-5-BN -> LeNet-5-half-BN", "resnet": "ResNet-20 -> ResNet-8"}
METHODS = ("dafl", "dfad", "deepinversion", "mb_dfkd", "pre_dfkd")
IMAGE_SHAPE = (32, 32, 1)
NUM_CLASSES = 10
LENET_WIDTHS = {"lenet5_bn": (6, 16, 120, 84), "lenet5_half_bn": (3, 8, 60, 42)}
# dfkd_jax.models.resnet_cifar: (blocks per stage, widths).
RESNET_SHAPES = {"resnet8": ((1, 1, 1), (16, 32, 64)), "resnet20": ((3, 3, 3), (16, 32, 64)),
                 "resnet32": ((5, 5, 5), (16, 32, 64))}


# ============================================================================ JAX side


def _pair(pair: str) -> tuple[str, str, str]:
  if pair not in PAIRS:
    raise ValueError(f"Unknown pair {pair!r}; valid: {', '.join(PAIRS)}.")
  return PAIRS[pair]


def jax_config(method: str, batch: int | None = None, tiny: bool = False, di_iters: int = 20,
               di_student_steps: int = 10, pair: str = "lenet"):
  """The Fashion-MNIST config of `method` for `pair` (CPU budgets), optionally tiny: the
  LeNet-5 config (lenet) or the ResNet-20 -> ResNet-8 config (resnet), with their own
  inner-loop settings (the resnet config unrolls every student repeat, DeepInversion's too)."""
  config = demo.load_config(_pair(pair)[0], f"method={method}" + (",tiny" if tiny else ""))
  if batch is not None:
    config.distill.batch_size = batch
    if method in ("mb_dfkd", "pre_dfkd"):
      config.mb_dfkd.slot_size = batch // 8
      config.pre_dfkd.memory_batch = batch // 8
      config.pre_dfkd.vae_input = batch // 2
  if method == "deepinversion" and not tiny:
    config.deepinversion.iterations = di_iters
    config.distill.student_steps = di_student_steps
  if method == "deepinversion":
    config.deepinversion.pool_size = max(config.deepinversion.pool_size,
                                         config.distill.batch_size)
  return config


def random_teacher(seed: int = 1, perturb_stats: bool = False, pair: str = "lenet"):
  """A randomly initialised teacher of `pair` (LeNet-5-BN or ResNet-20; speed does not depend
  on its weights); with `perturb_stats`, non-trivial BN running statistics (so the check sees
  them copied)."""
  module = models.get_model(_pair(pair)[1], num_classes=NUM_CLASSES)
  params, bs = state_lib.init_model(module, jax.random.key(seed), jnp.zeros((1, *IMAGE_SHAPE)))
  if perturb_stats:  # running means ~ N(0, 0.1^2), running variances ~ U(0.5, 1.5)
    flat, tree = jax.tree_util.tree_flatten_with_path(bs)
    keys = jax.random.split(jax.random.key(seed + 1), len(flat))
    bs = jax.tree.unflatten(tree, [
        jax.random.uniform(k, leaf.shape, minval=0.5, maxval=1.5) if "var" in str(path[-1])
        else 0.1 * jax.random.normal(k, leaf.shape) for k, (path, leaf) in zip(keys, flat)])
  return state_lib.FrozenModel(params=params, batch_stats=bs, apply_fn=module.apply)


def jax_setup(config, teacher=None, seed: int = 0, pair: str | None = None):
  """Builds the library's jitted outer step on one device: returns (step, state).

  `teacher` defaults to `random_teacher(pair=pair)`. `pair`, when given, must name the
  config's teacher and student; by default it is the pair whose models the config names.
  """
  import chex  # pylint: disable=g-import-not-at-top
  models_of_config = (config.teacher.model, config.student.model)
  if pair is not None and _pair(pair)[1:] != models_of_config:
    raise ValueError(f"pair {pair!r} is {_pair(pair)[1:]}, the config has {models_of_config}.")
  if teacher is None:
    pair = pair or next((k for k, v in PAIRS.items() if v[1:] == models_of_config), None)
    if pair is None:
      raise ValueError(f"No random teacher for the models {models_of_config}: pass `teacher`.")
    teacher = random_teacher(pair=pair)
  chex.clear_trace_counter()
  mesh = parallel.make_mesh(1)
  _, method, _ = distill.build(config, mesh=mesh, teacher=teacher, image_shape=IMAGE_SHAPE,
                               num_classes=NUM_CLASSES)
  method = distill.wrap_step(method)
  state = distill.place_state(method.init(jax.random.key(seed)), mesh)
  return distill.make_step(method), state


# ============================================================================ PyTorch models


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


# ============================================================================ weight transfer


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


# ============================================================================ randomness


class TorchRandom:
  """Fresh PyTorch draws (timing runs). `path` (the JAX key path) is ignored."""

  def normal(self, shape, path=(), image=False):
    del path
    if image:  # NHWC shape -> NCHW tensor
      b, h, w, c = shape
      return torch.randn(b, c, h, w)
    return torch.randn(*shape)

  def randint(self, low, high, shape, path=()):
    del path
    return torch.randint(low, high, shape)

  def randint_scalar(self, low, high, path=()):
    del path
    return int(torch.randint(low, high, ()))


class JaxKeys:
  """The JAX step's own draws, recomputed on the host from its PRNG keys (check mode).

  A path lists, from the iteration key `fold_in(state.rng, step)`, the `fold_in` indices (ints)
  and `("split", n, i)` steps that `dfkd_jax` applies (combinators.sequence / repeat, phases,
  replay); the PyTorch steps below name the path of each draw.
  """

  def __init__(self, rng, step: int):
    self.base = jax.random.fold_in(rng, step)

  def key(self, path):
    k = self.base
    for p in path:
      k = jax.random.split(k, p[1])[p[2]] if isinstance(p, tuple) else jax.random.fold_in(k, p)
    return k

  def normal(self, shape, path=(), image=False):
    x = _t(jax.random.normal(self.key(path), shape))
    return x.permute(0, 3, 1, 2).contiguous() if image else x

  def randint(self, low, high, shape, path=()):
    return torch.from_numpy(np.array(jax.random.randint(self.key(path), shape, low, high)))

  def randint_scalar(self, low, high, path=()):
    return int(jax.random.randint(self.key(path), (), low, high))


# ============================================================================ PyTorch losses


def t_l1(t, s):
  return (t - s).abs().mean()


def t_kd(kind, t, s, temperature=1.0):
  if kind == "l1":
    return t_l1(t, s)
  if kind in ("kl", "dafl_kd"):
    tau = temperature if kind == "kl" else 1.0
    loss = F.kl_div(F.log_softmax(s / tau, 1), F.softmax(t / tau, 1), reduction="batchmean")
    return loss * tau ** 2 if kind == "kl" else loss
  raise ValueError(f"compare_torch does not implement kd loss {kind!r}.")


def t_oh(t):
  return F.cross_entropy(t, t.argmax(1))


def t_ie(t):
  p = F.softmax(t, 1).mean(0)
  return (p * torch.log10(p)).sum()


def t_js(s, t, tau, reduction):
  ps, pt = F.softmax(s / tau, 1), F.softmax(t / tau, 1)
  m = torch.clamp(0.5 * (ps + pt), 0.01, 0.99)
  ps, pt = torch.clamp(ps, 0.01, 0.99), torch.clamp(pt, 0.01, 0.99)
  # nn.KLDivLoss()(log P, M) as the official code: M (log M - log P), reduced.
  reduce = (lambda a: a.sum() / a.shape[0]) if reduction == "batch" else torch.mean
  log_m = torch.log(m)
  js = 0.5 * reduce(m * (log_m - torch.log(ps))) + 0.5 * reduce(m * (log_m - torch.log(pt)))
  return 1.0 - torch.clamp(js, 0.0, 1.0)


def t_adv(kind, t, s, tau):
  if kind == "l1":
    return -t_l1(t, s)
  if kind == "js":
    return t_js(s, t, tau, "elementwise")
  if kind == "js_batch":
    return t_js(s, t, tau, "batch")
  raise ValueError(f"compare_torch does not implement adv_type {kind!r}.")


def t_tv_l2(x):  # NCHW
  return (torch.norm(x[:, :, :, :-1] - x[:, :, :, 1:])
          + torch.norm(x[:, :, :-1, :] - x[:, :, 1:, :])
          + torch.norm(x[:, :, 1:, :-1] - x[:, :, :-1, 1:])
          + torch.norm(x[:, :, :-1, :-1] - x[:, :, 1:, 1:]))


class BNCapture:
  """DeepInversion-style hooks: moments of every teacher BN layer's input, in call order."""

  def __init__(self, model):
    self.active, self.stats = False, []
    for m in model.modules():
      if isinstance(m, tnn.modules.batchnorm._BatchNorm):  # pylint: disable=protected-access
        m.register_forward_pre_hook(self._hook)

  def _hook(self, module, inputs):
    if self.active:
      x = inputs[0]
      nch = x.shape[1]
      mean = x.mean([0] + list(range(2, x.dim())))
      var = x.transpose(0, 1).reshape(nch, -1).var(1, unbiased=False)
      self.stats.append((module, mean, var))

  def bn_l2(self, first_scale=1.0):
    total = 0.0
    for i, (m, mean, var) in enumerate(self.stats):
      term = torch.norm(m.running_mean - mean, 2) + torch.norm(m.running_var - var, 2)
      total = total + (first_scale if i == 0 else 1.0) * term
    return total


class frozen_params:  # pylint: disable=invalid-name
  """Context: `module`'s parameters need no gradient (generator steps through the student)."""

  def __init__(self, module):
    self.params = list(module.parameters())

  def __enter__(self):
    for p in self.params:
      p.requires_grad_(False)

  def __exit__(self, *exc):
    for p in self.params:
      p.requires_grad_(True)


def _grad_norm(params):
  return torch.sqrt(sum((p.grad.detach() ** 2).sum() for p in params if p.grad is not None))


# ============================================================================ PyTorch methods


def _torch_optimizer(cfg, params):
  if cfg.get("grad_clip", 0.0) or cfg.get("nesterov", False):
    raise ValueError("compare_torch does not implement gradient clipping or Nesterov momentum.")
  if cfg.name == "sgd":
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.get("momentum", 0.9) or 0.0,
                           weight_decay=cfg.get("weight_decay", 0.0))
  return torch.optim.Adam(params, lr=cfg.lr, betas=(cfg.get("b1", 0.9), cfg.get("b2", 0.999)),
                          weight_decay=cfg.get("weight_decay", 0.0))


class TorchMethod:
  """One outer iteration of a method in eager PyTorch, mirroring the JAX step.

  Built from the same config and the JAX initial state (weights copied). `step(rng)` runs one
  outer iteration and returns its metrics under the JAX step's names. With `schedules=True`
  the learning rates follow the optax schedules of the JAX step (the check); otherwise they stay
  at their base values (timing: a schedule costs nothing).
  """

  def __init__(self, method, config, state, schedules=False):
    self.method, self.cfg, self.it = method, config, 0
    self.d, self.w = config.distill, config.loss
    self.teacher = torch_model(config.teacher.model)
    self.student = torch_model(config.student.model)
    load_model(self.teacher, state.teacher.params, state.teacher.batch_stats)
    load_model(self.student, state.student.params, state.student.batch_stats)
    self.teacher.eval().requires_grad_(False)
    self.student.train()
    self.capture = BNCapture(self.teacher)
    self.opt_s = _torch_optimizer(config.optimizer, self.student.parameters())
    n_it = self.d.num_iters
    self.schedules = {}
    if schedules:
      self.schedules["s"] = optim.make_schedule(config.optimizer, n_it * self.d.student_steps)
    self.counts = {"s": 0, "g": 0, "v": 0}
    self.g = None
    if state.generator is not None:
      gc = config.generator
      if gc.kind != "dafl" or not gc.final_tanh:
        raise ValueError("compare_torch implements the DAFL/PRE-DFKD generator only.")
      self.g = TorchGenerator(IMAGE_SHAPE[0], IMAGE_SHAPE[2], gc.ngf, self.d.latent_dim,
                              gc.bn_eps, gc.spectral_norm)
      load_generator(self.g, state.generator.params, state.generator.batch_stats)
      self.g.train()
      self.opt_g = _torch_optimizer(config.gen_optimizer, self.g.parameters())
      if schedules:
        self.schedules["g"] = optim.make_schedule(config.gen_optimizer, n_it)
    if method == "deepinversion":
      self.pool = torch.zeros(config.deepinversion.pool_size, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2])
      self.pool_cursor = self.pool_count = 0
    if method == "mb_dfkd":
      mb = config.mb_dfkd
      self.bank = torch.zeros(mb.slots, mb.slot_size, IMAGE_SHAPE[2], *IMAGE_SHAPE[:2])
      self.bank_cursor = self.bank_count = 0
    if method == "pre_dfkd":
      p = config.pre_dfkd
      self.vae = TorchVAE(IMAGE_SHAPE[0], IMAGE_SHAPE[2], p.vae_latent_dim, p.vae_ngf,
                          p.vae_bn_eps, p.encoder_normalize)
      load_vae(self.vae, state.vae.params, state.vae.batch_stats)
      self.opt_v = _torch_optimizer(p.vae_optimizer, self.vae.parameters())
      if schedules:
        self.schedules["v"] = optim.make_schedule(p.vae_optimizer, n_it)
    if self.cfg.get("guidance", "none") != "none":
      raise ValueError("compare_torch does not implement condensed-sample guidance.")

  # ---------------------------------------------------------------- shared pieces

  def _update(self, which, opt):
    if which in self.schedules:  # optax evaluates the schedule at the update count
      for group in opt.param_groups:
        group["lr"] = float(self.schedules[which](self.counts[which]))
    opt.step()
    self.counts[which] += 1

  def sample(self, rng, path, n=None):
    """sg(G(z)) in training mode (batch statistics); the spectral-norm vectors are not stored."""
    z = rng.normal((n or self.d.batch_size, self.d.latent_dim), path)
    sn = self.g.sn_convs()
    for m in sn:
      m.update_u = False
    with torch.no_grad():
      x = self.g(z)
    for m in sn:
      m.update_u = True
    return x

  def student_step(self, x, extras=(), kd="l1", temperature=1.0):
    """`phases.student_step`: one update on [x; extras] ((name, x_e, w_e) each, averaged with
    the main batch: with w_e = n_e / B this is the loss over the concatenation)."""
    xx = torch.cat([x] + [xe for _, xe, _ in extras]) if extras else x
    with torch.no_grad():
      t = self.teacher(xx)[0]
    s = self.student(xx)[0]
    n = x.shape[0]
    loss = main = t_kd(kd, t[:n], s[:n], temperature)
    metrics, norm, start = {"kd": main}, 1.0, n
    for name, xe, we in extras:
      m = xe.shape[0]
      part = t_kd(kd, t[start:start + m], s[start:start + m], temperature)
      metrics[f"{name}_loss"] = part
      loss, norm, start = loss + we * part, norm + we, start + m
    loss = loss / norm
    self.opt_s.zero_grad(set_to_none=True)
    loss.backward()
    self._update("s", self.opt_s)
    metrics["loss"] = loss
    metrics["agree"] = (s[:n].argmax(1) == t[:n].argmax(1)).float().mean() * 100.0
    return metrics

  def synthesis_terms(self, x, labels=None, student_train=True):
    """`phases.synthesis_terms`: (total, terms) on images x (gradient flows to x)."""
    w, terms = self.w, {}
    if w.bn:
      self.capture.stats, self.capture.active = [], True
    t, feat = self.teacher(x)
    self.capture.active = False
    if w.bn:
      if w.bn_form != "l2":
        raise ValueError("compare_torch implements bn_form='l2' only.")
      terms["bn"] = self.capture.bn_l2(w.first_bn_scale)
    if w.oh:
      terms["oh"] = t_oh(t)
    if w.ie:
      terms["ie"] = t_ie(t)
    if w.act:
      terms["act"] = -feat.abs().mean()
    if w.tv:
      terms["tv"] = t_tv_l2(x)
    if w.l2 or w.at_beta:
      raise ValueError("compare_torch does not implement the l2 prior or attention transfer.")
    if w.ce:
      terms["ce"] = F.cross_entropy(t, labels)
    if w.adv:
      self.student.train(student_train)
      with frozen_params(self.student):
        s = self.student(x)[0]
      self.student.train()
      terms["adv"] = t_adv(w.adv_type, t.detach() if w.adv_detach_teacher else t, s,
                           w.adv_temperature)
    total = sum(getattr(w, k) * v for k, v in terms.items())
    return total, terms, t

  def generator_step(self, rng, path):
    """`phases.generator_step` without a fused student: one Adam step of G on a fresh z."""
    z = rng.normal((self.d.batch_size, self.d.latent_dim), path)
    total, terms, _ = self.synthesis_terms(self.g(z))
    self.opt_g.zero_grad(set_to_none=True)
    total.backward()
    grad_norm = _grad_norm(self.g.parameters())
    self._update("g", self.opt_g)
    return {**terms, "loss": total, "grad_norm": grad_norm}

  # ---------------------------------------------------------------- methods

  def step(self, rng):
    metrics = getattr(self, f"_step_{self.method}")(rng)
    self.it += 1
    return {k: torch.as_tensor(v).detach() for k, v in metrics.items()}

  def _step_dafl(self, rng):
    """DAFL: one fused step; G on oh/ie/act of x = G(z), S on KL(T || S) of sg(x)."""
    if self.cfg.dafl.kd_grad_to_generator:
      raise ValueError("compare_torch implements dafl.kd_grad_to_generator=False only.")
    z = rng.normal((self.d.batch_size, self.d.latent_dim), (0,))
    x = self.g(z)
    gen, terms, t = self.synthesis_terms(x)
    s = self.student(x.detach())[0]
    s_loss = t_kd(self.w.kd, t.detach(), s, self.w.kd_temperature)
    self.opt_g.zero_grad(set_to_none=True)
    self.opt_s.zero_grad(set_to_none=True)
    (gen + s_loss).backward()
    grad_norm = _grad_norm(self.g.parameters())
    self._update("g", self.opt_g)
    self._update("s", self.opt_s)
    agree = (s.argmax(1) == t.argmax(1)).float().mean() * 100.0
    return _prefix("dafl", {**terms, "loss": gen, "student_loss": s_loss, "agree": agree,
                            "grad_norm": grad_norm})

  def _step_dfad(self, rng):
    """DFAD: `student_steps` L1 steps on fresh sg(G(z)), then one G step on -L1."""
    out = [self.student_step(self.sample(rng, (0, i)), kd=self.w.kd)
           for i in range(self.d.student_steps)]
    gen = self.generator_step(rng, (1,))
    return {**_prefix("student", _mean(out)), **_prefix("generator", gen)}

  def _step_deepinversion(self, rng):
    """One synthesis round (Adam on pixels, jittered views) + `student_steps` KD steps."""
    return {**self.di_synthesis(rng), **self.di_students(rng)}

  def di_synthesis(self, rng):
    """DeepInversion's synthesis round: `iterations` Adam steps on fresh pixels, then a push."""
    di, b = self.cfg.deepinversion, self.d.batch_size
    if di.flip:
      raise ValueError("compare_torch implements deepinversion.flip=False only.")
    labels = torch.arange(b) % NUM_CLASSES
    px = rng.normal((b, *IMAGE_SHAPE), (0, ("split", 2, 0)), image=True).requires_grad_(True)
    opt = torch.optim.Adam([px], lr=di.lr, betas=(di.b1, di.b2))
    first = last = None
    for i in range(di.iterations):
      view = px
      if di.jitter:
        base = (0, ("split", 2, 1), i)
        dy = rng.randint_scalar(-di.jitter, di.jitter + 1, base + (("split", 3, 0),))
        dx = rng.randint_scalar(-di.jitter, di.jitter + 1, base + (("split", 3, 1),))
        view = torch.roll(px, shifts=(dy, dx), dims=(2, 3))
      total, terms, _ = self.synthesis_terms(view, labels=labels, student_train=False)
      opt.zero_grad(set_to_none=True)
      total.backward()
      opt.step()
      last = {**terms, "loss": total}
      first = first or last
    idx = (self.pool_cursor + torch.arange(b)) % self.pool.shape[0]
    self.pool[idx] = px.detach()
    self.pool_cursor = (self.pool_cursor + b) % self.pool.shape[0]
    self.pool_count = min(self.pool_count + b, self.pool.shape[0])
    return _prefix("synth", {**last, "loss_first": first["loss"]})

  def di_students(self, rng):
    """DeepInversion's `student_steps` KD steps on batches drawn from the pool."""
    b, out = self.d.batch_size, []
    for i in range(self.d.student_steps):
      x = self.pool[rng.randint(0, max(self.pool_count, 1), (b,), (1, i))]
      out.append(self.student_step(x, kd=self.w.kd, temperature=self.w.kd_temperature))
    return _prefix("student", _mean(out))

  def _step_mb_dfkd(self, rng):
    """1 G step (+ BN matching), `student_steps` L1 steps on [novel; one bank slot], push."""
    mb, b = self.cfg.mb_dfkd, self.d.batch_size
    gen = self.generator_step(rng, (0,))
    out = []
    for i in range(self.d.student_steps):
      x = self.sample(rng, (1, i))
      slot = rng.randint_scalar(0, max(self.bank_count, 1), (1, i, 1000))
      w = (mb.slot_size / b) if self.bank_count else 0.0
      out.append(self.student_step(x, [("replay", self.bank[slot], w)], kd=self.w.kd))
    if self.it % mb.push_every == 0:
      self.bank[self.bank_cursor] = self.sample(rng, (2,), n=mb.slot_size)
      self.bank_cursor = (self.bank_cursor + 1) % mb.slots
      self.bank_count = min(self.bank_count + 1, mb.slots)
    return {**_prefix("generator", gen), **_prefix("student", _mean(out)),
            "bank/slots_filled": torch.tensor(float(self.bank_count))}

  # ---- PRE-DFKD

  def _infer_memory(self, rng, path, train):
    """Class-balanced memory inference: z ~ N(0, I), one fresh Adam step on L_z, x_m = G_m(z)."""
    p, dec = self.cfg.pre_dfkd, self.vae.decoder
    dec.train(train)
    z = rng.normal((p.memory_batch, p.vae_latent_dim), path).requires_grad_(True)
    t = self.teacher(dec(z))[0]
    lz = (5.0 * t_ie(t) + 1.0 * t_oh(t) + F.mse_loss(torch.var(z, dim=0), torch.ones(z.shape[1]))
          + F.mse_loss(torch.mean(z, dim=0), torch.zeros(z.shape[1])))
    leak = p.leak_z_grad_into_vae and train
    wrt = [z] + (list(dec.parameters()) if leak else [])
    grads = torch.autograd.grad(lz, wrt)
    z.grad = grads[0]
    opt_z = torch.optim.Adam([z], lr=p.z_lr)
    opt_z.step()
    with torch.no_grad():
      x_m = dec(z)
    dec.train()
    return x_m, (grads[1:] if leak else None), lz

  def _vae_update(self, rng, path, x_novel):
    """One VAE step on [first vae_input novel images; memory samples]."""
    p = self.cfg.pre_dfkd
    x_m, leak, lz = self._infer_memory(rng, path + (("split", 2, 0),), train=True)
    n, m = p.vae_input, p.memory_batch
    first = self.it == 0
    x_in = torch.cat([x_novel[:n], x_novel[n:n + m] if first else x_m]).detach()
    with torch.no_grad():
      t_in = self.teacher(x_in)[0]
    self.vae.train()
    eps = rng.normal((n + m, p.vae_latent_dim), path + (("split", 2, 1),))
    x_hat, mu, logvar = self.vae(x_in, eps)
    pixel = (x_hat - x_in).abs().mean()
    logit = t_l1(t_in, self.teacher(x_hat)[0])
    kl = torch.mean(-0.5 * torch.sum(1 + logvar - mu ** 2 - logvar.exp(), dim=1))
    loss = pixel + logit + p.kl_weight * kl
    self.opt_v.zero_grad(set_to_none=True)
    loss.backward()
    if leak is not None and not first:
      for param, g in zip(self.vae.decoder.parameters(), leak):
        param.grad.add_(g)
    self._update("v", self.opt_v)
    return {"loss": loss, "pixel": pixel, "logit": logit, "kl": kl, "memory_z_loss": lz}

  def _step_pre_dfkd(self, rng):
    """1 G step, then `student_steps` KD steps (memory inference + L1 on [novel; memory]),
    the first `pre_dfkd.vae_steps` of them followed by a VAE step."""
    p, d = self.cfg.pre_dfkd, self.d
    out = {**_prefix("generator", self.generator_step(rng, (0,)))}
    phases_ = []
    if p.vae_steps:
      phases_.append(("kd_vae", p.vae_steps, True))
    if d.student_steps > p.vae_steps:
      phases_.append(("kd", d.student_steps - p.vae_steps, False))
    for ph, (name, n, with_vae) in enumerate(phases_, start=1):
      ms = []
      for i in range(n):
        x = self.sample(rng, (ph, i, 0))
        x_m, _, _ = self._infer_memory(rng, (ph, i, 1, 1000), train=False)
        m = self.student_step(x, [("memory", x_m, p.memory_batch / d.batch_size)], kd="l1")
        if with_vae:
          m.update({f"vae_{k}": v for k, v in self._vae_update(rng, (ph, i, 2), x).items()})
        ms.append(m)
      out.update(_prefix(name, _mean(ms)))
    return out


def _prefix(name, metrics):
  return {f"{name}/{k}": v for k, v in metrics.items()}


def _mean(list_of_metrics):
  return {k: torch.stack([torch.as_tensor(m[k], dtype=torch.float32) for m in list_of_metrics])
          .mean() for k in list_of_metrics[0]}


# ============================================================================ numerical check


def _to_numpy_tree(tree):
  return jax.tree.map(np.asarray, jax.device_get(tree))


class _HostState:
  """A host (numpy) copy of the parts of a DFKDState that the PyTorch side reads."""

  def __init__(self, state):
    for name in ("teacher", "student", "generator", "vae"):
      part = getattr(state, name)
      setattr(self, name, None if part is None else _HostModel(part))


class _HostModel:

  def __init__(self, part):
    self.params = _to_numpy_tree(part.params)
    self.batch_stats = _to_numpy_tree(part.batch_stats)


def check_method(method: str, iterations: int = 2, rtol: float = 1e-4, rtol_later: float = 5e-3,
                 atol: float = 1e-6, pair: str = "lenet", gen_lr: float | None = None):
  """Runs `iterations` outer iterations of `method` (tiny config of `pair`) in JAX and in
  PyTorch from the same weights and random draws; returns rows (iteration, metric, jax, torch,
  rtol, ok).

  The first iteration must agree to `rtol`. Later ones get `rtol_later`: Adam's first steps
  move every weight by about lr * sign(g), so weights whose gradient is at float-noise level
  (biases before a BN, some VAE weights, latent coordinates in PRE-DFKD's z-step) take
  different +-lr steps in the two frameworks, and the losses that follow drift by ~1e-4 to 1e-3.
  The ResNet pair drifts more (dafl grad_norm ~2e-3, pre_dfkd vae_kl up to ~4e-3, against
  <= 1e-3 for LeNet; the amount follows float rounding, e.g. XLA's or canonical conv gradients):
  its deeper teacher leaves more of the generator's gradient coordinates at noise level (the
  first Linear layer, which feeds a BN, and the conv biases before BNs); restarting the PyTorch
  side of the second iteration from the JAX weights brings dafl back to <= 3e-7, so none of it
  is a model mismatch. `gen_lr` overrides the generator's learning rate: with a negligible one
  (1e-9) the ResNet pair's pre_dfkd agrees to <= 1.8e-4 in both iterations (measured), which
  locates all of its drift in the generator's first Adam step.
  """
  config = jax_config(method, tiny=True, pair=pair)
  if gen_lr is not None:
    config.gen_optimizer.lr = gen_lr
  if method == "mb_dfkd":
    config.mb_dfkd.push_every = 1  # the second iteration then replays a filled slot
  step, state = jax_setup(config, random_teacher(perturb_stats=True, pair=pair), pair=pair)
  runner = TorchMethod(method, config, _HostState(state), schedules=True)
  keys = [JaxKeys(state.rng, i) for i in range(iterations)]
  rows = []
  for it in range(iterations):
    state, jm = step(state)
    jm = jax.device_get(jm)
    tm = runner.step(keys[it])
    tol = rtol if it == 0 else rtol_later
    for k in sorted(tm):
      if k.endswith("agree") or k not in jm:
        continue
      a, b = float(jm[k]), float(tm[k])
      rows.append((it, k, a, b, tol, abs(a - b) <= tol * max(abs(a), abs(b)) + atol))
  return rows


# ============================================================================ conv grads in loops

# XLA:CPU canonicalises convolutions to NHWC/HWIO (its fast Eigen kernels) only in the entry
# computation, not in while-loop bodies, and JAX's gradient convolutions are not canonical: inside
# a `lax.scan` they ran 6-27x slower (benchmarks/RESULTS.md). The library's models therefore use
# `dfkd_jax.models.conv`, which emits canonical gradients itself on CPU; `--conv_grads xla`
# restores JAX's own (the state before issue 6) for comparisons, and `--conv_loop_demo` times
# both on a ResNet-8 training step in a scan.


def conv_loop_demo(model: str = "resnet8", batch: int = 64, steps: int = 4):
  """SGD on `model`'s parameters: one jitted step vs `steps` steps in a `lax.scan`, with JAX's
  own conv gradients (`xla`) and the library's (`auto`). Returns rows (mode, 1 step s, scan s,
  loss)."""
  import optax  # pylint: disable=g-import-not-at-top
  module = models.get_model(model, num_classes=NUM_CLASSES)
  params, bs = state_lib.init_model(module, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  x = jax.random.normal(jax.random.key(1), (batch, *IMAGE_SHAPE))
  y = jnp.arange(batch) % NUM_CLASSES

  def make_sgd_step():  # a fresh function per variant: lax.scan caches traces by function
    def sgd_step(carry, _):
      def loss_fn(p):
        (logits, _), new = module.apply({"params": p, "batch_stats": carry[1]}, x, train=True,
                                        mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
      (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(carry[0])
      return (jax.tree.map(lambda a, b: a - 0.01 * b, carry[0], g), new["batch_stats"]), loss
    return sgd_step

  def timed(fn, reps):
    jax.block_until_ready(fn((params, bs)))
    times, out = [], None
    for _ in range(reps):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn((params, bs)))
      times.append(time.perf_counter() - t0)
    return statistics.median(times), out

  rows = []
  for variant in ("xla", "auto"):
    with numerics_lib.use(conv_grads=variant):
      sgd_step = make_sgd_step()
      one, _ = timed(jax.jit(functools.partial(sgd_step, _=None)), 3)
      loop, out = timed(jax.jit(functools.partial(jax.lax.scan, sgd_step, xs=None,
                                                  length=steps)), 2)
    rows.append((variant, one, loop, float(out[1][-1])))
  return rows


# ============================================================================ timing


def _rss_bytes() -> int:
  with open("/proc/self/statm", encoding="ascii") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class RSSPeak:
  """Peak RSS growth over a block (after `malloc_trim`), sampled every `interval` s by a thread
  (a lower bound: short peaks between samples are missed)."""

  def __init__(self, interval=0.002):
    self.interval, self.peak, self._stop = interval, 0, threading.Event()

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, _rss_bytes())
      time.sleep(self.interval)

  def __enter__(self):
    try:  # hand the allocator's free pages back first, so the growth is the block's peak
      ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
      pass
    self.base = self.peak = _rss_bytes()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, _rss_bytes())
    self.delta = self.peak - self.base


def _xla_memory(step, state):
  """XLA's buffer assignment of the compiled step: (temp bytes, argument bytes) or None."""
  import chex  # pylint: disable=g-import-not-at-top
  try:
    chex.clear_trace_counter()
    ma = step.lower(state).compile().memory_analysis()
    return ma.temp_size_in_bytes, ma.argument_size_in_bytes
  except Exception:  # pylint: disable=broad-except
    return None


def work_description(method, config) -> str:
  d = config.distill
  if method == "dafl":
    return "1 fused G+S step"
  if method == "dfad":
    return f"{d.student_steps} S + 1 G"
  if method == "deepinversion":
    return (f"{config.deepinversion.iterations} pixel steps (scan) + {d.student_steps} S "
            f"({'unrolled' if d.unroll else 'scan'})")
  if method == "mb_dfkd":
    return f"1 G + {d.student_steps} S (+B/8 replay)"
  return (f"1 G + {d.student_steps} S (+B/8 memory), {config.pre_dfkd.vae_steps} VAE")


def time_method(method, args):
  config = jax_config(method, batch=args.batch, di_iters=args.di_iters,
                      di_student_steps=args.di_student_steps, pair=args.pair)
  step, state = jax_setup(config, random_teacher(pair=args.pair), pair=args.pair)
  runner = TorchMethod(method, config, _HostState(state))
  rng = TorchRandom()
  load0 = os.getloadavg()[0]

  def run_jax():
    nonlocal state
    state, m = step(state)
    jax.block_until_ready((state, m))

  t0 = time.perf_counter()
  run_jax()
  jax_first = time.perf_counter() - t0
  t0 = time.perf_counter()
  runner.step(rng)
  torch_first = time.perf_counter() - t0
  for _ in range(args.warmup):
    run_jax()
    runner.step(rng)
  tj, tt = [], []
  for r in range(args.repeats):
    order = (("jax", run_jax), ("torch", lambda: runner.step(rng)))
    for name, fn in (order if r % 2 == 0 else order[::-1]):
      t0 = time.perf_counter()
      fn()
      (tj if name == "jax" else tt).append(time.perf_counter() - t0)
  with RSSPeak() as mem_j:
    run_jax()
  with RSSPeak() as mem_t:
    runner.step(rng)
  xla = _xla_memory(step, state)
  med_j, med_t = statistics.median(tj), statistics.median(tt)
  return {"method": method, "work": work_description(method, config), "jax_s": med_j,
          "torch_s": med_t, "ratio": med_t / med_j, "jax_first_s": jax_first,
          "torch_first_s": torch_first, "jax_times": tj, "torch_times": tt,
          "xla_temp": xla[0] if xla else None, "xla_args": xla[1] if xla else None,
          "rss_jax": mem_j.delta, "rss_torch": mem_t.delta,
          "load": (load0, os.getloadavg()[0])}


def profile_jax(method, args, iterations: int = 3, top: int = 15) -> str:
  """Per-op profile of the library's jitted step: a `jax.profiler` trace of `iterations` steps,
  XLA:CPU thunk times summed by name and joined to their HLO instructions (convolution
  dimension labels: `b01f_01io->b01f` is the canonical NHWC/HWIO form). Returns markdown."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import chex  # pylint: disable=g-import-not-at-top
  config = jax_config(method, batch=args.batch, di_iters=args.di_iters,
                      di_student_steps=args.di_student_steps, pair=args.pair)
  step, state = jax_setup(config, pair=args.pair)
  for _ in range(2):
    state, m = step(state)
    jax.block_until_ready((state, m))
  chex.clear_trace_counter()
  hlo = step.lower(state).compile().as_text()
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(iterations):
        state, m = step(state)
        jax.block_until_ready((state, m))
    wall = (time.perf_counter() - t0) / iterations
    path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  # HLO instructions (and the computations they call) by name.
  defs, bodies, current = {}, collections.defaultdict(list), None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
    inst = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w-]+)\(", line)
    if inst:
      defs[inst.group(1)] = line
      if current:
        bodies[current].append(line)
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in defs:
      total[e["name"]] += e.get("dur", 0)
      count[e["name"]] += 1
  all_ops = sum(total.values())

  def describe(name):
    line = defs[name]
    inst = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\(.*?\)|\S+) ([\w-]+)\(", line)
    shape, op = re.sub(r"\{[^}]*\}", "", inst.group(1)), inst.group(2)
    conv_lines = [line] if op == "convolution" else []
    called = re.search(r"calls=%([\w.\-]+)", line)
    if called:
      conv_lines += [b for b in bodies.get(called.group(1), []) if " convolution(" in b]
    convs = []
    for c in conv_lines:
      window = re.search(r"window=\{([^}]*)\}", c)
      labels = re.search(r"dim_labels=([\w>-]+)", c)
      convs.append(f"conv {window.group(1) if window else ''} {labels.group(1) if labels else ''}")
    meta = re.search(r'op_name="([^"]*)"', line)
    where = meta.group(1).replace("jit(step)/", "") if meta else ""
    return f"{op} {shape}", "; ".join(convs), where[-70:]

  lines = [f"JAX step of {method}: {wall:.3f} s per iteration under the profiler; XLA ops "
           f"{all_ops / iterations / 1e3:.0f} ms per iteration (threads overlap).", "",
           "| op | ms / iteration | calls / iteration | share | HLO | convolution | source |",
           "|---|---|---|---|---|---|---|"]
  for name, dur in total.most_common(top):
    op, conv, where = describe(name)
    lines.append(f"| {name} | {dur / iterations / 1e3:.1f} | {count[name] / iterations:.0f} | "
                 f"{100 * dur / all_ops:.1f}% | {op} | {conv} | {where} |")
  by_kind = collections.Counter()
  for name, dur in total.items():
    op, conv, _ = describe(name)
    if conv:
      kind = "canonical conv" if all("b01f_01io->b01f" in c for c in conv.split("; ")) else (
          "non-canonical conv")
    elif "reduce_window" in defs[name] or "select_and_scatter" in defs[name] or (
        "reduce-window" in name or "scatter" in name):
      kind = "max-pool (reduce-window / select-and-scatter)"
    else:
      kind = "other"
    by_kind[kind] += dur
  lines += ["", "By kind: " + "; ".join(f"{k} {v / iterations / 1e3:.0f} ms "
                                        f"({100 * v / all_ops:.0f}%)"
                                        for k, v in by_kind.most_common()) + "."]
  return "\n".join(lines)


def _mib(b):
  return "n/a" if b is None else f"{b / 2 ** 20:.1f}"


def machine() -> str:
  return (f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__}"
          f" ({torch.get_num_threads()} threads, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')})")


TABLE_HEAD = (
    "| method | one outer iteration | JAX median (s) | PyTorch median (s) | torch / jax | "
    "JAX compile + first call (s) | PyTorch first call (s) | XLA temp (MiB) | "
    "RSS growth JAX / PyTorch (MiB) | load (1-min avg) |\n"
    "|---|---|---|---|---|---|---|---|---|---|")


def table_row(r) -> str:
  return (f"| {r['method']} | {r['work']} | {r['jax_s']:.3f} | {r['torch_s']:.3f} | "
          f"**{r['ratio']:.2f}** | {r['jax_first_s']:.1f} | {r['torch_first_s']:.2f} | "
          f"{_mib(r['xla_temp'])} | {_mib(r['rss_jax'])} / {_mib(r['rss_torch'])} | "
          f"{r['load'][0]:.2f} -> {r['load'][1]:.2f} |")


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--methods", default=",".join(METHODS))
  p.add_argument("--pair", default="lenet", choices=sorted(PAIRS),
                 help="teacher -> student: lenet (configs/fashion_mnist_lenet5.py) or resnet "
                 "(ResNet-20 -> ResNet-8, configs/fashion_mnist_resnet20.py)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument("--di_iters", type=int, default=20, help="DeepInversion pixel steps per round")
  p.add_argument("--di_student_steps", type=int, default=10,
                 help="DeepInversion student steps per round")
  p.add_argument("--out_md", default="", help="also write the markdown table to this file")
  p.add_argument("--check", action="store_true",
                 help="numerical parity check on a tiny config instead of timing")
  p.add_argument("--rtol", type=float, default=1e-4, help="check: first iteration")
  p.add_argument("--rtol_later", type=float, default=5e-3, help="check: second iteration")
  p.add_argument("--conv_grads", default="auto", choices=("auto", "canonical", "xla"),
                 help="dfkd_jax.models.conv gradient mode of the JAX side (xla: JAX's own)")
  p.add_argument("--profile", default="",
                 help="print a per-op profile of this method's JAX step, then exit")
  p.add_argument("--conv_loop_demo", action="store_true",
                 help="time ResNet-8 parameter gradients in a lax.scan with JAX's and with "
                 "the library's conv gradients, then exit")
  args = p.parse_args(argv)
  torch.set_num_threads(args.threads)
  # The JAX side's numerics for the rest of this process (a script, not a library call).
  contextlib.ExitStack().enter_context(numerics_lib.use(conv_grads=args.conv_grads))
  methods = [m for m in args.methods.split(",") if m]
  for m in methods:
    if m not in METHODS:
      raise SystemExit(f"Unknown method {m!r}; valid: {', '.join(METHODS)}.")
  pair = "" if args.profile or args.conv_loop_demo else f"pair {PAIR_NAMES[args.pair]}; "
  header = (f"Machine: {machine()}; date {datetime.date.today()}; {pair}command: python "
            + " ".join(sys.argv))
  print(header, flush=True)
  if args.profile:
    print("\n" + profile_jax(args.profile, args), flush=True)
    return 0
  if args.conv_loop_demo:
    print("\n| conv gradients | 1 jitted step (s) | 4 steps in lax.scan (s) | per step vs jitted | "
          "loss after the scan |\n|---|---|---|---|---|")
    for variant, one, loop, loss in conv_loop_demo():
      print(f"| {variant} | {one:.3f} | {loop:.3f} | {loop / 4 / one:.1f}x | {loss:.7f} |",
            flush=True)
    return 0
  if args.check:
    failed = 0
    print("\n| method | iteration | metric | JAX | PyTorch | rel. diff | rtol | ok |\n"
          "|---|---|---|---|---|---|---|---|", flush=True)
    for m in methods:
      for it, k, a, b, tol, ok in check_method(m, rtol=args.rtol, rtol_later=args.rtol_later,
                                               pair=args.pair):
        failed += not ok
        rel = abs(a - b) / max(abs(a), abs(b), 1e-30)
        print(f"| {m} | {it} | {k} | {a:.7g} | {b:.7g} | {rel:.1e} | {tol:g} | "
              f"{'yes' if ok else 'NO'} |", flush=True)
    print(f"\n{'All metrics agree' if not failed else f'{failed} metrics differ'}.")
    return 1 if failed else 0
  lines = [TABLE_HEAD]
  print("\n" + TABLE_HEAD, flush=True)
  for m in methods:
    r = time_method(m, args)
    lines.append(table_row(r))
    print(lines[-1], flush=True)
    print(f"<!-- {m}: jax {['%.3f' % t for t in r['jax_times']]} torch "
          f"{['%.3f' % t for t in r['torch_times']]} -->", flush=True)
  ru = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  footer = f"\nProcess RSS high-water mark (getrusage, both frameworks): {ru / 1024:.0f} MiB."
  print(footer, flush=True)
  if args.out_md:
    with open(args.out_md, "w", encoding="utf-8") as f:
      f.write(header + "\n\n" + "\n".join(lines) + "\n" + footer + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
