"""Fused per-hop flash-attention kernel (Pallas) for accelerators, returning the log-sum-exp.

Dimension letters: B batch, H heads, Tl tokens per device (T_local), D head dim.

`flash_hop` computes, for every local query, the softmax attention over one key/value block, as the
normalised output and its log-sum-exp in float32 (the `(o, lse)` pair `ring.softmax.merge`
combines across hops). One kernel instance handles one (batch, head, query chunk); it walks the
key chunks with an online softmax, skipping chunks that the causal mask or window leaves empty
(positions increase within a shard, so a chunk's first and last positions decide). Operands keep
their dtype (bf16 stays bf16) and every matmul accumulates in float32
(`preferred_element_type`); the statistics are float32.

`ring.attention.ring_attention(..., impl="pallas")` runs it compiled (GPU/TPU);
`impl="pallas_interpret"` runs the same kernel in Pallas interpret mode, which is how CPU tests
check it against `dense_attention` (inside `jax.shard_map` that needs `check_vma=False` with jax
0.10.2: the interpreter's internal loop drops the varying-axes types). The backward pass stays
the blockwise XLA kernel of `ring.attention`, which needs only the output and log-sum-exp this
kernel returns.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

_F32 = jnp.float32


def _kernel(
    qpos_ref, kpos_ref, q_ref, k_ref, v_ref, *rest, causal, window, block_kv, has_seg, pad_pos
):
    if has_seg:
        qseg_ref, kseg_ref, o_ref, lse_ref = rest
    else:
        o_ref, lse_ref = rest
    q = q_ref[...]  # [bq, D]
    qp = qpos_ref[...]  # [bq]
    qs = qseg_ref[...] if has_seg else None
    bq, d = q.shape
    scale = d**-0.5
    nk = k_ref.shape[0] // block_kv

    def body(c, st):
        start = c * block_kv
        kp = kpos_ref[pl.ds(start, block_kv)]

        def compute(st):
            acc, m, l = st
            k = k_ref[pl.ds(start, block_kv), :]
            v = v_ref[pl.ds(start, block_kv), :]
            s = jax.lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=_F32)
            s = s * scale
            mask = jnp.ones((bq, block_kv), bool)
            if causal:
                mask &= kp[None, :] <= qp[:, None]
            if window is not None:
                mask &= qp[:, None] - kp[None, :] < window
            if has_seg:
                mask &= qs[:, None] == kseg_ref[pl.ds(start, block_kv)][None, :]
            if pad_pos is not None:  # padding tokens neither see nor are seen
                mask &= (qp < pad_pos)[:, None] & (kp < pad_pos)[None, :]
            s = jnp.where(mask, s, -jnp.inf)
            m_new = jnp.maximum(m, s.max(-1))
            m_safe = jnp.where(jnp.isfinite(m_new), m_new, 0.0)
            p = jnp.exp(s - m_safe[:, None])
            corr = jnp.exp(m - m_safe)
            l = l * corr + p.sum(-1)
            pv = jax.lax.dot_general(
                p.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=_F32
            )
            return acc * corr[:, None] + pv, m_new, l

        visible = jnp.bool_(True)
        if causal:
            visible &= kp[0] <= qp[bq - 1]
        if window is not None:
            visible &= kp[block_kv - 1] > qp[0] - window
        return jax.lax.cond(visible, compute, lambda st: st, st)

    init = (
        jnp.zeros((bq, d), _F32),
        jnp.full((bq,), -jnp.inf, _F32),
        jnp.zeros((bq,), _F32),
    )
    acc, m, l = jax.lax.fori_loop(0, nk, body, init)
    ok = l > 0
    safe_l = jnp.where(ok, l, 1.0)
    o_ref[...] = jnp.where(ok[:, None], acc / safe_l[:, None], 0.0)
    lse_ref[...] = jnp.where(ok, m + jnp.log(safe_l), -jnp.inf)


@functools.partial(
    jax.jit, static_argnames=("causal", "window", "block_q", "block_kv", "pad_pos", "interpret")
)
def flash_hop(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    qpos: jax.Array,
    kpos: jax.Array,
    qseg: jax.Array | None = None,
    kseg: jax.Array | None = None,
    *,
    causal: bool = True,
    window: int | None = None,
    block_q: int = 128,
    block_kv: int = 128,
    pad_pos: int | None = None,
    interpret: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Attention of local queries against one key/value block, as (o, lse).

    Args:
      q: [B, H, Tl, D] queries (head-major), any float dtype.
      k, v: [B, H, Tk, D] the key/value block (same dtype as q).
      qpos, kpos: [Tl], [Tk] int32 original positions (increasing).
      qseg, kseg: [B, Tl], [B, Tk] int segment ids, or both None.
      causal: keys at positions <= the query's only.
      window: sliding window in tokens (query p sees p-window+1 .. p), or None.
      block_q, block_kv: chunk sizes (divide Tl and Tk).
      pad_pos: if given, tokens at positions >= pad_pos are padding: masked as queries and keys.
      interpret: run in Pallas interpret mode (CPU).

    Returns:
      o [B, H, Tl, D] float32 normalised over the visible keys of this block (0 where none), and
      lse [B, H, Tl] float32 (-inf where none).
    """
    b, h, tl, d = q.shape
    tk = k.shape[2]
    has_seg = qseg is not None
    kernel = functools.partial(
        _kernel, causal=causal, window=window, block_kv=block_kv, has_seg=has_seg, pad_pos=pad_pos
    )
    in_specs = [
        pl.BlockSpec((block_q,), lambda bi, hi, i: (i,)),
        pl.BlockSpec((tk,), lambda bi, hi, i: (0,)),
        pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i: (bi, hi, i, 0)),
        pl.BlockSpec((None, None, tk, d), lambda bi, hi, i: (bi, hi, 0, 0)),
        pl.BlockSpec((None, None, tk, d), lambda bi, hi, i: (bi, hi, 0, 0)),
    ]
    args = [qpos.astype(jnp.int32), kpos.astype(jnp.int32), q, k, v]
    if has_seg:
        in_specs += [
            pl.BlockSpec((None, block_q), lambda bi, hi, i: (bi, i)),
            pl.BlockSpec((None, tk), lambda bi, hi, i: (bi, 0)),
        ]
        args += [qseg.astype(jnp.int32), kseg.astype(jnp.int32)]
    # Inside shard_map the outputs vary over the same mesh axes as the inputs.
    vary = {}
    mat = getattr(jax.typeof(q), "manual_axis_type", None)
    if mat is not None:
        vary["manual_axis_type"] = mat
    return pl.pallas_call(
        kernel,
        out_shape=(
            jax.ShapeDtypeStruct((b, h, tl, d), _F32, **vary),
            jax.ShapeDtypeStruct((b, h, tl), _F32, **vary),
        ),
        grid=(b, h, tl // block_q),
        in_specs=in_specs,
        out_specs=(
            pl.BlockSpec((None, None, block_q, d), lambda bi, hi, i: (bi, hi, i, 0)),
            pl.BlockSpec((None, None, block_q), lambda bi, hi, i: (bi, hi, i)),
        ),
        interpret=interpret,
    )(*args)
