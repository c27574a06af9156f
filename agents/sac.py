"""Compact Soft Actor-Critic (Haarnoja et al. 2018) in JAX: the learner only.

Twin Q critics with target networks, a tanh-squashed Gaussian policy network and an automatically
tuned temperature (target entropy -A). It is used only to collect datasets: the online training
loop, its checkpoints and the D4RL-style dataset assembly live in `ringrl.agents.sac_collect`.

Dimension letters: B batch, S observation dim, A action dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

LOG_STD_MIN, LOG_STD_MAX = -5.0, 2.0


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


class PolicyNet(nn.Module):
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
        self.actor = PolicyNet(tuple(config.hidden), action_dim)
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
        """A numpy policy obs [B, S] -> env actions [B, A] for `generate.rollout_episodes`.

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
