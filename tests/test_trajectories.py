"""Trajectories: construction, derived quantities, selection, validation, HDF5 round trip."""

import os
import tracemalloc

import h5py
import numpy as np
import pytest

from ringrl.envs import trajectories as trajectories_module
from ringrl.envs.datasets import load_d4rl
from ringrl.envs.trajectories import Trajectories


def _episodes(rng, lengths=(3, 4, 5, 2), discrete=False, next_obs=False):
    """Episodes alternating terminal / timeout / unflagged endings, with task ids."""
    eps = []
    for i, t in enumerate(lengths):
        ep = {
            "observations": rng.normal(size=(t, 3)),
            "actions": rng.integers(0, 5, t) if discrete else rng.uniform(-1, 1, (t, 2)),
            "rewards": rng.normal(size=t),
            "terminals": np.zeros(t, bool),
            "timeouts": np.zeros(t, bool),
            "task_id": 10 + i,
        }
        if i % 3 == 0:
            ep["terminals"][-1] = True
        elif i % 3 == 1:
            ep["timeouts"][-1] = True
        if next_obs:
            ep["next_observations"] = rng.normal(size=(t, 3))
        eps.append(ep)
    return eps


def _assert_same(a: Trajectories, b: Trajectories) -> None:
    for key in ("observations", "actions", "rewards", "terminals", "timeouts", "episode_starts"):
        x, y = getattr(a, key), getattr(b, key)
        assert x.dtype == y.dtype, key
        np.testing.assert_array_equal(x, y, err_msg=key)
    for key in ("task_id", "next_observations"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None) == (y is None), key
        if x is not None:
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(x, y, err_msg=key)


def test_from_episodes_layout_and_derived():
    rng = np.random.default_rng(0)
    eps = _episodes(rng)
    tr = Trajectories.from_episodes(eps, metadata={"env_id": "x"})
    np.testing.assert_array_equal(tr.episode_starts, [0, 3, 7, 12, 14])
    np.testing.assert_array_equal(tr.lengths, [3, 4, 5, 2])
    assert tr.num_episodes == 4 and tr.num_steps == 14 and len(tr) == 4
    np.testing.assert_allclose(
        tr.returns, [np.float32(e["rewards"]).astype(np.float64).sum() for e in eps], rtol=1e-12
    )
    np.testing.assert_array_equal(tr.task_id, [10, 11, 12, 13])
    np.testing.assert_array_equal(np.flatnonzero(tr.terminals), [2, 13])
    np.testing.assert_array_equal(np.flatnonzero(tr.timeouts), [6])
    assert tr.observations.dtype == np.float32 and tr.actions.dtype == np.float32
    assert tr.rewards.dtype == np.float32 and tr.terminals.dtype == bool
    ep = tr.episode(-2)
    np.testing.assert_array_equal(ep["observations"], np.float32(eps[2]["observations"]))
    assert ep["task_id"] == 12 and not ep["terminals"].any() and not ep["timeouts"].any()
    with pytest.raises(IndexError, match="out of range"):
        tr.episode(4)


def test_from_episodes_discrete_and_both_flags():
    rng = np.random.default_rng(1)
    eps = _episodes(rng, discrete=True)
    eps[1]["terminals"][-1] = True  # gymnasium may report terminated and truncated together
    tr = Trajectories.from_episodes(eps)
    assert tr.discrete_actions and tr.actions.shape == (14,) and tr.actions.dtype == np.int64
    assert tr.terminals[6] and not tr.timeouts[6]


def test_select_and_sorted_by_return():
    rng = np.random.default_rng(2)
    tr = Trajectories.from_episodes(_episodes(rng, next_obs=True))
    sub = tr.select([2, 0, 2, -1])
    np.testing.assert_array_equal(sub.lengths, [5, 3, 5, 2])
    np.testing.assert_array_equal(sub.task_id, [12, 10, 12, 13])
    for new, old in zip(range(4), [2, 0, 2, 3]):
        a, b = sub.episode(new), tr.episode(old)
        for key in a:
            np.testing.assert_array_equal(a[key], b[key])
    mask = np.array([True, False, True, False])
    _assert_same(tr.select(mask), tr.select([0, 2]))
    asc = tr.sorted_by_return()
    assert np.all(np.diff(asc.returns) >= 0)
    np.testing.assert_array_equal(asc.task_id, tr.task_id[np.argsort(tr.returns, kind="stable")])
    desc = tr.sorted_by_return(descending=True)
    assert np.all(np.diff(desc.returns) <= 0)
    with pytest.raises(IndexError):
        tr.select([4])
    with pytest.raises(ValueError, match="no episodes"):
        tr.select([])


