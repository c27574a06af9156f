"""Issue 17 in the library: config validation, workdir lock, damaged checkpoints and data files.

Command-line behaviour (exit codes, stderr lines, what is left on disk) is tested in
tests/test_cli_robust.py; the property-based loader test is tests/test_loader_faults.py.
"""

import json
import os
import subprocess
import sys

import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ringrl.agents import validate
from ringrl.agents.checkpoint import CheckpointCorruptError, Checkpointer
from ringrl.agents.logging import drop_rows_after
from ringrl.agents.workdir import LOCK_NAME, WorkdirLock, check_workdir, remove_if_unused
from ringrl.configs import ad_darkroom, at_d4rl, at_darkroom, dt_d4rl
from ringrl.envs.datasets import load_cache, load_d4rl
from ringrl.experiments import xla_flags


def _errors(config, n_devices=8, **fields):
    with config.unlocked():
        for key, value in fields.items():
            group, _, name = key.rpartition("__")
            (config[group] if group else config)[name] = value
    return validate.validate(config, devices=jax.devices()[:n_devices])


@pytest.mark.parametrize(
    "get_config", [at_darkroom.get_config, ad_darkroom.get_config, dt_d4rl.get_config]
)
def test_shipped_configs_validate(get_config):
    assert validate.validate(get_config(None)) == []
    assert validate.validate(get_config("smoke")) == []


def test_at_d4rl_default_needs_its_ring():
    # 2 trajectories x 1000 steps on a 3-device ring does not divide; 4 devices do.
    config = at_d4rl.get_config("n=2")
    assert validate.validate(config, devices=jax.devices()[:4]) == []
    (err,) = validate.validate(config, devices=jax.devices()[:3])
    assert err.startswith("config.data.num_trajectories * config.data.horizon = 2000 context")
    assert "'seq' axis (3 devices, layout 'striped')" in err


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"keep_checkpoints": 0}, "config.keep_checkpoints=0 must be >= 1 (checkpoints kept), or"),
        ({"log_every": 0}, "config.log_every=0 must be an integer >= 1"),
        ({"checkpoint_every": 0}, "config.checkpoint_every=0 must be an integer >= 1"),
        ({"optim__lr": -1.0}, "config.optim.lr=-1.0 must be > 0"),
        ({"num_steps": 0}, "config.num_steps=0 must be an integer >= 1 (ringrl-eval evaluates"),
        ({"batch_size": 0}, "config.batch_size=0 must be an integer >= 1"),
        ({"batch_size": -4}, "config.batch_size=-4 must be an integer >= 1"),
        ({"eval__tasks": "tests"}, "config.eval.tasks='tests' must be one of ('test', 'valid',"),
        ({"model__num_heads": 3}, "config.model.embed_dim=16 is not divisible by config.model"),
        ({"model__dropout": 1.0}, "config.model.dropout=1.0 must be a number in [0, 1)"),
        ({"model__activation": "tanh"}, "config.model.activation='tanh' is unknown; use one of"),
    ],
)
def test_validate_names_the_field(fields, expected):
    errors = _errors(at_darkroom.get_config("smoke"), **fields)
    assert len(errors) == 1 and errors[0].startswith(expected), errors


@pytest.mark.parametrize(
    "config_arg, top, expected",
    [
        ("smoke", 0.0, "config.data.top_fraction=0.0 must be in (0, 1]"),
        ("smoke", 1.5, "config.data.top_fraction=1.5 must be in (0, 1]"),
        ("smoke,bc=0.1", 0.1, None),
    ],
)
def test_top_fraction_is_checked(config_arg, top, expected):
    errors = _errors(dt_d4rl.get_config(config_arg), data__top_fraction=top)
    assert errors == [] if expected is None else errors[0].startswith(expected), errors


def test_top_fraction_is_dt_only():
    config = at_darkroom.get_config("smoke")
    with config.unlocked():
        config.data.top_fraction = 0.1
    (err,) = validate.validate(config, devices=jax.devices()[:8])
    assert err.startswith("config.data.top_fraction=0.1 is DT's (%BC); mode 'at' reads every")


