"""Measured block-size tuning: times `ring_attention` on the real devices.

`ring.plan` is the pure model (nothing runs); this module is the tool that runs: `autotune` jits
forward+backward for each candidate block size on a mesh and keeps the fastest. It is a tool for
benchmarks and for choosing `block_q` / `block_kv` by hand: the backbone does not call it.

Dimension letters: B batch, T tokens (Tl = T / n per device), H heads, D head dim, n ring size.
"""

import dataclasses
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ringrl.ring.attention import ring_attention
from ringrl.ring.mesh import DATA, SEQ
from ringrl.ring.plan import _candidate_pairs


@dataclasses.dataclass(frozen=True)
class AutotuneResult:
    """Fastest measured block sizes and the full timings table.

    Attributes:
      block_q, block_kv: the fastest candidate.
      seconds: its median forward+backward time.
      table: one dict per candidate: block_q, block_kv, median_s, times_s (all runs).
    """

    block_q: int
    block_kv: int
    seconds: float
    table: list[dict[str, Any]]


def autotune(
    seq_len: int,
    mesh: jax.sharding.Mesh,
    num_heads: int,
    head_dim: int,
    dtype: Any = jnp.float32,
    *,
    batch: int = 1,
    causal: bool = True,
    window: int | None = None,
    layout: str = "contiguous",
    stripe: int = 1,
    candidates: Sequence[int] | Sequence[tuple[int, int]] = (256, 512),
    repeats: int = 3,
    backward: bool = True,
    seed: int = 0,
) -> AutotuneResult:
    """Times `ring_attention` for each candidate block size on the mesh's devices.

    Each candidate is jitted (forward+backward through `jax.grad` of a sum, or forward only),
    compiled and run once untimed, then timed `repeats` times; the median decides.

    Args:
      seq_len: global T (sharded over the mesh's SEQ axis).
      mesh: a mesh with a SEQ axis (and optionally DATA, which then shards the batch).
      num_heads, head_dim, dtype, batch: the attention shape.
      causal, window, layout, stripe: as for `ring_attention`.
      candidates: ints (square blocks: block_q = block_kv) or (block_q, block_kv) pairs.
      repeats: timed runs per candidate.
      backward: time forward+backward (True) or the forward pass only.
      seed: for the random inputs.

    Returns:
      An AutotuneResult (fastest first in nothing; the table keeps the candidates' order).

    Raises:
      ValueError: the mesh has no SEQ axis, or no candidate divides T_local.
    """
    if SEQ not in mesh.axis_names:
        raise ValueError(f"autotune: mesh axes {mesh.axis_names} have no {SEQ!r} axis")
    if repeats < 1:
        raise ValueError(f"autotune: repeats must be >= 1, got {repeats}")
    n = int(mesh.shape[SEQ])
    if seq_len % n:
        raise ValueError(f"autotune: seq_len {seq_len} is not divisible by the {SEQ!r} axis {n}")
    t_local = seq_len // n
    pairs = [
        (bq, bk)
        for bq, bk in (
            [(c, c) for c in candidates]
            if all(isinstance(c, (int, np.integer)) for c in candidates)
            else _candidate_pairs(candidates)
        )
        if t_local % bq == 0 and t_local % bk == 0
    ]
    if not pairs:
        raise ValueError(
            f"autotune: no candidate in {list(candidates)} divides T_local = {t_local}; add a "
            f"divisor of {t_local}"
        )
    data = DATA if DATA in mesh.axis_names else None
    spec = jax.sharding.PartitionSpec(data, SEQ)
    sharding = jax.sharding.NamedSharding(mesh, spec)
    keys = jax.random.split(jax.random.key(seed), 3)
    q, k, v = (
        jax.device_put(
            jax.random.normal(key, (batch, seq_len, num_heads, head_dim), dtype), sharding
        )
        for key in keys
    )
    table = []
    for bq, bk in pairs:
        attn = jax.shard_map(
            lambda q, k, v, bq=bq, bk=bk: ring_attention(
                q,
                k,
                v,
                causal=causal,
                window=window,
                layout=layout,
                stripe=stripe,
                block_q=bq,
                block_kv=bk,
            ),
            mesh=mesh,
            in_specs=(spec, spec, spec),
            out_specs=spec,
        )
        if backward:
            fn = jax.jit(
                jax.grad(
                    lambda q, k, v, attn=attn: jnp.sum(attn(q, k, v).astype(jnp.float32)),
                    (0, 1, 2),
                )
            )
        else:
            fn = jax.jit(attn)
        jax.block_until_ready(fn(q, k, v))  # compile + warm up, untimed
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(q, k, v))
            times.append(time.perf_counter() - start)
        table.append(
            dict(block_q=bq, block_kv=bk, median_s=statistics.median(times), times_s=times)
        )
    best = min(table, key=lambda r: r["median_s"])
    return AutotuneResult(best["block_q"], best["block_kv"], best["median_s"], table)
