"""Command lines: `python -m dfkd_jax.cli.main` (one run) and `python -m dfkd_jax.cli.demo`."""
import os

# The checkout this package runs from (when it runs from one).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# The shipped config files, installed with the package (`configs/` in a checkout links here).
CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def resolve_config(spec: str) -> str:
  """A `--config` value `path.py[:arg]` with its file found: an existing path is kept; a bare
  name (`fashion_mnist_lenet5[:arg]`) or a `configs/<name>.py` path that does not exist here
  names the shipped config of that name (so commands work after `pip install`, from any
  directory). Anything else is returned unchanged (the caller reports the missing file)."""
  path, sep, arg = spec.partition(":")
  if not path or os.path.isfile(path):
    return spec
  name = os.path.basename(path)
  bare = os.sep not in path and "/" not in path and not path.endswith(".py")
  if bare or os.path.dirname(os.path.normpath(path)) == "configs":
    shipped = os.path.join(CONFIGS_DIR, name if name.endswith(".py") else name + ".py")
    if os.path.isfile(shipped) and name not in ("common", "common.py", "__init__.py"):
      return shipped + sep + arg
  return spec


def resolve_config_argv(argv: list) -> list:
  """`argv` with its `--config=` value passed through `resolve_config`."""
  return [("--config=" + resolve_config(a[len("--config="):])) if a.startswith("--config=")
          else a for a in argv]
