"""Command lines: `python -m dfkd_jax.cli.main` (one run) and `python -m dfkd_jax.cli.demo`."""
import os

# The checkout this package runs from (its configs/ folder holds the shipped config files).
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
