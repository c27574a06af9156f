"""DarkRoom / DarkKeyToDoor: env checker, hand-computed returns, hidden fixed goals, task splits,
and the numpy vector env against the gym env step by step."""

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

from ringrl.envs import darkroom


def path_to(start, target):
    """Shortest action sequence on the grid from start to target (x first, then y)."""
    (x, y), (tx, ty) = start, target
    return [4 if tx > x else 3] * abs(tx - x) + [1 if ty > y else 2] * abs(ty - y)


@pytest.mark.parametrize("env_id", [darkroom.DARKROOM_ID, darkroom.DARKKEYTODOOR_ID])
def test_check_env_and_registration(env_id):
    env = gym.make(env_id, task=7)
    assert env.spec.max_episode_steps == darkroom.HORIZON[darkroom.canonical_name(env_id)]
    check_env(env.unwrapped, skip_render_check=True)


def test_darkroom_hand_computed_return_and_fixed_goal():
    task = 0  # goal (0, 0): 8 moves from the centre, so reward on steps 8..20 = 13
    assert darkroom.task_cells("darkroom", task).tolist() == [[0, 0]]
    assert darkroom.optimal_return("darkroom", task) == 13.0
    assert darkroom.optimal_return("darkroom", 40) == 20.0  # goal at the start
    for seed in (0, 1, 123):  # reseeding must not move the hidden goal
        env = gym.make(darkroom.DARKROOM_ID, task=task)
        obs, _ = env.reset(seed=seed)
        assert obs.tolist() == [4.0, 4.0] and obs.dtype == np.float32
        actions = path_to((4, 4), (0, 0)) + [0] * 20
        total, steps = 0.0, 0
        for a in actions:
            obs, r, term, trunc, _ = env.step(a)
            total, steps = total + r, steps + 1
            assert not term
            if trunc:
                break
        assert steps == 20 and total == 13.0 and obs.tolist() == [0.0, 0.0]


def test_darkroom_walls_clip():
    env = darkroom.DarkRoom(task=80)
    env.reset()
    for _ in range(6):
        obs, *_ = env.step(4)  # right: stops at x = 8
    assert obs.tolist() == [8.0, 4.0]


def test_keytodoor_key_then_door():
    task = 123
    key, door = darkroom.task_cells("darkkeytodoor", task).tolist()
    env = gym.make(darkroom.DARKKEYTODOOR_ID, task=task)
    env.reset(seed=5)
    # Walking to the door first gives nothing: the key is needed.
    for a in path_to((4, 4), door):
        _, r, term, _, _ = env.step(a)
        assert r == 0.0 and not term
    rewards, pos = [], door
    for a in path_to(pos, key) + path_to(key, door):
        obs, r, term, trunc, _ = env.step(a)
        rewards.append(r)
    assert sum(rewards) == 2.0 and term and not trunc and obs[2] == 1.0
    assert darkroom.optimal_return("darkkeytodoor", task) == 2.0


def test_keytodoor_task_ids_cover_distinct_pairs():
    pairs = {tuple(map(tuple, darkroom.task_cells("darkkeytodoor", t))) for t in range(6480)}
    assert len(pairs) == 6480 and all(k != d for k, d in pairs)


def test_task_split_disjoint_and_deterministic():
    train, held = darkroom.task_split("darkroom", 60, 21, seed=3)
    assert len(train) == 60 and len(held) == 21 and not set(train) & set(held)
    assert set(train) | set(held) == set(range(81))
    assert darkroom.task_split("darkroom", 60, 21, seed=3) == (train, held)
    assert darkroom.task_split("darkroom", 60, 21, seed=4) != (train, held)
    train, held = darkroom.task_split("ringrl/DarkKeyToDoor-v0", 100, 20, seed=0)
    assert not set(train) & set(held) and max(train + held) < 6480


def test_bad_input():
    with pytest.raises(ValueError, match="valid: darkroom, darkkeytodoor"):
        darkroom.task_split("darkrom", 1, 1)
    with pytest.raises(ValueError, match="cannot split"):
        darkroom.task_split("darkroom", 80, 2)
    with pytest.raises(ValueError, match=r"task must be an integer in \[0, 81\)"):
        gym.make(darkroom.DARKROOM_ID, task=81)
    with pytest.raises(ValueError, match="task must be an integer"):
        darkroom.DarkKeyToDoor(task=-1)
    env = darkroom.DarkRoom(task=1)
    env.reset()
    with pytest.raises(ValueError, match="action must be an int"):
        env.step(5)
    with pytest.raises(ValueError, match="actions must be ints"):
        darkroom.VectorDarkRoom("darkroom", [1, 2]).step(np.array([0, 7]))


@pytest.mark.parametrize("env_id", [darkroom.DARKROOM_ID, darkroom.DARKKEYTODOOR_ID])
def test_vector_env_matches_gym_env(env_id):
    name = darkroom.canonical_name(env_id)
    rng = np.random.default_rng(0)
    tasks = rng.choice(darkroom.num_tasks(name), 6, replace=False)
    vec = darkroom.VectorDarkRoom(env_id, tasks)
    envs = [gym.make(env_id, task=int(t)) for t in tasks]
    obs = [e.reset(seed=i)[0] for i, e in enumerate(envs)]
    np.testing.assert_array_equal(vec.obs(), np.stack(obs))
    # Even rows follow the route to the goal (key, then door) so that rewards and terminations
    # happen; odd rows act at random. Episodes end at different steps and are reset per row.
    routes = []
    for t in tasks:
        cells = darkroom.task_cells(name, int(t)).tolist()
        extra = path_to(cells[0], cells[1]) if len(cells) > 1 else []
        routes.append(path_to((4, 4), cells[0]) + extra)
    t_in_episode = np.zeros(len(tasks), int)
    saw_reward = saw_term = saw_trunc = False
    for _ in range(3 * darkroom.HORIZON[name]):
        acts = np.array(
            [
                routes[i][t_in_episode[i]]
                if i % 2 == 0 and t_in_episode[i] < len(routes[i])
                else rng.integers(5)
                for i in range(len(tasks))
            ]
        )
        v_obs, v_r, v_term, v_trunc = vec.step(acts)
        for i, env in enumerate(envs):
            o, r, term, trunc, _ = env.step(int(acts[i]))
            np.testing.assert_array_equal(v_obs[i], o)
            assert (v_r[i], v_term[i], v_trunc[i]) == (r, term, trunc)
            if term or trunc:
                env.reset()
        saw_reward |= bool(v_r.any())
        saw_term |= bool(v_term.any())
        saw_trunc |= bool(v_trunc.any())
        ended = v_term | v_trunc
        t_in_episode = np.where(ended, 0, t_in_episode + 1)
        np.testing.assert_array_equal(
            vec.reset(ended), np.stack([e.unwrapped._obs() for e in envs])
        )
    assert saw_reward and saw_trunc and (saw_term or name == "darkroom")


@pytest.mark.parametrize("name", ["darkroom", "darkkeytodoor"])
def test_state_index_round_trip(name):
    vec = darkroom.VectorDarkRoom(name, [3] * (2 * 81))
    index = np.arange(vec.num_envs) % vec.num_states  # every state, has_key ones included
    vec.set_state_index(index)
    np.testing.assert_array_equal(vec.state_index(), index)
    np.testing.assert_array_equal(vec.obs(), darkroom.state_observations(name, index))
