"""Samplers of the agents: AT chain-of-hindsight packing, AD consecutive episodes, DT windows,
resumability (agents.sampler.ContextSampler, shared by all three)."""

import json

import numpy as np
import pytest

from ringrl.agents import ad, at, dt
from ringrl.envs.trajectories import Trajectories


def make_trajectories(with_tasks=True, seed=0):
    """Episodes whose observations encode (task, episode index, step) so tests can trace them."""
    rng = np.random.default_rng(seed)
    episodes, tasks = [], []
    for e in range(12):
        task = e % 3
        length = int(rng.integers(2, 7))
        obs = np.stack([np.full(length, task), np.full(length, e), np.arange(length)], 1)
        episodes.append(
            dict(
                observations=obs.astype(np.float32),
                actions=rng.integers(0, 4, length),
                rewards=rng.normal(size=length).astype(np.float32),
                terminals=np.arange(length) == length - 1,
            )
        )
        tasks.append(task)
    return Trajectories.from_episodes(episodes, task_ids=tasks if with_tasks else None)


@pytest.fixture(scope="module")
def data():
    return make_trajectories()


def slot_returns(batch, i, n, h):
    r = batch["rewards"][i] * batch["mask"][i]
    return r.reshape(n, h).sum(1)


@pytest.mark.parametrize("target", ["best", "none"])
def test_at_packing(data, target):
    n, h = 3, 5  # some episodes (length 6) are longer than the slot: truncated
    sampler = at.make_sampler(data, num_trajectories=n, horizon=h, seed=1, target=target)
    batch = sampler.sample(16)
    assert batch["observations"].shape == (16, n * h, 3)
    assert batch["actions"].shape == (16, n * h) and batch["actions"].dtype == np.int32
    lengths = data.lengths
    for i in range(16):
        obs, mask = batch["observations"][i], batch["mask"][i]
        returns = slot_returns(batch, i, n, h)
        assert np.all(np.diff(returns) >= -1e-6), "slots must be sorted by ascending return"
        assert len(set(obs[mask, 0].tolist())) == 1, "all trajectories of one task"
        want = returns.max() if target == "best" else 0.0  # "none": no per-task hint
        np.testing.assert_allclose(batch["target_returns"][i][mask], want, rtol=1e-6)
        previous = None  # (step index, action) of the last real step of the previous slot
        for j in range(n):
            sl = slice(j * h, (j + 1) * h)
            m, e = mask[sl], int(obs[sl][0, 1])
            used = min(lengths[e], h)
            assert m.sum() == used and m[:used].all()
            np.testing.assert_array_equal(batch["timesteps"][i, sl][:used], np.arange(used))
            np.testing.assert_array_equal(obs[sl][:used, 2], np.arange(used))  # first steps
            assert np.all(batch["traj_index"][i, sl] == j)
            # Every slot's last step is flagged: terminated if the episode really ended inside
            # the slot, truncated if the slot cut it (what evaluation reports at that step).
            terminated, truncated = np.zeros(h), np.zeros(h)
            (terminated if lengths[e] <= h else truncated)[used - 1] = 1
            np.testing.assert_array_equal(batch["terminated"][i, sl], terminated)
            np.testing.assert_array_equal(batch["truncated"][i, sl], truncated)
            # One-token steps see the previous real step, across the slot boundary.
            a = batch["actions"][i, sl][:used]
            assert batch["has_prev"][i, j * h] == (j > 0)
            if previous is not None:
                assert batch["prev_actions"][i, j * h] == previous
            np.testing.assert_array_equal(batch["prev_actions"][i, sl][1:used], a[:-1])
            np.testing.assert_array_equal(
                batch["prev_truncated"][i, sl][1:used], truncated[: used - 1]
            )
            previous = a[-1]
            s = data.episode_starts[e]
            np.testing.assert_array_equal(
                batch["actions"][i, sl][:used], data.actions[s : s + used]
            )


