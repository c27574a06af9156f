"""SAC collector at a tiny size: five D4RL-style files with correct flags and references, the
medium-expert mix, exact resume from a checkpoint, resumed collection after a failure between two
sets (finished sets kept byte for byte, no partial file), refused mismatched checkpoints and sets,
and the tanh-Gaussian log-density."""

import os
import shutil

import gymnasium as gym
import h5py
import jax
import numpy as np
import pytest

from ringrl.agents import sac, sac_collect
from ringrl.envs import generate
from ringrl.envs.datasets import load_d4rl
from ringrl.envs.scores import normalized_score
from ringrl.envs.trajectories import Trajectories
from ringrl.experiments import collect

# Hopper with a 40-step time limit, so that both terminations and timeouts occur at tiny size.
ENV = "ringrl-test/HopperShort-v5"
if ENV not in gym.registry:
    gym.register(ENV, entry_point="gymnasium.envs.mujoco.hopper_v5:HopperEnv", max_episode_steps=40)
CFG = sac.SACConfig(
    hidden=(32, 32),
    batch_size=32,
    start_steps=100,  # then 201 updates over the remaining steps
    snapshot_every=100,
    eval_episodes=2,
    checkpoint_every=100,
)
STEPS = 300


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("sac"))
    paths = sac_collect.collect_datasets(
        ENV, STEPS, out, dataset_steps=120, config=CFG, progress=False, log=lambda _: None
    )
    return out, paths


def test_collect_writes_five_d4rl_datasets(collected):
    out, paths = collected
    assert sorted(paths) == sorted(sac_collect.LEVELS)
    data = {level: load_d4rl(p, load_next_observations=True) for level, p in paths.items()}
    run = sac_collect.load_checkpoint(sac_collect.checkpoint_path(out, ENV))
    assert run.done and len(run.snapshots) == 3
    raw = open(sac_collect.checkpoint_path(out, ENV), "rb").read()  # no pickle, no class names
    assert not raw.startswith(b"\x80") and b"SACRun" not in raw and b"sac_collect" not in raw
    ref_min, ref_max = data["random"].returns.mean(), data["expert"].returns.mean()
    for level, d in data.items():
        assert os.path.basename(paths[level]) == f"hoppershort-{level}-ringrl-v0.hdf5"
        m = d.metadata
        assert m["env_id"] == ENV and m["level"] == level
        assert m["ref_min_score"] == pytest.approx(ref_min) and m["ref_max_score"] == pytest.approx(
            ref_max
        )
        # D4RL flags: every episode ends on exactly one of terminal / timeout; timeouts only at
        # the 40-step limit; a 40-step episode that did not terminate is a timeout.
        last = d.episode_starts[1:] - 1
        assert (d.terminals[last] ^ d.timeouts[last]).all()
        assert (d.lengths[d.timeouts[last]] == 40).all() and (d.lengths <= 40).all()
        assert d.terminals.sum() + d.timeouts.sum() == d.num_episodes
        assert np.abs(d.actions).max() <= 1.0
        # Within an episode the next observation is the following row's observation.
        inner = np.setdiff1d(np.arange(d.num_steps - 1), last)
        np.testing.assert_array_equal(d.next_observations[inner], d.observations[inner + 1])
    assert data["random"].num_steps >= 120 and data["expert"].num_steps >= 120
    assert any(d.timeouts.any() for d in data.values())
    assert any(d.terminals.any() for d in data.values())
    # medium-replay is the start of the replay buffer, up to the medium snapshot.
    medium = sac_collect.pick_medium(run.snapshots)
    replay = data["medium-replay"]
    assert data["medium"].metadata["policy_step"] == medium["step"] >= replay.num_steps
    np.testing.assert_array_equal(
        replay.observations, run.buffer["observations"][: replay.num_steps]
    )
    np.testing.assert_array_equal(replay.actions, run.buffer["actions"][: replay.num_steps])


def test_medium_expert_is_medium_then_expert(collected):
    _, paths = collected
    medium, expert, mix = (
        load_d4rl(paths[level], load_next_observations=True)
        for level in ("medium", "expert", "medium-expert")
    )
    assert mix.num_episodes == medium.num_episodes + expert.num_episodes
    assert mix.num_steps == medium.num_steps + expert.num_steps
    np.testing.assert_array_equal(mix.returns, np.concatenate([medium.returns, expert.returns]))
    for key in ("observations", "actions", "rewards", "terminals", "timeouts", "next_observations"):
        np.testing.assert_array_equal(
            getattr(mix, key), np.concatenate([getattr(medium, key), getattr(expert, key)])
        )
    for key in ("ref_min_score", "ref_max_score"):
        assert mix.metadata[key] == medium.metadata[key] == expert.metadata[key]
    # Scores of these files use their own references, not D4RL's.
    lo, hi = mix.metadata["ref_min_score"], mix.metadata["ref_max_score"]
    assert normalized_score(paths["medium-expert"], hi) == pytest.approx(100.0)
    assert normalized_score(paths["medium-expert"], lo) == pytest.approx(0.0)
    with pytest.raises(ValueError, match="different"):
        other = Trajectories(np.zeros((1, 3)), np.zeros((1, 3)), [0.0], [True], [False], [0, 1])
        Trajectories.concatenate([medium, other], {})