def test_validate_mesh_divisibility():
    # Batch 6 on 4 data devices; a seq axis of 3 does not divide 2 trajectories x 20 steps.
    config = at_darkroom.get_config("smoke")
    (err,) = _errors(config, 4, batch_size=6, mesh=(("data", 4), ("seq", 1)))
    assert err.startswith("config.batch_size=6 is not a multiple of the mesh's 'data' axis (4")
    (err,) = _errors(config, 3, batch_size=6, mesh=(("data", 1), ("seq", 3)))
    assert err.startswith("config.data.num_trajectories * config.data.horizon = 40 context steps")
    (err,) = _errors(config, 8, mesh=(("data", 4), ("seq", 4)))
    assert err.startswith("config.mesh=(('data', 4), ('seq', 4)): mesh") and "16 devices" in err
    # Zigzag puts two chunks on every seq device: 2 trajectories x 22 steps = 44 fit a 4-device
    # ring in the contiguous layout (44 % 4) but not in zigzag (44 % 8), whose line says so.
    ring4 = dict(mesh=(("data", 1), ("seq", 4)), data__horizon=22)
    assert _errors(at_darkroom.get_config("smoke"), 4, model__layout="contiguous", **ring4) == []
    (err,) = _errors(at_darkroom.get_config("smoke"), 4, model__layout="zigzag", **ring4)
    assert "44 context steps is not a multiple of 2 x the mesh's 'seq' axis (4 devices, " in err
    assert "layout 'zigzag'); make it a multiple of 8 or change config.mesh or config.model" in err
    # Every problem at once, one line each.
    errors = _errors(at_darkroom.get_config("smoke"), log_every=0, optim__lr=0.0, batch_size=3)
    assert [e.split("=")[0] for e in errors] == [
        "config.log_every",
        "config.optim.lr",
        "config.batch_size",
    ]
    with pytest.raises(validate.ConfigError) as info:
        validate.check(config, devices=jax.devices()[:8])
    assert info.value.errors == validate.validate(config, devices=jax.devices()[:8])


def test_dt_context_steps_message():
    (err,) = _errors(dt_d4rl.get_config("smoke"), data__context_steps=0)
    assert err == "config.data.context_steps=0 must be an integer >= 1 (the DT window K)"
    (err,) = _errors(dt_d4rl.get_config("smoke"), eval__reset_noise_scale=-0.1)
    assert err == "config.eval.reset_noise_scale=-0.1 must be a number >= 0 (0: the env's default)"


def test_smoke_keeps_an_explicit_n():
    assert at_darkroom.get_config("n=8,smoke").data.num_trajectories == 8
    assert at_darkroom.get_config("n=8,smoke").eval.attempts == 8
    assert at_darkroom.get_config("smoke").data.num_trajectories == 2
    assert at_darkroom.get_config(None).data.num_trajectories == 32
    assert ad_darkroom.get_config("n=8,smoke").data.num_trajectories == 8


def test_workdir_lock(tmp_path):
    lock = WorkdirLock(tmp_path)
    assert open(tmp_path / LOCK_NAME).read().startswith(f"pid {os.getpid()} on ")
    with pytest.raises(ValueError, match=rf"is in use by another run \(pid {os.getpid()} on .*"):
        WorkdirLock(tmp_path)
    lock.release()
    with WorkdirLock(tmp_path):  # free again
        pass
    # A lock left by a crashed run (its file still names a dead pid) is not in the way.
    (tmp_path / LOCK_NAME).write_text("pid 999999 on elsewhere\n")
    WorkdirLock(tmp_path).release()
    WorkdirLock(tmp_path, active=False)  # other processes of a multi-process run: no lock


def test_workdir_checks(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"workdir '.*f' is a file, not a directory; pass"):
        check_workdir(tmp_path / "f")
    with pytest.raises(ValueError, match=r"cannot create workdir '.*f/run' \(Not a directory\)"):
        check_workdir(tmp_path / "f" / "run")
    with pytest.raises(ValueError, match=r"workdir '.*typo' does not exist; check the --workdir"):
        check_workdir(tmp_path / "typo", create=False)
    assert not (tmp_path / "typo").exists()
    assert check_workdir(tmp_path / "new") == str(tmp_path / "new")


