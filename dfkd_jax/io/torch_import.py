r"""Imports a PyTorch teacher (a `torch.save`d state_dict) as a dfkd_jax model folder.

  python -m dfkd_jax.io.torch_import --model resnet34 --num_classes 10 --input_shape 32,32,3 \
      --dataset cifar10 --mean 0.4914,0.4822,0.4465 --std 0.2023,0.1994,0.2010 \
      --out runs/teacher_r34 path/to/resnet34.pth

Almost every published data-free KD teacher is a PyTorch state_dict of a few CIFAR / MNIST
architectures. This module reads such a file without PyTorch, converts it to the Flax model of
the same name (`dfkd_jax.models`) and writes `model.msgpack` + `model.json` with
`model_io.export_model`, so that every mode of the library takes it as `teacher_dir`. model.json
records the teacher's input normalisation (`--mean`/`--std`, default: the dataset's), which
data-free runs then use for their synthetic images.

Reading. `read_torch_file` reads the zip format of `torch.save` (PyTorch >= 1.6: `<name>/data.pkl`
plus one raw little-endian storage per `<name>/data/<key>`) with a restricted unpickler: the only
globals it resolves are `collections.OrderedDict`, torch's tensor / parameter rebuild functions
and the typed storage classes (mapped to numpy dtypes); anything else (a pickled `nn.Module`, an
`argparse.Namespace` in a training checkpoint, any callable) is refused with an error, so no
pickled code ever runs. Tensors become numpy arrays. Other formats (the legacy non-zip format)
are read with `torch.load(..., weights_only=True)` when torch is installed. A checkpoint that
wraps the state_dict under "state_dict", "model_state_dict", "model" or "net" is unwrapped, and
a DataParallel "module." prefix is stripped.

Layouts (`LAYOUTS`; chosen automatically as the one sharing most keys with the file, or
`--layout`). The PyTorch twins in `dfkd_jax.io.torch_twins` define each one:

* lenet5, lenet5_half: "dafl" (DAFL: `conv1..3`, `fc1`, `fc2`) or "cmi" (CMI / Fast copies:
  `features.0/3/6`, `fc.0`, `fc.2`). lenet5_bn, lenet5_half_bn: "dafl" plus `bn1..bn3` after
  the convs and `bn4` after `fc1`; no public code has these, so this is our naming. Biases of
  the convs and `fc1` there are optional: our model has none (BatchNorm follows), and a bias is
  folded into the BN running mean, which is exact (BN(x + b) with running mean m equals BN(x)
  with m - b, and a batch mean shifts by b too).
* resnet8/20/32/18/34: "dafl" (DAFL / CMI / Fast / DeepInversion CIFAR ResNet: `conv1`, `bn1`,
  `layerS.B.{conv1,bn1,conv2,bn2}`, projection `layerS.B.shortcut.0/.1`, `linear`) or
  "resnet_tiny" (CMI / Fast `resnet_tiny`: projection `downsample.0/.1`, logits `fc`).
* wrn16_1/16_2/40_1/40_2: "wrn" (ZSKT / CMI / Fast: `conv1`, `blockG.layer.B.{bn1, conv1, bn2,
  conv2, convShortcut}`, final `bn1`, `fc`).
* mobilenetv2: "torchvision" (`features.0.0/.1` stem, `features.K.conv.*` inverted residuals,
  `features.18.0/.1` head conv, `classifier.1`).

Where our architectures differ from published ones (the conversion is to OURS):

* mobilenetv2: our network has CIFAR strides (stride-1 stem and stride-1 second stage, 8x total
  downsampling, as kuangliu / huyvnphan CIFAR MobileNetV2s). The CMI / Fast `mobilenetv2` has the
  same keys but torchvision's ImageNet strides (32x): its weights load, but the imported model
  computes a different function; evaluate such a teacher (`--mode=evaluate`) before use.
  kuangliu's own MobileNetV2 (ReLU, expansion conv also at t=1, conv shortcuts) does not fit.
* resnet8/20/32: He et al.'s zero-padding "option A" shortcuts (akamaster) have no weights and
  do not fit; the CMI / Fast / RepDistiller ones (1x1 conv + BN, "option B") do.
* LeNet-5: the conv3 map is averaged over space before `fc1` (DAFL flattens it); at 32x32 the
  map is 1x1 and the two are the same.

Transforms: conv weight OIHW -> HWIO (a depthwise conv's [C, 1, 3, 3] becomes [3, 3, 1, C],
Flax's grouped-conv kernel), Linear [out, in] -> [in, out], BatchNorm weight / bias / running_mean
/ running_var -> params scale / bias and batch_stats mean / var (`num_batches_tracked` ignored),
all as float32. No architecture here flattens a spatial map into a Linear (LeNet's map is 1x1,
the others pool globally), so no NCHW -> NHWC reordering of Linear inputs is needed.

Checks. Every key of the chosen layout must be present with the shape the Flax model needs, and
no other key may be left over; the first mismatch (missing, unexpected, or wrong shape with both
shapes) is a one-line `TorchImportError` with the fix (`--num_classes`, `--input_shape`, or the
`--model` the file matches). When torch is installed, the converted model's logits are compared
with the PyTorch twin's (eval mode) on random inputs before anything is written.
"""
from __future__ import annotations

import argparse
import collections
from collections.abc import Sequence
import dataclasses
import io
import json
import math
import os
import pickle
import sys
from typing import Any
import zipfile

import numpy as np

# Model name -> accepted PyTorch key layouts (the first wins ties).
LAYOUTS: dict[str, tuple[str, ...]] = {
    "lenet5": ("dafl", "cmi"), "lenet5_half": ("dafl", "cmi"),
    "lenet5_bn": ("dafl",), "lenet5_half_bn": ("dafl",),
    "resnet8": ("resnet_tiny", "dafl"), "resnet20": ("resnet_tiny", "dafl"),
    "resnet32": ("resnet_tiny", "dafl"),
    "resnet18": ("dafl", "resnet_tiny"), "resnet34": ("dafl", "resnet_tiny"),
    "wrn16_1": ("wrn",), "wrn16_2": ("wrn",), "wrn40_1": ("wrn",), "wrn40_2": ("wrn",),
    "mobilenetv2": ("torchvision",),
}
# Entries of a training checkpoint that may hold the state_dict, in the order tried.
WRAPPER_KEYS = ("state_dict", "model_state_dict", "model", "net")
# The logits check passes when max |flax - torch| <= CHECK_RTOL * max(1, max |torch logits|).
CHECK_RTOL = 1e-4
_BN_KEYS = ("weight", "bias", "running_mean", "running_var")


