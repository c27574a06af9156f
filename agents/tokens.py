"""Token embedding: per-step features -> interleaved token sequence.

Dimension letters: B batch, T steps, k tokens per step, W embedding width, S obs dim, A action dim.

A step contributes `k` tokens in a fixed order, e.g. ("return", "state", "action", "reward") for
the Agentic Transformer (agents.at.TOKENS) and ("return", "state", "action") for the Decision
Transformer (agents.dt.TOKENS). The features are the arrays of agents.batch. Token j of
step t sits at position `t * k + j`. Every token gets its type's embedding of its own feature plus
the embeddings of the step's timestep-within-trajectory and trajectory index (its slot in the
context), so no absolute-position embedding is needed and sequences can be sharded anywhere
between steps.

The action is predicted from the output of the "state" token (it has seen target return and state
of its step and everything before, but not the action itself).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

TOKEN_TYPES = ("return", "state", "action", "reward")  # an agent's tokens: agents.at/dt.TOKENS


def check_tokens(tokens: tuple[str, ...]) -> None:
    """Raises ValueError unless `tokens` is an ordered subset with state before action."""
    if any(t not in TOKEN_TYPES for t in tokens) or len(set(tokens)) != len(tokens):
        raise ValueError(f"tokens {tokens} must be distinct names from {TOKEN_TYPES}")
    if "state" not in tokens or "action" not in tokens:
        raise ValueError(f"tokens {tokens} need 'state' and 'action'")
    if tokens.index("state") > tokens.index("action"):
        raise ValueError(f"tokens {tokens}: 'state' must come before 'action'")


class TokenEmbed(nn.Module):
    """Embeddings of each token type, timestep and trajectory index.

    Attributes:
      embed_dim: W.
      action_dim: number of discrete actions, or the continuous action size.
      discrete: discrete (int) actions use a lookup table, continuous ones a linear map.
      max_timestep: size of the timestep table; larger timesteps are clipped to the last row.
      max_trajectories: size of the trajectory-index table; larger indices are clipped.
      return_scale: target returns and rewards are multiplied by it before embedding.
    """

    embed_dim: int
    action_dim: int
    discrete: bool
    max_timestep: int
    max_trajectories: int
    return_scale: float = 1.0

    def setup(self):
        init = nn.initializers.normal(0.02)
        self.return_in = nn.Dense(self.embed_dim, name="return_in")
        self.state_in = nn.Dense(self.embed_dim, name="state_in")
        if self.discrete:
            self.action_in = nn.Embed(self.action_dim, self.embed_dim, embedding_init=init)
        else:
            self.action_in = nn.Dense(self.embed_dim, name="action_in")
        self.reward_in = nn.Dense(self.embed_dim, name="reward_in")  # (reward, done flag)
        self.time_in = nn.Embed(self.max_timestep, self.embed_dim, embedding_init=init)
        self.traj_in = nn.Embed(self.max_trajectories, self.embed_dim, embedding_init=init)

    def token(self, kind: str, features: dict[str, jax.Array]) -> jax.Array:
        """Embeds one token type for every step: [..., W] (without time / trajectory terms)."""
        if kind == "return":
            return self.return_in(features["target_returns"][..., None] * self.return_scale)
        if kind == "state":
            return self.state_in(features["observations"])
        if kind == "action":
            a = features["actions"]
            return self.action_in(a.astype(jnp.int32)) if self.discrete else self.action_in(a)
        if kind == "reward":
            r = features["rewards"] * self.return_scale
            x = jnp.stack([r, features["done"].astype(r.dtype)], axis=-1)
            return self.reward_in(x)
        raise ValueError(f"unknown token type {kind!r}")

    def position(self, timesteps: jax.Array, traj_index: jax.Array) -> jax.Array:
        """Timestep + trajectory-index embedding [..., W] of each step."""
        t = jnp.clip(timesteps, 0, self.max_timestep - 1)
        j = jnp.clip(traj_index, 0, self.max_trajectories - 1)
        return self.time_in(t) + self.traj_in(j)

    def __call__(self, batch: dict[str, jax.Array], tokens: tuple[str, ...]) -> jax.Array:
        """Interleaves the tokens of every step: [B, T, ...] features -> [B, T * k, W]."""
        pos = self.position(batch["timesteps"], batch["traj_index"])
        x = jnp.stack([self.token(kind, batch) + pos for kind in tokens], axis=2)  # [B, T, k, W]
        b, t, k, w = x.shape
        return x.reshape(b, t * k, w)
