r"""Ring attention benchmark: ours vs dense vs the authors' `ringattention`, one table, one run.

  python -m ringrl.experiments.bench_ring            # full run (~15-25 min on 2 CPU cores)
  python -m ringrl.experiments.bench_ring --quick    # smoke run with small T (~1-2 min)

8 virtual CPU devices (XLA_FLAGS set before jax is imported), causal, B=1 H=4 D=64 float32.
For T in {4096, 16384} (forward + backward) and 65536 (forward only) every row reports the median
forward and forward+backward wall time, the per-device temporary memory of the compiled program
(`compile().memory_analysis().temp_size_in_bytes`), and the max abs error against a reference:
`ring.reference.dense_attention` where it fits (outputs and dq/dk/dv), otherwise a query-chunked
exact forward reference (outputs only; at T > 16384 on the first 512 and last 2048 query rows).

Rows: dense (`jax.nn.dot_product_attention` on one device; compiled for its memory, run only when
it fits in --dense-limit-gb), ours contiguous, ours striped, ours sliding window (w=1024), and the
authors' package (`pip install ringattention einops --no-deps`, the pyproject `bench` extra) at our
chunk size and at 256 and 512. A compile-only row gives per-device memory of forward+backward at
T = 1,048,576. The last line gives ours/authors ratios (time vs the authors' fastest chunk size in
the same run, memory vs the authors at the same chunk size).

The 8 virtual devices share the machine's cores, so wall time measures total work, not the
parallel critical path: load balance is reported from ring.plan's exact chunk-work model.
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
from ringrl.ring.plan import imbalance_factor  # noqa: E402
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


def timed(fn, args, repeats: int, warmup: int):
    """(median wall time over `repeats` runs, runs, last result) of `fn(*args)` (compiled)."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        result = jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), len(times), result


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
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per cell (median)")
    parser.add_argument(
        "--repeats-long", type=int, default=1, help="timed runs per cell at T >= 65536"
    )
    parser.add_argument("--block", type=int, default=256, help="our block_q = block_kv")
    parser.add_argument(
        "--dense-limit-gb", type=float, default=4.0, help="run dense only if its temp fits"
    )
    parser.add_argument("--no-authors", action="store_true", help="skip the authors' package")
    args = parser.parse_args(argv)

    if args.quick:
        train_ts, fwd_only_ts, huge_t = (1024, 2048), (4096,), 65536
    else:
        train_ts, fwd_only_ts, huge_t = (4096, 16384), (65536,), 1 << 20
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

    for t in (*train_ts, *fwd_only_ts):
        train = t in train_ts
        rng = np.random.default_rng(t)
        q, k, v, ct = (rng.standard_normal((B, t, H, D)).astype(np.float32) for _ in range(4))
        x_spec = jax.ShapeDtypeStruct((B, t, H, D), jnp.float32)
        dense_fits = 5 * B * H * t * t * 4 / 1e9 <= args.dense_limit_gb
        # References: the dense oracle where it fits, else chunked exact forward on some rows.
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
        block = min(args.block, tl)
        author_chunks = sorted(c for c in {block, 256, 512} if tl % c == 0) if authors else []
        cases = [("dense (1 device)", "dense", None, "-")]
        cases += [
            ("ours contiguous", ours("contiguous", block=block), None, block),
            ("ours striped", ours("striped", block=block), None, block),
            (f"ours window={WINDOW}", ours("contiguous", WINDOW, block=block), WINDOW, block),
        ]
        cases += [(f"authors chunk={c}", theirs(c), None, c) for c in author_chunks]

        for name, attn, window, chunk in cases:
            row = dict(t=t, name=name, chunk=chunk, train=train)
            rows.append(row)
            layout = "striped" if "striped" in name else "contiguous"
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
                log(f"T={t} {name}: compiled only (temp {row['fwd_mb']:.0f} MB), not run")
                continue
            inputs = [
                jax.device_put(to_layout(jnp.asarray(a), N_DEV, layout) if sh is ring_sh else a, sh)
                for a in (q, k, v, ct)
            ]
            # Executables are compiled beforehand; one warm-up run only where runs are short.
            warmup = 1 if t <= 4096 else 0
            reps = args.repeats if t < 65536 else args.repeats_long
            log(f"T={t} {name}: forward x{reps}")
            row["fwd_s"], row["runs"], out = timed(c_fwd, inputs[:3], reps, warmup)
            out = np.asarray(out)
            if sh is ring_sh:
                out = np.asarray(from_layout(jnp.asarray(out), N_DEV, layout))
            ref_out, ref_grads = ref[window]
            row["err"] = float(np.max(np.abs(out[:, check_rows] - ref_out)))
            if train:
                log(f"T={t} {name}: forward+backward x{reps}")
                row["bwd_s"], _, grads = timed(c_bwd, inputs, reps, warmup)
                if ref_grads is not None:
                    if sh is ring_sh:
                        grads = [from_layout(g, N_DEV, layout) for g in grads]
                    row["gerr"] = max(
                        float(np.max(np.abs(np.asarray(g) - r))) for g, r in zip(grads, ref_grads)
                    )
            log(
                f"T={t} {name}: fwd {row['fwd_s']:.3f}s"
                + (f", fwd+bwd {row['bwd_s']:.3f}s" if train else "")
                + f", err {row['err']:.1e}"
            )
            del inputs

    # Compile-only: per-device memory of forward+backward at a very long sequence.
    x_spec = jax.ShapeDtypeStruct((B, huge_t, H, D), jnp.float32)
    huge = [("ours contiguous", ours("contiguous"), args.block)]
    huge += [("ours striped", ours("striped"), args.block)]
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

    print_table(rows, train_ts, args)


