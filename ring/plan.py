"""Block-size planner for ring attention: memory, compute/communication overlap, load balance.

`plan(...)` is a pure model (no devices touched): for a sequence of T tokens on a ring of n devices
it picks `block_q` / `block_kv` for `ring.attention.ring_attention` and reports

- the predicted per-device memory, from an inventory of the kernel's real buffers (local q/k/v/o,
  the travelling K/V block plus the one arriving, chunk score matrices, f32 statistics and
  accumulators, and in the backward pass the travelling dK/dV in f32 plus the one arriving);
- the compute-to-communication ratio of one hop: (FLOPs of the hop / FLOP/s) ÷ (bytes sent per hop /
  link bandwidth). Ring Attention (Liu et al. 2023, §3) overlaps the send with the compute only when
  this is >= 1, i.e. the local block must be at least about FLOP/s ÷ bandwidth tokens long;
- the causal load-imbalance factor of the layout: the critical path (the busiest device's number of
  non-empty chunk pairs, counted exactly with the kernel's own skipping rule) ÷ (total / n). The
  contiguous causal layout tends to (2n-1)/n; the striped layout stays near 1;
- the longest sequence whose per-device memory fits the budget with the chosen blocks.

`autotune(...)` times candidate block sizes of the real `ring_attention` (jitted forward+backward,
median of a few runs) on the mesh's devices and returns the fastest with the timings table.

Dimension letters: B batch, T tokens (Tl = T / n per device), H heads, D head dim, n ring size.
"""

import dataclasses
import itertools
import math
import statistics
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ringrl.ring.layout import LAYOUTS, local_positions
from ringrl.ring.mesh import DATA, SEQ

DEFAULT_CANDIDATES = (64, 128, 256, 512, 1024, 2048)
# Matmuls per chunk pair: forward QK^T and PV; backward recomputes QK^T, then dV, dP, dQ, dK.
FWD_MATMULS = 2
BWD_MATMULS = 5


@dataclasses.dataclass(frozen=True)
class Plan:
    """The planner's choice and its predictions (bytes and seconds are per device).

    Attributes:
      seq_len, n_devices, t_local: T, n and Tl = T / n.
      block_q, block_kv: the chosen inner chunk sizes.
      memory_bytes: predicted peak memory of forward+backward (or forward only when the plan was
        made with `backward=False`), including the local inputs and outputs.
      memory_fwd_bytes: predicted peak memory of the forward pass alone.
      memory_breakdown: the buffer inventory behind `memory_bytes` (name -> bytes).
      hops: ring hops computed (n, or fewer with a window).
      bytes_per_hop_fwd, bytes_per_hop_bwd: sent per hop (K/V; backward adds dK/dV in f32).
      flops_per_hop_fwd, flops_per_hop_bwd: FLOPs of one full (unmasked) hop.
      compute_to_comm_fwd, compute_to_comm_bwd: (critical-path FLOPs per hop / flops_per_s) ÷
        (bytes per hop / link_bytes_per_s); >= 1 means the send hides behind the compute.
      min_t_local_for_overlap: smallest Tl with compute_to_comm_fwd >= 1 for a full hop.
      imbalance: critical-path chunk work ÷ (total chunk work / n), 1.0 = perfectly balanced.
      chunk_pairs_critical, chunk_pairs_total: the counts behind `imbalance`.
      predicted_seconds: modelled time of the critical path (chunk FLOPs + per-chunk overhead).
      max_seq_len: longest T (a multiple of the block and layout units) that fits the budget.
      layout, stripe, causal, window: the configuration planned for.
    """

    seq_len: int
    n_devices: int
    t_local: int
    block_q: int
    block_kv: int
    memory_bytes: int
    memory_fwd_bytes: int
    memory_breakdown: dict[str, int]
    hops: int
    bytes_per_hop_fwd: int
    bytes_per_hop_bwd: int
    flops_per_hop_fwd: float
    flops_per_hop_bwd: float
    compute_to_comm_fwd: float
    compute_to_comm_bwd: float
    min_t_local_for_overlap: int
    imbalance: float
    chunk_pairs_critical: int
    chunk_pairs_total: int
    predicted_seconds: float
    max_seq_len: int
    layout: str
    stripe: int
    causal: bool
    window: int | None

    def summary(self) -> str:
        """One human-readable paragraph."""
        mib = 1 << 20
        return (
            f"T={self.seq_len} on n={self.n_devices} ({self.layout}, stripe {self.stripe}): "
            f"block_q={self.block_q} block_kv={self.block_kv}; memory {self.memory_bytes / mib:.1f}"
            f" MiB/device (fwd {self.memory_fwd_bytes / mib:.1f} MiB); compute/comm per hop "
            f"{self.compute_to_comm_fwd:.2f} fwd, {self.compute_to_comm_bwd:.2f} bwd (overlap "
            f"needs Tl >= {self.min_t_local_for_overlap}); imbalance {self.imbalance:.3f}; "
            f"{self.hops} hops; max T in budget {self.max_seq_len}"
        )