class TorchImportError(ValueError):
  """A checkpoint that cannot be imported; the one-line message names the fix."""


# ---------------------------------------------------------------------------- reading files

# torch's typed storage classes (as pickled by torch.save) -> numpy dtype names.
_STORAGE_DTYPES = {
    "FloatStorage": "float32", "DoubleStorage": "float64", "HalfStorage": "float16",
    "BFloat16Storage": "bfloat16", "LongStorage": "int64", "IntStorage": "int32",
    "ShortStorage": "int16", "CharStorage": "int8", "ByteStorage": "uint8",
    "BoolStorage": "bool",
}


@dataclasses.dataclass(frozen=True, slots=True)
class _StorageType:
  """Stand-in for a torch storage class in the pickle: only its element type matters (frozen
  and without `__dict__`, so that a pickle's BUILD opcode cannot change it)."""
  name: str

  @property
  def dtype(self) -> np.dtype:
    if self.name == "BFloat16Storage":
      import ml_dtypes  # pylint: disable=g-import-not-at-top  (a JAX dependency)
      return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(_STORAGE_DTYPES[self.name])


def _rebuild_tensor(storage: np.ndarray, offset: int, size: Sequence[int],
                    stride: Sequence[int], *unused) -> np.ndarray:
  """`torch._utils._rebuild_tensor_v2` on numpy: the strided view of a storage, copied.

  Bounds are checked first: `as_strided` trusts its arguments, and a damaged or hostile file
  must not make it read outside the storage.
  """
  del unused  # requires_grad, backward hooks, metadata
  if not isinstance(storage, np.ndarray) or storage.ndim != 1:
    raise TorchImportError("a tensor without a storage: the file is damaged.")
  size, stride, offset = tuple(int(n) for n in size), tuple(int(s) for s in stride), int(offset)
  if len(size) != len(stride) or min(size + stride + (offset,), default=0) < 0:
    raise TorchImportError(f"a tensor has size {size}, stride {stride}, offset {offset}: the "
                           "file is damaged.")
  if math.prod(size) == 0:
    return np.zeros(size, storage.dtype)
  if math.prod(size) > storage.size:  # an expanded view (stride 0), or a hostile size
    raise TorchImportError(f"a tensor of size {size} has more elements than its storage "
                           f"({storage.size}): the file is damaged, or holds an expanded view "
                           "(save .contiguous() tensors).")
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:
    raise TorchImportError(f"a tensor of size {size} reaches element {last} of a storage of "
                           f"{storage.size}: the file is damaged.")
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=[s * storage.itemsize for s in stride],
      writeable=False)
  return np.array(view)


def _rebuild_parameter(data: np.ndarray, *unused) -> np.ndarray:
  """`torch._utils._rebuild_parameter(_with_state)`: a Parameter is its data here."""
  del unused
  return data


_REBUILDERS = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
}


class _StateDictUnpickler(pickle.Unpickler):
  """Unpickles `data.pkl` of a torch zip archive, resolving only `collections.OrderedDict` (an
  immutable builtin type), the torch storage classes (`_StorageType`) and the rebuild functions
  of `_REBUILDERS`."""

  def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, big_endian: bool,
               path: str):
    super().__init__(io.BytesIO(data))
    self._archive, self._prefix, self._big_endian, self._path = (archive, prefix, big_endian,
                                                                 path)
    self._storages: dict[str, np.ndarray] = {}

  def find_class(self, module: str, name: str) -> Any:
    if (module, name) == ("collections", "OrderedDict"):
      return collections.OrderedDict
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    rebuild = _REBUILDERS.get((module, name))
    if rebuild is None:
      raise TorchImportError(
          f"{self._path}: refusing to unpickle {module}.{name}: only state_dict contents "
          "(dicts, tensors, storages) are read, never other objects or code. Re-save just the "
          "weights in PyTorch: torch.save(model.state_dict(), 'weights.pth').")
    # A fresh callable each time: attributes a pickle sets on it (BUILD) reach nothing of ours.
    return lambda *args: rebuild(*args)

  def persistent_load(self, pid: Any) -> np.ndarray:
    if not (isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)):
      raise TorchImportError(f"{self._path}: unknown persistent id {str(pid)[:80]!r} in "
                             "data.pkl: not a torch.save state_dict.")
    storage_type, key = pid[1], str(pid[2])
    if key not in self._storages:
      record = f"{self._prefix}data/{key}"
      try:
        raw = self._archive.read(record)
      except KeyError:
        raise TorchImportError(f"{self._path}: storage {record!r} is missing: the file is "
                               "damaged or truncated.") from None
      dtype = storage_type.dtype
      if len(raw) % dtype.itemsize:
        raise TorchImportError(f"{self._path}: storage {record!r} has {len(raw)} bytes, not a "
                               f"multiple of {dtype.itemsize}: the file is damaged.")
      if self._big_endian and dtype.itemsize > 1:
        words = np.frombuffer(raw, f">u{dtype.itemsize}").astype(f"=u{dtype.itemsize}")
        self._storages[key] = words.view(dtype)
      else:
        self._storages[key] = np.frombuffer(raw, dtype)
    return self._storages[key]