def fmt(x, spec):
    return "—" if x is None else format(x, spec)


def print_table(rows, train_ts, args) -> None:
    print()
    print(
        f"Ring attention, {N_DEV} virtual CPU devices (share {os.cpu_count()} cores), causal, "
        f"B={B} H={H} D={D} float32; median of `runs` runs; temp = per-device "
        "temporary memory from compile().memory_analysis()"
    )
    print()
    print(
        "| T | implementation | chunk | fwd s | fwd+bwd s | fwd temp MB/dev | fwd+bwd temp MB/dev "
        "| max err out | max err grads | runs |"
    )
    print("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['t']} | {r['name']} | {r['chunk']} | {fmt(r.get('fwd_s'), '.3f')} | "
            f"{fmt(r.get('bwd_s'), '.3f')} | {fmt(r.get('fwd_mb'), '.1f')} | "
            f"{fmt(r.get('bwd_mb'), '.1f')} | {fmt(r.get('err'), '.1e')} | "
            f"{fmt(r.get('gerr'), '.1e')} | {r.get('runs', 0)} |"
        )
    print()
    for t in train_ts:
        b = min(args.block, t // N_DEV)
        c = imbalance_factor(t, N_DEV, b, b)
        s = imbalance_factor(t, N_DEV, b, b, layout="striped")
        print(
            f"modelled causal imbalance at T={t}, chunk {b} (ring.plan, critical-path "
            f"chunk work / (total/n)): contiguous {c:.3f}, striped {s:.3f}"
        )
    parts = []
    for t in sorted({r["t"] for r in rows}):
        at_t = [r for r in rows if r["t"] == t]
        authors = [r for r in at_t if r["name"].startswith("authors")]
        if not authors:
            continue
        train = authors[0]["train"]
        tkey, mkey = ("bwd_s", "bwd_mb") if train else ("fwd_s", "fwd_mb")
        timed_authors = [r for r in authors if r.get(tkey)]
        seg = []
        for label in ("contiguous", "striped"):
            o = next((r for r in at_t if r["name"].startswith(f"ours {label}")), None)
            if o is None:
                continue
            if timed_authors and o.get(tkey):
                best = min(timed_authors, key=lambda r: r[tkey])
                seg.append(f"{label} time {o[tkey] / best[tkey]:.2f}x (vs chunk {best['chunk']})")
            same = next((r for r in authors if r["chunk"] == o["chunk"]), None)
            if same is None:  # no authors' row at our chunk: compare with its leanest one
                same = min(authors, key=lambda r: r.get(mkey) or float("inf"))
            if o.get(mkey) is not None and same.get(mkey):
                seg.append(f"{label} memory {o[mkey] / same[mkey]:.2f}x (vs chunk {same['chunk']})")
        parts.append(f"T={t} {'fwd+bwd' if train else 'fwd'}: " + ", ".join(seg))
    print(
        "ratios ours/authors (time vs the authors' fastest chunk, memory vs the same chunk): "
        + "; ".join(parts)
        if parts
        else "ratios ours/authors: n/a (authors' package not installed: pip install ringrl[bench])"
    )


if __name__ == "__main__":
    main()
