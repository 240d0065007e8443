"""Test set-up: 8 fake CPU devices (before jax is imported) and a persistent compile cache."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/dfkd_jax/jax_tests"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def rng():
  return jax.random.key(0)


@pytest.fixture
def numerics_scope():
  """`numerics_scope(**fields)` scopes `dfkd_jax.numerics` settings until the test ends (each
  call nests inside the previous one)."""
  import contextlib  # pylint: disable=g-import-not-at-top
  from dfkd_jax import numerics  # pylint: disable=g-import-not-at-top
  with contextlib.ExitStack() as stack:
    yield lambda **fields: stack.enter_context(numerics.use(**fields))
