"""Data parallelism with `jax.jit` over a device `Mesh` with one `data` axis.

State is replicated; batches (real or synthetic) are sharded along their leading axis. Under
jit, BatchNorm statistics over a sharded batch are global-batch statistics with no explicit
collective (XLA inserts the reductions).

Several processes (hosts) form one mesh through JAX's multi-controller runtime
(`initialize`): the mesh spans every process's devices, every process runs the same jitted
steps on the same (replicated) inputs, and only process 0 writes files (`is_main_process`).
"""
from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

DATA_AXIS = "data"


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None, auto: bool = False,
               heartbeat_timeout_s: int = 100) -> bool:
  """Joins a multi-process run (`jax.distributed.initialize`); returns whether one was joined.

  Args:
    coordinator: "host:port" of process 0's coordination service; with `num_processes` and
      `process_id`, the explicit launch (local processes, plain SSH).
    num_processes: how many processes take part.
    process_id: this process's index, 0 .. num_processes-1.
    auto: without `coordinator`, let JAX detect the cluster (TPU pod slices, SLURM, Open MPI);
      outside a cluster this is a single-process run.
    heartbeat_timeout_s: a process silent this long counts as dead: the others stop with an
      error instead of waiting for it forever (relaunch to resume from the last checkpoint).

  On CPU the cross-process collectives use gloo. Must run before any other JAX call.
  """
  if coordinator is None and not auto:
    return False
  if coordinator is not None and (num_processes is None or process_id is None):
    raise ValueError("--coordinator needs --num_processes and --process_id (this process's "
                     "index, 0 for the process whose host runs the coordinator).")
  if coordinator is not None and not 0 <= process_id < num_processes:
    raise ValueError(f"--process_id={process_id} must be in [0, {num_processes}).")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    if coordinator is None:
      jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_s)
    else:
      jax.distributed.initialize(coordinator, num_processes=num_processes,
                                 process_id=process_id,
                                 heartbeat_timeout_seconds=heartbeat_timeout_s)
  except ValueError:
    if coordinator is None:  # auto-detection found no cluster: one process
      return False
    raise
  return True


def is_main_process() -> bool:
  """Whether this process writes the run's files and prints its progress (process 0)."""
  return jax.process_index() == 0


def make_mesh(num_devices: int | None = None) -> Mesh:
  """A 1-D mesh over the first `num_devices` devices of all processes (all by default)."""
  devices = jax.devices()
  if num_devices is not None:
    if num_devices > len(devices):
      raise ValueError(f"config asks for {num_devices} devices but only {len(devices)} are "
                       "available; set num_devices <= that (or 0 for all).")
    if 0 < num_devices < len(devices) and jax.process_count() > 1:
      raise ValueError(f"config.num_devices={num_devices}: a multi-process run uses every "
                       f"process's devices ({len(devices)}); set num_devices=0.")
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
  return put(tree, replicated(mesh))


def put(tree, sharding: NamedSharding):
  """`jax.device_put(tree, sharding)`, also when the sharding spans other processes' devices
  (every process passes the same values, as SPMD code does): leaves go through host memory,
  typed PRNG keys through their key data."""
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)

  def leaf(x):
    if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      data = jax.device_put(np.asarray(jax.random.key_data(x)), _with_rank(sharding, x.ndim + 1))
      return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    if isinstance(x, jax.Array) and x.sharding == sharding:
      return x
    return jax.device_put(np.asarray(x), _with_rank(sharding, np.ndim(x)))

  return jax.tree.map(leaf, tree)


def _with_rank(sharding: NamedSharding, ndim: int) -> NamedSharding:
  """`sharding` with its spec trimmed or padded (replicated) to `ndim` axes."""
  spec = tuple(sharding.spec)[:ndim]
  return NamedSharding(sharding.mesh, P(*spec))


def to_host(x) -> np.ndarray:
  """`x` as a numpy array on this host. An array sharded over several processes is gathered
  first: a collective, so every process must call this at the same point."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable and not (
      x.sharding.is_fully_replicated):
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    x = multihost_utils.process_allgather(x, tiled=True)
  return np.asarray(jax.device_get(x))


def process_rows(n: int, mesh: Mesh) -> tuple[int, int]:
  """Rows [start, stop) of an `n`-row array split evenly over the mesh's devices along axis 0
  that this process's devices hold (`n` a multiple of the device count). A process's devices
  are consecutive in the mesh (`jax.devices()` orders them by process)."""
  devices = list(mesh.devices.flat)
  if n % len(devices):
    raise ValueError(f"{n} rows do not split evenly over {len(devices)} devices.")
  mine = [i for i, d in enumerate(devices) if d.process_index == jax.process_index()]
  if not mine or mine != list(range(mine[0], mine[-1] + 1)):
    raise ValueError("this process's devices are not one consecutive block of the mesh.")
  per = n // len(devices)
  return mine[0] * per, (mine[-1] + 1) * per


def from_process_rows(local, mesh: Mesh, n: int) -> jax.Array:
  """The global `n`-row array split over the mesh's `data` axis, from the rows
  `process_rows(n, mesh)` that this process holds (each process passes its own)."""
  local = np.asarray(local)
  return jax.make_array_from_process_local_data(batch_sharding(mesh), local,
                                                (n, *local.shape[1:]))
