"""Learning histories (improvement, determinism, dynamics, file round trip), D4RL-style rollouts
and replay-buffer cuts, and the `experiments.collect` command line."""

import os

import gymnasium as gym
import numpy as np
import pytest

from ringrl.envs import darkroom, generate
from ringrl.envs.datasets import load_d4rl
from ringrl.experiments import collect

TASKS = [0, 8, 20, 40, 44, 60, 72, 80]  # corners, centre, middle: near and far goals


@pytest.fixture(scope="module")
def histories():
    return generate.learning_histories("darkroom", TASKS, 300, seed=0)


def test_histories_show_learning(histories):
    s = generate.history_summary(histories)
    optimal = histories.metadata["ref_max_score"]
    assert optimal == np.mean([darkroom.optimal_return("darkroom", t) for t in TASKS])
    # First episodes are close to a random walk, the last ones close to optimal.
    assert s["first_return"] < histories.metadata["ref_min_score"] + 0.25 * optimal
    assert s["last_return"] > 0.9 * optimal
    assert s["last_return"] > s["first_return"] + 8.0
    # And per task, not only on average.
    returns = histories.returns.reshape(len(TASKS), 300)
    assert (returns[:, -30:].mean(1) > returns[:, :30].mean(1) + 2.0).all()


def test_histories_layout(histories):
    assert histories.num_episodes == len(TASKS) * 300 and histories.discrete_actions
    np.testing.assert_array_equal(histories.task_id, np.repeat(TASKS, 300))
    assert (histories.lengths == 20).all()  # DarkRoom never terminates, always times out
    assert histories.timeouts.sum() == histories.num_episodes and not histories.terminals.any()
    assert histories.metadata["env_id"] == darkroom.DARKROOM_ID


@pytest.mark.parametrize("env_id", [darkroom.DARKROOM_ID, darkroom.DARKKEYTODOOR_ID])
def test_histories_replay_in_gym_env(env_id):
    """Every stored step is what the gym env gives for the stored action."""
    data = generate.learning_histories(env_id, [3, 77], 60, seed=1)
    for e in range(0, data.num_episodes, 7):
        ep = data.episode(e)
        env = gym.make(env_id, task=ep["task_id"])
        obs, _ = env.reset(seed=e)
        for t in range(len(ep["rewards"])):
            np.testing.assert_array_equal(ep["observations"][t], obs)
            obs, r, term, trunc, _ = env.step(int(ep["actions"][t]))
            assert r == ep["rewards"][t]
            assert term == ep["terminals"][t] and (trunc and not term) == ep["timeouts"][t]
        assert term or trunc


def test_keytodoor_histories_learn_and_terminate():
    data = generate.learning_histories("darkkeytodoor", [5, 999, 4321], 200, seed=0)
    s = generate.history_summary(data)
    assert s["last_return"] > 1.8 and s["first_return"] < 1.0
    assert (
        data.terminals.any()
        and (data.returns[data.terminals[data.episode_starts[1:] - 1]] == 2).all()
    )


def test_histories_deterministic():
    a = generate.learning_histories("darkkeytodoor", [1, 2], 30, seed=7)
    b = generate.learning_histories("darkkeytodoor", [1, 2], 30, seed=7)
    c = generate.learning_histories("darkkeytodoor", [1, 2], 30, seed=8)
    for key in ("observations", "actions", "rewards", "terminals", "timeouts", "episode_starts"):
        np.testing.assert_array_equal(getattr(a, key), getattr(b, key))
    assert not np.array_equal(a.actions[: len(c.actions)], c.actions[: len(a.actions)])


def test_novel_exploration_covers_more_cells():
    """With epsilon 1 (pure exploration) a "novel" explorer's episode visits far more distinct
    cells than a uniform random walk, finds more goals and stays on them: what the default
    histories rely on."""

    def coverage(explore):
        data = generate.learning_histories(
            "darkroom", list(range(81)), 20, seed=0, eps_end=1.0, explore=explore
        )
        cells = [
            len({tuple(o) for o in data.observations[a:b]})
            for a, b in zip(data.episode_starts[:-1], data.episode_starts[1:], strict=True)
        ]
        returns = np.add.reduceat(data.rewards, data.episode_starts[:-1])
        return np.mean(cells), np.mean(returns > 0), np.mean(returns)

    (uniform_cells, uniform_found, uniform_return), (novel_cells, novel_found, novel_return) = map(
        coverage, ("uniform", "novel")
    )
    assert novel_cells > 16 > 12 > uniform_cells  # 17.5 (fewer once it stays) against 10.3
    assert novel_found > 1.5 * uniform_found  # 23% against 12% of the episodes
    assert novel_return > 5 * uniform_return  # win-stay: 2.45 against 0.24


