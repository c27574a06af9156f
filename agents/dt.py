"""Decision Transformer (Chen et al. 2021) on the ring backbone.

Dimension letters: K steps per window, k = 3 tokens per step (return-to-go, state, action).

Training contexts are K-step windows of one trajectory (agents.sampler mode "dt"); the target
token is the return-to-go. Continuous actions use a tanh mean with MSE, discrete ones
cross-entropy. By default every layer has a sliding window of 3 * K tokens: within a training
window it changes nothing (a query never looks back further), and when acting with the cache it
keeps the attention span at the trained K steps however long the episode runs. Each attempt is
its own context (`isolate_attempts`): DT is not an in-context learner across episodes.
"""

from __future__ import annotations

from typing import Any

import jax

from ringrl.agents.act import Actor
from ringrl.agents.backbone import Backbone
from ringrl.agents.sampler import ContextSampler
from ringrl.agents.tokens import DT_TOKENS


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
        kwargs["windows"] = (len(DT_TOKENS) * int(context_steps),) * num_layers
    return Backbone(
        action_dim=int(action_dim),
        discrete=bool(discrete),
        tokens=DT_TOKENS,
        max_timestep=int(max_timestep),
        max_trajectories=1,
        **kwargs,
    )


def make_sampler(trajectories: Any, *, context_steps: int, seed: int) -> ContextSampler:
    """ContextSampler of K-step windows with return-to-go targets."""
    return ContextSampler(trajectories, mode="dt", context_steps=context_steps, seed=seed)


def make_actor(
    model: Backbone, mesh: jax.sharding.Mesh, *, max_steps: int, greedy: bool = True
) -> Actor:
    """Cached DT actor; `max_steps` counts all steps of all attempts of one environment.

    The caller feeds the return-to-go as `target_return`: the desired return minus the rewards
    collected so far in the current attempt.
    """
    return Actor(model, mesh, max_steps=max_steps, isolate_attempts=True, greedy=greedy)
