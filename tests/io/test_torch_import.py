"""`dfkd_jax.io.torch_import`: PyTorch state_dicts of every supported architecture become model
folders whose logits equal the PyTorch twin's; the torch-free reader equals `torch.load`, refuses
foreign pickles and works with torch blocked; mismatched files are one-line errors naming the
first mismatching key; the command line records the normalisation and exits 2 on bad input.

Tolerance of the logits comparisons: max |flax - torch| <= 1e-4 * max(1, max |torch logits|)
(`torch_import.CHECK_RTOL`); the logits layer is scaled up so that logits reach a few units and
a wrong transform could not hide under the tolerance. Measured: about 1e-6 with logits up to
13.
"""
import collections
import json
import os
import pickle
import subprocess
import sys
import zipfile

import jax
import numpy as np
import pytest

import helpers
from dfkd_jax.io import model_io
from dfkd_jax.io import torch_import

ALL_MODELS = tuple(torch_import.LAYOUTS)
TOL = torch_import.CHECK_RTOL
# Beyond each model's first layout: the other published layouts, and a LeNet-5-BN whose convs
# keep PyTorch's default biases (folded into the BN running means).
EXTRA_CASES = (("lenet5_half", "cmi", False), ("resnet8", "dafl", False),
               ("lenet5_bn", "dafl", True))


def _channels(name: str) -> int:
  return 1 if name.startswith("lenet") else 3


def _twin(name: str, layout: str | None = None, num_classes: int = 10, lenet_bias: bool = False,
          seed: int = 0):
  """A randomly initialised twin in eval mode: random BN affine parameters and running
  statistics, and a logits layer scaled up (logits of a few units)."""
  torch = pytest.importorskip("torch")
  from dfkd_jax.io import torch_twins  # pylint: disable=g-import-not-at-top
  torch.manual_seed(seed)
  model = torch_twins.build_twin(name, num_classes, _channels(name),
                                 layout or torch_import.LAYOUTS[name][0], lenet_bias=lenet_bias)
  gen = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
        module.weight.uniform_(0.5, 1.5, generator=gen)
        module.bias.normal_(0.0, 0.2, generator=gen)
        module.running_mean.normal_(0.0, 0.2, generator=gen)
        module.running_var.uniform_(0.5, 1.5, generator=gen)
      elif isinstance(module, torch.nn.Conv2d) and module.bias is not None:
        module.bias.normal_(0.0, 0.2, generator=gen)
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    head.weight.mul_(20.0)
  return model.eval()


def _save(model, path) -> str:
  import torch  # pylint: disable=g-import-not-at-top
  torch.save(model.state_dict(), str(path))
  return str(path)


def _import(path, out, name, num_classes=10, **kwargs):
  return torch_import.import_teacher(
      str(path), str(out), model_name=name, num_classes=num_classes,
      input_shape=(32, 32, _channels(name)), dataset="mnist" if _channels(name) == 1 else "cifar10",
      check=kwargs.pop("check", False), print_fn=lambda line: None, **kwargs)


def _logits_diff(model, out) -> tuple[float, float]:
  """(max |flax - torch| logits, max |torch logits|) of the folder `out` and the twin."""
  import torch  # pylint: disable=g-import-not-at-top
  _, frozen, meta = model_io.load_model(str(out))
  x = np.random.default_rng(0).standard_normal((3, *meta["input_shape"])).astype(np.float32)
  with torch.no_grad():
    want = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
  with jax.default_matmul_precision("highest"):  # no TF32 convolutions on a GPU
    got = np.asarray(jax.jit(lambda v, x: frozen.apply_fn(v, x, train=False)[0])(
        frozen.variables, x))
  return float(np.max(np.abs(got - want))), float(np.max(np.abs(want)))


@pytest.mark.parametrize("name,layout,lenet_bias",
                         [(n, None, False) for n in ALL_MODELS] + list(EXTRA_CASES))