def test_remove_if_unused(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    WorkdirLock(run).release()
    (run / "metrics.jsonl").write_text("{}\n")
    assert not remove_if_unused(run) and (run / "metrics.jsonl").exists()  # holds a result
    os.remove(run / "metrics.jsonl")
    assert remove_if_unused(run) and not run.exists()  # only the lock and empty folders


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_workdir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    with pytest.raises(ValueError, match=r"workdir '.*ro' is not writable \(Permission denied\)"):
        check_workdir(ro)
    with pytest.raises(ValueError, match=r"cannot create workdir '.*ro/x' \(Permission denied\)"):
        check_workdir(ro / "x")


def _state(x):
    return {"step": jnp.int32(x), "w": jnp.arange(300.0) * x}


@pytest.fixture
def ckpt_dir(tmp_path):
    ckpt = Checkpointer(tmp_path / "checkpoints", keep=validate.KEEP_ALL)
    for step in (1, 2, 3):
        ckpt.save(step, _state(step), sampler_state={"i": step}, config={"model": {"d": 1}})
    ckpt.close()
    return tmp_path / "checkpoints"


def test_keep_checkpoints(tmp_path, ckpt_dir):
    with pytest.raises(ValueError, match=r"keep_checkpoints=0 would delete every checkpoint"):
        Checkpointer(tmp_path / "other", keep=0)
    assert Checkpointer(ckpt_dir, keep=-1).all_steps() == [1, 2, 3]  # -1 kept them all


def _largest(folder):
    files = [os.path.join(r, f) for r, _, fs in os.walk(folder) for f in fs]
    return max(files, key=os.path.getsize)


@pytest.mark.parametrize("damage", ["truncate_state", "drop_state", "sampler_json", "config_json"])
def test_damaged_checkpoint_names_step_and_file(ckpt_dir, damage, capsys):
    step_dir = ckpt_dir / "3"
    if damage == "truncate_state":
        path = _largest(step_dir / "state")
        os.truncate(path, 10)
        reason = "10 bytes, "
    elif damage == "drop_state":
        import shutil

        shutil.rmtree(step_dir / "state")
        table = json.loads((step_dir / "ringrl_files.json").read_text())
        path, reason = str(step_dir / min(p for p in table if p.startswith("state"))), "missing"
    else:
        path = str(step_dir / damage.split("_")[0] / "metadata")
        with open(path, "r+") as f:
            f.truncate(5)
        reason = "5 bytes, "
    ckpt = Checkpointer(ckpt_dir)
    with pytest.raises(CheckpointCorruptError) as info:
        ckpt.restore(_state(0), step=3) if damage != "config_json" else ckpt.saved_config(3)
    msg = str(info.value)
    assert msg.startswith(f"checkpoint step 3 is unreadable: {path}: {reason}"), msg
    assert "\n" not in msg
    # --resume's path: the newest intact checkpoint, said on stderr, the damaged one set aside.
    step, state, sampler = ckpt.restore_newest(_state(0))
    assert step == 2 and int(state["step"]) == 2 and sampler == {"i": 2}
    np.testing.assert_array_equal(state["w"], np.arange(300.0) * 2)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("warning: checkpoint step 3 is unreadable: ")
    assert err[0].endswith(f"(moved to {ckpt_dir}.corrupt/3); falling back to step 2")
    assert ckpt.all_steps() == [1, 2] and os.path.isdir(f"{ckpt_dir}.corrupt/3")
    ckpt.close()


def test_damaged_checkpoint_without_file_record(ckpt_dir):
    # Checkpoints written before the size/CRC record (or killed right after orbax's rename):
    # orbax's own error, reduced to its innermost first line.
    os.remove(ckpt_dir / "3" / "ringrl_files.json")
    data = ckpt_dir / "3" / "state" / "d"
    for name in os.listdir(data):  # the array data files
        os.truncate(data / name, 10)
    ckpt = Checkpointer(ckpt_dir)
    with pytest.raises(CheckpointCorruptError) as info:
        ckpt.restore(_state(0))
    msg = str(info.value)
    assert msg.startswith(f"checkpoint step 3 is unreadable: {ckpt_dir / '3' / 'state'}: ")
    assert "\n" not in msg and "Error reading" in msg


def test_every_checkpoint_damaged(ckpt_dir):
    for step in (1, 2, 3):
        os.truncate(_largest(ckpt_dir / str(step) / "state"), 10)
    with pytest.raises(CheckpointCorruptError, match=r"step 1 .*; no older checkpoint left$"):
        Checkpointer(ckpt_dir).restore_newest(_state(0), set_aside=False)


def test_metrics_rows_past_the_resumed_step_are_dropped(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"step": s, "train/loss": 1.0 / s} for s in (1, 2, 3, 4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 5, "trai')
    assert drop_rows_after(path, 2) == 3  # steps 3, 4 and the torn row
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2]
    assert drop_rows_after(path, 2) == 0


def _d4rl_file(path, n=30, obs_dim=11, act_dim=3, **override):
    rng = np.random.default_rng(0)
    data = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": np.arange(n) % 10 == 9,
        "timeouts": np.zeros(n, bool),
        **override,
    }
    with h5py.File(path, "w") as f:
        for key, value in data.items():
            f[key] = value
    return str(path)


