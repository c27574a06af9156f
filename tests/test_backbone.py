"""Backbone: sharded loss/grads equal the 1-device run; padding, layouts, dense baseline, errors."""

import jax
import numpy as np
import pytest

from ringrl.agents import backbone
from ringrl.agents.at import TOKENS
from ringrl.agents.batch import link_previous
from ringrl.ring.mesh import make_mesh

AT_TOKENS = TOKENS[4]

B, T, S, A = 4, 16, 3, 5


def mesh(data, seq):
    return make_mesh([("data", data), ("seq", seq)], jax.devices("cpu")[: data * seq])


def model(**kwargs):
    defaults = dict(
        action_dim=A,
        discrete=True,
        tokens=AT_TOKENS,
        embed_dim=16,
        num_layers=2,
        num_heads=2,
        windows=(None, 10),  # one global and one local layer
        ffn_chunk=8,
        max_timestep=8,
        max_trajectories=4,
        return_scale=0.5,
    )
    return backbone.Backbone(**{**defaults, **kwargs})


def random_batch(seed=0, discrete=True):
    rng = np.random.default_rng(seed)
    actions = rng.integers(0, A, (B, T)).astype(np.int32)
    if not discrete:
        actions = rng.uniform(-1, 1, (B, T, A)).astype(np.float32)
    batch = dict(
        observations=rng.normal(size=(B, T, S)).astype(np.float32),
        actions=actions,
        rewards=rng.normal(size=(B, T)).astype(np.float32),
        target_returns=rng.normal(size=(B, T)).astype(np.float32),
        timesteps=rng.integers(0, 8, (B, T)).astype(np.int32),
        traj_index=rng.integers(0, 4, (B, T)).astype(np.int32),
        terminated=(rng.random((B, T)) < 0.1).astype(np.float32),
        truncated=(rng.random((B, T)) < 0.1).astype(np.float32),
        mask=rng.random((B, T)) < 0.75,
        prev_actions=np.zeros_like(actions),
        has_prev=np.zeros((B, T), bool),
        **{k: np.zeros((B, T), np.float32) for k in ("prev_rewards", "prev_terminated")},
        prev_truncated=np.zeros((B, T), np.float32),
    )
    link_previous(batch)
    return batch


@pytest.fixture(scope="module")
def params():
    return backbone.init_params(model(), jax.random.key(0), obs_dim=S)


@pytest.fixture(scope="module")
def reference(params):
    """Loss and grads on one device: plain dense attention, no rematerialisation."""
    m, one = model(remat="none", attention="dense"), mesh(1, 1)
    batch = random_batch()
    fn = jax.jit(jax.value_and_grad(lambda p, b: backbone.loss(m, p, b, one)[0]))
    return fn(params, batch)


@pytest.mark.parametrize("data, seq, layout", [(2, 4, "striped"), (1, 8, "contiguous")])
def test_sharded_loss_and_grads_equal_single_device(params, reference, data, seq, layout):
    m, sharded = model(layout=layout), mesh(data, seq)
    fn = jax.jit(jax.value_and_grad(lambda p, b: backbone.loss(m, p, b, sharded)[0]))
    got = fn(params, random_batch())
    np.testing.assert_allclose(got[0], reference[0], rtol=1e-5, atol=1e-5)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5), got[1], reference[1]
    )


@pytest.fixture(scope="module")
def forward_one():
    m, one = model(), mesh(1, 1)
    return jax.jit(lambda p, b: backbone.forward(m, p, b, one))


def test_loss_is_mean_over_valid_targets(params, reference, forward_one):
    batch = random_batch()  # the reference's batch
    logits = np.asarray(forward_one(params, batch), np.float64)
    logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(logp, batch["actions"][..., None], -1)[..., 0]
    np.testing.assert_allclose(reference[0], nll[batch["mask"]].mean(), rtol=1e-5)


def test_padding_is_invisible(params, forward_one):
    batch = random_batch(2)
    other = {k: v.copy() for k, v in batch.items()}
    pad = ~batch["mask"]
    other["observations"][pad] = 100.0
    other["target_returns"][pad] = -50.0
    other["actions"][pad] = 0
    a, b = forward_one(params, batch), forward_one(params, other)
    valid = batch["mask"]
    np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], rtol=1e-5, atol=1e-5)
    assert not np.allclose(np.asarray(a)[pad], np.asarray(b)[pad])


def test_dense_baseline_matches_ring(params, forward_one):
    batch = random_batch(3)
    dense = model(attention="dense")
    got = jax.jit(lambda p, b: backbone.forward(dense, p, b, mesh(1, 1)))(params, batch)
    np.testing.assert_allclose(got, forward_one(params, batch), rtol=1e-5, atol=1e-5)


def test_continuous_head_and_loss():
    # Dense attention keeps this compile cheap; the head and loss are what is tested here.
    m = model(discrete=False, num_layers=1, windows=None, attention="dense")
    p = backbone.init_params(m, jax.random.key(1), obs_dim=S)
    batch = random_batch(4, discrete=False)

    @jax.jit
    def run(p, b):
        return backbone.forward(m, p, b, mesh(1, 1)), backbone.loss(m, p, b, mesh(1, 1))

    pred, (got, aux) = run(p, batch)
    assert pred.shape == (B, T, A) and np.all(np.abs(np.asarray(pred)) <= 1)
    want = ((np.asarray(pred) - batch["actions"]) ** 2).mean(-1)[batch["mask"]].mean()
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert int(aux["num_targets"]) == batch["mask"].sum()


def test_bad_inputs(params):
    batch = random_batch()
    short = {k: v[:, :6] for k, v in batch.items()}
    with pytest.raises(ValueError, match="not divisible by mesh axis 'seq'"):
        backbone.loss(model(), params, short, mesh(1, 4))
    with pytest.raises(ValueError, match="batch lacks"):
        backbone.loss(model(), params, {"mask": batch["mask"]}, mesh(1, 1))
    with pytest.raises(ValueError, match="dense"):
        backbone.loss(model(attention="dense"), params, batch, mesh(1, 4))
    with pytest.raises(ValueError, match="one per layer"):
        backbone.init_params(model(windows=(4,)), jax.random.key(0), obs_dim=S)
