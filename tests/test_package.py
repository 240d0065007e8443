"""Package-level checks: every module imports, the public API exists, imports have no side effects."""
import importlib
import pkgutil
import subprocess
import sys

import dfkd_jax


def test_every_module_imports():
  names = [m.name for m in pkgutil.walk_packages(dfkd_jax.__path__, "dfkd_jax.")]
  assert len(names) > 20
  for name in names:
    importlib.import_module(name)


def test_public_functional_ops():
  for name in ("kd_kl", "dafl_kd", "kl_elem", "l1_logits", "js_adv", "dafl_oh", "dafl_ie",
               "dafl_act", "tv_l2", "img_l2", "attention_transfer", "bn_l2", "bn_gauss_kl",
               "capture_bn_inputs", "jitter_flip", "diff_augment", "sequence", "repeat",
               "train_and_evaluate"):
    fn = getattr(dfkd_jax, name)
    assert callable(fn) and fn.__doc__, name


def test_import_has_no_side_effects():
  code = ("import jax; before = dict(jax.config.values); import dfkd_jax, sys; "
          "after = dict(jax.config.values); "
          "assert before == after, set(k for k in after if before.get(k) != after[k]); "
          "assert 'tensorflow' not in sys.modules; print('ok')")
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=False)
  assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


# The layers of the package, lowest first (README "Development"): a module may import from its
# own layer and the ones before it, never from a later one.
_LAYERS = ("core", "data", "models", "ops", "phases", "methods", "io", "condensation", "train",
           "cli", "configs")


def _layer(module: str) -> str:
  """'dfkd_jax.ops.losses' -> 'ops'; flat modules ('dfkd_jax.state') are the core."""
  parts = module.split(".")
  return parts[1] if len(parts) > 2 or parts[1] in _LAYERS else "core"


def test_layers_import_only_from_lower_layers():
  import ast  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  root = os.path.dirname(dfkd_jax.__file__)
  violations, folders = [], set()
  for dirpath, _, files in os.walk(root):
    for fname in files:
      if not fname.endswith(".py"):
        continue
      rel = os.path.relpath(os.path.join(dirpath, fname), os.path.dirname(root))
      module = rel[:-3].replace(os.sep, ".").removesuffix(".__init__")
      if module == "dfkd_jax":
        continue  # the package's front door re-exports from every layer
      here = _layer(module)
      folders.add(here)
      tree = ast.parse(open(os.path.join(dirpath, fname), encoding="utf-8").read())
      for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("dfkd_jax"):
          targets = [node.module] if node.module != "dfkd_jax" else [
              f"dfkd_jax.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
          targets = [a.name for a in node.names if a.name.startswith("dfkd_jax.")]
        for target in targets:
          there = _layer(target)
          if _LAYERS.index(there) > _LAYERS.index(here):
            violations.append(f"{module} ({here}) imports {target} ({there})")
  assert folders == set(_LAYERS), folders
  assert not violations, violations
