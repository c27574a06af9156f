"""Multi-process runs on loopback through experiments/launch.py (jax.distributed + Gloo)."""

import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(__file__), "mh_worker.py")


def _launch(*args: str, timeout: float = 120) -> tuple[subprocess.CompletedProcess, float]:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    start = time.time()
    proc = subprocess.run(
        [sys.executable, "-m", "ringrl.experiments.launch", *args],
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
    from ringrl.experiments.launch import free_port
    from ringrl.ring import distributed

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


# The AT agent's smoke config on a mesh whose ring (seq=8) spans both processes' devices.
TRAIN_ARGS = [
    "--config",
    "configs/at_darkroom.py:smoke",
    "--config.mesh=(('data', 1), ('seq', 8))",
    "--config.num_steps=4",
    "--config.checkpoint_every=2",
    "--config.wandb.mode=disabled",
]


def _train(workdir, processes: int, *extra: str) -> None:
    args = [*TRAIN_ARGS, "--workdir", str(workdir), *extra]
    if processes == 1:
        env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8")
        proc = subprocess.run(
            [sys.executable, "-m", "ringrl.experiments.train", *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=600,
        )
    else:
        proc, _ = _launch(
            "--processes", "2", "--devices-per-process", "4", "--", "train", *args, timeout=600
        )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


def _losses(workdir) -> dict[int, float]:
    import json

    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _eval(workdir) -> list[float]:
    import json

    with open(os.path.join(workdir, "eval.json")) as f:
        return json.load(f)["return_mean"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("multihost")
    _train(root / "one", 1)
    _train(root / "two", 2)
    return root


def test_two_processes_train_like_one(runs):
    one, two = _losses(runs / "one"), _losses(runs / "two")
    assert sorted(one) == sorted(two) == [1, 2, 3, 4]
    np.testing.assert_allclose([two[s] for s in one], list(one.values()), rtol=0, atol=1e-5)
    assert _eval(runs / "one") == _eval(runs / "two")


@pytest.mark.parametrize("written_by, resumed_by", [("two", 1), ("one", 2)])
def test_checkpoint_restores_across_process_counts(runs, tmp_path, written_by, resumed_by):
    """A run 'killed' after its step-2 checkpoint resumes under the other process count."""
    workdir = tmp_path / "resumed"
    shutil.copytree(runs / written_by, workdir)
    shutil.rmtree(workdir / "checkpoints" / "4")  # as if killed right after checkpoint 2
    os.remove(workdir / "metrics.jsonl")
    _train(workdir, resumed_by, "--resume")
    full, resumed = _losses(runs / written_by), _losses(workdir)
    assert sorted(resumed) == [3, 4]
    np.testing.assert_allclose([resumed[3], resumed[4]], [full[3], full[4]], rtol=0, atol=1e-5)
    assert _eval(workdir) == _eval(runs / written_by)
