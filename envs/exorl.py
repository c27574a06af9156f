"""ExoRL-style data: a folder of per-episode ``.npz`` files -> :class:`Trajectories`.

Dimension letters: N steps, E episodes, T steps of one episode, S observation dim, A action dim.

Format (as written by ExoRL, github.com/denisyarats/exorl, ``replay_buffer.py``): each file
holds one episode with keys ``observation, action, reward, discount, physics``, **all with T+1
rows**. Row 0 comes from ``reset``: ``observation[0]`` / ``physics[0]`` are the initial state and
``action[0], reward[0], discount[0]`` are dummies. Transition ``i`` (1..T) is
``(observation[i-1], action[i], reward[i], discount[i], observation[i])`` and ``physics[i]`` is
the simulator state after it. ExoRL names files ``<timestamp>_<index>_<length>.npz`` and reads
them in sorted file-name order; so does :func:`load_exorl`.

Episodes end by the DeepMind Control time limit (``discount`` stays 1), so the last step is a
timeout; a final ``discount == 0`` marks a termination instead.

Reward relabelling replays ``physics`` in dm_control: for every state,
``physics.set_state(state)`` and ``task.get_reward(physics)``, exactly as ExoRL's
``relable_episode``. This needs the ``dmc`` extra: dm-control 1.0.50 fails to load models with
mujoco 4.0.0 (``'MjModel' object has no attribute 'flex_vertedge'``) and works with mujoco 3.17.0
(``pip install 'ringrl[dmc]'`` pins ``mujoco>=3.17,<3.18``).
"""

from __future__ import annotations

import glob
import os
import zipfile
from typing import Any

import numpy as np

from ringrl.envs.trajectories import Trajectories

KEYS = ("observation", "action", "reward", "discount")


def _header(path: str, key: str) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of one array in an .npz without decompressing its data."""
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        if f"{key}.npy" not in names:
            have = sorted(n[: -len(".npy")] for n in names if n.endswith(".npy"))
            raise ValueError(
                f"{path}: missing key '{key}' (present: {have}); fix: ExoRL episodes need "
                f"{list(KEYS)} (+ 'physics' for relabelling), each with T+1 rows"
            )
        with z.open(f"{key}.npy") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            else:
                shape, _, dtype = np.lib.format.read_array_header_2_0(f)
    return shape, dtype


def load_exorl(
    folder: str | os.PathLike,
    *,
    relabel_task: Any = None,
    load_next_observations: bool = False,
) -> Trajectories:
    """Loads a folder of ExoRL episode files.

    Rows become transitions (see the module docstring): ``observations = observation[:-1]``,
    ``actions = action[1:]``, ``rewards = reward[1:]``; ``next_observations = observation[1:]``
    on request. Arrays are preallocated from the file headers and filled file by file.

    Args:
        folder: directory of ``*.npz`` episodes (not searched recursively).
        relabel_task: None keeps the stored rewards. A dm_control suite task name
            (``"walker_run"``, i.e. ``f"{domain}_{task}"`` from ``dm_control.suite.ALL_TASKS``)
            or a dm_control environment (with ``.physics`` and ``.task``, e.g. one of ExoRL's
            custom tasks) recomputes every reward from ``physics``. Needs dm_control.
        load_next_observations: also return ``next_observations``.

    Returns:
        Trajectories with metadata ``source="exorl"``, ``folder`` and ``relabel_task``.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(
            f"ExoRL folder {folder!r} does not exist; fix: pass the folder holding the episode "
            ".npz files (e.g. datasets/walker/proto/buffer)"
        )
    files = sorted(glob.glob(os.path.join(folder, "*.npz")))
    if not files:
        raise ValueError(
            f"{folder}: no .npz episode files (empty dataset); fix: point at ExoRL's buffer folder"
        )
    env = _relabel_env(relabel_task) if relabel_task is not None else None
    want = KEYS + (("physics",) if env is not None else ())
    lengths, shapes = [], {}
    for path in files:
        if not zipfile.is_zipfile(path):
            raise ValueError(f"{path}: not an .npz file; fix: remove it or re-save the episode")
        rows = {}
        for key in want:
            shape, dtype = _header(path, key)
            if dtype.kind not in "biuf":  # strings would be parsed as numbers
                raise ValueError(
                    f"{path}: '{key}' has dtype {dtype}, not numbers; fix: re-save the episode "
                    "with numeric arrays"
                )
            if len(shape) == 0:
                raise ValueError(f"{path}: '{key}' is a scalar; fix: store one row per step")
            rows[key] = shape[0]
            inner = tuple(shape[1:])
            if key in ("observation", "action"):
                if shapes.setdefault(key, inner) != inner:
                    raise ValueError(
                        f"{path}: '{key}' rows have shape {inner} but earlier files have "
                        f"{shapes[key]}; fix: keep one domain per folder"
                    )
        if len(set(rows.values())) != 1:
            raise ValueError(
                f"{path}: keys have unequal lengths {rows}; fix: every key needs T+1 rows "
                "(row 0 from reset)"
            )
        if rows["reward"] < 2:
            raise ValueError(
                f"{path}: episode has {rows['reward']} rows, no transition (empty); fix: remove "
                "the file"
            )
        lengths.append(rows["reward"] - 1)
    starts = np.zeros(len(files) + 1, np.int64)
    np.cumsum(lengths, out=starts[1:])
    n = int(starts[-1])
    s = int(np.prod(shapes["observation"]))
    a = int(np.prod(shapes["action"]))
    obs = np.empty((n, s), np.float32)
    nxt = np.empty((n, s), np.float32) if load_next_observations else None
    act = np.empty((n, a), np.float32)
    rew = np.empty(n, np.float32)
    term = np.zeros(n, bool)
    tout = np.zeros(n, bool)
    for e, path in enumerate(files):
        lo, hi = starts[e], starts[e + 1]
        try:
            with np.load(path, allow_pickle=False) as z:
                o = z["observation"].reshape(hi - lo + 1, s)
                obs[lo:hi] = o[:-1]
                if nxt is not None:
                    nxt[lo:hi] = o[1:]
                act[lo:hi] = z["action"][1:].reshape(hi - lo, a)
                discount = z["discount"][1:].reshape(hi - lo)
                if env is not None:
                    rew[lo:hi] = _relabel(env, z["physics"][1:])
                else:
                    rew[lo:hi] = z["reward"][1:].reshape(hi - lo)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise ValueError(f"{path}: cannot be read ({err}); fix: re-save the episode") from None
        if np.any(discount[:-1] == 0):
            raise ValueError(
                f"{path}: discount is 0 before the last step; fix: split the episode there"
            )
        # dm_control ends episodes by time limit (discount 1); discount 0 is a real termination.
        term[hi - 1] = discount[-1] == 0
        tout[hi - 1] = not term[hi - 1]
    metadata: dict[str, Any] = {"source": "exorl", "folder": os.path.abspath(folder)}
    if env is not None:
        _check_env(env, obs, act, folder)
        metadata["relabel_task"] = (
            relabel_task if isinstance(relabel_task, str) else type(env.task).__name__
        )
    try:
        return Trajectories(
            observations=obs,
            actions=act,
            rewards=rew,
            terminals=term,
            timeouts=tout,
            episode_starts=starts,
            metadata=metadata,
            next_observations=nxt,
        )
    except ValueError as err:
        raise ValueError(f"{folder}: {err}") from None