def test_imported_logits_equal_the_pytorch_twin(tmp_path, name, layout, lenet_bias):
  model = _twin(name, layout, lenet_bias=lenet_bias)
  path = _save(model, tmp_path / "teacher.pth")
  result = _import(path, tmp_path / "out", name)
  assert result["layout"] == (layout or torch_import.LAYOUTS[name][0])
  assert bool(result["meta"]["torch_import"]["folded_biases"]) == lenet_bias
  diff, scale = _logits_diff(model, tmp_path / "out")
  print(f"{name} ({result['layout']}): max |logit difference| {diff:.3g}, logits up to "
        f"{scale:.3g}")
  assert scale > 1.0
  assert diff <= TOL * max(1.0, scale), (diff, scale)
  # The layout lists the keys in the order of the twin's state_dict (the published order), so
  # "the first mismatching key" of an error is the first in the file's own order.
  _, params, _ = torch_import._target_shapes(name, 10, (32, 32, _channels(name)))
  layers = torch_import.layers_for(name, result["layout"], params)
  expected = [k for k, _, _ in torch_import._expected(layers, params)
              if k in model.state_dict()]
  assert expected == list(model.state_dict())


def test_the_check_in_import_teacher_passes_and_is_recorded(tmp_path):
  model = _twin("resnet8")
  result = _import(_save(model, tmp_path / "r8.pth"), tmp_path / "out", "resnet8", check=True)
  assert result["check"]["ok"] and result["check"]["max_abs_diff"] <= TOL * max(
      1.0, result["check"]["logits_scale"])
  assert result["meta"]["torch_import"]["logits_max_abs_diff"] == result["check"]["max_abs_diff"]


# ------------------------------------------------------------------------------- the reader

def _odd_tensors(torch):
  """Tensors that exercise the reader: dtypes, a transposed view, a view with a storage offset
  sharing its storage, a scalar, an empty tensor."""
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6)
  return collections.OrderedDict(
      f32=torch.randn(3, 5), f64=torch.randn(2, dtype=torch.float64),
      f16=torch.randn(4).half(), bf16=torch.randn(4).bfloat16(),
      i64=torch.tensor(7), i32=torch.arange(5, dtype=torch.int32),
      u8=torch.arange(3, dtype=torch.uint8), b=torch.tensor([True, False]),
      transposed=base.t(), offset_view=base[1:3, 2:5], shared=base,
      empty=torch.zeros(0, 3))


def _assert_same(ours: dict, theirs: dict, torch) -> None:
  assert list(ours) == list(theirs)
  for key, value in theirs.items():
    want = (value.float() if value.dtype == torch.bfloat16 else value).numpy()
    got = ours[key].astype(np.float32) if value.dtype == torch.bfloat16 else ours[key]
    assert got.shape == want.shape and got.dtype == want.dtype, key
    np.testing.assert_array_equal(got, want, err_msg=key)


def test_reader_equals_torch_load(tmp_path):
  torch = pytest.importorskip("torch")
  tensors = _odd_tensors(torch)
  torch.save(tensors, str(tmp_path / "odd.pt"))
  _assert_same(torch_import.read_torch_file(str(tmp_path / "odd.pt")),
               torch.load(str(tmp_path / "odd.pt"), weights_only=True), torch)
  # A real state_dict (with BN buffers and num_batches_tracked) and a checkpoint with a Parameter.
  model = _twin("lenet5_half_bn")
  path = _save(model, tmp_path / "sd.pth")
  _assert_same(torch_import.read_torch_file(path), torch.load(path, weights_only=True), torch)
  torch.save({"p": torch.nn.Parameter(torch.ones(2, 3)), "epoch": 4, "acc": 91.5,
              "names": ["a", "b"]}, str(tmp_path / "ckpt.pt"))
  obj = torch_import.read_torch_file(str(tmp_path / "ckpt.pt"))
  np.testing.assert_array_equal(obj["p"], np.ones((2, 3), np.float32))
  assert (obj["epoch"], obj["acc"], obj["names"]) == (4, 91.5, ["a", "b"])


_BLOCKED = r"""
import sys
sys.modules["torch"] = None  # `import torch` now raises ImportError
import numpy as np
from dfkd_jax.io import torch_import
state = torch_import.read_torch_file(sys.argv[1])
np.savez(sys.argv[2], **{k: (v.astype(np.float32) if str(v.dtype) == "bfloat16" else v)
                         for k, v in state.items()})
try:
  torch_import.read_torch_file(sys.argv[3])
except torch_import.TorchImportError as e:
  print("legacy:", e)
code = torch_import.main([sys.argv[4], "--model", "lenet5", "--num_classes", "10",
                          "--input_shape", "32,32,1", "--dataset", "mnist", "--out", sys.argv[5]])
print("torch loaded:", sys.modules["torch"] is not None)
sys.exit(code)
"""


