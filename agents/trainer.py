"""`train_and_evaluate(config, workdir)`: data, mesh, agent, training loop, evaluation, checkpoints.

One function runs a whole experiment from a config (configs/*.py):
  1. mesh from `config.mesh` (ring.mesh.make_mesh);
  2. data: generated in-context learning histories (cached under `config.data.dir`) or a
     D4RL-schema file;
  3. the agent (Agentic Transformer, Algorithm Distillation or Decision Transformer: one backbone,
     three samplers) and its sharded train step;
  4. the training loop (tqdm bar with step, loss, tokens/s, ETA), metrics to wandb + JSON lines,
     orbax checkpoints (resumable to the same bits), periodic evaluation;
  5. a final evaluation in Gymnasium environments, several attempts per environment with earlier
     attempts in the agent's context; `eval.json` and `returns_by_attempt.png` in the workdir.

Dimension letters: B batch, T steps in the context, S obs dim, A action dim, K attempts.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any

import gymnasium as gym
import jax
import ml_collections
import numpy as np

from ringrl.agents import validate
from ringrl.agents.checkpoint import Checkpointer
from ringrl.agents.logging import MetricLogger
from ringrl.agents.sampler import ContextSampler
from ringrl.agents.train import to_host
from ringrl.agents.workdir import WorkdirLock, check_workdir, remove_if_unused
from ringrl.envs import darkroom
from ringrl.envs.evaluate import check_env_id, evaluate, format_table
from ringrl.envs.trajectories import Trajectories
from ringrl.ring.mesh import make_mesh

AGENT_MODES = ("at", "ad", "dt")
_STEP_CACHE: dict[tuple, Any] = {}  # jitted train steps by (model, optim, num_steps, mesh)
_ACTOR_CACHE: dict[tuple, Any] = {}  # cached-decoding actors by (model, mesh, context, ...)


@dataclasses.dataclass
class Data:
    """The training data and what evaluation needs to know about it."""

    trajectories: Trajectories
    env_id: str  # Gymnasium id to evaluate in
    train_tasks: list[int] | None  # in-context tasks only
    heldout_tasks: list[int] | None
    score_name: str  # name envs.scores looks reference scores up under


def _in_context(env: str) -> bool:
    try:
        darkroom.canonical_name(env)
    except ValueError:
        return False
    return True


def histories_path(config: ml_collections.ConfigDict) -> str:
    """Cache file of the generated learning histories; the name encodes every generator input."""
    d = config.data
    name = darkroom.canonical_name(d.env)
    return os.path.join(
        d.dir,
        f"{name}_histories_train{d.num_train_tasks}of{d.num_train_tasks + d.num_heldout_tasks}"
        f"_split{d.split_seed}_ep{d.episodes_per_task}_seed{d.history_seed}.hdf5",
    )


def load_data(config: ml_collections.ConfigDict, *, verbose: bool = True) -> Data:
    """Loads the dataset of `config.data`, generating and caching in-context histories if absent.

    Raises:
      ValueError: an env/dataset that is neither an in-context task nor a loadable D4RL file.
    """
    from ringrl.envs.datasets import check_spaces, load_cache, load_d4rl

    d = config.data
    if _in_context(d.env):
        from ringrl.envs.generate import learning_histories

        name = darkroom.canonical_name(d.env)
        env_id = darkroom.DARKROOM_ID if name == "darkroom" else darkroom.DARKKEYTODOOR_ID
        env_id = config.eval.env_id or env_id
        check_env_id(env_id)  # before generating anything
        train, heldout = darkroom.task_split(
            name, d.num_train_tasks, d.num_heldout_tasks, seed=d.split_seed
        )
        path = histories_path(config)
        traj = load_cache(path)  # None if absent, or unreadable (says so; regenerated below)
        if traj is None:
            start = time.perf_counter()
            traj = learning_histories(name, train, d.episodes_per_task, seed=d.history_seed)
            os.makedirs(d.dir, exist_ok=True)
            traj.save(path)
            if verbose and jax.process_index() == 0:
                print(
                    f"generated {traj.num_episodes} episodes ({len(train)} goals x "
                    f"{d.episodes_per_task}) in {time.perf_counter() - start:.1f}s -> {path}"
                )
        check_spaces(traj, env_id, source=path)
        return Data(traj, env_id, train, heldout, score_name=env_id)
    source = d.path or d.env
    if not source:
        raise ValueError("config.data.env and config.data.path are both empty; name a dataset")
    traj = load_d4rl(source)
    env_id = config.eval.env_id or _env_id_of(traj, source)
    check_env_id(env_id)
    check_spaces(traj, env_id, source=source)  # before the first step, however it was named
    score_name = traj.metadata.get("dataset_name") or source
    return Data(traj, env_id, None, None, score_name=score_name)


def _env_id_of(traj: Trajectories, source: str) -> str:
    from ringrl.envs.datasets import D4RL_GYM_IDS

    env_id = traj.metadata.get("env_id")
    if isinstance(env_id, str) and env_id:
        return env_id
    family = os.path.basename(str(source)).split("-")[0].split("_")[0].lower()
    if family in D4RL_GYM_IDS:
        return D4RL_GYM_IDS[family]
    raise ValueError(
        f"cannot tell which Gymnasium env {source!r} comes from (no metadata/env_id); set "
        "--config.eval.env_id=Hopper-v5 (for example)"
    )


def make_sampler(config: ml_collections.ConfigDict, data: Data, seed: int) -> ContextSampler:
    """The context sampler of `config.data.mode` over the training data."""
    d = config.data
    if d.mode not in AGENT_MODES:
        raise ValueError(f"config.data.mode={d.mode!r} is unknown; use one of {AGENT_MODES}")
    return ContextSampler(
        data.trajectories,
        mode=d.mode,
        num_trajectories=d.num_trajectories,
        horizon=d.horizon if d.mode != "dt" else None,
        context_steps=d.context_steps if d.mode == "dt" else None,
        seed=seed,
    )


def env_horizon(env_id: str, max_steps: int = 0) -> int:
    """Longest evaluation episode: the env's time limit, capped at `max_steps` if > 0."""
    spec = gym.spec(env_id)
    limit = spec.max_episode_steps
    if max_steps > 0:
        return int(max_steps) if limit is None else min(int(max_steps), int(limit))
    if limit is None:
        raise ValueError(
            f"{env_id} has no time limit; set --config.eval.max_steps to bound evaluation episodes"
        )
    return int(limit)


