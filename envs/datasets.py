"""D4RL HDF5 loader with the episode semantics of the ``d4rl`` package (not a dependency).

Dimension letters: N steps, E episodes, S observation dim, A action dim.

Files are read straight into their final numpy arrays (no per-episode lists, no concatenation), so
loading holds about one copy of the data plus HDF5's small conversion buffers.
"""

from __future__ import annotations

import os
import sys
import warnings
from typing import Any

import h5py
import numpy as np

from ringrl.envs.trajectories import Trajectories, read_metadata

REQUIRED_KEYS = ("observations", "actions", "rewards", "terminals")

# D4RL locomotion datasets have the same observation and action spaces as Gymnasium's v5 MuJoCo
# tasks (Hopper 11/3, HalfCheetah 17/6, Walker2d 17/6), so those are used to check loaded files.
# (Ant differs: D4RL's ant has 111 observations, Ant-v5 105.)
D4RL_GYM_IDS = {"hopper": "Hopper-v5", "halfcheetah": "HalfCheetah-v5", "walker2d": "Walker2d-v5"}


def dataset_dir() -> str:
    """Folder searched for dataset names: ``$D4RL_DATASET_DIR``, default ``~/.d4rl/datasets``."""
    return os.path.expanduser(os.environ.get("D4RL_DATASET_DIR", "~/.d4rl/datasets"))


def resolve_path(path_or_name: str | os.PathLike) -> tuple[str, str | None]:
    """Maps a path or a D4RL dataset name to an existing file.

    A name like ``hopper-medium-replay-v2`` is looked up in :func:`dataset_dir` as
    ``hopper-medium-replay-v2.hdf5`` and as d4rl's own download name
    ``hopper_medium_replay-v2.hdf5`` (dashes before the version become underscores).

    Args:
        path_or_name: file path, or dataset name.

    Returns:
        (path, dataset name or None when a path was given).
    """
    s = os.fspath(path_or_name)
    looks_like_path = os.sep in s or s.endswith((".hdf5", ".h5")) or os.path.exists(s)
    if looks_like_path:
        if os.path.isdir(s):
            raise ValueError(
                f"D4RL dataset path {s!r} is a directory, not a file; fix: pass the .hdf5 file "
                "inside it"
            )
        if not os.path.isfile(s):
            raise FileNotFoundError(
                f"D4RL dataset file {s!r} does not exist; fix: check the path (datasets are never "
                "downloaded by this project)"
            )
        return s, None
    folder = dataset_dir()
    stem, _, version = s.rpartition("-")
    candidates = [s + ".hdf5"]
    if stem and version.startswith("v"):
        candidates.append(stem.replace("-", "_") + "-" + version + ".hdf5")
    for c in candidates:
        p = os.path.join(folder, c)
        if os.path.isfile(p):
            return p, s
    tried = ", ".join(os.path.join(folder, c) for c in candidates)
    raise FileNotFoundError(
        f"D4RL dataset {s!r} not found (tried {tried}); fix: put the .hdf5 file there, set "
        "D4RL_DATASET_DIR, or pass a file path (datasets are never downloaded by this project)"
    )


