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
