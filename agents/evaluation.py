"""Evaluation of a trained agent in Gymnasium environments, several attempts per environment.

`evaluate_agent` runs an `agents.agent.Agent` through the harness (envs.evaluate.evaluate) on the
evaluation tasks of the data (held-out or training goals of an in-context task), with the
random/optimal references of those tasks; `eval_scalars` flattens a result for logging,
`write_eval` writes it as JSON, `restore_checkpoint` brings back a saved run, and
`evaluate_checkpoint` does all of it for one (what `ringrl-eval` calls).

Dimension letters: K attempts.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from ringrl.agents.agent import (
    Agent,
    check_config,
    check_eval_context,
    make_sampler,
    policy_target,
)
from ringrl.agents.checkpoint import ADDED_KEYS, Checkpointer
from ringrl.agents.workdir import check_workdir
from ringrl.envs import darkroom
from ringrl.envs.evaluate import check_env_id, evaluate, summarize
from ringrl.envs.sources import Data, load_data
from ringrl.ring.mesh import make_mesh


def env_kwargs(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """Keyword arguments of `gym.make` for evaluation: the episode cap config.eval.max_steps and,
    if > 0, the start-state noise config.eval.reset_noise_scale (MuJoCo envs only)."""
    out = {"max_episode_steps": int(config.eval.max_steps)} if config.eval.max_steps > 0 else {}
    noise = float(config.eval.get("reset_noise_scale", 0.0))
    if noise > 0:
        out["reset_noise_scale"] = noise
    return out


EVAL_TASKS = ("test", "valid", "heldout", "train")  # config.eval.tasks


def task_sets(config: ml_collections.ConfigDict, data: Data) -> dict[str, list[int]]:
    """The goal sets of an in-context task: train, heldout, and the held-out goals split into
    valid (config.data.num_valid_tasks of them, for tuning) and test (the rest, for reporting).

    The split is a fixed permutation of the held-out goals (seeded by config.data.split_seed), so
    it never changes with the evaluation settings.
    """
    heldout = list(data.heldout_tasks)
    n_valid = int(config.data.num_valid_tasks)
    if not 0 <= n_valid < len(heldout):
        raise ValueError(
            f"config.data.num_valid_tasks={n_valid} must be in [0, {len(heldout)}) (the held-out "
            "goals are split into validation and test goals); lower it or raise num_heldout_tasks"
        )
    order = np.random.default_rng(int(config.data.split_seed) + 1).permutation(len(heldout))
    valid = sorted(heldout[i] for i in order[:n_valid])
    test = sorted(heldout[i] for i in order[n_valid:])
    return {"train": list(data.train_tasks), "heldout": heldout, "valid": valid, "test": test}


def eval_tasks(config: ml_collections.ConfigDict, data: Data) -> list[int] | None:
    """The goals of config.eval.tasks, each config.eval.rollouts_per_task times (None for
    single-task envs)."""
    if data.heldout_tasks is None:
        return None
    if config.eval.tasks not in EVAL_TASKS:
        raise ValueError(f"config.eval.tasks must be one of {EVAL_TASKS}, got {config.eval.tasks}")
    if config.eval.rollouts_per_task < 1:
        raise ValueError(
            f"config.eval.rollouts_per_task must be >= 1, got {config.eval.rollouts_per_task}"
        )
    tasks = task_sets(config, data)[config.eval.tasks]
    return [t for t in tasks for _ in range(int(config.eval.rollouts_per_task))]


def eval_reference(config: ml_collections.ConfigDict, data: Data) -> tuple[float, float] | None:
    """(random, optimal) mean returns of the evaluated in-context tasks; None otherwise."""
    tasks = eval_tasks(config, data)
    if tasks is None:
        return None
    from ringrl.envs.generate import random_return

    name = darkroom.canonical_name(data.env_id)
    tasks = sorted(set(tasks))
    optimal = float(np.mean([darkroom.optimal_return(name, t) for t in tasks]))
    return random_return(name, tasks, seed=0), optimal


def evaluate_agent(
    config: ml_collections.ConfigDict,
    agent: Agent,
    params: Any,
    data: Data,
    *,
    attempts: int | None = None,
    num_envs: int | None = None,
    seed: int | None = None,
) -> dict[str, Any]:
    """Runs the agent in `data.env_id` for K attempts per environment (see envs.evaluate).

    K may exceed the n episodes of the context only for AD (mode "ad"), whose context then rolls
    (the n most recent episodes are kept); the result's `context_episodes` is n (None for DT) and
    its per-attempt means and standard errors are the return curve per episode.

    The target token is `agents.agent.policy_target`; with config.eval.oracle_target the goals
    are evaluated in groups of equal optimal return, each with that return as its target.
    """
    attempts = config.eval.attempts if attempts is None else attempts
    check_eval_context(config, data.env_id, attempts)
    tasks = eval_tasks(config, data)
    reference = eval_reference(config, data)
    seed = config.eval.seed if seed is None else seed
    num_envs = config.eval.num_envs if num_envs is None else num_envs
    num_envs = -(-num_envs // agent.data_size) * agent.data_size  # whole DATA shards
    if tasks is not None and config.eval.oracle_target:
        groups: dict[float, list[int] | None] = {}
        for t in tasks:
            groups.setdefault(policy_target(config, t), []).append(t)
    else:
        groups = {policy_target(config): tasks}
    results = []
    for target, group in groups.items():
        policy = agent.policy(
            params, attempts=attempts, target_return=target, sample=config.eval.sample, seed=seed
        )
        results.append(
            evaluate(
                policy,
                data.env_id,
                num_envs=num_envs,
                attempts=attempts,
                seed=seed,
                tasks=group,
                env_kwargs=env_kwargs(config),
                reference=reference,
                score_name=data.score_name,
            )
        )
    result = results[0]
    if len(results) > 1:
        result = summarize(
            np.concatenate([r["returns"] for r in results]),
            np.concatenate([r["lengths"] for r in results]),
            [t for r in results for t in r["tasks"]],
            reference=reference,
            score_name=data.score_name,
        )
        result["env_id"] = data.env_id
        result["steps_per_second"] = float(np.mean([r["steps_per_second"] for r in results]))
    if reference is not None:
        result["reference_random"], result["reference_optimal"] = reference
    result["seed"] = int(seed)  # environment seeds seed .. seed + num_envs - 1
    result["target_returns"] = [float(t) for t in groups]  # one per group of goals
    result["devices"] = jax.device_count()  # of the evaluating process (its mesh spans them)
    # Episodes the context holds (AT/AD: n); fewer than the attempts means AD's rolling context.
    result["context_episodes"] = None if config.data.mode == "dt" else config.data.num_trajectories
    return result


def eval_scalars(result: dict[str, Any]) -> dict[str, float]:
    """Flat `eval/...` scalars of an evaluation result, for logging."""
    out = {}
    for k, mean in enumerate(result["return_mean"]):
        out[f"eval/return_attempt{k + 1}"] = mean
    for k, se in enumerate(result["return_se"]):
        out[f"eval/return_se_attempt{k + 1}"] = se
    for key in (
        "best_attempt_return_mean",
        "best_attempt_return_se",
        "last_attempt_return_mean",
        "last_attempt_return_se",
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


def restore_checkpoint(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    attempts: int | None = None,
    **eval_overrides: Any,
) -> tuple[ml_collections.ConfigDict, Agent, Any, Data]:
    """Restores a run's checkpoint: (its stored config with `eval_overrides`, the Agent, the
    trained params, the data it trained on).

    Args:
      workdir: the run directory (with checkpoints/).
      step: checkpoint step (default: latest).
      config: if given, must agree with the stored config in the model/data groups.
      attempts: attempts per environment the model must hold (default: config.eval.attempts).
      **eval_overrides: config.eval fields to change (tasks, seed, num_envs, env_id, ...).

    Raises:
      FileNotFoundError: no checkpoint. ValueError: a config mismatch, an unknown env id, too
        many attempts for the model, unknown override fields.
    """
    workdir = check_workdir(workdir, create=False)  # a mistyped path is not created
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), create=False)
    try:
        saved = ckpt.saved_config(step)
        if config is not None:
            ckpt.check_config(config, step)
        stored = ml_collections.ConfigDict(saved)
        for key, value in eval_overrides.items():
            if key not in stored.eval and f"eval.{key}" in ADDED_KEYS:
                stored.eval[key] = ADDED_KEYS[f"eval.{key}"]  # a run saved before the field
            if key not in stored.eval:
                raise ValueError(f"config.eval has no field {key!r}; have {sorted(stored.eval)}")
            stored.eval[key] = value
        stored.lock()
        attempts = stored.eval.attempts if attempts is None else attempts
        if stored.eval.env_id:
            check_env_id(stored.eval.env_id)
        check_config(stored)
        mesh = make_mesh(stored.mesh)
        data = load_data(stored, verbose=False)
        check_eval_context(stored, data.env_id, attempts)
        sampler = make_sampler(stored, data.trajectories, seed=stored.seed)
        agent = Agent(stored, sampler, mesh, data.env_id)
        state, _ = ckpt.restore(agent.init_state(jax.random.key(stored.seed)), step=step)
    finally:
        ckpt.close()
    return stored, agent, state.params, data


def evaluate_checkpoint(
    workdir: str | os.PathLike,
    *,
    step: int | None = None,
    config: ml_collections.ConfigDict | None = None,
    attempts: int | None = None,
    **eval_overrides: Any,
) -> tuple[ml_collections.ConfigDict, dict[str, Any]]:
    """Restores a run's checkpoint (`restore_checkpoint`, same arguments and errors) and evaluates
    it (what `ringrl-eval` does): (the config used, the evaluation result)."""
    stored, agent, params, data = restore_checkpoint(
        workdir, step=step, config=config, attempts=attempts, **eval_overrides
    )
    attempts = stored.eval.attempts if attempts is None else attempts
    return stored, evaluate_agent(stored, agent, params, data, attempts=attempts)
