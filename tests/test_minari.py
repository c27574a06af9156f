"""Minari loader and writer: T+1 observation layout, flags, round trip, bad input."""

import os

import gymnasium as gym
import numpy as np
import pytest

minari = pytest.importorskip("minari")

from ringrl.envs.minari_io import export_minari, load_minari  # noqa: E402
from ringrl.envs.trajectories import Trajectories  # noqa: E402


@pytest.fixture
def root(tmp_path, monkeypatch):
    path = tmp_path / "minari"
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(path))
    return path


def _hopper_like(rng, discrete=False):
    eps = []
    for i, t in enumerate([3, 4, 5, 2]):
        o = rng.normal(size=(t + 1, 11))
        eps.append(
            {
                "observations": o[:-1],
                "next_observations": o[1:],
                "actions": rng.integers(0, 4, t) if discrete else rng.uniform(-1, 1, (t, 3)),
                "rewards": rng.normal(size=t),
                "terminals": np.r_[np.zeros(t - 1), i % 3 == 0],
                "timeouts": np.r_[np.zeros(t - 1), i % 3 == 1],
                "task_id": 5 - i,
            }
        )
    return eps


def _assert_same(a, b, keys):
    for key in keys:
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype, key
        np.testing.assert_array_equal(x, y, err_msg=key)


CORE = ("observations", "actions", "rewards", "terminals", "timeouts", "episode_starts", "task_id")


def test_round_trip_with_env(root):
    rng = np.random.default_rng(0)
    tr = Trajectories.from_episodes(
        _hopper_like(rng),
        metadata={"env_id": "Hopper-v5", "ref_min_score": -20.0, "ref_max_score": 3000.0, "k": 1},
    )
    path = export_minari(tr, "ringrl/hopper/test-v0")
    assert path == str(root / "ringrl" / "hopper" / "test-v0")
    assert not [p for p in os.listdir(root) if p.startswith(".")]  # temp folder removed
    # Readable by Minari itself, with T+1 observations and our reference scores.
    ds = minari.load_dataset("ringrl/hopper/test-v0")
    assert ds.total_episodes == 4 and ds.total_steps == 14
    ep = ds[1]
    assert ep.observations.shape == (5, 11) and len(ep.actions) == 4
    assert ep.truncations[-1] and not ep.terminations.any()
    np.testing.assert_allclose(minari.get_normalized_score(ds, np.array([1490.0])), [0.5])
    assert ds.env_spec.id == "Hopper-v5"
    back = load_minari("ringrl/hopper/test-v0", load_next_observations=True)
    _assert_same(tr, back, CORE + ("next_observations",))
    assert back.metadata["ref_min_score"] == -20.0 and back.metadata["ref_max_score"] == 3000.0
    assert back.metadata["env_id"] == "Hopper-v5" and back.metadata["k"] == 1
    assert load_minari("ringrl/hopper/test-v0").next_observations is None


def test_round_trip_discrete_with_spaces_and_partial_episode(root):
    rng = np.random.default_rng(1)
    eps = _hopper_like(rng, discrete=True)
    for ep in eps:
        del ep["next_observations"]
    tr = Trajectories.from_episodes(eps).select([2, 0, 1, 3])  # unflagged episode first
    export_minari(
        tr,
        "grid-v1",
        observation_space=gym.spaces.Box(-10, 10, (11,), np.float32),
        action_space=gym.spaces.Discrete(4),
    )
    back = load_minari("grid-v1", load_next_observations=True)
    _assert_same(tr, back, CORE)
    assert "ref_min_score" not in back.metadata
    # Without stored successors the final Minari observation repeats the last one.
    np.testing.assert_array_equal(back.next_observations[4], tr.observations[4])


@pytest.mark.filterwarnings("ignore:.*(permalink|author|eval_env).*:UserWarning")
def test_loads_datacollector_dataset(root):
    """A dataset recorded by Minari's DataCollector matches the steps taken, row by row."""
    from minari import DataCollector

    class TaskInfo(gym.Wrapper):
        # record_infos=True needs the same info keys at reset and at every step.
        def reset(self, **kwargs):
            obs, _ = self.env.reset(**kwargs)
            return obs, {"task_id": 7}

        def step(self, action):
            obs, r, term, trunc, _ = self.env.step(action)
            return obs, r, term, trunc, {"task_id": 7}

    env = DataCollector(TaskInfo(gym.make("CartPole-v1", max_episode_steps=12)), record_infos=True)
    rng = np.random.default_rng(2)
    seen = []  # (obs, action, reward, next_obs, terminated, truncated)
    for ep in range(4):
        obs, _ = env.reset(seed=ep)
        done = False
        while not done:
            a = int(rng.integers(2))
            nxt, r, term, trunc, _ = env.step(a)
            seen.append((obs, a, r, nxt, term, trunc))
            obs, done = nxt, term or trunc
    env.create_dataset("cartpole/random-v0", algorithm_name="random", description="test")
    env.close()
    tr = load_minari("cartpole/random-v0", load_next_observations=True)
    assert tr.num_steps == len(seen)
    o, a, r, n, term, trunc = (np.array(x) for x in zip(*seen))
    np.testing.assert_array_equal(tr.observations, o.astype(np.float32))
    np.testing.assert_array_equal(tr.next_observations, n.astype(np.float32))
    np.testing.assert_array_equal(tr.actions, a)
    np.testing.assert_array_equal(tr.rewards, r.astype(np.float32))
    np.testing.assert_array_equal(tr.terminals, term)
    np.testing.assert_array_equal(tr.timeouts, trunc & ~term)
    np.testing.assert_array_equal(tr.task_id, [7, 7, 7, 7])
    assert tr.terminals.any() or tr.timeouts.any()
    assert tr.metadata["env_id"] == "CartPole-v1"


def test_missing_dataset_id(root):
    with pytest.raises(FileNotFoundError, match="'nope/x-v0' is not present locally.*fix"):
        load_minari("nope/x-v0")


def test_export_bad_input(root):
    tr = Trajectories.from_episodes(_hopper_like(np.random.default_rng(3)))
    with pytest.raises(ValueError, match="malformed"):
        export_minari(tr, "no version")
    with pytest.raises(ValueError, match="both or neither"):
        export_minari(tr, "a-v0", ref_min_score=1.0)
    bad = tr.select(range(4))
    bad.actions[5, 0] = 2.0
    with pytest.raises(ValueError, match="outside Hopper-v5's action bounds"):
        export_minari(bad, "a-v0", env_id="Hopper-v5")
    export_minari(tr, "a-v0")
    with pytest.raises(ValueError, match="already exists"):
        export_minari(tr, "a-v0")


def test_failed_export_leaves_nothing(root, monkeypatch):
    from minari.dataset.minari_storage import MinariStorage

    tr = Trajectories.from_episodes(_hopper_like(np.random.default_rng(4)))

    def boom(self, metadata):
        raise RuntimeError("disk full")

    monkeypatch.setattr(MinariStorage, "update_metadata", boom)  # fails after data is written
    with pytest.raises(RuntimeError, match="disk full"):
        export_minari(tr, "ns/b-v0")
    monkeypatch.undo()
    assert os.listdir(root) == []
    with pytest.raises(FileNotFoundError):
        load_minari("ns/b-v0")
