"""Tests of `dfkd_jax.numerics`: one explicit, scoped numerics object instead of module globals."""
import jax
import jax.numpy as jnp
import ml_collections
import pytest

from dfkd_jax import compile as compile_lib
from dfkd_jax import numerics
from dfkd_jax.models import conv as conv_lib


def test_environment_then_config_then_scope():
  env = {"DFKD_CONV_GRADS": "xla", "DFKD_XLA_CPU_YNN": "default"}
  assert numerics.Numerics.from_env(env) == numerics.Numerics("xla", "auto", "default")
  config = ml_collections.ConfigDict(
      {"numerics": {"conv_grads": "", "batch_norm": "xla", "xla_cpu_ynn": ""}})
  chosen = numerics.Numerics.from_config(config, env)
  assert chosen.to_dict() == {"conv_grads": "xla", "batch_norm": "xla", "xla_cpu_ynn": "default",
                              "upsample_conv": "direct"}
  assert numerics.Numerics.from_env({"DFKD_UPSAMPLE_CONV": "subpixel"}).upsample_conv == (
      "subpixel")
  config.numerics.upsample_conv = "subpixel"  # the config's block wins over the environment
  assert numerics.Numerics.from_config(config, {"DFKD_UPSAMPLE_CONV": "direct"}).upsample_conv == (
      "subpixel")
  # A config without the block (an older config.json) takes the environment's.
  assert numerics.Numerics.from_config(ml_collections.ConfigDict(), {}) == numerics.Numerics()


def test_bad_values_name_the_field_and_the_fix():
  with pytest.raises(ValueError, match=r"numerics.conv_grads.*'auto', 'canonical', 'xla'.*"
                     r"DFKD_CONV_GRADS"):
    numerics.Numerics.from_env({"DFKD_CONV_GRADS": "fast"})
  with pytest.raises(ValueError, match=r"numerics.upsample_conv.*'direct', 'subpixel'.*"
                     r"DFKD_UPSAMPLE_CONV"):
    numerics.Numerics(upsample_conv="winograd")
  config = ml_collections.ConfigDict({"numerics": {"conv_grad": "xla"}})
  with pytest.raises(ValueError, match=r"unknown fields \['conv_grad'\]"):
    numerics.Numerics.from_config(config, {})


def test_use_scopes_and_restores():
  outer = numerics.current()
  with numerics.use(conv_grads="xla") as n:
    assert numerics.current() is n and n.conv_grads == "xla"
    with numerics.use(batch_norm="xla"):
      assert numerics.current().to_dict()["conv_grads"] == "xla"
      assert numerics.current().batch_norm == "xla"
    assert numerics.current().batch_norm == outer.batch_norm
  assert numerics.current() == outer


def test_models_and_compiler_read_the_scoped_settings():
  x, w = jnp.ones((2, 6, 6, 4)), jnp.ones((3, 3, 4, 4))

  def grad_jaxpr():
    return str(jax.make_jaxpr(jax.grad(lambda w: jnp.sum(conv_lib.conv_general_dilated(
        x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))))(w))

  with numerics.use(conv_grads="xla"):
    assert "custom_vjp" not in grad_jaxpr()
  with numerics.use(conv_grads="canonical"):
    assert "custom_vjp" in grad_jaxpr()
  if jax.default_backend() == "cpu":
    with numerics.use(xla_cpu_ynn="default"):
      assert compile_lib.compiler_options() is None
    with numerics.use(xla_cpu_ynn="none"):
      assert compile_lib.compiler_options() == {compile_lib.YNN_OPTION: ""}
