r"""Ring attention benchmark: ours vs dense vs the authors' `ringattention`, one table, one run.

  python -m ringrl.experiments.bench_ring            # full run (~20-30 min on 2 CPU cores)
  python -m ringrl.experiments.bench_ring --quick    # smoke run with small T (~2 min)

8 virtual CPU devices (XLA_FLAGS set before jax is imported), causal, B=1 H=4 D=64 float32.
For T in {4096, 16384} (forward + backward) and 65536 (forward only; skipped with --no-long) every
row reports the median forward and forward+backward wall time, the useful causal GFLOP/s of
forward+backward and its share of the machine's matmul peak, the per-device temporary memory of
the compiled program, and the max abs error against a reference (`ring.reference.dense_attention`
where it fits, else a query-chunked exact forward reference).

Timing: every executable is compiled first; then `--repeats` rounds run every row once each, in
turn (interleaved), and the medians are reported, so a load change on a shared machine hits all
rows alike and the ratios measured in one run stay fair. The load average is printed with them.

Useful FLOPs (FlashAttention-2 convention): 2 matmuls forward and 5 backward (QK^T recomputed,
dV, dP, dQ, dK), each 2 B H D FLOPs per visible (query, key) pair; masked or skipped pairs do not
count. The peak is measured here, once per timed round (interleaved with the rows, so a machine
whose speed drifts is compared with itself): the best of a [2048, 2048] f32 matmul on one device
and one per device on all 8 at once; a row's % of peak uses the median of its T's round peaks.

Rows: dense (`jax.nn.dot_product_attention` on one device; run only when it fits in
--dense-limit-gb), ours contiguous / striped / zigzag at `--block`, ours zigzag again at each of
`--extra-blocks` (default 128: the default `head_block` then takes all 4 heads per ring pass, which
costs fewer per-hop overheads at short shards), ours sliding window (w=1024, zigzag), and
the authors' package (`pip install -e '.[bench]'`) at chunk 256 and 512. A compile-only row gives
per-device memory at T = 1,048,576. The last lines give the planner's work model per layout
(total and critical path in full block pairs) and ours/authors time ratios (vs the authors'
fastest chunk in the same run).

The 8 virtual devices share the machine's cores, so wall time measures total work, not the
parallel critical path: balance is read from the work model.
"""

import os

from ringrl.experiments import xla_flags

_FLAG = "--xla_force_host_platform_device_count=8"
xla_flags.force_host_devices(8)  # with generous collective timeouts (busy shared cores)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from ringrl.ring.attention import ring_attention  # noqa: E402
from ringrl.ring.layout import from_layout, to_layout  # noqa: E402
from ringrl.ring.mesh import SEQ, make_mesh  # noqa: E402
from ringrl.ring.plan import layout_work, useful_pairs  # noqa: E402
from ringrl.ring.reference import dense_attention  # noqa: E402

B, H, D = 1, 4, 64
N_DEV = 8
WINDOW = 1024
MB = 1e6


def log(msg: str) -> None:
    """Progress line on stderr (the table goes to stdout)."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def load_authors() -> Callable | None:
    """The authors' jax ring attention, or None when the package is not installed."""
    try:
        import jax._src.xla_bridge as xb

        jax.lib.xla_bridge = xb  # removed from current jax; the package still reads it
        from ringattention import ringattention_jax
    except ImportError as e:
        log(f"authors' ringattention not importable ({e}); its rows are skipped")
        return None
    return ringattention_jax


def authors_fn(ring_fn: Callable, chunk: int) -> Callable:
    """Per-shard causal attention with the authors' package at query/key chunk `chunk`."""
    kwargs = dict(
        causal_block_size=1,  # token-level causal mask
        query_chunk_size=chunk,
        key_chunk_size=chunk,
        deterministic=True,
        dropout_rng=None,
        attn_pdrop=0.0,
        dtype=jnp.float32,
        policy=jax.checkpoint_policies.nothing_saveable,
        precision=None,
        prevent_cse=True,
    )
    return lambda q, k, v: ring_fn(q, k, v, None, None, None, SEQ, True, kwargs)


