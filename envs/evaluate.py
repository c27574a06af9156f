"""The evaluation harness's environment loop: several attempts per environment, batched acting.

Host numpy only (no jax.jit here): the policy object does the acting, e.g. an adapter around the
agents' cached `Actor`. Every environment of a `gymnasium.vector.SyncVectorEnv` (the fastest
vector env on few cores) makes `attempts` episodes in a row, and the policy keeps its context
across them, so an in-context learner can improve attempt by attempt.

Episodes may end at different steps in different environments: an environment whose attempt
ended is reset at once and starts its next attempt, so all environments keep stepping together
(one token row per step for the whole batch, as a batched KV cache needs). An environment that has
made all its attempts keeps stepping until the others finish, with `active=False` and its results
discarded. So the policy sees at most `attempts * max_episode_steps` steps per environment.

Shapes: B environments in a batch, S observation dim, A action dim, K attempts.
"""

from __future__ import annotations

import difflib
import math
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import gymnasium as gym
import numpy as np

import ringrl.envs.darkroom  # noqa: F401  (registers the ringrl/* ids)


class Policy(Protocol):
    """What `evaluate` drives. All arrays are numpy with a leading batch axis B."""

    def reset(self, num_envs: int) -> None:
        """Starts B fresh contexts (new tasks): nothing of earlier calls is remembered."""

    def act(self, observation: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Actions [B] (discrete) or [B, A] for observations [B, S]; `active` [B] bool."""

    def observe(
        self, reward: np.ndarray, done: np.ndarray, active: np.ndarray, truncated: np.ndarray
    ) -> None:
        """The outcome of the last action: reward [B], done [B] (the attempt ended), truncated
        [B] (it ended by a time limit, not a termination)."""


class RandomPolicy:
    """Uniformly random actions; a baseline (and a harness check that needs no model)."""

    def __init__(self, action_space: gym.Space, seed: int = 0) -> None:
        self.action_space = action_space
        self.rng = np.random.default_rng(seed)

    def reset(self, num_envs: int) -> None:
        self.num_envs = num_envs

    def act(self, observation: np.ndarray, active: np.ndarray) -> np.ndarray:
        space = self.action_space
        if isinstance(space, gym.spaces.Discrete):
            return space.start + self.rng.integers(space.n, size=len(observation))
        low, high = (
            np.broadcast_to(space.low, space.shape),
            np.broadcast_to(space.high, space.shape),
        )
        return self.rng.uniform(low, high, size=(len(observation), *space.shape)).astype(
            space.dtype
        )

    def observe(
        self, reward: np.ndarray, done: np.ndarray, active: np.ndarray, truncated: np.ndarray
    ) -> None:
        pass


def check_env_id(env_id: str) -> None:
    """Raises ValueError with the closest registered ids if `env_id` is not a Gymnasium id."""
    if env_id in gym.registry:
        return
    ids = list(gym.registry)
    near = difflib.get_close_matches(env_id, ids, n=3, cutoff=0.4)
    ours = [i for i in ids if i.startswith("ringrl/")]
    hint = f"did you mean {', '.join(near)}?" if near else f"ringrl ids: {', '.join(ours)}"
    raise ValueError(f"unknown environment id {env_id!r}; {hint}")


def default_reset_noise(env_id: str) -> float | None:
    """The start-state noise scale `env_id` uses when gym.make gets no reset_noise_scale (MuJoCo
    envs: Hopper and Walker2d 5e-3, HalfCheetah 0.1); None for envs without one."""
    check_env_id(env_id)
    env = gym.make(env_id)
    try:
        scale = getattr(env.unwrapped, "_reset_noise_scale", None)
    finally:
        env.close()
    return None if scale is None else float(scale)


def make_vector_env(
    env_id: str, tasks: Sequence[int | None], env_kwargs: dict[str, Any] | None = None
) -> gym.vector.SyncVectorEnv:
    """One SyncVectorEnv, environment i on task `tasks[i]` (None: the env has no task kwarg)."""
    check_env_id(env_id)
    kwargs = dict(env_kwargs or {})

    def factory(task: int | None) -> Callable[[], gym.Env]:
        extra = {} if task is None else {"task": int(task)}
        return lambda: gym.make(env_id, **kwargs, **extra)

    try:
        return gym.vector.SyncVectorEnv(
            [factory(t) for t in tasks], autoreset_mode=gym.vector.AutoresetMode.DISABLED
        )
    except TypeError as e:  # e.g. reset_noise_scale for an env that has no such argument
        raise ValueError(
            f"{env_id} does not take the evaluation arguments {sorted(kwargs)} ({e}); drop them "
            "(config.eval.reset_noise_scale applies to MuJoCo envs only)"
        ) from None


def _run_batch(
    policy: Policy, vec: gym.vector.SyncVectorEnv, attempts: int, seeds: list[int]
) -> tuple[np.ndarray, np.ndarray]:
    """Runs `attempts` episodes in every env of `vec`. Returns (returns, lengths), each [B, K]."""
    b = vec.num_envs
    returns = np.zeros((b, attempts), np.float64)
    lengths = np.zeros((b, attempts), np.int64)
    attempt = np.zeros(b, np.int64)
    episode_return = np.zeros(b, np.float64)
    episode_length = np.zeros(b, np.int64)
    is_discrete = isinstance(vec.single_action_space, gym.spaces.Discrete)
    policy.reset(b)
    observation, _ = vec.reset(seed=seeds)
    while (attempt < attempts).any():
        active = attempt < attempts
        action = np.asarray(policy.act(observation, active.copy()))
        if not is_discrete:
            space = vec.single_action_space
            action = np.clip(action, space.low, space.high).astype(space.dtype)
        observation, reward, terminated, truncated, _ = vec.step(action)
        done = terminated | truncated
        policy.observe(
            np.asarray(reward, np.float32), done.copy(), active.copy(), truncated & ~terminated
        )
        episode_return += np.where(active, reward, 0.0)
        episode_length += active
        for i in np.flatnonzero(done & active):
            returns[i, attempt[i]] = episode_return[i]
            lengths[i, attempt[i]] = episode_length[i]
            attempt[i] += 1
        episode_return[done] = 0.0
        episode_length[done] = 0
        if done.any():
            # Seeds only on the first reset: later attempts continue each env's own RNG stream.
            fresh, _ = vec.reset(options={"reset_mask": done})
            observation = np.where(
                done.reshape((b,) + (1,) * (observation.ndim - 1)), fresh, observation
            )
    return returns, lengths


def _normalize(
    returns: np.ndarray, reference: tuple[float, float] | None, score_name: str
) -> np.ndarray | None:
    """D4RL-style 100 * (r - random) / (expert - random), or None without a reference."""
    if reference is not None:
        low, high = reference
        return 100.0 * (returns - low) / (high - low)
    try:
        from ringrl.envs import scores
    except ImportError:
        return None
    try:
        return np.asarray(scores.normalized_score(score_name, returns), np.float64)
    except (KeyError, ValueError):
        return None  # no reference score for this env/dataset


def evaluate(
    policy: Policy,
    env_id: str,
    *,
    num_envs: int,
    attempts: int = 1,
    seed: int = 0,
    tasks: Sequence[int] | None = None,
    env_kwargs: dict[str, Any] | None = None,
    reference: tuple[float, float] | None = None,
    score_name: str | None = None,
) -> dict[str, Any]:
    """Runs the policy for `attempts` consecutive episodes in each environment.

    Args:
      policy: see `Policy`; keeps its context across the attempts of one environment.
      env_id: Gymnasium id, e.g. "ringrl/DarkRoom-v0" or "Hopper-v5".
      num_envs: environments stepped together (the policy's batch size B).
      attempts: K, episodes in a row per environment with earlier ones in context.
      seed: environment i of batch j is reset with seed `seed + j * num_envs + i`.
      tasks: task ids passed as `task=` to the env; each entry is evaluated once (in batches of
        num_envs, the last one padded; repeat an id for several rollouts of a task). None:
        num_envs environments without a task kwarg.
      env_kwargs: extra `gym.make` kwargs.
      reference: (random, expert) returns for normalization; default: `envs.scores` by
        `score_name` (or env_id), if it has one.
      score_name: dataset/env name to look the reference up under.

    Returns:
      `summarize`'s statistics (means, stds and standard errors per attempt, of the best and of
      the last attempt, raw returns [E][K]) plus `env_id` and `steps_per_second`.

    Raises:
      ValueError: unknown env id, or num_envs/attempts < 1.
    """
    check_env_id(env_id)
    if num_envs < 1 or attempts < 1:
        raise ValueError(f"num_envs and attempts must be >= 1, got {num_envs}, {attempts}")
    task_list: list[int | None] = list(tasks) if tasks is not None else [None] * num_envs
    if not task_list:
        raise ValueError("tasks is empty; pass at least one task id or tasks=None")
    all_returns, all_lengths = [], []
    start, steps = time.perf_counter(), 0
    for j in range(math.ceil(len(task_list) / num_envs)):
        chunk = task_list[j * num_envs : (j + 1) * num_envs]
        real = len(chunk)
        chunk = chunk + [chunk[-1]] * (num_envs - real)  # pad: the policy's batch stays fixed
        vec = make_vector_env(env_id, chunk, env_kwargs)
        try:
            seeds = [seed + j * num_envs + i for i in range(num_envs)]
            returns, lengths = _run_batch(policy, vec, attempts, seeds)
        finally:
            vec.close()
        all_returns.append(returns[:real])
        all_lengths.append(lengths[:real])
        steps += int(lengths.sum())
    returns = np.concatenate(all_returns)
    lengths = np.concatenate(all_lengths)
    elapsed = time.perf_counter() - start
    out = summarize(
        returns, lengths, task_list, reference=reference, score_name=score_name or env_id
    )
    out["env_id"] = env_id
    out["steps_per_second"] = steps / max(elapsed, 1e-9)
    return out


def _standard_error(values: np.ndarray, tasks: Sequence[int | None]) -> np.ndarray:
    """Standard error of the mean over axis 0 of values [E, ...].

    With task ids, the rollouts of one task are not independent (same goal), so the error is
    that of the mean of the per-task means (tasks weigh equally, as in the mean when every task
    has the same number of rollouts); without, that of the E episodes.
    """
    if any(t is not None for t in tasks):
        ids = np.asarray([-1 if t is None else t for t in tasks])
        values = np.stack([values[ids == t].mean(axis=0) for t in np.unique(ids)])
    n = len(values)
    if n < 2:
        return np.zeros(values.shape[1:])
    return values.std(axis=0, ddof=1) / np.sqrt(n)


def summarize(
    returns: np.ndarray,
    lengths: np.ndarray,
    tasks: Sequence[int | None],
    *,
    reference: tuple[float, float] | None = None,
    score_name: str = "",
) -> dict[str, Any]:
    """Statistics of returns and lengths [E, K] of E episodes (environments) x K attempts.

    Returns:
      dict with per-attempt lists `return_mean`, `return_std`, `return_se` (standard error, see
      `_standard_error`), `length_mean`; `best_attempt_return_mean/std/se` (each environment's
      best attempt, the AT paper's protocol) and `last_attempt_return_mean/std/se`; the same with
      a `normalized_` prefix when a reference exists (else None); raw `returns` and `lengths`,
      `tasks`, `attempts`, `num_episodes` (E per attempt).
    """
    returns, lengths = np.asarray(returns, np.float64), np.asarray(lengths)
    tasks = list(tasks)
    out: dict[str, Any] = {
        "attempts": int(returns.shape[1]),
        "num_episodes": len(returns),
        "tasks": [None if t is None else int(t) for t in tasks],
        "returns": returns.tolist(),
        "lengths": lengths.tolist(),
    }
    normalized = _normalize(returns, reference, score_name)
    for prefix, values in (("", returns), ("normalized_", normalized)):
        for key in ("return", "best_attempt_return", "last_attempt_return"):
            for stat in ("mean", "std", "se"):
                out[f"{prefix}{key}_{stat}"] = None
        if values is None:
            continue
        for key, v in (("best_attempt_", values.max(axis=1)), ("last_attempt_", values[:, -1])):
            out[prefix + key + "return_mean"] = float(v.mean())
            out[prefix + key + "return_std"] = float(v.std())
            out[prefix + key + "return_se"] = float(_standard_error(v, tasks))
        out[prefix + "return_mean"] = values.mean(axis=0).tolist()
        out[prefix + "return_std"] = values.std(axis=0).tolist()
        out[prefix + "return_se"] = _standard_error(values, tasks).tolist()
    out["length_mean"] = lengths.mean(axis=0).tolist()
    return out


def format_table(result: dict[str, Any]) -> str:
    """A plain-text table of mean ± standard error return (and normalized score) per attempt."""
    norm = result.get("normalized_return_mean")
    header = f"{'attempt':>7}  {'return ± se':>16}  {'length':>7}" + (
        "  normalized" if norm else ""
    )
    lines = [header]
    for k in range(result["attempts"]):
        row = (
            f"{k + 1:>7}  {result['return_mean'][k]:>8.2f} ± {result['return_se'][k]:<5.2f}  "
            f"{result['length_mean'][k]:>7.1f}"
        )
        if norm:
            row += f"  {norm[k]:>10.1f}"
        lines.append(row)
    lines.append(
        f"best attempt {result['best_attempt_return_mean']:.2f} ± "
        f"{result['best_attempt_return_se']:.2f}; last attempt "
        f"{result['last_attempt_return_mean']:.2f} ± {result['last_attempt_return_se']:.2f} "
        f"(mean ± standard error; {result['num_episodes']} episodes per attempt)"
    )
    return "\n".join(lines)


def after_success(results: list[dict]) -> dict[str, dict[str, float]]:
    """Return of attempts 2.. split by whether an earlier attempt on the same goal scored.

    In DarkRoom a failed episode only says where the goal is not; an episode that reached it says
    where it is. An agent that learned in context should return far more once an earlier attempt
    scored ("after_success") than while none has ("after_failures").
    """
    split: dict[str, list[float]] = {"after_success": [], "after_failures": []}
    for r in results:
        for episode in np.asarray(r["returns"], float):  # [attempts] per goal
            for k in range(1, len(episode)):
                key = "after_success" if (episode[:k] > 0).any() else "after_failures"
                split[key].append(float(episode[k]))
    return {k: {"mean": float(np.mean(v)) if v else None, "count": len(v)}
            for k, v in split.items()}  # fmt: skip
