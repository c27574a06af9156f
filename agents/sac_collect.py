"""Dataset collection with SAC: online training on a Gymnasium MuJoCo env, then D4RL-style sets.

`train_sac` runs online SAC (`ringrl.agents.sac`) on a Gymnasium MuJoCo env, keeps the whole
replay buffer (it becomes the D4RL-style `medium-replay` set), evaluates policy snapshots during
training and checkpoints everything needed to continue exactly; `collect_datasets` turns a finished
run into `random` / `medium` / `medium-replay` / `expert` / `medium-expert` HDF5 datasets via the
numpy assembly in `ringrl.envs.generate`, resumably (sets already written are kept).

Resume semantics: a checkpoint is written only at an episode boundary (so no MuJoCo mid-episode
state has to be saved) and holds the SAC state, the replay buffer, the snapshot list, the numpy
RNG and the env RNG. Training from a checkpoint therefore continues bit-for-bit as if it had never
stopped (tested at tiny size in tests/test_sac.py). The checkpoint is one msgpack file of plain
arrays, numbers and JSON text (flax.serialization), restored into a freshly initialised state: it
names no Python class or module, unlike a pickle.

Dimension letters: S observation dim, A action dim.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
import time
from collections.abc import Callable
from typing import Any

import gymnasium as gym
import jax
import numpy as np
from flax import serialization
from msgpack.exceptions import UnpackException
from tqdm import tqdm

from ringrl.agents.sac import SAC, SACConfig, get_sac
from ringrl.envs import generate
from ringrl.envs.datasets import load_d4rl
from ringrl.envs.trajectories import Trajectories

LEVELS = ("random", "medium", "medium-replay", "expert", "medium-expert")
CHECKPOINT_VERSION = 1
# How a collection picks the policies behind its medium and expert sets (file names -ringrl-vN):
# 0: expert = the final snapshot; medium = the snapshot whose deterministic evaluation during
#    training (5 episodes) is nearest a third of the final one's (`pick_medium`).
# 1: every snapshot is rolled out with sampled actions, as the sets are (PICK_EPISODES each);
#    expert = the best; medium = the one at or before it nearest a third of its return
#    (`pick_by_sampled_returns`). With 20 episodes per snapshot Walker2d's medium set came out at
#    1.5x its pick estimate (heavy-tailed returns), hence 50.
# Version 0 took an unstable final snapshot as Hopper's expert (deterministic play 31% of its
# sampled play) and a medium from a deterministic score the sampled rollouts did not match
# (Hopper's medium set at 13% of the expert set).
DATASET_VERSIONS = generate.DATASET_VERSIONS
PICK_EPISODES = 50
PICK_SEED = 50_000  # + the run seed: the picks' environment seeds (no set, eval or agent uses them)


@dataclasses.dataclass
class SACRun:
    """Everything a run produced (and everything a checkpoint holds)."""

    env_id: str
    total_steps: int
    seed: int
    config: SACConfig
    step: int  # env steps taken
    state: Any  # SACState (host numpy arrays in a checkpoint)
    buffer: dict[str, np.ndarray]  # rows [:step] filled; actions in env units
    snapshots: list[dict[str, Any]]  # {"step", "eval_return", "actor_params"}
    episode_returns: list[float]
    np_rng_state: dict[str, Any]
    env_rng_state: dict[str, Any] | None  # env RNG just before the reset after the checkpoint

    @property
    def done(self) -> bool:
        """True when training has taken all `total_steps`."""
        return self.step >= self.total_steps


def _new_buffer(capacity: int, obs_dim: int, action_dim: int) -> dict[str, np.ndarray]:
    return {
        "observations": np.zeros((capacity, obs_dim), np.float32),
        "actions": np.zeros((capacity, action_dim), np.float32),
        "rewards": np.zeros(capacity, np.float32),
        "next_observations": np.zeros((capacity, obs_dim), np.float32),
        "terminals": np.zeros(capacity, bool),
        "timeouts": np.zeros(capacity, bool),
    }


def checkpoint_path(out_dir: str, env_id: str) -> str:
    """Where `train_sac` keeps its resumable state for `env_id`."""
    return os.path.join(out_dir, f"{generate.dataset_prefix(env_id)}-sac-checkpoint.msgpack")


def _save_checkpoint(run: SACRun, path: str) -> None:
    meta = {
        "version": CHECKPOINT_VERSION,
        "env_id": run.env_id,
        "total_steps": run.total_steps,
        "seed": run.seed,
        "config": dataclasses.asdict(run.config),
        "step": run.step,
        "snapshots": [{k: s[k] for k in ("step", "eval_return")} for s in run.snapshots],
        "episode_returns": run.episode_returns,
        # JSON text: the bit generators' states hold 128-bit integers, which msgpack cannot.
        "np_rng_state": run.np_rng_state,
        "env_rng_state": run.env_rng_state,
    }
    payload = {
        "meta": json.dumps(meta),
        "state": serialization.to_state_dict(jax.device_get(run.state)),
        "buffer": {k: v[: run.step] for k, v in run.buffer.items()},
        "snapshot_params": {str(i): s["actor_params"] for i, s in enumerate(run.snapshots)},
    }
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".msgpack")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(serialization.msgpack_serialize(payload))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> SACRun:
    """Reads a checkpoint written by `train_sac` (buffer trimmed to the steps taken).

    Raises:
      ValueError: one line naming the file and the fix, if it is not a readable SAC checkpoint.
    """
    try:
        with open(path, "rb") as f:
            payload = serialization.msgpack_restore(f.read())
        meta = json.loads(payload["meta"])
        if meta.get("version") != CHECKPOINT_VERSION:
            raise ValueError(f"version {meta.get('version')!r}, expected {CHECKPOINT_VERSION}")
        config = SACConfig(**{**meta["config"], "hidden": tuple(meta["config"]["hidden"])})
        buffer = {k: np.asarray(v) for k, v in payload["buffer"].items()}
        sac = get_sac(buffer["observations"].shape[1], buffer["actions"].shape[1], config)
        state = serialization.from_state_dict(
            jax.device_get(sac.init(meta["seed"])), payload["state"]
        )
        snapshots = [
            {**s, "actor_params": payload["snapshot_params"][str(i)]}
            for i, s in enumerate(meta["snapshots"])
        ]
    except (ValueError, KeyError, TypeError, IndexError, AttributeError, UnpackException) as err:
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise ValueError(
            f"{path} is not a readable SAC checkpoint ({reason}); fix: delete it to start over"
        ) from None
    return SACRun(
        env_id=meta["env_id"],
        total_steps=meta["total_steps"],
        seed=meta["seed"],
        config=config,
        step=meta["step"],
        state=state,
        buffer=buffer,
        snapshots=snapshots,
        episode_returns=meta["episode_returns"],
        np_rng_state=meta["np_rng_state"],
        env_rng_state=meta["env_rng_state"],
    )


def _evaluate(
    sac: SAC,
    env_id: str,
    actor_params: Any,
    episodes: int,
    seed: int,
    *,
    deterministic: bool = True,
    num_envs: int | None = None,
) -> float:
    """Mean return of one policy over `episodes` episodes (`num_envs` None: all at once)."""
    space = gym.make(env_id).action_space
    policy = sac.policy(actor_params, space.low, space.high, deterministic=deterministic)
    eps = generate.rollout_episodes(
        env_id, policy, num_episodes=episodes, seed=seed, num_envs=num_envs or episodes
    )
    return float(np.mean([ep["rewards"].sum(dtype=np.float64) for ep in eps]))


def train_sac(
    env_id: str,
    total_steps: int,
    out_dir: str,
    *,
    seed: int = 0,
    config: SACConfig | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> SACRun:
    """Online SAC on `env_id`, resumable from `checkpoint_path(out_dir, env_id)`.

    Args:
      env_id: a Gymnasium id with a Box action space (e.g. "Hopper-v5").
      total_steps: env steps to train for (one update per step after `config.start_steps`).
      out_dir: folder for the checkpoint (created).
      seed: seeds the networks, the env and the replay sampling.
      config: hyper-parameters; a checkpoint made with others is refused.
      progress: show a tqdm bar (steps, last episode return, rate, ETA).
      stop_after: stop at the first checkpoint at or after this many steps (to test resuming).

    Returns:
      The run (finished unless `stop_after` stopped it); the checkpoint on disk matches it.

    Raises:
      ValueError: an existing checkpoint was made with other settings, or a non-Box action space.
    """
    if total_steps < 1:
        raise ValueError(f"SAC needs a positive number of steps, got {total_steps}")
    config = config or SACConfig()
    os.makedirs(out_dir, exist_ok=True)
    path = checkpoint_path(out_dir, env_id)
    env = gym.make(env_id)
    if not isinstance(env.action_space, gym.spaces.Box):
        raise ValueError(
            f"SAC needs a continuous (Box) action space; {env_id} has {env.action_space}"
        )
    obs_dim = int(np.prod(env.observation_space.shape))
    action_dim = int(np.prod(env.action_space.shape))
    low, high = env.action_space.low.astype(np.float32), env.action_space.high.astype(np.float32)
    scale, bias = (high - low) / 2.0, (high + low) / 2.0
    sac = get_sac(obs_dim, action_dim, config)

    if os.path.exists(path):
        run = load_checkpoint(path)
        settings = (run.env_id, run.total_steps, run.seed, run.config)
        if settings != (env_id, total_steps, seed, config):
            raise ValueError(
                f"checkpoint {path} was made for env/steps/seed/config {settings[:3]} "
                f"{settings[3]}; fix: rerun with the same settings, or use another --out"
            )
        buffer = _new_buffer(total_steps, obs_dim, action_dim)
        for key, value in run.buffer.items():
            buffer[key][: run.step] = value
        run.buffer = buffer
        run.state = jax.device_put(run.state)
        rng = np.random.default_rng()
        rng.bit_generator.state = run.np_rng_state
        if run.done:
            return run
        # Replay the reset that followed the checkpoint: same env RNG state -> same start state.
        env.reset(seed=seed)
        env.unwrapped.np_random.bit_generator.state = run.env_rng_state
        obs, _ = env.reset()
    else:
        rng = np.random.default_rng(seed)
        obs, _ = env.reset(seed=seed)
        run = SACRun(
            env_id=env_id,
            total_steps=total_steps,
            seed=seed,
            config=config,
            step=0,
            state=sac.init(seed),
            buffer=_new_buffer(total_steps, obs_dim, action_dim),
            snapshots=[],
            episode_returns=[],
            np_rng_state={},
            env_rng_state=None,
        )

    bar = tqdm(
        total=total_steps, initial=run.step, unit="step", disable=not progress, dynamic_ncols=True
    )
    buf = run.buffer
    ep_return, last_ckpt = 0.0, run.step
    obs = np.asarray(obs, np.float32)
    try:
        while run.step < total_steps:
            if run.step < config.start_steps:
                action01 = rng.uniform(-1.0, 1.0, action_dim).astype(np.float32)
            else:
                mean, log_std = sac.actor_dist(run.state.actor_params, obs[None])
                mean, log_std = np.asarray(mean[0]), np.asarray(log_std[0])
                action01 = np.tanh(mean + np.exp(log_std) * rng.standard_normal(action_dim))
            action = (action01 * scale + bias).astype(np.float32)
            next_obs, reward, terminated, truncated, _ = env.step(action)
            next_obs = np.asarray(next_obs, np.float32)
            i = run.step
            buf["observations"][i], buf["actions"][i], buf["rewards"][i] = obs, action, reward
            buf["next_observations"][i] = next_obs
            buf["terminals"][i] = terminated
            buf["timeouts"][i] = truncated and not terminated
            run.step += 1
            ep_return += float(reward)
            bar.update(1)

            if run.step >= config.start_steps:
                idx = rng.integers(0, run.step, config.batch_size)
                batch = {
                    "obs": buf["observations"][idx],
                    "actions": (buf["actions"][idx] - bias) / scale,
                    "rewards": buf["rewards"][idx],
                    "next_obs": buf["next_observations"][idx],
                    "terminals": buf["terminals"][idx].astype(np.float32),
                }
                run.state, _ = sac.update(run.state, batch)

            if run.step % config.snapshot_every == 0 or run.step == total_steps:
                params = jax.device_get(run.state.actor_params)
                ret = _evaluate(sac, env_id, params, config.eval_episodes, seed + 10_000 + run.step)
                run.snapshots.append({"step": run.step, "eval_return": ret, "actor_params": params})
                bar.write(f"step {run.step}: eval return {ret:.1f}")

            if terminated or truncated:
                run.episode_returns.append(ep_return)
                bar.set_postfix(ret=f"{ep_return:.1f}", episodes=len(run.episode_returns))
                ep_return = 0.0
                env_rng_state = env.unwrapped.np_random.bit_generator.state  # before the reset
                obs, _ = env.reset()
                obs = np.asarray(obs, np.float32)
                if run.step - last_ckpt >= config.checkpoint_every or (
                    stop_after is not None and run.step >= stop_after
                ):
                    run.np_rng_state = rng.bit_generator.state
                    run.env_rng_state = env_rng_state
                    _save_checkpoint(run, path)
                    last_ckpt = run.step
                    if stop_after is not None and run.step >= stop_after:
                        return run
            else:
                obs = next_obs
    finally:
        bar.close()
    run.np_rng_state = rng.bit_generator.state
    _save_checkpoint(run, path)
    return run


def pick_medium(snapshots: list[dict[str, Any]]) -> dict[str, Any]:
    """Version 0's medium: the snapshot whose eval return (5 deterministic episodes during
    training) is closest to a third of the final snapshot's."""
    if not snapshots:
        raise ValueError("no policy snapshots; fix: train for at least config.snapshot_every steps")
    target = snapshots[-1]["eval_return"] / 3.0
    return min(snapshots, key=lambda s: abs(s["eval_return"] - target))


