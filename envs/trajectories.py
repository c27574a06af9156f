"""Flat trajectory store shared by every loader, generator and sampler.

Dimension letters: N steps, E episodes, S observation dim, A action dim.

All episodes are stored back to back in flat arrays; ``episode_starts`` holds the E+1 offsets, so
episode ``e`` is rows ``episode_starts[e]:episode_starts[e + 1]``. A row is one step: the
observation the agent saw, the action it took, the reward it got, and whether the episode ended
there by termination (``terminals``) or by a time limit (``timeouts``). An episode that ends with
neither flag set was cut short for another reason (e.g. the trailing partial episode of a D4RL
file); it is treated like a truncation everywhere.

On disk the store uses the D4RL HDF5 schema (see :meth:`Trajectories.save`), so files written here
are readable by D4RL-style tools, and :func:`~ringrl.envs.datasets.load_d4rl`
reads them back exactly.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from collections.abc import Mapping, Sequence
from typing import Any

import h5py
import numpy as np

# Rows per chunk when scanning big arrays for NaN/inf: keeps the temporary boolean mask small
# instead of allocating one as large as the array (matters for 2M-step datasets).
_SCAN_ROWS = 65536


def check_finite(name: str, array: np.ndarray) -> None:
    """Raises ValueError naming the first non-finite row of ``array`` (scanned in chunks).

    Args:
        name: key name used in the message (e.g. "observations").
        array: [N, ...] floating array; integer arrays are always finite and skipped.
    """
    if not np.issubdtype(array.dtype, np.floating):
        return
    for lo in range(0, len(array), _SCAN_ROWS):
        chunk = array[lo : lo + _SCAN_ROWS]
        bad = ~np.isfinite(chunk)
        if bad.any():
            row = lo + int(np.argmax(bad.reshape(len(chunk), -1).any(axis=1)))
            raise ValueError(
                f"'{name}' contains NaN or inf (first at row {row}); fix: remove or repair the "
                "affected steps before loading"
            )


@dataclasses.dataclass
class Trajectories:
    """Episodes stored as flat numpy arrays plus episode offsets.

    Attributes:
        observations: [N, S] float32.
        actions: [N, A] float32 (continuous) or [N] int64 (discrete).
        rewards: [N] float32.
        terminals: [N] bool, True on the last step of an episode that terminated (no bootstrap).
        timeouts: [N] bool, True on the last step of an episode stopped by a time limit.
        episode_starts: [E+1] int64 offsets, starting at 0 and ending at N, strictly increasing.
        task_id: [E] int64 task of each episode, or None for single-task data.
        metadata: free-form dict (env_id, ref_min_score, ref_max_score, source, ...); values must
            be str, bool, int, float, numpy arrays, or JSON-serialisable lists/dicts/None.
        next_observations: optional [N, S] float32 observation after each step (D4RL files carry
            it; ``load_d4rl`` reads it only on request). None when not known.

    Invariants (checked on construction, ValueError otherwise): equal lengths; at least one step;
    a terminal or timeout flag only on the last row of an episode; never both on one row; finite
    observations and rewards. Inputs are converted to the dtypes above (no copy when they match).
    """

    observations: np.ndarray
    actions: np.ndarray
    rewards: np.ndarray
    terminals: np.ndarray
    timeouts: np.ndarray
    episode_starts: np.ndarray
    task_id: np.ndarray | None = None
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)
    next_observations: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.observations = np.asarray(self.observations, dtype=np.float32)
        if self.observations.ndim == 1:
            self.observations = self.observations[:, None]
        actions = np.asarray(self.actions)
        if np.issubdtype(actions.dtype, np.integer) or actions.dtype == bool:
            if actions.ndim == 2 and actions.shape[1] == 1:
                actions = actions[:, 0]
            self.actions = actions.astype(np.int64, copy=False)
        else:
            if actions.ndim == 1:
                actions = actions[:, None]
            self.actions = actions.astype(np.float32, copy=False)
        self.rewards = _flat(self.rewards, np.float32, "rewards")
        self.terminals = _flat(self.terminals, bool, "terminals")
        self.timeouts = _flat(self.timeouts, bool, "timeouts")
        self.episode_starts = _flat(self.episode_starts, np.int64, "episode_starts")
        if self.task_id is not None:
            self.task_id = _flat(self.task_id, np.int64, "task_id")
        if self.next_observations is not None:
            self.next_observations = np.asarray(self.next_observations, dtype=np.float32)
            if self.next_observations.ndim == 1:
                self.next_observations = self.next_observations[:, None]
        self.metadata = dict(self.metadata)
        self._validate()

    def _validate(self) -> None:
        n = len(self.observations)
        if n == 0:
            raise ValueError("dataset is empty (0 steps); fix: provide at least one step")
        if self.observations.ndim != 2:
            raise ValueError(
                f"'observations' must be [N, S], got shape {self.observations.shape}; fix: "
                "flatten each observation to a vector"
            )
        if self.actions.ndim != (1 if self.discrete_actions else 2):
            raise ValueError(
                f"'actions' must be [N, A] float or [N] int, got shape {self.actions.shape} "
                f"dtype {self.actions.dtype}; fix: flatten each action to a vector"
            )
        lengths = {
            "observations": n,
            "actions": len(self.actions),
            "rewards": len(self.rewards),
            "terminals": len(self.terminals),
            "timeouts": len(self.timeouts),
        }
        if self.next_observations is not None:
            lengths["next_observations"] = len(self.next_observations)
            if self.next_observations.shape[1:] != self.observations.shape[1:]:
                raise ValueError(
                    f"'next_observations' has shape {self.next_observations.shape} but "
                    f"'observations' has {self.observations.shape}; fix: store one successor "
                    "observation per step"
                )
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"per-step arrays have unequal lengths {lengths}; fix: every per-step key must "
                "have one row per step"
            )
        starts = self.episode_starts
        if (
            starts.ndim != 1
            or len(starts) < 2
            or starts[0] != 0
            or starts[-1] != n
            or np.any(np.diff(starts) <= 0)
        ):
            raise ValueError(
                f"'episode_starts' must be strictly increasing offsets from 0 to N={n} "
                f"(got {starts[:5]}...{starts[-3:]}, {len(starts)} entries); fix: use E+1 "
                "offsets of non-empty episodes"
            )
        both = self.terminals & self.timeouts
        if both.any():
            raise ValueError(
                f"row {int(np.argmax(both))} is both terminal and timeout; fix: a terminated "
                "step is terminal only (set its timeout to False)"
            )
        flagged = np.flatnonzero(self.terminals | self.timeouts)
        ends = starts[1:] - 1
        inner = flagged[~np.isin(flagged, ends)]
        if len(inner):
            raise ValueError(
                f"row {int(inner[0])} is terminal/timeout but is not the last step of its "
                "episode; fix: split episodes at every terminal|timeout row"
            )
        if self.task_id is not None and self.task_id.shape != (len(starts) - 1,):
            raise ValueError(
                f"'task_id' must have one entry per episode ({len(starts) - 1}), got shape "
                f"{self.task_id.shape}; fix: give one task id per episode"
            )
        check_finite("observations", self.observations)
        check_finite("rewards", self.rewards)
        if self.next_observations is not None:
            check_finite("next_observations", self.next_observations)
        if not self.discrete_actions:
            check_finite("actions", self.actions)

    # ---------------------------------------------------------------- derived quantities
    @property
    def discrete_actions(self) -> bool:
        """True when actions are integer indices ([N] int64)."""
        return self.actions.dtype == np.int64

    @property
    def num_steps(self) -> int:
        """Total number of steps N."""
        return len(self.observations)

    @property
    def num_episodes(self) -> int:
        """Number of episodes E."""
        return len(self.episode_starts) - 1

    @property
    def lengths(self) -> np.ndarray:
        """[E] int64 episode lengths."""
        return np.diff(self.episode_starts)

    @property
    def returns(self) -> np.ndarray:
        """[E] float64 undiscounted episode returns (summed in float64 for accuracy)."""
        return np.add.reduceat(self.rewards.astype(np.float64), self.episode_starts[:-1])

    def returns_within(self, steps: int) -> np.ndarray:
        """[E] float64 return of each episode's first `steps` steps (an episode cut at a cap)."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        offset = np.arange(self.num_steps) - np.repeat(self.episode_starts[:-1], self.lengths)
        rewards = np.where(offset < steps, self.rewards.astype(np.float64), 0.0)
        return np.add.reduceat(rewards, self.episode_starts[:-1])

    def __len__(self) -> int:
        return self.num_episodes

    def episode(self, e: int) -> dict[str, Any]:
        """Arrays of one episode (views, not copies).

        Args:
            e: episode index, negative counts from the end.

        Returns:
            dict with observations [T, S], actions, rewards, terminals, timeouts (each T rows),
            next_observations if stored, and task_id (int) if stored.
        """
        num = self.num_episodes
        if not -num <= e < num:
            raise IndexError(f"episode {e} out of range for {num} episodes")
        e %= num
        lo, hi = int(self.episode_starts[e]), int(self.episode_starts[e + 1])
        out: dict[str, Any] = {
            "observations": self.observations[lo:hi],
            "actions": self.actions[lo:hi],
            "rewards": self.rewards[lo:hi],
            "terminals": self.terminals[lo:hi],
            "timeouts": self.timeouts[lo:hi],
        }
        if self.next_observations is not None:
            out["next_observations"] = self.next_observations[lo:hi]
        if self.task_id is not None:
            out["task_id"] = int(self.task_id[e])
        return out

    def select(self, episode_indices: Sequence[int] | np.ndarray) -> Trajectories:
        """New Trajectories holding the given episodes, in the given order (copies the rows).

        Args:
            episode_indices: episode indices (repeats and negative values allowed) or a boolean
                mask of length E.

        Returns:
            Trajectories with the same metadata.
        """
        idx = np.asarray(episode_indices)
        if idx.dtype == bool:
            if idx.shape != (self.num_episodes,):
                raise ValueError(
                    f"boolean mask has shape {idx.shape}, expected ({self.num_episodes},)"
                )
            idx = np.flatnonzero(idx)
        idx = idx.astype(np.int64).reshape(-1)
        if len(idx) == 0:
            raise ValueError("select() got no episodes; fix: pass at least one episode index")
        num = self.num_episodes
        if idx.min() < -num or idx.max() >= num:
            raise IndexError(f"episode indices out of range for {num} episodes")
        idx %= num
        lengths = self.lengths[idx]
        new_starts = np.zeros(len(idx) + 1, np.int64)
        np.cumsum(lengths, out=new_starts[1:])
        # Row index of every selected step, built without a Python loop over episodes.
        rows = np.repeat(self.episode_starts[idx] - new_starts[:-1], lengths) + np.arange(
            new_starts[-1]
        )
        return Trajectories(
            observations=self.observations[rows],
            actions=self.actions[rows],
            rewards=self.rewards[rows],
            terminals=self.terminals[rows],
            timeouts=self.timeouts[rows],
            episode_starts=new_starts,
            task_id=None if self.task_id is None else self.task_id[idx],
            metadata=dict(self.metadata),
            next_observations=None
            if self.next_observations is None
            else self.next_observations[rows],
        )

    def sorted_by_return(self, *, descending: bool = False) -> Trajectories:
        """Episodes reordered by return (stable; ascending by default, as Algorithm Distillation
        and Agentic Transformer order their context).

        Args:
            descending: highest return first instead.

        Returns:
            Trajectories with reordered episodes.
        """
        r = self.returns
        order = np.argsort(-r if descending else r, kind="stable")
        return self.select(order)

    # ---------------------------------------------------------------- construction
    @classmethod
    def concatenate(
        cls, parts: Sequence[Trajectories], metadata: Mapping[str, Any]
    ) -> Trajectories:
        """The episodes of `parts`, one set after the other (D4RL's medium-expert: medium, expert).

        Args:
          parts: sets with the same observation and action shapes; next_observations and task ids
            are kept where every part has them.
          metadata: the result's metadata (the parts' own metadata is not merged).

        Returns:
          Trajectories whose episodes, steps and returns are those of the parts, in order.
        """
        if not parts:
            raise ValueError("concatenate got no datasets; fix: pass at least one")
        shapes = {(p.observations.shape[1:], p.actions.shape[1:], p.actions.dtype) for p in parts}
        if len(shapes) != 1:
            raise ValueError(
                f"cannot concatenate datasets of different (observation, action) shapes {shapes}; "
                "fix: concatenate sets of one environment"
            )
        offsets = np.cumsum([0] + [p.num_steps for p in parts[:-1]])
        starts = np.concatenate(
            [[0]] + [p.episode_starts[1:] + o for p, o in zip(parts, offsets)]
        ).astype(np.int64)

        def cat(key: str) -> np.ndarray | None:
            values = [getattr(p, key) for p in parts]
            return None if any(v is None for v in values) else np.concatenate(values)

        return cls(
            observations=cat("observations"),
            actions=cat("actions"),
            rewards=cat("rewards"),
            terminals=cat("terminals"),
            timeouts=cat("timeouts"),
            episode_starts=starts,
            task_id=cat("task_id"),
            metadata=dict(metadata),
            next_observations=cat("next_observations"),
        )

    @classmethod
    def from_episodes(
        cls,
        episodes: Sequence[Mapping[str, Any]],
        *,
        metadata: Mapping[str, Any] | None = None,
        task_ids: Sequence[int] | np.ndarray | None = None,
    ) -> Trajectories:
        """Builds a store from per-episode dicts (rows are copied once into preallocated arrays).

        Args:
            episodes: each a mapping with ``observations`` [T, S], ``actions`` [T, A] or [T],
                ``rewards`` [T], and optionally ``terminals`` / ``timeouts`` [T] bool (default
                all False; only the last row may be set; if both are set on the last row the
                step counts as terminal), ``next_observations`` [T, S] (all episodes or none)
                and ``task_id`` (int).
            metadata: stored as ``metadata``.
            task_ids: [E] task ids; overrides per-episode ``task_id`` entries.

        Returns:
            Trajectories.
        """
        if len(episodes) == 0:
            raise ValueError("from_episodes got no episodes; fix: pass at least one episode")
        lengths = []
        for i, ep in enumerate(episodes):
            for key in ("observations", "actions", "rewards"):
                if key not in ep:
                    raise ValueError(
                        f"episode {i} has no '{key}' (keys: {sorted(ep)}); fix: every episode "
                        "needs observations, actions and rewards"
                    )
            lengths.append(len(ep["rewards"]))
        starts = np.zeros(len(episodes) + 1, np.int64)
        np.cumsum(lengths, out=starts[1:])
        n = int(starts[-1])
        first = episodes[0]
        obs0 = np.asarray(first["observations"])
        act0 = np.asarray(first["actions"])
        discrete = np.issubdtype(act0.dtype, np.integer)
        obs_dim = obs0.shape[1:] if obs0.ndim > 1 else (1,)
        act_shape = () if discrete else (act0.shape[1:] if act0.ndim > 1 else (1,))
        has_next = "next_observations" in first
        obs = np.empty((n, *obs_dim), np.float32)
        nxt = np.empty((n, *obs_dim), np.float32) if has_next else None
        act = np.empty((n, *act_shape), np.int64 if discrete else np.float32)
        rew = np.empty(n, np.float32)
        term = np.zeros(n, bool)
        tout = np.zeros(n, bool)
        tids = np.zeros(len(episodes), np.int64)
        any_task = False
        for i, ep in enumerate(episodes):
            lo, hi = starts[i], starts[i + 1]
            try:
                obs[lo:hi] = np.asarray(ep["observations"]).reshape(hi - lo, *obs_dim)
                act[lo:hi] = np.asarray(ep["actions"]).reshape(hi - lo, *act_shape)
                rew[lo:hi] = np.asarray(ep["rewards"]).reshape(hi - lo)
                if has_next:
                    if "next_observations" not in ep:
                        raise ValueError("has no 'next_observations' but episode 0 does")
                    nxt[lo:hi] = np.asarray(ep["next_observations"]).reshape(hi - lo, *obs_dim)
                if "terminals" in ep:
                    term[lo:hi] = np.asarray(ep["terminals"], bool).reshape(hi - lo)
                if "timeouts" in ep:
                    tout[lo:hi] = np.asarray(ep["timeouts"], bool).reshape(hi - lo)
            except ValueError as err:  # shape mismatch inside one episode
                raise ValueError(
                    f"episode {i} does not match episode 0 or its own length {hi - lo} "
                    f"({err}); fix: give every episode the same observation/action shapes and "
                    "one row per step"
                ) from None
            if "task_id" in ep:
                tids[i] = int(ep["task_id"])
                any_task = True
        # Gymnasium can report terminated and truncated on the same step; it is a termination.
        tout &= ~term
        if task_ids is not None:
            tids = np.asarray(task_ids, np.int64).reshape(-1)
            any_task = True
        return cls(
            observations=obs,
            actions=act,
            rewards=rew,
            terminals=term,
            timeouts=tout,
            episode_starts=starts,
            task_id=tids if any_task else None,
            metadata=dict(metadata or {}),
            next_observations=nxt,
        )

    # ---------------------------------------------------------------- persistence
    def save(self, path: str | os.PathLike, *, compression: str | None = None) -> str:
        """Writes the D4RL HDF5 schema, atomically (temp file in the same folder, then rename).

        Layout: per-step ``observations`` [N, S] float32, ``actions``, ``rewards`` [N] float32,
        ``terminals`` / ``timeouts`` [N] bool, ``next_observations`` if stored,
        ``infos/task_id`` [N] int64 (each step carries its episode's task) if stored; non-per-step
        ``metadata/<key>`` datasets, plus ``metadata/episode_starts`` so that episode boundaries
        not implied by the flags (e.g. a partial episode that is no longer last) survive.
        D4RL readers ignore the metadata group and split on terminals|timeouts as usual.

        Args:
            path: destination file (parent folders are created).
            compression: optional h5py compression for per-step arrays (e.g. "gzip").

        Returns:
            The path written, as a string.
        """
        path = os.fspath(path)
        _check_metadata(self.metadata)
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".hdf5")
        os.close(fd)
        try:
            with h5py.File(tmp, "w") as f:
                per_step = {
                    "observations": self.observations,
                    "actions": self.actions,
                    "rewards": self.rewards,
                    "terminals": self.terminals,
                    "timeouts": self.timeouts,
                }
                if self.next_observations is not None:
                    per_step["next_observations"] = self.next_observations
                for key, value in per_step.items():
                    f.create_dataset(key, data=value, compression=compression)
                if self.task_id is not None:
                    f.create_dataset(
                        "infos/task_id",
                        data=np.repeat(self.task_id, self.lengths),
                        compression=compression,
                    )
                f.create_dataset("metadata/episode_starts", data=self.episode_starts)
                for key, value in self.metadata.items():
                    _write_metadata(f, f"metadata/{key}", value)
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a dataset is shared like any file
            os.replace(tmp, path)
        except BaseException:
            if os.path.exists(tmp):
                os.remove(tmp)
            raise
        return path


