"""Context sampler: turns a `Trajectories` store into fixed-shape token-step batches (host numpy).

Three modes, one output format (dimension letters: B batch, T steps in the context, S obs dim,
A action dim):

* ``"at"`` — Agentic Transformer / chain of hindsight (Liu & Abbeel 2023): n whole trajectories of
  one task, sorted by ascending return; every step's target return is relabelled to the best return
  among the n; a completion flag marks the last step of each trajectory that really ended.
* ``"ad"`` — Algorithm Distillation (Laskin et al. 2022): n *consecutive* episodes of one task's
  learning history, in learning order. Returns are not conditioned on (target returns are 0).
* ``"dt"`` — Decision Transformer (Chen et al. 2021): one K-step window of one trajectory, target =
  return-to-go (undiscounted sum of the remaining rewards of the episode).

In "at"/"ad" each trajectory occupies a fixed slot of ``horizon`` steps (truncated to its first
``horizon`` steps, padded after its end with ``mask = False``), so ``T = n * horizon`` and
trajectory j always starts at step ``j * horizon``; the model sees ``T * tokens_per_step`` tokens.

Sampling is deterministic given the seed; ``state_dict()`` / ``load_state_dict()`` save and restore
the generator so a resumed run draws the same batches as an uninterrupted one.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np

MODES = ("at", "ad", "dt")


class ContextSampler:
    """Draws context batches from a `Trajectories` store.

    Args:
      trajectories: an `envs.trajectories.Trajectories` (any object with its fields: observations,
        actions, rewards, terminals, timeouts, episode_starts, task_id).
      mode: "at", "ad" or "dt" (see the module docstring).
      num_trajectories: n, trajectories per context ("at"/"ad"; must be 1 for "dt").
      horizon: steps reserved per trajectory ("at"/"ad"); longer episodes are truncated. For "dt"
        it is ignored (defaults to `context_steps`).
      context_steps: T, steps per sample. "dt": the window K (required). "at"/"ad": must be
        `num_trajectories * horizon` or None.
      seed: seed of the numpy generator.

    Raises:
      ValueError: unknown mode, inconsistent sizes, or too few episodes for the mode.
    """

    def __init__(
        self,
        trajectories: Any,
        *,
        mode: str = "at",
        num_trajectories: int = 1,
        horizon: int | None = None,
        context_steps: int | None = None,
        seed: int = 0,
    ):
        if mode not in MODES:
            raise ValueError(f"sampler mode {mode!r} is unknown; use one of {MODES}")
        if num_trajectories < 1:
            raise ValueError(f"num_trajectories must be >= 1, got {num_trajectories}")
        self.trajectories = trajectories
        self.mode = mode
        self.num_trajectories = int(num_trajectories)
        starts = np.asarray(trajectories.episode_starts, dtype=np.int64)
        if starts.ndim != 1 or len(starts) < 2:
            raise ValueError("trajectories hold no episodes (episode_starts needs >= 2 entries)")
        self._starts = starts
        self._lengths = np.diff(starts)
        if np.any(self._lengths <= 0):
            raise ValueError("trajectories contain an empty episode; drop it before sampling")
        num_episodes = len(self._lengths)
        rewards = np.asarray(trajectories.rewards, dtype=np.float32)
        self._rewards = rewards
        # Prefix sums give any episode-prefix return in O(1).
        self._cum = np.concatenate([[0.0], np.cumsum(rewards, dtype=np.float64)])
        actions = np.asarray(trajectories.actions)
        self.discrete = actions.ndim == 1
        self._actions = actions.astype(np.int32) if self.discrete else actions.astype(np.float32)
        self._obs = np.asarray(trajectories.observations, dtype=np.float32)
        if mode == "dt":
            if context_steps is None:
                raise ValueError("mode 'dt' needs context_steps (the K-step window)")
            if num_trajectories != 1:
                raise ValueError("mode 'dt' packs one trajectory window; set num_trajectories=1")
            self.horizon = int(context_steps)
            self.context_steps = int(context_steps)
            # DT samples windows in proportion to episode length (as in the reference code).
            self._dt_p = self._lengths / self._lengths.sum()
        else:
            if horizon is None:
                horizon = int(self._lengths.max())
            self.horizon = int(horizon)
            steps = self.num_trajectories * self.horizon
            if context_steps is not None and int(context_steps) != steps:
                raise ValueError(
                    f"mode {mode!r}: context_steps={context_steps} must equal num_trajectories * "
                    f"horizon = {steps} (or be None)"
                )
            self.context_steps = steps
        if self.horizon < 1:
            raise ValueError(f"horizon must be >= 1, got {self.horizon}")
        # Group episodes by task (learning order preserved); no task ids -> one group.
        task_id = getattr(trajectories, "task_id", None)
        if task_id is None:
            groups = [np.arange(num_episodes)]
        else:
            task_id = np.asarray(task_id)
            if task_id.shape != (num_episodes,):
                raise ValueError(f"task_id has shape {task_id.shape}, expected ({num_episodes},)")
            groups = [np.flatnonzero(task_id == t) for t in np.unique(task_id)]
        if mode == "ad":
            groups = [g for g in groups if len(g) >= self.num_trajectories]
            if not groups:
                raise ValueError(
                    f"mode 'ad' needs a task with >= num_trajectories={self.num_trajectories} "
                    "episodes; lower num_trajectories"
                )
        self._groups = groups
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
        """Draws one batch.

        Returns:
          dict of numpy arrays, all [B, T, ...]: observations [B,T,S] f32; actions [B,T,A] f32 or
          [B,T] int32; rewards f32; target_returns f32; timesteps int32 (step within its
          trajectory); traj_index int32 (slot of the trajectory in the context); done f32 (1 on the
          last step of a trajectory that ended); mask bool (real step, carries an action target).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        b, t = int(batch_size), self.context_steps
        out = {
            "observations": np.zeros((b, t, self.obs_dim), np.float32),
            "actions": np.zeros((b, t) + self._actions.shape[1:], self._actions.dtype),
            "rewards": np.zeros((b, t), np.float32),
            "target_returns": np.zeros((b, t), np.float32),
            "timesteps": np.zeros((b, t), np.int32),
            "traj_index": np.zeros((b, t), np.int32),
            "done": np.zeros((b, t), np.float32),
            "mask": np.zeros((b, t), bool),
        }
        for i in range(b):
            if self.mode == "dt":
                self._fill_dt(out, i)
            else:
                self._fill_context(out, i)
        self._num_batches += 1
        return out

    def _episode_return(self, e: int, length: int) -> float:
        s = self._starts[e]
        return float(self._cum[s + length] - self._cum[s])

    def _fill_context(self, out: dict[str, np.ndarray], i: int) -> None:
        n, h = self.num_trajectories, self.horizon
        group = self._groups[self._rng.integers(len(self._groups))]
        if self.mode == "ad":
            first = self._rng.integers(len(group) - n + 1)
            episodes = group[first : first + n]
        else:
            episodes = self._rng.choice(group, size=n, replace=len(group) < n)
        used = np.minimum(self._lengths[episodes], h)
        returns = np.array([self._episode_return(e, ln) for e, ln in zip(episodes, used)])
        if self.mode == "at":
            # Chain of hindsight: ascending return, all targets relabelled to the best of the n.
            order = np.argsort(returns, kind="stable")
            episodes, used = episodes[order], used[order]
            target = float(returns.max())
        else:
            target = 0.0
        for j, (e, ln) in enumerate(zip(episodes, used)):
            s, o = int(self._starts[e]), j * h
            self._copy(out, i, o, s, int(ln))
            out["target_returns"][i, o : o + ln] = target
            out["traj_index"][i, o : o + h] = j
            # Completion flag: the episode really ended within the slot (not cut by the horizon).
            if ln == self._lengths[e]:
                out["done"][i, o + ln - 1] = 1.0

    def _fill_dt(self, out: dict[str, np.ndarray], i: int) -> None:
        k = self.context_steps
        e = int(self._rng.choice(len(self._lengths), p=self._dt_p))
        length = int(self._lengths[e])
        offset = int(self._rng.integers(length))
        ln = min(k, length - offset)
        s = int(self._starts[e]) + offset
        self._copy(out, i, 0, s, ln, first_timestep=offset)
        episode_end = int(self._starts[e]) + length
        rtg = self._cum[episode_end] - self._cum[s : s + ln]
        out["target_returns"][i, :ln] = rtg.astype(np.float32)
        if offset + ln == length:
            out["done"][i, ln - 1] = 1.0

    def _copy(
        self, out: dict[str, np.ndarray], i: int, o: int, s: int, ln: int, first_timestep: int = 0
    ) -> None:
        out["observations"][i, o : o + ln] = self._obs[s : s + ln]
        out["actions"][i, o : o + ln] = self._actions[s : s + ln]
        out["rewards"][i, o : o + ln] = self._rewards[s : s + ln]
        out["timesteps"][i, o : o + ln] = np.arange(first_timestep, first_timestep + ln)
        out["mask"][i, o : o + ln] = True
