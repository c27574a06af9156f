"""Decision Transformer (Chen et al. 2021) on the ring backbone: the whole agent.

Dimension letters: B batch or environments, K steps per window, k = 3 tokens per step
(return-to-go, state, action).

* Model (`make_model`): tokens (return-to-go, state, action); continuous actions use a tanh mean
  with MSE, discrete ones cross-entropy. By default every layer has a sliding window of 3 * K
  tokens: within a training window it changes nothing (a query never looks back further), and
  when acting with the cache it keeps the attention span at the trained K steps however long the
  episode runs.
* Sampler (`WindowSampler`): one K-step window of one trajectory, drawn in proportion to episode
  length; the target token is the return-to-go (undiscounted sum of the episode's remaining
  rewards).
* Actor (`make_actor`): each attempt is its own context (`isolate_attempts`): DT is not an
  in-context learner across episodes.
* Conditioning (`return_to_go`, `make_policy`): the first step of an attempt gets the desired
  return; every later step gets it minus the rewards collected so far in the attempt.
* Evaluation contexts (`check_eval_context`): any number of attempts, episodes no longer than the
  timestep table.
"""

from __future__ import annotations

from typing import Any

import jax
import ml_collections
import numpy as np

from ringrl.agents.act import Actor, ActorPolicy, check_episodes_fit
from ringrl.agents.backbone import Backbone
from ringrl.agents.sampler import ContextSampler

MODE = "dt"
TOKENS = ("return", "state", "action")


def make_model(
    *,
    action_dim: int,
    discrete: bool,
    context_steps: int,
    max_timestep: int,
    **model_kwargs: Any,
) -> Backbone:
    """The DT Backbone.

    Args:
      action_dim: number of discrete actions, or the continuous action size.
      discrete: cross-entropy (True) or tanh + MSE (False).
      context_steps: K, steps per training window.
      max_timestep: longest episode (timestep-embedding rows).
      **model_kwargs: other Backbone fields (e.g. config.model); `windows` overrides the default
        sliding window of 3 * K tokens per layer.
    """
    kwargs = dict(model_kwargs)
    num_layers = int(kwargs.get("num_layers", Backbone.num_layers))
    if kwargs.get("windows") is None:
        kwargs["windows"] = (len(TOKENS) * int(context_steps),) * num_layers
    return Backbone(
        action_dim=int(action_dim),
        discrete=bool(discrete),
        tokens=TOKENS,
        max_timestep=int(max_timestep),
        max_trajectories=1,
        **kwargs,
    )


def model_for(config: ml_collections.ConfigDict, *, action_dim: int, discrete: bool) -> Backbone:
    """`make_model` of a config: window config.data.context_steps, timesteps config.data.horizon."""
    return make_model(
        action_dim=action_dim,
        discrete=discrete,
        context_steps=config.data.context_steps,
        max_timestep=config.data.horizon,
        **config.model.to_dict(),
    )


class WindowSampler(ContextSampler):
    """K-step windows of one trajectory with return-to-go targets.

    Args:
      trajectories: an `envs.trajectories.Trajectories`.
      context_steps: K, steps per window.
      seed: seed of the numpy generator.
    """

    def __init__(self, trajectories: Any, *, context_steps: int, seed: int = 0):
        super().__init__(trajectories, seed=seed)
        if context_steps is None or int(context_steps) < 1:
            raise ValueError(
                f"DT needs context_steps >= 1 (the K-step window); got {context_steps}"
            )
        self.context_steps = self.horizon = int(context_steps)
        # Windows are drawn in proportion to episode length (as in the reference code).
        self._p = self._lengths / self._lengths.sum()

    def fill(self, out: dict[str, np.ndarray], i: int) -> None:
        """A window from a random step of a random episode; shorter at the episode's end."""
        k = self.context_steps
        e = int(self._rng.choice(len(self._lengths), p=self._p))
        length = int(self._lengths[e])
        offset = int(self._rng.integers(length))
        ln = min(k, length - offset)
        s = int(self._starts[e]) + offset
        self.copy_steps(out, i, 0, s, ln, first_timestep=offset)
        episode_end = int(self._starts[e]) + length
        rtg = self._cum[episode_end] - self._cum[s : s + ln]
        out["target_returns"][i, :ln] = rtg.astype(np.float32)
        if offset + ln == length:
            out["done"][i, ln - 1] = 1.0


def make_sampler(trajectories: Any, *, context_steps: int, seed: int) -> WindowSampler:
    """The DT sampler: K-step windows with return-to-go targets."""
    return WindowSampler(trajectories, context_steps=context_steps, seed=seed)


def sampler_for(
    trajectories: Any, config: ml_collections.ConfigDict, *, seed: int
) -> WindowSampler:
    """`make_sampler` of a config (window config.data.context_steps).

    Raises:
      ValueError: config.data.num_trajectories is not 1.
    """
    if config.data.num_trajectories != 1:
        raise ValueError(
            f"config.data.num_trajectories={config.data.num_trajectories}: DT packs one trajectory "
            "window per context; set it to 1"
        )
    return make_sampler(trajectories, context_steps=config.data.context_steps, seed=seed)


def make_actor(
    model: Backbone,
    mesh: jax.sharding.Mesh,
    *,
    attempts: int,
    horizon: int,
    greedy: bool = True,
) -> Actor:
    """Cached DT actor for `attempts` episodes of at most `horizon` steps, each its own context.

    Feed it the return-to-go (`return_to_go`, or `make_policy` does it).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    check_episodes_fit("the evaluation env", horizon, model.max_timestep)
    return Actor(model, mesh, max_steps=attempts * horizon, isolate_attempts=True, greedy=greedy)


def return_to_go(
    targets: np.ndarray, reward: np.ndarray, done: np.ndarray, target: float
) -> np.ndarray:
    """DT conditioning: the remaining return after `reward`; `target` again when an attempt ends.

    Args:
      targets: [B] return-to-go tokens of the step just taken.
      reward: [B] its rewards.
      done: [B] the attempt ended with that step.
      target: the desired return of a whole attempt.
    """
    return np.where(done, target, targets - reward).astype(np.float32)


def make_policy(actor: Actor, params: Any, *, target_return: float, seed: int) -> ActorPolicy:
    """Evaluation policy: `target_return` at each attempt's start, then the return-to-go."""
    return ActorPolicy(actor, params, target=target_return, rule=return_to_go, seed=seed)


def check_eval_context(
    config: ml_collections.ConfigDict, env_id: str, *, attempts: int, episode_steps: int
) -> None:
    """Refuses evaluations the DT model cannot hold; every attempt is its own context.

    Args:
      config: the run's config (config.data.horizon rows in the timestep table).
      env_id: the evaluation env.
      attempts: attempts per environment (any number >= 1).
      episode_steps: longest evaluation episode.

    Raises:
      ValueError: one line naming the sizes and the fix.
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    check_episodes_fit(env_id, episode_steps, config.data.horizon)
