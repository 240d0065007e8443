"""Run logging: stdout progress with rate and ETA, a JSON-lines log and TensorBoard events."""
from __future__ import annotations

import io
import json
import os
import sys
import time
from typing import Mapping

import numpy as np

from dfkd_jax import parallel
from dfkd_jax.io import files


def host_rss_bytes() -> int | None:
  """This process's resident memory now (Linux /proc; None elsewhere): read on the host, no
  device synchronisation."""
  try:
    with open("/proc/self/statm", encoding="ascii") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except (OSError, ValueError, IndexError):
    return None


def host_peak_rss_bytes() -> int | None:
  """This process's resident-memory high-water mark (getrusage; None where unavailable)."""
  try:
    import resource  # pylint: disable=g-import-not-at-top  (POSIX only)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  except (ImportError, OSError):
    return None
  return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def _scalar(v):
  v = np.asarray(v)
  return float(v) if v.size == 1 else v


class RunLogger:
  """Writes scalars to `workdir/metrics.jsonl` and TensorBoard, prints progress lines.

  Args:
    workdir: run folder.
    total_steps: planned number of steps (for ETA).
    name: short label printed at the start of each progress line.
    tensorboard: also write TensorBoard event files under `workdir/tb` (tensorboardX).
    stream: where progress lines go (default stdout).
    resume_step: the step the run (re)starts from: records of later steps in an existing
      metrics.jsonl (written after the last checkpoint by a killed run) are dropped first, so a
      resumed run's log holds each step once.
  """

  def __init__(self, workdir: str, total_steps: int, name: str = "train",
               tensorboard: bool = True, stream=None, resume_step: int | None = None):
    self.workdir = workdir
    self.total_steps = total_steps
    self.name = name
    # In a multi-process run only process 0 logs (the others compute the same numbers).
    self._enabled = parallel.is_main_process()
    self.stream = (stream or sys.stdout) if self._enabled else io.StringIO()
    self._jsonl = self._tb = None
    if not self._enabled:
      tensorboard = False
    else:
      os.makedirs(workdir, exist_ok=True)
      path = os.path.join(workdir, "metrics.jsonl")
      if resume_step is not None:
        truncate_log(path, resume_step)
      self._jsonl = open(path, "a", encoding="utf-8")  # pylint: disable=consider-using-with
    if tensorboard:
      try:
        from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
        self._tb = SummaryWriter(os.path.join(workdir, "tb"))
      except Exception:  # pylint: disable=broad-except
        self._tb = None
    self._t0 = None
    self._step0 = None

  def start(self, step: int) -> None:
    """Marks the start of timing (call after the first, compiling, step)."""
    self._t0 = time.perf_counter()
    self._step0 = step

  def rate(self, step: int) -> float:
    if self._t0 is None or step <= self._step0:
      return float("nan")
    return (step - self._step0) / (time.perf_counter() - self._t0)

  def write(self, step: int, scalars: Mapping[str, float], print_keys=None) -> None:
    """Logs `scalars` at `step`; prints a progress line with rate and ETA."""
    scalars = {k: _scalar(v) for k, v in scalars.items()}
    record = {"step": int(step), "time": time.time(), **{
        k: v for k, v in scalars.items() if np.ndim(v) == 0}}
    rss = host_rss_bytes()
    if rss is not None:  # the machine, like "time": memory against run length
      record["host_rss_mib"] = round(rss / 2 ** 20, 1)
    if self._jsonl is not None:
      self._jsonl.write(json.dumps(record) + "\n")
      self._jsonl.flush()
    if self._tb is not None:
      for k, v in scalars.items():
        if np.ndim(v) == 0:
          self._tb.add_scalar(k, v, step)
      self._tb.flush()
    rate = self.rate(step)
    eta = (self.total_steps - step) / rate if rate == rate and rate > 0 else float("nan")
    keys = print_keys or list(scalars)[:6]
    parts = " ".join(f"{k}={scalars[k]:.4g}" for k in keys if k in scalars)
    pct = 100.0 * step / max(1, self.total_steps)
    self.stream.write(f"[{self.name}] {step}/{self.total_steps} ({pct:4.1f}%) {parts} | "
                      f"{rate:.2f} it/s, ETA {format_seconds(eta)}\n")
    self.stream.flush()

  def image(self, tag: str, step: int, grid: np.ndarray) -> None:
    """Adds an HWC image in [0, 1] to TensorBoard."""
    if self._tb is not None:
      self._tb.add_image(tag, grid, step, dataformats="HWC")
      self._tb.flush()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
    if self._tb is not None:
      self._tb.close()


def truncate_log(path: str, step: int) -> None:
  """Keeps the records of `path` (JSON lines) with "step" <= `step` (atomic rewrite)."""
  if not os.path.exists(path):
    return
  with open(path, encoding="utf-8") as f:
    lines = f.readlines()
  kept = []
  for line in lines:
    try:
      record = json.loads(line)
    except ValueError:  # a line cut by the kill
      continue
    if isinstance(record, dict) and record.get("step", 0) <= step:
      kept.append(line if line.endswith("\n") else line + "\n")
  if kept != lines:
    files.write_atomic(path, "".join(kept))


def format_seconds(s: float) -> str:
  if s != s or s == float("inf"):
    return "?"
  s = int(round(s))
  h, rem = divmod(s, 3600)
  m, sec = divmod(rem, 60)
  return f"{h}h{m:02d}m{sec:02d}s" if h else f"{m}m{sec:02d}s"
