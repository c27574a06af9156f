"""ExoRL-style episode folders: T+1 layout with a dummy first row, flags, relabelling, bad input."""

import importlib.util

import numpy as np
import pytest

from ringrl.envs.exorl import load_exorl


def _save(folder, index, obs, actions, rewards, discount, physics=None, stamp="20220101T000000"):
    """One ExoRL episode file: every key has T+1 rows; row 0 is the reset (dummy transition)."""
    t = len(actions)
    episode = {
        "observation": np.asarray(obs, np.float32),
        "action": np.concatenate([np.zeros((1, actions.shape[1])), actions]).astype(np.float32),
        "reward": np.concatenate([[0.0], rewards]).astype(np.float32)[:, None],
        "discount": np.concatenate([[1.0], discount]).astype(np.float32)[:, None],
        "physics": physics if physics is not None else np.zeros((t + 1, 4)),
    }
    np.savez_compressed(folder / f"{stamp}_{index}_{t}.npz", **episode)
    return episode


def _random_folder(tmp_path, lengths=(4, 3, 5), terminal_last=False):
    rng = np.random.default_rng(0)
    eps = []
    for i, t in enumerate(lengths):
        discount = np.ones(t)
        if terminal_last and i == len(lengths) - 1:
            discount[-1] = 0.0
        eps.append(
            _save(
                tmp_path,
                i,
                rng.normal(size=(t + 1, 5)),
                rng.uniform(-1, 1, (t, 2)),
                rng.normal(size=t),
                discount,
            )
        )
    return eps


def test_layout(tmp_path):
    eps = _random_folder(tmp_path, terminal_last=True)
    tr = load_exorl(tmp_path, load_next_observations=True)
    np.testing.assert_array_equal(tr.episode_starts, [0, 4, 7, 12])
    for e, ep in enumerate(eps):
        got = tr.episode(e)
        np.testing.assert_array_equal(got["observations"], ep["observation"][:-1])
        np.testing.assert_array_equal(got["next_observations"], ep["observation"][1:])
        np.testing.assert_array_equal(got["actions"], ep["action"][1:])  # dummy row 0 dropped
        np.testing.assert_array_equal(got["rewards"], ep["reward"][1:, 0])
    np.testing.assert_array_equal(np.flatnonzero(tr.timeouts), [3, 6])  # time limit
    np.testing.assert_array_equal(np.flatnonzero(tr.terminals), [11])  # discount 0
    assert tr.metadata["source"] == "exorl"


def test_file_name_order(tmp_path):
    rng = np.random.default_rng(1)
    late = _save(
        tmp_path, 1, rng.normal(size=(3, 5)), np.zeros((2, 2)), np.ones(2), np.ones(2), stamp="2"
    )
    early = _save(
        tmp_path, 0, rng.normal(size=(4, 5)), np.zeros((3, 2)), np.ones(3), np.ones(3), stamp="1"
    )
    tr = load_exorl(tmp_path)
    np.testing.assert_array_equal(tr.lengths, [3, 2])
    np.testing.assert_array_equal(tr.observations[0], early["observation"][0])
    np.testing.assert_array_equal(tr.observations[3], late["observation"][0])


