"""The agent of a config: the table of agents by `config.data.mode`, and `Agent`, which builds one.

Each agent is a module (agents.at, agents.ad, agents.dt) with the same functions: `model_for`,
`sampler_for`, `make_actor`, `make_policy` and `check_eval_context`. `Agent` puts the chosen
module's pieces on a mesh with the shared train step (agents.step).
"""

from __future__ import annotations

from types import ModuleType
from typing import Any

import gymnasium as gym
import jax
import ml_collections
import numpy as np

from ringrl.agents import ad, at, dt, step
from ringrl.agents.act import Actor, ActorPolicy
from ringrl.agents.sampler import ContextSampler
from ringrl.agents.sharding import put_batch, put_global, replicated
from ringrl.envs.sources import action_space, env_horizon
from ringrl.envs.trajectories import Trajectories
from ringrl.ring.mesh import DATA

AGENTS: dict[str, ModuleType] = {m.MODE: m for m in (at, ad, dt)}  # config.data.mode -> agent


def agent_module(config: ml_collections.ConfigDict) -> ModuleType:
    """The agent module of `config.data.mode`.

    Raises:
      ValueError: an unknown mode (the message lists the valid ones).
    """
    mode = config.data.mode
    if mode not in AGENTS:
        raise ValueError(f"config.data.mode={mode!r} is unknown; use one of {tuple(AGENTS)}")
    return AGENTS[mode]


def check_config(config: ml_collections.ConfigDict) -> None:
    """The agent's config fields, checked before any data is made.

    Raises:
      ValueError: an unknown mode, `model.tokens_per_step` not 1 or 4 (AT/AD), or an unknown
        `data.target` (AT); one line naming the field.
    """
    mode = agent_module(config).MODE
    if mode in (at.MODE, ad.MODE):
        at.check_tokens_per_step(config.model.tokens_per_step)
        at.check_target(config.data.target)


def policy_target(config: ml_collections.ConfigDict, task: int | None = None) -> float:
    """The target-return token the evaluation policy feeds.

    0 for AD and for AT trained with target "none" (no target was ever anything else); otherwise
    config.eval.target_return, or with config.eval.oracle_target the optimal return of `task`.
    """
    mode = agent_module(config).MODE
    if mode == ad.MODE or (mode == at.MODE and config.data.target == "none"):
        return 0.0
    if mode == at.MODE and config.eval.oracle_target:
        if task is None:
            raise ValueError("config.eval.oracle_target needs in-context tasks (e.g. darkroom)")
        from ringrl.envs import darkroom

        return darkroom.optimal_return(config.data.env, task)
    return float(config.eval.target_return)


def check_eval_context(config: ml_collections.ConfigDict, env_id: str, attempts: int) -> None:
    """The agent's check that `attempts` episodes of `env_id` fit the context it was built for.

    Raises:
      ValueError: one line naming the sizes and the fix.
    """
    horizon = env_horizon(env_id, config.eval.max_steps)
    agent_module(config).check_eval_context(
        config, env_id, attempts=attempts, episode_steps=horizon
    )


def make_sampler(
    config: ml_collections.ConfigDict, trajectories: Trajectories, seed: int
) -> ContextSampler:
    """The context sampler of the agent of `config` over the training trajectories."""
    return agent_module(config).sampler_for(trajectories, config, seed=seed)


class Agent:
    """The model, train state, sharded train step and cached actors of the agent of `config`.

    Args:
      config: a run config.
      sampler: its sampler (from `make_sampler`): gives the observation size and action kind.
      mesh: the (DATA, SEQ) mesh.
      env_id: the evaluation env (its action space sizes the action head).

    Raises:
      ValueError: unknown mode, or data and env disagree on discrete vs continuous actions.
    """

    def __init__(
        self,
        config: ml_collections.ConfigDict,
        sampler: ContextSampler,
        mesh: jax.sharding.Mesh,
        env_id: str,
    ) -> None:
        self.module = agent_module(config)
        self.config, self.sampler, self.mesh, self.env_id = config, sampler, mesh, env_id
        space = action_space(env_id)
        discrete = isinstance(space, gym.spaces.Discrete)
        if discrete != sampler.discrete:
            raise ValueError(
                f"the data has {'discrete' if sampler.discrete else 'continuous'} actions but "
                f"{env_id} has {space}; evaluate in the env the data came from"
            )
        action_dim = int(space.n) if discrete else int(np.prod(space.shape))
        self.model = self.module.model_for(config, action_dim=action_dim, discrete=discrete)
        self.tokens_per_step = self.model.tokens_per_step
        self.train_step = step.make_train_step(self.model, config, mesh)
        self._actors: dict[tuple[int, bool], Actor] = {}  # one compile per context size

    def init_state(self, rng: jax.Array) -> step.TrainState:
        """A fresh TrainState, replicated on the mesh, its state normaliser set to the mean and
        std of the training observations (agents.tokens.ObsNorm; the checkpoint keeps them)."""
        state = step.init_state(self.model, self.config, self.mesh, rng, self.sampler.obs_dim)
        mean, std = self.sampler.obs_stats()
        params = dict(state.params)
        embed = dict(params["embed"])
        rep = replicated(self.mesh)
        embed["obs_norm"] = {
            "mean": put_global(mean.astype(np.float32), rep),
            "std": put_global(std.astype(np.float32), rep),
        }
        params["embed"] = embed
        return state.replace(params=params)

    def put_batch(self, batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """A host batch placed on the mesh, P(DATA, SEQ)."""
        return put_batch(batch, self.mesh)

    @property
    def data_size(self) -> int:
        """Size of the mesh's data axis (environments per actor batch must be a multiple)."""
        return int(self.mesh.shape[DATA])

    def policy(
        self, params: Any, *, attempts: int, target_return: float, sample: bool, seed: int
    ) -> ActorPolicy:
        """The agent's evaluation policy for `attempts` episodes of at most the env's horizon."""
        key = (attempts, sample)
        if key not in self._actors:  # periodic evaluations of one run reuse the compiled actor
            self._actors[key] = self.module.make_actor(
                self.model,
                self.mesh,
                attempts=attempts,
                horizon=env_horizon(self.env_id, self.config.eval.max_steps),
                greedy=not sample,
            )
        return self.module.make_policy(
            self._actors[key], params, target_return=target_return, seed=seed
        )
