"""The GPT-2 Decision Transformer's regularisation, optional on the backbone: dropout only while
training (one key per step, reproducible, remat-safe), no dropout at evaluation, embedding
LayerNorm parameters only when enabled (and the cached actor applies it too), relu FFN, the
defaults of the other agents unchanged, and the DT config's paper settings and targets."""

import jax
import numpy as np
import pytest

from ringrl.agents import act, at, backbone, dt, sharding, step
from ringrl.agents.batch import link_previous
from ringrl.configs import ad_darkroom, at_d4rl, at_darkroom, dt_d4rl
from ringrl.ring.mesh import make_mesh

B, K, S, A = 4, 4, 3, 2
SEED = 0


def _dt(**kw):
    return dt.make_model(
        action_dim=A, discrete=False, context_steps=K, max_timestep=16,
        embed_dim=16, num_layers=2, num_heads=2, **kw,
    )  # fmt: skip


def _batch(seed=SEED):
    rng = np.random.default_rng(seed)
    out = {k: np.array(v) for k, v in backbone.dummy_batch(_dt(), S, B, K).items()}
    out["observations"] = rng.normal(size=(B, K, S)).astype(np.float32)
    out["actions"] = rng.uniform(-1, 1, (B, K, A)).astype(np.float32)
    out["target_returns"] = rng.normal(size=(B, K)).astype(np.float32)
    out["timesteps"] = np.tile(np.arange(K), (B, 1)).astype(np.int32)
    out["mask"][-1, -1] = False  # one padded step
    return out


@pytest.fixture(scope="module")
def setup():
    mesh = make_mesh([("data", 2), ("seq", 2)], jax.devices("cpu")[:4])
    model = _dt(dropout=0.1, embed_norm=True, activation="relu", remat="none")
    params = backbone.init_params(model, jax.random.key(SEED), obs_dim=S)
    batch = sharding.put_batch(_batch(), mesh)
    return mesh, model, params, batch


def test_dropout_only_in_training(setup):
    mesh, model, params, batch = setup
    loss = jax.jit(lambda p, b, r: backbone.loss(model, p, b, mesh, r)[0])
    evaluate = jax.jit(lambda p, b: backbone.loss(model, p, b, mesh)[0])
    forward = jax.jit(lambda p, b: backbone.forward(model, p, b, mesh))
    k1, k2 = jax.random.key(1), jax.random.key(2)
    train1, train1_again, train2 = (
        loss(params, batch, k1),
        loss(params, batch, k1),
        loss(params, batch, k2),
    )
    assert float(train1) == float(train1_again)  # a key gives one set of masks
    assert float(train1) != float(train2)  # another key, other masks
    # Evaluation is deterministic: two calls agree, and they differ from any training call.
    np.testing.assert_array_equal(forward(params, batch), forward(params, batch))
    assert float(evaluate(params, batch)) == float(evaluate(params, batch))
    assert float(evaluate(params, batch)) not in (float(train1), float(train2))
    # The same params without dropout: a key changes nothing, training mode equals evaluation.
    plain = model.clone(dropout=0.0)
    no_drop = jax.jit(lambda p, b, r: backbone.loss(plain, p, b, mesh, r)[0])
    assert float(no_drop(params, batch, k1)) == float(evaluate(params, batch))


def test_dropout_under_remat_draws_the_same_masks(setup):
    """Rematerialised blocks redo their dropout in the backward with the same masks: loss and
    gradients equal the plain model's for one key."""
    mesh, model, params, batch = setup
    remat = model.clone(remat="ring_residuals")
    key = jax.random.key(3)

    def grads(m):
        fn = jax.jit(jax.value_and_grad(lambda p: backbone.loss(m, p, batch, mesh, key)[0]))
        return fn(params)

    (v1, g1), (v2, g2) = grads(model), grads(remat)
    np.testing.assert_allclose(v1, v2, rtol=1e-5, atol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), g1, g2)


def test_embed_norm_params_and_defaults(setup):
    _, model, params, _ = setup
    assert "embed_ln" in params["embed"]
    plain = backbone.init_params(_dt(), jax.random.key(SEED), obs_dim=S)
    assert "embed_ln" not in plain["embed"]
    # Dropout and the activation own no parameters: the rest of the tree is the same.
    without = {k: v for k, v in params["embed"].items() if k != "embed_ln"}
    assert jax.tree.structure(without) == jax.tree.structure(plain["embed"])
    # The other agents' configs keep the backbone's defaults: no dropout, no embedding norm.
    assert (backbone.Backbone.dropout, backbone.Backbone.embed_norm) == (0.0, False)
    for config in (at_darkroom.get_config(), ad_darkroom.get_config(), at_d4rl.get_config()):
        m = at.model_for(config, action_dim=A, discrete=False)
        assert (m.dropout, m.embed_norm, m.activation) == (0.0, False, "gelu")
    with pytest.raises(ValueError, match="dropout"):
        backbone.init_params(_dt(dropout=1.0), jax.random.key(0), obs_dim=S)
    with pytest.raises(ValueError, match="activation"):
        backbone.init_params(_dt(activation="tanh"), jax.random.key(0), obs_dim=S)


