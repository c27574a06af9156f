"""Sharded KV-cache decoding: the cache lives on the ring exactly like the sequence does.

A cache holds keys `[B, H, D, T_max]` and values `[B, H, T_max, D]` (global shapes, head-major) in
*layout order*: along T_max each is what `ring.layout.to_layout` would produce from the original
sequence, so that sharding it
contiguously over the `SEQ` axis puts every position on the device that owns it in the ring's
layout (`ring.layout.position_owner`: "contiguous", "striped" with `stripe=s`, or "zigzag").
Keys are sharded `P(DATA, None, None, SEQ)`, values `P(DATA, None, SEQ)`, optional segment ids
`[B, T_max]` `P(DATA, SEQ)`; per-batch `lengths [B]` int32 travel with them. These are the layouts
the two per-step products read as plain row-major matrix products ([Tq, D] x [D, Tl] for the scores,
[Tq, Tl] x [Tl, D] for the output), so a step streams the cache once and never transposes it; only
the Tq new tokens are moved (README "Benchmarks": cached acting).

Per step (inside `jax.shard_map` over `SEQ`):
  1. `append(cache, k, v)` writes the Tq new keys/values at absolute positions
     `length .. length + Tq - 1` on the devices owning them (the other devices leave their slice
     untouched) and advances `lengths` by Tq;
  2. `decode_step(q, cache)` lets the Tq new queries (at those same positions, causal among
     themselves) attend to every cached position: each device computes a partial softmax over its
     own valid slots, and `ring.softmax.merge_over_axis` merges the partials with a log-sum-exp
     reduction over the axis. The result equals full causal attention over the prefix.

Work per device is O(Tq * T_max / n) whatever the fill level, and lengths are traced values, so a
jitted step compiles once and its latency stays flat as the cache fills.

A *rolling* cache (`init_cache(..., rolling=True)`) is a ring buffer over the same arrays: the token
at absolute position p is written at position `p mod T_max`, overwriting the token T_max before it,
so its arrays keep their shape however many tokens are appended. `lengths` still counts every token
ever appended, so the slot at position s holds absolute position `s + T_max * floor((lengths - 1 -
s) / T_max)` (the latest one congruent to s), and causal, window and segment masks act on absolute
positions as before: a query sees at most the T_max most recent tokens. `decode_step(...,
start=...)` hides everything before a per-batch absolute position, so a caller that keeps whole
episodes (agents.act: the n most recent) never sees the stale part of a half-overwritten one. This
needs a model without absolute positions (every cached token is in the query's past either way).

Dimension letters: B batch, T positions, H heads, D head dim; Tq new tokens per step, Tl = T_max/n.
"""

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringrl.ring.layout import check_layout, local_positions, position_owner, to_layout
from ringrl.ring.mesh import DATA, SEQ
from ringrl.ring.softmax import NEG_INF, merge, merge_over_axis


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """A KV cache laid out like the sequence on the ring.

    Attributes:
      k: [B, H, D, T_max] keys in layout order along T_max (global); inside shard_map the local
        [B, H, D, Tl].
      v: [B, H, T_max, D] values, same layout order (local [B, H, Tl, D]).
      lengths: [B] int32, number of valid positions per batch element (positions 0..length-1).
      segment_ids: [B, T_max] int32 in layout order, or None when the cache has no segments.
      layout: one of `ring.layout.LAYOUTS` (static).
      stripe: tokens per stripe for the striped layout (static; 1 for contiguous).
      rolling: ring buffer (static): position p is stored at `p mod T_max` and `lengths` counts
        every token appended, so the oldest tokens are overwritten instead of overflowing.
    """

    k: jax.Array
    v: jax.Array
    lengths: jax.Array
    segment_ids: jax.Array | None = None
    layout: str = dataclasses.field(default="contiguous", metadata=dict(static=True))
    stripe: int = dataclasses.field(default=1, metadata=dict(static=True))
    rolling: bool = dataclasses.field(default=False, metadata=dict(static=True))

    @property
    def max_len(self) -> int:
        """Capacity of the array as seen here (global outside shard_map, local inside)."""
        return int(self.v.shape[2])