def memory_model(
    t_local: int,
    block_q: int,
    block_kv: int,
    num_heads: int,
    head_dim: int,
    dtype: Any,
    *,
    batch: int = 1,
    backward: bool = True,
) -> dict[str, int]:
    """Inventory of the kernel's live buffers at its peak, per device (bytes).

    Forward: local q/k/v and the output; the stacked K/V block travelling round the ring plus the
    one arriving (ppermute writes a new buffer); the f32 output accumulator and log-sum-exp; per
    chunk pair the f32 score and probability matrices [B, H, bq, bkv] and the f32 q/k/v/accumulator
    chunks. Backward (the peak of training): the inputs and residuals (output, lse), the incoming
    gradient, rowsum(dO*O), travelling K/V plus the arriving copy, the f32 dQ accumulator, the
    travelling f32 dK/dV plus the arriving copy, the returned dq/dk/dv, and per chunk pair four f32
    matrices (S, P, dP, dS). The kernel works token-major, so no whole-shard transposes.

    XLA fuses some of these: compiled memory (arguments + outputs + temporaries) measured 0.65-0.9x
    this inventory for forward+backward and 0.8-1.2x for the forward pass on CPU (f32 and bf16,
    B 1-2, chunks 64-512); tests/test_ring_plan.py holds it to 0.6-1.3x.
    """
    b = jnp.dtype(dtype).itemsize
    e = batch * t_local * num_heads * head_dim  # elements of one local [B, Tl, H, D] array
    s = batch * num_heads * t_local  # one f32 statistic per query row
    c = batch * num_heads * block_q * block_kv  # one chunk score matrix
    qc = batch * num_heads * block_q * head_dim
    kc = batch * num_heads * block_kv * head_dim
    if not backward:
        return {
            "inputs q,k,v": 3 * e * b,
            "output": e * b,
            "K/V travelling + arriving": 4 * e * b,
            "f32 output accumulator": 4 * e,
            "f32 lse": 4 * s,
            "f32 chunk scores, probs": 2 * 4 * c,
            "f32 chunk q/acc/k/v": 4 * (2 * qc + 2 * kc),
        }
    return {
        "inputs q,k,v": 3 * e * b,
        "residual output": e * b,
        "f32 residual lse, rowsum(dO*O)": 2 * 4 * s,
        "incoming gradient dO": e * b,
        "K/V travelling + arriving": 4 * e * b,
        "f32 dQ accumulator": 4 * e,
        "f32 dK/dV travelling + arriving": 4 * 4 * e,
        "returned dq, dk, dv": 3 * e * b,
        "f32 chunk S, P, dP, dS": 4 * 4 * c,
        "f32 chunk q/dO/k/v": 4 * (2 * qc + 2 * kc),
    }