def test_reader_and_import_work_with_torch_blocked(tmp_path):
  """In a subprocess where `import torch` fails: the zip reader gives torch.load's arrays, a
  legacy (non-zip) file is a one-line error asking for torch, and the command line converts a
  teacher (skipping the logits check)."""
  torch = pytest.importorskip("torch")
  tensors = _odd_tensors(torch)
  torch.save(tensors, str(tmp_path / "odd.pt"))
  torch.save(tensors, str(tmp_path / "legacy.pt"), _use_new_zipfile_serialization=False)
  model = _twin("lenet5")
  teacher = _save(model, tmp_path / "lenet5.pth")
  proc = subprocess.run(
      [sys.executable, "-c", _BLOCKED, str(tmp_path / "odd.pt"), str(tmp_path / "arrays.npz"),
       str(tmp_path / "legacy.pt"), teacher, str(tmp_path / "out")],
      cwd=helpers.REPO_ROOT, env=helpers.cli_env(), capture_output=True, text=True, timeout=300,
      check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "logits check skipped: torch is not installed" in proc.stdout
  assert "torch loaded: False" in proc.stdout
  legacy = next(line for line in proc.stdout.splitlines() if line.startswith("legacy:"))
  assert "not the zip format" in legacy and "install torch" in legacy
  with np.load(tmp_path / "arrays.npz") as arrays:
    _assert_same({k: arrays[k] for k in arrays.files},
                 torch.load(str(tmp_path / "odd.pt"), weights_only=True), torch)
  diff, scale = _logits_diff(model, tmp_path / "out")
  assert diff <= TOL * max(1.0, scale)
  # With torch present, the legacy format is read through torch.load(weights_only=True).
  _assert_same(torch_import.read_torch_file(str(tmp_path / "legacy.pt")), tensors, torch)


def test_wrapped_checkpoints_and_dataparallel_prefix(tmp_path):
  torch = pytest.importorskip("torch")
  model = _twin("resnet8")
  state = model.state_dict()
  prefixed = collections.OrderedDict((f"module.{k}", v) for k, v in state.items())
  cases = {"state_dict": {"state_dict": prefixed, "epoch": 200, "best_acc": 93.2},
           "net": {"net": state, "acc": 91.0}, "model": {"model": prefixed}}
  for key, checkpoint in cases.items():
    torch.save(checkpoint, str(tmp_path / f"{key}.pth"))
    got, notes = torch_import.load_state_dict(str(tmp_path / f"{key}.pth"))
    assert list(got) == list(state)
    assert f"state_dict under {key!r}" in notes
    assert ("'module.' prefix stripped" in notes) == (checkpoint[key] is prefixed)
  # --key picks an entry explicitly; a wrong one is named.
  torch.save({"ema": state, "weights": state}, str(tmp_path / "two.pth"))
  assert list(torch_import.load_state_dict(str(tmp_path / "two.pth"), key="ema")[0]) == list(state)
  with pytest.raises(torch_import.TorchImportError, match=r"is not a state_dict .* pass --key"):
    torch_import.load_state_dict(str(tmp_path / "two.pth"))
  with pytest.raises(torch_import.TorchImportError, match=r"has no entry 'emma'"):
    torch_import.load_state_dict(str(tmp_path / "two.pth"), key="emma")
  # The unwrapped, prefixed file converts to the same logits.
  _import(tmp_path / "state_dict.pth", tmp_path / "out", "resnet8")
  diff, scale = _logits_diff(model, tmp_path / "out")
  assert diff <= TOL * max(1.0, scale)


class _Evil:
  """Unpickling this would create a folder (any callable would do)."""

  def __init__(self, target):
    self.target = target

  def __reduce__(self):
    return (os.mkdir, (self.target,))


def test_foreign_pickles_are_refused(tmp_path):
  target = str(tmp_path / "pwned")
  with zipfile.ZipFile(tmp_path / "evil.pth", "w") as archive:
    archive.writestr("evil/data.pkl", pickle.dumps({"x": _Evil(target)}, protocol=2))
  with pytest.raises(torch_import.TorchImportError,
                     match=r"refusing to unpickle \w+\.mkdir.*state_dict\(\)"):
    torch_import.read_torch_file(str(tmp_path / "evil.pth"))
  assert not os.path.exists(target)
  # BUILD on an allowed global sets attributes on a throwaway object, never on the module's.
  build = b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\nN}X\x01\x00\x00\x00xK\x01s\x86b."
  with zipfile.ZipFile(tmp_path / "build.pth", "w") as archive:
    archive.writestr("build/data.pkl", build)
  assert torch_import.read_torch_file(str(tmp_path / "build.pth")).x == 1
  assert not hasattr(torch_import._rebuild_tensor, "x")