def test_relu_ffn_matches_a_plain_mlp():
    blk = backbone.Block(embed_dim=8, num_heads=2, activation="relu", attention="dense")
    rng = np.random.default_rng(SEED)
    x = rng.normal(size=(2, 6, 8)).astype(np.float32)
    a = rng.normal(size=(2, 6, 2, 4)).astype(np.float32)
    variables = blk.init(jax.random.key(0), x, np.ones((2, 6), np.int32))
    got = blk.apply(variables, x, a, method=backbone.Block.finish)
    p = variables["params"]
    h = x + np.einsum("blhd,hdw->blw", a, p["out"]["kernel"]) + p["out"]["bias"]
    mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
    ln = (h - mu) / np.sqrt(var + 1e-6) * p["ln_ffn"]["scale"] + p["ln_ffn"]["bias"]
    want = h + np.maximum(ln @ p["w1"] + p["b1"], 0) @ p["w2"] + p["b2"]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_train_step_key_per_step(setup):
    mesh, model, _, batch = setup
    config = dt_d4rl.get_config("smoke")
    state = step.init_state(model, config, mesh, jax.random.key(SEED), obs_dim=S)
    assert state.rng is not None
    plain = step.init_state(model.clone(dropout=0.0), config, mesh, jax.random.key(SEED), S)
    assert plain.rng is None  # a deterministic model's state is as before
    train_step = step.make_train_step(model, config, mesh)
    copy = lambda s: jax.tree.map(lambda x: x.copy(), s)  # noqa: E731 (the step donates)

    def two_steps(s):
        s, m1 = train_step(s, batch)
        s, m2 = train_step(s, batch)
        return s, float(m1["loss"]), float(m2["loss"])

    a, la1, la2 = two_steps(copy(state))
    b, lb1, lb2 = two_steps(copy(state))
    assert (la1, la2) == (lb1, lb2)  # reproducible from the state
    jax.tree.map(np.testing.assert_array_equal, a.params, b.params)
    other = copy(state).replace(rng=jax.random.key(99))
    _, lc1, _ = two_steps(other)
    assert lc1 != la1  # another key, other masks, same params and batch


def test_cached_actor_applies_the_embedding_norm():
    """AT with the embedding LayerNorm (and dropout, off when acting): the cached actor's
    predictions equal the full backbone over the history."""
    model = at.make_model(
        action_dim=A, discrete=False, num_trajectories=1, horizon=4, tokens_per_step=4,
        embed_dim=16, num_layers=1, num_heads=2, embed_norm=True, dropout=0.1, remat="none",
    )  # fmt: skip
    params = backbone.init_params(model, jax.random.key(SEED), obs_dim=S)
    mesh = make_mesh([("data", 1), ("seq", 1)], jax.devices("cpu")[:1])
    actor = at.make_actor(model, mesh, attempts=1, horizon=4)
    state = actor.reset(1)
    history = {k: np.array(v) for k, v in backbone.dummy_batch(model, S, 1, 4).items()}
    history["mask"][:] = False
    recompute = jax.jit(lambda p, h, i: act.recompute_predict(model, p, h, i, mesh))
    rng = np.random.default_rng(SEED)
    for t in range(3):
        obs = rng.normal(size=(1, S)).astype(np.float32)
        target = np.full((1,), 1.5, np.float32)
        action, pred, state = actor.act_with_prediction(params, state, obs, target)
        for key, value in dict(
            observations=obs, target_returns=target, timesteps=t, mask=1
        ).items():
            history[key][:, t] = value
        link_previous(history)
        np.testing.assert_allclose(pred, recompute(params, history, t), rtol=1e-5, atol=1e-5)
        history["actions"][:, t] = np.asarray(action)
        history["rewards"][:, t] = 0.5
        state = actor.observe(state, np.full((1,), 0.5, np.float32), np.zeros((1,), bool))


def test_dt_config_follows_the_paper():
    c = dt_d4rl.get_config("path=data/walker2d-medium-replay-ringrl-v0.hdf5")
    assert c.data.context_steps == 20 and c.eval.max_steps == 0  # whole episodes
    assert (c.model.dropout, c.model.embed_norm, c.model.activation) == (0.1, True, "relu")
    assert c.model.return_scale == 1e-3  # returns-to-go / 1000
    assert (c.model.embed_dim, c.model.num_layers, c.model.num_heads) == (128, 3, 1)
    assert (c.optim.lr, c.optim.weight_decay, c.optim.warmup_steps) == (1e-4, 1e-4, 10_000)
    assert (c.batch_size, c.num_steps, c.optim.grad_clip) == (64, 100_000, 0.25)
    assert c.eval.target_return == 5000.0
    for arg, want in [
        ("env=hopper-medium-v2", 3600.0),
        ("env=hopper-medium-v2,target=low", 1800.0),
        ("path=/x/halfcheetah-medium-expert-ringrl-v0.hdf5,target=low", 6000.0),
        ("env=halfcheetah-expert-v2", 12000.0),
        ("path=data/walker2d-random-ringrl-v0.hdf5,target=low", 2500.0),
        ("env=ant-medium-v2,target=3000", 3000.0),
    ]:
        assert dt_d4rl.get_config(arg).eval.target_return == want, arg
    # No table entry: refused before training, once the data (and so its env) is known.
    ant = dt_d4rl.get_config("env=ant-medium-v2")
    assert np.isnan(ant.eval.target_return)
    with pytest.raises(ValueError, match="no DT target return is known"):
        dt.check_eval_context(ant, "Ant-v5", attempts=1, episode_steps=1000)
    dt.check_eval_context(c, "Walker2d-v5", attempts=1, episode_steps=1000)
    # AT conditions on the same table (target "best"): refused the same way.
    at_ant = at_d4rl.get_config("env=ant-medium-v2")
    with pytest.raises(ValueError, match="no AT target return is known"):
        at.check_eval_context(at_ant, "Ant-v5", attempts=1, episode_steps=200)
    at.check_eval_context(
        at_d4rl.get_config("env=hopper-medium-v2"), "Hopper-v5", attempts=1, episode_steps=200
    )
    with pytest.raises(ValueError, match="target='best'"):
        dt_d4rl.get_config("target=best")
