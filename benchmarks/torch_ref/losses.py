"""The PyTorch losses of the reference methods (the arithmetic of `dfkd_jax.ops.losses`) and
`BNCapture`, the forward hooks of DeepInversion-style BN-statistics matching."""
from __future__ import annotations

import torch
from torch import nn as tnn
import torch.nn.functional as F


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
