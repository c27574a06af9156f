"""Block-size planner (ring/plan.py): hand-checked balance, memory vs the compiler, errors."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from ringrl.ring.attention import ring_attention
from ringrl.ring.mesh import SEQ, make_mesh
from ringrl.ring.plan import (
    chunk_work,
    imbalance_factor,
    layout_work,
    memory_model,
    plan,
    useful_pairs,
)
from ringrl.ring.tune import autotune

HW = dict(flops_per_s=50e9, link_bytes_per_s=10e9)


def _contiguous_by_hand(n, m, tl):
    """Contiguous causal, m chunks per shard: device i does i full blocks (m^2 pairs each) and one
    diagonal block (m(m+1)/2 pairs); the last device is the critical path. The ideal is the useful
    work T(T+1)/2 token pairs spread over n devices."""
    diag = m * (m + 1) // 2
    critical = ((n - 1) * m * m + diag) * (tl // m) ** 2
    t = n * tl
    return critical / (t * (t + 1) / 2 / n)


@pytest.mark.parametrize("n,m", [(2, 1), (2, 4), (4, 2), (8, 4), (8, 1)])
def test_contiguous_imbalance_matches_hand_count(n, m):
    tl = 64
    got = imbalance_factor(n * tl, n, tl // m, tl // m)
    assert got == pytest.approx(_contiguous_by_hand(n, m, tl), rel=1e-12)


def test_imbalance_known_values_and_limit():
    # n=2, one chunk per shard: device 1 computes 2 blocks of 64^2 against 128*129/4 useful pairs.
    assert imbalance_factor(128, 2, 64, 64) == pytest.approx(2 * 64**2 / (128 * 129 / 4))
    # The authors' contiguous layout at T=16384, n=8, chunk 512: 122 chunk pairs on the last device.
    assert imbalance_factor(16384, 8, 512, 512) == pytest.approx(
        122 * 512**2 / (16384 * 16385 / 2 / 8)
    )
    # Fine chunks approach (2n-1)/n from below.
    assert imbalance_factor(2 * 4096, 2, 16, 16) == pytest.approx(1.5, abs=0.01)
    assert imbalance_factor(8 * 1024, 8, 16, 16) == pytest.approx(15 / 8, abs=0.02)
    # Non-causal attention is perfectly balanced, with no waste, in any layout.
    for layout in ("contiguous", "striped", "zigzag"):
        assert imbalance_factor(1024, 8, 32, 32, causal=False, layout=layout) == 1.0


def test_layout_work_absolute_units():
    """The issue's figures (8 devices, chunk 256), in full Tl x Tl block pairs."""
    assert layout_work(4096, 8, 256, 256, layout="contiguous") == (34.0, 7.75)
    assert layout_work(4096, 8, 256, 256, layout="striped") == (48.0, 6.0)
    assert layout_work(16384, 8, 256, 256, layout="contiguous") == (32.5, 7.5625)
    assert layout_work(16384, 8, 256, 256, layout="striped") == (36.0, 4.5)
    # Zigzag: contiguous's total; own block 36/64, then 7 hops of exactly half a block.
    assert layout_work(16384, 8, 256, 256, layout="zigzag") == (32.5, 36 / 64 + 7 * 0.5)
    ideal = useful_pairs(16384) / 8 / 2048**2
    assert imbalance_factor(16384, 8, 256, 256, layout="zigzag") <= 1.1
    assert layout_work(16384, 8, 256, 256, layout="zigzag")[1] <= 1.1 * ideal
    assert useful_pairs(10, window=3) == 1 + 2 + 3 * 8
    assert useful_pairs(10, causal=False) == 100


@pytest.mark.parametrize("t,n,c,stripe", [(16384, 8, 512, 1), (4096, 4, 64, 1), (8192, 8, 128, 4)])
def test_balanced_layouts(t, n, c, stripe):
    zig = imbalance_factor(t, n, c, c, layout="zigzag")
    striped = imbalance_factor(t, n, c, c, layout="striped", stripe=stripe)
    assert zig <= 1.1
    assert zig <= striped  # striped pays for masked diagonal chunks on every hop
    assert imbalance_factor(t, n, c, c) > 1.5  # while contiguous is unbalanced