def load_d4rl(
    path_or_name: str | os.PathLike,
    *,
    drop_trailing_partial: bool = False,
    env_id: str | None = None,
    load_next_observations: bool = False,
    check_env: bool = True,
) -> Trajectories:
    """Loads a D4RL-schema HDF5 file as :class:`Trajectories`.

    Semantics follow the ``d4rl`` package:

    * ``(N, 1)`` per-step arrays are squeezed to ``(N,)``; integer actions become ``[N]`` int64.
    * Episodes end at every row with ``terminals | timeouts`` (``timeouts`` may be absent in old
      files: then only terminals split). A row with both flags counts as terminal.
    * The last rows of a D4RL file normally form a partial episode with neither flag set. It is
      **kept** here as a truncated episode (``terminals=timeouts=False`` on its last row, its
      boundary recorded in ``episode_starts``). ``d4rl.sequence_dataset`` drops it: pass
      ``drop_trailing_partial=True`` to do the same.
    * ``metadata/*`` and ``infos/*`` groups are tolerated (``d4rl.sequence_dataset`` crashes on
      them, D4RL issue 222). Files written by :meth:`Trajectories.save` keep their exact episode
      boundaries in ``metadata/episode_starts``, task ids in ``infos/task_id`` (per step) and
      everything else of ``metadata/*`` in ``Trajectories.metadata``. Other ``infos/*`` keys are
      not loaded.

    Checks (ValueError/FileNotFoundError naming the file, the key and the fix): file exists and
    is HDF5; required keys present; equal lengths; non-empty; finite observations and rewards;
    and, when an environment is known, actions inside its action space and observations of its
    dimension. The environment is ``env_id`` if given, else ``metadata/env_id`` of the file (if
    registered with Gymnasium), else the Gymnasium v5 twin of a D4RL locomotion dataset name
    (``hopper-*`` -> ``Hopper-v5``, ...).

    Args:
        path_or_name: file path or dataset name (see :func:`resolve_path`).
        drop_trailing_partial: drop a final episode that ends with neither flag, as
            ``d4rl.sequence_dataset`` does.
        env_id: Gymnasium id whose spaces the data must fit.
        load_next_observations: also read ``next_observations`` (off by default: it doubles the
            observation memory and only :func:`qlearning_transitions` needs it).
        check_env: set False to skip the environment-space checks.

    Returns:
        Trajectories (metadata gets ``dataset_name`` when loaded by name).
    """
    path, name = resolve_path(path_or_name)
    try:
        is_hdf5 = h5py.is_hdf5(path)
    except OSError as err:
        raise ValueError(f"{path}: cannot be read ({err.strerror or err}); fix: check it") from None
    if not is_hdf5:
        raise ValueError(
            f"{path}: not an HDF5 file; fix: pass a D4RL-style .hdf5 file (observations, "
            "actions, rewards, terminals, timeouts)"
        )
    try:
        traj = _load(path, name, drop_trailing_partial, load_next_observations)
    except (OSError, KeyError, TypeError, RuntimeError) as err:
        # h5py's errors for damaged files (truncated, bad offsets, unreadable chunks).
        reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"{path}: the HDF5 file is damaged or truncated ({reason}); fix: rewrite or "
            "re-download it"
        ) from None
    if check_env:
        env = env_id
        explicit = env_id is not None
        if env is None and isinstance(traj.metadata.get("env_id"), str):
            env = traj.metadata["env_id"]
        if env is None and name is not None:
            env = D4RL_GYM_IDS.get(name.split("-")[0].split("_")[0])
        if env is not None:
            check_spaces(traj, env, source=path, strict=explicit)
    return traj


def load_cache(path: str | os.PathLike) -> Trajectories | None:
    """Loads a file this project generated and cached (e.g. learning histories under data/).

    Returns:
        the trajectories, or None when the file is absent or unreadable; an unreadable file is
        reported on stderr, with the fact that it will be regenerated (the caller writes it anew).
    """
    if not os.path.exists(path):
        return None
    try:
        return load_d4rl(path, check_env=False)
    except ValueError as err:
        print(
            f"warning: cached file {os.fspath(path)} is unreadable ({err}); it will be regenerated",
            file=sys.stderr,
        )
        return None


