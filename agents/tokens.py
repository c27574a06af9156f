"""Token embedding: per-step features -> interleaved token sequence.

Dimension letters: B batch, T steps, k tokens per step, W embedding width, S obs dim, A action dim.

A step contributes `k` tokens in a fixed order, e.g. ("return", "state", "action", "reward") for
the Agentic Transformer with four tokens per step (agents.at.TOKENS[4]), ("step",) for one token
per step (agents.at.TOKENS[1]: s_t, a_{t-1}, r_{t-1} and the flags of step t-1 and the target
summed into one vector, AMAGO / AD style) and ("return", "state", "action") for the Decision
Transformer (agents.dt.TOKENS). The features are the arrays of agents.batch. Token j of
step t sits at position `t * k + j`. Every token gets its type's embedding of its own feature plus
the embedding of the step's timestep-within-trajectory and, if `slot_embedding`, of its trajectory
index (its slot in the context), so no absolute-position embedding is needed and sequences can be
sharded anywhere between steps.

Scales: states are normalised by the training data's mean and std (`ObsNorm`, parameters that the
optimizer never changes and the checkpoint keeps), rewards are multiplied by `reward_scale` and
target returns by `return_scale`; each should bring its feature near 1.

The action is predicted from the output of the "state" (or "step") token: it has seen the target
return and state of its step and everything before, but not the action itself.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

TOKEN_TYPES = ("return", "state", "action", "reward", "step")  # agents.at/dt.TOKENS use them


def check_tokens(tokens: tuple[str, ...]) -> None:
    """Raises ValueError unless `tokens` is ("step",) or an ordered subset with state before
    action."""
    if tuple(tokens) == ("step",):
        return
    if any(t not in TOKEN_TYPES[:4] for t in tokens) or len(set(tokens)) != len(tokens):
        raise ValueError(f"tokens {tokens} must be ('step',) or distinct names from {TOKEN_TYPES}")
    if "state" not in tokens or "action" not in tokens:
        raise ValueError(f"tokens {tokens} need 'state' and 'action'")
    if tokens.index("state") > tokens.index("action"):
        raise ValueError(f"tokens {tokens}: 'state' must come before 'action'")


class ObsNorm(nn.Module):
    """(s - mean) / std with the training data's statistics, held as parameters.

    They are set once from the data (agents.agent.Agent.init_state) and sit behind a stop-gradient,
    so their gradient is zero and AdamW (no decay on vectors) leaves them exactly as set; being
    parameters, every checkpoint carries them to evaluation.
    """

    @nn.compact
    def __call__(self, obs: jax.Array) -> jax.Array:
        mean = self.param("mean", nn.initializers.zeros, (obs.shape[-1],))
        std = self.param("std", nn.initializers.ones, (obs.shape[-1],))
        return (obs - jax.lax.stop_gradient(mean)) / jax.lax.stop_gradient(std)


class TokenEmbed(nn.Module):
    """Embeddings of each token type, timestep and trajectory index.

    Attributes:
      embed_dim: W.
      action_dim: number of discrete actions, or the continuous action size.
      discrete: discrete (int) actions use a lookup table, continuous ones a linear map.
      max_timestep: size of the timestep table; larger timesteps are clipped to the last row.
      max_trajectories: size of the trajectory-index table; larger indices are clipped.
      return_scale: target returns are multiplied by it before embedding.
      reward_scale: rewards are multiplied by it before embedding.
      slot_embedding: add an embedding of the trajectory index (slot) of each step.
      embed_norm: LayerNorm over W of every token embedding, position terms included (GPT-2
        Decision Transformer's `embed_ln`); off by default.
    """

    embed_dim: int
    action_dim: int
    discrete: bool
    max_timestep: int
    max_trajectories: int
    return_scale: float = 1.0
    reward_scale: float = 1.0
    slot_embedding: bool = True
    embed_norm: bool = False

    def setup(self):
        init = nn.initializers.normal(0.02)
        if self.embed_norm:
            self.embed_ln = nn.LayerNorm(name="embed_ln")
        self.obs_norm = ObsNorm(name="obs_norm")
        self.return_in = nn.Dense(self.embed_dim, name="return_in")
        self.state_in = nn.Dense(self.embed_dim, name="state_in")
        if self.discrete:
            # One extra row: "no previous action" (the first step of a one-token context).
            self.action_in = nn.Embed(self.action_dim + 1, self.embed_dim, embedding_init=init)
        else:
            self.action_in = nn.Dense(self.embed_dim, name="action_in")
        # (reward, terminated, truncated [, has_prev]) of a step.
        self.reward_in = nn.Dense(self.embed_dim, name="reward_in")
        self.time_in = nn.Embed(self.max_timestep, self.embed_dim, embedding_init=init)
        if self.slot_embedding:
            self.traj_in = nn.Embed(self.max_trajectories, self.embed_dim, embedding_init=init)

    def _action(self, a: jax.Array, present: jax.Array | None = None) -> jax.Array:
        if self.discrete:
            a = a.astype(jnp.int32)
            return self.action_in(a if present is None else jnp.where(present, a, self.action_dim))
        return self.action_in(a if present is None else a * present[..., None])

    def _outcome(self, r: jax.Array, term: jax.Array, trunc: jax.Array, *extra) -> jax.Array:
        r = r * self.reward_scale
        return self.reward_in(
            jnp.stack([r, term.astype(r.dtype), trunc.astype(r.dtype), *extra], -1)
        )

    def token(self, kind: str, features: dict[str, jax.Array]) -> jax.Array:
        """Embeds one token type for every step: [..., W] (without time / trajectory terms)."""
        if kind == "return":
            return self.return_in(features["target_returns"][..., None] * self.return_scale)
        if kind == "state":
            return self.state_in(self.obs_norm(features["observations"]))
        if kind == "action":
            return self._action(features["actions"])
        if kind == "reward":
            f = features
            return self._outcome(f["rewards"], f["terminated"], f["truncated"])
        if kind == "step":  # s_t, a_{t-1}, (r_{t-1}, flags_{t-1}, has_prev) and the target
            f = features
            present = f["has_prev"]
            outcome = self._outcome(
                f["prev_rewards"],
                f["prev_terminated"],
                f["prev_truncated"],
                present.astype(jnp.float32),
            )
            return (
                self.token("state", f)
                + self.token("return", f)
                + self._action(f["prev_actions"], present)
                + outcome
            )
        raise ValueError(f"unknown token type {kind!r}")

    def position(self, timesteps: jax.Array, traj_index: jax.Array) -> jax.Array:
        """Timestep (+ trajectory-index, if `slot_embedding`) embedding [..., W] of each step."""
        t = jnp.clip(timesteps, 0, self.max_timestep - 1)
        pos = self.time_in(t)
        if self.slot_embedding:
            j = jnp.clip(traj_index, 0, self.max_trajectories - 1)
            pos = pos + self.traj_in(j)
        return pos

    def normalize(self, x: jax.Array) -> jax.Array:
        """The embedding LayerNorm of tokens x [..., W] (token + position), if `embed_norm`.

        Anything that builds tokens itself from `token` and `position` (the cached actor) applies
        it too, so it sees what training saw."""
        return self.embed_ln(x) if self.embed_norm else x

    def __call__(self, batch: dict[str, jax.Array], tokens: tuple[str, ...]) -> jax.Array:
        """Interleaves the tokens of every step: [B, T, ...] features -> [B, T * k, W]."""
        pos = self.position(batch["timesteps"], batch["traj_index"])
        x = jnp.stack([self.token(kind, batch) + pos for kind in tokens], axis=2)  # [B, T, k, W]
        b, t, k, w = x.shape
        return self.normalize(x.reshape(b, t * k, w))