def _read_zip(path: str) -> Any:
  with zipfile.ZipFile(path) as archive:
    names = archive.namelist()
    pickles = [n for n in names
               if n.count("/") <= 1 and n.rpartition("/")[2] == "data.pkl"]
    if len(pickles) != 1:
      raise TorchImportError(f"{path}: a zip file without one data.pkl: not written by "
                             "torch.save.")
    prefix = pickles[0][:-len("data.pkl")]
    if any(n.startswith(prefix + "code/") for n in names):
      raise TorchImportError(f"{path}: a TorchScript archive (torch.jit.save), not a state_dict;"
                             " save model.state_dict() with torch.save instead.")
    big_endian = False
    if prefix + "byteorder" in names:
      big_endian = archive.read(prefix + "byteorder").decode("ascii", "replace").strip() == "big"
    try:
      return _StateDictUnpickler(archive.read(pickles[0]), archive, prefix, big_endian,
                                 path).load()
    except TorchImportError as e:
      if str(e).startswith(path):
        raise
      raise TorchImportError(f"{path}: {e}") from None  # the rebuild functions know no path
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
            IndexError, KeyError) as e:
      raise TorchImportError(f"{path}: data.pkl is unreadable ({type(e).__name__}: "
                             f"{_one_line(e)}): the file is damaged.") from e


def _torch_or_none():
  """The torch module if it can be imported (it is optional), else None."""
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return torch


def _to_numpy(obj: Any, torch) -> Any:
  """Tensors (at any depth of dicts, lists, tuples) as numpy arrays (bfloat16 as float32)."""
  if isinstance(obj, torch.Tensor):
    t = obj.detach().cpu()
    return (t.float() if t.dtype == torch.bfloat16 else t).numpy()
  if isinstance(obj, dict):
    return type(obj)((k, _to_numpy(v, torch)) for k, v in obj.items())
  if isinstance(obj, (list, tuple)):
    return type(obj)(_to_numpy(v, torch) for v in obj)
  return obj


