"""Algorithm Distillation (Laskin et al. 2022) on the ring backbone: the whole agent.

Dimension letters: T steps, k tokens per step (agents.at: model.tokens_per_step, 1 or 4).

AD is the Agentic Transformer's model and actor trained on another context: n *consecutive*
episodes of one task's learning history, in learning order, so the model imitates the learner's
improvement rather than the best trajectory. It is not return-conditioned: every target-return
token is 0, in training and when acting.

* Model: agents.at (`make_model`): n slots of `horizon` steps, no slot embedding.
* Actor (`make_actor`) and evaluation contexts (`check_eval_context`): as AT for up to n
  attempts; beyond n the context rolls (agents.act.Actor with `keep_episodes=n`): the n most
  recent episodes stay in a ring-buffer KV cache, the oldest is dropped, so AD can play 40 or more
  episodes in a row with constant memory, as in Laskin et al. 2022. Only AD may do so: AT and DT
  refuse more attempts than their context holds.
* Sampler (`HistorySampler`): consecutive episodes, targets 0.
* Conditioning (`make_policy`): target 0 at every step.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from ringrl.agents import at
from ringrl.agents.act import Actor, ActorPolicy, check_episodes_fit, fixed_target
from ringrl.agents.at import SlotSampler, make_model, model_for
from ringrl.agents.backbone import Backbone

__all__ = [
    "MODE",
    "HistorySampler",
    "check_eval_context",
    "make_actor",
    "make_model",
    "make_policy",
    "make_sampler",
    "model_for",
    "sampler_for",
]

MODE = "ad"


class HistorySampler(SlotSampler):
    """n episodes of one task's learning history per context, in learning order, every
    `stride`-th one (stride 1: consecutive).

    A stride k > 1 subsamples the history (Laskin et al. 2022 also subsample their learners), so
    one context of n episodes spans (n - 1) * k + 1 learner episodes and shows k times as much
    improvement; the model then learns to improve k times faster than the learner did.

    Args:
      trajectories, num_trajectories, horizon, seed: as agents.at.SlotSampler; the episodes must
        be in learning order within each task (as envs.generate.learning_histories writes them).
      stride: k >= 1, learner episodes between consecutive episodes of a context.

    Raises:
      ValueError: stride < 1, or no task has (n - 1) * k + 1 episodes.
    """

    def __init__(
        self,
        trajectories: Any,
        *,
        num_trajectories: int,
        horizon: int | None = None,
        seed: int = 0,
        stride: int = 1,
    ):
        if isinstance(stride, bool) or not isinstance(stride, int) or stride < 1:
            raise ValueError(f"config.data.history_stride={stride!r} must be an integer >= 1")
        self.stride = stride
        super().__init__(
            trajectories, num_trajectories=num_trajectories, horizon=horizon, seed=seed
        )

    @property
    def span(self) -> int:
        """Learner episodes one context spans: (n - 1) * stride + 1."""
        return (self.num_trajectories - 1) * self.stride + 1

    def usable_groups(self, groups: list[np.ndarray]) -> list[np.ndarray]:
        """The tasks whose history spans a context."""
        groups = [g for g in groups if len(g) >= self.span]
        if not groups:
            raise ValueError(
                f"AD needs a task with >= (num_trajectories - 1) * history_stride + 1 = "
                f"{self.span} episodes; lower num_trajectories or history_stride (or raise "
                "episodes_per_task)"
            )
        return groups

    def episodes(self, group: np.ndarray) -> np.ndarray:
        """n episodes of the task `stride` apart, from a random start."""
        first = self._rng.integers(len(group) - self.span + 1)
        return group[first : first + self.span : self.stride]

    def order_and_target(self, episodes: np.ndarray, returns: np.ndarray) -> tuple[Any, float]:
        """Learning order, target 0 (not return-conditioned)."""
        return np.arange(len(episodes)), 0.0


def make_sampler(
    trajectories: Any,
    *,
    num_trajectories: int,
    horizon: int | None,
    seed: int,
    stride: int = 1,
) -> HistorySampler:
    """The AD sampler: n episodes of one task's learning history, `stride` apart, targets 0."""
    return HistorySampler(
        trajectories,
        num_trajectories=num_trajectories,
        horizon=horizon,
        seed=seed,
        stride=stride,
    )


def sampler_for(
    trajectories: Any, config: ml_collections.ConfigDict, *, seed: int
) -> HistorySampler:
    """`make_sampler` of a config (n = config.data.num_trajectories, slot config.data.horizon,
    stride config.data.history_stride)."""
    d = config.data
    return make_sampler(
        trajectories,
        num_trajectories=d.num_trajectories,
        horizon=d.horizon,
        seed=seed,
        stride=d.history_stride,
    )


def make_actor(
    model: Backbone, mesh: jax.sharding.Mesh, *, attempts: int, horizon: int, greedy: bool = True
) -> Actor:
    """Cached actor for `attempts` episodes of at most `horizon` steps in a row.

    Up to n = model.max_trajectories attempts it is AT's actor (every attempt in context); beyond,
    a rolling actor keeping the n most recent episodes (the context the model was trained on).

    Raises:
      ValueError: attempts < 1, episodes longer than the slots, or a rolling context for a model
        with a slot embedding.
    """
    n = model.max_trajectories
    if attempts <= n:
        return at.make_actor(model, mesh, attempts=attempts, horizon=horizon, greedy=greedy)
    check_episodes_fit("the evaluation env", horizon, model.max_timestep)
    return Actor(model, mesh, max_steps=n * horizon, greedy=greedy, keep_episodes=n)


def check_eval_context(
    config: ml_collections.ConfigDict, env_id: str, *, attempts: int, episode_steps: int
) -> None:
    """Refuses evaluations the model cannot act in: attempts < 1, episodes longer than a slot,
    or more than n attempts (a rolling context) with a slot embedding.

    Raises:
      ValueError: one line naming the sizes and the fix.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    check_episodes_fit(env_id, episode_steps, config.data.horizon)
    check_rolling(config, attempts)


def check_rolling(config: ml_collections.ConfigDict, attempts: int) -> None:
    """Raises ValueError if `attempts` > n needs a rolling context the model cannot have."""
    n = config.data.num_trajectories
    if attempts > n and config.model.slot_embedding:
        raise ValueError(
            f"config.eval.attempts={attempts} > n={n} needs a rolling context, which a model with "
            "config.model.slot_embedding=True cannot have (slot indices past n were never "
            "trained); set slot_embedding=False or attempts <= n"
        )


def make_policy(actor: Actor, params: Any, *, target_return: float, seed: int) -> ActorPolicy:
    """Evaluation policy: target token 0 at every step (`target_return` is ignored)."""
    del target_return  # AD was never conditioned on a return
    return ActorPolicy(actor, params, target=0.0, rule=fixed_target, seed=seed)