def _kwargs(n=6):
    return dict(
        observations=np.zeros((n, 2)),
        actions=np.zeros((n, 1)),
        rewards=np.zeros(n),
        terminals=np.zeros(n, bool),
        timeouts=np.zeros(n, bool),
        episode_starts=np.array([0, 3, n]),
    )


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(rewards=np.zeros(5)), "unequal lengths"),
        (dict(rewards=np.zeros((6, 2))), "'rewards' must be 1-D"),
        (dict(episode_starts=np.array([0, 3, 5])), "episode_starts"),
        (dict(episode_starts=np.array([0, 3, 3, 6])), "episode_starts"),
        (dict(terminals=np.eye(6, dtype=bool)[1]), "not the last step"),
        (dict(terminals=np.eye(6, dtype=bool)[2], timeouts=np.eye(6, dtype=bool)[2]), "both"),
        (dict(task_id=np.array([1, 2, 3])), "task_id"),
        (dict(observations=np.where(np.eye(6, 2) > 0, np.nan, 0)), "'observations'.*NaN"),
        (dict(rewards=np.array([0, 0, 0, 0, np.inf, 0])), "'rewards'.*row 4"),
        (dict(actions=np.zeros((6, 2, 2))), "'actions' must be"),
    ],
)
def test_invalid_construction(change, match):
    with pytest.raises(ValueError, match=match):
        Trajectories(**{**_kwargs(), **change})


def test_empty_rejected():
    with pytest.raises(ValueError, match="empty"):
        Trajectories(**{**_kwargs(0), "episode_starts": np.array([0])})
    with pytest.raises(ValueError, match="no episodes"):
        Trajectories.from_episodes([])


@pytest.mark.parametrize("discrete", [False, True])
def test_save_load_round_trip(tmp_path, discrete):
    rng = np.random.default_rng(3)
    tr = Trajectories.from_episodes(
        _episodes(rng, discrete=discrete, next_obs=not discrete),
        metadata={
            "env_id": "not-registered",
            "ref_min_score": -1.5,
            "ref_max_score": 20,
            "source": "test",
            "flag": True,
            "vec": np.arange(3.0),
            "nested": {"a": [1, 2], "b": None},
        },
    )
    # Move the unflagged episode to the middle: its boundary is implied by no flag, so the file
    # must carry episode_starts for an exact round trip.
    tr = tr.select([2, 0, 1, 3])
    path = tr.save(tmp_path / "sub" / "data.hdf5")
    with pytest.warns(UserWarning, match="not-registered"):  # metadata env id is not registered
        back = load_d4rl(path, load_next_observations=True)
    _assert_same(tr, back)
    md = back.metadata
    assert md["env_id"] == "not-registered" and md["source"] == "test" and md["flag"] is True
    assert md["ref_min_score"] == -1.5 and md["ref_max_score"] == 20
    assert md["nested"] == {"a": [1, 2], "b": None}
    np.testing.assert_array_equal(md["vec"], np.arange(3.0))
    assert set(md) == set(tr.metadata)
    with h5py.File(path) as f:  # plain D4RL schema underneath
        assert f["rewards"].shape == (14,) and f["terminals"].dtype == bool
        np.testing.assert_array_equal(f["infos/task_id"][()], np.repeat(tr.task_id, tr.lengths))
    assert os.listdir(tmp_path / "sub") == ["data.hdf5"]  # no temp file left behind


def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    tr = Trajectories.from_episodes(_episodes(np.random.default_rng(4)), metadata={"k": 1})
    with pytest.raises(ValueError, match="cannot be stored"):
        Trajectories(**{**_kwargs(), "metadata": {"bad": object()}}).save(tmp_path / "a.hdf5")

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(trajectories_module, "_write_metadata", boom)  # fails mid-write
    with pytest.raises(RuntimeError, match="disk full"):
        tr.save(tmp_path / "b.hdf5")
    assert os.listdir(tmp_path) == []
    # An existing file is left untouched by a failed overwrite.
    monkeypatch.undo()
    tr.save(tmp_path / "b.hdf5")
    before = (tmp_path / "b.hdf5").read_bytes()
    monkeypatch.setattr(trajectories_module, "_write_metadata", boom)
    with pytest.raises(RuntimeError):
        tr.select([0]).save(tmp_path / "b.hdf5")
    assert (tmp_path / "b.hdf5").read_bytes() == before
    assert os.listdir(tmp_path) == ["b.hdf5"]


def test_load_memory_peak(tmp_path):
    """Loading holds about one copy of the data (bound: 2.5x the data size, tracemalloc)."""
    n, s, a = 200_000, 17, 6
    rng = np.random.default_rng(5)
    path = tmp_path / "big.hdf5"
    with h5py.File(path, "w") as f:  # as d4rl ships it: float32, (N,) rewards, bool flags
        f["observations"] = rng.normal(size=(n, s)).astype(np.float32)
        f["actions"] = rng.uniform(-1, 1, (n, a)).astype(np.float32)
        f["rewards"] = rng.normal(size=n).astype(np.float32)
        f["terminals"] = np.zeros(n, bool)
        timeouts = np.zeros(n, bool)
        timeouts[999::1000] = True
        f["timeouts"] = timeouts
    data_bytes = n * (s + a + 1) * 4 + 2 * n
    tracemalloc.start()
    try:
        tr = load_d4rl(path)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert tr.num_episodes == 200 and tr.num_steps == n
    assert peak < 2.5 * data_bytes, (peak, data_bytes)