def test_chunk_work_counts_pairs_exactly():
    # n=2, Tl=4, chunks of 2; contiguous causal. Device 0: hop 0 is its diagonal block (pairs
    # (0,0), (1,0), (1,1)); hop 1 brings device 1's future block: nothing. Device 1: diagonal (3)
    # plus the whole past block of device 0 (4).
    assert chunk_work(8, 2, 2, 2).tolist() == [[3, 0], [3, 4]]
    # Window 2 on the same: query chunk [4,5] sees keys >= 3, so only key chunk [2,3] of device 0.
    assert chunk_work(8, 2, 2, 2, window=2).tolist() == [[3, 0], [3, 1]]


def _measured_bytes(n, t, bq, bk, dtype, backward):
    mesh = make_mesh([(SEQ, n)], jax.devices("cpu"))
    spec = P(None, SEQ)
    attn = jax.shard_map(
        lambda q, k, v: ring_attention(q, k, v, block_q=bq, block_kv=bk),
        mesh=mesh,
        in_specs=(spec,) * 3,
        out_specs=spec,
    )
    fn = jax.grad(lambda q, k, v: jnp.sum(attn(q, k, v).astype(jnp.float32)), (0, 1, 2))
    x = jax.ShapeDtypeStruct((1, t, 4, 64), dtype)
    m = jax.jit(fn if backward else attn).lower(x, x, x).compile().memory_analysis()
    return (
        m.argument_size_in_bytes
        + m.output_size_in_bytes
        + m.temp_size_in_bytes
        - m.alias_size_in_bytes
    )


