"""Data parallelism with `jax.jit` over a device `Mesh` with one `data` axis.

State is replicated; batches (real or synthetic) are sharded along their leading axis. Under
jit, BatchNorm statistics over a sharded batch are global-batch statistics with no explicit
collective (XLA inserts the reductions).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` local devices (all by default)."""
  devices = jax.local_devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"config asks for {num_devices} devices but only {len(devices)} are "
                       "available; set num_devices <= that (or 0 for all).")
    devices = devices[:num_devices] if num_devices > 0 else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading axis split over the `data` axis."""
  return NamedSharding(mesh, P(DATA_AXIS))


def shard_batch(x, mesh: Mesh):
  """Inside jit: constrains `x` (or a tree) to be split over `data` along axis 0."""
  return jax.lax.with_sharding_constraint(x, batch_sharding(mesh))


def check_divisible(batch_size: int, mesh: Mesh, what: str = "batch_size") -> None:
  """Raises a one-line actionable error if the batch cannot be split evenly over the mesh."""
  n = mesh.devices.size
  if batch_size % n:
    raise ValueError(f"{what}={batch_size} is not divisible by the {n} devices of the mesh: use "
                     f"a multiple of {n} (e.g. {max(n, batch_size // n * n)}) or set "
                     "config.num_devices.")


def replicate(tree, mesh: Mesh):
  """Places a host tree on all devices of the mesh (replicated)."""
  return jax.device_put(tree, replicated(mesh))