def _copy_run(out, tmp_path):
    """A fresh folder holding only the finished SAC checkpoint of `out` (no retraining)."""
    folder = tmp_path / "resume"
    folder.mkdir()
    path = sac_collect.checkpoint_path(out, ENV)
    shutil.copy(path, folder / os.path.basename(path))
    return str(folder)


def _collect(folder):
    return sac_collect.collect_datasets(
        ENV, STEPS, folder, dataset_steps=120, config=CFG, progress=False, log=lambda _: None
    )


def test_resume_after_failure_between_sets_keeps_finished_sets(collected, tmp_path, monkeypatch):
    out, paths = collected
    folder = _copy_run(out, tmp_path)
    real = generate.rollout_dataset

    def failing(env_id, policy, num_steps, *, seed, **kw):
        if seed == 2:  # the medium rollout, after random and expert (seeds 1 and 3)
            raise RuntimeError("simulated crash")
        return real(env_id, policy, num_steps, seed=seed, **kw)

    monkeypatch.setattr(generate, "rollout_dataset", failing)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _collect(folder)
    done = sorted(f for f in os.listdir(folder) if f.endswith(".hdf5"))
    assert done == ["hoppershort-expert-ringrl-v0.hdf5", "hoppershort-random-ringrl-v0.hdf5"]
    first = os.path.join(folder, done[1])
    before, stat = open(first, "rb").read(), os.stat(first)
    monkeypatch.setattr(generate, "rollout_dataset", real)
    resumed = _collect(folder)
    assert sorted(resumed) == sorted(sac_collect.LEVELS)
    # The finished set was neither rewritten nor touched.
    assert open(first, "rb").read() == before
    assert (os.stat(first).st_ino, os.stat(first).st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    # The resumed collection wrote what an uninterrupted one wrote.
    for level, path in resumed.items():
        a, b = load_d4rl(path), load_d4rl(paths[level])
        np.testing.assert_array_equal(a.observations, b.observations, err_msg=level)
        np.testing.assert_array_equal(a.episode_starts, b.episode_starts, err_msg=level)
        assert a.metadata == b.metadata
    # A set made by another collection is refused, not silently mixed in.
    with pytest.raises(ValueError, match="made by another collection"):
        sac_collect.collect_datasets(
            ENV, STEPS, folder, dataset_steps=100, config=CFG, progress=False, log=lambda _: None
        )


def test_failure_while_writing_leaves_no_partial_file(collected, tmp_path, monkeypatch):
    out, _ = collected
    folder = _copy_run(out, tmp_path)
    real = h5py.Group.create_dataset
    calls = {"rewards": 0}

    def failing(self, name, *args, **kwargs):
        if name == "rewards":
            calls["rewards"] += 1
            if calls["rewards"] == 3:  # in the middle of the third set (medium)
                raise OSError("simulated disk full")
        return real(self, name, *args, **kwargs)

    monkeypatch.setattr(h5py.Group, "create_dataset", failing)
    with pytest.raises(OSError, match="disk full"):
        _collect(folder)
    left = sorted(os.listdir(folder))
    assert not [f for f in left if f.startswith(".tmp-")]
    assert [f for f in left if f.endswith(".hdf5")] == [
        "hoppershort-expert-ringrl-v0.hdf5",
        "hoppershort-random-ringrl-v0.hdf5",
    ]


def test_table_of_sets(collected, capsys):
    out, paths = collected
    collect.main(["table", "--out", out])
    table = capsys.readouterr().out.splitlines()
    assert len(table) == 2 + len(paths)
    expert = load_d4rl(paths["expert"])
    row = next(r for r in table if "hoppershort-expert-" in r).split("|")
    assert int(row[2]) == expert.num_episodes and int(row[3]) == expert.num_steps
    assert float(row[4]) == pytest.approx(expert.returns.mean(), abs=0.05)
    assert float(row[6]) == pytest.approx(100.0, abs=0.05)  # the expert set defines 100
    with pytest.raises(SystemExit):
        collect.main(["table", "--out", os.path.join(out, "nope")])
    assert "is not a folder" in capsys.readouterr().err


def test_resume_is_bitwise_identical(collected, tmp_path):
    out, _ = collected
    full = sac_collect.load_checkpoint(sac_collect.checkpoint_path(out, ENV))
    first = sac_collect.train_sac(
        ENV, STEPS, str(tmp_path), config=CFG, progress=False, stop_after=150
    )
    assert 150 <= first.step < STEPS
    saved = sac_collect.load_checkpoint(sac_collect.checkpoint_path(str(tmp_path), ENV))
    assert saved.step == first.step  # the interruption left a checkpoint at that step
    resumed = sac_collect.train_sac(ENV, STEPS, str(tmp_path), config=CFG, progress=False)
    assert resumed.done
    for key, value in full.buffer.items():
        np.testing.assert_array_equal(resumed.buffer[key][:STEPS], value, err_msg=key)
    assert [s["eval_return"] for s in resumed.snapshots] == [
        s["eval_return"] for s in full.snapshots
    ]
    for a, b in zip(
        jax.tree.leaves(jax.device_get(resumed.state)), jax.tree.leaves(full.state), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_checkpoint_mismatch_and_corrupt(collected, tmp_path):
    out, _ = collected
    with pytest.raises(ValueError, match="rerun with the same settings"):
        sac_collect.train_sac(ENV, STEPS, out, seed=1, config=CFG, progress=False)
    bad = tmp_path / "bad.msgpack"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a readable SAC checkpoint"):
        sac_collect.load_checkpoint(str(bad))
    with pytest.raises(ValueError, match="positive number of steps"):
        sac_collect.train_sac(ENV, 0, str(tmp_path), config=CFG, progress=False)
    with pytest.raises(ValueError, match="continuous"):
        sac_collect.train_sac("CartPole-v1", 10, str(tmp_path), config=CFG, progress=False)


def test_tanh_logprob_matches_reference():
    rng = np.random.default_rng(0)
    u, mean = rng.normal(size=(2, 5, 3))
    log_std = rng.uniform(-2, 1, (5, 3))
    std = np.exp(log_std)
    gauss = -0.5 * ((u - mean) / std) ** 2 - np.log(std) - 0.5 * np.log(2 * np.pi)
    ref = (gauss - np.log(1 - np.tanh(u) ** 2)).sum(-1)
    got = sac._tanh_logprob(
        u.astype(np.float32), mean.astype(np.float32), log_std.astype(np.float32)
    )
    np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)


def test_pick_medium_and_paths():
    snaps = [{"step": s, "eval_return": r} for s, r in [(1, 0.0), (2, 50.0), (3, 90.0), (4, 300.0)]]
    assert sac_collect.pick_medium(snaps)["step"] == 3  # closest to 300 / 3
    with pytest.raises(ValueError, match="no policy snapshots"):
        sac_collect.pick_medium([])
    assert generate.dataset_path("d", "HalfCheetah-v5", "medium-replay") == os.path.join(
        "d", "halfcheetah-medium-replay-ringrl-v0.hdf5"
    )


def test_behaviour_scores_replay_the_snapshots_behind_the_sets(collected, tmp_path, capsys):
    out, paths = collected
    run = sac_collect.load_checkpoint(sac_collect.checkpoint_path(out, ENV))
    final = run.snapshots[-1]
    # The seed and count of the final snapshot's own evaluation during training.
    rows = sac_collect.behaviour_scores(
        ENV, out, episodes=CFG.eval_episodes, seed=10_000 + final["step"]
    )
    by = {(r["level"], r["mode"]): r for r in rows}
    assert sorted(by) == sorted(
        (lv, m) for lv in ("medium", "expert") for m in ("stochastic", "deterministic")
    )
    medium_step = load_d4rl(paths["medium"]).metadata["policy_step"]
    assert by["medium", "deterministic"]["policy_step"] == medium_step
    assert by["expert", "deterministic"]["policy_step"] == final["step"]
    # Deterministic expert episodes replay the snapshot evaluation exactly; stochastic differ.
    expert = by["expert", "deterministic"]["returns"]
    assert len(expert) == CFG.eval_episodes
    assert expert.mean() == pytest.approx(final["eval_return"], rel=1e-9)
    assert not np.allclose(by["expert", "stochastic"]["returns"], expert)
    with pytest.raises(ValueError, match="no SAC checkpoint.*fix: run `ringrl-collect mujoco"):
        sac_collect.behaviour_scores(ENV, str(tmp_path))
    monkeypatch = pytest.MonkeyPatch()
    with monkeypatch.context() as m:
        m.setattr(collect, "MUJOCO", (*collect.MUJOCO, ENV))
        collect.main(["policies", "--env", ENV, "--out", out, "--episodes", "2"])
    table = [r for r in capsys.readouterr().out.splitlines() if r.startswith("| ")]
    assert len(table) == 1 + 4 and "hoppershort-medium-ringrl-v0.hdf5" in table[1]


def test_pick_by_sampled_returns():
    # Expert = the best; medium = nearest a third of it among the snapshots up to the expert
    # (the later 140 is nearer 400 / 3 but comes after the expert).
    assert sac_collect.pick_by_sampled_returns([0.0, 50.0, 90.0, 400.0, 140.0]) == (2, 3)
    assert sac_collect.pick_by_sampled_returns([10.0, 30.0, 50.0, 120.0]) == (1, 3)  # tie: earlier
    assert sac_collect.pick_by_sampled_returns([5.0]) == (0, 0)
    with pytest.raises(ValueError, match="no policy snapshots"):
        sac_collect.pick_by_sampled_returns([])
    from ringrl.configs import d4rl_suite

    assert d4rl_suite.data_path("d", "hopper-medium", 1) == "d/hopper-medium-ringrl-v1.hdf5"
    config = d4rl_suite.get_config("set=hopper-medium,agent=dt,version=1,smoke")
    cell = d4rl_suite.cell(config, "hopper-medium", "dt", 1, 0)
    assert cell.data.path == "data/hopper-medium-ringrl-v1.hdf5"


def test_version_1_sets_come_from_the_same_run_with_sampled_picks(collected, tmp_path, capsys):
    out, v0_paths = collected
    ckpt = sac_collect.checkpoint_path(out, ENV)
    shutil.copy(ckpt, sac_collect.checkpoint_path(str(tmp_path), ENV))
    before = open(ckpt, "rb").read()
    kw = dict(dataset_steps=120, config=CFG, progress=False, log=lambda _: None)
    paths = sac_collect.collect_datasets(
        ENV, STEPS, str(tmp_path), version=1, pick_episodes=2, **kw
    )
    run = sac_collect.load_checkpoint(ckpt)
    # No more training: the checkpoint is the same run.
    assert open(sac_collect.checkpoint_path(str(tmp_path), ENV), "rb").read() == before
    data = {level: load_d4rl(p) for level, p in paths.items()}
    returns = sac_collect.sampled_returns(run, 2, sac_collect.PICK_SEED, progress=False)
    i_medium, i_expert = sac_collect.pick_by_sampled_returns(returns)
    for level, d in data.items():
        assert os.path.basename(paths[level]) == f"hoppershort-{level}-ringrl-v1.hdf5"
        assert d.metadata["dataset_version"] == 1 and d.metadata["pick_episodes"] == 2
        np.testing.assert_allclose(d.metadata["snapshot_sampled_returns"], returns, rtol=1e-12)
    assert data["expert"].metadata["policy_step"] == run.snapshots[i_expert]["step"]
    assert data["medium"].metadata["policy_step"] == run.snapshots[i_medium]["step"]
    assert data["medium"].metadata["ref_max_score"] == pytest.approx(data["expert"].returns.mean())
    # Version 0 files are a different collection: a v1 rerun with other pick settings is refused.
    assert "dataset_version" not in load_d4rl(v0_paths["medium"]).metadata
    with pytest.raises(ValueError, match="made by another collection.*pick_episodes"):
        sac_collect.collect_datasets(ENV, STEPS, str(tmp_path), version=1, pick_episodes=3, **kw)
    with pytest.raises(ValueError, match="dataset version 2 is not one of"):
        sac_collect.collect_datasets(ENV, STEPS, str(tmp_path), version=2, **kw)
    rows = sac_collect.behaviour_scores(ENV, str(tmp_path), episodes=2, version=1)
    assert {r["level"]: r["policy_step"] for r in rows} == {
        "medium": run.snapshots[i_medium]["step"],
        "expert": run.snapshots[i_expert]["step"],
    }
    with pytest.raises(ValueError, match="no set .*ringrl-v1.hdf5; fix: run `ringrl-collect"):
        sac_collect.behaviour_scores(ENV, out, episodes=2, version=1)
    table = generate.dataset_table(str(tmp_path), version=1).splitlines()
    assert len(table) == 2 + 5 and all("ringrl-v1" in row for row in table[2:])
    with pytest.raises(ValueError, match=r"no generated sets \(\*-\*-ringrl-v0.hdf5\)"):
        generate.dataset_table(str(tmp_path), version=0)
