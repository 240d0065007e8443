"""Models named by import path ('package.module:Attr'): a user's own Flax classifier in every
mode, without registering anything."""
import json
import os
import sys
import textwrap

import jax
import jax.numpy as jnp
import pytest

import helpers
from dfkd_jax import models
from dfkd_jax import train

USER_MODULE = textwrap.dedent('''
    import flax.linen as nn
    import jax.numpy as jnp

    class TinyNet(nn.Module):
      """Plain logits, flax BatchNorm, a `train` argument."""
      num_classes: int
      width: int = 8

      @nn.compact
      def __call__(self, x, train: bool = False):
        x = nn.Conv(self.width, (3, 3), strides=2)(x)
        x = nn.BatchNorm(use_running_average=not train)(x)
        x = nn.relu(x)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.num_classes)(x)

    class WithAux(nn.Module):
      """The library's contract: (logits, {"feature", "stages"}); no `train` argument."""
      num_classes: int

      @nn.compact
      def __call__(self, x):
        h = nn.relu(nn.Conv(4, (3, 3))(x))
        f = jnp.mean(h, axis=(1, 2))
        return nn.Dense(self.num_classes)(f), {"feature": f, "stages": (h,)}

    def make_tiny(num_classes):
      return TinyNet(num_classes=num_classes, width=4)

    NOT_A_MODEL = 3

    def returns_junk(num_classes):
      return "junk"
''')


@pytest.fixture()
def user_module(tmp_path, monkeypatch):
  name = f"user_models_{os.getpid()}_{len(sys.modules)}"
  (tmp_path / f"{name}.py").write_text(USER_MODULE)
  monkeypatch.syspath_prepend(str(tmp_path))
  return name


def _apply(model, train=False):
  x = jnp.ones((2, 32, 32, 1))
  variables = model.init(jax.random.key(0), x, train=False)
  if train:
    return model.apply(variables, x, train=True, mutable=["batch_stats"])[0], variables
  return model.apply(variables, x, train=False), variables


@pytest.mark.parametrize("attr", ["TinyNet", "make_tiny", "WithAux"])
def test_a_module_by_import_path_follows_the_contract(user_module, attr):
  model = models.get_model(f"{user_module}:{attr}", num_classes=10)
  (logits, aux), variables = _apply(model)
  assert logits.shape == (2, 10) and aux["feature"].shape[0] == 2 and len(aux["stages"]) >= 1
  assert list(variables["params"]) == ["net"]
  if attr != "WithAux":  # BatchNorm statistics live in batch_stats and move in training mode
    (_, _), _ = _apply(model, train=True)
    assert "batch_stats" in variables


@pytest.mark.parametrize("path,fragment", [
    ("no_such_module_xyz:Net", "cannot import 'no_such_module_xyz'"),
    ("{m}:Missing", "has no attribute 'Missing'"),
    ("{m}:NOT_A_MODEL", "not a module class"),
    ("{m}:returns_junk", "not a Flax Linen module"),
    (":Net", "must have the form"),
])
def test_bad_import_paths_say_what_is_wrong(user_module, path, fragment):
  with pytest.raises(ValueError, match=fragment):
    _apply(models.get_model(path.format(m=user_module), num_classes=10))


@pytest.mark.slow
def test_own_teacher_and_student_by_import_path_train_distill_and_evaluate(user_module,
                                                                          tmp_path):
  """A teacher of the user's class trained, a student of another user class distilled from it
  data-free, and the student re-evaluated from its folder alone: no registration anywhere."""
  helpers.require_fashion_mnist()
  teacher_dir = tmp_path / "teacher"
  config = helpers.tiny_teacher_config()
  config.teacher.model = f"{user_module}:TinyNet"
  s = train.train_and_evaluate(config, str(teacher_dir))
  meta = json.load(open(teacher_dir / "model.json"))
  assert meta["model"] == f"{user_module}:TinyNet" and 0.0 <= s["test_accuracy"] <= 100.0
  config = helpers.load_config(f"{helpers.TEACHER_CONFIG}:method=dfad,tiny,"
                               f"teacher_workdir={teacher_dir}")
  config.teacher.model = f"{user_module}:TinyNet"
  config.student.model = f"{user_module}:make_tiny"
  student_dir = tmp_path / "student"
  summary = train.train_and_evaluate(config, str(student_dir))
  from dfkd_jax.cli import main as cli_main  # pylint: disable=g-import-not-at-top
  again = cli_main.evaluate(str(student_dir), str(teacher_dir), limit=config.test_limit)
  assert again["accuracy"] == pytest.approx(summary["final"], abs=1e-6)
  assert again["model"] == f"{user_module}:make_tiny"
