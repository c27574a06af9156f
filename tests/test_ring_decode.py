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


def _stepper(mesh, cache, *, window=None, with_seg=False, block_kv=None, with_start=False):
    """Jitted (cache, q, k, v, seg[, start]) -> (out, cache): append then decode_step, inside
    shard_map (`start` [B]: first visible position, only `with_start`)."""
    specs = decode.cache_specs(cache, mesh)
    traces = []

    def step(cache, q, k, v, seg, start=None):
        traces.append(1)
        cache = decode.append(cache, k, v, segment_ids=seg)
        out = decode.decode_step(
            q, cache, window=window, segment_ids=seg, block_kv=block_kv, start=start
        )
        return out, cache

    seg_spec = P(DATA) if with_seg else None
    f = jax.shard_map(
        step,
        mesh=mesh,
        in_specs=(specs, P(DATA), P(DATA), P(DATA), seg_spec) + ((P(DATA),) if with_start else ()),
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
    # Head-major: keys [B, H, D, T], values [B, H, T, D].
    np.testing.assert_array_equal(cache.k, np.asarray(k)[:, pos].transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(cache.v, np.asarray(v)[:, pos].swapaxes(1, 2))


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


@pytest.mark.parametrize(
    "n,layout,stripe,window,block_kv,chunk,with_seg",
    [
        (8, "contiguous", 1, None, None, 1, False),
        (8, "contiguous", 1, 5, 3, 2, True),
        (8, "striped", 1, None, None, 1, True),
        (4, "striped", 2, 7, None, 2, False),
        (8, "zigzag", 1, None, None, 1, False),
        (4, "zigzag", 1, None, 3, 2, True),
    ],
)
def test_rolling_decode_matches_dense_over_the_kept_episodes(
    n, layout, stripe, window, block_kv, chunk, with_seg
):
    """A rolling cache through more than 3 * keep episodes of random lengths (different per batch
    element): every step equals dense causal attention over exactly the kept window (the `keep`
    most recent episodes, the current one included), and the arrays never change shape."""
    keep, max_steps, episodes = 3, 4, 20  # steps of `chunk` tokens per episode: 1..max_steps
    mesh = _mesh(n)
    unit = {"contiguous": n, "striped": n * stripe, "zigzag": 2 * n}[layout]
    t_max = -(-keep * max_steps * chunk // unit) * unit  # holds `keep` of the longest episodes
    rng = np.random.default_rng(11 + n)
    # Per batch element: the episode of every chunk (lockstep appends, boundaries differ).
    lengths = rng.integers(1, max_steps + 1, (B, episodes))
    num_chunks = int(lengths.sum(axis=1).min())
    episode = np.stack([np.repeat(np.arange(episodes), ln)[:num_chunks] for ln in lengths])
    first = np.stack([np.searchsorted(e, np.arange(episodes)) for e in episode])  # first chunk
    total = num_chunks * chunk
    q, k, v = _qkv(seed=n * 10 + chunk, t=total)
    seg = jnp.asarray(1 + np.repeat(episode % 2, chunk, axis=1), jnp.int32)  # [B, total]
    cache = decode.init_cache(
        B, t_max, H, D, mesh=mesh, layout=layout, stripe=stripe, with_segment_ids=with_seg,
        rolling=True,
    )  # fmt: skip
    shapes = jax.tree.map(jnp.shape, cache)
    f, traces = _stepper(
        mesh, cache, window=window, with_seg=with_seg, block_kv=block_kv, with_start=True
    )
    for c in range(num_chunks):
        oldest = np.maximum(episode[:, c] - keep + 1, 0)
        start = first[np.arange(B), oldest] * chunk  # [B] first token of the oldest kept episode
        sl = slice(c * chunk, (c + 1) * chunk)
        out, cache = f(
            cache,
            q[:, sl],
            k[:, sl],
            v[:, sl],
            seg[:, sl] if with_seg else None,
            jnp.asarray(start),
        )
        for b in range(B):
            kept = slice(int(start[b]), (c + 1) * chunk)
            assert (c + 1) * chunk - start[b] <= t_max
            ref = dense_attention(
                q[b : b + 1, kept],
                k[b : b + 1, kept],
                v[b : b + 1, kept],
                causal=True,
                window=window,
                segment_ids=seg[b : b + 1, kept] if with_seg else None,
            )[:, -chunk:]
            np.testing.assert_allclose(out[b : b + 1], ref, rtol=1e-5, atol=1e-5)
    assert jax.tree.map(jnp.shape, cache) == shapes, "a rolling cache keeps its shape"
    assert len(traces) == 1
    assert episode[:, -1].min() > 3 * keep and total > 2 * t_max, "must wrap more than once"
    np.testing.assert_array_equal(cache.lengths, [total, total])
    decode.check_capacity(cache, t_max)  # a ring buffer never overflows


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


def test_decode_step_streams_the_cache_without_copying_it():
    """The cache is stored in the layouts the score and value products read (K [B, H, D, T], V
    [B, H, T, D]), so a compiled step needs no per-step transposed copy of it: its temporary
    memory stays far below the size of the local keys and values."""
    n, t_max = 4, 2048
    mesh = _mesh(n)
    cache = decode.init_cache(B, t_max, H, D, mesh=mesh, with_segment_ids=True, rolling=True)
    assert cache.k.shape == (B, H, D, t_max) and cache.v.shape == (B, H, t_max, D)
    f, _ = _stepper(mesh, cache, with_seg=True)
    q, k, v = _qkv(seed=6)
    seg = jnp.ones((B, 1), jnp.int32)
    compiled = f.lower(cache, q[:, :1], k[:, :1], v[:, :1], seg).compile()
    local_kv = 2 * B * H * (t_max // n) * D * 4
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < local_kv / 4, (temp, local_kv)