def chunk_work(
    seq_len: int,
    n_devices: int,
    block_q: int,
    block_kv: int,
    *,
    causal: bool = True,
    window: int | None = None,
    layout: str = "contiguous",
    stripe: int = 1,
    hops: int | None = None,
) -> np.ndarray:
    """Non-empty chunk pairs per device and hop: int64 [n, hops].

    A (query chunk, key chunk) pair is non-empty under the kernel's rule (`ring.attention`'s chunk
    plan): causal: min key position <= max query position; window w: max key position > min query
    position - w. Positions come from the layout; hop h brings device i the block of device
    (i - h) mod n.
    """
    n = n_devices
    tl = seq_len // n
    hops = n if hops is None else hops
    nq, nk = tl // block_q, tl // block_kv
    pos = [local_positions(d, n, tl, layout, stripe, xp=np).astype(np.int64) for d in range(n)]
    work = np.zeros((n, hops), np.int64)
    for i in range(n):
        qc = pos[i].reshape(nq, block_q)
        qmin, qmax = qc[:, 0], qc[:, -1]
        for h in range(hops):
            kc = pos[(i - h) % n].reshape(nk, block_kv)
            kmin, kmax = kc[:, 0], kc[:, -1]  # both increasing along the chunks
            if causal:
                count = np.searchsorted(kmin, qmax, side="right")
            else:
                count = np.full(nq, nk)
            if window is not None:
                # Pairs with kmax <= qmin - w are out of the window; they all have kmin <= qmax.
                count = count - np.searchsorted(kmax, qmin - window, side="right")
            work[i, h] = int(np.maximum(count, 0).sum())
    return work


def imbalance_factor(
    seq_len: int,
    n_devices: int,
    block_q: int,
    block_kv: int,
    *,
    causal: bool = True,
    window: int | None = None,
    layout: str = "contiguous",
    stripe: int = 1,
) -> float:
    """Critical-path chunk work ÷ (total chunk work / n); 1.0 is perfect balance."""
    work = chunk_work(
        seq_len,
        n_devices,
        block_q,
        block_kv,
        causal=causal,
        window=window,
        layout=layout,
        stripe=stripe,
    ).sum(1)
    total = work.sum()
    return float(work.max() * n_devices / total) if total else 1.0


