"""Agentic Transformer (chain of hindsight, Liu & Abbeel 2023) on the ring backbone: whole agent.

Dimension letters: B batch or environments, T steps, k tokens per step: `tokens_per_step` = 1
(one vector of s_t, a_{t-1}, r_{t-1}, the flags of step t-1 and the target; AMAGO / AD style) or
4 (target return, state, action, reward as separate tokens).

* Model (`make_model`, shared with agents.ad): n whole trajectories per context, each in a slot of
  `horizon` steps: T = n * horizon steps, n * horizon * k tokens — the context knob the ablations
  turn (the Ring Attention paper used 128 x 1000 x 4). The loss is on every action. No slot
  embedding by default: slot j of a training context holds the j-th worst of n trajectories, so
  an embedding of j lets the model play at rank j instead of reading the earlier attempts.
* Sampler (`SlotSampler`): n trajectories of one task sorted by ascending return; the target
  token is the rule `target`: "none" (0 everywhere: no per-task hint) or "best" (every step
  relabelled to the best return among the n, chain of hindsight; on DarkRoom this is the goal's
  optimum 21 - distance in most contexts, i.e. a hint of where the goal is). The last step of
  every slot is flagged `terminated` (the env ended it) or `truncated` (time limit, end of the
  data, or cut at the slot), which is what the evaluation env reports at the same steps.
* Actor (`make_actor`): attempts in a row, every earlier attempt kept in the cached context,
  attempt j taking trajectory slot j.
* Conditioning (`make_policy`): the same target return at every step (`act.fixed_target`), as in
  training (0 for target "none").
* Evaluation contexts (`check_eval_context`): at most n attempts, episodes no longer than a slot.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from ringrl.agents.act import (
    Actor,
    ActorPolicy,
    check_episodes_fit,
    check_target_return,
    fixed_target,
)
from ringrl.agents.backbone import Backbone
from ringrl.agents.sampler import ContextSampler

MODE = "at"
TOKENS = {1: ("step",), 4: ("return", "state", "action", "reward")}  # by model.tokens_per_step
TARGETS = ("none", "best")  # config.data.target: the sampler's target-token rule


def check_tokens_per_step(tokens_per_step: int) -> None:
    """Raises ValueError unless tokens_per_step is 1 or 4."""
    if tokens_per_step not in TOKENS:
        raise ValueError(
            f"config.model.tokens_per_step={tokens_per_step!r} is not supported; use 1 (one token "
            "per step: s_t, a_{t-1}, r_{t-1}, flags) or 4 (return, state, action, reward)"
        )


def check_target(target: str) -> None:
    """Raises ValueError unless `target` is a known target-token rule."""
    if target not in TARGETS:
        raise ValueError(f"config.data.target={target!r} is unknown; use one of {TARGETS}")


def make_model(
    *,
    action_dim: int,
    discrete: bool,
    num_trajectories: int,
    horizon: int,
    tokens_per_step: int = 1,
    **model_kwargs: Any,
) -> Backbone:
    """The AT/AD Backbone: `TOKENS[tokens_per_step]` per step, one slot per trajectory.

    Args:
      action_dim: number of discrete actions, or the continuous action size.
      discrete: cross-entropy (True) or tanh + MSE (False) actions.
      num_trajectories: n, trajectories per context (size of the trajectory-index table).
      horizon: steps per trajectory slot (size of the timestep table).
      tokens_per_step: 1 or 4 (see the module docstring).
      **model_kwargs: Backbone fields (embed_dim, num_layers, num_heads, mlp_ratio, windows,
        ffn_chunk, remat, attention, layout, block_q, block_kv, return_scale, reward_scale,
        slot_embedding), e.g. config.model.

    Raises:
      ValueError: tokens_per_step not 1 or 4.
    """
    check_tokens_per_step(tokens_per_step)
    model_kwargs.setdefault("slot_embedding", False)
    return Backbone(
        action_dim=int(action_dim),
        discrete=bool(discrete),
        tokens=TOKENS[tokens_per_step],
        max_timestep=int(horizon),
        max_trajectories=int(num_trajectories),
        **dict(model_kwargs),
    )


def model_for(config: ml_collections.ConfigDict, *, action_dim: int, discrete: bool) -> Backbone:
    """`make_model` of a config: n = config.data.num_trajectories slots of config.data.horizon."""
    return make_model(
        action_dim=action_dim,
        discrete=discrete,
        num_trajectories=config.data.num_trajectories,
        horizon=config.data.horizon,
        **config.model.to_dict(),
    )


class SlotSampler(ContextSampler):
    """n trajectories of one task per context, each in its own slot of `horizon` steps.

    Trajectory j fills steps [j * horizon, j * horizon + its length), so T = n * horizon. Which
    episodes and which target tokens is the agent's rule: here (AT) n random episodes of the
    task, sorted by ascending return, targets by `target`; agents.ad overrides `episodes` and
    `order_and_target`.

    Args:
      trajectories: an `envs.trajectories.Trajectories`.
      num_trajectories: n.
      horizon: steps per slot; longer episodes are truncated (default: the longest episode).
      seed: seed of the numpy generator.
      target: "none" (every target token 0) or "best" (the best return of the n).
    """

    def __init__(
        self,
        trajectories: Any,
        *,
        num_trajectories: int,
        horizon: int | None = None,
        seed: int = 0,
        target: str = "none",
    ):
        super().__init__(trajectories, seed=seed)
        check_target(target)
        self.target = target
        if num_trajectories < 1:
            raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}")
        self.num_trajectories = int(num_trajectories)
        self.horizon = int(self._lengths.max()) if horizon is None else int(horizon)
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        self.context_steps = self.num_trajectories * self.horizon
        self._groups = self.usable_groups(self._groups)

    def usable_groups(self, groups: list[np.ndarray]) -> list[np.ndarray]:
        """The tasks (episode index arrays) contexts are drawn from: all of them for AT."""
        return groups

    def episodes(self, group: np.ndarray) -> np.ndarray:
        """The n episodes of one context, drawn from one task's episodes `group`."""
        n = self.num_trajectories
        return self._rng.choice(group, size=n, replace=len(group) < n)

    def order_and_target(self, episodes: np.ndarray, returns: np.ndarray) -> tuple[Any, float]:
        """Chain of hindsight: slot order by ascending return; target the best of the n or 0."""
        target = float(returns.max()) if self.target == "best" else 0.0
        return np.argsort(returns, kind="stable"), target

    def fill(self, out: dict[str, np.ndarray], i: int) -> None:
        """n episodes of a random task, each in its slot, with the rule's order and target."""
        h = self.horizon
        group = self._groups[self._rng.integers(len(self._groups))]
        episodes = self.episodes(group)
        used = np.minimum(self._lengths[episodes], h)
        returns = np.array([self.episode_return(e, ln) for e, ln in zip(episodes, used)])
        order, target = self.order_and_target(episodes, returns)
        episodes, used = episodes[order], used[order]
        for j, (e, ln) in enumerate(zip(episodes, used)):
            s, o = int(self._starts[e]), j * h
            self.copy_steps(out, i, o, s, int(ln))
            out["target_returns"][i, o : o + ln] = target
            out["traj_index"][i, o : o + h] = j
            # Every slot ends flagged: terminated where the env ended the episode, otherwise
            # truncated (a time limit, the end of the data, or the cut at the slot).
            last = o + ln - 1
            out["truncated"][i, last] = 1.0 - out["terminated"][i, last]


