r"""Supervised (teacher) training throughput on Fashion-MNIST: compile time and images/s.

  python benchmarks/bench_teacher.py --models lenet5_bn,resnet18 --batch 128 --steps 20

Runs `supervised.make_train_step` on the real (prepared) Fashion-MNIST train split padded to
32x32; median of timed steps after one warm-up.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dfkd_jax.cli import demo  # noqa: E402
from dfkd_jax import models  # noqa: E402
from dfkd_jax import optim  # noqa: E402
from dfkd_jax import parallel  # noqa: E402
from dfkd_jax import state as state_lib  # noqa: E402
from dfkd_jax.train import supervised  # noqa: E402
from dfkd_jax.data import datasets  # noqa: E402

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--models", default="lenet5_bn,resnet20,resnet18")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--steps", type=int, default=10)
  args = p.parse_args()
  import bench_steps  # pylint: disable=g-import-not-at-top
  print(f"Machine: {bench_steps.machine()}; date {datetime.date.today()}; command: python "
        + " ".join(sys.argv), flush=True)
  x, y = datasets.load_split("fashion_mnist", "train", pad_to=32)
  mesh = parallel.make_mesh()
  images, labels = parallel.replicate(jnp.asarray(x), mesh), parallel.replicate(jnp.asarray(y),
                                                                                mesh)
  print("\n| model | params | batch | compile (s) | median step (s) | images/s | epoch (s) |\n"
        "|---|---|---|---|---|---|---|", flush=True)
  for name in args.models.split(","):
    config = demo.load_config(os.path.join(ROOT, "configs/fashion_mnist_lenet5.py"),
                              "method=teacher")
    config.batch_size = args.batch
    module = models.get_model(name, num_classes=10)
    params, bs = state_lib.init_model(module, jax.random.key(0), jnp.asarray(x[:1]))
    tx = optim.make_optimizer(config.optimizer, 1000)
    st = supervised.SupervisedState(
        step=jnp.zeros((), jnp.int32), rng=jax.random.key(1),
        model=state_lib.TrainState.create(apply_fn=module.apply, params=params, batch_stats=bs,
                                          tx=tx))
    st = parallel.replicate(st, mesh)
    spe = x.shape[0] // args.batch
    step = jax.jit(supervised.make_train_step(config, mesh, spe), donate_argnums=0)
    perm = jnp.arange(x.shape[0], dtype=jnp.int32)
    t0 = time.perf_counter()
    st, m = step(st, images, labels, perm)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    st, m = step(st, images, labels, perm)
    jax.block_until_ready(m)
    times = []
    for _ in range(args.steps):
      t0 = time.perf_counter()
      st, m = step(st, images, labels, perm)
      jax.block_until_ready(m)
      times.append(time.perf_counter() - t0)
    med = statistics.median(times)
    print(f"| {name} | {state_lib.num_params(params):,} | {args.batch} | {compile_s:.1f} | "
          f"{med:.4f} | {args.batch / med:.0f} | {spe * med:.0f} |", flush=True)


if __name__ == "__main__":
  main()
