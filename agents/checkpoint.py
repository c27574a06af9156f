"""Orbax checkpoints of a training run: train state, sampler state and the config.

One checkpoint = one step directory under `workdir/checkpoints/` holding three items:
  state:   the train state pytree (params, optimizer state, step, rng), array by array, so it can
           be restored onto any mesh/sharding (pass an abstract target carrying shardings);
  sampler: the context sampler's `state_dict()` (JSON), so resumed runs draw the same batches;
  config:  the run's config (JSON), checked against the current config on resume.

Orbax writes each step to a temporary directory and renames it when complete, so a run killed
mid-save leaves the previous checkpoint intact; only the last `keep` steps are kept.
"""

from __future__ import annotations

import base64
import os
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


class ConfigMismatchError(ValueError):
    """The checkpoint was written by a run with a different model/data config."""


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

    def __init__(self, directory: str | os.PathLike, *, keep: int = 3) -> None:
        """Args:
        directory: where the step directories live (created if absent).
        keep: how many most recent checkpoints to keep.
        """
        self.directory = os.path.abspath(os.fspath(directory))
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            create=True,
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

    def saved_config(self, step: int | None = None) -> dict[str, Any]:
        """The config stored with checkpoint `step` (default: latest) as a plain dict."""
        step = self._resolve(step)
        out = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
        return dict(out.config)

    def check_config(self, config: Any, step: int | None = None) -> None:
        """Raises ConfigMismatchError naming the model/data keys that differ from checkpoint."""
        current = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        diff = config_mismatch(self.saved_config(step), current)
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
        """
        step = self._resolve(step)
        if config is not None:
            self.check_config(config, step)
        abstract = jax.tree.map(lambda x: _abstract_key_data(_abstract(x)), target)
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract), sampler=ocp.args.JsonRestore()
            ),
        )
        # Re-wrap key data into typed keys where the target had typed keys.
        state = jax.tree.map(
            lambda t, x: jax.random.wrap_key_data(x, impl=_key_impl(t)) if _is_key(t) else x,
            target,
            out.state,
        )
        return state, _from_jsonable(dict(out.sampler or {}))

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