def test_truncated_hdf5_and_directory(tmp_path):
    path = _d4rl_file(tmp_path / "hopper.hdf5")
    os.truncate(path, os.path.getsize(path) // 2)
    with pytest.raises(ValueError, match=rf"^{path}: the HDF5 file is damaged or truncated \("):
        load_d4rl(path)
    with pytest.raises(ValueError, match=r"path '.*' is a directory, not a file; fix: pass the"):
        load_d4rl(str(tmp_path))


def test_truncated_cache_is_regenerated(tmp_path, capsys):
    path = _d4rl_file(tmp_path / "cache.hdf5")
    assert load_cache(path).num_steps == 30
    assert load_cache(tmp_path / "absent.hdf5") is None
    os.truncate(path, os.path.getsize(path) // 2)
    assert load_cache(path) is None
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"warning: cached file {path} is unreadable ({path}: the HDF5 file")
    assert err.endswith("; it will be regenerated")


@pytest.mark.parametrize(
    "override, expected",
    [
        ({"obs_dim": 5}, r"'observations' have dimension 5 but Hopper-v5 observations"),
        ({"act_dim": 2}, r"'actions' have shape \(2,\) float32 but Hopper-v5 actions have"),
        ({"actions": np.full((30, 3), 2.0, np.float32)}, r"'actions' row 0 = .* outside Hopper"),
    ],
)
def test_dataset_path_checked_against_the_env_before_training(tmp_path, override, expected):
    from ringrl.envs.sources import load_data

    path = _d4rl_file(tmp_path / "hopper-medium-v2.hdf5", **override)
    config = dt_d4rl.get_config(f"path={path},smoke")
    with pytest.raises(ValueError, match=expected):
        load_data(config)
    # The same through --config.eval.env_id, whatever the file is called.
    other = _d4rl_file(tmp_path / "mine.hdf5", **override)
    config = dt_d4rl.get_config(f"path={other},smoke")
    with config.unlocked():
        config.eval.env_id = "Hopper-v5"
    with pytest.raises(ValueError, match=expected):
        load_data(config)


def test_corrupt_minari_dataset_names_its_id(tmp_path, monkeypatch):
    pytest.importorskip("minari")
    from ringrl.envs.minari_io import export_minari, load_minari
    from ringrl.envs.trajectories import Trajectories

    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path))
    rng = np.random.default_rng(0)
    episodes = [
        {
            "observations": rng.normal(size=(4, 2)),
            "actions": rng.uniform(-1, 1, (4, 1)),
            "rewards": rng.normal(size=4),
            "terminals": np.r_[np.zeros(3), 1],
            "timeouts": np.zeros(4),
        }
        for _ in range(3)
    ]
    folder = export_minari(Trajectories.from_episodes(episodes), "ringrl/t/bad-v0")
    data = os.path.join(folder, "data")
    with open(os.path.join(data, "metadata.json"), "r+") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match=r"^Minari dataset 'ringrl/t/bad-v0' \(.*\) is damaged"):
        load_minari("ringrl/t/bad-v0")
    export_minari(Trajectories.from_episodes(episodes), "ringrl/t/bad2-v0")
    main = os.path.join(tmp_path, "ringrl/t/bad2-v0/data/main_data.hdf5")
    os.truncate(main, os.path.getsize(main) // 2)
    with pytest.raises(ValueError, match=r"^Minari dataset 'ringrl/t/bad2-v0' \(.*\) is damaged"):
        load_minari("ringrl/t/bad2-v0")


def test_xla_flags():
    flags = xla_flags.host_devices("--foo --xla_force_host_platform_device_count=2", 4)
    assert flags.split() == [
        "--foo",
        "--xla_force_host_platform_device_count=4",
        "--xla_cpu_collective_call_terminate_timeout_seconds=1800",
        "--xla_cpu_collective_call_warn_stuck_timeout_seconds=300",
    ]
    mine = "--xla_cpu_collective_call_terminate_timeout_seconds=5"
    assert xla_flags.with_collective_timeouts(mine).split()[0] == mine  # a user's value wins
    assert "collective_call_terminate" in os.environ["XLA_FLAGS"]  # conftest sets them
    # jaxlib accepts them (an unknown XLA flag aborts the process) and collectives still run.
    code = (
        "import jax, jax.numpy as jnp; from jax.sharding import NamedSharding, PartitionSpec as P;"
        "m = jax.make_mesh((4,), ('x',)); x = jax.device_put(jnp.arange(8.), NamedSharding(m, "
        "P('x'))); print(jax.device_count(), float(jax.jit(jnp.sum)(x)))"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": flags.replace("--foo ", "")}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.split() == ["4", "28.0"], out.stderr[-500:]


def test_only_ad_evaluates_more_attempts_than_n():
    """eval.attempts > n: AT refuses in one line naming the mode that allows it; AD rolls, unless
    its model embeds the slot (no absolute position may grow past n)."""
    (err,) = _errors(at_darkroom.get_config("smoke"), eval__attempts=3)
    assert err.startswith("config.eval.attempts=3 > config.data.num_trajectories=2")
    assert "only mode 'ad' plays more attempts than n" in err
    assert _errors(ad_darkroom.get_config("smoke"), eval__attempts=40) == []
    (err,) = _errors(ad_darkroom.get_config("smoke"), model__slot_embedding=True)
    assert "slot_embedding=True rules out" in err
