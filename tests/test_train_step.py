"""Sharded train step: compiles once, donates the state, learns, and follows the schedule."""

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from ringrl.agents import at, sharding, step
from ringrl.envs.trajectories import Trajectories
from ringrl.ring.mesh import DATA, SEQ, make_mesh

N_TRAJ, HORIZON, BATCH = 2, 4, 4


def config():
    c = ml_collections.ConfigDict()
    c.num_steps = 20
    c.optim = dict(lr=3e-3, warmup_steps=2, weight_decay=1e-4, grad_clip=1.0)
    return c


def toy_data():
    """Two tasks; the action is a function of the observation, so it can be learned."""
    rng = np.random.default_rng(0)
    episodes, tasks = [], []
    for e in range(8):
        obs = rng.normal(size=(HORIZON, 2)).astype(np.float32)
        actions = (obs[:, 0] > 0).astype(np.int64) + 2 * (e % 2)
        rewards = (actions == 1).astype(np.float32)
        episodes.append(dict(observations=obs, actions=actions, rewards=rewards))
        tasks.append(e % 2)
    return Trajectories.from_episodes(episodes, task_ids=tasks)


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh([(DATA, 2), (SEQ, 4)], jax.devices("cpu")[:8])
    model = at.make_model(
        action_dim=4,
        discrete=True,
        num_trajectories=N_TRAJ,
        horizon=HORIZON,
        embed_dim=16,
        num_layers=1,
        num_heads=2,
    )
    sampler = at.make_sampler(toy_data(), num_trajectories=N_TRAJ, horizon=HORIZON, seed=0)
    state = step.init_state(model, config(), mesh, jax.random.key(0), obs_dim=2)
    train_step = step.make_train_step(model, config(), mesh, max_traces=1)
    return mesh, model, sampler, state, train_step


def test_train_step_compiles_once_donates_and_learns(setup):
    mesh, model, sampler, state, train_step = setup
    for leaf in jax.tree.leaves(state):
        assert leaf.sharding.spec == P() and leaf.sharding.mesh.shape == mesh.shape
    batch = sharding.put_batch(sampler.sample(BATCH), mesh)
    assert batch["observations"].sharding.spec == P(DATA, SEQ)
    schedule = step.make_schedule(config())
    losses = []
    for i in range(8):  # the same batch: the loss must go down
        old = state
        state, metrics = train_step(state, batch)
        assert jax.tree.leaves(old.params)[0].is_deleted(), "state must be donated"
        np.testing.assert_allclose(metrics["lr"], schedule(i), rtol=1e-6)
        losses.append(float(metrics["loss"]))
        assert np.isfinite(float(metrics["grad_norm"])) and float(metrics["grad_norm"]) > 0
    assert int(state.step) == 8
    assert losses[-1] < 0.7 * losses[0], losses
    # A fresh batch of the same shapes: still the one compiled step (assert_max_traces n=1).
    host = sampler.sample(BATCH)
    state, _ = train_step(state, sharding.put_batch(host, mesh))
    # Eval-mode forward: predictions in original step order and the same loss definition.
    pred, aux = step.make_eval_step(model, mesh)(state.params, sharding.put_batch(host, mesh))
    assert pred.shape == (BATCH, N_TRAJ * HORIZON, 4)
    assert int(aux["num_targets"]) == host["mask"].sum()
    assert float(aux["loss"]) < losses[0]


def test_schedule_and_config_errors():
    s = step.make_schedule(config())
    assert float(s(0)) == 0.0 and np.isclose(float(s(2)), 3e-3) and float(s(20)) < 1e-8
    bad = config()
    del bad.optim["grad_clip"]
    with pytest.raises(ValueError, match="grad_clip"):
        step.make_optimizer(bad)
