"""Saving and loading trained models (teachers and students) as self-describing files.

`workdir/model.msgpack` holds `{"params", "batch_stats"}` (flax serialization) and
`workdir/model.json` the architecture name, class count, input shape, dataset, test accuracy
and the sha256 of the weights, so a wrong teacher is caught with a clear message before any
array shape error.
"""
from __future__ import annotations

import hashlib
import json
import os

from flax import serialization
import jax
import numpy as np

from dfkd_jax.io import files
from dfkd_jax import models as models_lib
from dfkd_jax import numerics as numerics_lib
from dfkd_jax import state as state_lib

WEIGHTS = "model.msgpack"
META = "model.json"


class ModelLoadError(RuntimeError):
  """A saved model is missing or does not match the config."""


def export_model(workdir: str, *, model_name: str, num_classes: int, input_shape, dataset: str,
                 params, batch_stats, extra: dict | None = None) -> str:
  """Writes weights and metadata atomically; returns the weights' sha256."""
  os.makedirs(workdir, exist_ok=True)
  tree = jax.device_get({"params": params, "batch_stats": batch_stats})
  blob = serialization.msgpack_serialize(serialization.to_state_dict(tree))
  digest = hashlib.sha256(blob).hexdigest()
  meta = {"model": model_name, "num_classes": int(num_classes),
          "input_shape": [int(d) for d in input_shape], "dataset": dataset, "sha256": digest,
          "num_params": state_lib.num_params(params),
          "numerics": numerics_lib.current().to_dict(), **(extra or {})}
  for name, data in ((WEIGHTS, blob), (META, json.dumps(meta, indent=2).encode())):
    files.write_atomic(os.path.join(workdir, name), data)
  return digest


def load_model(workdir: str, *, role: str = "teacher", expect_model: str | None = None,
               expect_classes: int | None = None, expect_channels: int | None = None,
               hint: str = ""):
  """Loads a saved model; returns (module, FrozenModel, meta).

  Raises:
    ModelLoadError: missing files, or an architecture / class count / channel count other than
      expected, with the fix in the message.
  """
  wpath, mpath = os.path.join(workdir, WEIGHTS), os.path.join(workdir, META)
  if not (os.path.isfile(wpath) and os.path.isfile(mpath)):
    raise ModelLoadError(f"No {role} checkpoint at {workdir!r} (expected {WEIGHTS} and {META})."
                         + (f" {hint}" if hint else ""))
  try:
    with open(mpath, encoding="utf-8") as f:
      meta = json.load(f)
  except (OSError, ValueError) as e:
    raise ModelLoadError(f"{mpath} is unreadable ({type(e).__name__}: {e}); re-export the model "
                         "(re-run the training run, which rewrites it).") from e
  missing = [k for k in ("model", "num_classes", "input_shape", "sha256")
             if not isinstance(meta, dict) or k not in meta]
  if missing:
    raise ModelLoadError(f"{mpath} lacks {', '.join(missing)}: it was not written by "
                         "dfkd_jax.io.model_io.export_model; re-export the model with it.")
  problems = []
  if expect_model is not None and meta["model"] != expect_model:
    problems.append(f"architecture {meta['model']!r} (config says {expect_model!r}; set "
                    f"--config.{role}.model={meta['model']})")
  if expect_classes is not None and meta["num_classes"] != expect_classes:
    problems.append(f"{meta['num_classes']} classes (the dataset has {expect_classes})")
  if expect_channels is not None and meta["input_shape"][-1] != expect_channels:
    problems.append(f"{meta['input_shape'][-1]} input channels (the dataset has "
                    f"{expect_channels})")
  if problems:
    raise ModelLoadError(f"The {role} at {workdir!r} does not match the config: it has "
                         + "; ".join(problems) + ".")
  try:
    module = models_lib.get_model(meta["model"], num_classes=meta["num_classes"])
  except ValueError as e:
    raise ModelLoadError(f"{mpath} names a model this installation does not have ({e}); "
                         "register it in dfkd_jax.models.MODELS before loading.") from e
  with open(wpath, "rb") as f:
    blob = f.read()
  if hashlib.sha256(blob).hexdigest() != meta["sha256"]:
    raise ModelLoadError(f"{wpath}: checksum mismatch with {META}; the file is corrupt. "
                         "Re-train or re-export it.")
  target_vars = jax.eval_shape(
      lambda: module.init(jax.random.key(0), np.zeros([1, *meta["input_shape"]], np.float32),
                          train=False))
  target = {"params": target_vars["params"], "batch_stats": target_vars.get("batch_stats", {})}
  target = jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), target)
  try:
    tree = serialization.from_state_dict(target, serialization.msgpack_restore(blob))
  except (ValueError, KeyError, TypeError) as e:
    raise ModelLoadError(f"{wpath} does not hold {meta['model']!r} weights ({e}); re-export "
                         "it.") from e
  for (path, want), got in zip(jax.tree_util.tree_leaves_with_path(target),
                               jax.tree.leaves(tree)):
    if np.shape(got) != np.shape(want):
      raise ModelLoadError(
          f"{wpath}: {jax.tree_util.keystr(path)} has shape {np.shape(got)}, but "
          f"{meta['model']!r} with {meta['num_classes']} classes and inputs "
          f"{tuple(meta['input_shape'])} needs {np.shape(want)}; the weights and model.json "
          "do not belong together. Re-export the model.")
  frozen = state_lib.FrozenModel(params=tree["params"], batch_stats=tree["batch_stats"],
                                 apply_fn=module.apply)
  return module, frozen, meta