def chunked_reference(q, k, v, window, rows, chunk=512):
    """Exact causal (windowed) attention for the query positions `rows` (runs of `chunk`),
    computed chunk by chunk so no [T, T] matrix exists."""
    t = q.shape[1]
    scale = q.shape[-1] ** -0.5

    @jax.jit
    def one(q, k, v, start):
        qs = jax.lax.dynamic_slice_in_dim(q, start, chunk, 1)
        s = jnp.einsum("bqhd,bkhd->bhqk", qs, k) * scale
        qpos = start + jnp.arange(chunk)
        kpos = jnp.arange(t)
        mask = kpos[None, :] <= qpos[:, None]
        if window is not None:
            mask &= kpos[None, :] > qpos[:, None] - window
        p = jax.nn.softmax(jnp.where(mask, s, -jnp.inf), axis=-1)
        return jnp.einsum("bhqk,bkhd->bqhd", p, v)

    qj, kj, vj = (jnp.asarray(a) for a in (q, k, v))
    starts = rows.reshape(-1, chunk)[:, 0]
    return np.concatenate([np.asarray(one(qj, kj, vj, int(s))) for s in starts], axis=1)


def seconds(fn, args) -> tuple[float, object]:
    """Wall time and result of one call of a compiled `fn(*args)`."""
    start = time.perf_counter()
    result = jax.block_until_ready(fn(*args))
    return time.perf_counter() - start, result


def causal_flops(t: int, train: bool, window: int | None = None) -> float:
    """Useful FLOPs of causal attention on [B, t, H, D]: 2 (+5 bwd) matmuls per visible pair."""
    matmuls = 2 + (5 if train else 0)
    return matmuls * 2 * B * H * D * useful_pairs(t, window=window)


def matmul_peak(mesh, size: int = 2048, repeats: int = 5) -> float:
    """Best f32 matmul FLOP/s of this machine: one device alone, or all mesh devices at once."""
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size)).astype(np.float32)
    one = jax.jit(lambda x: x @ x)
    xs = jax.device_put(a, mesh.devices.flat[0])
    n = mesh.devices.size
    many = jax.jit(
        jax.shard_map(lambda x: x[0] @ x[0], mesh=mesh, in_specs=P(SEQ), out_specs=P(SEQ)),
    )
    xm = jax.device_put(np.stack([a] * n), NamedSharding(mesh, P(SEQ)))
    best = 0.0
    for fn, x, count in ((one, xs, 1), (many, xm, n)):
        jax.block_until_ready(fn(x))
        t = min(seconds(fn, (x,))[0] for _ in range(repeats))
        best = max(best, count * 2 * size**3 / t)
    return best