def _load(
    path: str, name: str | None, drop_trailing_partial: bool, load_next_observations: bool
) -> Trajectories:
    """The body of `load_d4rl` for a resolved HDF5 `path` (no environment checks)."""
    with h5py.File(path, "r") as f:
        missing = [k for k in REQUIRED_KEYS if k not in f or not isinstance(f[k], h5py.Dataset)]
        if missing:
            raise ValueError(
                f"{path}: missing required key(s) {missing} (present: {sorted(f.keys())}); fix: "
                f"a D4RL file needs per-step datasets {list(REQUIRED_KEYS)} (+ timeouts)"
            )
        per_step = [*REQUIRED_KEYS, "timeouts"]
        if load_next_observations:
            per_step.append("next_observations")
        if "infos" in f and "task_id" in f["infos"]:
            per_step.append("infos/task_id")
        present = [k for k in per_step if k in f]
        lengths = {k: (f[k].shape[0] if f[k].shape else 0) for k in present}
        if len(set(lengths.values())) != 1:
            raise ValueError(
                f"{path}: per-step keys have unequal lengths {lengths}; fix: every per-step "
                "dataset needs one row per step"
            )
        n = lengths["observations"]
        if n == 0:
            raise ValueError(f"{path}: dataset is empty (0 steps); fix: use a non-empty file")
        try:
            observations = _read(f["observations"], np.float32, 2)
            discrete = np.issubdtype(f["actions"].dtype, np.integer)
            act_dtype, act_ndim = (np.int64, 1) if discrete else (np.float32, 2)
            actions = _read(f["actions"], act_dtype, act_ndim)
            rewards = _read(f["rewards"], np.float32, 1)
            terminals = _read(f["terminals"], bool, 1)
            timeouts = _read(f["timeouts"], bool, 1) if "timeouts" in f else np.zeros(n, bool)
            next_obs = None
            if "next_observations" in present:
                next_obs = _read(f["next_observations"], np.float32, 2)
            step_task = _read(f["infos/task_id"], np.int64, 1) if "infos/task_id" in f else None
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from None
        metadata = read_metadata(f["metadata"]) if "metadata" in f else {}
        saved_starts = None
        if "metadata" in f and "episode_starts" in f["metadata"]:
            saved_starts = np.asarray(f["metadata/episode_starts"][()], np.int64)

    terminals_and_timeouts = terminals & timeouts
    if terminals_and_timeouts.any():  # a terminated step is terminal (see docstring)
        timeouts &= ~terminals
    ends = np.flatnonzero(terminals | timeouts) + 1
    starts = np.unique(np.concatenate([[0], ends, [n]])).astype(np.int64)
    if saved_starts is not None:
        if not np.isin(ends, saved_starts).all() or saved_starts[0] != 0 or saved_starts[-1] != n:
            raise ValueError(
                f"{path}: 'metadata/episode_starts' disagrees with the terminals/timeouts flags "
                "or the number of steps; fix: delete that key to split on the flags only"
            )
        starts = saved_starts
    if drop_trailing_partial and not (terminals[-1] or timeouts[-1]):
        cut = int(starts[-2])
        if cut == 0:
            raise ValueError(
                f"{path}: the only episode is a trailing partial one, so "
                "drop_trailing_partial=True leaves an empty dataset; fix: keep it (default)"
            )
        starts = starts[:-1]
        # Slices are views; the dropped tail stays allocated only until the caller copies.
        observations, actions, rewards = observations[:cut], actions[:cut], rewards[:cut]
        terminals, timeouts = terminals[:cut], timeouts[:cut]
        next_obs = None if next_obs is None else next_obs[:cut]
        step_task = None if step_task is None else step_task[:cut]
    task_id = None
    if step_task is not None:
        task_id = step_task[starts[:-1]]
        if np.any(step_task != np.repeat(task_id, np.diff(starts))):
            raise ValueError(
                f"{path}: 'infos/task_id' changes inside an episode; fix: one task per episode"
            )
    if name is not None:
        metadata.setdefault("dataset_name", name)
    try:
        traj = Trajectories(
            observations=observations,
            actions=actions,
            rewards=rewards,
            terminals=terminals,
            timeouts=timeouts,
            episode_starts=starts,
            task_id=task_id,
            metadata=metadata,
            next_observations=next_obs,
        )
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from None
    return traj


def _read(ds: h5py.Dataset, dtype: Any, ndim: int) -> np.ndarray:
    """Reads a dataset straight into a new array of ``dtype`` (HDF5 converts on the fly).

    ``ndim=1`` squeezes ``(N, 1)``; ``ndim=2`` turns ``(N,)`` into ``(N, 1)``.
    """
    shape = ds.shape
    if ds.dtype.kind not in "biuf":  # strings would be parsed, objects/compounds fail later
        raise ValueError(
            f"'{ds.name.lstrip('/')}' has dtype {ds.dtype}, not numbers; fix: store numeric "
            "(float, int or bool) arrays"
        )
    if ndim == 1 and len(shape) == 2 and shape[1] == 1:
        shape = (shape[0],)
    if ndim == 2 and len(shape) == 1:
        shape = (shape[0], 1)
    if len(shape) != ndim:
        raise ValueError(
            f"'{ds.name.lstrip('/')}' has shape {ds.shape}, expected {ndim} dimension(s); fix: "
            "store per-step vectors as [N, dim] and scalars as [N]"
        )
    if dtype is bool or ds.dtype.kind not in "fiu":
        # Flags are stored as bool (an HDF5 enum) or as numbers; HDF5 cannot convert between
        # the two, so read natively (1 byte or 4 per row: small) and cast.
        return np.asarray(ds[()]).reshape(shape).astype(dtype, copy=False)
    out = np.empty(shape, dtype)
    ds.read_direct(out.reshape(ds.shape))
    return out


