"""`train_and_evaluate(config, workdir)`: one experiment from a config, and its training loop.

  1. cheap checks: the workdir's checkpoints, the mesh (`config.mesh`), the data
     (envs.sources.load_data: generated in-context histories or a D4RL-schema file) and the
     evaluation context the agent can hold;
  2. the agent of `config.data.mode` (agents.agent.AGENTS: at, ad, dt) and its sharded train step;
  3. the loop (tqdm bar with step, loss, tokens/s, ETA), metrics to wandb + JSON lines, orbax
     checkpoints (resumable to the same bits), periodic evaluation;
  4. a final evaluation in Gymnasium environments, several attempts per environment with earlier
     attempts in the agent's context (agents.evaluation); `eval.json` in the workdir.

The entry points (experiments/) set process-wide JAX options; this module sets none.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ringrl.agents import validate
from ringrl.agents.agent import Agent, check_eval_context, make_sampler
from ringrl.agents.checkpoint import Checkpointer
from ringrl.agents.evaluation import eval_scalars, evaluate_agent, write_eval
from ringrl.agents.logging import MetricLogger
from ringrl.agents.sampler import ContextSampler
from ringrl.agents.step import TrainState
from ringrl.agents.workdir import WorkdirLock, check_workdir, remove_if_unused
from ringrl.envs.evaluate import format_table
from ringrl.envs.sources import Data, load_data
from ringrl.ring.mesh import make_mesh


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str | os.PathLike, *, resume: bool = False
) -> dict[str, Any]:
    """Trains the agent of `config`, evaluates it, and returns the final metrics.

    Args:
      config: a config from configs/*.py.
      workdir: run directory (checkpoints/, metrics.jsonl, wandb/, eval.json, PNGs).
      resume: continue from the newest intact checkpoint in `workdir/checkpoints` (refused if its
        config differs in the model or data groups; damaged newer ones are reported on stderr and
        set aside).

    Returns:
      dict with `step`, the last train metrics (`train/...`) and the final evaluation (`eval/...`
      scalars plus `eval` = the full `envs.evaluate.evaluate` result).

    Raises:
      ValueError: bad config, data or mesh (one line naming the fix; `validate.ConfigError` has
        one line per bad config field); a workdir that is not a writable directory, is in use by
        another run, or already has checkpoints without `resume`.
      agents.checkpoint.ConfigMismatchError: resuming a checkpoint of a different config.
    """
    validate.check(config)  # every field, before any data is loaded or anything is written
    created = not os.path.exists(workdir)
    workdir = check_workdir(workdir)
    try:  # one run per workdir (process 0 holds the lock for a multi-process run)
        with WorkdirLock(workdir, active=jax.process_index() == 0):
            return _train_and_evaluate(config, workdir, resume)
    except Exception:
        if created and jax.process_index() == 0:
            remove_if_unused(workdir)  # refused before writing anything: leave no empty workdir
        raise


def _train_and_evaluate(
    config: ml_collections.ConfigDict, workdir: str, resume: bool
) -> dict[str, Any]:
    # Cheap checks first: the workdir's checkpoints, the mesh, the data, the evaluation context.
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), keep=config.keep_checkpoints)
    latest = ckpt.latest_step()
    if latest is not None and not resume:
        raise ValueError(
            f"{workdir} already has a checkpoint (step {latest}); pass --resume to continue it "
            "or choose another --workdir"
        )
    if resume and latest is not None:
        ckpt.check_config(config)
    mesh = make_mesh(config.mesh)
    data = load_data(config, verbose=jax.process_index() == 0)
    check_eval_context(config, data.env_id, config.eval.attempts)
    sampler = make_sampler(config, data.trajectories, seed=config.seed)
    agent = Agent(config, sampler, mesh, data.env_id)
    state = agent.init_state(jax.random.key(config.seed))
    if resume and latest is not None:  # the newest intact checkpoint; damaged ones are reported
        _, state, sampler_state = ckpt.restore_newest(state, config=config)
        sampler.load_state_dict(sampler_state)
    logger = MetricLogger(
        workdir,
        config,
        wandb_mode=config.wandb.mode,
        project=config.wandb.project,
        resume_step=int(jax.device_get(state.step)),  # rows of a killed run past it are dropped
    )
    try:
        state, train_metrics = train_loop(config, agent, state, sampler, ckpt, logger, data)
        result = evaluate_agent(config, agent, state.params, data)
        step = int(jax.device_get(state.step))
        logger.log(step, eval_scalars(result))
        write_eval(workdir, result)
        if jax.process_index() == 0:
            print(format_table(result))
    finally:
        logger.close()
        ckpt.close()
    return {"step": step, **train_metrics, **eval_scalars(result), "eval": result}


def one_step_in_flight() -> bool:
    """Whether the loop waits for each train step before queueing the next: on several CPU
    devices in one process (virtual devices sharing the host's cores).

    There, queued steps can deadlock: seen twice in one AT run on 2 busy cores with 8 devices
    (gdb): 7 device threads sat in an all-gather waiting for the 8th, whose launch waited for a
    semaphore in `CpuPjRtRawLoadedExecutable::Execute`, while 7 more launches (the next step's)
    waited for their inputs; 0% CPU until the collective timeout (30 min). With one step in
    flight there is no later launch to hold what an earlier one needs. The cost is the host's
    sampling no longer overlapping the step: <= 2% of a step here (experiments/bench_agent.py),
    and nothing on accelerators, where steps stay queued.
    """
    return jax.default_backend() == "cpu" and jax.device_count() > 1


def train_loop(
    config: ml_collections.ConfigDict,
    agent: Agent,
    state: TrainState,
    sampler: ContextSampler,
    ckpt: Checkpointer,
    logger: MetricLogger,
    data: Data,
) -> tuple[TrainState, dict[str, float]]:
    """Runs steps from the state's step to config.num_steps, checkpointing and evaluating.

    Returns:
      (the final state, the last logged `train/...` metrics).
    """
    from tqdm import tqdm

    start_step = int(jax.device_get(state.step))
    tokens_per_batch = config.batch_size * sampler.context_steps * agent.tokens_per_step
    last: dict[str, Any] = {}
    bar = tqdm(
        total=config.num_steps,
        initial=start_step,
        desc="train",
        disable=jax.process_index() != 0 or config.num_steps - start_step <= 1,
        dynamic_ncols=True,
    )
    t0, since = time.perf_counter(), start_step
    one_in_flight = one_step_in_flight()
    for step in range(start_step, config.num_steps):
        batch = agent.put_batch(sampler.sample(config.batch_size))
        state, metrics = agent.train_step(state, batch)
        if one_in_flight:
            jax.block_until_ready(state.step)
        done = step + 1
        if step == start_step:  # the first step compiles; tokens/s counts from after it
            jax.block_until_ready(state.step)
            t0, since = time.perf_counter(), done
        if done % config.log_every == 0 or done == config.num_steps:
            metrics = jax.device_get(metrics)
            last = {f"train/{k}": float(np.asarray(v)) for k, v in metrics.items()}
            postfix = {"loss": f"{last.get('train/loss', float('nan')):.4f}"}
            if done > since:  # not on the compiling first step
                tok_s = tokens_per_batch * (done - since) / max(time.perf_counter() - t0, 1e-9)
                last["train/tokens_per_s"] = tok_s
                postfix["tok_s"] = f"{tok_s:.0f}"
            logger.log(done, last)
            bar.set_postfix(**postfix)
            t0, since = time.perf_counter(), done
        bar.update(1)
        pause = time.perf_counter()  # checkpoints and evaluations don't count towards tokens/s
        if done % config.checkpoint_every == 0 or done == config.num_steps:
            ckpt.save(done, state, sampler_state=sampler.state_dict(), config=config)
        if config.eval.every and done % config.eval.every == 0 and done != config.num_steps:
            result = evaluate_agent(config, agent, state.params, data)
            logger.log(done, eval_scalars(result))
            bar.write(f"step {done}: eval return per attempt {np.round(result['return_mean'], 2)}")
        t0 += time.perf_counter() - pause
    bar.close()
    return state, last