def _env_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    return {"max_episode_steps": int(config.eval.max_steps)} if config.eval.max_steps > 0 else {}


def check_eval_context(config: ml_collections.ConfigDict, env_id: str, attempts: int) -> None:
    """Refuses an evaluation that needs more context than the model was built for.

    AT/AD models are trained on contexts of n trajectory slots of `horizon` steps; K attempts
    fill K slots, so K <= n, and every episode must fit a slot (the timestep table has `horizon`
    rows, for DT too). DT keeps each attempt in its own context, so any number of attempts fits.

    Raises:
      ValueError: one line naming the sizes and the fix.
    """
    d = config.data
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if d.mode != "dt" and attempts > d.num_trajectories:
        raise ValueError(
            f"evaluation asks for {attempts} attempts in context but the model was built for "
            f"n={d.num_trajectories} trajectories (config.data.num_trajectories); use "
            f"--attempts <= {d.num_trajectories} or train with a larger n"
        )
    horizon = env_horizon(env_id, config.eval.max_steps)
    if horizon > d.horizon:
        raise ValueError(
            f"{env_id} episodes last up to {horizon} steps but the model was built for "
            f"{d.horizon} (config.data.horizon); set --config.eval.max_steps <= {d.horizon} or "
            f"train with horizon >= {horizon}"
        )


class ActorPolicy:
    """`envs.evaluate.Policy` over the agents' cached `Actor`: the context of every environment
    (all its earlier attempts) stays in the sharded KV cache between calls.

    Target-return tokens: AT gets `target_return` at every step (its training targets are the
    best return among the context's trajectories); AD gets 0 (not return-conditioned); DT gets
    the return-to-go, `target_return` minus the rewards collected so far in the attempt.
    """

    def __init__(self, actor: Any, params: Any, mode: str, target_return: float, seed: int):
        self.actor, self.params, self.mode = actor, params, mode
        self.target = 0.0 if mode == "ad" else float(target_return)
        self.seed = seed

    def reset(self, num_envs: int) -> None:
        self.state = self.actor.reset(num_envs)
        self.rtg = np.full(num_envs, self.target, np.float32)
        self.rng = jax.random.key(self.seed)
        self.calls = 0

    def act(self, observation: np.ndarray, active: np.ndarray) -> np.ndarray:
        rng = jax.random.fold_in(self.rng, self.calls)
        self.calls += 1
        action, self.state = self.actor.act(self.params, self.state, observation, self.rtg, rng)
        return to_host(action)

    def observe(self, reward: np.ndarray, done: np.ndarray, active: np.ndarray) -> None:
        self.state = self.actor.observe(self.state, reward, done)
        if self.mode == "dt":
            self.rtg = np.where(done, self.target, self.rtg - reward).astype(np.float32)


