"""Multi-process runs on loopback through experiments/launch.py (jax.distributed + Gloo)."""

import os
import subprocess
import sys
import time

WORKER = os.path.join(os.path.dirname(__file__), "mh_worker.py")


def _launch(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.launch", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    return proc, time.time() - start


def test_ring_crosses_process_boundary():
    proc, _ = _launch("--processes", "2", "--devices-per-process", "2", "--", WORKER, "ring")
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    results = sorted(
        line.split("RESULT ", 1)[1] for line in proc.stdout.splitlines() if "RESULT " in line
    )
    # Both ranks see 4 global devices, and each value moved one device round the ring, crossing
    # from process 0's devices to process 1's and back.
    assert results == ["0 2 [3.0, 0.0, 1.0, 2.0]", "1 2 [3.0, 0.0, 1.0, 2.0]"]
    assert "[rank 0]" in proc.stdout and "[rank 1]" in proc.stdout


def test_dead_rank_makes_launcher_fail_fast():
    proc, seconds = _launch("--processes", "2", "--devices-per-process", "2", "--", WORKER, "die")
    assert proc.returncode != 0
    assert "rank 1 of 2 failed (was killed by signal 9)" in proc.stderr
    assert seconds < 60, seconds


def test_survivor_exits_on_its_own_when_a_peer_dies():
    """Without the launcher, the heartbeat timeout (ring/distributed.py) ends the survivor."""
    from experiments.launch import free_port
    from ring import distributed

    port = free_port()
    procs = []
    for rank in range(2):
        env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
        env.update(
            {
                distributed.COORDINATOR_ENV: f"127.0.0.1:{port}",
                distributed.NUM_PROCESSES_ENV: "2",
                distributed.PROCESS_ID_ENV: str(rank),
                "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
                "JAX_PLATFORMS": "cpu",
            }
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, WORKER, "die"],
                env=env,
                text=True,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
            )
        )
    procs[1].wait(timeout=120)
    died = time.time()
    out, _ = procs[0].communicate(timeout=distributed.HEARTBEAT_TIMEOUT_S + 45)
    assert procs[0].returncode != 0
    assert time.time() - died < distributed.HEARTBEAT_TIMEOUT_S + 30
    assert "stopped sending heartbeats" in out
