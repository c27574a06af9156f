"""Compact Soft Actor-Critic (Haarnoja et al. 2018) in JAX, used only to collect datasets.

Twin Q critics with target networks, a tanh-squashed Gaussian actor and an automatically tuned
temperature (target entropy -A). `train_sac` runs online SAC on a Gymnasium MuJoCo env, keeps the
whole replay buffer (it becomes the D4RL-style `medium-replay` set), evaluates policy snapshots
during training and checkpoints everything needed to continue exactly; `collect_datasets` turns a
finished run into `random` / `medium` / `medium-replay` / `expert` HDF5 datasets via the numpy
assembly in `envs.generate`.

Resume semantics: a checkpoint is written only at an episode boundary (so no MuJoCo mid-episode
state has to be saved) and holds the SAC state, the replay buffer, the snapshot list, the numpy
RNG and the env RNG. Training from a checkpoint therefore continues bit-for-bit as if it had never
stopped (tested at tiny size in tests/test_sac.py).

Dimension letters: B batch, S observation dim, A action dim.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import pickle
import tempfile
import time
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct
from tqdm import tqdm

from ringrl.envs import generate

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0
LEVELS = ("random", "medium", "medium-replay", "expert")


@dataclasses.dataclass(frozen=True)
class SACConfig:
    """SAC hyper-parameters and collection schedule (defaults: the usual MuJoCo settings)."""

    hidden: tuple[int, ...] = (256, 256)  # MLP widths of actor and each critic
    lr: float = 3e-4
    gamma: float = 0.99
    tau: float = 0.005  # Polyak rate of the target critics
    batch_size: int = 256
    start_steps: int = 5000  # uniform-random actions before the first update
    snapshot_every: int = 5000  # env steps between evaluated policy snapshots
    eval_episodes: int = 5  # deterministic episodes per snapshot evaluation
    checkpoint_every: int = 10000  # env steps between checkpoints (written at episode ends)


class _MLP(nn.Module):
    hidden: tuple[int, ...]
    out: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.out)(x)


class Actor(nn.Module):
    """obs [B, S] -> (mean [B, A], log_std [B, A]) of the pre-tanh Gaussian."""

    hidden: tuple[int, ...]
    action_dim: int

    @nn.compact
    def __call__(self, obs: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, log_std = jnp.split(_MLP(self.hidden, 2 * self.action_dim)(obs), 2, axis=-1)
        return mean, jnp.clip(log_std, LOG_STD_MIN, LOG_STD_MAX)


class Critic(nn.Module):
    """(obs [B, S], action [B, A]) -> Q values [2, B] of the twin critics."""

    hidden: tuple[int, ...]

    @nn.compact
    def __call__(self, obs: jax.Array, action: jax.Array) -> jax.Array:
        x = jnp.concatenate([obs, action], axis=-1)
        return jnp.stack([_MLP(self.hidden, 1)(x)[:, 0] for _ in range(2)])


@struct.dataclass
class SACState:
    """Parameters, optimiser states, temperature and rng of one SAC learner (a pytree)."""

    step: jax.Array
    actor_params: Any
    critic_params: Any
    target_critic_params: Any
    log_alpha: jax.Array
    actor_opt_state: Any
    critic_opt_state: Any
    alpha_opt_state: Any
    rng: jax.Array


def _tanh_logprob(u: jax.Array, mean: jax.Array, log_std: jax.Array) -> jax.Array:
    """log pi(tanh(u)) for u ~ N(mean, exp(log_std)); the tanh Jacobian in the stable form."""
    gauss = -0.5 * (((u - mean) / jnp.exp(log_std)) ** 2 + 2 * log_std + jnp.log(2 * jnp.pi))
    jac = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return (gauss - jac).sum(-1)


class SAC:
    """Networks, optimisers and the jitted update for one observation / action size."""

    def __init__(self, obs_dim: int, action_dim: int, config: SACConfig):
        self.config = config
        self.obs_dim, self.action_dim = obs_dim, action_dim
        self.actor = Actor(tuple(config.hidden), action_dim)
        self.critic = Critic(tuple(config.hidden))
        self.opt = optax.adam(config.lr)
        self.target_entropy = -float(action_dim)
        self.update = jax.jit(self._update, donate_argnums=0)
        self.actor_dist = jax.jit(self.actor.apply)

    def init(self, seed: int) -> SACState:
        """Fresh parameters and optimiser states from `seed`."""
        rng, k_actor, k_critic = jax.random.split(jax.random.PRNGKey(seed), 3)
        obs = jnp.zeros((1, self.obs_dim))
        act = jnp.zeros((1, self.action_dim))
        actor_params = self.actor.init(k_actor, obs)
        critic_params = self.critic.init(k_critic, obs, act)
        log_alpha = jnp.zeros(())
        return SACState(
            step=jnp.zeros((), jnp.int32),
            actor_params=actor_params,
            critic_params=critic_params,
            # A copy: the update donates its input, and one buffer cannot be donated twice.
            target_critic_params=jax.tree.map(jnp.copy, critic_params),
            log_alpha=log_alpha,
            actor_opt_state=self.opt.init(actor_params),
            critic_opt_state=self.opt.init(critic_params),
            alpha_opt_state=self.opt.init(log_alpha),
            rng=rng,
        )

    def _sample(self, params: Any, obs: jax.Array, rng: jax.Array) -> tuple[jax.Array, jax.Array]:
        mean, log_std = self.actor.apply(params, obs)
        u = mean + jnp.exp(log_std) * jax.random.normal(rng, mean.shape)
        return jnp.tanh(u), _tanh_logprob(u, mean, log_std)

    def _update(self, state: SACState, batch: dict[str, jax.Array]) -> tuple[SACState, dict]:
        """One critic, actor and temperature step on a batch (obs, actions in [-1, 1], rewards,
        next_obs, terminals)."""
        cfg = self.config
        rng = jax.random.fold_in(state.rng, state.step)
        k_next, k_pi = jax.random.split(rng)
        alpha = jnp.exp(state.log_alpha)

        next_a, next_logp = self._sample(state.actor_params, batch["next_obs"], k_next)
        next_q = self.critic.apply(state.target_critic_params, batch["next_obs"], next_a).min(0)
        # Only true terminations cut the bootstrap; time-limit truncations do not.
        target = batch["rewards"] + cfg.gamma * (1.0 - batch["terminals"]) * (
            next_q - alpha * next_logp
        )
        target = jax.lax.stop_gradient(target)

        def critic_loss(params):
            q = self.critic.apply(params, batch["obs"], batch["actions"])
            return ((q - target[None]) ** 2).mean(1).sum(), q.mean()

        (c_loss, q_mean), grads = jax.value_and_grad(critic_loss, has_aux=True)(state.critic_params)
        updates, critic_opt_state = self.opt.update(grads, state.critic_opt_state)
        critic_params = optax.apply_updates(state.critic_params, updates)

        def actor_loss(params):
            a, logp = self._sample(params, batch["obs"], k_pi)
            q = self.critic.apply(critic_params, batch["obs"], a).min(0)
            return (alpha * logp - q).mean(), logp.mean()

        (a_loss, logp_mean), grads = jax.value_and_grad(actor_loss, has_aux=True)(
            state.actor_params
        )
        updates, actor_opt_state = self.opt.update(grads, state.actor_opt_state)
        actor_params = optax.apply_updates(state.actor_params, updates)

        def alpha_loss(log_alpha):
            return -log_alpha * jax.lax.stop_gradient(logp_mean + self.target_entropy)

        grads = jax.grad(alpha_loss)(state.log_alpha)
        updates, alpha_opt_state = self.opt.update(grads, state.alpha_opt_state)
        log_alpha = optax.apply_updates(state.log_alpha, updates)

        target_critic_params = optax.incremental_update(
            critic_params, state.target_critic_params, cfg.tau
        )
        new = SACState(
            step=state.step + 1,
            actor_params=actor_params,
            critic_params=critic_params,
            target_critic_params=target_critic_params,
            log_alpha=log_alpha,
            actor_opt_state=actor_opt_state,
            critic_opt_state=critic_opt_state,
            alpha_opt_state=alpha_opt_state,
            rng=state.rng,
        )
        metrics = {"critic_loss": c_loss, "actor_loss": a_loss, "q": q_mean, "alpha": alpha}
        return new, metrics

    def policy(
        self, actor_params: Any, low: np.ndarray, high: np.ndarray, *, deterministic: bool
    ) -> Callable[[np.ndarray, np.random.Generator], np.ndarray]:
        """A numpy policy obs [B, S] -> env actions [B, A] for `envs.generate.rollout_episodes`.

        Stochastic actions draw their Gaussian noise from the numpy generator passed in, so a
        rollout is reproducible from its numpy seed alone.
        """
        scale, bias = (high - low) / 2.0, (high + low) / 2.0

        def act(obs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
            mean, log_std = (np.asarray(x) for x in self.actor_dist(actor_params, obs))
            u = mean if deterministic else mean + np.exp(log_std) * rng.standard_normal(mean.shape)
            return (np.tanh(u) * scale + bias).astype(np.float32)

        return act


@functools.cache
def get_sac(obs_dim: int, action_dim: int, config: SACConfig) -> SAC:
    """A shared `SAC` per size and config, so its jitted functions compile once per process."""
    return SAC(obs_dim, action_dim, config)


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
    return os.path.join(out_dir, f"{generate.dataset_prefix(env_id)}-sac-checkpoint.pkl")


def _save_checkpoint(run: SACRun, path: str) -> None:
    host = dataclasses.replace(
        run,
        state=jax.device_get(run.state),
        buffer={k: v[: run.step] for k, v in run.buffer.items()},
    )
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".pkl")
    try:
        with os.fdopen(fd, "wb") as f:
            pickle.dump(host, f, protocol=pickle.HIGHEST_PROTOCOL)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def load_checkpoint(path: str) -> SACRun:
    """Reads a checkpoint written by `train_sac` (buffer trimmed to the steps taken)."""
    try:
        with open(path, "rb") as f:
            run = pickle.load(f)
    except (pickle.UnpicklingError, EOFError, AttributeError) as err:
        raise ValueError(
            f"{path} is not a readable SAC checkpoint ({err}); fix: delete it to start over"
        ) from None
    if not isinstance(run, SACRun):
        raise ValueError(f"{path} is not a SAC checkpoint; fix: delete it or use another --out")
    return run


def _evaluate(sac: SAC, env_id: str, actor_params: Any, episodes: int, seed: int) -> float:
    space = gym.make(env_id).action_space
    policy = sac.policy(actor_params, space.low, space.high, deterministic=True)
    eps = generate.rollout_episodes(
        env_id, policy, num_episodes=episodes, seed=seed, num_envs=episodes
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
    """The snapshot whose eval return is closest to a third of the final snapshot's."""
    if not snapshots:
        raise ValueError("no policy snapshots; fix: train for at least config.snapshot_every steps")
    target = snapshots[-1]["eval_return"] / 3.0
    return min(snapshots, key=lambda s: abs(s["eval_return"] - target))


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
) -> dict[str, str]:
    """Trains SAC (resumably) and writes the four D4RL-style datasets of `env_id` to `out_dir`.

    - random: uniform actions; its mean episode return is every file's `ref_min_score`.
    - medium: the snapshot closest to a third of the final eval return (stochastic actions).
    - medium-replay: the replay buffer up to that snapshot's step, cut at the last episode end.
    - expert: the final policy (stochastic actions); its mean return is `ref_max_score`.

    Args:
      env_id: e.g. "Hopper-v5".
      total_steps: SAC training steps.
      out_dir: folder for the checkpoint and the `<env>-<level>-ringrl-v0.hdf5` files.
      dataset_steps: steps per rolled-out dataset (whole episodes, so at least this many);
        default `total_steps`.
      seed: run seed (datasets use seed+1.. so they differ from training).
      config: SAC hyper-parameters.
      progress: tqdm bar during training.
      stop_after: passed to `train_sac`; when training stops early no dataset is written.
      log: where to print one line per stage.

    Returns:
      {level: path} of the files written (empty if training was stopped early).
    """
    if dataset_steps is not None and dataset_steps < 1:
        raise ValueError(f"dataset_steps must be positive, got {dataset_steps}")
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
    medium = pick_medium(run.snapshots)
    final = run.snapshots[-1]
    policies = {
        "random": generate.uniform_policy(space.low, space.high),
        "medium": sac.policy(medium["actor_params"], space.low, space.high, deterministic=False),
        "expert": sac.policy(final["actor_params"], space.low, space.high, deterministic=False),
    }
    data = {}
    for i, (level, policy) in enumerate(policies.items()):
        t0 = time.time()
        data[level] = generate.rollout_dataset(env_id, policy, dataset_steps, seed=seed + 1 + i)
        log(
            f"{level}: {data[level].num_episodes} episodes, {data[level].num_steps} steps, "
            f"mean return {data[level].returns.mean():.1f} ({time.time() - t0:.0f} s)"
        )
    data["medium-replay"] = generate.buffer_dataset(run.buffer, medium["step"])
    log(
        f"medium-replay: {data['medium-replay'].num_episodes} episodes, "
        f"{data['medium-replay'].num_steps} steps, "
        f"mean return {data['medium-replay'].returns.mean():.1f}"
    )
    ref_min = float(data["random"].returns.mean())
    ref_max = float(data["expert"].returns.mean())
    paths = {}
    for level in LEVELS:
        policy_step = {"random": 0, "medium": medium["step"], "medium-replay": medium["step"]}
        data[level].metadata.update(
            env_id=env_id,
            ref_min_score=ref_min,
            ref_max_score=ref_max,
            source="ringrl-sac",
            level=level,
            sac_steps=run.total_steps,
            sac_seed=run.seed,
            policy_step=policy_step.get(level, final["step"]),
            snapshot_steps=[s["step"] for s in run.snapshots],
            snapshot_eval_returns=[s["eval_return"] for s in run.snapshots],
        )
        paths[level] = data[level].save(generate.dataset_path(out_dir, env_id, level))
    return paths
