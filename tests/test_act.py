"""Cached acting equals recomputing the full context each step, across steps and attempts."""

import jax
import numpy as np
import pytest

from ringrl.agents import act, ad, at, backbone, dt
from ringrl.agents.batch import link_previous
from ringrl.ring.mesh import make_mesh

B, S, A = 2, 2, 3
ATTEMPT_LENGTHS = (3, 4)  # two attempts; the first ends early (done) after 3 steps


def _at_model(tokens_per_step, num_layers=2):
    model = at.make_model(
        action_dim=A,
        discrete=True,
        num_trajectories=2,
        horizon=4,
        tokens_per_step=tokens_per_step,
        embed_dim=16,
        num_layers=num_layers,
        num_heads=2,
        windows=(None, 10)[:num_layers],  # one global and one sliding-window layer
    )
    params = backbone.init_params(model, jax.random.key(0), obs_dim=S)
    # Non-trivial state normalisation, as Agent.init_state sets it from the data.
    params["embed"]["obs_norm"] = {"mean": np.array([0.5, -1.0]), "std": np.array([2.0, 0.5])}
    return model, params


@pytest.fixture(scope="module")
def model_and_params():
    return _at_model(4)


@pytest.fixture(scope="module")
def one_token_model_and_params():
    return _at_model(1)


@pytest.mark.parametrize("data, seq, tokens_per_step", [(1, 1, 4), (2, 4, 4), (2, 4, 1)])
def test_cached_actor_matches_full_recompute(
    model_and_params, one_token_model_and_params, data, seq, tokens_per_step
):
    """Also for one token per step, whose token carries the previous step's action, reward and
    flags (agents.batch.link_previous in training, the actor's state when acting)."""
    model, params = model_and_params if tokens_per_step == 4 else one_token_model_and_params
    mesh = make_mesh([("data", data), ("seq", seq)], jax.devices("cpu")[: data * seq])
    max_steps = sum(ATTEMPT_LENGTHS) + 1
    actor = at.make_actor(model, mesh, attempts=2, horizon=4)
    assert actor.capacity >= tokens_per_step * max_steps
    state = actor.reset(B)
    # The recompute baseline sees the same history packed as sampler steps, attempts back to back.
    history = {
        k: np.array(v)
        for k, v in backbone.dummy_batch(model, S, batch_size=B, steps=max_steps).items()
    }
    history["mask"][:] = False
    recompute = jax.jit(lambda p, h, i: act.recompute_predict(model, p, h, i, mesh))
    rng = np.random.default_rng(0)
    step = 0
    for attempt, length in enumerate(ATTEMPT_LENGTHS):
        for t in range(length):
            obs = rng.normal(size=(B, S)).astype(np.float32)
            target = np.full((B,), 2.5, np.float32)
            action, pred, state = actor.act_with_prediction(params, state, obs, target)
            for key, value in dict(
                observations=obs, target_returns=target, timesteps=t, traj_index=attempt, mask=1
            ).items():
                history[key][:, step] = value
            link_previous(history)
            want = recompute(params, history, step)
            np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-5)
            np.testing.assert_array_equal(action, np.argmax(np.asarray(want), -1))
            reward = rng.normal(size=B).astype(np.float32)
            done = np.full((B,), t == length - 1)
            truncated = done & (attempt == 1)  # attempt 1 terminates, attempt 2 is cut
            history["actions"][:, step] = np.asarray(action)
            history["rewards"][:, step] = reward
            history["terminated"][:, step] = done & ~truncated
            history["truncated"][:, step] = truncated
            state = actor.observe(state, reward, done, truncated)
            step += 1
    np.testing.assert_array_equal(np.asarray(state.attempt), [2, 2])


ROLLING_LENGTHS = (3, 4, 4, 2, 4, 1, 3, 4)  # 8 episodes > 3n for n = 2 kept; 4, 4 fills it