def _relabel_env(task: Any) -> Any:
    """dm_control environment for relabelling (lazy import: dm_control is optional)."""
    if not isinstance(task, str):
        if not (hasattr(task, "physics") and hasattr(task, "task")):
            raise ValueError(
                f"relabel_task={task!r} is neither a task name nor a dm_control environment; "
                "fix: pass e.g. 'walker_run' or dm_control.suite.load('walker', 'run')"
            )
        return task
    try:
        from dm_control import suite  # noqa: PLC0415
    except ImportError as err:
        raise ImportError(
            f"reward relabelling needs dm_control ({err}); fix: pip install 'ringrl[dmc]' "
            "(dm-control with mujoco 3.17; dm-control fails with mujoco 4.0.0)"
        ) from None
    for domain, name in suite.ALL_TASKS:
        if f"{domain}_{name}" == task:
            return suite.load(domain, name)
    known = ", ".join(f"{d}_{t}" for d, t in suite.ALL_TASKS)
    raise ValueError(
        f"relabel_task {task!r} is not a dm_control suite task; fix: use one of {known}, or "
        "pass a dm_control environment"
    )


def _relabel(env: Any, states: np.ndarray) -> np.ndarray:
    """Rewards of ``env.task`` at each physics state (ExoRL's ``relable_episode``)."""
    out = np.empty(len(states), np.float32)
    for i, state in enumerate(states):
        with env.physics.reset_context():
            env.physics.set_state(state)
        out[i] = env.task.get_reward(env.physics)
    return out


def _check_env(env: Any, observations: np.ndarray, actions: np.ndarray, folder: str) -> None:
    """Observation size and action bounds against the relabelling environment's specs."""
    obs_size = sum(int(np.prod(v.shape)) for v in env.observation_spec().values())
    if observations.shape[1] != obs_size:
        raise ValueError(
            f"{folder}: observations have dimension {observations.shape[1]} but the relabel "
            f"task's observations have {obs_size}; fix: relabel with a task of the domain the "
            "data came from"
        )
    spec = env.action_spec()
    low = np.broadcast_to(np.asarray(spec.minimum, np.float32), spec.shape).reshape(-1)
    high = np.broadcast_to(np.asarray(spec.maximum, np.float32), spec.shape).reshape(-1)
    if actions.shape[1] != low.shape[0]:
        raise ValueError(
            f"{folder}: actions have dimension {actions.shape[1]} but the relabel task has "
            f"{low.shape[0]}; fix: relabel with a task of the domain the data came from"
        )
    bad = ((actions < low) | (actions > high)).any(axis=1)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(
            f"{folder}: action row {i} = {actions[i]} outside the task's bounds [{low}, {high}]; "
            "fix: clip the actions or relabel with the domain the data came from"
        )
