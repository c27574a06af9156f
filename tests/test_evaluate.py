"""The evaluation harness's env loop, with policies that need no model."""

import numpy as np
import pytest

from ringrl.envs.darkroom import MOVES, SIZE
from ringrl.envs.evaluate import RandomPolicy, evaluate, format_table

# Explore the four cells next to the start and come back after each (up, down, down, up, ...).
_SWEEP = [1, 2, 2, 1, 3, 4, 4, 3]


class _MemoryPolicy:
    """Sweeps the start's neighbours in the first attempt, remembers where reward came, and goes
    straight there in later attempts: an in-context learner by construction."""

    def reset(self, num_envs):
        self.goal = [None] * num_envs  # used from the next attempt on
        self.seen = [None] * num_envs
        self.t = np.zeros(num_envs, int)
        self.prediction = None

    def act(self, observation, active):
        actions = []
        for i, (x, y) in enumerate(observation.astype(int)):
            if self.goal[i] is None:
                a = _SWEEP[self.t[i]] if self.t[i] < len(_SWEEP) else 0
            else:
                gx, gy = self.goal[i]
                a = 4 if gx > x else 3 if gx < x else 1 if gy > y else 2 if gy < y else 0
            actions.append(a)
        actions = np.array(actions)
        self.prediction = np.clip(observation.astype(int) + MOVES[actions], 0, SIZE - 1)
        return actions

    def observe(self, reward, done, active, truncated):
        for i in np.flatnonzero(reward > 0):
            self.seen[i] = tuple(self.prediction[i])
        for i in np.flatnonzero(done):
            self.goal[i] = self.seen[i]
        self.t = np.where(done, 0, self.t + 1)


def test_context_kept_across_attempts_and_reset_between_tasks():
    tasks = [31, 39, 41, 49, 31]  # the four cells next to the start (4, 4)
    result = evaluate(
        _MemoryPolicy(), "ringrl/DarkRoom-v0", num_envs=2, attempts=3, seed=0, tasks=tasks
    )
    # Attempt 1 passes the goal once; afterwards it walks 1 step and stays: 20 rewarded steps.
    np.testing.assert_array_equal(result["returns"], [[1, 20, 20]] * len(tasks))
    assert result["return_mean"] == [1, 20, 20]
    assert result["best_attempt_return_mean"] == 20 and result["last_attempt_return_mean"] == 20
    assert result["length_mean"] == [20, 20, 20] and result["num_episodes"] == 5
    assert "best attempt 20.00" in format_table(result)


def test_variable_length_episodes_and_seeding():
    import gymnasium as gym

    space = gym.make("CartPole-v1").action_space
    run = lambda: evaluate(RandomPolicy(space, 1), "CartPole-v1", num_envs=3, attempts=2, seed=5)
    result = run()
    returns, lengths = np.array(result["returns"]), np.array(result["lengths"])
    assert returns.shape == (3, 2)
    np.testing.assert_array_equal(returns, lengths)  # CartPole pays 1 per step
    assert len(set(lengths.ravel().tolist())) > 1  # episodes ended at different steps
    assert run()["returns"] == result["returns"]  # same seeds, same episodes
    assert result["normalized_return_mean"] is None  # no reference score for CartPole
    ref = evaluate(
        RandomPolicy(space, 1), "CartPole-v1", num_envs=3, attempts=2, seed=5, reference=(0, 500)
    )
    np.testing.assert_allclose(ref["normalized_return_mean"], returns.mean(0) / 5)


def test_start_noise_reaches_mujoco_and_is_refused_elsewhere():
    """config.eval.reset_noise_scale becomes gym.make's argument (MuJoCo); other envs refuse it
    in one line."""
    import ml_collections

    from ringrl.agents.evaluation import env_kwargs
    from ringrl.envs.evaluate import make_vector_env

    config = ml_collections.ConfigDict({"eval": {"max_steps": 0, "reset_noise_scale": 0.0}})
    assert env_kwargs(config) == {}
    config.eval.reset_noise_scale = 0.05
    assert env_kwargs(config) == {"reset_noise_scale": 0.05}
    starts = {}
    for scale in (0.0, 0.05):
        config.eval.reset_noise_scale = scale
        vec = make_vector_env("Hopper-v5", [None] * 8, env_kwargs(config))
        obs, _ = vec.reset(seed=0)
        starts[scale] = np.abs(obs[:, 1:] - obs[:, 1:].mean(0)).max()  # spread across envs
        vec.close()
    assert starts[0.0] < 0.02 < starts[0.05]  # Hopper's default noise is 5e-3
    with pytest.raises(ValueError, match=r"ringrl/DarkRoom-v0 does not take the evaluation"):
        make_vector_env("ringrl/DarkRoom-v0", [0], env_kwargs(config))


def test_unknown_env_id_names_the_problem():
    with pytest.raises(ValueError, match=r"unknown environment id 'ringrl/DarkRom-v0'; did you"):
        evaluate(RandomPolicy(None), "ringrl/DarkRom-v0", num_envs=1)