def _flat(x: Any, dtype: Any, name: str) -> np.ndarray:
    """1-D array of ``dtype``; squeezes a trailing unit axis ((N, 1) -> (N,)) as D4RL does."""
    a = np.asarray(x)
    if a.ndim == 2 and a.shape[1] == 1:
        a = a[:, 0]
    if a.ndim != 1:
        raise ValueError(
            f"'{name}' must be 1-D (or [N, 1]), got shape {a.shape}; fix: store one value per row"
        )
    return a.astype(dtype, copy=False)


# Marks a metadata dataset holding JSON text (lists, dicts, None) rather than a plain value.
_JSON_ATTR = "ringrl_json"


def _check_metadata(metadata: Mapping[str, Any]) -> None:
    for key, value in metadata.items():
        if not isinstance(key, str) or not key or key.startswith("/") or key == "episode_starts":
            raise ValueError(
                f"metadata key {key!r} is not allowed; fix: use a non-empty str key other than "
                "'episode_starts' (stored structurally)"
            )
        if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "UO":
            value = value.tolist()
        elif isinstance(value, (str, bool, int, float, np.ndarray, np.generic)):
            continue
        try:
            json.dumps(value)
        except TypeError:
            raise ValueError(
                f"metadata[{key!r}] of type {type(value).__name__} cannot be stored; fix: use "
                "str, bool, int, float, numpy arrays or JSON-serialisable lists/dicts"
            ) from None


