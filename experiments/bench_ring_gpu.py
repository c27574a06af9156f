r"""Prepared accelerator benchmark: ring attention fwd+bwd on one GPU, tokens/s and MFU, vs cuDNN.

  python -m ringrl.experiments.bench_ring_gpu                       # T = 4k .. 1M on the GPU
  python -m ringrl.experiments.bench_ring_gpu --tokens 1k --impls pallas_interpret --no-cudnn
                                                                    # CPU smoke run of the script

One device (a ring of one: `ring.attention.blockwise_attention`, the kernel every hop runs),
causal, B=1 H=8 D=128, bf16 operands. For each T and each `impl` it reports the median
forward+backward time, tokens/s, useful causal TFLOP/s (FlashAttention-2 convention: 2 + 5
matmuls per visible pair) and the model FLOP utilisation against a bf16 matmul peak measured here,
next to `jax.nn.dot_product_attention(implementation="cudnn")` where it fits in memory.
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from ringrl.ring.attention import blockwise_attention

B, H, D = 1, 8, 128


def parse_tokens(text: str) -> list[int]:
    """'4k,1024k' -> [4096, 1048576]."""
    return [int(x[:-1]) * 1024 if x.endswith("k") else int(x) for x in text.split(",")]


def best_seconds(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))  # compile + warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def matmul_peak(dtype, size: int = 8192) -> float:
    x = jnp.ones((size, size), dtype)
    return 2 * size**3 / best_seconds(jax.jit(lambda a: a @ a), (x,), 5)


def train_fn(attn):
    def loss(q, k, v):
        return jnp.sum(attn(q, k, v).astype(jnp.float32))

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", default="4k,16k,64k,256k,1024k", help="sequence lengths")
    parser.add_argument("--impls", default="pallas,xla", help="ring_attention impl values")
    parser.add_argument("--block", type=int, default=512, help="block_q = block_kv")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-cudnn", action="store_true", help="skip the cuDNN baseline")
    parser.add_argument("--dtype", default="bfloat16")
    args = parser.parse_args(argv)
    dtype = jnp.dtype(args.dtype)
    peak = matmul_peak(dtype)
    print(
        f"device {jax.devices()[0].device_kind}; {args.dtype} matmul peak {peak / 1e12:.0f} TFLOP/s"
    )
    print("| T | implementation | fwd+bwd s | tokens/s | useful TFLOP/s | MFU % |")
    print("|---:|---|---:|---:|---:|---:|")
    for t in parse_tokens(args.tokens):
        keys = jax.random.split(jax.random.key(t), 3)
        q, k, v = (jax.random.normal(key, (B, t, H, D), dtype) for key in keys)
        flops = 7 * 2 * B * H * D * t * (t + 1) / 2
        block = min(args.block, t)
        cases = {
            f"ring kernel impl={impl}": lambda q, k, v, impl=impl, block=block: blockwise_attention(
                q, k, v, causal=True, block_q=block, block_kv=block, impl=impl
            )
            for impl in args.impls.split(",")
        }
        if not args.no_cudnn:
            cases["cuDNN dot_product_attention"] = lambda q, k, v: jax.nn.dot_product_attention(
                q, k, v, is_causal=True, implementation="cudnn"
            )
        for name, attn in cases.items():
            try:
                s = best_seconds(train_fn(attn), (q, k, v), args.repeats)
            except Exception as e:  # out of memory or unsupported: report and go on
                print(f"| {t} | {name} | failed: {type(e).__name__} | | | |")
                continue
            print(
                f"| {t} | {name} | {s:.4f} | {t / s:,.0f} | {flops / s / 1e12:.1f} | "
                f"{100 * flops / s / peak:.1f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