@pytest.mark.parametrize("tokens_per_step", [1, 4])
def test_rolling_actor_matches_recompute_over_the_kept_episodes(tokens_per_step):
    """AD's rolling actor (more episodes than the n = 2 slots) at every step equals the backbone
    recomputed over exactly the n most recent episodes (same tokens; one layer, so every cached
    key is what the recompute computes), and its caches keep their shape through 3n+ episodes."""
    model, params = _at_model(tokens_per_step, num_layers=1)
    n, horizon = model.max_trajectories, model.max_timestep
    mesh = make_mesh([("data", 2), ("seq", 4)], jax.devices("cpu"))
    actor = ad.make_actor(model, mesh, attempts=len(ROLLING_LENGTHS), horizon=horizon)
    assert actor.keep_episodes == n and actor.capacity == tokens_per_step * n * horizon
    state = actor.reset(B)
    shapes = jax.tree.map(np.shape, state)
    total = sum(ROLLING_LENGTHS)
    history = {
        k: np.array(v) for k, v in backbone.dummy_batch(model, S, batch_size=B, steps=total).items()
    }
    history["mask"][:] = False
    window = n * horizon  # steps of the recompute: the kept episodes, padded at the end
    recompute = jax.jit(lambda p, h, i: act.recompute_predict(model, p, h, i, mesh))
    rng = np.random.default_rng(1)
    step, firsts = 0, []
    for attempt, length in enumerate(ROLLING_LENGTHS):
        firsts.append(step)
        for t in range(length):
            obs = rng.normal(size=(B, S)).astype(np.float32)
            target = np.zeros((B,), np.float32)
            action, pred, state = actor.act_with_prediction(params, state, obs, target)
            for key, value in dict(
                observations=obs, target_returns=target, timesteps=t, traj_index=attempt, mask=1
            ).items():
                history[key][:, step] = value
            link_previous(history)  # on the whole history: the tokens the actor embedded
            first = firsts[max(0, attempt - n + 1)]
            kept = {}
            for key, value in history.items():
                kept[key] = np.zeros_like(value[:, :window])
                kept[key][:, : step + 1 - first] = value[:, first : step + 1]
            want = recompute(params, kept, step - first)
            np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-5)
            reward = rng.normal(size=B).astype(np.float32)
            done = np.full((B,), t == length - 1)
            history["actions"][:, step] = np.asarray(action)
            history["rewards"][:, step] = reward
            history["terminated"][:, step] = done
            state = actor.observe(state, reward, done)
            step += 1
    assert jax.tree.map(np.shape, state) == shapes, "a rolling context keeps its shape"
    np.testing.assert_array_equal(state.caches[0].lengths, [tokens_per_step * total] * B)
    assert tokens_per_step * total > 2 * actor.capacity


def test_only_ad_rolls(model_and_params):
    """More attempts than slots: AD rolls, AT refuses naming the mode that allows it, and a
    model with a slot embedding cannot roll."""
    model, _ = model_and_params
    mesh = make_mesh([("data", 1), ("seq", 1)], jax.devices("cpu")[:1])
    assert ad.make_actor(model, mesh, attempts=2, horizon=4).keep_episodes == 0
    assert ad.make_actor(model, mesh, attempts=40, horizon=4).keep_episodes == 2
    with pytest.raises(ValueError, match="only mode 'ad' plays more attempts than n"):
        at.make_actor(model, mesh, attempts=3, horizon=4)
    with pytest.raises(ValueError, match="slot_embedding=False"):
        ad.make_actor(model.clone(slot_embedding=True), mesh, attempts=3, horizon=4)


def test_actor_errors(model_and_params):
    model, _ = model_and_params
    mesh = make_mesh([("data", 2), ("seq", 1)], jax.devices("cpu")[:2])
    with pytest.raises(ValueError, match="attempts"):
        at.make_actor(model, mesh, attempts=3, horizon=4)
    with pytest.raises(ValueError, match="multiple"):
        at.make_actor(model, mesh, attempts=2, horizon=4).reset(3)


