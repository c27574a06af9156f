"""Sharded KV-cache decoding (ring/decode.py) against dense causal attention over the prefix."""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringrl.ring import decode
from ringrl.ring.layout import local_positions, position_owner
from ringrl.ring.mesh import DATA, SEQ, make_mesh
from ringrl.ring.reference import dense_attention

B, T, H, D = 2, 32, 2, 8


def _mesh(n):
    return make_mesh([(DATA, 1), (SEQ, n)], jax.devices("cpu"))


def _qkv(seed, t=T):
    rng = np.random.default_rng(seed)
    return tuple(jnp.asarray(rng.standard_normal((B, t, H, D)), jnp.float32) for _ in range(3))


def _stepper(mesh, cache, *, window=None, with_seg=False, block_kv=None):
    """Jitted (cache, q, k, v[, seg]) -> (out, cache): append then decode_step, inside shard_map."""
    specs = decode.cache_specs(cache, mesh)
    traces = []

    def step(cache, q, k, v, seg):
        traces.append(1)
        cache = decode.append(cache, k, v, segment_ids=seg)
        out = decode.decode_step(q, cache, window=window, segment_ids=seg, block_kv=block_kv)
        return out, cache

    seg_spec = P(DATA) if with_seg else None
    f = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(specs, P(DATA), P(DATA), P(DATA), seg_spec),
        out_specs=(P(DATA), specs),
    )
    out_sh = (NamedSharding(mesh, P(DATA)), decode.cache_shardings(cache, mesh))
    return jax.jit(f, out_shardings=out_sh), traces


def _decode_all(f, cache, q, k, v, chunk, seg=None):
    outs = []
    for t in range(0, q.shape[1], chunk):
        sl = slice(t, t + chunk)
        out, cache = f(cache, q[:, sl], k[:, sl], v[:, sl], None if seg is None else seg[:, sl])
        outs.append(out)
    return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize(
    "n,layout,stripe,window,chunk",
    [
        (1, "contiguous", 1, None, 1),
        (4, "contiguous", 1, None, 1),
        (8, "striped", 1, None, 1),
        (4, "striped", 2, None, 4),
        (8, "contiguous", 1, 5, 2),
        (4, "striped", 1, 3, 1),
        (8, "zigzag", 1, None, 1),
        (4, "zigzag", 1, 3, 2),
    ],
)
def test_decode_matches_dense_causal(n, layout, stripe, window, chunk):
    mesh = _mesh(n)
    q, k, v = _qkv(seed=n * 100 + chunk)
    cache = decode.init_cache(B, T, H, D, mesh=mesh, layout=layout, stripe=stripe)
    f, traces = _stepper(mesh, cache, window=window)
    out, cache = _decode_all(f, cache, q, k, v, chunk)
    ref = dense_attention(q, k, v, causal=True, window=window)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert len(traces) == 1, "lengths must be traced: one compile for the whole decode"
    np.testing.assert_array_equal(cache.lengths, [T, T])
    # The cache holds the keys in the layout order of the ring (device d owns its positions).
    tl = T // n
    pos = np.concatenate([local_positions(d, n, tl, layout, stripe, xp=np) for d in range(n)])
    np.testing.assert_array_equal(cache.k, np.asarray(k)[:, pos])