def plan(
    seq_len: int,
    n_devices: int,
    num_heads: int,
    head_dim: int,
    dtype: Any = jnp.float32,
    *,
    mem_budget_bytes: float,
    flops_per_s: float,
    link_bytes_per_s: float,
    causal: bool = True,
    window: int | None = None,
    layout: str = "contiguous",
    stripe: int = 1,
    batch: int = 1,
    backward: bool = True,
    candidates: Sequence[int] | Sequence[tuple[int, int]] = DEFAULT_CANDIDATES,
    chunk_overhead_s: float = 1e-5,
) -> Plan:
    """Chooses block_q / block_kv for `ring_attention` and predicts memory, overlap and balance.

    Among the candidate block sizes that divide T_local and whose predicted memory fits the budget,
    the plan minimises the modelled critical-path time: non-empty chunk pairs on the busiest device
    × (FLOPs per pair / flops_per_s + chunk_overhead_s). Small blocks waste fewer FLOPs on the
    causal diagonal; large blocks pay the per-chunk overhead less often; ties go to larger blocks.

    Args:
      seq_len: T, global sequence length.
      n_devices: n, size of the ring (SEQ axis).
      num_heads: H.
      head_dim: D.
      dtype: dtype of q/k/v (statistics and gradients accumulate in float32).
      mem_budget_bytes: per-device memory available to one attention call.
      flops_per_s: sustained matmul FLOP/s of one device.
      link_bytes_per_s: bandwidth of one ring link (bytes/s, one direction).
      causal: causal masking (its empty chunk pairs are skipped).
      window: sliding window in tokens, or None.
      layout: "contiguous" or "striped".
      stripe: striped layout only, tokens kept together per device.
      batch: B per device.
      backward: plan for forward+backward (training) memory; False = forward only.
      candidates: block sizes to consider: ints (all (bq, bkv) pairs of them) or (bq, bkv) pairs.
      chunk_overhead_s: assumed fixed cost of one chunk-pair iteration (loop and slicing
        bookkeeping); a modelling assumption, `autotune` measures the truth.

    Returns:
      A Plan.

    Raises:
      ValueError: bad sizes or layout, no candidate dividing T_local, or no candidate fitting the
        budget (the message gives the smallest budget that would fit).
    """
    for name, val in (
        ("seq_len", seq_len),
        ("n_devices", n_devices),
        ("num_heads", num_heads),
        ("head_dim", head_dim),
        ("batch", batch),
        ("stripe", stripe),
    ):
        if not isinstance(val, (int, np.integer)) or val < 1:
            raise ValueError(f"plan: {name} must be a positive int, got {val!r}")
    for name, val in (
        ("mem_budget_bytes", mem_budget_bytes),
        ("flops_per_s", flops_per_s),
        ("link_bytes_per_s", link_bytes_per_s),
    ):
        if not val > 0:
            raise ValueError(f"plan: {name} must be > 0, got {val!r}")
    if layout not in LAYOUTS:
        raise ValueError(f"plan: unknown layout {layout!r}; use one of {LAYOUTS}")
    if layout == "contiguous" and stripe != 1:
        raise ValueError(f"plan: stripe={stripe} only applies to layout='striped'")
    if window is not None and (window < 1 or not causal):
        raise ValueError(f"plan: window must be >= 1 and needs causal=True, got {window!r}")
    unit = n_devices * (stripe if layout == "striped" else 1)
    if seq_len % unit:
        raise ValueError(
            f"plan: seq_len {seq_len} is not divisible by {unit} (n devices {n_devices}"
            f"{f' x stripe {stripe}' if layout == 'striped' else ''}); pad it to a multiple"
        )
    t_local = seq_len // n_devices
    pairs = _candidate_pairs(candidates)
    fitting_tl = [(bq, bk) for bq, bk in pairs if t_local % bq == 0 and t_local % bk == 0]
    if not fitting_tl:
        raise ValueError(
            f"plan: no candidate block size divides T_local = {seq_len} / {n_devices} = {t_local} "
            f"(candidates {sorted({p for pair in pairs for p in pair})}); add a divisor of "
            f"{t_local} to candidates"
        )

    def mem(bq, bk, tl=t_local, bwd=backward):
        model = memory_model(tl, bq, bk, num_heads, head_dim, dtype, batch=batch, backward=bwd)
        return sum(model.values())

    fits = [(bq, bk) for bq, bk in fitting_tl if mem(bq, bk) <= mem_budget_bytes]
    if not fits:
        need, (bq, bk) = min((mem(bq, bk), (bq, bk)) for bq, bk in fitting_tl)
        raise ValueError(
            f"plan: nothing fits {mem_budget_bytes / 2**20:.1f} MiB per device for T={seq_len} on "
            f"n={n_devices} (T_local={t_local}); the smallest candidate (block_q={bq}, "
            f"block_kv={bk}) needs {need} bytes ({need / 2**20:.1f} MiB). Raise "
            f"mem_budget_bytes to >= {need}, use more devices, or a shorter sequence"
        )

    hops = _num_hops(layout, stripe, window, t_local, n_devices)
    pair_matmul = 2 * batch * num_heads * head_dim  # FLOPs per (query, key) per matmul
    matmuls = FWD_MATMULS + (BWD_MATMULS if backward else 0)

    def modelled(bq, bk):
        work = chunk_work(
            seq_len,
            n_devices,
            bq,
            bk,
            causal=causal,
            window=window,
            layout=layout,
            stripe=stripe,
            hops=hops,
        )
        per_dev = work.sum(1)
        per_pair = matmuls * pair_matmul * bq * bk / flops_per_s + chunk_overhead_s
        return float(per_dev.max() * per_pair), work

    scored = []
    for bq, bk in fits:
        seconds, work = modelled(bq, bk)
        scored.append((seconds, -bq * bk, bq, bk, work))
    seconds, _, bq, bk, work = min(scored, key=lambda r: r[:2])
    per_dev = work.sum(1)
    total = int(per_dev.sum())
    critical = int(per_dev.max())
    imbalance = float(critical * n_devices / total) if total else 1.0

    itemsize = jnp.dtype(dtype).itemsize
    e = batch * t_local * num_heads * head_dim
    bytes_fwd = 2 * e * itemsize
    bytes_bwd = bytes_fwd + 2 * 4 * e  # dK/dV travel in float32
    full_hop = pair_matmul * t_local * t_local
    # Critical path spread evenly over the hops that are run (the busiest device's average hop).
    crit_pairs_per_hop = critical / max(hops, 1)
    hop_fwd_flops = FWD_MATMULS * pair_matmul * bq * bk * crit_pairs_per_hop
    hop_bwd_flops = BWD_MATMULS * pair_matmul * bq * bk * crit_pairs_per_hop
    ratio_fwd = (hop_fwd_flops / flops_per_s) / (bytes_fwd / link_bytes_per_s)
    ratio_bwd = (hop_bwd_flops / flops_per_s) / (bytes_bwd / link_bytes_per_s)
    # Full hop: FWD_MATMULS * 2 B H D Tl^2 FLOPs vs 2 B Tl H D itemsize bytes -> linear in Tl.
    min_tl = math.ceil(flops_per_s * 2 * itemsize / (link_bytes_per_s * FWD_MATMULS * 2))

    breakdown = memory_model(
        t_local, bq, bk, num_heads, head_dim, dtype, batch=batch, backward=backward
    )
    return Plan(
        seq_len=seq_len,
        n_devices=n_devices,
        t_local=t_local,
        block_q=bq,
        block_kv=bk,
        memory_bytes=int(sum(breakdown.values())),
        memory_fwd_bytes=int(mem(bq, bk, bwd=False)),
        memory_breakdown=breakdown,
        hops=hops,
        bytes_per_hop_fwd=int(bytes_fwd),
        bytes_per_hop_bwd=int(bytes_bwd),
        flops_per_hop_fwd=float(FWD_MATMULS * full_hop),
        flops_per_hop_bwd=float(BWD_MATMULS * full_hop),
        compute_to_comm_fwd=float(ratio_fwd),
        compute_to_comm_bwd=float(ratio_bwd),
        min_t_local_for_overlap=int(min_tl),
        imbalance=imbalance,
        chunk_pairs_critical=critical,
        chunk_pairs_total=total,
        predicted_seconds=seconds,
        max_seq_len=_max_seq_len(
            mem_budget_bytes, n_devices, bq, bk, layout, stripe, lambda tl: mem(bq, bk, tl)
        ),
        layout=layout,
        stripe=stripe,
        causal=causal,
        window=window,
    )


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
    from ringrl.ring.attention import ring_attention  # heavy module; only autotune needs it

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


