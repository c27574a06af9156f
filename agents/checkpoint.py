"""Orbax checkpoints of a training run: train state, sampler state and the config.

One checkpoint = one step directory under `workdir/checkpoints/` holding three items:
  state:   the train state pytree (params, optimizer state, step, rng), array by array, so it can
           be restored onto any mesh/sharding (pass an abstract target carrying shardings);
  sampler: the context sampler's `state_dict()` (JSON), so resumed runs draw the same batches;
  config:  the run's config (JSON), checked against the current config on resume.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; only the last `keep` steps are kept (-1: all).

After orbax has finished a step, `ringrl_files.json` in the step directory records the size and
CRC-32 of every file in it. Restoring checks them first, so a truncated, missing or altered file
is reported as one line naming the step and the file (`CheckpointCorruptError`) instead of a
TensorStore traceback, and `restore_newest` can fall back to the newest intact checkpoint.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import sys
import zlib
from collections.abc import Iterable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

# Config groups whose values must match between a checkpoint and the run that restores it: they
# decide the parameter shapes and the data the parameters were fit to. Optimizer, logging, eval
# and mesh fields may change on resume (e.g. a longer schedule, another device count).
MATCH_GROUPS = ("model", "data")
# Fields inside those groups that do not change what was learned (where a cache lives).
IGNORE_KEYS = ("data.dir",)
# Fields added to the configs after runs were saved, with the value that reproduces what those
# runs did: a saved config without the field matches a current one holding exactly this value.
ADDED_KEYS = {
    "data.history_stride": 1,
    "data.top_fraction": 1.0,
    "eval.reset_noise_scale": 0.0,
}


MANIFEST = "ringrl_files.json"  # per step: {relative path: [size, crc32]} of its files
ITEMS = ("state", "sampler", "config")
KEEP_ALL = -1  # `keep` value that keeps every checkpoint


class ConfigMismatchError(ValueError):
    """The checkpoint was written by a run with a different model/data config."""


class CheckpointCorruptError(ValueError):
    """A checkpoint's files are missing, truncated or altered; the message names step and file."""

    def __init__(self, step: int, path: str, reason: str) -> None:
        super().__init__(f"checkpoint step {step} is unreadable: {path}: {reason}")
        self.step, self.path = step, path


def _crc32(path: str) -> int:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            crc = zlib.crc32(chunk, crc)
    return crc


def _file_table(step_dir: str) -> dict[str, list[int]]:
    table = {}
    for root, _, files in os.walk(step_dir):
        for name in files:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, step_dir)
            if rel != MANIFEST:
                table[rel] = [os.path.getsize(path), _crc32(path)]
    return table


def _first_line(err: BaseException) -> str:
    """The first line of the innermost exception (TensorStore's reason, not orbax's wrapper)."""
    seen = []
    while err is not None and err not in seen:
        seen.append(err)
        err = err.__cause__ or err.__context__
    texts = [str(e).strip() for e in reversed(seen) if str(e).strip()]
    return texts[0].splitlines()[0][:1000] if texts else type(seen[-1]).__name__


def _to_jsonable(value: Any) -> Any:
    """Makes sampler states (numpy scalars/arrays, bit-generator states) JSON-serialisable."""
    if isinstance(value, Mapping):
        return {str(k): _to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        # Bytes, not lists: keeps float bits exact and the file small.
        data = base64.b64encode(np.ascontiguousarray(value).tobytes()).decode("ascii")
        return {"__ndarray__": data, "dtype": value.dtype.str, "shape": list(value.shape)}
    if isinstance(value, np.generic):
        return value.item()
    return value


def _from_jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        if "__ndarray__" in value:
            raw = base64.b64decode(value["__ndarray__"])
            return np.frombuffer(raw, dtype=np.dtype(value["dtype"])).reshape(value["shape"]).copy()
        return {k: _from_jsonable(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_from_jsonable(v) for v in value]
    return value


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    out = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, path + "."))
        else:
            out[path] = value
    return out


