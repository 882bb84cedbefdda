"""Run one distill-jax command as several JAX processes on this machine.

    python launch/local.py --num_processes=2 --devices_per_process=2 -- \
        train --config=configs/gmm.py:smoke --workdir=runs/mp

starts `python -m distill_jax train ...` once per process with DISTILL_JAX_COORDINATOR,
DISTILL_JAX_NUM_PROCESSES and DISTILL_JAX_PROCESS_ID set, so `parallel.initialize_distributed`
joins them into one `jax.distributed` job; `--devices_per_process=D` gives each process D fake
CPU devices (XLA_FLAGS=--xla_force_host_platform_device_count=D, JAX_PLATFORMS=cpu) and CPU
collectives go over gloo (JAX's default). `--devices_per_process=0` leaves the platform alone,
e.g. one process per GPU with CUDA_VISIBLE_DEVICES set by `--gpus_per_process`.

Every output line is prefixed with `[pN]`. The launcher returns 0 when every process exits 0;
otherwise it returns the first non-zero exit code. After the first failure the others get
`--grace_s` seconds to notice it themselves (jax.distributed's heartbeat makes them exit), then
they are terminated, so the launcher itself never hangs on a dead job.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import signal
import socket
import subprocess
import sys
import threading
import time

PYTHON = sys.executable


def free_port() -> int:
    """A TCP port on localhost that is free right now (for the coordinator)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("localhost", 0))
        return sock.getsockname()[1]


def process_env(
    *,
    base: dict[str, str],
    process_id: int,
    num_processes: int,
    coordinator: str,
    devices_per_process: int,
    gpus_per_process: int = 0,
    heartbeat_timeout_s: int | None = None,
) -> dict[str, str]:
    """The environment of process `process_id` of a local `num_processes` job."""
    env = dict(base)
    env.update(
        DISTILL_JAX_COORDINATOR=coordinator,
        DISTILL_JAX_NUM_PROCESSES=str(num_processes),
        DISTILL_JAX_PROCESS_ID=str(process_id),
        PYTHONUNBUFFERED="1",
    )
    if heartbeat_timeout_s is not None:
        env["DISTILL_JAX_HEARTBEAT_TIMEOUT"] = str(heartbeat_timeout_s)
    if devices_per_process > 0:
        flags = env.get("XLA_FLAGS", "").split()
        flags = [f for f in flags if not f.startswith("--xla_force_host_platform_device_count")]
        flags.append(f"--xla_force_host_platform_device_count={devices_per_process}")
        env["XLA_FLAGS"] = " ".join(flags)
        env["JAX_PLATFORMS"] = "cpu"
    elif gpus_per_process > 0:
        first = process_id * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(
            str(i) for i in range(first, first + gpus_per_process)
        )
    return env


@dataclasses.dataclass
class LocalJob:
    """The processes of one local job and the threads that relay their output."""

    processes: list[subprocess.Popen]
    relays: list[threading.Thread]

    @property
    def pids(self) -> list[int]:
        """Process ids, indexed by JAX process id."""
        return [p.pid for p in self.processes]


def _relay(proc: subprocess.Popen, prefix: str, sink) -> None:
    for line in proc.stdout:
        sink.write(f"{prefix}{line}")
        sink.flush()


