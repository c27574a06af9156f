r"""Agent benchmark on 8 (virtual) devices: sharded training and cached acting.

  python -m ringrl.experiments.bench_agent            # full: train 4k/16k/64k tokens, act 1k/8k/32k
  python -m ringrl.experiments.bench_agent --quick    # smoke run, small contexts
  python -m ringrl.experiments.bench_agent --d4rl     # (c) only: the D4RL configs' train steps

(a) Train-step tokens/s of the AT agent (3 layers, width 128) with ring attention over seq=8
    (striped layout) vs a plain single-device model with dense attention, and the per-device
    compiled memory of both (XLA memory_analysis: arguments + outputs + temporaries). The dense
    model only runs where its compiled memory fits --dense_budget_gib; otherwise only its memory
    is reported. Contexts above --time_max_tokens (default 64k) are compiled for memory only; one
    64k ring step takes minutes on a 2-core host (it is timed once: calls over 30 s are not
    repeated).
(b) Per-step acting latency with the sharded KV cache (agents.act.Actor) vs recomputing the full
    context with the backbone every step, both on the seq=8 mesh. The cache is filled to
    capacity minus a few steps with random keys/values first (the per-step work does not depend on
    the contents, only on the capacity, so this equals a context that was really acted out).

(c) With --d4rl: the train step of configs/dt_d4rl.py (K = 20, 3 tokens per step, batch 64, data
    over every device) and configs/at_d4rl.py (n whole 1000-step trajectories, 1 token per step,
    the ring over every device) on their own meshes, fed by their real samplers from synthetic
    MuJoCo-shaped trajectories: tokens/s, and the share of step time in attention and in the FFN,
    measured by timing the same step compiled with attention replaced by the identity (the values
    pass through; the ring's sends go too) and with the FFN replaced by the identity. The rest
    (embeddings, projections, norms, head, loss, optimizer) is the remainder. Host input is the
    sampler's batch plus the transfer to the mesh, timed alone: the loop dispatches the step
    asynchronously, so host input overlaps the previous step unless it is longer.
    --d4rl_n, --d4rl_batch and --d4rl_horizon shrink AT for a small run. With --d4rl_suite:
    the cells of configs/d4rl_suite.py instead (DT, and AT at each n of --d4rl_ns with slots cut
    at the suite's cap), the contexts the continuous-control results were trained at.

Timings are medians; on a shared 2-core CPU host the 8 devices share the cores, so absolute
numbers are noisy and per-device parallel speedups are not real. Bars (issue 5): ring per-device
memory <= 1/4 of dense at 16k; cached acting at 32k >= 20x faster than recompute and <= 2x its own
latency at 1k.
"""

import os

from ringrl.experiments import xla_flags

xla_flags.force_host_devices(8)  # with generous collective timeouts (busy shared cores)
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import functools  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import ml_collections  # noqa: E402
import numpy as np  # noqa: E402

from ringrl.agents import act, at, backbone, dt, sharding  # noqa: E402
from ringrl.agents import batch as batch_schema  # noqa: E402
from ringrl.agents.step import init_state, make_train_step  # noqa: E402
from ringrl.envs.trajectories import Trajectories  # noqa: E402
from ringrl.ring.mesh import DATA, SEQ, make_mesh  # noqa: E402

HORIZON = 256  # steps per trajectory slot: 1024 tokens per trajectory
OBS_DIM, ACTIONS = 17, 6
GIB = 2**30


def model_for(tokens: int, attention: str, layout: str) -> backbone.Backbone:
    n = tokens // (4 * HORIZON)
    return at.make_model(
        action_dim=ACTIONS, discrete=False, num_trajectories=n, horizon=HORIZON,
        embed_dim=128, num_layers=3, num_heads=4, ffn_chunk=512, remat="nothing_saveable",
        attention=attention, layout=layout, tokens_per_step=4,  # the README table's layout
    )  # fmt: skip