def make_sampler(
    trajectories: Any,
    *,
    num_trajectories: int,
    horizon: int | None,
    seed: int,
    target: str = "none",
) -> SlotSampler:
    """The AT sampler: n return-sorted trajectories of one task, targets by `target`."""
    return SlotSampler(
        trajectories,
        num_trajectories=num_trajectories,
        horizon=horizon,
        seed=seed,
        target=target,
    )


def sampler_for(trajectories: Any, config: ml_collections.ConfigDict, *, seed: int) -> SlotSampler:
    """`make_sampler` of a config (n = config.data.num_trajectories, slot config.data.horizon,
    target rule config.data.target)."""
    d = config.data
    return make_sampler(
        trajectories,
        num_trajectories=d.num_trajectories,
        horizon=d.horizon,
        seed=seed,
        target=d.target,
    )


def make_actor(
    model: Backbone, mesh: jax.sharding.Mesh, *, attempts: int, horizon: int, greedy: bool = True
) -> Actor:
    """Cached actor for `attempts` episodes of at most `horizon` steps, all kept in context.

    Also AD's actor for up to n attempts (agents.ad rolls its context beyond n).

    Raises:
      ValueError: more attempts than trajectory slots, or longer episodes than the slots.
    """
    check_attempts(attempts, model.max_trajectories)
    check_episodes_fit("the evaluation env", horizon, model.max_timestep)
    return Actor(model, mesh, max_steps=attempts * horizon, greedy=greedy)


def make_policy(actor: Actor, params: Any, *, target_return: float, seed: int) -> ActorPolicy:
    """Evaluation policy: `target_return` as the target token of every step of every attempt."""
    return ActorPolicy(actor, params, target=target_return, rule=fixed_target, seed=seed)


def check_eval_context(
    config: ml_collections.ConfigDict, env_id: str, *, attempts: int, episode_steps: int
) -> None:
    """Refuses evaluations that need more context than the model was built for.

    The model holds n = config.data.num_trajectories slots of config.data.horizon steps; K
    attempts fill K slots, so K <= n, and every episode must fit a slot. Also AD's check.

    Raises:
      ValueError: one line naming the sizes and the fix, or (target "best" without the oracle) a
        target return that is not a number (configs/at_d4rl.py for a task it has no target for).
    """
    check_attempts(attempts, config.data.num_trajectories)
    check_episodes_fit(env_id, episode_steps, config.data.horizon)
    if config.data.get("target") == "best" and not config.eval.get("oracle_target", False):
        check_target_return(config, env_id, "AT")


def check_attempts(attempts: int, num_trajectories: int) -> None:
    """Raises ValueError unless 1 <= attempts <= n: attempt j takes trajectory slot j."""
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    if attempts > num_trajectories:
        raise ValueError(
            f"evaluation asks for {attempts} attempts in context but the model was built for "
            f"n={num_trajectories} trajectories (config.data.num_trajectories); use "
            f"attempts <= {num_trajectories} or train with a larger n (only mode 'ad' plays more "
            "attempts than n, with a rolling context)"
        )