def cache_specs(cache: KVCache, mesh: jax.sharding.Mesh | None = None) -> KVCache:
    """PartitionSpecs for `cache` (a KVCache of specs), for shard_map in_specs/out_specs.

    Keys are `P(DATA, None, None, SEQ)`, values `P(DATA, None, SEQ)`, segment ids `P(DATA, SEQ)`,
    lengths `P(DATA)`; DATA is dropped when `mesh` is given and has no DATA axis.
    """
    data = DATA if mesh is None or DATA in mesh.axis_names else None
    return dataclasses.replace(
        cache,
        k=P(data, None, None, SEQ),
        v=P(data, None, SEQ),
        lengths=P(data),
        segment_ids=None if cache.segment_ids is None else P(data, SEQ),
    )


def cache_shardings(cache: KVCache, mesh: jax.sharding.Mesh) -> KVCache:
    """NamedShardings of `cache` on `mesh`, for `jax.jit(..., out_shardings=...)` of a step.

    Passing them keeps a jitted decode step at one compile: without them a size-1 DATA axis can
    come back from shard_map in a different (equivalent) sharding form and trigger a recompile.
    """
    return jax.tree.map(lambda s: NamedSharding(mesh, s), cache_specs(cache, mesh))


def init_cache(
    batch: int,
    max_len: int,
    num_heads: int,
    head_dim: int,
    *,
    dtype: Any = jnp.float32,
    mesh: jax.sharding.Mesh | None = None,
    layout: str = "contiguous",
    stripe: int = 1,
    with_segment_ids: bool = False,
    rolling: bool = False,
) -> KVCache:
    """Creates an empty cache (lengths 0), sharded `P(DATA, SEQ)` over `mesh` when given.

    Args:
      batch: B.
      max_len: T_max, the capacity in tokens; a multiple of `ring.layout.layout_unit` (n, n *
        stripe or 2n for contiguous, striped, zigzag), n the mesh's SEQ size (1 without a mesh).
      num_heads: H.
      head_dim: D.
      dtype: dtype of keys and values (statistics are always float32).
      mesh: mesh with a SEQ axis (and optionally DATA); None for a single device.
      layout: one of `ring.layout.LAYOUTS`, the layout the ring uses for this sequence.
      stripe: striped layout only: consecutive tokens kept together on one device.
      with_segment_ids: also store per-position segment ids (zeros initially).
      rolling: a ring buffer keeping the T_max most recent tokens (see the module docstring).

    Returns:
      A KVCache.

    Raises:
      ValueError: bad layout, sizes that don't divide, or a mesh without a SEQ axis.
    """
    if mesh is not None and SEQ not in mesh.axis_names:
        raise ValueError(
            f"init_cache: mesh axes {mesh.axis_names} have no {SEQ!r} axis; build the mesh with "
            f"ring.mesh.make_mesh([..., ({SEQ!r}, n)])"
        )
    n = 1 if mesh is None else int(mesh.shape[SEQ])
    check_layout(layout, stripe, length=max_len, n=n, what="cache")
    for name, size in (("batch", batch), ("num_heads", num_heads), ("head_dim", head_dim)):
        if size < 1:
            raise ValueError(f"init_cache: {name} must be >= 1, got {size}")
    if mesh is not None and DATA in mesh.axis_names and batch % mesh.shape[DATA]:
        raise ValueError(
            f"init_cache: batch {batch} is not divisible by the {DATA!r} axis size "
            f"{mesh.shape[DATA]}; use a batch that is a multiple of it"
        )

    def zeros() -> KVCache:
        return KVCache(
            k=jnp.zeros((batch, num_heads, head_dim, max_len), dtype),
            v=jnp.zeros((batch, num_heads, max_len, head_dim), dtype),
            lengths=jnp.zeros((batch,), jnp.int32),
            segment_ids=jnp.zeros((batch, max_len), jnp.int32) if with_segment_ids else None,
            layout=layout,
            stripe=stripe,
            rolling=bool(rolling),
        )

    if mesh is None:
        return zeros()
    # Created by jit with out_shardings, so the shardings are exactly the ones a jitted step
    # returns (a device_put sharding can differ in form and cost one extra compile).
    return jax.jit(zeros, out_shardings=cache_shardings(jax.eval_shape(zeros), mesh))()