def _candidate_pairs(candidates) -> list[tuple[int, int]]:
    cands = list(candidates)
    if not cands:
        raise ValueError("plan: candidates is empty")
    if all(isinstance(c, (int, np.integer)) for c in cands):
        pairs = list(itertools.product(cands, cands))
    else:
        pairs = [tuple(c) for c in cands]
    for bq, bk in pairs:
        if bq < 1 or bk < 1:
            raise ValueError(f"plan: block sizes must be >= 1, got ({bq}, {bk})")
    return [(int(bq), int(bk)) for bq, bk in pairs]


def _num_hops(layout: str, stripe: int, window: int | None, t_local: int, n: int) -> int:
    from ringrl.ring.attention import num_hops  # the kernel's own rule for which hops run

    return int(num_hops(layout, stripe, window, t_local, n))


def _max_seq_len(budget, n, bq, bk, layout, stripe, mem_of_tl) -> int:
    """Largest T = n * Tl (Tl a multiple of bq, bk, stripe) with mem_of_tl(Tl) <= budget."""
    unit = math.lcm(bq, bk, stripe if layout == "striped" else 1)
    # Memory is affine in Tl for fixed blocks: solve from two points, then step down to be safe.
    m1, m2 = mem_of_tl(unit), mem_of_tl(2 * unit)
    if m1 > budget:
        return 0
    slope = (m2 - m1) / unit
    tl = unit * max(1, int((budget - m1) // (slope * unit)) + 1) if slope > 0 else unit
    while tl > unit and mem_of_tl(tl) > budget:
        tl -= unit
    return int(n * tl)