def config_mismatch(
    saved: Mapping[str, Any], current: Mapping[str, Any], groups: Iterable[str] = MATCH_GROUPS
) -> list[str]:
    """Dotted keys under `groups` whose values differ (or exist on one side only)."""
    saved_flat = _flatten({g: saved.get(g, {}) for g in groups})
    current_flat = _flatten({g: _to_jsonable(current.get(g, {})) for g in groups})
    # Tuples become lists in JSON; compare the JSON forms so that is not a difference.
    current_flat = {k: _from_jsonable(_to_jsonable(v)) for k, v in current_flat.items()}
    for key, value in ADDED_KEYS.items():
        if key in current_flat:
            saved_flat.setdefault(key, value)
    keys = sorted(set(saved_flat) | set(current_flat))
    return [
        k
        for k in keys
        if k not in IGNORE_KEYS and saved_flat.get(k, "<absent>") != current_flat.get(k, "<absent>")
    ]


def _is_key(x: Any) -> bool:
    return hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _keys_to_data(tree: Any) -> Any:
    """Typed PRNG keys are stored as their uint32 key data (orbax stores plain arrays)."""
    return jax.tree.map(lambda x: jax.random.key_data(x) if _is_key(x) else x, tree)


def _key_impl(x: Any) -> Any:
    # A key's dtype knows its PRNG implementation; works for concrete and abstract keys.
    return x.dtype._impl


def _abstract_key_data(x: Any) -> Any:
    if not _is_key(x):
        return x
    data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(x.shape, x.dtype))
    sharding = getattr(x, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):
        # Key data has one trailing axis more than the key; it is never split.
        sharding = jax.sharding.NamedSharding(sharding.mesh, sharding.spec)
    return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=sharding)


def _abstract(x: Any) -> Any:
    """An abstract restore target leaf: keeps the shape, dtype and (if any) sharding of `x`."""
    if isinstance(x, jax.ShapeDtypeStruct):
        return x
    if isinstance(x, jax.Array):
        return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    if isinstance(x, (np.ndarray, np.generic, int, float)):
        arr = np.asarray(x)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype)
    return x