@pytest.mark.parametrize("n, stride", [(3, 1), (2, 3)])
def test_ad_consecutive(data, n, stride):
    """n episodes of one task's history in learning order, `stride` apart (1: consecutive)."""
    sampler = ad.make_sampler(data, num_trajectories=n, horizon=6, seed=2, stride=stride)
    batch = sampler.sample(8)
    for i in range(8):
        first = batch["observations"][i].reshape(n, 6, 3)[:, 0]
        task_eps = np.flatnonzero(data.task_id == first[0, 0])
        idx = [int(np.flatnonzero(task_eps == e)[0]) for e in first[:, 1]]
        assert np.all(first[:, 0] == first[0, 0])
        want = list(range(idx[0], idx[0] + n * stride, stride))
        assert idx == want, "every stride-th episode in learning order"
        assert np.all(batch["target_returns"][i] == 0)


def test_dt_windows(data):
    k = 4
    sampler = dt.make_sampler(data, context_steps=k, seed=3)
    batch = sampler.sample(32)
    assert batch["observations"].shape == (32, k, 3)
    for i in range(32):
        mask = batch["mask"][i]
        e = int(batch["observations"][i, 0, 1])
        steps = batch["observations"][i, mask, 2].astype(int)
        np.testing.assert_array_equal(batch["timesteps"][i, mask], steps)
        ep = data.episode(e)
        rtg = np.array([ep["rewards"][t:].sum() for t in steps])
        np.testing.assert_allclose(batch["target_returns"][i, mask], rtg, rtol=1e-5, atol=1e-5)
        assert mask[: mask.sum()].all()
        ends = batch["terminated"][i] + batch["truncated"][i]
        assert (ends.sum() == 1) == (steps[-1] == len(ep["rewards"]) - 1)


def test_no_task_ids_uses_whole_dataset():
    data = make_trajectories(with_tasks=False)
    batch = at.make_sampler(data, num_trajectories=4, horizon=6, seed=0).sample(16)
    tasks_per_sample = [
        len(set(b[m, 0].tolist())) for b, m in zip(batch["observations"], batch["mask"])
    ]
    assert max(tasks_per_sample) > 1


def test_deterministic_and_resumable(data):
    a = at.make_sampler(data, num_trajectories=2, horizon=6, seed=7)
    b = at.make_sampler(data, num_trajectories=2, horizon=6, seed=7)
    a.sample(4)
    saved = json.loads(json.dumps(a.state_dict(), default=int))  # survives a JSON round trip
    expected = [a.sample(4) for _ in range(2)]
    b.load_state_dict(saved)
    for want in expected:
        got = b.sample(4)
        for key in want:
            np.testing.assert_array_equal(got[key], want[key])
    c = at.make_sampler(data, num_trajectories=2, horizon=6, seed=8)
    c.sample(4)
    assert not np.array_equal(c.sample(4)["observations"], expected[0]["observations"])


@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (dt.make_sampler, dict(context_steps=0), "context_steps"),
        (at.make_sampler, dict(num_trajectories=0, horizon=4), "num_trajectories"),
        (at.make_sampler, dict(num_trajectories=2, horizon=0), "horizon"),
        (ad.make_sampler, dict(num_trajectories=50, horizon=4), "num_trajectories"),
        (ad.make_sampler, dict(num_trajectories=2, horizon=4, stride=0), "history_stride"),
        (ad.make_sampler, dict(num_trajectories=3, horizon=4, stride=2), "history_stride"),
    ],
)
def test_bad_arguments(data, make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(data, seed=0, **kwargs)


def test_unknown_mode_and_dt_slots():
    import ml_collections

    from ringrl.agents.agent import make_sampler

    config = ml_collections.ConfigDict(
        dict(data=dict(mode="xx", num_trajectories=2, horizon=4, context_steps=4))
    )
    with pytest.raises(ValueError, match=r"config.data.mode='xx' is unknown; use one of"):
        make_sampler(config, make_trajectories(), seed=0)
    config.data.mode = "dt"  # DT packs one trajectory window: n=2 is refused, not ignored
    with pytest.raises(ValueError, match="num_trajectories=2"):
        make_sampler(config, make_trajectories(), seed=0)