@pytest.mark.parametrize(
    "n,t,bq,bk,dtype,backward",
    [(8, 4096, 512, 512, jnp.float32, True), (4, 2048, 128, 256, jnp.bfloat16, False)],
)
def test_memory_prediction_within_stated_factor(n, t, bq, bk, dtype, backward):
    """Stated factor: compiled per-device memory is 0.6-1.3x the buffer inventory."""
    predicted = sum(memory_model(t // n, bq, bk, 4, 64, dtype, backward=backward).values())
    measured = _measured_bytes(n, t, bq, bk, dtype, backward)
    assert 0.6 <= measured / predicted <= 1.3, (measured, predicted)


def test_plan_monotone_and_consistent():
    base = dict(mem_budget_bytes=64 << 20, **HW)
    p = plan(16384, 8, 4, 64, **base)
    assert p.memory_bytes <= base["mem_budget_bytes"]
    assert p.t_local % p.block_q == 0 and p.t_local % p.block_kv == 0
    assert p.memory_bytes == sum(p.memory_breakdown.values())
    assert p.memory_fwd_bytes < p.memory_bytes
    # Longer sequences need more memory per device; more devices need less.
    mems = [plan(t, 8, 4, 64, candidates=(256,), **base).memory_bytes for t in (4096, 8192, 16384)]
    assert mems[0] < mems[1] < mems[2]
    roomy = dict(base, mem_budget_bytes=1 << 30)
    mems = [plan(16384, n, 4, 64, candidates=(256,), **roomy).memory_bytes for n in (2, 4, 8)]
    assert mems[0] > mems[1] > mems[2]
    # max_seq_len fits the budget and one more unit does not.
    bq, bk = p.block_q, p.block_kv
    tl = p.max_seq_len // 8
    assert sum(memory_model(tl, bq, bk, 4, 64, jnp.float32).values()) <= base["mem_budget_bytes"]
    over = tl + max(bq, bk)
    assert sum(memory_model(over, bq, bk, 4, 64, jnp.float32).values()) > base["mem_budget_bytes"]
    bigger = plan(16384, 8, 4, 64, candidates=((bq, bk),), mem_budget_bytes=128 << 20, **HW)
    assert bigger.max_seq_len > p.max_seq_len
    # The zigzag layout is balanced, contiguous is not; work is reported in absolute units.
    z = plan(16384, 8, 4, 64, layout="zigzag", **base)
    assert z.imbalance <= 1.1
    assert p.imbalance > 1.5
    assert z.work_total == pytest.approx(p.work_total, rel=0.02)
    assert z.work_critical < p.work_critical


def test_compute_to_comm_ratio():
    kw = dict(causal=False, candidates=(128,), mem_budget_bytes=1 << 40)
    p1 = plan(8 * 1024, 8, 4, 64, **kw, **HW)
    p2 = plan(8 * 2048, 8, 4, 64, **kw, **HW)
    # A full hop: 2 matmuls * 2 B H D Tl^2 FLOPs vs K and V: 2 B Tl H D * 4 bytes.
    expected = (4 * 4 * 64 * 1024**2 / HW["flops_per_s"]) / (
        2 * 1024 * 4 * 64 * 4 / HW["link_bytes_per_s"]
    )
    assert p1.compute_to_comm_fwd == pytest.approx(expected)
    assert p2.compute_to_comm_fwd == pytest.approx(2 * expected)  # linear in the block length
    slow = plan(8 * 1024, 8, 4, 64, **kw, flops_per_s=50e9, link_bytes_per_s=5e9)
    assert slow.compute_to_comm_fwd == pytest.approx(expected / 2)
    # At the advertised minimum block length the full hop just overlaps (ratio >= 1).
    tl = p1.min_t_local_for_overlap
    assert 2 * tl * HW["link_bytes_per_s"] / (HW["flops_per_s"] * 4) >= 1
    assert 2 * (tl - 1) * HW["link_bytes_per_s"] / (HW["flops_per_s"] * 4) < 1
    # Sliding window <= T_local: two hops; causal halves the average hop work.
    w = plan(8 * 1024, 8, 4, 64, window=512, candidates=(128,), mem_budget_bytes=1 << 40, **HW)
    assert w.hops == 2


def test_plan_errors():
    with pytest.raises(ValueError, match=r"needs (\d+) bytes") as err:
        plan(1 << 20, 8, 4, 64, mem_budget_bytes=1 << 20, **HW)
    needed = int(err.value.args[0].split("needs ")[1].split(" bytes")[0])
    plan(1 << 20, 8, 4, 64, mem_budget_bytes=needed, **HW)  # the stated minimum does fit
    with pytest.raises(ValueError, match="length 1004 is not a positive multiple of 8"):
        plan(1004, 8, 4, 64, mem_budget_bytes=1 << 30, **HW)
    with pytest.raises(ValueError, match="divides T_local"):
        plan(8 * 96, 8, 4, 64, mem_budget_bytes=1 << 30, candidates=(64,), **HW)
    with pytest.raises(ValueError, match="unknown layout"):
        plan(1024, 8, 4, 64, mem_budget_bytes=1 << 30, layout="spiral", **HW)
    with pytest.raises(ValueError, match="flops_per_s"):
        plan(1024, 8, 4, 64, mem_budget_bytes=1 << 30, flops_per_s=0, link_bytes_per_s=1.0)


def test_autotune_tiny():
    mesh = make_mesh([(SEQ, 2)], jax.devices("cpu"))
    # Forward only keeps the test fast (a forward+backward compile costs ~8 s per candidate).
    res = autotune(64, mesh, 1, 8, candidates=(16, 32), repeats=2, backward=False)
    assert [(r["block_q"], r["block_kv"]) for r in res.table] == [(16, 16), (32, 32)]
    assert all(len(r["times_s"]) == 2 and r["median_s"] > 0 for r in res.table)
    assert res.seconds == min(r["median_s"] for r in res.table)
    assert (res.block_q, res.block_kv) in [(16, 16), (32, 32)]
