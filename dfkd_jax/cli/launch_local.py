r"""Starts one run as N local processes (a multi-process mesh on one machine), for trying and
testing multi-host code without a cluster.

  python -m dfkd_jax.cli.launch_local --num_processes 2 --devices_per_process 2 -- \
      --config=fashion_mnist_lenet5:method=teacher,tiny --workdir=runs/mp

Every process runs `python -m dfkd_jax.cli.main <arguments after -->` with the coordinator on a
free port of 127.0.0.1, its process id, and `--xla_force_host_platform_device_count` fake CPU
devices (on a GPU host, `--devices_per_process 0` leaves the devices alone). Process 0's output
is passed through; the others' is shown only if they fail. Exits with the first non-zero status
(a process that dies makes the others stop within `--heartbeat_timeout_s`).
"""
from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys


def free_port() -> int:
  """A TCP port of 127.0.0.1 that was free a moment ago."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(cli_args, num_processes: int, devices_per_process: int = 0,
          heartbeat_timeout_s: int = 30, env: dict | None = None, cwd: str | None = None,
          capture: bool = True):
  """Starts the processes of one run; returns their `subprocess.Popen`s (stdout/stderr piped
  when `capture`). One process gets no distributed flags (a plain run)."""
  port = free_port()
  env = dict(os.environ if env is None else env)
  if devices_per_process:
    kept = [f for f in env.get("XLA_FLAGS", "").split()
            if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(
        kept + [f"--xla_force_host_platform_device_count={devices_per_process}"])
  procs = []
  for i in range(num_processes):
    args = list(cli_args)
    if num_processes > 1:
      args += [f"--coordinator=127.0.0.1:{port}", f"--num_processes={num_processes}",
               f"--process_id={i}", f"--heartbeat_timeout_s={heartbeat_timeout_s}"]
    pipe = subprocess.PIPE if capture else None
    procs.append(subprocess.Popen([sys.executable, "-m", "dfkd_jax.cli.main", *args], cwd=cwd,
                                  env=env, stdout=pipe, stderr=pipe, text=True))
  return procs


def wait(procs, timeout: float | None = None) -> list[tuple[int, str, str]]:
  """(return code, stdout, stderr) of each process; kills them all if one runs past `timeout`."""
  outs = []
  for p in procs:
    try:
      out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      for q in procs:
        q.kill()
      raise
    outs.append((p.returncode, out or "", err or ""))
  return outs


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  ours, cli_args = (argv[:argv.index("--")], argv[argv.index("--") + 1:]) if "--" in argv else (
      argv, [])
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument("--devices_per_process", type=int, default=0,
                      help="fake CPU devices per process (0: the machine's own devices)")
  parser.add_argument("--heartbeat_timeout_s", type=int, default=30)
  args = parser.parse_args(ours)
  if args.num_processes < 1 or not cli_args:
    print("error: give --num_processes >= 1 and the run's arguments after `--`.",
          file=sys.stderr)
    return 2
  results = wait(start(cli_args, args.num_processes, args.devices_per_process,
                       args.heartbeat_timeout_s))
  print(results[0][1], end="")
  for i, (rc, _, err) in enumerate(results):
    if rc or i == 0:
      sys.stderr.write(err if i == 0 else f"[process {i}, exit {rc}]\n{err}")
  return next((rc for rc, _, _ in results if rc), 0)


if __name__ == "__main__":
  sys.exit(main())
