r"""Start P local processes of a ringrl entry point, joined by jax.distributed on 127.0.0.1.

  ringrl-launch --processes 2 --devices-per-process 4 -- train --config configs/at_darkroom.py:smoke

Each process gets the coordinator address, its rank and D virtual CPU devices; output is streamed
prefixed with the rank. If any process fails, the others are stopped and the launcher exits with
that process's code, naming the rank. On a cluster, don't use this: start one process per host
with RINGRL_DISTRIBUTED=auto and JAX detects the cluster (SLURM, cloud TPU, MPI).
"""

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from ringrl.experiments import xla_flags
from ringrl.ring import distributed


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stream(rank: int, pipe, lock: threading.Lock) -> None:
    for line in iter(pipe.readline, b""):
        with lock:
            sys.stdout.write(f"[rank {rank}] {line.decode(errors='replace')}")
            sys.stdout.flush()


def launch(entry: list[str], processes: int, devices_per_process: int, grace_s: float = 5.0) -> int:
    """Runs `python -m ringrl.experiments.<entry[0]> entry[1:]` in several processes.

    Returns:
      the exit code.
    """
    if processes < 1 or devices_per_process < 1:
        raise ValueError("--processes and --devices-per-process must be >= 1")
    if entry[0].endswith(".py"):  # a script path
        target = [entry[0]]
    else:  # a module: "train" means ringrl.experiments.train
        target = ["-m", entry[0] if "." in entry[0] else f"ringrl.experiments.{entry[0]}"]
    port, lock, procs, threads = free_port(), threading.Lock(), [], []
    for rank in range(processes):
        env = dict(os.environ)
        env.update(
            {
                distributed.COORDINATOR_ENV: f"127.0.0.1:{port}",
                distributed.NUM_PROCESSES_ENV: str(processes),
                distributed.PROCESS_ID_ENV: str(rank),
                "JAX_PLATFORMS": "cpu",
                # D virtual devices per worker, collectives tolerant of busy cores.
                "XLA_FLAGS": xla_flags.host_devices(env.get("XLA_FLAGS", ""), devices_per_process),
            }
        )
        p = subprocess.Popen(
            [sys.executable, "-u", *target, *entry[1:]],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        procs.append(p)
        t = threading.Thread(target=_stream, args=(rank, p.stdout, lock), daemon=True)
        t.start()
        threads.append(t)
    failed = None
    while failed is None and any(p.poll() is None for p in procs):
        for rank, p in enumerate(procs):
            if p.poll() not in (None, 0):
                failed = rank
                break
        time.sleep(0.2)
    if failed is None:
        failed = next((r for r, p in enumerate(procs) if p.returncode != 0), None)
    if failed is not None:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.time() + grace_s
        for p in procs:
            try:
                p.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    for t in threads:
        t.join(timeout=5)
    if failed is not None:
        code = procs[failed].returncode
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        print(
            f"ringrl-launch: rank {failed} of {processes} failed ({how}); stopped the others",
            file=sys.stderr,
        )
        return code if code and code > 0 else 1
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--devices-per-process", type=int, default=4)
    parser.add_argument(
        "entry",
        nargs=argparse.REMAINDER,
        help="entry point (train, evaluate, or a module) and its arguments",
    )
    args = parser.parse_args(argv)
    entry = args.entry[1:] if args.entry[:1] == ["--"] else args.entry
    if not entry:
        parser.error("give the entry point after --, e.g. -- train --config configs/at_darkroom.py")
    try:
        return launch(entry, args.processes, args.devices_per_process)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run()