def test_dt_actor_sees_only_the_last_k_steps():
    """DT at t > K acts on a recompute of only the last K steps, laid out as a training window
    (timesteps from the window's first step); each attempt is its own context; continuous
    actions; two layers, where a cached actor's stacked windows would reach back further."""
    k, lengths = 3, (2, 6)
    model = dt.make_model(
        action_dim=A, discrete=False, context_steps=k, max_timestep=8, embed_dim=16,
        num_layers=2, num_heads=2,
    )  # fmt: skip
    params = backbone.init_params(model, jax.random.key(1), obs_dim=S)
    mesh = make_mesh([("data", 1), ("seq", 1)], jax.devices("cpu")[:1])
    actor = dt.make_actor(model, mesh, attempts=2, horizon=8)
    assert actor.k == k
    state = actor.reset(B)
    forward = jax.jit(lambda p, h: backbone.forward(model, p, h, mesh))
    rng = np.random.default_rng(1)
    for length in lengths:
        steps = {"observations": [], "target_returns": [], "actions": []}
        for t in range(length):
            obs = rng.normal(size=(B, S)).astype(np.float32)
            rtg = rng.normal(size=B).astype(np.float32)
            action, pred, state = actor.act_with_prediction(params, state, obs, rtg)
            steps["observations"].append(obs)
            steps["target_returns"].append(rtg)
            steps["actions"].append(np.asarray(action))
            # The window a training sample would hold: steps max(0, t-K+1)..t of this attempt.
            first = max(0, t - k + 1)
            window = {k_: np.array(v) for k_, v in backbone.dummy_batch(model, S, B, k).items()}
            window["mask"][:] = False
            for j, s in enumerate(range(first, t + 1)):
                for key in ("observations", "target_returns"):
                    window[key][:, j] = steps[key][s]
                if s < t:  # the current action is not known yet (and causally invisible)
                    window["actions"][:, j] = steps["actions"][s]
                window["timesteps"][:, j] = s
                window["mask"][:, j] = True
            want = np.asarray(forward(params, window))[:, t - first]
            np.testing.assert_allclose(pred, want, rtol=1e-5, atol=1e-5)
            assert np.all(np.abs(np.asarray(action)) <= 1)
            state = actor.observe(state, np.zeros(B, np.float32), np.full(B, t == length - 1))
    # The DT policy (what evaluation runs) feeds the return-to-go: the target minus the rewards
    # of the attempt so far, and the target again once an attempt ends.
    policy = dt.make_policy(actor, params, target_return=5.0, seed=0)
    policy.reset(B)
    np.testing.assert_array_equal(policy.targets, [5.0, 5.0])
    active = np.ones(B, bool)
    for reward, done, want in (([1.0, 2.0], [0, 0], [4.0, 3.0]), ([0.5, 1.0], [0, 1], [3.5, 5.0])):
        assert np.asarray(policy.act(rng.normal(size=(B, S)), active)).shape == (B, A)
        policy.observe(np.array(reward, np.float32), np.array(done, bool), active)
        np.testing.assert_array_equal(policy.targets, want)
    np.testing.assert_array_equal(policy.state["t"], [2, 0])  # env 1's attempt ended


@pytest.mark.parametrize("agent, want", [(at, 2.5), (ad, 0.0)])
def test_in_context_policies_keep_their_target(model_and_params, agent, want):
    """AT conditions every step on the target it was given; AD on 0 (never return-conditioned)."""
    model, params = model_and_params
    mesh = make_mesh([("data", 1), ("seq", 1)], jax.devices("cpu")[:1])
    policy = agent.make_policy(
        agent.make_actor(model, mesh, attempts=2, horizon=4), params, target_return=2.5, seed=0
    )
    policy.reset(B)
    for done in ([0, 0], [1, 0]):
        policy.act(np.zeros((B, S), np.float32), np.ones(B, bool))
        policy.observe(np.ones(B, np.float32), np.array(done, bool), np.ones(B, bool))
        np.testing.assert_array_equal(policy.targets, [want, want])