def test_decode_different_lengths_per_batch_element():
    n, t = 4, 16
    mesh = _mesh(n)
    q, k, v = _qkv(seed=7, t=t)
    start = np.array([3, 9])
    steps = t - start.max()
    # Junk past each prompt must stay invisible until append overwrites it.
    in_prompt = jnp.arange(t)[None, :, None, None] < start[:, None, None, None]
    junk_k, junk_v = jnp.where(in_prompt, k, 100.0), jnp.where(in_prompt, v, -100.0)
    cache = decode.cache_from_prefix(
        junk_k, junk_v, jnp.asarray(start), mesh=mesh, layout="striped"
    )
    f, _ = _stepper(mesh, cache)
    ref = dense_attention(q, k, v, causal=True)
    rows = np.arange(B)[:, None]
    for s in range(steps):
        pos = (start + s)[:, None]  # [B, 1]: each element's next position
        out, cache = f(cache, q[rows, pos], k[rows, pos], v[rows, pos], None)
        np.testing.assert_allclose(out, ref[rows, pos], rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(cache.lengths, start + steps)


def test_decode_segment_ids_and_chunked_kv():
    n = 4
    mesh = _mesh(n)
    q, k, v = _qkv(seed=3)
    seg = jnp.asarray(np.repeat(np.array([[0, 1, 2], [4, 4, 5]]), [10, 15, 7], axis=1), jnp.int32)
    cache = decode.init_cache(B, T, H, D, mesh=mesh, layout="striped", with_segment_ids=True)
    f, _ = _stepper(mesh, cache, with_seg=True, block_kv=4)
    out, _ = _decode_all(f, cache, q, k, v, chunk=2, seg=seg)
    ref = dense_attention(q, k, v, causal=True, segment_ids=seg)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_position_owner_inverts_local_positions():
    cases = [(1, "contiguous", 1), (4, "contiguous", 1), (4, "striped", 3), (4, "zigzag", 1)]
    for n, layout, stripe in cases:
        t_max = 24 if stripe == 3 else 16
        tl = t_max // n
        dev, slot = position_owner(np.arange(t_max), tl, n, layout, stripe)
        got = [local_positions(d, n, tl, layout, stripe, xp=np)[s] for d, s in zip(dev, slot)]
        np.testing.assert_array_equal(got, np.arange(t_max))


def test_overflow_errors(capfd):
    n = 4
    mesh = _mesh(n)
    cache = decode.init_cache(B, 8, H, D, mesh=mesh)
    q, k, v = _qkv(seed=1, t=8)
    f, _ = _stepper(mesh, cache)
    for t in range(0, 6, 2):
        _, cache = f(cache, q[:, t : t + 2], k[:, t : t + 2], v[:, t : t + 2], None)
    decode.check_capacity(cache, 2)
    with pytest.raises(ValueError, match=r"KV cache overflow.*T_max = 8.*max_len>=9"):
        decode.check_capacity(cache, 3)
    # Inside jit: the writes past T_max are dropped and the outputs become NaN (never a quiet
    # wrong answer), also on later steps; the message is printed.
    out, cache = f(cache, q[:, 6:8], k[:, 6:8], v[:, 6:8], None)  # exactly full: fine
    assert np.isfinite(np.asarray(out)).all()
    out, cache = f(cache, q[:, :2], k[:, :2], v[:, :2], None)
    assert np.isnan(np.asarray(out)).all()
    np.testing.assert_array_equal(cache.lengths, [10, 10])
    out, _ = f(cache, q[:, :2], k[:, :2], v[:, :2], None)
    assert np.isnan(np.asarray(out)).all()
    assert "KV cache overflow" in capfd.readouterr().out


def test_bad_inputs_raise_clear_errors():
    mesh = _mesh(4)
    with pytest.raises(ValueError, match="cache length 10 is not a positive multiple of 4"):
        decode.init_cache(B, 10, H, D, mesh=mesh)
    with pytest.raises(ValueError, match="unknown layout"):
        decode.init_cache(B, 8, H, D, layout="spiral")
    cache = decode.init_cache(B, 8, H, D)
    q = jnp.zeros((B, 1, H, D + 1))
    with pytest.raises(ValueError, match="not bound"):
        decode.decode_step(q[..., :D], cache)
    local = dataclasses.replace(cache)
    with pytest.raises(ValueError, match=r"expected \[B, Tq, H, D\]"):
        jax.shard_map(
            lambda c, q: decode.decode_step(q, c),
            mesh=_mesh(1),
            in_specs=(decode.cache_specs(local), P(DATA)),
            out_specs=P(DATA),
        )(local, q)


def test_decode_merges_with_one_collective():
    """The per-device partials (o, lse) are merged with a single all_gather, no all-reduce."""
    mesh = _mesh(4)
    cache = decode.init_cache(B, T, H, D, mesh=mesh)
    f, _ = _stepper(mesh, cache)
    q, k, v = _qkv(seed=5)
    hlo = f.lower(cache, q[:, :1], k[:, :1], v[:, :1], None).compile().as_text()
    ops = re.findall(r" (all-gather|all-reduce|collective-permute|all-to-all)(?:-start)?\(", hlo)
    assert ops == ["all-gather"], ops