def test_histories_bad_input():
    with pytest.raises(ValueError, match="valid: darkroom"):
        generate.learning_histories("lightroom", [0], 10)
    with pytest.raises(ValueError, match="task must be an integer"):
        generate.learning_histories("darkroom", [81], 10)
    with pytest.raises(ValueError, match="episodes_per_task must be >= 1"):
        generate.learning_histories("darkroom", [0], 0)
    with pytest.raises(ValueError, match="at least one task"):
        generate.learning_histories("darkroom", [], 10)
    with pytest.raises(ValueError, match="explore must be one of"):
        generate.learning_histories("darkroom", [0], 10, explore="greedy")


def test_histories_file_round_trip(histories, tmp_path):
    path = histories.save(tmp_path / "h.hdf5")
    back = load_d4rl(path)
    np.testing.assert_array_equal(back.task_id, histories.task_id)
    np.testing.assert_array_equal(back.observations, histories.observations)
    np.testing.assert_array_equal(back.actions, histories.actions)
    assert back.metadata["ref_max_score"] == histories.metadata["ref_max_score"]


def test_rollout_flags_timeout_and_terminal():
    # Pendulum never terminates: every episode ends on a time-limit row.
    eps = generate.rollout_episodes(
        "Pendulum-v1", generate.uniform_policy([-2.0], [2.0]), num_episodes=2, seed=0
    )
    for ep in eps:
        assert len(ep["rewards"]) == 200 and ep["timeouts"][-1] and not ep["terminals"].any()
        assert not ep["timeouts"][:-1].any()
        np.testing.assert_array_equal(ep["observations"][1:], ep["next_observations"][:-1])
    # Random Hopper falls: episodes end on a terminal row, never flagged as timeouts too.
    data = generate.rollout_dataset(
        "Hopper-v5", generate.uniform_policy(-np.ones(3), np.ones(3)), 300, seed=0, num_envs=4
    )
    assert data.num_steps >= 300 and data.terminals.sum() == data.num_episodes
    assert not data.timeouts.any() and data.metadata["env_id"] == "Hopper-v5"
    again = generate.rollout_dataset(
        "Hopper-v5", generate.uniform_policy(-np.ones(3), np.ones(3)), 300, seed=0, num_envs=4
    )
    np.testing.assert_array_equal(data.observations, again.observations)


def test_buffer_dataset_cuts_at_last_episode_end():
    n = 10
    buf = {
        "observations": np.arange(n, dtype=np.float32)[:, None],
        "next_observations": np.arange(1, n + 1, dtype=np.float32)[:, None],
        "actions": np.zeros((n, 1), np.float32),
        "rewards": np.ones(n, np.float32),
        "terminals": np.isin(np.arange(n), [2]),
        "timeouts": np.isin(np.arange(n), [5, 9]),
    }
    data = generate.buffer_dataset(buf, 8)
    assert data.num_steps == 6 and data.lengths.tolist() == [3, 3]
    assert data.terminals.tolist() == [0, 0, 1, 0, 0, 0] and data.timeouts[-1]
    with pytest.raises(ValueError, match="no episode ended"):
        generate.buffer_dataset(buf, 2)


def test_collect_cli_darkroom(tmp_path, capsys):
    out = tmp_path / "h.hdf5"
    collect.main(["darkroom", "--tasks", "3", "--episodes", "20", "--out", str(out)])
    text = capsys.readouterr().out
    assert "3 tasks x 20 episodes = 60 episodes, 1200 steps" in text and str(out) in text
    data = load_d4rl(str(out))
    assert data.num_episodes == 60 and len(data.metadata["heldout_tasks"]) == 17
    assert not set(data.metadata["train_tasks"]) & set(data.metadata["heldout_tasks"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["lightroom"], "valid: darkroom, darkkeytodoor, mujoco"),
        (["mujoco", "--env", "Ant-v5"], "valid: Hopper-v5, HalfCheetah-v5, Walker2d-v5"),
        (["darkroom", "--tasks", "90"], "cannot split 90 train"),
        (["darkroom", "--episodes", "0"], "episodes_per_task must be >= 1"),
    ],
)
def test_collect_cli_bad_input(argv, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        collect.main([*argv, "--out", str(tmp_path / "x.hdf5")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and err.count("\n") == 1
    assert os.listdir(tmp_path) == []  # nothing written, not even a temp file


def test_collect_cli_unwritable_out(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(SystemExit) as exit_info:
        collect.main(["darkroom", "--episodes", "2", "--out", str(blocker / "h.hdf5")])
    err = capsys.readouterr().err
    assert exit_info.value.code == 1 and "cannot write to" in err and "--out" in err
    assert sorted(os.listdir(tmp_path)) == ["file"]