def cache_from_prefix(
    k: jax.Array,
    v: jax.Array,
    lengths: jax.Array,
    *,
    mesh: jax.sharding.Mesh | None = None,
    layout: str = "contiguous",
    stripe: int = 1,
    segment_ids: jax.Array | None = None,
) -> KVCache:
    """Builds a cache from keys/values already computed for a prompt (e.g. by a ring pass).

    Args:
      k: [B, T_max, H, D] keys in original order; positions >= lengths[b] are ignored (they are
        invisible to later queries and overwritten by `append`).
      v: [B, T_max, H, D] values.
      lengths: [B] int, valid prompt length per batch element (may differ).
      mesh: mesh with a SEQ axis; None for a single device.
      layout: the ring's layout; the arrays are permuted with `ring.layout.to_layout`.
      stripe: striped layout only.
      segment_ids: [B, T_max] int in original order, or None.

    Returns:
      A KVCache sharded like `init_cache` would shard it.

    Raises:
      ValueError: mismatched shapes or sizes that don't divide.
    """
    b, t_max, h, d = k.shape
    if v.shape != k.shape:
        raise ValueError(f"cache_from_prefix: k {k.shape} and v {v.shape} must have one shape")
    if jnp.shape(lengths) != (b,):
        raise ValueError(f"cache_from_prefix: lengths shape {jnp.shape(lengths)} != (B,) = ({b},)")
    if segment_ids is not None and segment_ids.shape != (b, t_max):
        raise ValueError(
            f"cache_from_prefix: segment_ids shape {segment_ids.shape} != (B, T_max) = {(b, t_max)}"
        )
    empty = init_cache(
        b,
        t_max,
        h,
        d,
        dtype=k.dtype,
        mesh=mesh,
        layout=layout,
        stripe=stripe,
        with_segment_ids=segment_ids is not None,
    )
    n = 1 if mesh is None else int(mesh.shape[SEQ])

    def build(k, v, lengths, segment_ids):
        return KVCache(  # [B, T, H, D] original order -> [B, H, D, T] / [B, H, T, D] layout order
            k=jnp.transpose(to_layout(k, n, layout, stripe), (0, 2, 3, 1)),
            v=jnp.swapaxes(to_layout(v, n, layout, stripe), 1, 2),
            lengths=jnp.asarray(lengths, jnp.int32),
            segment_ids=None
            if segment_ids is None
            else to_layout(jnp.asarray(segment_ids, jnp.int32), n, layout, stripe),
            layout=layout,
            stripe=stripe,
        )

    shardings = jax.tree.map(lambda x: x.sharding, empty)
    return jax.jit(build, out_shardings=shardings)(k, v, lengths, segment_ids)


def check_capacity(cache: KVCache, num_new: int) -> None:
    """Host-side check that `num_new` more tokens fit in every batch element's cache.

    Call it outside jit (it reads `cache.lengths` back to the host) before a step when a clean
    `ValueError` is wanted; inside jit an overflow prints the same message and makes
    `decode_step` return NaN for the affected batch elements (from then on).

    Raises:
      ValueError: some length + num_new exceeds the capacity.
    """
    if cache.rolling:  # a ring buffer overwrites its oldest tokens instead
        return
    lengths = np.asarray(jax.device_get(cache.lengths))
    worst = int(lengths.max(initial=0)) + int(num_new)
    if worst > cache.max_len:
        raise ValueError(_overflow_message(worst, cache.max_len, num_new))


