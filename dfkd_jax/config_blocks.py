"""Config building blocks shared by the config files and the method registry.

`optimizer` and `loss_block` make the ConfigDict blocks every method's defaults start from; the
config files in `configs/` (and a user's own config) import them from here (`configs/common.py`
re-exports them).
"""
from __future__ import annotations

import ml_collections


def optimizer(name="sgd", lr=0.1, momentum=0.9, weight_decay=5e-4, schedule="cosine",
              **kwargs) -> ml_collections.ConfigDict:
  """An optimizer block: `name` (sgd | adam), learning rate, schedule and their knobs."""
  c = dict(name=name, lr=lr, momentum=momentum, weight_decay=weight_decay, schedule=schedule,
           nesterov=False, grad_clip=0.0, b1=0.9, b2=0.999)
  c.update(kwargs)
  return ml_collections.ConfigDict(c)


def loss_block(**overrides) -> ml_collections.ConfigDict:
  """Synthesis-loss weights (0 disables a term) and the student's KD loss."""
  c = dict(oh=0.0, ie=0.0, act=0.0, adv=0.0, bn=0.0, tv=0.0, l2=0.0, ce=0.0,
           adv_type="l1", adv_temperature=3.0, adv_detach_teacher=False, bn_form="l2",
           first_bn_scale=1.0, bn_momentum=0.0, kd="kl", kd_temperature=1.0, at_beta=0.0)
  c.update(overrides)
  return ml_collections.ConfigDict(c)


def set_dotted(config: ml_collections.ConfigDict, item: str) -> None:
  """Applies one `a.b.c=value` override, typed by the field's current value (as
  `--config.a.b.c=value` does on the command line); unknown fields are a ValueError."""
  key, sep, text = item.partition("=")
  if not sep:
    raise ValueError(f"Override {item!r} needs the form field.path=value.")
  *parents, leaf = key.strip().split(".")
  node = config
  for i, part in enumerate(parents):
    if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
      raise ValueError(f"Override {item!r}: no config block {'.'.join(parents[:i + 1])!r}.")
    node = node[part]
  if leaf not in node:
    raise ValueError(f"Override {item!r}: no field {leaf!r} in {'.'.join(parents) or 'the config'}"
                     f"; valid: {', '.join(sorted(node.keys()))}.")
  current = node[leaf]
  if isinstance(current, bool):
    value = text.lower() in ("1", "true", "yes")
  elif isinstance(current, (int, float, str)):
    value = type(current)(text)
  else:
    raise ValueError(f"Override {item!r}: {key} is a {type(current).__name__}, not a scalar.")
  node[leaf] = value
