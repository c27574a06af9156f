"""%BC (percentile behaviour cloning) pieces of the DT agent: the best-episodes mask."""

import numpy as np
import pytest


def test_top_episodes_takes_the_best_returns_up_to_the_step_budget():
    from ringrl.agents.dt import top_episodes

    returns = np.array([5.0, 9.0, 1.0, 7.0, 9.0])
    lengths = np.array([10, 30, 10, 20, 40])  # 110 steps
    # Best first: episode 1 (30 steps; tie with 4 broken by order), then 4 (70 in all), then 3
    # (90): a budget of 77 steps takes two, one of 55 steps only the first.
    assert top_episodes(returns, lengths, 0.7).tolist() == [False, True, False, False, True]
    assert top_episodes(returns, lengths, 0.5).tolist() == [False, True, False, False, False]
    assert top_episodes(returns, lengths, 0.1).tolist() == [False, True, False, False, False]
    assert top_episodes(returns, lengths, 1.0).all()
    with pytest.raises(ValueError, match="top_fraction=0 must be in"):
        top_episodes(returns, lengths, 0)


def test_window_sampler_draws_only_from_the_best_episodes():
    from ringrl.agents.dt import WindowSampler
    from ringrl.envs.trajectories import Trajectories

    lengths = np.array([12, 8, 10, 10])
    rewards_per_step = np.array([1.0, 3.0, 0.5, 2.0])  # returns 12, 24, 5, 20
    n = int(lengths.sum())
    starts = np.concatenate([[0], np.cumsum(lengths)])
    episode = np.repeat(np.arange(4), lengths)
    traj = Trajectories(
        observations=np.repeat(np.arange(4.0), lengths)[:, None].astype(np.float32),
        actions=np.zeros((n, 1), np.float32),
        rewards=rewards_per_step[episode].astype(np.float32),
        terminals=np.isin(np.arange(n), starts[1:] - 1),
        timeouts=np.zeros(n, bool),
        episode_starts=starts,
        metadata={},
    )
    # 45% of 40 steps = 18: episode 1 (24, 8 steps) then 3 (20, 10 steps) fit, 0 does not.
    sampler = WindowSampler(traj, context_steps=4, seed=0, top_fraction=0.45)
    assert sampler.drawn.tolist() == [False, True, False, True]
    batch = sampler.sample(256)
    seen = set(np.unique(batch["observations"][batch["mask"] > 0][:, 0]).astype(int).tolist())
    assert seen == {1, 3}
    assert WindowSampler(traj, context_steps=4, seed=0).drawn.all()
    assert sampler.episode_returns.tolist() == [12.0, 24.0, 5.0, 20.0]
    # An explicit episode mask (fit_probe's bands) wins over top_fraction.
    chosen = WindowSampler(
        traj, context_steps=4, seed=0, top_fraction=0.45, episodes=[True, False, True, False]
    )
    batch = chosen.sample(256)
    seen = set(np.unique(batch["observations"][batch["mask"] > 0][:, 0]).astype(int).tolist())
    assert seen == {0, 2}
    for bad in ([False] * 4, [True] * 3):
        with pytest.raises(ValueError, match="episodes must be a bool mask of shape"):
            WindowSampler(traj, context_steps=4, episodes=bad)