def read_torch_file(path: str) -> Any:
  """The object saved in a `torch.save` file, with tensors as numpy arrays.

  The zip format is read without torch by the restricted unpickler of the module docstring;
  other formats need torch (`torch.load(..., weights_only=True)`).

  Raises:
    TorchImportError: a missing, damaged or refused file, or a legacy file without torch.
  """
  if not os.path.isfile(path):
    raise TorchImportError(f"{path}: no such file.")
  if zipfile.is_zipfile(path):
    return _read_zip(path)
  torch = _torch_or_none()
  if torch is None:
    raise TorchImportError(
        f"{path}: not the zip format of torch.save (PyTorch >= 1.6), which is the only one read "
        "without torch; install torch (pip install 'dfkd_jax[torch]') or re-save the file with a "
        "recent PyTorch.")
  try:
    obj = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pylint: disable=broad-except  (any failure of torch's reader)
    raise TorchImportError(f"{path}: torch.load(weights_only=True) failed "
                           f"({type(e).__name__}: {_one_line(e)[:300]}).") from e
  return _to_numpy(obj, torch)


def extract_state_dict(obj: Any, key: str | None = None,
                       source: str = "the checkpoint") -> tuple[dict[str, np.ndarray], list[str]]:
  """The state_dict in a loaded checkpoint, and notes on how it was found.

  Args:
    obj: what `read_torch_file` returned.
    key: the entry holding the state_dict (None: the object itself if it is one, else the
      first of `WRAPPER_KEYS` present).
    source: the file, for messages.

  Returns:
    (an ordered `{name: array}` with any "module." prefix removed, notes such as
    "state_dict under 'net'").

  Raises:
    TorchImportError: no state_dict found, or entries that are not tensors.
  """
  notes = []
  if not isinstance(obj, dict):
    raise TorchImportError(f"{source} holds a {type(obj).__name__}, not a state_dict; save "
                           "model.state_dict() with torch.save.")
  if key is not None:
    if key not in obj:
      raise TorchImportError(f"{source} has no entry {key!r} (entries: "
                             f"{', '.join(map(str, list(obj)[:10]))}); fix --key.")
    obj, notes = obj[key], [f"state_dict under {key!r}"]
  elif not all(isinstance(v, np.ndarray) for v in obj.values()):
    found = next((k for k in WRAPPER_KEYS if isinstance(obj.get(k), dict)), None)
    if found is None:
      raise TorchImportError(
          f"{source} is not a state_dict (entry {_first_non_array(obj)!r} is not a tensor) and "
          f"has none under {', '.join(map(repr, WRAPPER_KEYS))} (entries: "
          f"{', '.join(map(str, list(obj)[:10]))}); pass --key with the entry that holds it.")
    obj, notes = obj[found], [f"state_dict under {found!r}"]
  if not isinstance(obj, dict) or not obj:
    what = "empty" if isinstance(obj, dict) else f"a {type(obj).__name__}"
    raise TorchImportError(f"{source}: the state_dict is {what}; save model.state_dict().")
  bad = _first_non_array(obj)
  if bad is not None:
    raise TorchImportError(f"{source}: state_dict entry {bad!r} is a {type(obj[bad]).__name__}, "
                           "not a tensor; pass --key with the entry that holds the weights.")
  state, stripped = collections.OrderedDict(), 0
  for name, value in obj.items():
    if not isinstance(name, str):
      raise TorchImportError(f"{source}: state_dict key {name!r} is not a string.")
    if name.startswith("module."):
      name, stripped = name[len("module."):], stripped + 1
    if name in state:
      raise TorchImportError(f"{source}: key {name!r} appears with and without 'module.'.")
    state[name] = value
  if stripped:
    notes.append("'module.' prefix stripped")
  return state, notes


def _first_non_array(d: dict) -> Any:
  return next((k for k, v in d.items() if not isinstance(v, np.ndarray)), None)


def load_state_dict(path: str, key: str | None = None) -> tuple[dict[str, np.ndarray], list[str]]:
  """`extract_state_dict(read_torch_file(path), key)`."""
  return extract_state_dict(read_torch_file(path), key, source=path)


# ---------------------------------------------------------------------------------- layouts

@dataclasses.dataclass(frozen=True)
class Layer:
  """One PyTorch module of a layout and the Flax module it becomes.

  Attributes:
    torch_name: the module's key prefix, e.g. "layer2.0.shortcut.0".
    kind: "conv", "linear" or "bn".
    flax_path: the Flax module path, e.g. ("layer2_0", "shortcut_conv").
    fold_bias_into: for a conv / linear without bias in Flax: the torch name of the BN that
      follows it; a bias in the file is then allowed and folded into that BN's running mean.
  """
  torch_name: str
  kind: str
  flax_path: tuple[str, ...]
  fold_bias_into: str | None = None


def _lenet_layers(module, layout: str) -> list[Layer]:
  """DAFL's LeNet-5 names ("dafl", with bn1..bn4 for the BN variants) or CMI's Sequentials."""
  if layout == "cmi":
    return [Layer("features.0", "conv", ("conv1",)), Layer("features.3", "conv", ("conv2",)),
            Layer("features.6", "conv", ("conv3",)), Layer("fc.0", "linear", ("hidden",)),
            Layer("fc.2", "linear", ("fc",))]
  layers = []
  for torch_name, kind, flax_name, bn in (("conv1", "conv", "conv1", "bn1"),
                                          ("conv2", "conv", "conv2", "bn2"),
                                          ("conv3", "conv", "conv3", "bn3"),
                                          ("fc1", "linear", "hidden", "bn4")):
    layers.append(Layer(torch_name, kind, (flax_name,), bn if module.use_bn else None))
    if module.use_bn:
      layers.append(Layer(bn, "bn", (bn,)))
  return layers + [Layer("fc2", "linear", ("fc",))]


def _resnet_layers(module, layout: str) -> list[Layer]:
  """CIFAR ResNets; every block lists a projection (dropped where the Flax block has none)."""
  projection, head = ("shortcut", "linear") if layout == "dafl" else ("downsample", "fc")
  layers = [Layer("conv1", "conv", ("stem_conv",)), Layer("bn1", "bn", ("stem_bn",))]
  for i, blocks in enumerate(module.stage_sizes):
    for j in range(blocks):
      t, f = f"layer{i + 1}.{j}", f"layer{i + 1}_{j}"
      layers += [Layer(f"{t}.conv1", "conv", (f, "conv1")), Layer(f"{t}.bn1", "bn", (f, "bn1")),
                 Layer(f"{t}.conv2", "conv", (f, "conv2")), Layer(f"{t}.bn2", "bn", (f, "bn2")),
                 Layer(f"{t}.{projection}.0", "conv", (f, "shortcut_conv")),
                 Layer(f"{t}.{projection}.1", "bn", (f, "shortcut_bn"))]
  return layers + [Layer(head, "linear", ("fc",))]


def _wrn_layers(module, layout: str) -> list[Layer]:
  """ZSKT / CMI Wide ResNets; every block lists a `convShortcut` (dropped where none)."""
  del layout
  layers, n = [Layer("conv1", "conv", ("stem_conv",))], (module.depth - 4) // 6
  for g in range(3):
    for j in range(n):
      t, f = f"block{g + 1}.layer.{j}", f"block{g + 1}_{j}"
      layers += [Layer(f"{t}.bn1", "bn", (f, "bn1")), Layer(f"{t}.conv1", "conv", (f, "conv1")),
                 Layer(f"{t}.bn2", "bn", (f, "bn2")), Layer(f"{t}.conv2", "conv", (f, "conv2")),
                 Layer(f"{t}.convShortcut", "conv", (f, "shortcut_conv"))]
  return layers + [Layer("bn1", "bn", ("final_bn",)), Layer("fc", "linear", ("fc",))]


def _mobilenetv2_layers(module, layout: str) -> list[Layer]:
  """torchvision's MobileNetV2 keys: `features.K` is the K-th block (0 the stem), then the head."""
  del layout
  layers = [Layer("features.0.0", "conv", ("stem_conv",)),
            Layer("features.0.1", "bn", ("stem_bn",))]
  k = 0
  for i, (t, _, n, _) in enumerate(module.config):
    for j in range(n):
      k += 1
      b, f = f"features.{k}.conv", f"stage{i + 1}_{j}"
      parts = [("expand_conv", "expand_bn")] if t != 1 else []
      parts += [("dw_conv", "dw_bn")]
      for p, (conv, bn) in enumerate(parts):
        layers += [Layer(f"{b}.{p}.0", "conv", (f, conv)), Layer(f"{b}.{p}.1", "bn", (f, bn))]
      layers += [Layer(f"{b}.{len(parts)}", "conv", (f, "project_conv")),
                 Layer(f"{b}.{len(parts) + 1}", "bn", (f, "project_bn"))]
  return layers + [Layer(f"features.{k + 1}.0", "conv", ("head_conv",)),
                   Layer(f"features.{k + 1}.1", "bn", ("head_bn",)),
                   Layer("classifier.1", "linear", ("fc",))]


_FAMILIES = {"lenet": _lenet_layers, "resnet": _resnet_layers, "wrn": _wrn_layers,
             "mobilenetv2": _mobilenetv2_layers}


def _family(model_name: str) -> str:
  return next(f for f in _FAMILIES if model_name.startswith(f))


def _module(model_name: str, num_classes: int):
  from dfkd_jax import models  # pylint: disable=g-import-not-at-top
  return models.get_model(model_name, num_classes=num_classes)


def _target_shapes(model_name: str, num_classes: int, input_shape: Sequence[int]):
  """The Flax model's params and batch_stats as nested dicts of shapes (no arrays built)."""
  import jax  # pylint: disable=g-import-not-at-top
  module = _module(model_name, num_classes)
  try:
    shapes = jax.eval_shape(lambda: module.init(
        jax.random.key(0), np.zeros((1, *input_shape), np.float32), train=False))
  except ValueError as e:
    raise TorchImportError(f"{model_name} does not take inputs {tuple(input_shape)}: "
                           f"{_one_line(e)}") from e
  as_shapes = lambda tree: jax.tree.map(lambda s: tuple(s.shape), tree)
  return module, as_shapes(dict(shapes["params"])), as_shapes(dict(shapes.get("batch_stats", {})))


def _lookup(tree: dict, path: Sequence[str]) -> dict | None:
  for name in path:
    if not isinstance(tree, dict) or name not in tree:
      return None
    tree = tree[name]
  return tree


def layers_for(model_name: str, layout: str, params_shapes: dict | None = None,
               num_classes: int = 10) -> list[Layer]:
  """The layers of `layout` for `model_name`, in the published state_dict order.

  With `params_shapes` (the Flax params tree of shapes) only the layers the model has are kept
  (projections exist only where the stride or width changes); without it, every candidate.
  """
  if model_name not in LAYOUTS:
    raise TorchImportError(f"no PyTorch layout for model {model_name!r}; supported: "
                           f"{', '.join(LAYOUTS)}.")
  if layout not in LAYOUTS[model_name]:
    raise TorchImportError(f"layout {layout!r} does not apply to {model_name}; use one of "
                           f"{', '.join(LAYOUTS[model_name])}.")
  layers = _FAMILIES[_family(model_name)](_module(model_name, num_classes), layout)
  if params_shapes is None:
    return layers
  return [layer for layer in layers if _lookup(params_shapes, layer.flax_path) is not None]


def _expected(layers: Sequence[Layer], params: dict) -> list[tuple[str, tuple | None, bool]]:
  """(torch key, torch shape or None for any, required) in state_dict order."""
  out = []
  for layer in layers:
    p = _lookup(params, layer.flax_path)
    if layer.kind == "bn":
      out += [(f"{layer.torch_name}.{k}", p["scale"], True) for k in _BN_KEYS]
      out.append((f"{layer.torch_name}.num_batches_tracked", None, False))
      continue
    k = p["kernel"]
    weight = (k[3], k[2], k[0], k[1]) if layer.kind == "conv" else (k[1], k[0])
    out.append((f"{layer.torch_name}.weight", weight, True))
    if "bias" in p or layer.fold_bias_into:
      out.append((f"{layer.torch_name}.bias", (weight[0],), "bias" in p))
  return out


def _key_names(model_name: str, layout: str) -> set[str]:
  """Every key the layout may have (all candidate layers, weights and biases)."""
  names = set()
  for layer in layers_for(model_name, layout):
    suffixes = (*_BN_KEYS, "num_batches_tracked") if layer.kind == "bn" else ("weight", "bias")
    names.update(f"{layer.torch_name}.{s}" for s in suffixes)
  return names


def choose_layout(model_name: str, keys: Sequence[str]) -> str:
  """The layout of `model_name` sharing most keys with `keys` (the first on a tie)."""
  if model_name not in LAYOUTS:
    raise TorchImportError(f"no PyTorch layout for model {model_name!r}; supported: "
                           f"{', '.join(LAYOUTS)}.")
  scores = [len(_key_names(model_name, layout).intersection(keys))
            for layout in LAYOUTS[model_name]]
  return LAYOUTS[model_name][int(np.argmax(scores))]


# ------------------------------------------------------------------------------- conversion

@dataclasses.dataclass
class Converted:
  """A state_dict converted to a Flax model.

  Attributes:
    params: Flax params (nested dicts of float32 arrays).
    batch_stats: Flax batch_stats (empty for models without BatchNorm).
    layout: the PyTorch layout read.
    folded_biases: torch keys of biases folded into BatchNorm running means.
  """
  params: dict
  batch_stats: dict
  layout: str
  folded_biases: list[str]


def _set(tree: dict, path: Sequence[str], value: np.ndarray) -> None:
  for name in path[:-1]:
    tree = tree.setdefault(name, {})
  tree[path[-1]] = value


def _mismatch(problem: str, key: str, want: tuple | None, model_name: str, num_classes: int,
              input_shape: Sequence[int], layout: str, layers: Sequence[Layer],
              state: dict, source: str) -> TorchImportError:
  """The one-line error for the first mismatching key, with the most likely fix: the class
  count (only the logits layer's output size differs), the input channels (only the first
  conv's input size differs), else the model the file matches (`guess_model`)."""
  fix = None
  got = tuple(state[key].shape) if key in state and want is not None else None
  head, first = layers[-1].torch_name, layers[0].torch_name
  if (got and key in (f"{head}.weight", f"{head}.bias") and len(got) == len(want)
      and got[1:] == want[1:]):
    fix = f"the file has {got[0]} classes: pass --num_classes {got[0]}"
  elif (got and key == f"{first}.weight" and len(got) == 4 and got[0] == want[0]
        and got[2:] == want[2:]):
    fix = (f"the file's first conv takes {got[1]} input channels: pass --input_shape "
           f"{input_shape[0]},{input_shape[1]},{got[1]}")
  if fix is None:
    guess = guess_model(state, input_shape[:2])
    fix = (f"the file matches {guess}" if guess else
           f"check --model (supported: {', '.join(LAYOUTS)}) and the layouts in "
           "dfkd_jax.io.torch_import")
  return TorchImportError(
      f"{source} is not a {model_name} state_dict for {num_classes} classes and "
      f"{input_shape[-1]} input channels ({layout} layout): {problem}; {fix}.")


def convert_state_dict(state: dict[str, np.ndarray], model_name: str, num_classes: int,
                       input_shape: Sequence[int], layout: str | None = None,
                       source: str = "the state_dict") -> Converted:
  """Converts a PyTorch state_dict of `model_name` to the Flax model's variables.

  Args:
    state: `{key: array}` as from `load_state_dict` (NCHW / OIHW PyTorch arrays).
    model_name: a name of `LAYOUTS`.
    num_classes: the model's class count.
    input_shape: (H, W, C) of the model's inputs.
    layout: a layout of `LAYOUTS[model_name]`; None picks the closest (`choose_layout`).
    source: the file, for messages.

  Returns:
    The converted variables.

  Raises:
    TorchImportError: the first missing, unexpected or wrongly shaped key, with the fix; or
      non-finite values.
  """
  layout = layout or choose_layout(model_name, list(state))
  _, params_shapes, stats_shapes = _target_shapes(model_name, num_classes, input_shape)
  layers = layers_for(model_name, layout, params_shapes, num_classes)
  expected = _expected(layers, params_shapes)
  fail = lambda problem, key, want=None: _mismatch(
      problem, key, want, model_name, num_classes, input_shape, layout, layers, state, source)
  for key, shape, required in expected:
    if key not in state:
      if required:
        raise fail(f"key {key!r} is missing", key)
    elif shape is not None and tuple(state[key].shape) != shape:
      raise fail(f"key {key!r} has shape {tuple(state[key].shape)}, {model_name} needs {shape}",
                 key, shape)
  known = {key for key, _, _ in expected}
  extra = [k for k in state if k not in known]
  if extra:
    more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
    raise fail(f"key {extra[0]!r} is unexpected{more}", extra[0])
  for key, _, _ in expected:
    if key in state and not key.endswith("num_batches_tracked"):
      value = state[key]
      if value.dtype.kind not in "fiub" and str(value.dtype) != "bfloat16":
        raise TorchImportError(f"{source}: {key!r} has dtype {value.dtype}, not a real number.")
      if not np.all(np.isfinite(value.astype(np.float32))):
        raise TorchImportError(f"{source}: {key!r} holds non-finite values (NaN or inf); the "
                               "checkpoint is broken.")

  f32 = lambda key: np.ascontiguousarray(state[key], dtype=np.float32)
  params, batch_stats, folded = {}, {}, []
  for layer in layers:
    t, path = layer.torch_name, layer.flax_path
    if layer.kind == "bn":
      _set(params, (*path, "scale"), f32(f"{t}.weight"))
      _set(params, (*path, "bias"), f32(f"{t}.bias"))
      _set(batch_stats, (*path, "mean"), f32(f"{t}.running_mean"))
      _set(batch_stats, (*path, "var"), f32(f"{t}.running_var"))
      continue
    w = f32(f"{t}.weight")
    _set(params, (*path, "kernel"),
         np.ascontiguousarray(w.transpose(2, 3, 1, 0) if layer.kind == "conv" else w.T))
    if "bias" in _lookup(params_shapes, path):
      _set(params, (*path, "bias"), f32(f"{t}.bias"))
    elif f"{t}.bias" in state:
      folded.append(layer)
  for layer in folded:  # BN(x + b) with running mean m == BN(x) with running mean m - b
    bn = next(b for b in layers if b.torch_name == layer.fold_bias_into)
    stats = _lookup(batch_stats, bn.flax_path)
    stats["mean"] = stats["mean"] - f32(f"{layer.torch_name}.bias")
  _check_tree(params, params_shapes, "params", model_name, layout)
  _check_tree(batch_stats, stats_shapes, "batch_stats", model_name, layout)
  return Converted(params, batch_stats, layout, [f"{f.torch_name}.bias" for f in folded])


def _check_tree(tree: dict, shapes: dict, what: str, model_name: str, layout: str) -> None:
  """The converted tree has exactly the Flax model's leaves and shapes (a layout bug if not)."""
  import jax  # pylint: disable=g-import-not-at-top
  got = {jax.tree_util.keystr(p): np.shape(v) for p, v in jax.tree_util.tree_leaves_with_path(tree)}
  want = {jax.tree_util.keystr(p): tuple(v)
          for p, v in jax.tree_util.tree_leaves_with_path(shapes, is_leaf=_is_shape)}
  if got != want:
    diff = sorted(set(got.items()) ^ set(want.items()))[:3]
    raise RuntimeError(f"internal error: the {layout} layout of {model_name} does not build the "
                       f"Flax {what} (first differences: {diff}); please report it.")


def _is_shape(x: Any) -> bool:
  return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


def guess_model(state: dict[str, np.ndarray], spatial: Sequence[int] = (32, 32)) -> str | None:
  """`--model M --num_classes N --input_shape H,W,C` that `state` converts to without error, or
  None. Only models whose layouts have every key of the file are tried."""
  keys = {k for k in state if not k.endswith("num_batches_tracked")}
  for model_name, layouts in LAYOUTS.items():
    for layout in layouts:
      if not keys <= _key_names(model_name, layout):
        continue
      layers = layers_for(model_name, layout)
      head, first = f"{layers[-1].torch_name}.weight", f"{layers[0].torch_name}.weight"
      if head not in state or first not in state or state[first].ndim != 4:
        continue
      num_classes, channels = int(state[head].shape[0]), int(state[first].shape[1])
      shape = (*spatial, channels)
      try:
        _, params_shapes, _ = _target_shapes(model_name, num_classes, shape)
        layers = layers_for(model_name, layout, params_shapes, num_classes)
        expected = _expected(layers, params_shapes)
      except TorchImportError:
        continue
      fits = all((k in state and (s is None or tuple(state[k].shape) == s)) if required
                 else (k not in state or s is None or tuple(state[k].shape) == s)
                 for k, s, required in expected)
      if fits and keys <= {k for k, _, _ in expected}:
        return (f"--model {model_name} --num_classes {num_classes} --input_shape "
                f"{shape[0]},{shape[1]},{shape[2]}")
  return None


# ------------------------------------------------------------------------ check against torch

def compare_with_twin(state: dict[str, np.ndarray], converted: Converted, model_name: str,
                      num_classes: int, input_shape: Sequence[int], batch: int = 4,
                      seed: int = 0) -> dict | None:
  """Logits of the converted Flax model vs the PyTorch twin holding `state`, both eval mode.

  Returns:
    None when torch is not installed, else {"max_abs_diff", "logits_scale" (max |torch
    logits|), "ok" (max_abs_diff <= CHECK_RTOL * max(1, logits_scale)), "batch"}.
  """
  torch = _torch_or_none()
  if torch is None:
    return None
  import jax  # pylint: disable=g-import-not-at-top
  from dfkd_jax.io import torch_twins  # pylint: disable=g-import-not-at-top

  twin = torch_twins.build_twin(model_name, num_classes, int(input_shape[-1]), converted.layout,
                                lenet_bias=bool(converted.folded_biases))
  own = twin.state_dict()
  missing_bias = [k for k in own if k not in state and k.endswith(".bias")]
  load = {}
  for k, v in own.items():
    if k in state:
      load[k] = torch.from_numpy(np.asarray(state[k], np.float32)).to(v.dtype).reshape(v.shape)
    elif k in missing_bias:  # a partially biased LeNet-BN: the twin's other biases are zero
      load[k] = torch.zeros_like(v)
    else:  # num_batches_tracked of an old checkpoint
      load[k] = v
  twin.load_state_dict(load, strict=True)
  twin.eval()
  x = np.random.default_rng(seed).standard_normal((batch, *input_shape)).astype(np.float32)
  with torch.no_grad():
    want = twin(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  module = _module(model_name, num_classes)
  variables = {"params": converted.params}
  if converted.batch_stats:
    variables["batch_stats"] = converted.batch_stats
  with jax.default_matmul_precision("highest"):
    got = np.asarray(jax.jit(lambda v, x: module.apply(v, x, train=False)[0])(variables, x))
  diff = float(np.max(np.abs(got - want)))
  scale = float(np.max(np.abs(want)))
  return {"max_abs_diff": diff, "logits_scale": scale, "batch": batch,
          "ok": bool(diff <= CHECK_RTOL * max(1.0, scale))}


# ------------------------------------------------------------------------------------ import

def import_teacher(checkpoint: str, out: str, *, model_name: str, num_classes: int,
                   input_shape: Sequence[int], dataset: str, mean: Sequence[float] | None = None,
                   std: Sequence[float] | None = None, pad_to: int = 0, data_dir: str = "",
                   key: str | None = None, layout: str | None = None, check: bool = True,
                   overwrite: bool = False, print_fn=print) -> dict:
  """Converts `checkpoint` and writes the model folder `out` (model.msgpack + model.json).

  Args:
    checkpoint: a `torch.save` file of a state_dict (or of a dict wrapping one).
    out: the folder to write.
    model_name: a name of `LAYOUTS`.
    num_classes: the teacher's class count.
    input_shape: (H, W, C).
    dataset: the dataset the teacher was trained on (recorded in model.json).
    mean, std: the teacher's input normalisation per channel ([0, 1] pixel units); None: the
      dataset's (`dfkd_jax.data.datasets`).
    pad_to: the square size the teacher's images were zero-padded to; 0 records H when the
      dataset's native size is smaller than H, and 0 (none) otherwise.
    data_dir: recorded in model.json for evaluation.
    key: the checkpoint entry holding the state_dict (None: automatic).
    layout: the PyTorch layout (None: automatic).
    check: compare logits with the PyTorch twin when torch is installed.
    overwrite: replace an existing model in `out`.
    print_fn: progress lines.

  Returns:
    {"out", "layout", "notes", "check" (compare_with_twin's result or None), "meta" (the
    model.json contents)}.

  Raises:
    TorchImportError: bad arguments or a checkpoint that does not fit, with the fix.
    RuntimeError: the logits check failed (nothing is written).
  """
  from dfkd_jax.data import datasets  # pylint: disable=g-import-not-at-top
  from dfkd_jax.io import model_io  # pylint: disable=g-import-not-at-top

  input_shape = tuple(int(d) for d in input_shape)
  if len(input_shape) != 3 or min(input_shape) < 1:
    raise TorchImportError(f"input_shape must be H,W,C with positive sizes, got {input_shape}.")
  if model_name not in LAYOUTS:
    raise TorchImportError(f"no PyTorch import for model {model_name!r}; supported: "
                           f"{', '.join(LAYOUTS)}.")
  if num_classes < 1:
    raise TorchImportError(f"num_classes must be >= 1, got {num_classes}.")
  if os.path.exists(os.path.join(out, model_io.META)) and not overwrite:
    raise TorchImportError(f"{out} already holds a model ({model_io.META}); choose another --out "
                           "or pass --overwrite.")
  mean, std, pad_to = _normalization(datasets, dataset, mean, std, pad_to, data_dir, num_classes,
                                     input_shape)
  state, notes = load_state_dict(checkpoint, key)
  converted = convert_state_dict(state, model_name, num_classes, input_shape, layout,
                                 source=checkpoint)
  notes = [f"{converted.layout} layout", *notes]
  if converted.folded_biases:
    notes.append(f"{len(converted.folded_biases)} biases folded into BatchNorm means")
  print_fn(f"read {checkpoint}: {len(state)} tensors ({'; '.join(notes)})")
  result = compare_with_twin(state, converted, model_name, num_classes,
                             input_shape) if check else None
  if result is None:
    print_fn("logits check skipped: " + ("--no_check" if not check else
                                         "torch is not installed (pip install 'dfkd_jax[torch]')"))
  else:
    print_fn(f"logits check against the PyTorch twin ({result['batch']} random inputs): max abs "
             f"difference {result['max_abs_diff']:.3g} (logits up to {result['logits_scale']:.3g})"
             f" -> {'OK' if result['ok'] else 'FAILED'}")
    if not result["ok"]:
      raise RuntimeError(
          f"the converted {model_name} differs from its PyTorch twin by "
          f"{result['max_abs_diff']:.3g} (tolerance {CHECK_RTOL:g} x max(1, "
          f"{result['logits_scale']:.3g})); nothing was written. Please report it.")
  if model_name == "mobilenetv2":
    print_fn("note: mobilenetv2 has CIFAR strides here (stride-1 stem and second stage); a "
             "teacher trained with torchvision's ImageNet strides (CMI / Fast) loads but computes "
             "another function: evaluate it before use.")
  extra = {"normalization": {"mean": list(mean), "std": list(std)}, "pad_to": int(pad_to),
           "data_dir": data_dir or "", "source": os.path.abspath(checkpoint),
           "test_accuracy": None,
           "torch_import": {"layout": converted.layout, "folded_biases": converted.folded_biases,
                            "logits_max_abs_diff": result["max_abs_diff"] if result else None}}
  model_io.export_model(out, model_name=model_name, num_classes=num_classes,
                        input_shape=input_shape, dataset=datasets.canonical_name(dataset),
                        params=converted.params, batch_stats=converted.batch_stats, extra=extra)
  with open(os.path.join(out, model_io.META), encoding="utf-8") as f:
    meta = json.load(f)
  print_fn(f"wrote {os.path.join(out, model_io.META)} and {model_io.WEIGHTS} ({model_name}, "
           f"{num_classes} classes, inputs {input_shape}, {meta['num_params']:,} parameters; "
           f"normalisation mean {tuple(mean)} std {tuple(std)})")
  return {"out": out, "layout": converted.layout, "notes": notes, "check": result, "meta": meta}


def _normalization(datasets, dataset: str, mean, std, pad_to: int, data_dir: str,
                   num_classes: int, input_shape: Sequence[int]):
  """(mean, std, pad_to) for model.json, checked against the dataset where it is known."""
  channels = input_shape[-1]
  if (mean is None) != (std is None):
    raise TorchImportError("pass both --mean and --std, or neither (the dataset's).")
  try:
    info = datasets.get_info(dataset, mean, std, data_dir or None)
  except ValueError as e:
    if mean is None:
      raise TorchImportError(f"{_one_line(e)} Or pass the teacher's --mean and --std, which "
                             "then need no dataset here.") from e
    info = None
  if info is not None:
    if info.num_classes != num_classes or info.channels != channels:
      raise TorchImportError(f"dataset {dataset!r} has {info.num_classes} classes and "
                             f"{info.channels} channels, the teacher {num_classes} and "
                             f"{channels}; fix --dataset, --num_classes or --input_shape.")
    mean, std = info.mean, info.std
    if pad_to == 0 and info.image_size < input_shape[0]:
      pad_to = input_shape[0]
  mean, std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
  if len(mean) != channels or len(std) != channels:
    raise TorchImportError(f"--mean and --std need {channels} values (one per input channel), "
                           f"got {len(mean)} and {len(std)}.")
  if not all(math.isfinite(m) for m in mean) or not all(math.isfinite(s) and s > 0 for s in std):
    raise TorchImportError(f"--mean must be finite and --std positive, got {mean} and {std}.")
  if pad_to < 0:
    raise TorchImportError(f"--pad_to must be >= 0, got {pad_to}.")
  return mean, std, pad_to


# ------------------------------------------------------------------------------ command line

def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split())


class _FlagError(Exception):
  pass


class _Parser(argparse.ArgumentParser):
  """argparse with errors raised (printed by `main` as one `error: ...` line, exit code 2)."""

  def error(self, message):
    raise _FlagError(message)


def _floats(text: str) -> tuple[float, ...]:
  try:
    return tuple(float(v) for v in text.split(","))
  except ValueError:
    raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _shape(text: str) -> tuple[int, ...]:
  try:
    shape = tuple(int(v) for v in text.split(","))
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise argparse.ArgumentTypeError(f"expected H,W,C (three positive integers), got {text!r}")
  return shape


def _parser() -> argparse.ArgumentParser:
  p = _Parser(prog="python -m dfkd_jax.io.torch_import",
              description=__doc__.split("\n\n")[1].replace("\n", " "),
              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("checkpoint", help="the .pt / .pth file (torch.save of a state_dict)")
  p.add_argument("--model", required=True, choices=tuple(LAYOUTS), metavar="NAME",
                 help=f"architecture: {', '.join(LAYOUTS)}")
  p.add_argument("--num_classes", required=True, type=int, help="the teacher's class count")
  p.add_argument("--input_shape", required=True, type=_shape,
                 help="H,W,C of the teacher's inputs, e.g. 32,32,3 (LeNet-5 on MNIST: 32,32,1)")
  p.add_argument("--dataset", required=True,
                 help="the teacher's dataset (a dfkd_jax dataset name, e.g. cifar10)")
  p.add_argument("--mean", type=_floats, default=None,
                 help="the teacher's input normalisation mean per channel (default: the dataset's)")
  p.add_argument("--std", type=_floats, default=None,
                 help="its std per channel (default: the dataset's)")
  p.add_argument("--pad_to", type=int, default=0,
                 help="square size the teacher's images were padded to (0: native, or H when "
                      "the dataset's images are smaller)")
  p.add_argument("--data_dir", default="", help="TFDS data dir to record for evaluation")
  p.add_argument("--out", required=True, help="folder to write model.msgpack and model.json to")
  p.add_argument("--key", default=None,
                 help=f"checkpoint entry holding the state_dict (default: the file itself, or "
                      f"the first of {', '.join(WRAPPER_KEYS)})")
  p.add_argument("--layout", default=None,
                 choices=sorted({lay for lays in LAYOUTS.values() for lay in lays}),
                 help="PyTorch key layout (default: the closest one)")
  p.add_argument("--no_check", action="store_true",
                 help="skip the logits comparison with the PyTorch twin (done when torch is "
                      "installed)")
  p.add_argument("--overwrite", action="store_true", help="replace a model already in --out")
  return p


def main(argv: Sequence[str] | None = None) -> int:
  """CLI entry point; `argv` excludes the program name. Returns the exit code: 0 written, 2 bad
  input (one `error:` line on stderr), 1 a failed logits check."""
  try:
    args = _parser().parse_args(argv)
  except _FlagError as e:
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  except SystemExit as e:  # --help
    return int(e.code or 0)
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  try:
    import_teacher(args.checkpoint, args.out, model_name=args.model, num_classes=args.num_classes,
                   input_shape=args.input_shape, dataset=args.dataset, mean=args.mean,
                   std=args.std, pad_to=args.pad_to, data_dir=args.data_dir, key=args.key,
                   layout=args.layout, check=not args.no_check, overwrite=args.overwrite,
                   print_fn=lambda line: print(line, flush=True))
  except (ValueError, FileNotFoundError, PermissionError, IsADirectoryError,
          NotADirectoryError) as e:
    if os.environ.get("DFKD_DEBUG"):
      raise
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 2
  except RuntimeError as e:
    if os.environ.get("DFKD_DEBUG"):
      raise
    print(f"error: {_one_line(e)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