def append(
    cache: KVCache,
    k: jax.Array,
    v: jax.Array,
    *,
    segment_ids: jax.Array | None = None,
    axis_name: str = SEQ,
) -> KVCache:
    """Writes Tq new keys/values at positions `lengths .. lengths + Tq - 1` (per-shard function).

    Call inside `jax.shard_map` over `axis_name`, with the cache's local slices and the new tokens
    replicated over the axis. Each device scatters only the positions it owns; the others are
    dropped, so the work is O(Tq), not O(T_max).

    Args:
      cache: local view of the cache (k [B, H, D, Tl], v [B, H, Tl, D], lengths [B]).
      k: [B, Tq, H, D] new keys (same values on every device of the axis).
      v: [B, Tq, H, D] new values.
      segment_ids: [B, Tq] int segment ids of the new tokens; required iff the cache stores them.
      axis_name: the ring's mesh axis.

    A rolling cache writes position p at `p mod T_max` (overwriting the token T_max positions
    earlier) and never overflows.

    Returns:
      The updated cache with lengths advanced by Tq.

    Raises:
      ValueError: shape/dtype mismatches, Tq larger than the capacity, or axis not bound.
      On overflow at run time (a position >= T_max) the writes are dropped, the message is
      printed, lengths still advance and `decode_step` returns NaN for that batch element.
    """
    n, idx = _axis(axis_name, "append")
    b, h, t_local, d = cache.v.shape
    _check_new(cache, k, "k")
    _check_new(cache, v, "v")
    tq = k.shape[1]
    t_max = t_local * n
    if tq > t_max:
        raise ValueError(_overflow_message(tq, t_max, tq))
    if (segment_ids is None) != (cache.segment_ids is None):
        raise ValueError(
            "append: segment_ids must be given exactly when the cache stores them (cache has "
            f"segment ids: {cache.segment_ids is not None}); create the cache with "
            "init_cache(..., with_segment_ids=True) to use them"
        )
    if segment_ids is not None and segment_ids.shape != (b, tq):
        raise ValueError(f"append: segment_ids shape {segment_ids.shape} != (B, Tq) = {(b, tq)}")

    lengths = cache.lengths.astype(jnp.int32)
    pos = lengths[:, None] + jnp.arange(tq, dtype=jnp.int32)[None, :]  # [B, Tq]
    if cache.rolling:
        pos = pos % t_max  # ring buffer: overwrite the oldest tokens
    else:
        _report_overflow(lengths, tq, t_max, idx)
    owner, slot = position_owner(pos, t_local, n, cache.layout, cache.stripe)
    # Positions owned elsewhere (or past the end) get an out-of-range slot and are dropped.
    slot = jnp.where((owner == idx) & (pos < t_max), slot, t_local)
    rows = jnp.broadcast_to(jnp.arange(b)[:, None], (b, tq))
    # Advanced indices split by slices: the indexed shape is [B, Tq, H, D], the new tokens' own.
    new_k = cache.k.at[rows, :, :, slot].set(k.astype(cache.k.dtype), mode="drop")
    new_v = cache.v.at[rows, :, slot].set(v.astype(cache.v.dtype), mode="drop")
    new_seg = cache.segment_ids
    if segment_ids is not None:
        new_seg = cache.segment_ids.at[rows, slot].set(
            segment_ids.astype(cache.segment_ids.dtype), mode="drop"
        )
    return dataclasses.replace(cache, k=new_k, v=new_v, segment_ids=new_seg, lengths=lengths + tq)


