"""Dataset generators (host-side numpy; no jax here).

- `learning_histories`: whole learning runs of a tabular Q-learner on the in-context tasks of
  `envs.darkroom`, vectorised over tasks, as Algorithm Distillation consumes them (episodes in the
  order the learner played them, each tagged with its task).
- D4RL-style datasets: `rollout_dataset` rolls a numpy policy out in a Gymnasium env with D4RL
  flags (terminal on a true termination, timeout on the time-limit step, never both),
  `buffer_dataset` turns an online learner's replay buffer into a `medium-replay` set
  (`Trajectories.concatenate` joins sets: D4RL's `medium-expert` is medium, then expert).
  `dataset_table` summarises the generated sets of a folder. The SAC training that supplies the
  policies lives in `ringrl.agents.sac_collect`.

Dimension letters: N steps, E episodes, S observation dim, A action dim.
"""

from __future__ import annotations

import glob
import inspect
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from tqdm import tqdm

from ringrl.envs import darkroom
from ringrl.envs.datasets import load_d4rl
from ringrl.envs.scores import normalized_score
from ringrl.envs.trajectories import Trajectories

Policy = Callable[[np.ndarray, np.random.Generator], np.ndarray]  # obs [B, S] -> actions [B, A]


STAY = 0  # darkroom.MOVES[0]
EXPLORE = ("uniform", "novel")  # how an epsilon-greedy learner picks its exploratory actions


