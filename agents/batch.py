"""The batch schema: the per-step arrays every agent trains and acts on, defined once.

Dimension letters: B batch, T steps in the context, S obs dim, A action dim.

Samplers fill these arrays (host numpy), the token embedding reads them, the backbone checks
them, the train step shards them P(DATA, SEQ) and the cached actor feeds the same features one
step at a time.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# name -> dtype; all [B, T] except observations [B, T, S] and continuous actions [B, T, A].
FIELDS: dict[str, Any] = {
    "observations": np.float32,
    "actions": None,  # int32 action indices (discrete) or float32 action vectors
    "rewards": np.float32,  # reward of the step
    "target_returns": np.float32,  # target-return token (relabelled best, return-to-go or 0)
    "timesteps": np.int32,  # step within its trajectory
    "traj_index": np.int32,  # slot of the trajectory in the context
    "terminated": np.float32,  # 1 on the last step of an episode that really ended (env terminal)
    "truncated": np.float32,  # 1 on the last step of an episode cut short (time limit or slot)
    "mask": np.bool_,  # real step (carries an action target); False = padding
    # The previous real step of the context (one-token timesteps embed them with s_t); zero where
    # has_prev is False (the first step of a context).
    "prev_actions": None,  # dtype of "actions"
    "prev_rewards": np.float32,
    "prev_terminated": np.float32,
    "prev_truncated": np.float32,
    "has_prev": np.bool_,
}
PREV = {  # per-step field -> the same field of the previous real step
    "actions": "prev_actions",
    "rewards": "prev_rewards",
    "terminated": "prev_terminated",
    "truncated": "prev_truncated",
}
KEYS = tuple(FIELDS)


def zeros(
    batch_size: int,
    steps: int,
    obs_dim: int,
    *,
    action_dim: int,
    discrete: bool,
    xp: Any = np,
) -> dict[str, Any]:
    """An all-zero batch (mask False) of the schema: every array [B, T, ...].

    Args:
      batch_size: B.
      steps: T.
      obs_dim: S.
      action_dim: A (ignored for discrete actions, which are [B, T] int32).
      discrete: int32 action indices (True) or float32 action vectors (False).
      xp: the array module, `numpy` (samplers) or `jax.numpy` (shape-only dummies).
    """
    out = {}
    for name, dtype in FIELDS.items():
        shape: tuple[int, ...] = (batch_size, steps)
        if name == "observations":
            shape += (obs_dim,)
        elif name in ("actions", "prev_actions"):
            dtype = np.int32 if discrete else np.float32
            shape += () if discrete else (action_dim,)
        out[name] = xp.zeros(shape, dtype)
    return out


def missing(batch: dict[str, Any]) -> list[str]:
    """Names of the schema's arrays that `batch` lacks."""
    return [k for k in KEYS if k not in batch]


def link_previous(batch: dict[str, np.ndarray]) -> None:
    """Fills the `prev_*` arrays and `has_prev` of a host batch in place from its real steps.

    The previous step of a real step is the last real step before it in the same row (padding is
    skipped, episode and slot boundaries are not), which is what the cached actor carries from
    one `act` call to the next.
    """
    for i in range(batch["mask"].shape[0]):
        real = np.flatnonzero(batch["mask"][i])
        cur, prev = real[1:], real[:-1]
        for name, prev_name in PREV.items():
            batch[prev_name][i] = 0
            batch[prev_name][i, cur] = batch[name][i, prev]
        batch["has_prev"][i] = False
        batch["has_prev"][i, cur] = True
