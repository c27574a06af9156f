"""Context sampler: turns a `Trajectories` store into fixed-shape batches (host numpy).

Dimension letters: B batch, T steps in the context, S obs dim, A action dim.

`ContextSampler` is the one mechanism every agent shares: the episode arrays, prefix sums of the
rewards, the grouping of episodes by task, a seeded generator whose state checkpoints save, and
`sample`, which lays out an empty batch of the schema (agents.batch) and asks the agent's
subclass to `fill` each row. What goes into a row is the agent's rule and lives in its module:

* agents.at.SlotSampler: n whole trajectories of one task, sorted by ascending return, targets
  relabelled to the best of the n (Agentic Transformer, chain of hindsight);
* agents.ad.HistorySampler: n consecutive episodes of one task's learning history (Algorithm
  Distillation);
* agents.dt.WindowSampler: one K-step window of one trajectory with return-to-go targets
  (Decision Transformer).

Sampling is deterministic given the seed; `state_dict()` / `load_state_dict()` save and restore
the generator so a resumed run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

from ringrl.agents.batch import link_previous, zeros


class ContextSampler:
    """Draws context batches of `context_steps` steps from a `Trajectories` store.

    Subclasses set `self.context_steps` and `self.horizon` and implement `fill`.

    Args:
      trajectories: an `envs.trajectories.Trajectories` (any object with its fields: observations,
        actions, rewards, episode_starts, task_id).
      seed: seed of the numpy generator.

    Raises:
      ValueError: no episodes, an empty episode, or task ids of the wrong shape.
    """

    context_steps: int
    horizon: int

    def __init__(self, trajectories: Any, *, seed: int = 0):
        self.trajectories = trajectories
        starts = np.asarray(trajectories.episode_starts, dtype=np.int64)
        if starts.ndim != 1 or len(starts) < 2:
            raise ValueError("trajectories hold no episodes (episode_starts needs >= 2 entries)")
        self._starts = starts
        self._lengths = np.diff(starts)
        if np.any(self._lengths <= 0):
            raise ValueError("trajectories contain an empty episode; drop it before sampling")
        num_episodes = len(self._lengths)
        self._rewards = np.asarray(trajectories.rewards, dtype=np.float32)
        # Prefix sums give any episode-prefix return in O(1).
        self._cum = np.concatenate([[0.0], np.cumsum(self._rewards, dtype=np.float64)])
        actions = np.asarray(trajectories.actions)
        self.discrete = actions.ndim == 1
        self._actions = actions.astype(np.int32) if self.discrete else actions.astype(np.float32)
        self._obs = np.asarray(trajectories.observations, dtype=np.float32)
        self._terminals = np.asarray(trajectories.terminals, dtype=bool)
        self._timeouts = np.asarray(trajectories.timeouts, dtype=bool)
        # Group episodes by task (learning order preserved); no task ids -> one group.
        task_id = getattr(trajectories, "task_id", None)
        if task_id is None:
            self._groups = [np.arange(num_episodes)]
        else:
            task_id = np.asarray(task_id)
            if task_id.shape != (num_episodes,):
                raise ValueError(f"task_id has shape {task_id.shape}, expected ({num_episodes},)")
            self._groups = [np.flatnonzero(task_id == t) for t in np.unique(task_id)]
        self._rng = np.random.Generator(np.random.PCG64(seed))
        self._num_batches = 0

    @property
    def obs_dim(self) -> int:
        return int(self._obs.shape[1])

    @property
    def action_dim(self) -> int:
        """Number of discrete actions (max action + 1), or the continuous action size."""
        if self.discrete:
            return int(self._actions.max()) + 1
        return int(self._actions.shape[1])

    def state_dict(self) -> dict[str, Any]:
        """Generator state and batch count (JSON-serialisable) for resumable sampling."""
        return {
            "bit_generator": copy.deepcopy(self._rng.bit_generator.state),
            "num_batches": self._num_batches,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores a `state_dict()`; the next `sample` draws what the saved sampler would have."""
        bit_state = copy.deepcopy(dict(state["bit_generator"]))
        # Checkpoint round trips may turn the nested ints into numpy scalars or strings.
        inner = bit_state.get("state", {})
        bit_state["state"] = {k: int(v) for k, v in dict(inner).items()}
        if "has_uint32" in bit_state:
            bit_state["has_uint32"] = int(bit_state["has_uint32"])
            bit_state["uinteger"] = int(bit_state["uinteger"])
        self._rng.bit_generator.state = bit_state
        self._num_batches = int(state["num_batches"])

    def sample(self, batch_size: int) -> dict[str, np.ndarray]:
        """Draws one batch: every array of agents.batch.FIELDS, [B, T, ...] with T = context_steps.

        Rows are filled by the agent's `fill`; steps it leaves alone stay padding (mask False).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        out = zeros(
            int(batch_size),
            self.context_steps,
            self.obs_dim,
            action_dim=self._actions.shape[1] if not self.discrete else 0,
            discrete=self.discrete,
        )
        for i in range(int(batch_size)):
            self.fill(out, i)
        link_previous(out)
        self._num_batches += 1
        return out

    def fill(self, out: dict[str, np.ndarray], i: int) -> None:
        """Writes row i of the batch `out` (the agent's packing rule)."""
        raise NotImplementedError(f"{type(self).__name__} must implement fill")

    def episode_return(self, e: int, length: int) -> float:
        """Return of the first `length` steps of episode e."""
        s = self._starts[e]
        return float(self._cum[s + length] - self._cum[s])

    def copy_steps(
        self, out: dict[str, np.ndarray], i: int, o: int, s: int, ln: int, first_timestep: int = 0
    ) -> None:
        """Copies `ln` dataset steps from flat index s into row i at step o (mask True)."""
        out["observations"][i, o : o + ln] = self._obs[s : s + ln]
        out["actions"][i, o : o + ln] = self._actions[s : s + ln]
        out["rewards"][i, o : o + ln] = self._rewards[s : s + ln]
        out["timesteps"][i, o : o + ln] = np.arange(first_timestep, first_timestep + ln)
        out["mask"][i, o : o + ln] = True
        out["terminated"][i, o : o + ln] = self._terminals[s : s + ln]
        out["truncated"][i, o : o + ln] = self._timeouts[s : s + ln]

    def obs_stats(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean, std) [S] of the training observations; std floored at 1e-6 (constant features).

        The model normalises states with them (agents.tokens.ObsNorm); the checkpoint keeps them.
        """
        return self._obs.mean(axis=0), np.maximum(self._obs.std(axis=0), 1e-6)
