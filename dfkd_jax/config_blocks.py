"""Config building blocks shared by the config files and the method registry.

`optimizer` and `loss_block` make the ConfigDict blocks every method's defaults start from; the
config files in `dfkd_jax/configs/` (and a user's own config) import them from here
(`dfkd_jax.configs.common` re-exports them).
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


# Config fields (by their last name) that do not change what a run computes: logging and
# checkpoint cadence, pictures, labels, paths whose content is checked otherwise and the
# wall-clock budget. The resume check and the report's grouping of seeds both start from it.
BOOKKEEPING_FIELDS = frozenset({"log_every", "eval_every", "checkpoint_every", "max_to_keep",
                                "save_images", "label", "data_dir", "time_budget_s", "workdir",
                                "extend_budget", "compile_cache"})


def flatten(tree, prefix: str = "") -> dict:
  """A nested dict (a config as JSON) as {"a.b.c": leaf}."""
  if not isinstance(tree, dict):
    return {prefix[:-1]: tree}
  out = {}
  for k, v in tree.items():
    out.update(flatten(v, f"{prefix}{k}."))
  return out


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
    value = parse_bool(text, key)
  elif isinstance(current, (int, float, str)):
    value = type(current)(text)
  else:
    raise ValueError(f"Override {item!r}: {key} is a {type(current).__name__}, not a scalar.")
  node[leaf] = value


_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def parse_bool(text: str, name: str) -> bool:
  """'true/false/1/0/yes/no/on/off' -> bool; anything else (a typo such as 'ture') is an error,
  never a silent False."""
  t = text.strip().lower()
  if t in _TRUE or t in _FALSE:
    return t in _TRUE
  raise ValueError(f"{name}={text!r} is not a boolean: use true or false.")


# Range rules by field name (the last part of the dotted path), wherever the field appears;
# the dotted names in `_BY_PATH` take precedence. Each entry: (test, what the field must be).
_POSITIVE = (lambda v: v > 0, "> 0")
_NON_NEGATIVE = (lambda v: v >= 0, ">= 0")
_UNIT = (lambda v: 0 <= v < 1, "in [0, 1)")
_BY_NAME = {
    **{k: _POSITIVE for k in (
        "num_iters", "batch_size", "latent_dim", "student_steps", "log_every",
        "checkpoint_every", "max_to_keep", "ngf", "num_epochs", "pool_size", "slots", "slot_size",
        "memory_batch", "vae_input", "vae_latent_dim", "vae_ngf", "iterations", "k", "g_steps",
        "g_loops", "g_life", "push_every", "emb_size", "d_hidden", "lr", "lr_g", "lr_z", "z_lr",
        "d_lr", "kd_temperature", "adv_temperature", "temperature", "bn_eps", "vae_bn_eps",
        "label_emb_size")},
    **{k: _NON_NEGATIVE for k in (
        "num_steps", "eval_every", "train_limit", "test_limit", "num_devices", "pad_to",
        "time_budget_s", "weight_decay", "grad_clip", "warmup", "vae_steps", "student_chunk",
        "synth_chunk", "student_jitter", "synth_jitter", "jitter", "oh", "ie", "act", "adv", "bn",
        "tv", "l2", "ce", "at_beta", "kl_weight", "lambda_fa", "weight", "first_bn_scale")},
    **{k: _UNIT for k in ("momentum", "b1", "b2", "d_b1", "d_b2", "student_ema", "bn_momentum")},
    "alpha": (lambda v: 0 <= v <= 1, "in [0, 1]"),
}
_BY_PATH = {"distill.eval_every": _POSITIVE, "condensed.batch": _POSITIVE}


# Numeric fields any value of which is valid (seeds, signed offsets).
UNCONSTRAINED = frozenset({"seed"})


def range_rule(path: str):
  """`(test, what the value must be)` for the dotted field `path`, or None (any value)."""
  return _BY_PATH.get(path) or _BY_NAME.get(path.rsplit(".", 1)[-1])


def validate(config: ml_collections.ConfigDict) -> None:
  """Checks every numeric field's range once, before a run writes anything; raises one
  ValueError naming each bad field, its value and what it must be."""
  bad = []

  def walk(node, prefix):
    for key, value in node.items():
      path = f"{prefix}{key}"
      if isinstance(value, ml_collections.ConfigDict):
        walk(value, path + ".")
        continue
      rule = range_rule(path)
      if rule is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        continue
      test, must = rule
      if value != value or not test(value):  # NaN fails every rule
        bad.append(f"{path}={value!r} (must be {must})")

  walk(config, "")
  if bad:
    raise ValueError(f"Invalid config: {'; '.join(bad)}. Fix the value(s) on the command line "
                     "(--config.<field>=...) or in the config file.")