def pick_by_sampled_returns(returns: list[float]) -> tuple[int, int]:
    """Version 1's picks from each snapshot's mean return with sampled actions (the way the sets
    are rolled out): (medium index, expert index). The expert is the best snapshot; the medium
    is the one at or before it whose return is nearest a third of the expert's (the earlier one
    on a tie)."""
    if not returns:
        raise ValueError("no policy snapshots; fix: train for at least config.snapshot_every steps")
    expert = int(np.argmax(returns))
    target = returns[expert] / 3.0
    medium = min(range(expert + 1), key=lambda i: abs(returns[i] - target))
    return medium, expert


def sampled_returns(run: SACRun, episodes: int, seed: int, progress: bool = True) -> list[float]:
    """Mean return of every snapshot of `run` over `episodes` episodes with sampled actions
    (environment seeds from `seed`, the same for every snapshot)."""
    sac = get_sac(run.buffer["observations"].shape[1], run.buffer["actions"].shape[1], run.config)
    return [
        _evaluate(
            sac, run.env_id, snap["actor_params"], episodes, seed, deterministic=False, num_envs=8
        )
        for snap in tqdm(run.snapshots, desc="snapshots (sampled actions)", disable=not progress)
    ]


def _existing(path: str, expected: dict[str, Any]) -> Trajectories | None:
    """The set at `path` if a previous invocation wrote it for this run, None if there is none.

    Raises:
      ValueError: the file is not readable, or was made by another collection (one line).
    """
    if not os.path.exists(path):
        return None
    data = load_d4rl(path, load_next_observations=True)
    for key, want in expected.items():
        got = data.metadata.get(key)
        if got != want:
            raise ValueError(
                f"{path} was made by another collection ({key}={got!r}, this one {want!r}); "
                "fix: delete it, or rerun with its settings, or use another --out"
            )
    return data