def _write_metadata(f: h5py.File, name: str, value: Any) -> None:
    if isinstance(value, (np.ndarray, np.generic)) and value.dtype.kind in "UO":
        value = value.tolist()  # HDF5 has no numpy-unicode/object type: stored as JSON
    if isinstance(value, (str, bool, int, float, np.ndarray, np.generic)):
        f.create_dataset(name, data=value)
    else:
        f.create_dataset(name, data=json.dumps(value))
        f[name].attrs[_JSON_ATTR] = True


def read_metadata(group: h5py.Group) -> dict[str, Any]:
    """Reads a ``metadata`` group written by :meth:`Trajectories.save` or by D4RL.

    Nested groups (D4RL stores e.g. ``metadata/policy/fc0/weight``) become '/'-joined keys;
    byte strings are decoded; scalars become Python values; arrays stay numpy.

    Args:
        group: the open ``metadata`` group.

    Returns:
        dict of metadata (without ``episode_starts``, which is structural).
    """
    out: dict[str, Any] = {}

    def visit(name: str, obj: Any) -> None:
        if not isinstance(obj, h5py.Dataset) or name == "episode_starts":
            return
        value = obj[()]
        if isinstance(value, bytes):
            value = value.decode("utf-8")
        if obj.attrs.get(_JSON_ATTR, False):
            value = json.loads(value)
        elif isinstance(value, np.generic):
            value = value.item()
        out[name] = value

    group.visititems(visit)
    return out
