"""Block-size planner for ring attention: memory, compute/communication overlap, load balance.

`plan(...)` is a pure model (no devices touched): for a sequence of T tokens on a ring of n devices
it picks `block_q` / `block_kv` for `ring.attention.ring_attention` and reports

- the predicted per-device memory, from an inventory of the kernel's real buffers (local q/k/v/o,
  the travelling K/V block plus the one arriving, chunk score matrices, f32 statistics and
  accumulators, and in the backward pass the travelling dK/dV in f32 plus the one arriving);
- the compute-to-communication ratio of one hop: (FLOPs of the hop / FLOP/s) ÷ (bytes sent per hop /
  link bandwidth). Ring Attention (Liu et al. 2023, §3) overlaps the send with the compute only when
  this is >= 1, i.e. the local block must be at least about FLOP/s ÷ bandwidth tokens long;
- the work of the layout in absolute units of one full block pair (Tl x Tl query-key pairs):
  `work_total`, summed over devices and hops, and `work_critical`, the busiest device's share,
  both counted exactly with the kernel's own chunk-skipping rule (`layout_work`). Their ideal is
  the useful work (visible query-key pairs) ÷ n; `imbalance` = critical ÷ that ideal, so a layout
  that balances by doing extra masked work (striped) is not reported as perfect. Causal, 8
  devices, T=16384, chunk 256: contiguous 32.5 total / 7.56 critical, striped 36 / 4.5, zigzag
  32.5 / 4.06 (ideal 4.0);
- the longest sequence whose per-device memory fits the budget with the chosen blocks.

It is a tool: the backbone takes `block_q` / `block_kv` from its config (None: the kernel's
`default_block`), and `ring.tune.autotune` measures candidates on real devices.

Dimension letters: B batch, T tokens (Tl = T / n per device), H heads, D head dim, n ring size.
"""

import dataclasses
import itertools
import math
from collections.abc import Sequence
from typing import Any

import jax.numpy as jnp
import numpy as np