def test_missing_and_empty(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_exorl(tmp_path / "nope")
    with pytest.raises(ValueError, match="no .npz episode files"):
        load_exorl(tmp_path)


def test_missing_key(tmp_path):
    np.savez(
        tmp_path / "a_0_2.npz",
        observation=np.zeros((3, 5)),
        action=np.zeros((3, 2)),
        reward=np.zeros(3),
    )
    with pytest.raises(ValueError, match=r"a_0_2.npz: missing key 'discount'.*fix"):
        load_exorl(tmp_path)


def test_unequal_lengths(tmp_path):
    np.savez(
        tmp_path / "a_0_2.npz",
        observation=np.zeros((3, 5)),
        action=np.zeros((2, 2)),
        reward=np.zeros(3),
        discount=np.ones(3),
    )
    with pytest.raises(ValueError, match="unequal lengths.*'action': 2"):
        load_exorl(tmp_path)


def test_not_npz(tmp_path):
    (tmp_path / "x.npz").write_text("hello")
    with pytest.raises(ValueError, match="x.npz: not an .npz file"):
        load_exorl(tmp_path)


def test_single_row_episode(tmp_path):
    np.savez(tmp_path / "a.npz", observation=np.zeros((1, 5)), action=np.zeros((1, 2)),
             reward=np.zeros(1), discount=np.ones(1))  # fmt: skip
    with pytest.raises(ValueError, match="no transition"):
        load_exorl(tmp_path)


def test_mixed_observation_shapes(tmp_path):
    _save(tmp_path, 0, np.zeros((3, 5)), np.zeros((2, 2)), np.ones(2), np.ones(2), stamp="1")
    _save(tmp_path, 1, np.zeros((3, 6)), np.zeros((2, 2)), np.ones(2), np.ones(2), stamp="2")
    with pytest.raises(ValueError, match="one domain per folder"):
        load_exorl(tmp_path)


@pytest.mark.parametrize("key", ["observation", "reward"])
def test_non_finite(tmp_path, key):
    obs, rew = np.zeros((4, 5)), np.zeros(3)
    (obs if key == "observation" else rew)[2] = np.nan
    _save(tmp_path, 0, obs, np.zeros((3, 2)), rew, np.ones(3))
    name = "observations" if key == "observation" else "rewards"
    with pytest.raises(ValueError, match=f"'{name}' contains NaN or inf"):
        load_exorl(tmp_path)


def test_discount_zero_mid_episode(tmp_path):
    _save(tmp_path, 0, np.zeros((4, 5)), np.zeros((3, 2)), np.ones(3), np.array([1.0, 0.0, 1.0]))
    with pytest.raises(ValueError, match="discount is 0 before the last step"):
        load_exorl(tmp_path)


def test_bad_relabel_task(tmp_path):
    _random_folder(tmp_path)
    with pytest.raises(ValueError, match="neither a task name nor a dm_control environment"):
        load_exorl(tmp_path, relabel_task=42)


@pytest.mark.skipif(
    importlib.util.find_spec("dm_control") is not None, reason="dm_control is installed here"
)
def test_relabel_without_dm_control(tmp_path):
    _random_folder(tmp_path)
    with pytest.raises(ImportError, match=r"ringrl\[dmc\]"):
        load_exorl(tmp_path, relabel_task="walker_run")


def _flat(time_step):
    return np.concatenate([np.ravel(v) for v in time_step.observation.values()])


def test_relabel_with_dm_control(tmp_path):
    suite = pytest.importorskip(
        "dm_control.suite", reason="needs the dmc extra (dm-control with mujoco 3.17)"
    )
    rng = np.random.default_rng(0)
    walk = suite.load("walker", "walk", task_kwargs={"random": 0})
    run = suite.load("walker", "run", task_kwargs={"random": 0})
    spec = walk.action_spec()
    t = 12
    runs = []
    for i in range(2):
        ts = walk.reset()
        obs, physics = [_flat(ts)], [walk.physics.get_state().copy()]
        actions = rng.uniform(spec.minimum, spec.maximum, (t, spec.shape[0]))
        rewards = []
        for a in actions:
            ts = walk.step(a)
            obs.append(_flat(ts))
            physics.append(walk.physics.get_state().copy())
            rewards.append(ts.reward)
        _save(tmp_path, i, np.array(obs), actions, np.array(rewards), np.ones(t), np.array(physics))
        # Ground truth for another task of the domain: step "run" through the same states.
        run.reset()
        with run.physics.reset_context():
            run.physics.set_state(physics[0])
        runs.append([run.step(a).reward for a in actions])
    same = load_exorl(tmp_path, relabel_task="walker_walk")
    stored = load_exorl(tmp_path)
    np.testing.assert_allclose(same.rewards, stored.rewards, rtol=1e-5, atol=1e-6)
    relabelled = load_exorl(tmp_path, relabel_task="walker_run")
    np.testing.assert_allclose(relabelled.rewards, np.ravel(runs), rtol=1e-5, atol=1e-6)
    assert not np.allclose(relabelled.rewards, stored.rewards)
    assert relabelled.metadata["relabel_task"] == "walker_run"
    by_env = load_exorl(tmp_path, relabel_task=run)
    np.testing.assert_array_equal(by_env.rewards, relabelled.rewards)
    with pytest.raises(ValueError, match="not a dm_control suite task"):
        load_exorl(tmp_path, relabel_task="walker_fly")
    with pytest.raises(ValueError, match="dimension"):
        load_exorl(tmp_path, relabel_task="cheetah_run")
