"""Tests of `dfkd_jax.compile`: per-compilation XLA:CPU options for the library's steps."""

import os

import jax
import jax.numpy as jnp
import pytest

from dfkd_jax import compile as compile_lib

_CPU = jax.default_backend() == "cpu"


def _conv_grad(x, w):
  def loss(w):
    y = jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"))
    return jnp.sum(y * y)
  return jax.grad(loss)(w)


@pytest.mark.skipif(not _CPU, reason="CPU-only options")
def test_default_options_turn_ynnpack_off(numerics_scope):
  numerics_scope(xla_cpu_ynn="none")
  assert compile_lib.compiler_options() == {compile_lib.YNN_OPTION: ""}
  x, w = jnp.ones((8, 16, 16, 32)), jnp.ones((3, 3, 32, 32))
  fn = compile_lib.jit(_conv_grad)
  text = fn.lower(x, w).compile().as_text()
  assert "ynn_fusion" not in text
  # Same numbers as XLA's defaults.
  assert jnp.allclose(fn(x, w), jax.jit(_conv_grad)(x, w), rtol=1e-5)


def test_default_value_keeps_xla_defaults(numerics_scope):
  numerics_scope(xla_cpu_ynn="default")
  assert compile_lib.compiler_options() is None


@pytest.mark.skipif(not _CPU, reason="CPU-only options")
def test_rejected_option_warns_and_falls_back(numerics_scope):
  numerics_scope(xla_cpu_ynn="NOT_A_FUSION_TYPE")
  with pytest.warns(UserWarning, match="DFKD_XLA_CPU_YNN=default"):
    assert compile_lib.compiler_options() is None
  fn = compile_lib.jit(lambda a: a * 2)
  assert float(fn(jnp.float32(3))) == 6.0


def test_explicit_compiler_options_win():
  fn = compile_lib.jit(lambda a: a + 1, compiler_options=None)
  assert float(fn(1.0)) == 2.0


@pytest.mark.skipif(not _CPU, reason="CPU-only options")
def test_generator_gradient_close_to_float64(numerics_scope):
  """The library's options must not cost accuracy: a DAFL generator's parameter gradient
  (through BNs, upsampling and the canonical conv gradients) agrees with a float64 evaluation
  of the same program (measured: 2.4e-6 relative (L2 over all parameters) with the library's
  options, 4.2e-7 with XLA's defaults: both are float32 rounding, they only round differently)."""
  from dfkd_jax import models  # pylint: disable=g-import-not-at-top
  numerics_scope(xla_cpu_ynn="none")
  gen = models.Generator(img_size=32, channels=1, ngf=16)
  z = jax.random.normal(jax.random.key(0), (16, 32))
  variables = gen.init(jax.random.key(1), z, train=True)
  cotangent = jax.random.normal(jax.random.key(2), (16, 32, 32, 1))

  def grads(dtype, jit):
    def loss(params):
      out, _ = gen.clone(dtype=dtype).apply({**variables, "params": params}, z.astype(dtype),
                                            train=True, mutable=["batch_stats"])
      return jnp.sum(out.astype(dtype) * cotangent.astype(dtype))
    params = jax.tree.map(lambda p: p.astype(dtype), variables["params"])
    return jax.tree.leaves(jit(jax.grad(loss))(params))

  def rel_err(got, want):
    got, want = (jnp.concatenate([jnp.ravel(g) for g in t]) for t in (got, want))
    return float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))

  shipped = grads(jnp.float32, compile_lib.jit)
  with jax.enable_x64(True):
    reference = [g.astype(jnp.float32) for g in grads(jnp.float64, jax.jit)]
  assert rel_err(shipped, reference) < 1e-4


def test_a_rerun_loads_its_steps_from_the_persistent_cache(tmp_path):
  """config.compile_cache: the first run stores its compiled steps, an identical re-run finds
  them all (no new entries) and computes the same numbers."""
  import json  # pylint: disable=g-import-not-at-top
  import os  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  helpers.require_fashion_mnist()
  cache = tmp_path / "cache"
  env = helpers.cli_env(DFKD_COMPILE_CACHE=str(cache))
  env.pop("JAX_COMPILATION_CACHE_DIR", None)

  def run(workdir, *flags):
    p = subprocess.run(helpers.cli_command(
        "dfkd_jax.cli.main", f"--config={helpers.TEACHER_CONFIG}:method=teacher,tiny",
        "--config.num_steps=4", f"--workdir={workdir}", *flags), cwd=helpers.REPO_ROOT,
        env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-1500:]
    with open(workdir / "summary.json", encoding="utf-8") as f:
      return json.load(f)

  first = run(tmp_path / "a")
  entries = set(os.listdir(cache))
  assert any(e.startswith("jit_wrapped") for e in entries), entries  # the training step
  second = run(tmp_path / "b")
  assert set(os.listdir(cache)) == entries
  assert second["test_accuracy"] == first["test_accuracy"]


def test_cache_off_changes_nothing(monkeypatch, tmp_path):
  monkeypatch.setenv(compile_lib.CACHE_ENV, str(tmp_path / "cache"))
  before = jax.config.jax_compilation_cache_dir
  assert compile_lib.enable_cache("off") is None
  assert jax.config.jax_compilation_cache_dir == before
  assert not (tmp_path / "cache").exists()


_SCHEDULER_PROBE = """
import os, sys
from dfkd_jax import compile as compile_lib
in_effect = compile_lib.memory_scheduler()
import jax, jax.numpy as jnp
late = compile_lib.memory_scheduler()  # the backends have started: too late to change
def many(x):  # eight independent products: the concurrency scheduler keeps them all alive
  return sum(jnp.tanh((x + i) @ x) for i in range(8))
temp = jax.jit(many).lower(jnp.ones((256, 256))).compile().memory_analysis().temp_size_in_bytes
print(in_effect, late, temp, os.environ.get("XLA_FLAGS", ""))
"""


@pytest.mark.skipif(not _CPU, reason="XLA:CPU scheduler")
def test_memory_scheduler_is_a_process_setting_that_keeps_the_users_choice():
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  def probe(xla_flags):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    if xla_flags is not None:
      env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", _SCHEDULER_PROBE], env=env, check=True,
                         capture_output=True, text=True, timeout=120).stdout.split(maxsplit=3)
    return out[0] == "True", out[1] == "True", int(out[2]), (out[3:] or [""])[0].strip()

  ours = probe(None)
  assert ours[:2] == (True, True) and ours[3] == f"--{compile_lib.SCHEDULER_FLAG}=false"
  xla_default = probe(f"--{compile_lib.SCHEDULER_FLAG}=true")  # the user's choice is kept
  assert xla_default[:2] == (False, False)
  assert xla_default[3] == f"--{compile_lib.SCHEDULER_FLAG}=true"
  assert ours[2] < xla_default[2], (ours, xla_default)