from ringrl.ring.attention import default_head_block
from ringrl.ring.layout import check_layout, layout_unit, local_positions, num_hops

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
      imbalance: work_critical ÷ (useful work / n); 1.0 = perfect balance with no wasted work.
      chunk_pairs_critical, chunk_pairs_total: non-empty chunk pairs (busiest device, all).
      work_critical, work_total: the same in full block pairs (Tl x Tl), comparable across
        layouts and block sizes.
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
    work_critical: float
    work_total: float
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
    head_block: int | None = None,
) -> dict[str, int]:
    """Inventory of the kernel's live buffers at its peak, per device (bytes).

    The ring is walked once per group of `head_block` heads (None: the kernel's
    `default_head_block`), so every buffer of one pass (head-major copies, travelling blocks,
    accumulators, chunk matrices) holds head_block of the H heads; inputs, outputs and residuals
    hold all of them.

    Forward: local q/k/v and the output; the head-major copy of q the kernel makes once per call;
    the stacked K/V block travelling round the ring plus the one arriving (ppermute writes a new
    buffer); the f32 output accumulator and log-sum-exp; per chunk pair the f32 score and
    probability matrices [B, H, bq, bkv] and the f32 q/k/v/accumulator chunks. Backward (the peak
    of training): the inputs and residuals (output, lse), the incoming gradient, rowsum(dO*O), the
    head-major copies of q and dO, travelling K/V plus the arriving copy, the f32 dQ accumulator,
    the travelling f32 dK/dV plus the arriving copy, the hop's own f32 dK/dV partial (the
    pipelined backward adds the arriving accumulator after computing it), the returned dq/dk/dv,
    and per chunk pair four f32 matrices (S, P, dP, dS).

    XLA fuses some of these: compiled memory (arguments + outputs + temporaries) measured
    0.74-1.04x this inventory for forward+backward (n=8, T=4096, H=4, D=64, chunks 64-512, f32
    and bf16) and 1.18x for a bf16 forward pass on CPU (n=4, chunks 128 x 256);
    tests/test_ring_plan.py holds it to 0.6-1.3x.
    """
    if head_block is None:
        head_block = default_head_block(batch, num_heads, block_q, block_kv, "xla")
    b = jnp.dtype(dtype).itemsize
    e = batch * t_local * num_heads * head_dim  # elements of one local [B, Tl, H, D] array
    s = batch * num_heads * t_local  # one f32 statistic per query row
    hb = batch * head_block  # (batch, head) rows of one pass
    g = batch * t_local * head_block * head_dim  # elements of one pass's [B, hb, Tl, D] array
    c = hb * block_q * block_kv  # one chunk score matrix
    qc = hb * block_q * head_dim
    kc = hb * block_kv * head_dim
    # XLA:CPU has no bf16/f16 matmul: it converts whole q/k/v shards to f32 once (conservative on
    # accelerators, where operands stay in their dtype).
    upcast = {"f32 copies of q,k,v (XLA:CPU upcast)": 3 * 4 * e} if b < 4 else {}
    if not backward:
        return upcast | {
            "inputs q,k,v": 3 * e * b,
            "output": e * b,
            "f32 lse": 4 * s,
            "head-major q of a pass": g * b,
            "K/V travelling + arriving": 4 * g * b,
            "f32 output accumulator of a pass": 4 * g,
            "f32 chunk scores, probs": 2 * 4 * c,
            "f32 chunk q/acc/k/v": 4 * (2 * qc + 2 * kc),
        }
    return upcast | {
        "inputs q,k,v": 3 * e * b,
        "residual output": e * b,
        "f32 residual lse, rowsum(dO*O)": 2 * 4 * s,
        "incoming gradient dO": e * b,
        "K/V travelling + arriving": 4 * g * b,
        "f32 dQ accumulator of a pass": 4 * g,
        "head-major q, dO of a pass": 2 * g * b,
        "f32 dK/dV travelling + arriving": 4 * 4 * g,
        "f32 dK/dV partial of the hop": 2 * 4 * g,
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


def useful_pairs(seq_len: int, *, causal: bool = True, window: int | None = None) -> int:
    """Visible (query, key) token pairs of the whole sequence: the work no layout can avoid."""
    if not causal:
        return seq_len * seq_len
    p = np.arange(seq_len, dtype=np.int64)
    seen = p + 1 if window is None else np.minimum(p + 1, window)
    return int(seen.sum())


def layout_work(
    seq_len: int,
    n_devices: int,
    block_q: int,
    block_kv: int,
    *,
    causal: bool = True,
    window: int | None = None,
    layout: str = "contiguous",
    stripe: int = 1,
) -> tuple[float, float]:
    """(total, critical path) work of a layout in full block pairs (Tl x Tl query-key pairs).

    Total sums the non-empty chunk pairs (`chunk_work`, the kernel's skipping rule) over devices
    and the hops that run; the critical path is the busiest device's sum. Both are absolute, so
    layouts compare directly: the ideal critical path is `useful_pairs / n / Tl^2`.
    """
    tl = seq_len // n_devices
    hops = num_hops(layout, stripe, window, tl, n_devices)
    work = chunk_work(
        seq_len,
        n_devices,
        block_q,
        block_kv,
        causal=causal,
        window=window,
        layout=layout,
        stripe=stripe,
        hops=hops,
    ).sum(1)
    unit = block_q * block_kv / tl**2
    return float(work.sum() * unit), float(work.max() * unit)


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
    """Critical-path work ÷ ideal (useful work / n); 1.0 is perfect balance with no waste.

    The ideal is the same for every layout, so a layout that balances by computing extra masked
    pairs (striped) pays for them here.
    """
    _, critical = layout_work(
        seq_len,
        n_devices,
        block_q,
        block_kv,
        causal=causal,
        window=window,
        layout=layout,
        stripe=stripe,
    )
    tl = seq_len // n_devices
    ideal = useful_pairs(seq_len, causal=causal, window=window) / n_devices / tl**2
    return float(critical / ideal)


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
    if window is not None and (window < 1 or not causal):
        raise ValueError(f"plan: window must be >= 1 and needs causal=True, got {window!r}")
    check_layout(layout, stripe, length=seq_len, n=n_devices)
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

    hops = num_hops(layout, stripe, window, t_local, n_devices)
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
    ideal = useful_pairs(seq_len, causal=causal, window=window) / n_devices / (bq * bk)
    imbalance = float(critical / ideal)

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
        work_critical=critical * bq * bk / t_local**2,
        work_total=total * bq * bk / t_local**2,
        predicted_seconds=seconds,
        max_seq_len=_max_seq_len(
            mem_budget_bytes, n_devices, bq, bk, layout, stripe, lambda tl: mem(bq, bk, tl)
        ),
        layout=layout,
        stripe=stripe,
        causal=causal,
        window=window,
    )


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


def _max_seq_len(budget, n, bq, bk, layout, stripe, mem_of_tl) -> int:
    """Largest T = n * Tl (Tl a multiple of bq, bk, stripe) with mem_of_tl(Tl) <= budget."""
    unit = math.lcm(bq, bk, layout_unit(n, layout, stripe) // n)
    # Memory is affine in Tl for fixed blocks: solve from two points, then step down to be safe.
    m1, m2 = mem_of_tl(unit), mem_of_tl(2 * unit)
    if m1 > budget:
        return 0
    slope = (m2 - m1) / unit
    tl = unit * max(1, int((budget - m1) // (slope * unit)) + 1) if slope > 0 else unit
    while tl > unit and mem_of_tl(tl) > budget:
        tl -= unit
    return int(n * tl)
