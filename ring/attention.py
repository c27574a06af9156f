"""Ring Attention (Liu, Zaharia & Abbeel 2023) with a hand-written blockwise forward and backward.

Dimension letters: B batch, T tokens (T_local per device), H heads, D head dim, n ring size.

`ring_attention` is a per-shard function called inside `jax.shard_map` over the `seq` axis. Each
device keeps its queries and passes its key/value block round the ring with `lax.ppermute`; at
every hop it runs blockwise attention (FlashAttention-style online softmax, float32 statistics) of
its queries against the block it holds and merges the result into its running `(o, lse)` with
`ring.softmax.merge`. The backward pass is a `jax.custom_vjp` that walks the ring again carrying
dK/dV with K/V (FlashAttention-2 backward per chunk pair from the saved output and log-sum-exp), so
no device ever holds more than its own shard plus one block in flight: memory O(T / n).

Chunk pairs whose mask is empty (above the causal diagonal, outside the window, disjoint segment id
ranges) are skipped with data-dependent loop bounds, never computed and masked; only the pairs on a
mask edge (the diagonal, the window's far end) pay for the mask, with no per-pair `lax.cond`
except where segment ids make emptiness arbitrary. The shard is made head-major once per call.
With a sliding window, hops whose blocks cannot meet any window are neither computed nor sent: the
number of hops is derived statically from (layout, stripe, window, T_local, n).

Overlap: every send in the hop loop is unconditional and reads only the loop carry (the last hop
is peeled off), and the backward adds the arriving dK/dV only after the hop's own partial is
computed, so XLA's latency-hiding scheduler may run each permute under the hop's compute.
`impl` picks the per-hop forward kernel (`IMPLS`; "pallas" is the fused kernel of `ring.pallas`).

Head groups: the ring is walked once per group of `head_block` heads (`default_head_block`: the
f32 score tile stays within TILE_BYTES), so every O(T_local) buffer of a pass (the K/V block and
its double buffer, the travelling dK/dV and this hop's partial, the head-major copies) is divided
by the number of groups, and the chunk tiles stay in cache.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.ad_checkpoint import checkpoint_name

from ringrl.ring.layout import check_layout, local_positions, num_hops
from ringrl.ring.mesh import SEQ
from ringrl.ring.pallas import flash_hop
from ringrl.ring.softmax import merge

_F32 = jnp.float32
# Per-hop forward kernels: "xla" (blockwise jnp, any backend; the CPU path), "pallas" (the fused
# Pallas flash kernel of ring.pallas, compiled for GPU/TPU), "pallas_interpret" (that kernel in
# Pallas interpret mode, for CPU tests). The backward is the blockwise XLA kernel in every case.
IMPLS = ("xla", "pallas", "pallas_interpret")
_DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Default inner chunk (block_q = block_kv). On the 2-core CPU machines of this project 256 beat 512
# in both time and memory for H=4, D=64 (T=16384 on 8 devices, fwd+bwd: 9.5 s vs 11.4 s CPU time,
# 18.8 MB vs 25.6 MB temp per device): a [B, H, 512, 512] f32 score tile no longer fits in cache.
DEFAULT_BLOCK = 256
# Largest f32 score tile [B, heads per pass, block_q, block_kv] the XLA kernel aims for: one pass
# round the ring per group of heads keeps it within a 2-core CPU's L2 cache, and divides every
# O(T_local) buffer of the pass (K/V block in flight and its double buffer, dK/dV accumulators,
# head-major copies) by the number of groups. At T=16384 on 8 devices (B=1 H=4 D=64, chunk 256)
# one head per pass takes fwd+bwd temp memory from 25.8 to 9.1 MB per device and was 1.32x faster
# (2.90 vs 3.84 s at T=8192, median of 6 interleaved rounds, load 12).
TILE_BYTES = 256 * 1024

# Names of the forward residuals (output, log-sum-exp) for `jax.checkpoint` policies, and the
# policy that saves exactly them: under it a rematerialised block recomputes its cheap projections
# but never the ring forward (n - 1 permutes and all the hop compute).
RESIDUAL_NAMES = ("ring_attention_out", "ring_attention_lse")
RESIDUAL_POLICY = jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES)

# Original position given to padding tokens (`default_block` pads shards whose length has few
# divisors): after every real position, so positions still increase within a shard; padding keys
# and queries are masked out of every pair.
_PAD_POS = 2**30

# Test-only instrumentation: when set (before tracing) to a callable taking a string tag, every
# chunk pair that is actually computed calls it at run time ("fwd" / "bwd"), so tests can count
# executed pairs and check that empty ones are skipped. None in normal use: no callback is traced.
_PAIR_HOOK = None


def _count_pair(tag: str) -> None:
    hook = _PAIR_HOOK
    if hook is not None:
        jax.debug.callback(lambda: hook(tag))


class _Cfg(NamedTuple):
    """Static configuration of one attention call (hashable: a custom_vjp nondiff argument)."""

    axis_name: str | None  # None: single device, no collectives
    n: int
    causal: bool
    window: int | None
    layout: str
    stripe: int
    block_q: int
    block_kv: int
    hops: int  # ring hops actually computed (<= n); hops - 1 sends in the forward pass
    impl: str = "xla"  # per-hop forward kernel: one of IMPLS
    pad: int = 0  # padding tokens at the end of every shard (see `default_block`)
    head_block: int = 1  # heads per ring pass (see `default_head_block`)


def default_block(
    t_local: int, cap: int = DEFAULT_BLOCK, unit: int | None = None
) -> tuple[int, int]:
    """The default chunk for a shard of t_local tokens, and the local length it tiles.

    The largest divisor of `unit` (default t_local; T_local / 2 for zigzag, so chunks stay inside
    one half) that is <= cap, when it is at least a quarter of min(cap, unit): no padding. A length
    with few divisors (e.g. a prime) would give tiny chunks and a loop-bound kernel, so instead the
    chunk in [want / 2, want] (want = min(cap, t_local)) that needs the least padding is chosen and
    the shard is padded up to a multiple of it; `ring_attention` masks the padding exactly.

    Returns:
      (block, padded t_local): padded t_local == t_local when no padding is needed.
    """
    unit = t_local if unit is None else unit
    want = min(cap, unit)
    block = next(b for b in range(want, 0, -1) if unit % b == 0)
    if block >= want // 4:
        return block, t_local
    want = min(cap, t_local)
    block = min(range(want // 2, want + 1), key=lambda b: (-(-t_local // b) * b, -b))
    return block, -(-t_local // block) * block


def default_head_block(batch: int, heads: int, block_q: int, block_kv: int, impl: str) -> int:
    """Heads per ring pass: the largest divisor of `heads` whose f32 score tile fits TILE_BYTES.

    At least 1. The Pallas kernels (`impl` "pallas*") tile heads in their grid already and
    prefer few large messages: all heads in one pass.
    """
    if impl != "xla":
        return heads
    fits = [hb for hb in range(1, heads + 1) if heads % hb == 0]
    fits = [hb for hb in fits if batch * hb * block_q * block_kv * 4 <= TILE_BYTES]
    return max(fits, default=1)


def _varying_axes(x: jax.Array) -> frozenset:
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)  # older jax spelling
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", frozenset())
    return frozenset(vma)


def _vary_like(x: jax.Array, ref: jax.Array) -> jax.Array:
    """Marks x as varying over the same manual mesh axes as ref (shard_map's check_vma typing)."""
    want, have = _varying_axes(ref), _varying_axes(x)
    missing = tuple(sorted(set(want) - set(have)))
    return jax.lax.pcast(x, missing, to="varying") if missing else x


def _chunk_plan(qpos, kpos, qseg, kseg, cfg: _Cfg):
    """Which chunk pairs have at least one visible (query, key) pair, and which have all visible.

    Returns bool [nq, nk] arrays (non-empty, full); `full` ignores segment ids.

    Positions are increasing within a device for both layouts, so per-chunk min/max tests are
    exact for causal/window edges of contiguous chunks and conservative otherwise. Note `<=`: the
    diagonal pair is visible even when a chunk holds a single query.
    """
    nq, nk = qpos.shape[0] // cfg.block_q, kpos.shape[0] // cfg.block_kv
    qc, kc = qpos.reshape(nq, cfg.block_q), kpos.reshape(nk, cfg.block_kv)
    qmin, qmax = qc[:, 0], qc[:, -1]
    kmin, kmax = kc[:, 0], kc[:, -1]
    ne = jnp.ones((nq, nk), bool)
    full = jnp.ones((nq, nk), bool)  # every (q, k) pair visible: no mask needed
    if cfg.pad:  # padding sits at the end of the shard: a chunk's real tokens come first
        qmax = jnp.max(jnp.where(qc < _PAD_POS, qc, -1), -1)
        kmax = jnp.max(jnp.where(kc < _PAD_POS, kc, -1), -1)
        ne &= (qmin < _PAD_POS)[:, None] & (kmin < _PAD_POS)[None, :]
        full &= (qc[:, -1] < _PAD_POS)[:, None] & (kc[:, -1] < _PAD_POS)[None, :]
    if cfg.causal:
        ne &= kmin[None, :] <= qmax[:, None]
        full &= kmax[None, :] <= qmin[:, None]
    if cfg.window is not None:
        ne &= kmax[None, :] > qmin[:, None] - cfg.window
        full &= kmin[None, :] > qmax[:, None] - cfg.window
    if qseg is not None:
        b = qseg.shape[0]
        qs = qseg.reshape(b, nq, cfg.block_q)
        ks = kseg.reshape(b, nk, cfg.block_kv)
        qlo, qhi = qs.min(-1), qs.max(-1)
        klo, khi = ks.min(-1), ks.max(-1)
        overlap = (qhi[:, :, None] >= klo[:, None, :]) & (qlo[:, :, None] <= khi[:, None, :])
        ne &= overlap.any(0)
    return ne, full


def _ranges(ne: jax.Array):
    """First and one-past-last True index along the last axis (0, 0 where none)."""
    m = ne.shape[-1]
    anyv = ne.any(-1)
    lo = jnp.argmax(ne, axis=-1)
    hi = m - jnp.argmax(ne[..., ::-1], axis=-1)
    return jnp.where(anyv, lo, 0), jnp.where(anyv, hi, 0)


def _pair_mask(qp, kp, qs, ks, cfg: _Cfg):
    """Visibility of one chunk pair, broadcastable to [B, H, bq, bk], or None if all visible."""
    mask = None
    if cfg.causal:
        mask = kp[None, :] <= qp[:, None]
    if cfg.window is not None:
        w = qp[:, None] - kp[None, :] < cfg.window
        mask = w if mask is None else mask & w
    if cfg.pad:  # padding neither sees nor is seen
        real = (qp < _PAD_POS)[:, None] & (kp < _PAD_POS)[None, :]
        mask = real if mask is None else mask & real
    if mask is not None:
        mask = mask[None, None]
    if qs is not None:
        s = (qs[:, :, None] == ks[:, None, :])[:, None]
        mask = s if mask is None else mask & s
    return mask


def _slice(x, start, size, axis):
    return jax.lax.dynamic_slice_in_dim(x, start, size, axis)


def _pair_loops(lo, hi, ne, full, qseg, cfg: _Cfg):
    """Per row of chunk pairs: the loops that cover its non-empty range without a per-pair cond.

    Returns a function `run(i, pair, st)` that applies `pair(j, st, masked)` over row i's
    non-empty pairs. Positions increase within a shard, so under a causal mask (and window) the
    non-empty pairs of a row form one range [lo, hi) and the fully visible ones a sub-range
    [flo, fhi): masked pairs (the diagonal, the window's far edge) sit only at its two ends. Those
    three loops replace a `lax.cond` per pair (padding, at the end of a shard, is such an edge too).
    Segment ids can make any pair empty: that case keeps a per-pair cond.
    """
    if qseg is not None:

        def run_seg(i, pair, st):
            def body(j, st):  # the segment mask applies even to positionally full pairs
                return jax.lax.cond(ne[i, j], lambda st: pair(j, st, True), lambda st: st, st)

            return jax.lax.fori_loop(lo[i], hi[i], body, st)

        return run_seg
    if not cfg.causal and not cfg.pad:

        def run_full(i, pair, st):
            return jax.lax.fori_loop(lo[i], hi[i], lambda j, st: pair(j, st, False), st)

        return run_full
    flo, fhi = _ranges(full)
    none = ~full.any(-1)
    flo, fhi = jnp.where(none, hi, flo), jnp.where(none, hi, fhi)

    def run(i, pair, st):
        st = jax.lax.fori_loop(lo[i], flo[i], lambda j, st: pair(j, st, True), st)
        st = jax.lax.fori_loop(flo[i], fhi[i], lambda j, st: pair(j, st, False), st)
        return jax.lax.fori_loop(fhi[i], hi[i], lambda j, st: pair(j, st, True), st)

    return run


def _fwd_hop(q, kv, qpos, kpos, qseg, kseg, o, lse, cfg: _Cfg):
    """Merges attention of all local queries vs one key/value block into the running (o, lse).

    Head-major throughout (made so once per call), so chunks are contiguous slices and the
    matmuls need no per-pair transposes.
    q: [B, H, Tl, D]; kv: [2, B, H, Tl, D]; o: [B, H, Tl, D] f32; lse: [B, H, Tl] f32.
    """
    bq, bk = cfg.block_q, cfg.block_kv
    nq = q.shape[2] // bq
    scale = q.shape[-1] ** -0.5
    ne, full = _chunk_plan(qpos, kpos, qseg, kseg, cfg)
    if cfg.impl != "xla":
        fused = functools.partial(_fused_fwd_hop, cfg=cfg)
        return jax.lax.cond(
            ne.any(), fused, lambda c, *_: c, (o, lse), q, kv, qpos, kpos, qseg, kseg
        )
    lo, hi = _ranges(ne)
    run_row = _pair_loops(lo, hi, ne, full, qseg, cfg)

    def q_step(a, carry):
        o, lse = carry
        qc = _slice(q, a * bq, bq, 2).astype(_F32) * scale  # [B, H, bq, D]
        qp = _slice(qpos, a * bq, bq, 0)
        qs = None if qseg is None else _slice(qseg, a * bq, bq, 1)

        def pair(c, st, masked):
            acc, m, l = st
            _count_pair("fwd")
            kc = _slice(kv[0], c * bk, bk, 2).astype(_F32)  # [B, H, bk, D]
            vc = _slice(kv[1], c * bk, bk, 2).astype(_F32)
            s = jnp.einsum("bhqd,bhkd->bhqk", qc, kc)
            mask = None
            if masked:
                kp = _slice(kpos, c * bk, bk, 0)
                ks = None if kseg is None else _slice(kseg, c * bk, bk, 1)
                mask = _pair_mask(qp, kp, qs, ks, cfg)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            # Masked pairs may leave a row empty: keep its max at 0 so exp stays 0, never NaN.
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0) if mask is not None else m_new
            p = jnp.exp(s - m_safe[..., None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            acc = acc * corr[..., None] + jnp.einsum("bhqk,bhkd->bhqd", p, vc)
            return acc, m_new, l

        acc0 = _vary_like(jnp.zeros(qc.shape, _F32), qc)
        m0 = _vary_like(jnp.full(qc.shape[:-1], -jnp.inf, _F32), qc)
        l0 = _vary_like(jnp.zeros(qc.shape[:-1], _F32), qc)
        acc, m, l = run_row(a, pair, (acc0, m0, l0))
        ok = l > 0
        lse_c = jnp.where(ok, m + jnp.log(jnp.where(ok, l, 1.0)), -jnp.inf)
        o_c = jnp.where(ok[..., None], acc / jnp.where(ok, l, 1.0)[..., None], 0.0)
        o_c, lse_c = merge(_slice(o, a * bq, bq, 2), _slice(lse, a * bq, bq, 2), o_c, lse_c)
        o = jax.lax.dynamic_update_slice_in_dim(o, o_c, a * bq, 2)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_c, a * bq, 2)
        return o, lse

    def run(carry):
        return jax.lax.fori_loop(0, nq, q_step, carry)

    # A hop with no visible pair at all (e.g. a future block in causal contiguous) costs nothing.
    return jax.lax.cond(ne.any(), run, lambda c: c, (o, lse))


def _fused_fwd_hop(carry, q, kv, qpos, kpos, qseg, kseg, cfg: _Cfg):
    """The Pallas kernel's (o, lse) of this hop, merged into the running (o, lse)."""
    o_h, lse_h = flash_hop(
        q,
        kv[0],
        kv[1],
        qpos,
        kpos,
        qseg,
        kseg,
        causal=cfg.causal,
        window=cfg.window,
        block_q=cfg.block_q,
        block_kv=cfg.block_kv,
        pad_pos=_PAD_POS if cfg.pad else None,
        interpret=cfg.impl == "pallas_interpret",
    )
    return merge(*carry, o_h, lse_h)


def _bwd_hop(q, do, lse, di, kv, qpos, kpos, qseg, kseg, dkvT, dq, cfg: _Cfg):
    """Adds one key/value block's contribution to dq and to that block's dk/dv.

    FlashAttention-2 backward per chunk pair: P = exp(S - lse), dV += P^T dO, dP = dO V^T,
    dS = P * (dP - D) with D = rowsum(dO * O), dQ += dS K * scale, dK += dS^T Q * scale.
    dK and dV are accumulated transposed (dV^T += dO^T P) so that no product needs the large
    [bq, bk] operand transposed (XLA:CPU copies it otherwise).

    Head-major: q, do: [B, H, Tl, D]; lse, di: [B, H, Tl] f32; kv: [2, B, H, Tl, D];
    dkvT: [2, B, H, D, Tl] f32; dq: [B, H, Tl, D] f32.
    """
    bq, bk = cfg.block_q, cfg.block_kv
    nk = kv.shape[3] // bk
    scale = q.shape[-1] ** -0.5
    ne, full = _chunk_plan(qpos, kpos, qseg, kseg, cfg)
    lo, hi = _ranges(ne.T)
    run_col = _pair_loops(lo, hi, ne.T, full.T, qseg, cfg)

    def kv_step(c, carry):
        dkvT, dq = carry
        kc = _slice(kv[0], c * bk, bk, 2).astype(_F32)  # [B, H, bk, D]
        vc = _slice(kv[1], c * bk, bk, 2).astype(_F32)
        kp = _slice(kpos, c * bk, bk, 0)
        ks = None if kseg is None else _slice(kseg, c * bk, bk, 1)
        dkv_c = _slice(dkvT, c * bk, bk, 4)  # [2, B, H, D, bk]

        def pair(a, st, masked):
            dkv_c, dq = st
            _count_pair("bwd")
            qc = _slice(q, a * bq, bq, 2).astype(_F32)  # [B, H, bq, D]
            doc = _slice(do, a * bq, bq, 2).astype(_F32)
            lse_c = _slice(lse, a * bq, bq, 2)  # [B, H, bq]
            di_c = _slice(di, a * bq, bq, 2)
            s = jnp.einsum("bhqd,bhkd->bhqk", qc, kc) * scale
            mask = None
            if masked:
                qp = _slice(qpos, a * bq, bq, 0)
                qs = None if qseg is None else _slice(qseg, a * bq, bq, 1)
                mask = _pair_mask(qp, kp, qs, ks, cfg)
            if mask is not None:
                s = jnp.where(mask, s, -jnp.inf)
            p = jnp.exp(s - lse_c[..., None])
            dvT = jnp.einsum("bhqd,bhqk->bhdk", doc, p)
            dp = jnp.einsum("bhqd,bhkd->bhqk", doc, vc)
            ds = p * (dp - di_c[..., None])
            dq_c = jnp.einsum("bhqk,bhkd->bhqd", ds, kc) * scale
            dq_c = _slice(dq, a * bq, bq, 2) + dq_c
            dq = jax.lax.dynamic_update_slice_in_dim(dq, dq_c, a * bq, 2)
            dkT = jnp.einsum("bhqd,bhqk->bhdk", qc, ds) * scale
            return dkv_c + jnp.stack([dkT, dvT]), dq

        dkv_c, dq = run_col(c, pair, (dkv_c, dq))
        dkvT = jax.lax.dynamic_update_slice_in_dim(dkvT, dkv_c, c * bk, 4)
        return dkvT, dq

    def run(carry):
        return jax.lax.fori_loop(0, nk, kv_step, carry)

    return jax.lax.cond(ne.any(), run, lambda c: c, (dkvT, dq))


def _device_index(cfg: _Cfg):
    if cfg.axis_name is None or cfg.n == 1:
        return 0
    return jax.lax.axis_index(cfg.axis_name)


def _positions(device, tl: int, cfg: _Cfg) -> jax.Array:
    """Original positions [tl] of `device`'s shard: its real tokens, then `cfg.pad` padding ones."""
    pos = local_positions(device, cfg.n, tl - cfg.pad, cfg.layout, cfg.stripe)
    if cfg.pad:
        pos = jnp.concatenate([pos, jnp.full((cfg.pad,), _PAD_POS, pos.dtype)])
    return pos


def _shift(x, cfg: _Cfg, shift: int):
    """Sends x from device j to device (j + shift) mod n on the ring."""
    perm = [(j, (j + shift) % cfg.n) for j in range(cfg.n)]
    return jax.lax.ppermute(x, cfg.axis_name, perm)


def _loop(body, lo: int, hi: int, state):
    """`body(h, state)` for h = lo .. hi-1: unrolled for at most one hop, else one fori_loop.

    The hop kernel is then compiled once for the loop whatever n is, and a ring of two devices
    (or a window <= T_local) makes exactly one send per pass.
    """
    if hi - lo <= 1:
        for h in range(lo, hi):
            state = body(h, state)
        return state
    return jax.lax.fori_loop(lo, hi, body, state)


def _forward(q, k, v, seg, cfg: _Cfg):
    """Returns (out [B, Tl, H, D] in q.dtype, lse [B, H, Tl] f32).

    The shard is made head-major once per call (q, and the K/V block that travels), so every
    chunk is a contiguous slice. Hops 0 .. hops-2 run in a loop whose K/V send is unconditional
    and reads only the loop carry, so it does not wait for (and can run under) that hop's block
    computation; the last hop is peeled off and sends nothing.
    """
    idx = _device_index(cfg)
    tl = q.shape[1]
    qh = jnp.swapaxes(q, 1, 2)  # [B, H, Tl, D]
    kv = jnp.swapaxes(jnp.stack([k, v]), 2, 3)  # [2, B, H, Tl, D]: one array, one collective
    qpos = _positions(idx, tl, cfg)
    o = _vary_like(jnp.zeros(qh.shape, _F32), q)
    lse = _vary_like(jnp.full(qh.shape[:-1], -jnp.inf, _F32), q)

    def hop(h, o, lse, kv, kseg):
        kpos = _positions((idx - h) % cfg.n, tl, cfg)
        return _fwd_hop(qh, kv, qpos, kpos, seg, kseg, o, lse, cfg)

    def body(h, state):
        o, lse, kv, kseg = state
        kv_next, kseg_next = _shift((kv, kseg), cfg, 1)
        o, lse = hop(h, o, lse, kv, kseg)
        return o, lse, kv_next, kseg_next

    o, lse, kv, kseg = _loop(body, 0, cfg.hops - 1, (o, lse, kv, seg))
    o, lse = hop(cfg.hops - 1, o, lse, kv, kseg)
    return jnp.swapaxes(o, 1, 2).astype(q.dtype), lse


def _backward(q, k, v, seg, out, lse, g, cfg: _Cfg):
    """Returns (dq, dk, dv), walking the ring again with K/V and their travelling dK/dV.

    Software-pipelined: at hop h a device computes its partial dK/dV of the block it holds into a
    fresh buffer, and only then adds the accumulator that arrived for that block (sent by the
    previous device at the start of this hop, from the loop carry). So neither the K/V send nor
    the dK/dV send of a hop depends on that hop's block computation.
    """
    idx = _device_index(cfg)
    b, tl, h, d = q.shape
    # D_i = rowsum(dO * O), from the output as returned (FlashAttention-2); head-major like lse.
    di = jnp.einsum("bthd,bthd->bht", g.astype(_F32), out.astype(_F32))
    qh, gh = jnp.swapaxes(q, 1, 2), jnp.swapaxes(g, 1, 2)  # [B, H, Tl, D]
    kv = jnp.swapaxes(jnp.stack([k, v]), 2, 3)
    qpos = _positions(idx, tl, cfg)
    # Rows that see nothing (padding; a segment alone in its chunk of the mask) have lse = -inf
    # and output 0: with lse = +inf their P = exp(S - lse) is 0 instead of NaN.
    lse = jnp.where(lse == -jnp.inf, jnp.inf, lse)
    dq = _vary_like(jnp.zeros(qh.shape, _F32), q)

    def hop(hop_index, kv, kseg, dq):
        """This device's partial dK/dV^T [2, B, H, D, Tl] of the block it holds, and dq."""
        kpos = _positions((idx - hop_index) % cfg.n, tl, cfg)
        zero = _vary_like(jnp.zeros((2, b, h, d, tl), _F32), q)
        return _bwd_hop(qh, gh, lse, di, kv, qpos, kpos, seg, kseg, zero, dq, cfg)

    dkvT, dq = hop(0, kv, seg, dq)
    if cfg.hops == 1:
        return _finish_backward(q, k, v, dq, dkvT)

    def body(hop_index, state):
        dq, kv, kseg, acc = state
        incoming = _shift(acc, cfg, 1)  # the accumulator of the block this device holds now
        partial, dq = hop(hop_index, kv, kseg, dq)
        kv_next, kseg_next = _shift((kv, kseg), cfg, 1)
        return dq, kv_next, kseg_next, incoming + partial

    kv, kseg = _shift((kv, seg), cfg, 1)
    dq, kv, kseg, dkvT = _loop(body, 1, cfg.hops - 1, (dq, kv, kseg, dkvT))
    incoming = _shift(dkvT, cfg, 1)
    partial, dq = hop(cfg.hops - 1, kv, kseg, dq)
    dkvT = incoming + partial
    # dk/dv now belong to device idx - (hops - 1): send them home.
    back = -(cfg.hops - 1) % cfg.n
    if back:
        dkvT = _shift(dkvT, cfg, back)
    return _finish_backward(q, k, v, dq, dkvT)


def _finish_backward(q, k, v, dq, dkvT):
    dq = jnp.swapaxes(dq, 1, 2)  # [B, Tl, H, D]
    dk = jnp.transpose(dkvT[0], (0, 3, 1, 2)).astype(k.dtype)  # [B, Tl, H, D]
    dv = jnp.transpose(dkvT[1], (0, 3, 1, 2)).astype(v.dtype)
    return dq.astype(q.dtype), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, seg, cfg: _Cfg):
    return _grouped_forward(q, k, v, seg, cfg)[0]


