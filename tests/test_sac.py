"""SAC collector at a tiny size: four D4RL-style files with correct flags and references, exact
resume from a checkpoint, refused mismatched checkpoints, and the tanh-Gaussian log-density."""

import os

import gymnasium as gym
import jax
import numpy as np
import pytest

from ringrl.agents import sac, sac_collect
from ringrl.envs import generate
from ringrl.envs.datasets import load_d4rl

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


def test_collect_writes_four_d4rl_datasets(collected):
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
