"""Minari 0.5 datasets <-> :class:`Trajectories` (local datasets only; nothing is downloaded).

Dimension letters: N steps, E episodes, T steps of one episode, S observation dim, A action dim.

Minari stores per episode ``observations`` with T+1 rows (the reset observation plus one after
every step) and ``actions, rewards, terminations, truncations`` with T rows. A Trajectories row
holds the observation *before* each step, so rows ``0..T-1`` of Minari's observations become
``observations`` and rows ``1..T`` are the ``next_observations``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import warnings
from typing import Any

import gymnasium as gym
import numpy as np

from ringrl.envs.datasets import check_spaces
from ringrl.envs.trajectories import Trajectories

# Minari metadata key holding the rest of Trajectories.metadata (JSON) for an exact round trip.
_METADATA_KEY = "ringrl_metadata"


def _root() -> str:
    return os.path.expanduser(
        os.environ.get("MINARI_DATASETS_PATH", os.path.join("~", ".minari", "datasets"))
    )


def load_minari(
    dataset_id: str,
    *,
    load_next_observations: bool = False,
    env_id: str | None = None,
    check_env: bool = True,
) -> Trajectories:
    """Loads a local Minari dataset (``$MINARI_DATASETS_PATH``, default ``~/.minari/datasets``).

    * Observations: Minari's T+1 rows per episode -> rows ``0..T-1`` (the final observation is
      returned as the last ``next_observations`` row when ``load_next_observations=True``).
    * ``terminations`` -> ``terminals`` and ``truncations`` -> ``timeouts``, kept apart; a step
      with both counts as terminal. An episode with neither flag on its last step stays so.
    * ``infos["task_id"]`` (one entry per observation, constant in an episode), if present,
      becomes ``task_id``; other infos are not loaded.
    * Metadata: ``dataset_id``, ``ref_min_score`` / ``ref_max_score`` when the dataset has them,
      ``env_id`` from its env spec, plus whatever :func:`export_minari` stored.

    Arrays are preallocated from ``total_steps`` and filled episode by episode (no concatenation).

    Args:
        dataset_id: Minari id, e.g. ``"ringrl/darkroom/histories-v0"``.
        load_next_observations: also return ``next_observations``.
        env_id: Gymnasium id to check the data against; default: the dataset's env spec.
        check_env: set False to skip the space checks.

    Returns:
        Trajectories.
    """
    import minari  # noqa: PLC0415 (heavy import; only needed here)

    path = os.path.join(_root(), dataset_id)
    if not os.path.isdir(os.path.join(path, "data")):
        try:
            local = sorted(minari.list_local_datasets())
        except Exception:  # noqa: BLE001 (listing is only a hint for the message)
            local = []
        raise FileNotFoundError(
            f"Minari dataset {dataset_id!r} is not present locally (looked in {path}); local "
            f"datasets: {local or 'none'}; fix: set MINARI_DATASETS_PATH to the folder holding "
            "it or create it with export_minari (datasets are never downloaded here)"
        )
    try:
        traj = _read_dataset(minari, dataset_id, load_next_observations)
    except ValueError as err:
        if str(err).startswith("Minari dataset"):
            raise  # our own checks already name the dataset and the fix
        raise _damaged(dataset_id, path, err) from None
    except Exception as err:  # noqa: BLE001 (h5py/minari/json raise many types for bad files)
        raise _damaged(dataset_id, path, err) from None
    metadata = traj.metadata
    if check_env:
        env = env_id if env_id is not None else metadata.get("env_id")
        if isinstance(env, str):
            source = f"Minari dataset {dataset_id!r}"
            check_spaces(traj, env, source=source, strict=env_id is not None)
    return traj


def _damaged(dataset_id: str, path: str, err: BaseException) -> ValueError:
    reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else ""
    return ValueError(
        f"Minari dataset {dataset_id!r} ({path}) is damaged and cannot be read "
        f"({type(err).__name__}: {reason}); fix: re-create it with export_minari or delete that "
        "folder"
    )


def _read_dataset(minari: Any, dataset_id: str, load_next_observations: bool) -> Trajectories:
    """Reads a local Minari dataset into Trajectories (the body of `load_minari`)."""
    dataset = minari.load_dataset(dataset_id)
    obs_space, act_space = dataset.observation_space, dataset.action_space
    if not isinstance(obs_space, gym.spaces.Box):
        raise ValueError(
            f"Minari dataset {dataset_id!r}: observation space {obs_space} is not a Box; fix: "
            "flatten observations to a vector (Dict/Tuple/image spaces are not supported)"
        )
    if not isinstance(act_space, (gym.spaces.Box, gym.spaces.Discrete)):
        raise ValueError(
            f"Minari dataset {dataset_id!r}: action space {act_space} is neither Box nor "
            "Discrete; fix: export the data with a flat action space"
        )
    discrete = isinstance(act_space, gym.spaces.Discrete)
    n, num_eps = int(dataset.total_steps), int(dataset.total_episodes)
    if n == 0 or num_eps == 0:
        raise ValueError(
            f"Minari dataset {dataset_id!r} is empty (0 steps); fix: use a non-empty dataset"
        )
    s = int(np.prod(obs_space.shape))
    a = int(np.prod(act_space.shape))
    obs = np.empty((n, s), np.float32)
    nxt = np.empty((n, s), np.float32) if load_next_observations else None
    act = np.empty(n, np.int64) if discrete else np.empty((n, a), np.float32)
    rew = np.empty(n, np.float32)
    term = np.empty(n, bool)
    tout = np.empty(n, bool)
    starts = np.zeros(num_eps + 1, np.int64)
    task_id = np.zeros(num_eps, np.int64)
    has_task = None
    pos = 0
    for e, ep in enumerate(dataset.iterate_episodes()):
        t = len(ep.rewards)
        where = f"Minari dataset {dataset_id!r} episode {ep.id}"
        for key in ("observations", "actions", "rewards", "terminations", "truncations"):
            kind = np.asarray(getattr(ep, key)).dtype.kind
            if kind not in "biuf":  # strings would be parsed as numbers
                raise ValueError(
                    f"{where}: '{key}' has dtype kind {kind!r}, not numbers; fix: re-create the "
                    "dataset with numeric arrays"
                )
        ep_obs = np.asarray(ep.observations).reshape(-1, s)
        flags = (len(ep.terminations), len(ep.truncations))
        if t == 0 or len(ep_obs) != t + 1 or len(ep.actions) != t or flags != (t, t):
            raise ValueError(
                f"{where}: {len(ep_obs)} observations, {len(ep.actions)} actions, {t} rewards, "
                f"{flags[0]} terminations, {flags[1]} truncations (Minari needs T+1 "
                "observations and T >= 1 of the rest); fix: repair or re-create the dataset"
            )
        if pos + t > n:
            raise ValueError(
                f"{where}: episodes hold more than total_steps={n} steps; fix: repair or "
                "re-create the dataset"
            )
        obs[pos : pos + t] = ep_obs[:t]
        if nxt is not None:
            nxt[pos : pos + t] = ep_obs[1:]
        act[pos : pos + t] = np.asarray(ep.actions).reshape(act[pos : pos + t].shape)
        rew[pos : pos + t] = ep.rewards
        term[pos : pos + t] = ep.terminations
        tout[pos : pos + t] = ep.truncations
        infos = ep.infos or {}
        if has_task is None:
            has_task = "task_id" in infos
        if has_task:
            tids = np.asarray(infos.get("task_id", []))
            if len(tids) == 0 or np.any(tids != tids[0]):
                raise ValueError(
                    f"{where}: infos['task_id'] missing or not constant; fix: record one task "
                    "id per episode in every episode's infos"
                )
            task_id[e] = int(tids[0])
        pos += t
        starts[e + 1] = pos
    if pos != n:
        raise ValueError(
            f"Minari dataset {dataset_id!r}: episodes hold {pos} steps but metadata says "
            f"total_steps={n}; fix: repair or re-create the dataset"
        )
    tout &= ~term  # gymnasium may set both on one step: it is a termination
    raw = dataset.storage.metadata
    metadata: dict[str, Any] = {}
    if _METADATA_KEY in raw:
        metadata.update(json.loads(raw[_METADATA_KEY]))
    for key in ("ref_min_score", "ref_max_score"):
        if raw.get(key) is not None:
            metadata[key] = float(raw[key])
    metadata["dataset_id"] = dataset_id
    if dataset.env_spec is not None:
        metadata.setdefault("env_id", dataset.env_spec.id)
    try:
        traj = Trajectories(
            observations=obs,
            actions=act,
            rewards=rew,
            terminals=term,
            timeouts=tout,
            episode_starts=starts,
            task_id=task_id if has_task else None,
            metadata=metadata,
            next_observations=nxt,
        )
    except ValueError as err:
        raise ValueError(f"Minari dataset {dataset_id!r}: {err}") from None
    return traj


def export_minari(
    trajectories: Trajectories,
    dataset_id: str,
    *,
    env_id: str | None = None,
    observation_space: gym.spaces.Space | None = None,
    action_space: gym.spaces.Space | None = None,
    ref_min_score: float | None = None,
    ref_max_score: float | None = None,
    description: str | None = None,
    algorithm_name: str = "ringrl",
) -> str:
    """Writes Trajectories as a local Minari dataset readable by ``minari.load_dataset``.

    Uses Minari's own writer (``minari.create_dataset_from_buffers``) in a hidden temporary
    folder under the datasets root, then renames the finished dataset into place, so a failure
    leaves nothing behind.

    * Observations get Minari's T+1 layout: the final observation of each episode is the last
      ``next_observations`` row when stored, else the last observation repeated (no successor
      is known; with ``terminations``/``truncations`` set it is never used for bootstrapping).
    * ``terminals`` -> ``terminations``, ``timeouts`` -> ``truncations``.
    * ``task_id`` -> ``infos["task_id"]`` with T+1 entries (reset + each step), as
      ``DataCollector(record_infos=True)`` lays infos out.
    * Reference scores: arguments, else ``trajectories.metadata``; stored as Minari's
      ``ref_min_score`` / ``ref_max_score`` (used by ``minari.get_normalized_score``). The rest of
      the metadata is kept as JSON under ``ringrl_metadata`` for :func:`load_minari`.

    Spaces: ``env_id`` (default ``trajectories.metadata["env_id"]`` when registered) gives the
    env spec and spaces and the data are checked against them; else ``observation_space`` and
    ``action_space``; else unbounded Box spaces (and ``Discrete(max action + 1)``) are inferred.

    Args:
        trajectories: data to export.
        dataset_id: new Minari id ``(namespace/)name-vN``; must not exist yet.
        env_id: Gymnasium id the data come from.
        observation_space: used when no env id is known.
        action_space: used when no env id is known.
        ref_min_score: reference min return (needs ``ref_max_score`` too).
        ref_max_score: reference max return.
        description: dataset description.
        algorithm_name: stored as Minari's ``algorithm_name``.

    Returns:
        The dataset folder.
    """
    import minari  # noqa: PLC0415
    from minari.data_collector import EpisodeBuffer  # noqa: PLC0415
    from minari.dataset.minari_dataset import parse_dataset_id  # noqa: PLC0415

    traj = trajectories
    try:
        parse_dataset_id(dataset_id)
    except ValueError:
        raise ValueError(
            f"Minari dataset id {dataset_id!r} is malformed; fix: use (namespace/)name-vN, e.g. "
            "'ringrl/darkroom/histories-v0'"
        ) from None
    root = _root()
    final = os.path.join(root, dataset_id)
    if os.path.exists(final):
        raise ValueError(
            f"Minari dataset {dataset_id!r} already exists at {final}; fix: bump the version "
            "(-vN) or delete it (minari.delete_dataset)"
        )
    md = dict(traj.metadata)
    ref_min = ref_min_score if ref_min_score is not None else md.pop("ref_min_score", None)
    ref_max = ref_max_score if ref_max_score is not None else md.pop("ref_max_score", None)
    md.pop("ref_min_score", None)
    md.pop("ref_max_score", None)
    if (ref_min is None) != (ref_max is None):
        raise ValueError(
            f"export_minari({dataset_id!r}) got only one of ref_min_score/ref_max_score; fix: "
            "give both or neither"
        )
    if env_id is None and isinstance(md.get("env_id"), str) and md["env_id"] in gym.registry:
        env_id = md["env_id"]
    if env_id is not None:
        check_spaces(traj, env_id, source=f"export_minari({dataset_id!r})")
        env = gym.make(env_id)
        observation_space, action_space = env.observation_space, env.action_space
        env.close()
    else:
        if observation_space is None:
            observation_space = gym.spaces.Box(
                -np.inf, np.inf, traj.observations.shape[1:], np.float32
            )
        if action_space is None:
            if traj.discrete_actions:
                action_space = gym.spaces.Discrete(int(traj.actions.max()) + 1)
            else:
                action_space = gym.spaces.Box(-np.inf, np.inf, traj.actions.shape[1:], np.float32)
    obs_dtype = getattr(observation_space, "dtype", np.float32)
    try:
        md_json = json.dumps(md, default=_json_default)
    except TypeError as err:
        raise ValueError(
            f"export_minari({dataset_id!r}): metadata cannot be stored ({err}); fix: keep "
            "metadata to str/bool/int/float/arrays/JSON-serialisable values"
        ) from None

    buffers = []
    for e in range(traj.num_episodes):
        ep = traj.episode(e)
        t = len(ep["rewards"])
        final_obs = (
            ep["next_observations"][-1] if "next_observations" in ep else ep["observations"][-1]
        )
        obs = np.concatenate([ep["observations"], final_obs[None]]).astype(obs_dtype)
        infos = None
        if "task_id" in ep:
            infos = {"task_id": np.full(t + 1, ep["task_id"], np.int64)}
        buffers.append(
            EpisodeBuffer(
                id=e,
                observations=obs,
                actions=ep["actions"],
                rewards=ep["rewards"],
                terminations=ep["terminals"],
                truncations=ep["timeouts"],
                infos=infos,
            )
        )

    os.makedirs(root, exist_ok=True)
    tmp_root = tempfile.mkdtemp(dir=root, prefix=".tmp-")  # hidden: Minari skips dot folders
    old_env = os.environ.get("MINARI_DATASETS_PATH")
    try:
        os.environ["MINARI_DATASETS_PATH"] = tmp_root
        with warnings.catch_warnings():
            # Minari warns for every unset optional field (author, permalink, eval env ...).
            warnings.filterwarnings("ignore", category=UserWarning, module=r"minari(\.|$)")
            dataset = minari.create_dataset_from_buffers(
                dataset_id,
                buffers,
                env=env_id,
                algorithm_name=algorithm_name,
                description=description or f"exported by ringrl from {md.get('source', 'data')}",
                observation_space=observation_space,
                action_space=action_space,
            )
            extra: dict[str, Any] = {_METADATA_KEY: md_json}
            if ref_min is not None:
                extra.update(ref_min_score=float(ref_min), ref_max_score=float(ref_max))
            dataset.storage.update_metadata(extra)
        os.makedirs(os.path.dirname(final), exist_ok=True)
        os.rename(os.path.join(tmp_root, dataset_id), final)
        # Namespace metadata files Minari wrote in the temporary root, if the real one lacks them.
        for folder, _, files in os.walk(tmp_root):
            for name in files:
                dest = os.path.join(root, os.path.relpath(os.path.join(folder, name), tmp_root))
                if not os.path.exists(dest):
                    os.makedirs(os.path.dirname(dest), exist_ok=True)
                    shutil.copyfile(os.path.join(folder, name), dest)
    finally:
        if old_env is None:
            os.environ.pop("MINARI_DATASETS_PATH", None)
        else:
            os.environ["MINARI_DATASETS_PATH"] = old_env
        shutil.rmtree(tmp_root, ignore_errors=True)
    return final


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    raise TypeError(f"metadata value of type {type(obj).__name__} is not JSON-serialisable")