def check_spaces(
    traj: Trajectories, env_id: str, *, source: str = "dataset", strict: bool = True
) -> None:
    """Checks that observations and actions fit a Gymnasium environment's spaces.

    The environment is constructed (not reset or stepped) only to read its spaces.

    Args:
        traj: data to check.
        env_id: registered Gymnasium id (``import ringrl.envs`` registers the ringrl/* ids).
        source: file or dataset name used in error messages.
        strict: if False, an unregistered ``env_id`` only warns (used for ids read from file
            metadata); if True it raises.
    """
    import gymnasium as gym  # noqa: PLC0415 (only needed when an env is named)

    try:
        env = gym.make(env_id)
    except gym.error.Error as err:
        msg = f"{source}: environment {env_id!r} cannot be built ({err})"
        if strict:
            raise ValueError(
                msg + "; fix: pass a registered Gymnasium id or env_id=None / check_env=False"
            ) from None
        warnings.warn(msg + "; skipping the space checks", stacklevel=3)
        return
    try:
        obs_space, act_space = env.observation_space, env.action_space
    finally:
        env.close()
    obs_shape = getattr(obs_space, "shape", None)
    if isinstance(obs_space, gym.spaces.Box) and obs_shape is not None:
        want = int(np.prod(obs_shape))
        if traj.observations.shape[1] != want:
            raise ValueError(
                f"{source}: 'observations' have dimension {traj.observations.shape[1]} but "
                f"{env_id} observations have shape {obs_shape}; fix: load the dataset with the "
                "environment it was collected in (env_id=...)"
            )
    if isinstance(act_space, gym.spaces.Discrete):
        if not traj.discrete_actions:
            raise ValueError(
                f"{source}: 'actions' are continuous but {env_id} has Discrete({act_space.n}) "
                "actions; fix: use the matching environment"
            )
        lo, hi = int(act_space.start), int(act_space.start + act_space.n - 1)
        bad = (traj.actions < lo) | (traj.actions > hi)
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(
                f"{source}: 'actions' row {i} = {traj.actions[i]} outside {env_id}'s action "
                f"space [{lo}, {hi}]; fix: use the matching environment or repair the actions"
            )
    elif isinstance(act_space, gym.spaces.Box):
        want = int(np.prod(act_space.shape))
        if traj.discrete_actions or traj.actions.shape[1] != want:
            raise ValueError(
                f"{source}: 'actions' have shape {traj.actions.shape[1:]} {traj.actions.dtype} but "
                f"{env_id} actions have shape {act_space.shape}; fix: use the matching environment"
            )
        low = act_space.low.reshape(-1).astype(np.float32)
        high = act_space.high.reshape(-1).astype(np.float32)
        for lo_row in range(0, traj.num_steps, 65536):
            chunk = traj.actions[lo_row : lo_row + 65536]
            bad = ((chunk < low) | (chunk > high)).any(axis=1)
            if bad.any():
                i = lo_row + int(np.argmax(bad))
                raise ValueError(
                    f"{source}: 'actions' row {i} = {traj.actions[i]} outside {env_id}'s action "
                    f"bounds [{low}, {high}]; fix: clip the actions to the bounds or use the "
                    "matching environment"
                )


def qlearning_transitions(
    path_or_traj: str | os.PathLike | Trajectories, *, drop_timeouts: bool = True
) -> dict[str, np.ndarray]:
    """(s, a, r, s', done) transitions like ``d4rl.qlearning_dataset``.

    Differences from d4rl, all deliberate:

    * The successor observation is the file's ``next_observations`` when present. Otherwise it is
      ``observations[i + 1]`` **within the episode**; d4rl takes ``observations[i + 1]`` even
      across an episode boundary, giving a terminal row the next episode's first observation.
      Here a terminal row without ``next_observations`` gets its own observation as a
      placeholder (``terminals`` masks bootstrapping, so the value is never used).
    * Rows whose successor is unknown (the last row of a timeout or unflagged episode, when the
      file has no ``next_observations``) are dropped. d4rl likewise drops timeout rows (its
      default) and the file's final row.

    Args:
        path_or_traj: D4RL file path/name, or Trajectories.
        drop_timeouts: drop rows with ``timeouts`` set, as d4rl does by default.

    Returns:
        dict with observations [M, S], actions [M, A] or [M], next_observations [M, S],
        rewards [M] float32, terminals [M] bool.
    """
    if isinstance(path_or_traj, Trajectories):
        traj = path_or_traj
    else:
        traj = load_d4rl(path_or_traj, load_next_observations=True)
    n = traj.num_steps
    last = np.zeros(n, bool)
    last[traj.episode_starts[1:] - 1] = True
    if traj.next_observations is not None:
        keep = ~traj.timeouts if drop_timeouts else np.ones(n, bool)
        idx = np.flatnonzero(keep)
        next_obs = traj.next_observations[idx]
    else:
        if not drop_timeouts and traj.timeouts.any():
            raise ValueError(
                "timeout rows have no successor observation because the data has no "
                "'next_observations'; fix: use drop_timeouts=True or a file with "
                "next_observations"
            )
        keep = ~last | traj.terminals
        succ = np.minimum(np.arange(n) + 1, n - 1)
        succ[last] = np.flatnonzero(last)  # terminal placeholder: the row's own observation
        idx = np.flatnonzero(keep)
        next_obs = traj.observations[succ[idx]]
    if len(idx) == 0:
        raise ValueError(
            "no transitions left (every row is the unknown-successor end of an episode); fix: "
            "use data with next_observations or longer episodes"
        )
    return {
        "observations": traj.observations[idx],
        "actions": traj.actions[idx],
        "next_observations": next_obs,
        "rewards": traj.rewards[idx],
        "terminals": traj.terminals[idx],
    }
