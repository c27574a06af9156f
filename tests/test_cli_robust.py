"""Issue 17 at the command line: faults and bad input give one line and exit 2 before anything is
written, or are survived and said on stderr. Subprocesses: exit codes and what stays on disk are
what a user sees.
"""

import json
import os
import subprocess
import sys

import h5py
import numpy as np

from ringrl.agents.workdir import WorkdirLock

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = f"--config={ROOT}/configs/at_darkroom.py:smoke"


def _run(*args, cwd, env=None, timeout=300):
    """`python args...` on CPU in `cwd`, output captured."""
    return subprocess.run(
        [sys.executable, *args],
        cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu", **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _train(*args, cwd, **kwargs):
    return _run("-m", "ringrl.experiments.train", *args, cwd=cwd, **kwargs)


def _errors(proc):
    assert proc.returncode == 2, proc.stderr[-3000:]
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def test_config_errors_before_anything_is_written(tmp_path):
    """Cases 2, 7, 8, 9, 11: every bad field in one pass, one line each, nothing on disk."""
    proc = _train(
        SMOKE,
        "--workdir=run",
        "--config.data.dir=data",
        "--config.keep_checkpoints=0",
        "--config.log_every=0",
        "--config.checkpoint_every=0",
        "--config.optim.lr=-1",
        "--config.num_steps=0",
        "--config.batch_size=6",  # 8 data devices (conftest's XLA_FLAGS reach the subprocess)
        cwd=tmp_path,
    )
    assert _errors(proc) == [
        "error: config.num_steps=0 must be an integer >= 1 (ringrl-eval evaluates a trained run)",
        "error: config.log_every=0 must be an integer >= 1",
        "error: config.checkpoint_every=0 must be an integer >= 1",
        "error: config.keep_checkpoints=0 must be >= 1 (checkpoints kept), or -1 to keep all of "
        "them",
        "error: config.optim.lr=-1.0 must be > 0",
        "error: config.batch_size=6 is not a multiple of the mesh's 'data' axis (8 devices); use "
        "a multiple of 8 or change config.mesh",
    ]
    assert os.listdir(tmp_path) == []  # no workdir, no data
    proc = _train(
        f"--config={ROOT}/configs/at_darkroom.py:n=3,smoke",
        "--workdir=run",
        "--config.mesh=(('data',1),('seq',8))",
        "--config.batch_size=-4",
        cwd=tmp_path,
    )
    assert _errors(proc) == [
        "error: config.batch_size=-4 must be an integer >= 1",
        "error: config.data.num_trajectories * config.data.horizon = 60 context steps is not a "
        "multiple of the mesh's 'seq' axis (8 devices, layout 'contiguous'); make it a multiple "
        "of 8 or change config.mesh",
    ]  # n=3 was kept with smoke: 3 x 20 steps
    assert os.listdir(tmp_path) == []


def test_workdir_in_use_or_not_a_directory(tmp_path):
    """Cases 1 and 10."""
    with WorkdirLock(tmp_path):  # another run holds this workdir
        proc = _train(SMOKE, f"--workdir={tmp_path}", cwd=tmp_path)
    (line,) = _errors(proc)
    assert line.startswith(f"error: workdir '{tmp_path}' is in use by another run (pid ")
    assert line.endswith("; wait for it to finish or pass another --workdir")
    assert sorted(os.listdir(tmp_path)) == [".lock"]  # nothing else written
    (tmp_path / "file").write_text("x")
    proc = _train(SMOKE, "--workdir=file", cwd=tmp_path)
    assert _errors(proc) == [
        "error: workdir 'file' is a file, not a directory; pass another --workdir"
    ]
    proc = _train(SMOKE, "--workdir=file/run", cwd=tmp_path)
    assert _errors(proc) == [
        "error: cannot create workdir 'file/run' (Not a directory); pass a --workdir in a "
        "writable place"
    ]


def test_eval_on_a_mistyped_workdir(tmp_path):
    """Case 12: ringrl-eval does not create the folder it was given."""
    proc = _run("-m", "ringrl.experiments.evaluate", "--workdir=runs/typo", cwd=tmp_path)
    assert _errors(proc) == ["error: workdir 'runs/typo' does not exist; check the --workdir path"]
    assert os.listdir(tmp_path) == []


def _hdf5(path, obs_dim=11):
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        f["observations"] = rng.normal(size=(40, obs_dim)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, (40, 3)).astype(np.float32)
        f["rewards"] = rng.normal(size=40).astype(np.float32)
        f["terminals"] = np.arange(40) % 20 == 19
        f["timeouts"] = np.zeros(40, bool)
    return str(path)


def test_bad_data_paths(tmp_path):
    """Cases 3, 6 and 12: refused before the first step; the new workdir is not left behind."""
    dt = f"--config={ROOT}/configs/dt_d4rl.py"
    os.mkdir(tmp_path / "folder")
    truncated = _hdf5(tmp_path / "hopper-medium-v2.hdf5")
    os.truncate(truncated, os.path.getsize(truncated) // 2)
    wrong = _hdf5(tmp_path / "hopper-wrong-v2.hdf5", obs_dim=7)
    cases = {
        f"{dt}:path=folder,smoke": "error: D4RL dataset path 'folder' is a directory, not a "
        "file; fix: pass the .hdf5 file inside it",
        f"{dt}:path={truncated},smoke": f"error: {truncated}: the HDF5 file is damaged or "
        "truncated (",
        f"{dt}:path={wrong},smoke": f"error: {wrong}: 'observations' have dimension 7 but "
        "Hopper-v5 observations have shape (11,)",
    }
    for config, expected in cases.items():
        (line,) = _errors(_train(config, "--workdir=run", cwd=tmp_path))
        assert line.startswith(expected), line
        assert not os.path.exists(tmp_path / "run")
    (line,) = _errors(_train(f"{dt}:smoke", "--config.data.context_steps=0", cwd=tmp_path))
    assert line == "error: config.data.context_steps=0 must be an integer >= 1 (the DT window K)"


def test_collect_out_is_a_directory(tmp_path):
    """Case 12: checked before generating anything."""
    proc = _run("-m", "ringrl.experiments.collect", "darkroom", f"--out={tmp_path}", cwd=tmp_path)
    assert _errors(proc) == [
        f"error: --out '{tmp_path}' is a directory; pass a file path, e.g. "
        f"{tmp_path}/darkroom_histories.hdf5"
    ]
    assert os.listdir(tmp_path) == []


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def _largest(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


def test_kill_during_save_then_resume_from_the_newest_intact(tmp_path):
    """Cases 4, 5 and 6, and the fault test: kill -9 during the save of step 6, damage step 4 and
    the cached histories; --resume falls back to step 2, says so, regenerates the cache, and logs
    the losses of an uninterrupted run from step 2, each step once."""
    args = [
        SMOKE,
        f"--workdir={tmp_path / 'run'}",
        f"--config.data.dir={tmp_path / 'data'}",
        "--config.num_steps=6",
        "--config.checkpoint_every=2",
        "--config.keep_checkpoints=-1",
    ]
    proc = _run(
        os.path.join(ROOT, "tests", "fault_worker.py"),
        *args,
        cwd=tmp_path,
        env={"RINGRL_KILL_AT_STEP": "6"},
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    ckpts = tmp_path / "run" / "checkpoints"
    assert sorted(p for p in os.listdir(ckpts) if p.isdigit()) == ["2", "4"]
    uninterrupted = _losses(tmp_path / "run")
    assert sorted(uninterrupted) == [1, 2, 3, 4, 5, 6]  # logged before the kill at the save

    damaged = _largest(ckpts / "4" / "state")
    os.truncate(damaged, 10)
    (cache,) = os.listdir(tmp_path / "data")
    cache = str(tmp_path / "data" / cache)
    os.truncate(cache, os.path.getsize(cache) // 2)
    proc = _train(*args, "--resume", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, proc.stderr[-3000:]
    assert warnings[0].startswith(f"warning: cached file {cache} is unreadable")
    assert warnings[0].endswith("; it will be regenerated")
    assert warnings[1].startswith(f"warning: checkpoint step 4 is unreadable: {damaged}: 10 bytes")
    assert warnings[1].endswith(f"(moved to {ckpts}.corrupt/4); falling back to step 2")
    resumed = _losses(tmp_path / "run")
    assert sorted(resumed) == [1, 2, 3, 4, 5, 6]  # every step once: the killed run's 3-6 dropped
    steps = [3, 4, 5, 6]
    np.testing.assert_allclose(
        [resumed[s] for s in steps], [uninterrupted[s] for s in steps], rtol=1e-5, atol=1e-6
    )

    # ringrl-eval on a damaged checkpoint: one line naming the step and the file.
    damaged = _largest(ckpts / "6" / "state")
    os.truncate(damaged, 10)
    proc = _run("-m", "ringrl.experiments.evaluate", f"--workdir={tmp_path / 'run'}", cwd=tmp_path)
    (line,) = _errors(proc)
    assert line.startswith(f"error: checkpoint step 6 is unreadable: {damaged}: 10 bytes, ")


def test_launch_workers_get_collective_timeouts(tmp_path):
    """Case 13: ringrl-launch's workers run with the generous collective timeouts."""
    script = tmp_path / "show.py"
    script.write_text("import os; print(os.environ['XLA_FLAGS'])\n")
    proc = _run(
        "-m",
        "ringrl.experiments.launch",
        "--processes=1",
        "--devices-per-process=2",
        "--",
        str(script),
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--xla_force_host_platform_device_count=2" in proc.stdout
    assert "--xla_cpu_collective_call_terminate_timeout_seconds=1800" in proc.stdout