def _grouped_forward(q, k, v, seg, cfg: _Cfg):
    """`_forward` one group of `cfg.head_block` heads at a time (one ring pass per group)."""
    b, tl, h, _ = q.shape
    hb = cfg.head_block
    if hb == h:
        return _forward(q, k, v, seg, cfg)

    def body(i, carry):
        out, lse = carry
        o_g, lse_g = _forward(*(_heads(x, i, hb, 2) for x in (q, k, v)), seg, cfg)
        out = jax.lax.dynamic_update_slice_in_dim(out, o_g, i * hb, 2)
        lse = jax.lax.dynamic_update_slice_in_dim(lse, lse_g, i * hb, 1)
        return out, lse

    init = (_vary_like(jnp.zeros_like(q), q), _vary_like(jnp.zeros((b, h, tl), _F32), q))
    return jax.lax.fori_loop(0, h // hb, body, init)


def _heads(x, i, hb: int, axis: int):
    """Heads i * hb .. (i + 1) * hb - 1 of x along `axis`."""
    return jax.lax.dynamic_slice_in_dim(x, i * hb, hb, axis)


def _attention_fwd(q, k, v, seg, cfg: _Cfg):
    out, lse = _grouped_forward(q, k, v, seg, cfg)
    # Named so that a remat policy can keep them (`RESIDUAL_POLICY`): the backward then needs only
    # q, k, v (cheap to recompute from the block input) instead of a second walk round the ring.
    out = checkpoint_name(out, RESIDUAL_NAMES[0])
    lse = checkpoint_name(lse, RESIDUAL_NAMES[1])
    return out, (q, k, v, seg, out, lse)


def _attention_bwd(cfg: _Cfg, res, g):
    q, k, v, seg, out, lse = res
    dq, dk, dv = _grouped_backward(q, k, v, seg, out, lse, g, cfg)
    return dq, dk, dv, None


def _grouped_backward(q, k, v, seg, out, lse, g, cfg: _Cfg):
    """`_backward` one group of `cfg.head_block` heads at a time (one ring pass per group)."""
    h, hb = q.shape[2], cfg.head_block
    if hb == h:
        return _backward(q, k, v, seg, out, lse, g, cfg)

    def body(i, grads):
        part = _backward(
            *(_heads(x, i, hb, 2) for x in (q, k, v)),
            seg,
            _heads(out, i, hb, 2),
            _heads(lse, i, hb, 1),
            _heads(g, i, hb, 2),
            cfg,
        )
        return tuple(
            jax.lax.dynamic_update_slice_in_dim(a, p, i * hb, 2) for a, p in zip(grads, part)
        )

    zeros = tuple(_vary_like(jnp.zeros_like(x), x) for x in (q, k, v))
    return jax.lax.fori_loop(0, h // hb, body, zeros)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _make_cfg(
    q,
    k,
    v,
    segment_ids,
    axis_name,
    causal,
    window,
    layout,
    stripe,
    block_q,
    block_kv,
    impl,
    head_block,
):
    """Validates the arguments (before any tracing work) and builds the static config."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; use one of {IMPLS}")
    check_layout(layout, stripe)  # the name first; the length once the ring size is known
    for name, x in (("q", q), ("k", k), ("v", v)):
        if getattr(x, "ndim", None) != 4:
            raise ValueError(f"{name} must be [B, T_local, H, D], got shape {jnp.shape(x)}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(
            f"q, k, v shapes must match, got q{q.shape} k{k.shape} v{v.shape}; ring attention "
            "needs equal local query and key lengths (project k/v to q's heads first)"
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(
            f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}; cast them to one"
        )
    if q.dtype not in _DTYPES:
        raise ValueError(f"dtype {q.dtype} not supported; use float32, bfloat16 or float16")
    if window is not None:
        if not isinstance(window, (int, np.integer)) or window < 1:
            raise ValueError(f"window must be an int >= 1 or None, got {window!r}")
        if not causal:
            raise ValueError("window needs causal=True (window semantics: keys p-window+1 .. p)")
        window = int(window)
    b, tl = q.shape[:2]
    if segment_ids is not None:
        if jnp.shape(segment_ids) != (b, tl):
            raise ValueError(
                f"segment_ids must be [B, T_local] = ({b}, {tl}), got {jnp.shape(segment_ids)}"
            )
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"segment_ids must be integers, got {segment_ids.dtype}")
    if axis_name is None:
        n = 1
    else:
        try:
            n = int(jax.lax.axis_size(axis_name))
        except NameError:
            raise ValueError(
                f"mesh axis {axis_name!r} is not bound: call ring_attention inside "
                f"jax.shard_map over a mesh with an axis named {axis_name!r} (e.g. "
                f"ring.make_mesh([(DATA, 1), (SEQ, n)])), or use blockwise_attention on one device"
            ) from None
    check_layout(layout, stripe, length=n * tl, n=n)
    # Zigzag shards are two halves far apart: chunks inside one half skip exactly.
    unit = tl // 2 if layout == "zigzag" and n > 1 else tl
    padded = tl
    if block_q is None and block_kv is None:  # the default may pad a length with few divisors
        block_q, padded = default_block(tl, DEFAULT_BLOCK, unit)
        block_kv = block_q
    elif block_q is None or block_kv is None:  # one given: the other divides T_local, no padding
        block = next(b for b in range(min(DEFAULT_BLOCK, unit), 0, -1) if unit % b == 0)
        block_q = block if block_q is None else block_q
        block_kv = block if block_kv is None else block_kv
    for name, bsz in (("block_q", block_q), ("block_kv", block_kv)):
        if not isinstance(bsz, (int, np.integer)) or bsz < 1 or padded % bsz:
            raise ValueError(
                f"T_local={tl} is not divisible by {name}={bsz}; pick a divisor of {tl} "
                f"(or None for the default)"
            )
    b, h = q.shape[0], q.shape[2]
    if head_block is None:
        head_block = default_head_block(b, h, int(block_q), int(block_kv), impl)
    if not isinstance(head_block, (int, np.integer)) or head_block < 1 or h % head_block:
        raise ValueError(
            f"head_block={head_block!r} must be a positive divisor of the {h} heads (or None)"
        )
    hops = num_hops(layout, int(stripe), window, tl, n)
    return _Cfg(
        axis_name, n, bool(causal), window, layout, int(stripe), int(block_q), int(block_kv), hops,
        impl, padded - tl, int(head_block),
    )  # fmt: skip


def ring_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    axis_name: str = SEQ,
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    layout: str = "contiguous",
    stripe: int = 1,
    block_q: int | None = None,
    block_kv: int | None = None,
    impl: str = "xla",
    head_block: int | None = None,
) -> jax.Array:
    """Exact attention over the whole ring; call per shard inside `jax.shard_map` over `axis_name`.

    Args:
      q, k, v: [B, T_local, H, D] local shards (f32, bf16 or f16, one dtype).
      axis_name: the mesh axis the ring runs over.
      causal: query at original position p sees keys <= p.
      window: sliding window in tokens: query at p sees keys p-window+1 .. p (needs causal). Hops
        that cannot meet any window are not run nor sent.
      segment_ids: [B, T_local] int; attend only within equal ids. Rows with nothing to see give 0.
      layout: "contiguous", "striped" (token i on device (i // stripe) % n) or "zigzag" (device d
        holds chunks d and 2n-1-d of 2n); convert global arrays with `ring.layout.to_layout`.
      stripe: tokens kept together per device in the striped layout.
      block_q, block_kv: inner chunk sizes; None picks the largest divisor of T_local (of
        T_local / 2 for zigzag) <= 256 (`DEFAULT_BLOCK`; `ring.plan` / `ring.tune` can choose them),
        or, when T_local has no divisor near that (e.g. a prime), pads every shard to a multiple
        of a good chunk and masks the padding (`default_block`).
      impl: per-hop forward kernel, one of IMPLS: "xla" (default, any backend), "pallas" (fused
        flash kernel for GPU/TPU: bf16 operands, f32 accumulation and statistics) or
        "pallas_interpret" (the same kernel interpreted, for CPU tests).
      head_block: heads per pass round the ring (a divisor of H): the ring is walked once per
        group of heads, so memory per device scales with it; None: `default_head_block`.

    Returns:
      [B, T_local, H, D] in q.dtype.

    Raises:
      ValueError: axis not bound, bad shapes/dtypes, block sizes not dividing T_local, window < 1,
        bad segment_ids, unknown layout, head_block not dividing H.
    """
    cfg = _make_cfg(
        q,
        k,
        v,
        segment_ids,
        axis_name,
        causal,
        window,
        layout,
        stripe,
        block_q,
        block_kv,
        impl,
        head_block,
    )
    return _padded_attention(q, k, v, segment_ids, cfg)


def _padded_attention(q, k, v, seg, cfg: _Cfg) -> jax.Array:
    """`_attention` on shards padded with `cfg.pad` masked tokens at the end (none: unchanged)."""
    if not cfg.pad:
        return _attention(q, k, v, seg, cfg)
    tl = q.shape[1]
    widths = ((0, 0), (0, cfg.pad), (0, 0), (0, 0))
    q, k, v = (jnp.pad(x, widths) for x in (q, k, v))
    seg = None if seg is None else jnp.pad(seg, ((0, 0), (0, cfg.pad)))
    return _attention(q, k, v, seg, cfg)[:, :tl]


def blockwise_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    block_q: int | None = None,
    block_kv: int | None = None,
    impl: str = "xla",
    head_block: int | None = None,
) -> jax.Array:
    """Single-device blockwise attention: `ring_attention`'s kernel on a ring of one device.

    Args and returns as `ring_attention` on full [B, T, H, D] arrays (no mesh axis needed).
    """
    cfg = _make_cfg(
        q,
        k,
        v,
        segment_ids,
        None,
        causal,
        window,
        "contiguous",
        1,
        block_q,
        block_kv,
        impl,
        head_block,
    )
    return _padded_attention(q, k, v, segment_ids, cfg)