def collect_datasets(
    env_id: str,
    total_steps: int,
    out_dir: str,
    *,
    dataset_steps: int | None = None,
    seed: int = 0,
    config: SACConfig | None = None,
    progress: bool = True,
    stop_after: int | None = None,
    log: Callable[[str], None] = print,
    version: int = 0,
    pick_episodes: int = PICK_EPISODES,
) -> dict[str, str]:
    """Trains SAC (resumably) and writes the five D4RL-style datasets of `env_id` to `out_dir`.

    - random: uniform actions; its mean episode return is every file's `ref_min_score`.
    - medium: a snapshot at about a third of the expert's return (stochastic actions; which one
      depends on `version`, see DATASET_VERSIONS).
    - medium-replay: the replay buffer up to that snapshot's step, cut at the last episode end.
    - expert: the final (version 0) or best (version 1) snapshot, stochastic actions; its mean
      return is `ref_max_score`.
    - medium-expert: the medium set followed by the expert set (D4RL's mix).

    D4RL defines its references as a random policy's and an expert policy's returns; here they
    are measured on the random and expert sets themselves and stored in every file (metadata
    `ref_min_score` / `ref_max_score`), which `ringrl.envs.scores` uses for these files.

    Resumable: training continues from its checkpoint, and a set already in `out_dir` from this
    run (same env, SAC steps, seed and dataset steps) is kept as it is, not made again. Each set
    is saved atomically (temp file + rename) as soon as it is made, so a later failure neither
    loses it nor leaves a half-written file. Rollouts are a function of the run and the seed, so
    a resumed collection writes the same sets as an uninterrupted one.

    Args:
      env_id: e.g. "Hopper-v5".
      total_steps: SAC training steps.
      out_dir: folder for the checkpoint and the `<env>-<level>-ringrl-v<version>.hdf5` files.
      dataset_steps: steps per rolled-out dataset (whole episodes, so at least this many);
        default `total_steps`.
      seed: run seed (datasets use seed+1.. so they differ from training).
      config: SAC hyper-parameters.
      progress: tqdm bars during training and rollouts.
      stop_after: passed to `train_sac`; when training stops early no dataset is written.
      log: where to print one line per set.
      version: how the medium and expert policies are picked (DATASET_VERSIONS); every version
        is made from the same SAC run, so a second version needs no more training.
      pick_episodes: version 1: sampled-action episodes per snapshot for the picks.

    Returns:
      {level: path} of the five sets (empty if training was stopped early).

    Raises:
      ValueError: a set in `out_dir` was made by another collection, or bad arguments.
    """
    if dataset_steps is not None and dataset_steps < 1:
        raise ValueError(f"dataset_steps must be positive, got {dataset_steps}")
    if version not in DATASET_VERSIONS:
        raise ValueError(f"dataset version {version!r} is not one of {DATASET_VERSIONS}")
    if pick_episodes < 1:
        raise ValueError(f"pick_episodes must be positive, got {pick_episodes}")
    run = train_sac(
        env_id,
        total_steps,
        out_dir,
        seed=seed,
        config=config,
        progress=progress,
        stop_after=stop_after,
    )
    if not run.done:
        return {}
    dataset_steps = dataset_steps or total_steps
    sac = get_sac(run.buffer["observations"].shape[1], run.buffer["actions"].shape[1], run.config)
    space = gym.make(env_id).action_space
    run_meta = {
        "env_id": env_id,
        "source": "ringrl-sac",
        "sac_steps": run.total_steps,
        "sac_seed": run.seed,
        "dataset_steps": dataset_steps,
    }
    if version:  # version 0 files predate the key: their metadata stays as it was
        run_meta.update(dataset_version=version, pick_episodes=pick_episodes)
    paths = {level: generate.dataset_path(out_dir, env_id, level, version) for level in LEVELS}
    data: dict[str, Trajectories] = {}
    for level, path in paths.items():
        existing = _existing(path, {**run_meta, "level": level})
        if existing is not None:
            data[level] = existing
            log(f"{level}: kept {path}")
    written = set(data)
    if written == set(LEVELS):
        return paths
    pick_meta: dict[str, Any] = {}
    if version == 0:
        medium, expert = pick_medium(run.snapshots), run.snapshots[-1]
    else:
        returns = sampled_returns(run, pick_episodes, seed + PICK_SEED, progress)
        i_medium, i_expert = pick_by_sampled_returns(returns)
        medium, expert = run.snapshots[i_medium], run.snapshots[i_expert]
        pick_meta["snapshot_sampled_returns"] = returns
        log(
            f"picked on sampled actions ({pick_episodes} episodes per snapshot): expert = step "
            f"{expert['step']} ({returns[i_expert]:.1f}), medium = step {medium['step']} "
            f"({returns[i_medium]:.1f})"
        )
    policies = {
        "random": generate.uniform_policy(space.low, space.high),
        "expert": sac.policy(expert["actor_params"], space.low, space.high, deterministic=False),
        "medium": sac.policy(medium["actor_params"], space.low, space.high, deterministic=False),
    }
    rollout_seed = {"random": seed + 1, "medium": seed + 2, "expert": seed + 3}

    def make(level: str) -> Trajectories:
        if level in data:
            return data[level]
        t0 = time.time()
        if level in policies:
            desc = f"{generate.dataset_prefix(env_id)}-{level}" if progress else None
            out = generate.rollout_dataset(
                env_id, policies[level], dataset_steps, seed=rollout_seed[level], desc=desc
            )
        elif level == "medium-replay":
            out = generate.buffer_dataset(run.buffer, medium["step"])
        else:  # medium-expert
            out = Trajectories.concatenate([make("medium"), make("expert")], {})
        data[level] = out
        log(
            f"{level}: {out.num_episodes} episodes, {out.num_steps} steps, "
            f"mean return {out.returns.mean():.1f} ({time.time() - t0:.0f} s)"
        )
        return out

    # Every file stores both references, so random and expert are made before any is written.
    ref_min = float(make("random").returns.mean())
    ref_max = float(make("expert").returns.mean())
    if not ref_max > ref_min:
        log(
            f"warning: the expert set's mean return {ref_max:.1f} is not above the random set's "
            f"{ref_min:.1f}, so scores cannot be normalised with them; train SAC longer (--steps)"
        )
    policy_step = {
        "random": 0,
        "medium": medium["step"],
        "medium-replay": medium["step"],
        "expert": expert["step"],
        "medium-expert": expert["step"],
    }
    for level in ("random", "expert", "medium", "medium-replay", "medium-expert"):
        if level in written:
            continue
        out = make(level)
        out.metadata = {
            **run_meta,
            "level": level,
            "ref_min_score": ref_min,
            "ref_max_score": ref_max,
            "policy_step": policy_step[level],
            "snapshot_steps": [s["step"] for s in run.snapshots],
            "snapshot_eval_returns": [s["eval_return"] for s in run.snapshots],
            **pick_meta,
        }
        out.save(paths[level])  # atomic: temp file in out_dir, then rename
        log(f"{level}: wrote {paths[level]}")
    return paths