def random_batch(steps: int, batch_size: int = 1, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    b, t = batch_size, steps
    out = batch_schema.zeros(b, t, OBS_DIM, action_dim=ACTIONS, discrete=False)
    out.update(
        observations=rng.normal(size=(b, t, OBS_DIM)).astype(np.float32),
        actions=rng.uniform(-1, 1, (b, t, ACTIONS)).astype(np.float32),
        rewards=rng.normal(size=(b, t)).astype(np.float32),
        target_returns=rng.normal(size=(b, t)).astype(np.float32),
        timesteps=np.tile(np.arange(t) % HORIZON, (b, 1)).astype(np.int32),
        traj_index=np.tile(np.arange(t) // HORIZON, (b, 1)).astype(np.int32),
        truncated=np.tile(np.arange(t) % HORIZON == HORIZON - 1, (b, 1)).astype(np.float32),
        mask=np.ones((b, t), bool),
    )
    batch_schema.link_previous(out)
    return out


def config(num_steps: int) -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.num_steps = num_steps
    c.optim = dict(lr=1e-4, warmup_steps=1, weight_decay=1e-4, grad_clip=1.0)
    return c


def timed(fn, reps: int, slow_s: float = 30.0) -> float:
    """Median seconds of `fn()` over `reps` calls; stops early once a call takes > slow_s."""
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
        if times[-1] > slow_s:
            break
    return statistics.median(times)


def compiled_bytes(compiled) -> int:
    m = compiled.memory_analysis()
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes)


def bench_train(
    tokens: int, attention: str, mesh, steps: int, budget: float, time_max_tokens: int
) -> dict:
    """Compiled per-device memory of one train step; its median time where it is run."""
    layout = "striped" if attention == "ring" else "contiguous"
    model = model_for(tokens, attention, layout)
    cfg = config(steps + 1)
    state = init_state(model, cfg, mesh, jax.random.key(0), obs_dim=OBS_DIM)
    step = make_train_step(model, cfg, mesh)
    batch = sharding.put_batch(random_batch(tokens // 4), mesh)
    compiled = step.lower(state, batch).compile()
    mem = compiled_bytes(compiled)
    row = dict(tokens=tokens, model=attention, mem_gib=mem / GIB, tok_s=None, step_s=None)
    if mem > budget * GIB or tokens > time_max_tokens:
        return row
    box = {"state": state}

    def one_step():  # AOT-compiled already, so the first call is no compile
        box["state"], metrics = compiled(box["state"], batch)
        return metrics

    row["step_s"] = timed(one_step, steps)
    row["tok_s"] = tokens / row["step_s"]
    return row


def filled_state(actor: act.Actor, state: act.ActorState, free_steps: int) -> act.ActorState:
    """The state of an actor whose context is full up to `free_steps` steps before capacity."""
    length = actor.capacity - actor.k * free_steps

    def fill(cache):
        key = jax.random.key(length)
        k = jax.random.normal(key, cache.k.shape, cache.k.dtype).astype(cache.k.dtype)
        v = jax.random.normal(jax.random.fold_in(key, 1), cache.v.shape, cache.v.dtype)
        pos = jnp.arange(cache.max_len)
        seg = jnp.broadcast_to((pos < length).astype(jnp.int32), cache.segment_ids.shape)
        return dataclasses.replace(
            cache, k=k, v=v, segment_ids=seg, lengths=jnp.full_like(cache.lengths, length)
        )

    shardings = jax.tree.map(lambda x: x.sharding, state.caches)
    caches = jax.jit(lambda cs: tuple(fill(c) for c in cs), out_shardings=shardings)(state.caches)
    steps_done = length // actor.k
    return state.replace(
        caches=caches,
        t=jnp.full_like(state.t, steps_done % HORIZON),
        attempt=jnp.full_like(state.attempt, steps_done // HORIZON),
        has_prev=jnp.ones_like(state.has_prev),
    )


def bench_act(contexts: tuple[int, ...], mesh, steps: int) -> list[dict]:
    """Cached acting steps at each context, timed in interleaved rounds (one step of every context
    per round, so machine noise hits them alike), against reading the KV cache once and against
    recomputing the whole context."""
    cases = []
    for tokens in contexts:
        model = model_for(max(tokens, 4 * HORIZON), "ring", "striped")
        params = backbone.init_params(model, jax.random.key(0), obs_dim=OBS_DIM)
        params = jax.device_put(params, sharding.replicated(mesh))
        actor = act.Actor(model, mesh, max_steps=tokens // 4)
        state = filled_state(actor, actor.reset(1), free_steps=steps + 2)
        cases.append(dict(tokens=tokens, model=model, params=params, actor=actor, state=state))
    # The floor: reading every layer's keys and values once, as stored (sharded over the ring).
    read = jax.jit(lambda cs: sum(jnp.sum(c.k) + jnp.sum(c.v) for c in cs))
    rng = np.random.default_rng(0)
    for i in range(steps + 1):
        for c in cases:
            obs = rng.normal(size=(1, OBS_DIM)).astype(np.float32)
            t0 = time.perf_counter()
            target = np.ones((1,), np.float32)
            action, c["state"] = c["actor"].act(c["params"], c["state"], obs, target)
            jax.block_until_ready(action)
            if i:  # the first call compiles
                c.setdefault("cached", []).append(time.perf_counter() - t0)
            state = c["actor"].observe(c["state"], np.zeros((1,), np.float32), np.zeros((1,), bool))
            c["state"] = state
            t0 = time.perf_counter()
            jax.block_until_ready(read(state.caches))
            if i:
                c.setdefault("read", []).append(time.perf_counter() - t0)
    rows = []
    for c in cases:
        tokens, model, params = c["tokens"], c["model"], c["params"]
        history = sharding.put_batch(random_batch(tokens // 4), mesh)
        recompute = jax.jit(functools.partial(act.recompute_predict, model, mesh=mesh))
        last = jnp.int32(tokens // 4 - 1)
        compiled = recompute.lower(params, history, last).compile()
        full_s = timed(functools.partial(compiled, params, history, last), max(2, steps // 4))
        kv_bytes = sum(x.k.nbytes + x.v.nbytes for x in c["state"].caches)
        rows.append(dict(tokens=tokens, cached_ms=1e3 * statistics.median(c["cached"]),
                         recompute_ms=1e3 * full_s, read_ms=1e3 * statistics.median(c["read"]),
                         kv_mib=kv_bytes / 2**20))  # fmt: skip
    return rows


def synthetic_trajectories(episodes: int, length: int = 1000, seed: int = 0) -> Trajectories:
    """MuJoCo-shaped data (S = 17, A = 6, whole `length`-step episodes ending in a timeout)."""
    rng = np.random.default_rng(seed)
    n = episodes * length
    timeouts = np.zeros(n, bool)
    timeouts[length - 1 :: length] = True
    return Trajectories(
        observations=rng.normal(size=(n, OBS_DIM)),
        actions=rng.uniform(-1, 1, (n, ACTIONS)),
        rewards=rng.normal(3.0, 1.0, n),
        terminals=np.zeros(n, bool),
        timeouts=timeouts,
        episode_starts=np.arange(0, n + 1, length),
    )


@contextlib.contextmanager
def without(part: str | None):
    """Traces the backbone with attention ("attention") or the FFN ("ffn") replaced by the
    identity, for timing what is left; None changes nothing."""
    saved = backbone.attend, backbone.blockwise_ffn
    if part == "attention":
        backbone.attend = lambda q, k, v, **kw: v
    elif part == "ffn":
        backbone.blockwise_ffn = lambda h, mlp, chunk: h
    try:
        yield
    finally:
        backbone.attend, backbone.blockwise_ffn = saved


def shares(full_s: float, no_attention_s: float, no_ffn_s: float, host_s: float) -> dict:
    """Fractions of a train step's time (clipped at 0: noise can make a removal look free)."""
    attention = max(full_s - no_attention_s, 0.0) / full_s
    ffn = max(full_s - no_ffn_s, 0.0) / full_s
    return dict(
        attention=attention,
        ffn=ffn,
        other=max(1.0 - attention - ffn, 0.0),
        host_per_step=host_s / full_s,
    )


def d4rl_configs(
    n: int, batch: int | None, horizon: int | None, mesh: tuple[int, int] | None = None
) -> list:
    """(name, config) of the DT and AT D4RL configs, AT at n trajectories (optionally shrunk),
    both on `mesh` = (data, seq) devices if given, else on their own meshes."""
    from ringrl.configs import at_d4rl, dt_d4rl  # noqa: PLC0415 (configs only for --d4rl)

    dt_cfg, at_cfg = dt_d4rl.get_config(), at_d4rl.get_config(f"n={n}")
    with at_cfg.unlocked():
        if batch is not None:
            at_cfg.batch_size = batch
        if horizon is not None:
            at_cfg.data.horizon = horizon
    if mesh is not None:
        for cfg in (dt_cfg, at_cfg):
            with cfg.unlocked():
                cfg.mesh = ((DATA, mesh[0]), (SEQ, mesh[1]))
    return [("dt_d4rl", dt_cfg), (f"at_d4rl n={n}", at_cfg)]


def suite_configs(ns: tuple[int, ...], mesh: tuple[int, int] | None = None) -> list:
    """(name, config) of configs/d4rl_suite.py's DT cell and its AT cells at each n, the AT cells
    on `mesh` = (data, seq) devices if given (DT keeps its own data-parallel mesh)."""
    from ringrl.configs import d4rl_suite  # noqa: PLC0415 (configs only for --d4rl_suite)

    base = d4rl_suite.get_config()
    name = base.suite.ablation_sets[0]
    out = [("suite dt", d4rl_suite.cell(base, name, "dt", 1, 0))]
    for n in ns:
        cfg = d4rl_suite.cell(base, name, "at", n, 0)
        if mesh is not None:
            with cfg.unlocked():
                cfg.mesh = ((DATA, mesh[0]), (SEQ, mesh[1]))
        out.append((f"suite at n={n}", cfg))
    return out


def bench_d4rl(name: str, cfg: ml_collections.ConfigDict, steps: int) -> dict:
    """Tokens/s and the attention / FFN / host shares of one config's train step."""
    agent = dt if cfg.data.mode == "dt" else at
    mesh = make_mesh(cfg.mesh)
    episodes = max(16, 2 * cfg.data.num_trajectories)
    sampler = agent.sampler_for(
        synthetic_trajectories(episodes, length=max(cfg.data.horizon, 20)), cfg, seed=0
    )
    host_batch = sampler.sample(cfg.batch_size)
    batch = sharding.put_batch(host_batch, mesh)
    tokens = cfg.batch_size * sampler.context_steps
    steps_fn, tokens_per_step = {}, None
    for part in (None, "attention", "ffn"):
        with without(part):
            model = agent.model_for(cfg, action_dim=ACTIONS, discrete=False)
            tokens_per_step = model.tokens_per_step
            state = init_state(model, cfg, mesh, jax.random.key(0), obs_dim=OBS_DIM)
            compiled = make_train_step(model, cfg, mesh).lower(state, batch).compile()
        box = {"state": state}

        def one_step(compiled=compiled, box=box):  # AOT-compiled: no compile in the timing
            box["state"], metrics = compiled(box["state"], batch)
            return metrics

        jax.block_until_ready(one_step())  # warm-up
        steps_fn[part] = one_step
    # Round-robin over the variants, so a change in the machine's load hits all of them alike.
    samples = {part: [] for part in steps_fn}
    for _ in range(steps):
        for part, fn in steps_fn.items():
            samples[part].append(timed(fn, 1))
    times = {part: statistics.median(v) for part, v in samples.items()}
    host_s = timed(lambda: sharding.put_batch(sampler.sample(cfg.batch_size), mesh), steps)
    tokens *= tokens_per_step
    return dict(
        name=name,
        mesh=f"{mesh.shape[DATA]}x{mesh.shape[SEQ]}",
        batch=cfg.batch_size,
        context=sampler.context_steps * tokens_per_step,
        tokens=tokens,
        step_s=times[None],
        no_attention_s=times["attention"],
        no_ffn_s=times["ffn"],
        tok_s=tokens / times[None],
        host_s=host_s,
        **shares(times[None], times["attention"], times["ffn"], host_s),
    )


def fmt(x, spec):
    return "-" if x is None else format(x, spec)


def parse_tokens(text: str) -> tuple[int, ...]:
    return tuple(int(float(x[:-1]) * 1024) if x.endswith("k") else int(x) for x in text.split(","))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small contexts, few steps")
    parser.add_argument("--train_tokens", default="4k,16k,64k", help="train contexts (tokens)")
    parser.add_argument("--act_tokens", default="1k,8k,32k", help="acting contexts (tokens)")
    parser.add_argument("--steps", type=int, default=3, help="timed train steps (fewer if slow)")
    parser.add_argument("--act_steps", type=int, default=20, help="timed acting steps")
    parser.add_argument("--time_max_tokens", type=int, default=65536,
                        help="longer train contexts: compiled memory only, not timed")  # fmt: skip
    parser.add_argument("--dense_budget_gib", type=float, default=4.0,
                        help="run the dense baseline only if its compiled memory fits")  # fmt: skip
    parser.add_argument("--d4rl", action="store_true",
                        help="only (c): the D4RL configs' train-step breakdown")  # fmt: skip
    parser.add_argument("--d4rl_n", type=int, default=4, help="AT trajectories per context")
    parser.add_argument("--d4rl_batch", type=int, help="AT contexts per step (default: config)")
    parser.add_argument("--d4rl_horizon", type=int, help="AT steps per trajectory (default 1000)")
    parser.add_argument("--d4rl_steps", type=int, default=3, help="timed steps per variant")
    parser.add_argument("--d4rl_mesh", help="data,seq devices for both configs (with "
                        "--d4rl_suite: the AT cells only; default: theirs)")  # fmt: skip
    parser.add_argument("--d4rl_suite", action="store_true",
                        help="(c) on configs/d4rl_suite.py's DT and AT cells")  # fmt: skip
    parser.add_argument("--d4rl_ns", default="1,8", help="AT ns with --d4rl_suite")
    args = parser.parse_args()
    jax.config.update("jax_threefry_partitionable", True)
    if args.d4rl:
        print(f"(c) D4RL configs' train step, {jax.device_count()} devices, median of "
              f"{args.d4rl_steps} steps; shares of the step time", flush=True)  # fmt: skip
        print(f"{'config':>14} {'mesh':>5} {'batch':>5} {'context':>8} {'tokens':>7} "
              f"{'tok/s':>8} {'step ms':>8} {'-attn ms':>8} {'-ffn ms':>8} {'attn':>6} "
              f"{'ffn':>6} {'other':>6} "
              f"{'host ms':>8} {'host/step':>9}")  # fmt: skip
        mesh = tuple(int(x) for x in args.d4rl_mesh.split(",")) if args.d4rl_mesh else None
        if args.d4rl_suite:
            configs = suite_configs(tuple(int(n) for n in args.d4rl_ns.split(",")), mesh)
        else:
            configs = d4rl_configs(args.d4rl_n, args.d4rl_batch, args.d4rl_horizon, mesh)
        for name, cfg in configs:
            r = bench_d4rl(name, cfg, args.d4rl_steps)
            print(f"{r['name']:>14} {r['mesh']:>5} {r['batch']:>5} {r['context']:>8} "
                  f"{r['tokens']:>7} {r['tok_s']:>8.0f} {1e3 * r['step_s']:>8.1f} "
                  f"{1e3 * r['no_attention_s']:>8.1f} {1e3 * r['no_ffn_s']:>8.1f} "
                  f"{r['attention']:>6.0%} {r['ffn']:>6.0%} {r['other']:>6.0%} "
                  f"{1e3 * r['host_s']:>8.1f} {r['host_per_step']:>9.2f}", flush=True)  # fmt: skip
        return
    train_ctx = parse_tokens(args.train_tokens) if args.train_tokens else ()
    act_ctx = parse_tokens(args.act_tokens) if args.act_tokens else ()
    steps, act_steps = args.steps, args.act_steps
    if args.quick:
        train_ctx, act_ctx, steps, act_steps = (1024, 2048), (1024, 4096), 1, 5
    ring_mesh = make_mesh([(DATA, 1), (SEQ, 8)])
    dense_mesh = make_mesh([(DATA, 1), (SEQ, 1)])

    if act_ctx:
        print(f"(b) acting, 1 env, seq=8 mesh; median of {act_steps} cached steps, contexts "
              "interleaved", flush=True)  # fmt: skip
        print(f"{'tokens':>7} {'cached ms':>10} {'recompute ms':>13} {'speedup':>8} "
              f"{'vs first':>9} {'KV MiB':>7} {'read KV ms':>11} {'vs read':>8}")  # fmt: skip
        acts = bench_act(act_ctx, ring_mesh, act_steps)
        for r in acts:
            print(f"{r['tokens']:>7} {r['cached_ms']:>10.2f} {r['recompute_ms']:>13.1f} "
                  f"{r['recompute_ms'] / r['cached_ms']:>8.1f} "
                  f"{r['cached_ms'] / acts[0]['cached_ms']:>9.2f} {r['kv_mib']:>7.1f} "
                  f"{r['read_ms']:>11.2f} {r['cached_ms'] / r['read_ms']:>8.2f}",
                  flush=True)  # fmt: skip
        last, first = acts[-1], acts[0]
        print(f"bars at {last['tokens']}: speedup {last['recompute_ms'] / last['cached_ms']:.1f} "
              f"(>= 20); cached vs {first['tokens']}: {last['cached_ms'] / first['cached_ms']:.2f} "
              f"(<= 2); cached vs reading the KV cache once: "
              f"{last['cached_ms'] / last['read_ms']:.2f} (<= 3)\n", flush=True)  # fmt: skip

    print(f"(a) train step, AT agent 3x128, batch 1, {jax.device_count()} devices; median of "
          f"<= {steps} steps", flush=True)  # fmt: skip
    print(f"{'tokens':>7} {'model':>6} {'tok/s':>9} {'step s':>8} {'MiB/dev':>9}")
    rows = {}
    for tokens in train_ctx:
        for attention, mesh in (("ring", ring_mesh), ("dense", dense_mesh)):
            r = bench_train(
                tokens, attention, mesh, steps, args.dense_budget_gib, args.time_max_tokens
            )
            rows[tokens, attention] = r
            mib = r["mem_gib"] * 1024
            print(f"{tokens:>7} {attention:>6} {fmt(r['tok_s'], '9.0f')} "
                  f"{fmt(r['step_s'], '8.2f')} {mib:>9.1f}", flush=True)  # fmt: skip
    print("ring (seq=8) vs dense (1 device), per-device memory bar at 16k: <= 0.25")
    for tokens in train_ctx:
        ring, dense = rows[tokens, "ring"], rows[tokens, "dense"]
        rel = "-" if None in (ring["tok_s"], dense["tok_s"]) else (
            f"{ring['tok_s'] / dense['tok_s']:.2f}")  # fmt: skip
        print(f"  {tokens:>6} tokens: mem ring/dense = {ring['mem_gib'] / dense['mem_gib']:.2g}"
              f"   tok/s ring/dense = {rel}")  # fmt: skip


if __name__ == "__main__":
    main()