def start(
    command: list[str],
    *,
    num_processes: int,
    devices_per_process: int = 0,
    gpus_per_process: int = 0,
    port: int | None = None,
    heartbeat_timeout_s: int | None = None,
    cwd: str | None = None,
    sink=None,
) -> LocalJob:
    """Start `python -m distill_jax COMMAND...` as `num_processes` processes; don't wait.

    Args:
      command: the distill-jax arguments, e.g. ['train', '--config=...', '--workdir=...'].
      num_processes: how many JAX processes.
      devices_per_process: fake CPU devices per process (0: use the real platform).
      gpus_per_process: with devices_per_process=0, give process p the GPUs
        p*G .. p*G+G-1 through CUDA_VISIBLE_DEVICES (0: leave it alone).
      port: the coordinator's port on localhost (default: a free one).
      heartbeat_timeout_s: passed as DISTILL_JAX_HEARTBEAT_TIMEOUT (how soon a dead peer is
        noticed); None keeps the library default.
      cwd: working directory of the processes.
      sink: where prefixed output lines go (default sys.stdout).
    """
    if num_processes < 1:
        raise ValueError(f"num_processes={num_processes} is invalid: accepted an integer >= 1.")
    coordinator = f"localhost:{port or free_port()}"
    sink = sink or sys.stdout
    processes, relays = [], []
    for process_id in range(num_processes):
        env = process_env(
            base=dict(os.environ),
            process_id=process_id,
            num_processes=num_processes,
            coordinator=coordinator,
            devices_per_process=devices_per_process,
            gpus_per_process=gpus_per_process,
            heartbeat_timeout_s=heartbeat_timeout_s,
        )
        proc = subprocess.Popen(
            [PYTHON, "-m", "distill_jax", *command],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        relay = threading.Thread(target=_relay, args=(proc, f"[p{process_id}] ", sink), daemon=True)
        relay.start()
        processes.append(proc)
        relays.append(relay)
    return LocalJob(processes, relays)


def wait(job: LocalJob, *, grace_s: float = 120.0, timeout_s: float | None = None) -> list[int]:
    """Wait for every process; return their exit codes (indexed by process id).

    Once one process fails (non-zero exit), the others get `grace_s` seconds to exit by
    themselves and are then terminated (SIGTERM, then SIGKILL 10 s later). `timeout_s` bounds
    the whole wait the same way.
    """
    start_time = time.monotonic()
    failed_at = None
    while True:
        codes = [p.poll() for p in job.processes]
        if all(c is not None for c in codes):
            break
        now = time.monotonic()
        if failed_at is None and any(c not in (None, 0) for c in codes):
            failed_at = now
        overdue = timeout_s is not None and now - start_time > timeout_s
        if overdue or (failed_at is not None and now - failed_at > grace_s):
            _stop(job)
            break
        time.sleep(0.1)
    for relay in job.relays:
        relay.join(timeout=5)
    return [p.wait() for p in job.processes]


def _stop(job: LocalJob) -> None:
    alive = [p for p in job.processes if p.poll() is None]
    for proc in alive:
        print(f"[launch] terminating pid {proc.pid}", file=sys.stderr, flush=True)
        proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    for proc in alive:
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()


def overall_exit_code(codes: list[int]) -> int:
    """0 when all succeeded, else the first non-zero code (a signal -N becomes 128 + N)."""
    for code in codes:
        if code:
            return 128 - code if code < 0 else code
    return 0


def main(argv: list[str] | None = None) -> int:
    """Parse `[options] -- COMMAND...`, run the job, return the overall exit code."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        usage="%(prog)s [options] -- COMMAND [distill-jax flags]",
    )
    parser.add_argument("--num_processes", type=int, default=2)
    parser.add_argument(
        "--devices_per_process",
        type=int,
        default=1,
        help="fake CPU devices per process; 0 keeps the real platform (GPU/TPU)",
    )
    parser.add_argument(
        "--gpus_per_process",
        type=int,
        default=0,
        help="with --devices_per_process=0: CUDA_VISIBLE_DEVICES slice per process",
    )
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default free)")
    parser.add_argument(
        "--heartbeat_timeout_s",
        type=int,
        default=None,
        help="seconds before a silent process counts as dead (jax.distributed heartbeat)",
    )
    parser.add_argument(
        "--grace_s",
        type=float,
        default=120.0,
        help="after one process fails, seconds the others get to exit before being terminated",
    )
    argv = sys.argv[1:] if argv is None else argv
    if "--" in argv:
        split = argv.index("--")
        options, command = argv[:split], argv[split + 1 :]
    else:
        options, command = argv, []
    args = parser.parse_args(options)
    if not command:
        parser.error("give the distill-jax command after '--', e.g. -- train --config=...")
    job = start(
        command,
        num_processes=args.num_processes,
        devices_per_process=args.devices_per_process,
        gpus_per_process=args.gpus_per_process,
        port=args.port,
        heartbeat_timeout_s=args.heartbeat_timeout_s,
    )
    print(f"[launch] started pids {job.pids}", file=sys.stderr, flush=True)
    codes = wait(job, grace_s=args.grace_s)
    print(f"[launch] exit codes {codes}", file=sys.stderr, flush=True)
    return overall_exit_code(codes)


if __name__ == "__main__":
    sys.exit(main())
