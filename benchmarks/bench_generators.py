r"""The generator and VAE parts of a PRE-DFKD step, timed apart, with each upsampling mode.

  python benchmarks/bench_generators.py [--batch 256] [--vae_batch 160] [--ngf 64]
      [--latent 1000] [--image 32x32x1] [--repeats 5] [--modes direct,subpixel]

For each `numerics.upsample_conv` mode: PRE-DFKD's novel generator (spectral norm, U(+-0.08)
weights, batch statistics) forward and forward + backward (the parameter gradient of a scalar
loss) at `--batch`, and the VAE's encoder and decoder forward + backward at `--vae_batch`
(PRE-DFKD trains the VAE on `vae_input + memory_batch` images: 128 + 32 at the issue-16
configuration). Each function is compiled with the library's `compile.jit`; the table gives the
median of `--repeats` calls, XLA's FLOP count and its temporary buffers. Needs no PyTorch.
"""
from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from dfkd_jax import compile as compile_lib  # noqa: E402

compile_lib.memory_scheduler()  # as the command lines do, before JAX starts its backends

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from dfkd_jax import numerics as numerics_lib  # noqa: E402
from dfkd_jax.models import generators  # noqa: E402
from dfkd_jax.models import vae as vae_lib  # noqa: E402


def measure(fn, args, repeats: int) -> dict:
  """Median seconds of `repeats` calls of `compile.jit(fn)(*args)`, XLA's FLOPs and temp bytes."""
  jitted = compile_lib.jit(fn)
  compiled = jitted.lower(*args).compile()
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  jax.block_until_ready(compiled(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(*args))
    times.append(time.perf_counter() - t0)
  return {"s": statistics.median(times), "flops": (cost or {}).get("flops"),
          "temp": compiled.memory_analysis().temp_size_in_bytes}


def parts(args) -> dict[str, tuple]:
  """name -> (function, arguments) of the measured parts, traced under the current numerics."""
  h, w, c = args.image
  gen = generators.Generator(img_size=h, channels=c, ngf=args.ngf, spectral_norm=True,
                             weight_init="uniform008")
  z = jax.random.normal(jax.random.key(0), (args.batch, args.latent))
  gvars = gen.init(jax.random.key(1), z)

  def gen_forward(variables, z):
    return gen.apply(variables, z, mutable=["batch_stats", "spectral_norm"])[0]

  def gen_loss(params, z):
    return jnp.sum(jnp.square(gen_forward({**gvars, "params": params}, z)))

  vae = vae_lib.VAE(img_size=h, channels=c, latent_dim=args.latent, ngf=args.ngf,
                    normalize="height")
  x = jax.random.normal(jax.random.key(2), (args.vae_batch, h, w, c))
  vvars = vae.init(jax.random.key(3), x, jax.random.key(4))
  zv = jax.random.normal(jax.random.key(5), (args.vae_batch, args.latent))

  def encoder_loss(params, x):
    (mu, logvar), _ = vae.apply({**vvars, "params": params}, x, method="encode",
                                mutable=["batch_stats"])
    return jnp.sum(jnp.square(mu)) + jnp.sum(logvar)

  def decoder_loss(params, z):
    out, _ = vae.apply({**vvars, "params": params}, z, method="decode", mutable=["batch_stats"])
    return jnp.sum(jnp.square(out))

  return {
      f"generator forward (batch {args.batch})": (gen_forward, (gvars, z)),
      f"generator forward + backward (batch {args.batch})": (jax.grad(gen_loss),
                                                              (gvars["params"], z)),
      f"VAE encoder forward + backward (batch {args.vae_batch})": (jax.grad(encoder_loss),
                                                                   (vvars["params"], x)),
      f"VAE decoder forward + backward (batch {args.vae_batch})": (jax.grad(decoder_loss),
                                                                   (vvars["params"], zv)),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=256)
  p.add_argument("--vae_batch", type=int, default=160)
  p.add_argument("--ngf", type=int, default=64)
  p.add_argument("--latent", type=int, default=1000)
  p.add_argument("--image", default="32x32x1", help="HxWxC")
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--modes", default=",".join(numerics_lib.UPSAMPLE_CONV))
  args = p.parse_args(argv)
  args.image = tuple(int(v) for v in args.image.split("x"))
  modes = args.modes.split(",")
  for mode in modes:
    if mode not in numerics_lib.UPSAMPLE_CONV:
      p.error(f"--modes: {mode!r} is not one of {numerics_lib.UPSAMPLE_CONV}")
  print(f"Machine: {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()}); date "
        f"{datetime.date.today()}; command: python " + " ".join(sys.argv), flush=True)
  print("\n| part | upsample_conv | median (ms) | GFLOP | GFLOP/s | XLA temp (MiB) |\n"
        "|---|---|---|---|---|---|", flush=True)
  for mode in modes:
    with numerics_lib.use(upsample_conv=mode):
      for name, (fn, fn_args) in parts(args).items():
        r = measure(fn, fn_args, args.repeats)
        gflop = r["flops"] / 1e9 if r["flops"] else float("nan")
        print(f"| {name} | {mode} | {1e3 * r['s']:.0f} | {gflop:.3g} | {gflop / r['s']:.0f} | "
              f"{r['temp'] / 2 ** 20:.1f} |", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