def test_a_pickled_module_is_refused(tmp_path):
  torch = pytest.importorskip("torch")
  torch.save(torch.nn.Linear(2, 3), str(tmp_path / "module.pth"))  # a whole module, pickled
  with pytest.raises(torch_import.TorchImportError, match=r"refusing to unpickle torch\.nn\."):
    torch_import.read_torch_file(str(tmp_path / "module.pth"))


def test_damaged_files_are_errors(tmp_path):
  torch = pytest.importorskip("torch")
  # Storages cut short: a whole tensor (too few elements) and a view at offset 50 of a
  # 100-element storage cut to 55 (its last element, 59, is outside).
  for name, tensor, keep, match in (
      ("whole", torch.randn(8, 8), 40, r"more elements than its storage \(10\): the file is "),
      ("view", torch.arange(100.0)[50:60], 220, r"reaches element 59 of a storage of 55")):
    torch.save({"w": tensor}, str(tmp_path / "ok.pt"))
    with zipfile.ZipFile(tmp_path / "ok.pt") as src, zipfile.ZipFile(tmp_path / f"{name}.pt",
                                                                     "w") as dst:
      for info in src.infolist():
        data = src.read(info)
        dst.writestr(info.filename, data[:keep] if info.filename.endswith("data/0") else data)
    with pytest.raises(torch_import.TorchImportError, match=match):
      torch_import.read_torch_file(str(tmp_path / f"{name}.pt"))
  (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
  with pytest.raises(torch_import.TorchImportError):
    torch_import.read_torch_file(str(tmp_path / "junk.pt"))
  with pytest.raises(torch_import.TorchImportError, match=r"no such file"):
    torch_import.read_torch_file(str(tmp_path / "missing.pt"))


# ------------------------------------------------------------------------------ mismatches

def _error(path, name, num_classes=10, channels=None) -> str:
  with pytest.raises(torch_import.TorchImportError) as info:
    torch_import.convert_state_dict(torch_import.load_state_dict(str(path))[0], name,
                                    num_classes, (32, 32, channels or _channels(name)),
                                    source=str(path))
  message = str(info.value)
  assert "\n" not in message
  return message


def test_wrong_architecture_names_the_first_mismatching_key(tmp_path):
  path = _save(_twin("resnet20"), tmp_path / "r20.pth")
  message = _error(path, "resnet8")
  assert "key 'layer1.1.conv1.weight' is unexpected" in message
  assert "the file matches --model resnet20 --num_classes 10 --input_shape 32,32,3" in message
  path = _save(_twin("wrn16_1"), tmp_path / "wrn.pth")
  message = _error(path, "wrn16_2")
  assert ("key 'block1.layer.0.conv1.weight' has shape (16, 16, 3, 3), wrn16_2 needs "
          "(32, 16, 3, 3)") in message
  assert "--model wrn16_1" in message
  path = _save(_twin("lenet5"), tmp_path / "lenet.pth")
  message = _error(path, "resnet8", channels=3)
  assert "key 'conv1.weight' has shape (6, 1, 5, 5), resnet8 needs (16, 3, 3, 3)" in message
  assert "--model lenet5 --num_classes 10 --input_shape 32,32,1" in message
  message = _error(path, "lenet5_bn")  # a BN variant: the first missing key
  assert "key 'bn1.weight' is missing" in message


def test_wrong_class_count_and_channels_name_the_fix(tmp_path):
  path = _save(_twin("resnet8", num_classes=100), tmp_path / "r8.pth")
  message = _error(path, "resnet8", num_classes=10)
  assert ("key 'fc.weight' has shape (100, 64), resnet8 needs (10, 64); the file has 100 "
          "classes: pass --num_classes 100") in message
  path = _save(_twin("lenet5_half"), tmp_path / "lenet.pth")
  message = _error(path, "lenet5_half", channels=3)
  assert "the file's first conv takes 1 input channels: pass --input_shape 32,32,1" in message


def test_non_finite_weights_are_refused():
  state = {k: v.numpy() for k, v in _twin("lenet5_half").state_dict().items()}
  state["conv2.weight"][0, 0, 0, 0] = np.nan
  with pytest.raises(torch_import.TorchImportError, match=r"'conv2.weight' holds non-finite"):
    torch_import.convert_state_dict(state, "lenet5_half", 10, (32, 32, 1))


# ---------------------------------------------------------------------------- command line

def test_cli_writes_the_model_with_its_normalisation(tmp_path, capsys):
  pytest.importorskip("torch")
  path = _save(_twin("lenet5_bn"), tmp_path / "lenet5_bn.pth")
  out = tmp_path / "teacher"
  code = torch_import.main([path, "--model", "lenet5_bn", "--num_classes", "10", "--input_shape",
                            "32,32,1", "--dataset", "mnist", "--mean", "0.5", "--std", "0.25",
                            "--out", str(out)])
  stdout = capsys.readouterr().out
  assert code == 0, stdout
  assert "max abs difference" in stdout and "-> OK" in stdout
  meta = json.loads((out / "model.json").read_text())
  assert meta["normalization"] == {"mean": [0.5], "std": [0.25]}
  assert (meta["model"], meta["num_classes"], meta["input_shape"]) == ("lenet5_bn", 10,
                                                                       [32, 32, 1])
  assert (meta["dataset"], meta["pad_to"], meta["data_dir"]) == ("mnist", 32, "")
  assert meta["source"] == os.path.abspath(path) and meta["test_accuracy"] is None
  # Without --mean/--std the dataset's normalisation is recorded.
  code = torch_import.main([path, "--model", "lenet5_bn", "--num_classes", "10", "--input_shape",
                            "32,32,1", "--dataset", "mnist", "--out", str(out), "--overwrite",
                            "--no_check"])
  assert code == 0
  meta = json.loads((out / "model.json").read_text())
  assert meta["normalization"] == {"mean": [0.1307], "std": [0.3081]}


@pytest.mark.parametrize("args,match", [
    (["--input_shape", "32,32"], "expected H,W,C"),
    (["--model", "vgg16"], "invalid choice"),
    (["--num_classes", "100", "--dataset", "cifar100"],
     "the file has 10 classes: pass --num_classes 10"),
    (["--dataset", "cifar100"], "dataset 'cifar100' has 100 classes"),
    (["--mean", "0.5,0.5"], "pass both --mean and --std"),
    (["--mean", "0.5,0.5", "--std", "0.5,0.5"], "need 3 values"),
    (["--checkpoint_is_missing"], "no such file"),
    (["--existing_out"], "already holds a model"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, capsys, args, match):
  pytest.importorskip("torch")
  path = _save(_twin("resnet8"), tmp_path / "r8.pth")
  out = tmp_path / "out"
  if args == ["--checkpoint_is_missing"]:
    args, path = [], str(tmp_path / "missing.pth")
  if args == ["--existing_out"]:
    args = []
    out.mkdir()
    (out / "model.json").write_text("{}")
  flags = {"--model": "resnet8", "--num_classes": "10", "--input_shape": "32,32,3",
           "--dataset": "cifar10", "--out": str(out)}
  flags.update(dict(zip(args[::2], args[1::2])))
  argv = [path, "--no_check"] + [item for flag in flags.items() for item in flag]
  code = torch_import.main(argv)
  err = capsys.readouterr().err
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], err


def test_cli_failed_logits_check_writes_nothing_and_exits_1(tmp_path, capsys, monkeypatch):
  pytest.importorskip("torch")
  path = _save(_twin("lenet5_half"), tmp_path / "lenet.pth")
  monkeypatch.setattr(torch_import, "CHECK_RTOL", -1.0)  # no difference can pass
  code = torch_import.main([path, "--model", "lenet5_half", "--num_classes", "10",
                            "--input_shape", "32,32,1", "--dataset", "mnist", "--out",
                            str(tmp_path / "out")])
  captured = capsys.readouterr()
  assert code == 1 and "-> FAILED" in captured.out
  assert captured.err.startswith("error: the converted lenet5_half differs from its PyTorch twin")
  assert len(captured.err.strip().splitlines()) == 1
  assert not (tmp_path / "out").exists()