def learning_histories(
    env_name: str,
    tasks: Sequence[int] | np.ndarray,
    episodes_per_task: int,
    seed: int = 0,
    *,
    lr: float = 1.0,
    gamma: float = 0.9,
    eps_start: float = 1.0,
    eps_end: float = 0.0,
    decay_fraction: float = 0.7,
    explore: str = "novel",
    progress: bool = False,
) -> Trajectories:
    """Learning histories of epsilon-greedy tabular Q-learning, one independent learner per task.

    Every learner starts from Q = 0 and acts with epsilon decaying linearly from `eps_start` to
    `eps_end` over the first `decay_fraction` of its episodes (then stays at `eps_end`), so its
    first episodes are a random walk and its last ones follow the learned greedy policy: the
    improvement curve Algorithm Distillation learns to reproduce in context. Greedy ties break at
    random. Time-limit truncation bootstraps; only a true termination (the door) does not.

    An exploratory step is either uniform over the actions (`explore="uniform"`, the textbook
    learner) or, with `explore="novel"` (the default), an episodic explorer's step: "stay" right
    after a rewarded step (win-stay: on DarkRoom's goal staying pays again; on KeyToDoor's key it
    does not, and the next step explores on), otherwise uniform over the actions that lead to a
    state not yet visited in this episode, falling back to uniform when there is none. A purely
    exploring DarkRoom episode then covers 17.5 distinct cells (uniform: 10.3), finds the goal in
    23% of episodes (12%) and returns 2.45 (0.24), against 2.84 for the best possible blind
    20-step sweep.

    Args:
      env_name: "darkroom" or "darkkeytodoor" (or their gym ids).
      tasks: task ids, one learner each (repeats allowed: independent learners on the same task).
      episodes_per_task: episodes in each history.
      seed: the same seed (and arguments) always gives the same histories.
      lr: Q-learning step size (the dynamics are deterministic, so large steps are safe).
      gamma: discount of the learner (not of the stored returns, which are undiscounted).
      eps_start: exploration rate of the first episode.
      eps_end: exploration rate after the decay.
      decay_fraction: fraction of the episodes over which epsilon decays.
      explore: "uniform" or "novel" (see above).
      progress: show a tqdm bar over episodes (all tasks advance together).

    Returns:
      Trajectories with discrete actions, `task_id` per episode, episodes ordered task by task
      (in the order of `tasks`) and, within a task, in learning order; metadata holds env_id,
      source, the learner settings, ref_min_score (mean return of uniform-random actions on these
      tasks) and ref_max_score (mean optimal return of these tasks).

    Raises:
      ValueError: an unknown env, an invalid task id, no tasks, or a non-positive episode count.
    """
    name = darkroom.canonical_name(env_name)
    if int(episodes_per_task) < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {episodes_per_task}")
    if not 0.0 <= eps_end <= eps_start <= 1.0 or not 0.0 < decay_fraction <= 1.0:
        raise ValueError(
            "need 0 <= eps_end <= eps_start <= 1 and 0 < decay_fraction <= 1, got "
            f"{eps_end}, {eps_start}, {decay_fraction}"
        )
    if explore not in EXPLORE:
        raise ValueError(f"explore must be one of {EXPLORE}, got {explore!r}")
    episodes = int(episodes_per_task)
    env = darkroom.VectorDarkRoom(name, tasks)
    n, horizon, num_actions = env.num_envs, env.horizon, len(darkroom.MOVES)
    next_state, reward, terminal = transition_tables(env)
    start = env.state_index()[0]
    rng = np.random.default_rng(seed)
    q = np.zeros((n, env.num_states, num_actions))
    rows = np.arange(n)

    states = np.zeros((n, episodes, horizon), np.int64)
    actions = np.zeros((n, episodes, horizon), np.int64)
    rewards = np.zeros((n, episodes, horizon), np.float32)
    terminals = np.zeros((n, episodes, horizon), bool)
    valid = np.zeros((n, episodes, horizon), bool)
    decay_episodes = max(1, int(round(decay_fraction * episodes)))

    for e in tqdm(range(episodes), desc=f"{name} histories", unit="ep", disable=not progress):
        eps = eps_end + (eps_start - eps_end) * max(0.0, 1.0 - e / decay_episodes)
        # All of an episode's random draws at once: the step loop is the hot path.
        exploring = rng.random((horizon, n)) < eps
        random_actions = rng.integers(0, num_actions, (horizon, n))
        explore_noise = rng.random((horizon, n, num_actions)) if explore == "novel" else None
        tie_noise = rng.random((horizon, n, num_actions))
        s = np.full(n, start)
        active = np.ones(n, bool)
        visited = np.zeros((n, env.num_states), bool)
        last_reward = np.zeros(n)
        for t in range(horizon):
            qs = q[rows, s]
            greedy = np.argmax((qs == qs.max(axis=1, keepdims=True)) * tie_noise[t], axis=1)
            random_a = random_actions[t]
            if explore == "novel":  # uniform over actions to unvisited states, if any
                visited[rows, s] = True
                novel = ~visited[rows[:, None], next_state[rows, s]]  # [n, actions]
                random_a = np.argmax(novel + explore_noise[t], axis=1)  # noise in [0, 1)
                random_a = np.where(last_reward > 0, STAY, random_a)  # win-stay
            a = np.where(exploring[t], random_a, greedy)
            s2, r, term = next_state[rows, s, a], reward[rows, s, a], terminal[rows, s, a]
            target = r + gamma * q[rows, s2].max(axis=1) * ~term
            # Rows whose episode already ended keep stepping (cheaper than compacting) but are
            # neither learned from nor recorded.
            q[rows, s, a] += np.where(active, lr * (target - qs[rows, a]), 0.0)
            states[:, e, t], actions[:, e, t], rewards[:, e, t] = s, a, r
            terminals[:, e, t] = term & active
            valid[:, e, t] = active
            active &= ~term
            s, last_reward = s2, r
            if not active.any():
                break

    timeouts = np.zeros_like(valid)
    timeouts[:, :, -1] = valid[:, :, -1] & ~terminals[:, :, -1]  # still running at the horizon
    obs = darkroom.state_observations(name, states[valid])
    lengths = valid.sum(axis=2).reshape(-1)  # [n * episodes], task-major
    starts = np.zeros(len(lengths) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    task_arr = np.repeat(np.asarray(env.tasks, np.int64), episodes)
    metadata = {
        "env_id": darkroom.ENV_IDS[name],
        "source": "ringrl-qlearning",
        "learner": "epsilon-greedy tabular Q-learning",
        "episodes_per_task": episodes,
        "seed": int(seed),
        "lr": float(lr),
        "gamma": float(gamma),
        "eps_start": float(eps_start),
        "eps_end": float(eps_end),
        "decay_fraction": float(decay_fraction),
        "explore": explore,
        "ref_min_score": random_return(name, env.tasks, seed=seed),
        "ref_max_score": float(np.mean([darkroom.optimal_return(name, t) for t in env.tasks])),
    }
    return Trajectories(
        observations=obs,
        actions=actions[valid],
        rewards=rewards[valid],
        terminals=terminals[valid],
        timeouts=timeouts[valid],
        episode_starts=starts,
        task_id=task_arr,
        metadata=metadata,
    )


# The learner settings a config may choose (config.data.learner), with the defaults above.
LEARNER_DEFAULTS = {
    k: inspect.signature(learning_histories).parameters[k].default
    for k in ("explore", "lr", "decay_fraction")
}


def transition_tables(env: darkroom.VectorDarkRoom) -> tuple[np.ndarray, ...]:
    """Tabular dynamics of every row of `env`, read off `env.step` itself (so they cannot drift).

    Returns:
      (next_state int64, reward float32, terminated bool), each [N, num_states, num_actions],
      indexed by `env.state_index()` values.
    """
    num_states, num_actions = env.num_states, len(darkroom.MOVES)
    probe = darkroom.VectorDarkRoom(env.name, np.repeat(env.tasks, num_states * num_actions))
    state = np.tile(np.repeat(np.arange(num_states), num_actions), env.num_envs)
    probe.set_state_index(state)
    _, reward, terminated, _ = probe.step(
        np.tile(np.arange(num_actions), env.num_envs * num_states)
    )
    shape = (env.num_envs, num_states, num_actions)
    return (
        probe.state_index().reshape(shape),
        reward.reshape(shape),
        terminated.reshape(shape),
    )


def random_return(
    env_name: str, tasks: Sequence[int], *, episodes: int = 100, seed: int = 0
) -> float:
    """Mean undiscounted return of uniform-random actions over `tasks` (`episodes` each)."""
    env = darkroom.VectorDarkRoom(env_name, np.repeat(np.asarray(tasks), episodes))
    rng = np.random.default_rng([seed, 1])
    total = np.zeros(env.num_envs)
    active = np.ones(env.num_envs, bool)
    for _ in range(env.horizon):
        _, r, term, trunc = env.step(rng.integers(0, len(darkroom.MOVES), env.num_envs))
        total += r * active
        active &= ~(term | trunc)
    return float(total.mean())


def history_summary(data: Trajectories, fraction: float = 0.1) -> dict[str, float]:
    """Mean return overall and over the first / last `fraction` of each task's history.

    Assumes the layout of `learning_histories` (equal-length histories, task by task).
    """
    per_task = int(data.metadata["episodes_per_task"])
    returns = data.returns.reshape(-1, per_task)
    k = max(1, int(round(fraction * per_task)))
    return {
        "mean_return": float(returns.mean()),
        "first_return": float(returns[:, :k].mean()),
        "last_return": float(returns[:, -k:].mean()),
    }


def describe_histories(data: Trajectories) -> str:
    """One line: tasks, episodes, steps, mean return, first / last 10%, random and optimal."""
    s = history_summary(data)
    m = data.metadata
    return (
        f"{m['env_id']}: {data.num_episodes // m['episodes_per_task']} tasks x "
        f"{m['episodes_per_task']} episodes = {data.num_episodes} episodes, {data.num_steps} "
        f"steps; mean return {s['mean_return']:.2f}, first 10% {s['first_return']:.2f}, last 10% "
        f"{s['last_return']:.2f} (random {m['ref_min_score']:.2f}, optimal "
        f"{m['ref_max_score']:.2f})"
    )


# Versions of the generated MuJoCo sets (how their policies are picked: agents/sac_collect.py).
DATASET_VERSIONS = (0, 1)


def dataset_prefix(env_id: str) -> str:
    """ "Hopper-v5" -> "hopper" (the D4RL file-name prefix)."""
    return re.sub(r"-v\d+$", "", env_id.split("/")[-1]).lower()


def dataset_path(out_dir: str, env_id: str, level: str, version: int = 0) -> str:
    """out_dir/<env>-<level>-ringrl-v<version>.hdf5, e.g. data/hopper-medium-replay-ringrl-v0.hdf5
    (the version names how the sets' policies were picked: `ringrl.agents.sac_collect`)."""
    return os.path.join(out_dir, f"{dataset_prefix(env_id)}-{level}-ringrl-v{version}.hdf5")


def uniform_policy(low: np.ndarray, high: np.ndarray) -> Policy:
    """Uniformly random actions in the box [low, high], drawn from the rollout's generator."""
    low, high = np.asarray(low, np.float32), np.asarray(high, np.float32)

    def act(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        return rng.uniform(low, high, (len(obs), *low.shape)).astype(np.float32)

    return act


def rollout_episodes(
    env_id: str,
    policy: Policy,
    *,
    num_steps: int | None = None,
    num_episodes: int | None = None,
    seed: int = 0,
    num_envs: int = 8,
    desc: str | None = None,
) -> list[dict[str, Any]]:
    """Whole episodes of `policy` in `num_envs` copies of `env_id`, stepped in lockstep.

    Give exactly one of `num_steps` (episodes are started until the finished ones hold at least
    this many steps; every started episode is finished, so the total can exceed it by up to
    `num_envs - 1` episodes, and short episodes are not favoured) or `num_episodes`.
    Each env copy is reset with its own seed derived from `seed`; the policy gets a generator
    derived from `seed` too, so the result is a function of the arguments. With `desc`, a tqdm
    bar counts the steps of finished episodes (against `num_steps`) or the finished episodes.

    Returns:
      Episodes in the order they finished, each a dict of observations [T, S],
      next_observations [T, S], actions [T, A], rewards [T], terminals [T] (true termination),
      timeouts [T] (time limit, never together with a terminal).
    """
    if (num_steps is None) == (num_episodes is None):
        raise ValueError("give exactly one of num_steps and num_episodes")
    if num_steps is not None and num_steps < 1 or num_episodes is not None and num_episodes < 1:
        raise ValueError(f"need a positive count, got {num_steps=}, {num_episodes=}")
    if num_episodes is not None:
        num_envs = min(num_envs, num_episodes)
    envs = [gym.make(env_id) for _ in range(num_envs)]
    seeds = np.random.SeedSequence(seed).generate_state(num_envs + 1)
    rng = np.random.default_rng(seeds[-1])
    obs = np.stack(
        [np.asarray(e.reset(seed=int(s))[0], np.float32) for e, s in zip(envs, seeds[:-1])]
    )
    current: list[dict[str, list]] = [_empty() for _ in envs]
    active = np.ones(num_envs, bool)
    started, done_steps, finished = num_envs, 0, []
    bar = tqdm(
        total=num_steps if num_steps is not None else num_episodes,
        desc=desc,
        unit="step" if num_steps is not None else "ep",
        disable=desc is None,
        dynamic_ncols=True,
    )
    while active.any():
        # The policy always sees all rows (finished ones included) so that a jitted policy sees
        # one batch shape only instead of recompiling as envs finish.
        acts = np.asarray(policy(obs, rng), np.float32)
        for i in np.flatnonzero(active):
            next_obs, reward, terminated, truncated, _ = envs[i].step(acts[i])
            next_obs = np.asarray(next_obs, np.float32)
            ep = current[i]
            ep["observations"].append(obs[i].copy())  # obs[i] is overwritten below
            ep["next_observations"].append(next_obs)
            ep["actions"].append(acts[i])
            ep["rewards"].append(float(reward))
            ep["terminals"].append(bool(terminated))
            ep["timeouts"].append(bool(truncated and not terminated))
            obs[i] = next_obs
            if terminated or truncated:
                finished.append({k: np.asarray(v) for k, v in ep.items()})
                done_steps += len(ep["rewards"])
                bar.update(len(ep["rewards"]) if num_steps is not None else 1)
                current[i] = _empty()
                more = done_steps < num_steps if num_steps is not None else started < num_episodes
                if more:
                    obs[i] = np.asarray(envs[i].reset()[0], np.float32)
                    started += 1
                else:
                    active[i] = False
    bar.close()
    for e in envs:
        e.close()
    for ep in finished:
        ep["rewards"] = ep["rewards"].astype(np.float32)
    return finished


def _empty() -> dict[str, list]:
    keys = ("observations", "next_observations", "actions", "rewards", "terminals", "timeouts")
    return {k: [] for k in keys}


def rollout_dataset(
    env_id: str,
    policy: Policy,
    num_steps: int,
    *,
    seed: int = 0,
    num_envs: int = 8,
    desc: str | None = None,
) -> Trajectories:
    """`rollout_episodes(num_steps=...)` as a Trajectories (with next_observations)."""
    episodes = rollout_episodes(
        env_id, policy, num_steps=num_steps, seed=seed, num_envs=num_envs, desc=desc
    )
    return Trajectories.from_episodes(episodes, metadata={"env_id": env_id})


def buffer_dataset(buffer: dict[str, np.ndarray], upto: int) -> Trajectories:
    """The first `upto` rows of a replay buffer, cut after the last episode that ended by then.

    Args:
      buffer: per-step arrays in the order they were collected: observations, actions, rewards,
        next_observations, terminals, timeouts (D4RL flags).
      upto: number of rows the learner had collected (e.g. the step of the medium snapshot).

    Returns:
      Trajectories of the complete episodes among those rows (the D4RL `medium-replay` set).
    """
    ends = np.flatnonzero(buffer["terminals"][:upto] | buffer["timeouts"][:upto])
    if len(ends) == 0:
        raise ValueError(f"no episode ended in the first {upto} buffer rows; fix: train longer")
    n = int(ends[-1]) + 1
    starts = np.concatenate([[0], ends + 1]).astype(np.int64)
    return Trajectories(
        observations=buffer["observations"][:n],
        actions=buffer["actions"][:n],
        rewards=buffer["rewards"][:n],
        terminals=buffer["terminals"][:n],
        timeouts=buffer["timeouts"][:n],
        episode_starts=starts,
        next_observations=buffer["next_observations"][:n],
    )


def best_mean(returns: np.ndarray, fraction: float = 0.1) -> float:
    """Mean of the best `fraction` of `returns` (rounded, at least one): a set's "best 10%"."""
    returns = np.sort(np.asarray(returns, dtype=np.float64))
    return float(returns[-max(1, int(round(fraction * len(returns)))) :].mean())


def set_summary(data: Trajectories, best_fraction: float = 0.1) -> dict[str, float]:
    """Episodes, steps, mean return and the mean return of the best `best_fraction` episodes."""
    return {
        "episodes": data.num_episodes,
        "steps": data.num_steps,
        "mean_return": float(np.mean(data.returns)),
        "best_return": best_mean(data.returns, best_fraction),
    }


def dataset_table(out_dir: str, env_id: str | None = None, version: int | None = None) -> str:
    """A markdown table of the generated MuJoCo sets (`*-ringrl-v<version>.hdf5`) in `out_dir`.

    Args:
      out_dir: the folder `ringrl-collect mujoco --out` wrote to.
      env_id: only the sets of this env (e.g. "Hopper-v5"); None: every set in the folder.
      version: only the sets of this collection version; None: every version.

    One row per set: episodes, steps, mean return, mean return of its best 10% of episodes and
    both normalised with the file's own references, 100 * (R - ref_min) / (ref_max - ref_min)
    ("-" where the references are unusable, e.g. an expert set no better than the random one).

    Raises:
      ValueError: no generated set in `out_dir`.
    """
    prefix = "*" if env_id is None else dataset_prefix(env_id)
    pattern = f"{prefix}-*-ringrl-v{'*' if version is None else version}.hdf5"
    paths = sorted(glob.glob(os.path.join(out_dir, pattern)))
    if not paths:
        raise ValueError(
            f"no generated sets ({pattern}) in {out_dir!r}; fix: run "
            "ringrl-collect mujoco --env ... --out there first"
        )
    rows = [
        "| set | episodes | steps | mean return | best 10% return | normalised mean | "
        "normalised best 10% |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for path in paths:
        data = load_d4rl(path)
        s = set_summary(data)
        name = os.path.basename(path).removesuffix(".hdf5")
        try:
            norm = [f"{normalized_score(data, s[k]):.1f}" for k in ("mean_return", "best_return")]
        except ValueError:  # no usable references (e.g. an expert no better than random)
            norm = ["-", "-"]
        rows.append(
            f"| {name} | {s['episodes']} | {s['steps']} | {s['mean_return']:.1f} | "
            f"{s['best_return']:.1f} | {norm[0]} | {norm[1]} |"
        )
    return "\n".join(rows)
