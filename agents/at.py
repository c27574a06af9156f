"""Agentic Transformer (chain of hindsight, Liu & Abbeel 2023) and Algorithm Distillation agents.

Dimension letters: T steps, k = 4 tokens per step (target return, state, action, reward).

Both read n whole trajectories of one task per context (agents.sampler modes "at" and "ad"), each
in a slot of `horizon` steps: T = n * horizon steps, n * horizon * 4 tokens — the context knob the
ablations turn (the Ring Attention paper used 128 x 1000 x 4). The loss is on every action. At
evaluation the agent makes attempts in a row, every earlier attempt kept in its cached context
(agents.act.Actor), attempt j taking trajectory slot j.
"""

from __future__ import annotations

from typing import Any

import jax

from ringrl.agents.act import Actor
from ringrl.agents.backbone import Backbone
from ringrl.agents.sampler import ContextSampler
from ringrl.agents.tokens import AT_TOKENS


def make_model(
    *, action_dim: int, discrete: bool, num_trajectories: int, horizon: int, **model_kwargs: Any
) -> Backbone:
    """The AT/AD Backbone: tokens (return, state, action, reward), one slot per trajectory.

    Args:
      action_dim: number of discrete actions, or the continuous action size.
      discrete: cross-entropy (True) or tanh + MSE (False) actions.
      num_trajectories: n, trajectories per context (size of the trajectory-index table).
      horizon: steps per trajectory slot (size of the timestep table).
      **model_kwargs: Backbone fields (embed_dim, num_layers, num_heads, mlp_ratio, windows,
        ffn_chunk, remat, attention, layout, block_q, block_kv, return_scale), e.g. config.model.
    """
    return Backbone(
        action_dim=int(action_dim),
        discrete=bool(discrete),
        tokens=AT_TOKENS,
        max_timestep=int(horizon),
        max_trajectories=int(num_trajectories),
        **dict(model_kwargs),
    )


def make_sampler(
    trajectories: Any, *, num_trajectories: int, horizon: int, seed: int, mode: str = "at"
) -> ContextSampler:
    """ContextSampler for mode "at" (return-sorted, relabelled) or "ad" (consecutive episodes)."""
    if mode not in ("at", "ad"):
        raise ValueError(f"at.make_sampler mode must be 'at' or 'ad', got {mode!r}")
    return ContextSampler(
        trajectories, mode=mode, num_trajectories=num_trajectories, horizon=horizon, seed=seed
    )


def make_actor(
    model: Backbone, mesh: jax.sharding.Mesh, *, attempts: int, horizon: int, greedy: bool = True
) -> Actor:
    """Cached actor for `attempts` episodes of at most `horizon` steps, all kept in context.

    Raises:
      ValueError: more attempts than trajectory slots, or longer episodes than the slots.
    """
    if attempts > model.max_trajectories:
        raise ValueError(
            f"{attempts} attempts need {attempts} trajectory slots but the model has "
            f"{model.max_trajectories} (num_trajectories); use fewer attempts"
        )
    if horizon > model.max_timestep:
        raise ValueError(
            f"episodes of {horizon} steps exceed the model's horizon {model.max_timestep}"
        )
    return Actor(model, mesh, max_steps=attempts * horizon, greedy=greedy)