class Agent:
    """The model, train state, sharded train step and cached actor of `config` (agents.at/dt)."""

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        sampler: ContextSampler,
        mesh: jax.sharding.Mesh,
        env_id: str,
    ) -> None:
        from ringrl.agents import at, dt, train

        self.config, self.sampler, self.mesh, self.env_id = config, sampler, mesh, env_id
        self._train = train
        d = config.data
        space = _action_space(env_id)
        discrete = isinstance(space, gym.spaces.Discrete)
        if discrete != sampler.discrete:
            raise ValueError(
                f"the data has {'discrete' if sampler.discrete else 'continuous'} actions but "
                f"{env_id} has {space}; evaluate in the env the data came from"
            )
        action_dim = int(space.n) if discrete else int(np.prod(space.shape))
        kwargs = config.model.to_dict()
        if d.mode == "dt":
            self.model = dt.make_model(
                action_dim=action_dim,
                discrete=discrete,
                context_steps=d.context_steps,
                max_timestep=d.horizon,
                **kwargs,
            )
        else:
            self.model = at.make_model(
                action_dim=action_dim,
                discrete=discrete,
                num_trajectories=d.num_trajectories,
                horizon=d.horizon,
                **kwargs,
            )
        self.tokens_per_step = self.model.tokens_per_step
        # Runs with the same model, optimizer and mesh (ablation seeds, smoke tests) share one
        # jitted step and so one compilation.
        key = (repr(self.model), json.dumps(config.optim.to_dict()), config.num_steps, mesh)
        if key not in _STEP_CACHE:
            _STEP_CACHE[key] = train.make_train_step(self.model, config, mesh)
        self.train_step = _STEP_CACHE[key]

    def init_state(self, rng: jax.Array) -> Any:
        """A fresh TrainState, replicated on the mesh."""
        return self._train.init_state(self.model, self.config, self.mesh, rng, self.sampler.obs_dim)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A host batch placed on the mesh, P(DATA, SEQ)."""
        return self._train.put_batch(batch, self.mesh)

    @property
    def data_size(self) -> int:
        """Size of the mesh's data axis (environments per actor batch must be a multiple)."""
        from ringrl.ring.mesh import DATA

        return int(self.mesh.shape[DATA])

    def policy(
        self, params: Any, *, attempts: int, target_return: float, sample: bool, seed: int
    ) -> ActorPolicy:
        """A cached-actor policy holding `attempts` episodes of at most the env's horizon."""
        from ringrl.agents import act

        horizon = env_horizon(self.env_id, self.config.eval.max_steps)
        isolate = self.config.data.mode == "dt"
        key = (repr(self.model), self.mesh, attempts * horizon, isolate, sample)
        if key not in _ACTOR_CACHE:  # one actor (one compile) per model and context size
            _ACTOR_CACHE[key] = act.Actor(
                self.model,
                self.mesh,
                max_steps=attempts * horizon,
                isolate_attempts=isolate,
                greedy=not sample,
            )
        return ActorPolicy(_ACTOR_CACHE[key], params, self.config.data.mode, target_return, seed)


def _action_space(env_id: str) -> gym.Space:
    env = gym.make(env_id)
    try:
        return env.action_space
    finally:
        env.close()


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
    jax.config.update("jax_threefry_partitionable", True)
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
    data = load_data(config)
    check_eval_context(config, data.env_id, config.eval.attempts)
    sampler = make_sampler(config, data, seed=config.seed)
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
        train_metrics = _train_loop(config, agent, state, sampler, ckpt, logger, data, workdir)
        state = train_metrics.pop("state")
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


def _train_loop(config, agent, state, sampler, ckpt, logger, data, workdir) -> dict[str, Any]:
    """Runs steps from the state's step to config.num_steps; returns last metrics + state."""
    from tqdm import tqdm

    start_step = int(jax.device_get(state.step))
    tokens_per_batch = config.batch_size * sampler.context_steps * agent.tokens_per_step
    rng = jax.random.key(config.seed + 1)  # per-step keys are fold_in(rng, step) inside the step
    last: dict[str, Any] = {}
    bar = tqdm(
        total=config.num_steps,
        initial=start_step,
        desc="train",
        disable=jax.process_index() != 0 or config.num_steps - start_step <= 1,
        dynamic_ncols=True,
    )
    t0, since = time.perf_counter(), start_step
    for step in range(start_step, config.num_steps):
        batch = agent.put_batch(sampler.sample(config.batch_size))
        state, metrics = agent.train_step(state, batch, rng)
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
    return {**last, "state": state}