def decode_step(
    q: jax.Array,
    cache: KVCache,
    *,
    axis_name: str = SEQ,
    window: int | None = None,
    segment_ids: jax.Array | None = None,
    block_kv: int | None = None,
    start: jax.Array | None = None,
) -> jax.Array:
    """Attention of the Tq newest tokens over the whole cached prefix (per-shard function).

    The queries sit at positions `lengths - Tq .. lengths - 1`, i.e. their own keys/values must
    already be in the cache (call `append` first). Each query sees cached positions <= its own
    (and > its own - window), within its segment. Every device computes a partial softmax over
    its local slots and the partials are merged over `axis_name` (log-sum-exp), so the result is
    identical on every device and equals dense causal attention over the prefix.

    Args:
      q: [B, Tq, H, D] queries (same values on every device of the axis).
      cache: local view of the cache after `append`.
      axis_name: the ring's mesh axis.
      window: sliding window in tokens (query at p sees p-window+1..p); None = unlimited.
      segment_ids: [B, Tq] int ids of the queries; required iff the cache stores segment ids.
      block_kv: if given, the local slots are processed in chunks of this many with an online
        softmax, bounding the score matrix to [B, H, Tq, block_kv] (useful for long prefills).
      start: [B] int, first visible absolute position per batch element (earlier tokens are
        hidden), e.g. where the oldest episode kept by a rolling cache begins; None = 0.

    Positions are absolute: in a rolling cache (see `append`) each slot's absolute position is
    derived from `lengths`, so a query sees the cached tokens in [max(start, lengths - T_max), its
    own position] (and its window, segment), whatever slots they sit in.

    Returns:
      [B, Tq, H, D] in q.dtype.

    Raises:
      ValueError: shape mismatches, window < 1, block_kv not dividing Tl, or axis not bound.
    """
    n, idx = _axis(axis_name, "decode_step")
    b, h, t_local, d = cache.v.shape
    _check_new(cache, q, "q")
    tq = q.shape[1]
    if window is not None and window < 1:
        raise ValueError(f"decode_step: window must be >= 1 or None, got {window}")
    if (segment_ids is None) != (cache.segment_ids is None):
        raise ValueError(
            "decode_step: segment_ids (of the queries) must be given exactly when the cache "
            f"stores them (cache has segment ids: {cache.segment_ids is not None})"
        )
    if segment_ids is not None and segment_ids.shape != (b, tq):
        raise ValueError(
            f"decode_step: segment_ids shape {segment_ids.shape} != (B, Tq) = {(b, tq)}"
        )
    block = t_local if block_kv is None else int(block_kv)
    if block < 1 or t_local % block:
        raise ValueError(
            f"decode_step: block_kv={block_kv} must divide the local cache length "
            f"Tl = T_max / n = {t_local}; pick a divisor or None"
        )

    if start is not None and jnp.shape(start) != (b,):
        raise ValueError(f"decode_step: start shape {jnp.shape(start)} != (B,) = ({b},)")

    lengths = cache.lengths.astype(jnp.int32)
    q_pos = lengths[:, None] - tq + jnp.arange(tq, dtype=jnp.int32)
    k_pos = local_positions(idx, n, t_local, cache.layout, cache.stripe)  # [Tl]
    k_pos = jnp.broadcast_to(k_pos[None, :], (b, t_local)).astype(jnp.int32)  # [B, Tl]
    if cache.rolling:
        # The latest absolute position stored at each slot; never-written slots keep their
        # position (>= lengths), so the causal test hides them as in a plain cache.
        t_max = t_local * n
        last = lengths[:, None] - 1
        k_pos = jnp.where(k_pos <= last, k_pos + t_max * ((last - k_pos) // t_max), k_pos)
    if start is not None:
        # Hidden slots get a position after every query (the causal test drops them).
        k_pos = jnp.where(k_pos < start.astype(jnp.int32)[:, None], jnp.iinfo(jnp.int32).max, k_pos)
    qf = jnp.swapaxes(q.astype(jnp.float32) * (1.0 / np.sqrt(d)), 1, 2)  # [B, H, Tq, D]

    def partial_softmax(kc, vc, kp, segc):
        # kc [B,H,D,C], vc [B,H,C,D]; kp, segc [B,C] (segc or None) -> o [B,H,Tq,D], lse [B,H,Tq]
        visible = kp[:, None, :] <= q_pos[:, :, None]  # [B, Tq, C]; also excludes empty slots
        if window is not None:
            visible &= kp[:, None, :] > q_pos[:, :, None] - window
        if segc is not None:
            visible &= segment_ids[:, :, None] == segc[:, None, :]
        s = jnp.einsum("bhqd,bhdk->bhqk", qf, kc.astype(jnp.float32))
        s = jnp.where(visible[:, None], s, NEG_INF)
        m = jnp.max(s, axis=-1)
        m_safe = jnp.where(jnp.isfinite(m), m, 0.0)
        p = jnp.exp(s - m_safe[..., None])  # exp(-inf) = 0 for hidden slots
        denom = jnp.sum(p, axis=-1)
        o = jnp.einsum("bhqk,bhkd->bhqd", p, vc.astype(jnp.float32))
        o = o / jnp.where(denom > 0, denom, 1.0)[..., None]
        lse = jnp.where(denom > 0, m_safe + jnp.log(jnp.where(denom > 0, denom, 1.0)), NEG_INF)
        return o, lse

    if block == t_local:
        o, lse = partial_softmax(cache.k, cache.v, k_pos, cache.segment_ids)
    else:
        nb = t_local // block

        def chunks(x, axis=1):  # [..., Tl (at axis), ...] -> [nb, ..., block, ...]
            split = x.reshape(*x.shape[:axis], nb, block, *x.shape[axis + 1 :])
            return jnp.moveaxis(split, axis, 0)

        seg = None if cache.segment_ids is None else chunks(cache.segment_ids)

        def body(carry, xs):
            kc, vc, kp, segc = xs
            o_c, lse_c = partial_softmax(kc, vc, kp, segc)
            return merge(*carry, o_c, lse_c), None

        xs = (chunks(cache.k, 3), chunks(cache.v, 2), chunks(k_pos), seg)
        # The first chunk seeds the carry, so it has the shard_map (varying) type of the rest.
        first = partial_softmax(*jax.tree.map(lambda x: x[0], xs))
        (o, lse), _ = jax.lax.scan(body, first, jax.tree.map(lambda x: x[1:], xs))
    out, _ = merge_over_axis(o, lse, axis_name)
    out = jnp.swapaxes(out, 1, 2)  # [B, Tq, H, D]
    # After an overflow (see `append`) the newest keys were dropped: never return a quiet answer.
    overflowed = (cache.lengths > t_local * n) & (not cache.rolling)
    out = jnp.where(overflowed[:, None, None, None], jnp.nan, out)
    return out.astype(q.dtype)


def _axis(axis_name: str, where: str) -> tuple[int, jax.Array]:
    """(axis size, this device's index) or a ValueError naming the missing axis."""
    try:
        return int(jax.lax.axis_size(axis_name)), jax.lax.axis_index(axis_name)
    except NameError as e:
        raise ValueError(
            f"{where}: mesh axis {axis_name!r} is not bound; call it inside jax.shard_map over a "
            f"mesh with that axis (or pass axis_name=...)"
        ) from e


def _check_new(cache: KVCache, x: jax.Array, name: str) -> None:
    b, h, _, d = cache.v.shape
    if x.ndim != 4 or x.shape[0] != b or x.shape[2:] != (h, d) or x.shape[1] < 1:
        raise ValueError(
            f"{name} has shape {tuple(x.shape)}, expected [B, Tq, H, D] = [{b}, Tq>=1, {h}, {d}] "
            f"to match the cache (local value shape [B, H, Tl, D] = {tuple(cache.v.shape)})"
        )
    if cache.lengths.shape != (b,):
        raise ValueError(f"cache.lengths shape {cache.lengths.shape} != (B,) = {(b,)}")


def _overflow_message(needed: int | str, t_max: int, num_new: int) -> str:
    return (
        f"KV cache overflow: writing {num_new} new token(s) needs {needed} positions but the "
        f"cache holds T_max = {t_max}; create it with init_cache(max_len>={needed}) (rounded up to "
        f"a multiple of ring.layout.layout_unit) or start a new context"
    )


def _report_overflow(lengths: jax.Array, tq: int, t_max: int, idx: jax.Array) -> None:
    """Prints the overflow message at run time (device 0 only, only when it happens).

    Raising from a host callback inside a multi-device program aborts the process (the other
    devices are waiting in collectives), so inside jit the error is a printed message plus NaN
    outputs (see `decode_step`); `check_capacity` raises a proper ValueError on the host.
    """
    worst = jnp.max(lengths) + tq
    msg = _overflow_message("{worst}", t_max, tq)  # jax.debug.print fills in {worst}
    jax.lax.cond(
        (worst > t_max) & (idx == 0),
        lambda: jax.debug.print(msg, worst=worst),
        lambda: None,
    )
