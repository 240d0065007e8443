r"""Per-op profile of the library's jitted outer step, and conv gradients in loops (JAX only).

  python benchmarks/profile_step.py --profile deepinversion [--pair lenet|resnet] [--batch 128]
      [--di_iters 20] [--di_student_steps 10] [--conv_grads auto|canonical|xla]
  python benchmarks/profile_step.py --conv_loop_demo [--conv_grads ...]

(`python benchmarks/compare_torch.py --profile ...` and `--conv_loop_demo` forward here.)

`--profile METHOD`: a `jax.profiler` trace of 3 iterations of the step that
benchmarks/compare_torch.py times (same config, budgets and random teacher), XLA:CPU thunk times
summed by name and joined to their HLO instructions; prints a markdown table of the top ops and
the time by kind (canonical / non-canonical convolutions, max-pools, other).

`--conv_loop_demo` times a ResNet-8 training step in a `lax.scan` with JAX's own conv gradients
(`xla`) and with the library's (`auto`). `--conv_grads xla` gives the profiled step JAX's own
convolution gradients instead of the library's CPU-fast ones (`dfkd_jax.models.conv`).

Imports benchmarks/torch_ref for the shared JAX setup, so it needs PyTorch too:
`pip install -e '.[bench]'`.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import functools
import os
import platform
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

try:  # torch_ref sets OMP_WAIT_POLICY before it imports torch
  from torch_ref.models import IMAGE_SHAPE, NUM_CLASSES  # noqa: E402
except ImportError as e:  # pragma: no cover
  raise SystemExit(f"profile_step.py: {e}") from e

from torch_ref.parity import PAIRS, jax_config, jax_setup  # noqa: E402
from dfkd_jax import models  # noqa: E402
from dfkd_jax import numerics as numerics_lib  # noqa: E402
from dfkd_jax import state as state_lib  # noqa: E402


# ============================================================================ profile


def profile_jax(method, args, iterations: int = 3, top: int = 15) -> str:
  """Per-op profile of the library's jitted step: a `jax.profiler` trace of `iterations` steps,
  XLA:CPU thunk times summed by name and joined to their HLO instructions (convolution
  dimension labels: `b01f_01io->b01f` is the canonical NHWC/HWIO form). Returns markdown."""
  import collections  # pylint: disable=g-import-not-at-top
  import glob  # pylint: disable=g-import-not-at-top
  import gzip  # pylint: disable=g-import-not-at-top
  import json  # pylint: disable=g-import-not-at-top
  import re  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  import chex  # pylint: disable=g-import-not-at-top
  step, state = jax_setup(step_config(method, args), pair=args.pair)
  for _ in range(2):
    state, m = step(state)
    jax.block_until_ready((state, m))
  chex.clear_trace_counter()
  hlo = step.lower(state).compile().as_text()
  with tempfile.TemporaryDirectory() as tmp:
    t0 = time.perf_counter()
    with jax.profiler.trace(tmp, create_perfetto_trace=True):
      for _ in range(iterations):
        state, m = step(state)
        jax.block_until_ready((state, m))
    wall = (time.perf_counter() - t0) / iterations
    path = glob.glob(os.path.join(tmp, "**", "perfetto_trace.json.gz"), recursive=True)[0]
    with gzip.open(path) as f:
      events = json.load(f)
  events = events["traceEvents"] if isinstance(events, dict) else events
  # HLO instructions (and the computations they call) by name.
  defs, bodies, current = {}, collections.defaultdict(list), None
  for line in hlo.splitlines():
    head = re.match(r"^(?:ENTRY )?%([\w.\-]+) ", line)
    if head and line.rstrip().endswith("{"):
      current = head.group(1)
    inst = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\(.*?\)|\S+) ([\w-]+)\(", line)
    if inst:
      defs[inst.group(1)] = line
      if current:
        bodies[current].append(line)
  total, count = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") == "X" and e.get("name") in defs:
      total[e["name"]] += e.get("dur", 0)
      count[e["name"]] += 1
  all_ops = sum(total.values())

  def describe(name):
    line = defs[name]
    inst = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = (\(.*?\)|\S+) ([\w-]+)\(", line)
    shape, op = re.sub(r"\{[^}]*\}", "", inst.group(1)), inst.group(2)
    conv_lines = [line] if op == "convolution" else []
    called = re.search(r"calls=%([\w.\-]+)", line)
    if called:
      conv_lines += [b for b in bodies.get(called.group(1), []) if " convolution(" in b]
    convs = []
    for c in conv_lines:
      window = re.search(r"window=\{([^}]*)\}", c)
      labels = re.search(r"dim_labels=([\w>-]+)", c)
      convs.append(f"conv {window.group(1) if window else ''} {labels.group(1) if labels else ''}")
    meta = re.search(r'op_name="([^"]*)"', line)
    where = meta.group(1).replace("jit(step)/", "") if meta else ""
    return f"{op} {shape}", "; ".join(convs), where[-70:]

  lines = [f"JAX step of {method}: {wall:.3f} s per iteration under the profiler; XLA ops "
           f"{all_ops / iterations / 1e3:.0f} ms per iteration (threads overlap).", "",
           "| op | ms / iteration | calls / iteration | share | HLO | convolution | source |",
           "|---|---|---|---|---|---|---|"]
  for name, dur in total.most_common(top):
    op, conv, where = describe(name)
    lines.append(f"| {name} | {dur / iterations / 1e3:.1f} | {count[name] / iterations:.0f} | "
                 f"{100 * dur / all_ops:.1f}% | {op} | {conv} | {where} |")
  by_kind = collections.Counter()
  for name, dur in total.items():
    op, conv, _ = describe(name)
    if conv:
      kind = "canonical conv" if all("b01f_01io->b01f" in c for c in conv.split("; ")) else (
          "non-canonical conv")
    elif "reduce_window" in defs[name] or "select_and_scatter" in defs[name] or (
        "reduce-window" in name or "scatter" in name):
      kind = "max-pool (reduce-window / select-and-scatter)"
    else:
      kind = "other"
    by_kind[kind] += dur
  lines += ["", "By kind: " + "; ".join(f"{k} {v / iterations / 1e3:.0f} ms "
                                        f"({100 * v / all_ops:.0f}%)"
                                        for k, v in by_kind.most_common()) + "."]
  return "\n".join(lines)


# ============================================================================ conv grads in loops

# XLA:CPU canonicalises convolutions to NHWC/HWIO (its fast Eigen kernels) only in the entry
# computation, not in while-loop bodies, and JAX's gradient convolutions are not canonical: inside
# a `lax.scan` they ran 6-27x slower (benchmarks/RESULTS.md). The library's models therefore use
# `dfkd_jax.models.conv`, which emits canonical gradients itself on CPU; `--conv_grads xla`
# restores JAX's own (the state before issue 6) for comparisons, and `--conv_loop_demo` times
# both on a ResNet-8 training step in a scan.


def conv_loop_demo(model: str = "resnet8", batch: int = 64, steps: int = 4):
  """SGD on `model`'s parameters: one jitted step vs `steps` steps in a `lax.scan`, with JAX's
  own conv gradients (`xla`) and the library's (`auto`). Returns rows (mode, 1 step s, scan s,
  loss)."""
  import optax  # pylint: disable=g-import-not-at-top
  module = models.get_model(model, num_classes=NUM_CLASSES)
  params, bs = state_lib.init_model(module, jax.random.key(0), jnp.zeros((1, *IMAGE_SHAPE)))
  x = jax.random.normal(jax.random.key(1), (batch, *IMAGE_SHAPE))
  y = jnp.arange(batch) % NUM_CLASSES

  def make_sgd_step():  # a fresh function per variant: lax.scan caches traces by function
    def sgd_step(carry, _):
      def loss_fn(p):
        (logits, _), new = module.apply({"params": p, "batch_stats": carry[1]}, x, train=True,
                                        mutable=["batch_stats"])
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), new
      (loss, new), g = jax.value_and_grad(loss_fn, has_aux=True)(carry[0])
      return (jax.tree.map(lambda a, b: a - 0.01 * b, carry[0], g), new["batch_stats"]), loss
    return sgd_step

  def timed(fn, reps):
    jax.block_until_ready(fn((params, bs)))
    times, out = [], None
    for _ in range(reps):
      t0 = time.perf_counter()
      out = jax.block_until_ready(fn((params, bs)))
      times.append(time.perf_counter() - t0)
    return statistics.median(times), out

  rows = []
  for variant in ("xla", "auto"):
    with numerics_lib.use(conv_grads=variant):
      sgd_step = make_sgd_step()
      one, _ = timed(jax.jit(functools.partial(sgd_step, _=None)), 3)
      loop, out = timed(jax.jit(functools.partial(jax.lax.scan, sgd_step, xs=None,
                                                  length=steps)), 2)
    rows.append((variant, one, loop, float(out[1][-1])))
  return rows


def machine() -> str:
  return (f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} "
          f"cores, jax {jax.__version__} ({jax.devices()[0].platform})")


def add_step_flags(p: argparse.ArgumentParser):
  """The flags that choose the JAX step (shared with benchmarks/compare_torch.py)."""
  p.add_argument("--pair", default="lenet", choices=sorted(PAIRS),
                 help="teacher -> student: lenet (configs/fashion_mnist_lenet5.py) or resnet "
                 "(ResNet-20 -> ResNet-8, configs/fashion_mnist_resnet20.py)")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--di_iters", type=int, default=20, help="DeepInversion pixel steps per round")
  p.add_argument("--di_student_steps", type=int, default=10,
                 help="DeepInversion student steps per round")
  p.add_argument("--conv_grads", default=numerics_lib.current().conv_grads,
                 choices=numerics_lib.CONV_GRADS,
                 help="dfkd_jax.models.conv gradient mode of the JAX side (xla: JAX's own)")
  p.add_argument("--upsample_conv", default=numerics_lib.current().upsample_conv,
                 choices=numerics_lib.UPSAMPLE_CONV,
                 help="the generators' x2 upsampling + 3x3 conv (dfkd_jax.numerics): direct or "
                 "subpixel (default: DFKD_UPSAMPLE_CONV, else direct)")
  p.add_argument("--config_arg", default="",
                 help="more config-string arguments, e.g. faithful (PRE-DFKD's official quirks)")
  p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                 help="config override applied last, e.g. --set generator.ngf=64 (repeatable)")


def step_config(method: str, args):
  """The JAX config of `method` chosen by the flags of `add_step_flags`."""
  return jax_config(method, batch=args.batch, di_iters=args.di_iters,
                    di_student_steps=args.di_student_steps, pair=args.pair,
                    config_arg=args.config_arg, overrides=args.set)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--profile", default="", metavar="METHOD",
                 help="print a per-op profile of this method's JAX step")
  p.add_argument("--conv_loop_demo", action="store_true",
                 help="time ResNet-8 parameter gradients in a lax.scan with JAX's and with "
                 "the library's conv gradients")
  add_step_flags(p)
  args = p.parse_args(argv)
  if not args.profile and not args.conv_loop_demo:
    p.error("nothing to do: give --profile METHOD and/or --conv_loop_demo")
  # The JAX side's numerics for the rest of this process (a script, not a library call).
  numerics_scope = contextlib.ExitStack()  # held until main returns: a dropped stack
  # would close the scope at once (the generator of `use` is finalised with it)
  numerics_scope.enter_context(numerics_lib.use(conv_grads=args.conv_grads,
                                                       upsample_conv=args.upsample_conv))
  print(f"Machine: {machine()}; date {datetime.date.today()}; command: python "
        + " ".join(sys.argv), flush=True)
  if args.profile:
    print("\n" + profile_jax(args.profile, args), flush=True)
  if args.conv_loop_demo:
    print("\n| conv gradients | 1 jitted step (s) | 4 steps in lax.scan (s) | per step vs jitted | "
          "loss after the scan |\n|---|---|---|---|---|")
    for variant, one, loop, loss in conv_loop_demo():
      print(f"| {variant} | {one:.3f} | {loop:.3f} | {loop / 4 / one:.1f}x | {loss:.7f} |",
            flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