class Checkpointer:
    """Saves and restores (state, sampler state, config) under `directory`.

    Example:
      ckpt = Checkpointer(workdir / "checkpoints", keep=3)
      if resume and ckpt.latest_step() is not None:
          state, sampler_state = ckpt.restore(abstract_state, config=config)
      ...
      ckpt.save(step, state, sampler_state=sampler.state_dict(), config=config)
    """

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3, create: bool = True) -> None:
        """Args:
        directory: where the step directories live (created if absent and `create`).
        create: False for readers (evaluation): a missing directory is a FileNotFoundError.
        keep: how many most recent checkpoints to keep (>= 1), or KEEP_ALL (-1).

        Raises:
          ValueError: `keep` is neither >= 1 nor KEEP_ALL.
        """
        if keep < 1 and keep != KEEP_ALL:
            raise ValueError(
                f"keep_checkpoints={keep} would delete every checkpoint; use >= 1, or {KEEP_ALL} "
                "to keep all of them"
            )
        self.directory = os.path.abspath(os.fspath(directory))
        if not create and not os.path.isdir(self.directory):
            raise FileNotFoundError(f"no checkpoint in {self.directory}; train first (no --resume)")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=None if keep == KEEP_ALL else keep,
            create=create,
            # Synchronous: a save has finished (and been renamed into place) when save() returns,
            # which is what makes "killed after step k" resumable from step k.
            enable_async_checkpointing=False,
        )
        self._manager = ocp.CheckpointManager(
            self.directory, options=options, item_names=("state", "sampler", "config")
        )

    def latest_step(self) -> int | None:
        """The newest complete checkpoint's step, or None if there is none."""
        self._manager.reload()
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, ascending."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(
        self,
        step: int,
        state: Any,
        *,
        sampler_state: Mapping[str, Any] | None = None,
        config: Any = None,
    ) -> None:
        """Writes checkpoint `step` atomically and drops checkpoints beyond the last `keep`.

        Args:
          step: the training step the state has reached.
          state: the train state pytree (jax arrays, possibly sharded).
          sampler_state: JSON-able dict (numpy arrays and scalars allowed) or None.
          config: the run's ConfigDict (or dict); stored as JSON.
        """
        config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(_keys_to_data(state)),
            sampler=ocp.args.JsonSave(_to_jsonable(dict(sampler_state or {}))),
            config=ocp.args.JsonSave(_to_jsonable(config_dict)),
        )
        self._manager.save(int(step), args=args, force=True)
        self._manager.wait_until_finished()
        if jax.process_index() == 0:
            step_dir = self.step_dir(step)
            table = _file_table(step_dir)
            tmp = os.path.join(step_dir, MANIFEST + ".tmp")
            with open(tmp, "w") as f:
                json.dump(table, f)
            os.replace(tmp, os.path.join(step_dir, MANIFEST))

    def step_dir(self, step: int) -> str:
        """The directory of checkpoint `step`."""
        return os.path.join(self.directory, str(int(step)))

    def verify(self, step: int) -> None:
        """Checks checkpoint `step`'s files against the sizes and CRCs recorded when it was saved.

        A checkpoint saved without the record (older runs, or killed between orbax's rename and
        the record) is only checked for its three item folders; its files are checked by orbax
        when read.

        Raises:
          CheckpointCorruptError: naming the step and the first missing, truncated or altered file.
        """
        step_dir = self.step_dir(step)
        manifest = os.path.join(step_dir, MANIFEST)
        if not os.path.exists(manifest):
            for item in ITEMS:
                if not os.path.isdir(os.path.join(step_dir, item)):
                    raise CheckpointCorruptError(step, os.path.join(step_dir, item), "missing")
            return
        try:
            with open(manifest) as f:
                table = json.load(f)
        except (OSError, ValueError) as err:
            raise CheckpointCorruptError(step, manifest, _first_line(err)) from None
        for rel, (size, crc) in sorted(table.items()):
            path = os.path.join(step_dir, rel)
            if not os.path.isfile(path):
                raise CheckpointCorruptError(step, path, "missing")
            actual = os.path.getsize(path)
            if actual != size:
                raise CheckpointCorruptError(
                    step, path, f"{actual} bytes, {size} when saved (truncated or overwritten)"
                )
            if _crc32(path) != crc:
                raise CheckpointCorruptError(step, path, "contents changed since it was saved")

    def _read(self, step: int, item: str, args: Any, *, verify: bool = True) -> Any:
        """`manager.restore` with unreadable files turned into CheckpointCorruptError."""
        if verify:
            self.verify(step)
        try:
            return self._manager.restore(step, args=args)
        except Exception as err:  # noqa: BLE001 (orbax/TensorStore raise many types)
            path = os.path.join(self.step_dir(step), item)
            if item != "state":
                path = os.path.join(path, "metadata")
            raise CheckpointCorruptError(step, path, _first_line(err)) from None

    def saved_config(self, step: int | None = None) -> dict[str, Any]:
        """The config stored with checkpoint `step` (default: latest) as a plain dict."""
        step = self._resolve(step)
        out = self._read(step, "config", ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out.config)

    def check_config(self, config: Any, step: int | None = None) -> None:
        """Raises ConfigMismatchError naming the model/data keys that differ from checkpoint.

        With `step=None` the newest checkpoint that reads is compared (unreadable newer ones are
        reported by `restore_newest`); if none reads there is nothing to compare.
        """
        current = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        if step is None:
            saved = None
            for s in reversed(self.all_steps()):
                try:
                    saved = self.saved_config(s)
                    break
                except CheckpointCorruptError:
                    continue
            if saved is None:
                return
        else:
            saved = self.saved_config(step)
        diff = config_mismatch(saved, current)
        if diff:
            raise ConfigMismatchError(
                f"checkpoint in {self.directory} was written with a different config "
                f"(differs in {', '.join(diff)}); use the same config or a new --workdir"
            )

    def restore(
        self, target: Any, *, step: int | None = None, config: Any = None
    ) -> tuple[Any, dict[str, Any]]:
        """Restores (state, sampler_state) from checkpoint `step` (default: latest).

        Args:
          target: a pytree like the state: concrete arrays or `jax.ShapeDtypeStruct`s. Leaves that
            carry a sharding are restored with it, so a checkpoint written on one mesh can be read
            onto another (other device or process count).
          step: which checkpoint; None = latest.
          config: if given, the stored config must agree with it in the model/data groups.

        Returns:
          (state with the structure of `target`, sampler state dict).

        Raises:
          FileNotFoundError: no checkpoint in the directory (or not that step).
          ConfigMismatchError: `config` differs from the stored config.
          CheckpointCorruptError: the checkpoint's files are damaged (names step and file).
        """
        step = self._resolve(step)
        if config is not None:
            self.check_config(config, step)
        abstract = jax.tree.map(lambda x: _abstract_key_data(_abstract(x)), target)
        sampler = self._read(step, "sampler", ocp.args.Composite(sampler=ocp.args.JsonRestore()))
        state_args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract))
        out = self._read(step, "state", state_args, verify=False)
        sampler = sampler.sampler
        # Re-wrap key data into typed keys where the target had typed keys.
        state = jax.tree.map(
            lambda t, x: jax.random.wrap_key_data(x, impl=_key_impl(t)) if _is_key(t) else x,
            target,
            out.state,
        )
        return state, _from_jsonable(dict(sampler or {}))

    def restore_newest(
        self, target: Any, *, config: Any = None, set_aside: bool = True
    ) -> tuple[int, Any, dict[str, Any]]:
        """Restores the newest intact checkpoint, falling back past damaged ones.

        Each damaged checkpoint is reported on stderr (one line naming step and file) and, with
        `set_aside`, moved to `<directory>.corrupt/<step>` (kept for inspection; out of the way of
        the steps the resumed run will save again).

        Args:
          target: as for `restore`.
          config: if given, the restored checkpoint's config must agree with it.
          set_aside: move damaged checkpoints out of the directory.

        Returns:
          (step, state, sampler state).

        Raises:
          FileNotFoundError: no checkpoint at all.
          CheckpointCorruptError: every checkpoint is damaged (names the oldest one's file).
          ConfigMismatchError: the newest intact checkpoint was written with another config.
        """
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; train first (no --resume)")
        for i, step in enumerate(reversed(steps)):
            try:
                state, sampler_state = self.restore(target, step=step, config=config)
            except CheckpointCorruptError as err:
                older = steps[-i - 2] if i + 1 < len(steps) else None
                if older is None:
                    raise CheckpointCorruptError(
                        step, err.path, f"{str(err).split(': ', 2)[-1]}; no older checkpoint left"
                    ) from None
                moved = ""
                if set_aside and jax.process_index() == 0:
                    aside = os.path.join(self.directory + ".corrupt", str(step))
                    os.makedirs(os.path.dirname(aside), exist_ok=True)
                    shutil.rmtree(aside, ignore_errors=True)
                    shutil.move(self.step_dir(step), aside)
                    moved = f" (moved to {aside})"
                print(f"warning: {err}{moved}; falling back to step {older}", file=sys.stderr)
                continue
            return step, state, sampler_state
        raise AssertionError("unreachable")

    def _resolve(self, step: int | None) -> int:
        steps = self.all_steps()
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}; train first (no --resume)")
        if step is None:
            return steps[-1]
        if step not in steps:
            raise FileNotFoundError(
                f"no checkpoint for step {step} in {self.directory}; have {steps}"
            )
        return step

    def close(self) -> None:
        """Waits for pending writes and releases the manager."""
        self._manager.wait_until_finished()
        self._manager.close()
