"""bench_steps: the FLOP count of a step with a while loop is flagged as a lower bound."""
import os
import sys

import helpers
import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.join(helpers.REPO_ROOT, "benchmarks"))
import bench_steps  # noqa: E402  pylint: disable=g-import-not-at-top


def test_a_scanned_loop_is_detected_and_xla_counts_its_body_once():
  x = jnp.ones((32, 32))
  scanned = jax.jit(lambda x: jax.lax.scan(lambda c, _: (c @ c, None), x, None, length=4)[0])
  plain = jax.jit(lambda x: x @ x)
  loop, once = scanned.lower(x).compile(), plain.lower(x).compile()
  assert bench_steps.has_while_loop(loop.as_text())
  assert not bench_steps.has_while_loop(once.as_text())
  # why the flag exists: four matrix products counted as about one
  assert loop.cost_analysis()["flops"] < 2 * once.cost_analysis()["flops"]


def test_the_prngs_own_loops_do_not_count():
  """jax.random's threefry lowers to while loops on CPU; they hold no FLOPs the count misses."""
  sample = jax.jit(lambda k: jax.random.normal(jax.random.fold_in(k, 3), (64, 8)) @ jnp.ones((8, 8)))
  assert not bench_steps.has_while_loop(sample.lower(jax.random.key(0)).compile().as_text())


def test_numerics_flags_stay_in_force_for_every_row():
  """The script scopes --conv_grads / --upsample_conv for the whole run (a scope entered on a
  discarded ExitStack used to close at once, so the flags were silently ignored)."""
  import subprocess  # pylint: disable=g-import-not-at-top
  cmd = [sys.executable, os.path.join(helpers.REPO_ROOT, "benchmarks", "bench_steps.py"),
         "--pairs", "lenet", "--methods", "dafl", "--batch", "8", "--repeats", "1",
         "--conv_grads", "xla", "--upsample_conv", "subpixel", "--devices", "8"]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=600,
                       env=helpers.cli_env()).stdout  # the tests' 8 fake devices
  assert "'conv_grads': 'xla'" in out and "'upsample_conv': 'subpixel'" in out, out
  row = next(line for line in out.splitlines() if line.startswith("| lenet5_bn"))
  assert row.split(" | ")[5] == "xla", row