def work_lines(ts, n: int, block: int) -> list[str]:
    """The planner's work model per layout: total and critical path in full block pairs."""
    lines = []
    for t in ts:
        b = min(block, t // n // 2)
        ideal = useful_pairs(t) / n / (t // n) ** 2
        parts = []
        for layout in ("contiguous", "striped", "zigzag"):
            total, critical = layout_work(t, n, b, b, layout=layout)
            parts.append(f"{layout} {total:.2f} / {critical:.2f}")
        lines.append(
            f"work model at T={t}, chunk {b} (ring.plan.layout_work, total / critical path in "
            f"{t // n}x{t // n} block pairs; ideal critical {ideal:.2f}): " + ", ".join(parts)
        )
    return lines


def compile_pair(attn, x_spec, sharding, cot):
    """Compiled forward and forward+backward (grad of sum(out * cot)) of `attn`."""
    fwd = jax.jit(attn, in_shardings=(sharding,) * 3, out_shardings=sharding)

    def loss(q, k, v, ct):
        return jnp.sum(attn(q, k, v).astype(jnp.float32) * ct)

    bwd = jax.jit(
        jax.grad(loss, argnums=(0, 1, 2)),
        in_shardings=(sharding,) * 4,
        out_shardings=(sharding,) * 3,
    )
    c_fwd = fwd.lower(*(x_spec,) * 3).compile()
    c_bwd = bwd.lower(*(x_spec,) * 4).compile() if cot else None
    return c_fwd, c_bwd


def temp_mb(compiled) -> float:
    return compiled.memory_analysis().temp_size_in_bytes / MB


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small T smoke run")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timed rounds")
    parser.add_argument("--block", type=int, default=256, help="our block_q = block_kv")
    parser.add_argument(
        "--extra-blocks",
        default="128",
        help="comma-separated further blocks for an extra 'ours zigzag' row each ('' for none)",
    )
    parser.add_argument(
        "--dense-limit-gb", type=float, default=4.0, help="run dense only if its temp fits"
    )
    parser.add_argument("--no-authors", action="store_true", help="skip the authors' package")
    parser.add_argument("--no-long", action="store_true", help="skip T=65536 and the 1M compile")
    args = parser.parse_args(argv)

    if args.quick:
        train_ts, fwd_only_ts, huge_t = (1024, 2048), (4096,), 65536
    else:
        train_ts, fwd_only_ts, huge_t = (4096, 16384), (65536,), 1 << 20
    if args.no_long:
        fwd_only_ts, huge_t = (), None
    devices = jax.devices("cpu")
    if len(devices) < N_DEV:
        raise SystemExit(f"need {N_DEV} CPU devices, have {len(devices)}; set XLA_FLAGS={_FLAG}")
    mesh = make_mesh([(SEQ, N_DEV)], devices[:N_DEV])
    spec = P(None, SEQ)
    ring_sh = NamedSharding(mesh, spec)
    one_sh = jax.sharding.SingleDeviceSharding(devices[0])
    authors = None if args.no_authors else load_authors()
    log(
        f"jax {jax.__version__}, {N_DEV} virtual CPU devices on {os.cpu_count()} cores, "
        f"repeats={args.repeats}"
    )
    log(f"matmul peak {matmul_peak(mesh) / 1e9:.1f} GFLOP/s f32 (before the rounds)")
    peaks = []  # one per timed round

    def ours(layout, window=None, block=args.block):
        def f(q, k, v):
            return ring_attention(
                q, k, v, causal=True, window=window, layout=layout, block_q=block, block_kv=block
            )

        return jax.shard_map(f, mesh=mesh, in_specs=(spec,) * 3, out_specs=spec)

    def theirs(chunk):
        return jax.shard_map(
            authors_fn(authors, chunk),
            mesh=mesh,
            in_specs=(spec,) * 3,
            out_specs=spec,
            check_vma=False,
        )

    rows = []  # dicts, printed at the end
    loads = []
    for t in (*train_ts, *fwd_only_ts):
        train = t in train_ts
        rng = np.random.default_rng(t)
        q, k, v, ct = (rng.standard_normal((B, t, H, D)).astype(np.float32) for _ in range(4))
        x_spec = jax.ShapeDtypeStruct((B, t, H, D), jnp.float32)
        dense_fits = 5 * B * H * t * t * 4 / 1e9 <= args.dense_limit_gb
        ref = {}
        if dense_fits:
            log(f"T={t}: dense reference")
            qj, kj, vj, cj = (jnp.asarray(a) for a in (q, k, v, ct))
            for w in (None, WINDOW):
                out, vjp = jax.vjp(
                    lambda a, b, c, w=w: dense_attention(a, b, c, window=w), qj, kj, vj
                )
                ref[w] = (np.asarray(out), [np.asarray(g) for g in vjp(cj)] if train else None)
            check_rows = np.arange(t)
        else:
            check_rows = np.arange(t) if t <= 16384 else np.r_[0:512, t - 2048 : t]
            for w in (None, WINDOW):
                log(f"T={t}: chunked reference on {check_rows.size} query rows (window={w})")
                ref[w] = (chunked_reference(q, k, v, w, check_rows), None)

        tl = t // N_DEV
        block = min(args.block, tl // 2)
        author_chunks = sorted(c for c in {256, 512} if tl % c == 0) if authors else []
        cases = [("dense (1 device)", "dense", None, "-", "contiguous")]
        cases += [
            (f"ours {lay}", ours(lay, block=block), None, block, lay)
            for lay in ("contiguous", "striped", "zigzag")
        ]
        window_row = f"ours zigzag window={WINDOW}"
        for extra in (int(b) for b in args.extra_blocks.split(",") if b.strip()):
            if extra != block and (tl // 2) % extra == 0:
                name = f"ours zigzag (chunk {extra})"
                cases += [(name, ours("zigzag", block=extra), None, extra, "zigzag")]
        cases += [(window_row, ours("zigzag", WINDOW, block), WINDOW, block, "zigzag")]
        cases += [(f"authors chunk={c}", theirs(c), None, c, "contiguous") for c in author_chunks]

        runnable = []  # (row, compiled fwd, compiled fwd+bwd, inputs, layout, window)
        for name, attn, window, chunk, layout in cases:
            row = dict(t=t, name=name, chunk=chunk, train=train, window=window, fwd=[], bwd=[])
            rows.append(row)
            log(f"T={t} {name}: compile")
            if attn == "dense":
                dense = lambda a, b, c: jax.nn.dot_product_attention(a, b, c, is_causal=True)
                c_fwd, c_bwd = compile_pair(dense, x_spec, one_sh, train)
                sh = one_sh
            else:
                c_fwd, c_bwd = compile_pair(attn, x_spec, ring_sh, train)
                sh = ring_sh
            row["fwd_mb"] = temp_mb(c_fwd)
            row["bwd_mb"] = temp_mb(c_bwd) if train else None
            if attn == "dense" and not dense_fits:
                continue
            inputs = [
                jax.device_put(to_layout(jnp.asarray(a), N_DEV, layout) if sh is ring_sh else a, sh)
                for a in (q, k, v, ct)
            ]
            runnable.append((row, c_fwd, c_bwd, inputs, layout if sh is ring_sh else None))

        # Warm-up and error check, then interleaved timed rounds.
        for row, c_fwd, c_bwd, inputs, layout in runnable:
            out = np.asarray(c_fwd(*inputs[:3]))
            if layout is not None:
                out = np.asarray(from_layout(jnp.asarray(out), N_DEV, layout))
            ref_out, ref_grads = ref[row["window"]]
            row["err"] = float(np.max(np.abs(out[:, check_rows] - ref_out)))
            if train:
                grads = c_bwd(*inputs)
                if ref_grads is not None:
                    if layout is not None:
                        grads = [from_layout(g, N_DEV, layout) for g in grads]
                    row["gerr"] = max(
                        float(np.max(np.abs(np.asarray(g) - r))) for g, r in zip(grads, ref_grads)
                    )
        rounds = args.repeats if t < 65536 else 1
        round_peaks = []
        for r in range(rounds):
            loads.append(os.getloadavg()[0])
            round_peaks.append(matmul_peak(mesh, repeats=2))
            for row, c_fwd, c_bwd, inputs, _ in runnable:
                row["fwd"].append(seconds(c_fwd, inputs[:3])[0])
                if train:
                    row["bwd"].append(seconds(c_bwd, inputs)[0])
            log(
                f"T={t}: round {r + 1}/{rounds} done (load {loads[-1]:.1f}, matmul peak "
                f"{round_peaks[-1] / 1e9:.0f} GFLOP/s)"
            )
        peaks += round_peaks
        peak = statistics.median(round_peaks)
        for row, *_ in runnable:
            row["fwd_s"] = statistics.median(row["fwd"])
            row["runs"] = len(row["fwd"])
            if train:
                row["bwd_s"] = statistics.median(row["bwd"])
                flops = causal_flops(t, True, row["window"])
                row["gflops"] = flops / row["bwd_s"] / 1e9
                row["peak_pct"] = 100 * flops / row["bwd_s"] / peak
        del runnable

    if huge_t:  # Compile-only: per-device memory of forward+backward at a very long sequence.
        x_spec = jax.ShapeDtypeStruct((B, huge_t, H, D), jnp.float32)
        huge = [(f"ours {lay}", ours(lay), args.block) for lay in ("contiguous", "zigzag")]
        huge += [(f"authors chunk={c}", theirs(c), c) for c in (256, 512) if authors]
        for name, attn, chunk in huge:
            log(f"T={huge_t} {name}: compile only")
            c_fwd, c_bwd = compile_pair(attn, x_spec, ring_sh, True)
            rows.append(
                dict(
                    t=huge_t,
                    name=name + " (compile only)",
                    chunk=chunk,
                    train=True,
                    fwd_mb=temp_mb(c_fwd),
                    bwd_mb=temp_mb(c_bwd),
                )
            )

    print_table(rows, train_ts, args, peaks, loads)


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def print_table(rows, train_ts, args, peaks: list[float], loads: list[float]) -> None:
    print()
    print(
        f"Ring attention, {N_DEV} virtual CPU devices (share {os.cpu_count()} cores), causal, "
        f"B={B} H={H} D={D} float32; median of `runs` interleaved rounds; temp = per-device "
        f"temporary memory from compile().memory_analysis(); matmul peak measured each round "
        f"{min(peaks, default=0) / 1e9:.0f}-{max(peaks, default=0) / 1e9:.0f} GFLOP/s f32 (median "
        f"{statistics.median(peaks or [0]) / 1e9:.0f}); 1-min load average during the rounds "
        f"{min(loads, default=0):.1f}-{max(loads, default=0):.1f}"
    )
    print()
    print(
        "| T | implementation | chunk | fwd s | fwd+bwd s | useful GFLOP/s | % of peak "
        "| fwd temp MB/dev | fwd+bwd temp MB/dev | max err out | max err grads | runs |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['t']} | {r['name']} | {r['chunk']} | {fmt(r.get('fwd_s'), '.3f')} | "
            f"{fmt(r.get('bwd_s'), '.3f')} | {fmt(r.get('gflops'), '.0f')} | "
            f"{fmt(r.get('peak_pct'), '.0f')} | {fmt(r.get('fwd_mb'), '.1f')} | "
            f"{fmt(r.get('bwd_mb'), '.1f')} | {fmt(r.get('err'), '.1e')} | "
            f"{fmt(r.get('gerr'), '.1e')} | {r.get('runs', 0)} |"
        )
    print()
    for line in work_lines(train_ts, N_DEV, args.block):
        print(line)
    print(ratio_line(rows))


def ratio_line(rows) -> str:
    """Ours/authors time ratios per T (vs the authors' fastest chunk in the same run)."""
    parts = []
    for t in sorted({r["t"] for r in rows}):
        at_t = [r for r in rows if r["t"] == t]
        key = "bwd_s" if at_t[0]["train"] else "fwd_s"
        authors = [r for r in at_t if r["name"].startswith("authors") and r.get(key)]
        if not authors:
            continue
        best = min(authors, key=lambda r: r[key])
        seg = [
            f"{o['name'][5:]} {best[key] / o[key]:.2f}x"
            for o in at_t
            if o["name"].startswith("ours") and "window" not in o["name"] and o.get(key)
        ]
        what = "fwd+bwd" if key == "bwd_s" else "fwd"
        parts.append(f"T={t} {what} (authors' best: chunk {best['chunk']}): " + ", ".join(seg))
    if not parts:
        return "speed-up over the authors: n/a (not installed: pip install -e '.[bench]')"
    return "speed-up over the authors (their time / ours, same run): " + "; ".join(parts)


if __name__ == "__main__":
    main()