def behaviour_scores(
    env_id: str, out_dir: str, *, episodes: int = 50, seed: int = 20_000, version: int = 0
) -> list[dict[str, Any]]:
    """What the policies behind the medium and expert sets score, stochastic and deterministic.

    The sets are rolled out with stochastic actions (tanh of a Gaussian sample); an imitation
    agent that outputs its mean action, as DT does, plays closer to the same policy acting
    deterministically (tanh of the mean). Comparing the two tells how much of a set's spread of
    returns (its best 10%) comes from the policy and how much from its action noise. Episodes
    use environment seeds from `seed` on (not the sets' rollout seeds nor the agents'
    evaluation seeds) and are normalised with the sets' own references. The snapshots are the
    ones named by the medium and expert sets of `version` (their `policy_step` metadata).

    Returns:
      Rows {"level", "policy_step", "mode", "returns"} for medium and expert, each mode.

    Raises:
      ValueError: no finished collection of `env_id` in `out_dir`, or no sets of `version`
        (one line, with the fix).
    """
    path = checkpoint_path(out_dir, env_id)
    if not os.path.exists(path):
        raise ValueError(
            f"no SAC checkpoint {path}; fix: run `ringrl-collect mujoco --env {env_id} "
            f"--out {out_dir}` first"
        )
    run = load_checkpoint(path)
    if not run.done:
        raise ValueError(
            f"{path} holds an unfinished run ({run.step} of {run.total_steps} steps); fix: rerun "
            f"`ringrl-collect mujoco --env {env_id} --out {out_dir}` to finish it"
        )
    sac = get_sac(run.buffer["observations"].shape[1], run.buffer["actions"].shape[1], run.config)
    space = gym.make(env_id).action_space
    by_step = {s["step"]: s for s in run.snapshots}
    rows = []
    for level in ("medium", "expert"):
        set_path = generate.dataset_path(out_dir, env_id, level, version)
        if not os.path.exists(set_path):
            raise ValueError(
                f"no set {set_path}; fix: run `ringrl-collect mujoco --env {env_id} --out "
                f"{out_dir} --version {version}` first"
            )
        snap = by_step[load_d4rl(set_path).metadata["policy_step"]]
        for mode in ("stochastic", "deterministic"):
            policy = sac.policy(
                snap["actor_params"], space.low, space.high, deterministic=mode == "deterministic"
            )
            eps = generate.rollout_episodes(
                env_id, policy, num_episodes=episodes, seed=seed, desc=f"{level} {mode}"
            )
            returns = np.array([ep["rewards"].sum(dtype=np.float64) for ep in eps])
            rows.append(
                {"level": level, "policy_step": snap["step"], "mode": mode, "returns": returns}
            )
    return rows