def eval_tasks(config: ml_collections.ConfigDict, data: Data) -> list[int] | None:
    """The task ids to evaluate on (None for single-task envs)."""
    if data.heldout_tasks is None:
        return None
    if config.eval.tasks not in ("heldout", "train"):
        raise ValueError(f"config.eval.tasks must be 'heldout' or 'train', got {config.eval.tasks}")
    return data.heldout_tasks if config.eval.tasks == "heldout" else data.train_tasks


def eval_reference(config: ml_collections.ConfigDict, data: Data) -> tuple[float, float] | None:
    """(random, optimal) mean returns of the evaluated in-context tasks; None otherwise."""
    tasks = eval_tasks(config, data)
    if tasks is None:
        return None
    from ringrl.envs.generate import random_return

    name = darkroom.canonical_name(data.env_id)
    optimal = float(np.mean([darkroom.optimal_return(name, t) for t in tasks]))
    return random_return(name, tasks, seed=0), optimal


def evaluate_agent(
    config: ml_collections.ConfigDict,
    agent: Any,
    params: Any,
    data: Data,
    *,
    attempts: int | None = None,
    num_envs: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Runs the agent in `data.env_id` for K attempts per environment (see envs.evaluate)."""
    attempts = config.eval.attempts if attempts is None else attempts
    check_eval_context(config, data.env_id, attempts)
    tasks = eval_tasks(config, data)
    reference = eval_reference(config, data)
    seed = config.eval.seed if seed is None else seed
    num_envs = config.eval.num_envs if num_envs is None else num_envs
    num_envs = -(-num_envs // agent.data_size) * agent.data_size  # whole DATA shards
    policy = agent.policy(
        params,
        attempts=attempts,
        target_return=config.eval.target_return,
        sample=config.eval.sample,
        seed=seed,
    )
    result = evaluate(
        policy,
        data.env_id,
        num_envs=num_envs,
        attempts=attempts,
        seed=seed,
        tasks=tasks,
        env_kwargs=_env_kwargs(config),
        reference=reference,
        score_name=data.score_name,
    )
    if reference is not None:
        result["reference_random"], result["reference_optimal"] = reference
    return result


def eval_scalars(result: dict[str, Any]) -> dict[str, float]:
    """Flat `eval/...` scalars of an evaluation result, for logging."""
    out = {}
    for k, mean in enumerate(result["return_mean"]):
        out[f"eval/return_attempt{k + 1}"] = mean
    for key in (
        "best_attempt_return_mean",
        "last_attempt_return_mean",
        "normalized_best_attempt_return_mean",
        "normalized_last_attempt_return_mean",
    ):
        if result.get(key) is not None:
            out[f"eval/{key}"] = result[key]
    return out


def write_eval(workdir: str, result: dict[str, Any], name: str = "eval.json") -> str | None:
    """Writes an evaluation result as JSON (atomic) into the workdir (process 0 only)."""
    if jax.process_index() != 0:
        return None
    path = os.path.join(workdir, name)
    with open(path + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(path + ".tmp", path)
    return path


def evaluate_checkpoint(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    attempts: int | None = None,
    **eval_overrides: Any,
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Restores a run's checkpoint and evaluates it (what `ringrl-eval` does).

    Args:
      workdir: the run directory (with checkpoints/).
      step: checkpoint step (default: latest).
      config: if given, must agree with the stored config in the model/data groups.
      attempts: attempts per environment (default: the stored config.eval.attempts).
      **eval_overrides: config.eval fields to change (tasks, seed, num_envs, env_id, ...).

    Returns:
      (the config used, the evaluation result).

    Raises:
      FileNotFoundError: no checkpoint. ValueError: a config mismatch, an unknown env id, too
        many attempts for the model, unknown override fields.
    """
    jax.config.update("jax_threefry_partitionable", True)
    workdir = check_workdir(workdir, create=False)  # a mistyped path is not created
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
    try:
        saved = ckpt.saved_config(step)
        if config is not None:
            ckpt.check_config(config, step)
        stored = ml_collections.ConfigDict(saved)
        for key, value in eval_overrides.items():
            if key not in stored.eval:
                raise ValueError(f"config.eval has no field {key!r}; have {sorted(stored.eval)}")
            stored.eval[key] = value
        stored.lock()
        attempts = stored.eval.attempts if attempts is None else attempts
        if stored.eval.env_id:
            check_env_id(stored.eval.env_id)
        mesh = make_mesh(stored.mesh)
        data = load_data(stored, verbose=False)
        check_eval_context(stored, data.env_id, attempts)
        agent = Agent(stored, make_sampler(stored, data, seed=stored.seed), mesh, data.env_id)
        state, _ = ckpt.restore(agent.init_state(jax.random.key(stored.seed)), step=step)
    finally:
        ckpt.close()
    return stored, evaluate_agent(stored, agent, state.params, data, attempts=attempts)
