"""One validation pass over a run config, before any data is loaded or anything is written.

`validate(config, devices=...)` returns one line per problem, each naming the config field, its
value and the fix; `check` raises them together as a `ConfigError`. The checks are
arithmetic on the config and the device count (the mesh is built from the devices, nothing is
compiled), so a bad batch size or mesh costs milliseconds, not a data load and a compile.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import ml_collections

from ringrl.agents.agent import AGENTS, check_config
from ringrl.agents.backbone import ACTIVATIONS
from ringrl.agents.checkpoint import KEEP_ALL
from ringrl.agents.evaluation import EVAL_TASKS
from ringrl.ring.layout import LAYOUTS, layout_unit
from ringrl.ring.mesh import DATA, SEQ, make_mesh


class ConfigError(ValueError):
    """Config fields out of range or inconsistent with the mesh; one line per problem."""

    def __init__(self, errors: Sequence[str]) -> None:
        super().__init__("\n".join(errors))
        self.errors = list(errors)


def _int_at_least(errors: list[str], name: str, value: Any, low: int, fix: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        errors.append(f"config.{name}={value!r} must be an integer >= {low}{fix}")


def validate(
    config: ml_collections.ConfigDict, *, devices: Sequence[jax.Device] | None = None
) -> list[str]:
    """Checks a training config's ranges and its divisibility with the mesh.

    Args:
      config: a config from configs/*.py (fields absent from it are not checked).
      devices: the devices the mesh is built from (default: `jax.devices()`).

    Returns:
      one line per problem, `config.<field>=<value> ...; <fix>`; empty if the config is fine.
    """
    errors: list[str] = []
    c = config
    _int_at_least(errors, "num_steps", c.num_steps, 1, " (ringrl-eval evaluates a trained run)")
    _int_at_least(errors, "batch_size", c.batch_size, 1)
    _int_at_least(errors, "log_every", c.log_every, 1)
    _int_at_least(errors, "checkpoint_every", c.checkpoint_every, 1)
    keep = c.keep_checkpoints
    if isinstance(keep, bool) or not isinstance(keep, int) or (keep < 1 and keep != KEEP_ALL):
        errors.append(
            f"config.keep_checkpoints={keep!r} must be >= 1 (checkpoints kept), or {KEEP_ALL} "
            "to keep all of them"
        )
    o = c.optim
    if not o.lr > 0:
        errors.append(f"config.optim.lr={o.lr!r} must be > 0")
    _int_at_least(errors, "optim.warmup_steps", o.warmup_steps, 0)
    if o.weight_decay < 0:
        errors.append(f"config.optim.weight_decay={o.weight_decay!r} must be >= 0")
    if not o.grad_clip > 0:
        errors.append(f"config.optim.grad_clip={o.grad_clip!r} must be > 0")

    d = c.data
    steps = None  # timesteps per context
    if d.mode not in AGENTS:
        errors.append(f"config.data.mode={d.mode!r} is unknown; use one of {tuple(AGENTS)}")
    _int_at_least(errors, "data.horizon", d.horizon, 1)
    if d.mode == "dt":
        _int_at_least(errors, "data.context_steps", d.context_steps, 1, " (the DT window K)")
        if d.num_trajectories != 1:
            errors.append(
                f"config.data.num_trajectories={d.num_trajectories!r} must be 1 for mode 'dt'"
            )
        if isinstance(d.context_steps, int) and d.context_steps >= 1:
            steps = d.context_steps
    elif d.mode in AGENTS:
        _int_at_least(errors, "data.num_trajectories", d.num_trajectories, 1)
        if isinstance(d.num_trajectories, int) and isinstance(d.horizon, int):
            steps = d.num_trajectories * d.horizon if d.num_trajectories >= 1 else None
    top = d.get("top_fraction", 1.0)
    if isinstance(top, bool) or not isinstance(top, int | float) or not 0 < top <= 1:
        errors.append(
            f"config.data.top_fraction={top!r} must be in (0, 1] (the best episodes' share of "
            "the steps that DT draws windows from; 1: all)"
        )
    elif top != 1 and d.mode != "dt":
        errors.append(
            f"config.data.top_fraction={top!r} is DT's (%BC); mode {d.mode!r} reads every "
            "episode: set it to 1"
        )
    if d.mode in AGENTS:
        try:  # the agent's own fields (tokens per step, target rule), the same check as eval's
            check_config(c)
        except ValueError as err:
            errors.append(str(err))

    m = c.model
    for field in ("embed_dim", "num_layers", "num_heads", "mlp_ratio"):
        _int_at_least(errors, f"model.{field}", m[field], 1)
    if isinstance(m.num_heads, int) and m.num_heads >= 1 and m.embed_dim % m.num_heads:
        errors.append(
            f"config.model.embed_dim={m.embed_dim} is not divisible by "
            f"config.model.num_heads={m.num_heads}"
        )
    dropout = m.get("dropout", 0.0)
    if isinstance(dropout, bool) or not isinstance(dropout, int | float) or not 0 <= dropout < 1:
        errors.append(f"config.model.dropout={dropout!r} must be a number in [0, 1)")
    activation = m.get("activation", "gelu")
    if activation not in ACTIVATIONS:
        errors.append(
            f"config.model.activation={activation!r} is unknown; use one of {sorted(ACTIVATIONS)}"
        )

    e = c.eval
    _int_at_least(errors, "eval.every", e.every, 0, " (0: only at the end)")
    _int_at_least(errors, "eval.attempts", e.attempts, 1)
    _int_at_least(errors, "eval.num_envs", e.num_envs, 1)
    _int_at_least(errors, "eval.max_steps", e.max_steps, 0, " (0: the env's time limit)")
    if (
        d.mode in ("at", "ad")
        and all(isinstance(x, int) and x >= 1 for x in (e.attempts, d.num_trajectories))
        and e.attempts > d.num_trajectories
    ):
        if d.mode == "at":
            errors.append(
                f"config.eval.attempts={e.attempts} > config.data.num_trajectories="
                f"{d.num_trajectories}: mode 'at' keeps every attempt in its n slots; only mode "
                "'ad' plays more attempts than n (a rolling context of the n most recent "
                f"episodes); use eval.attempts <= {d.num_trajectories}"
            )
        elif m.slot_embedding:
            errors.append(
                f"config.eval.attempts={e.attempts} > config.data.num_trajectories="
                f"{d.num_trajectories} needs a rolling context, which config.model.slot_embedding"
                "=True rules out (slots past n were never trained); set it to False"
            )
    noise = e.get("reset_noise_scale", 0.0)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not noise >= 0:
        errors.append(
            f"config.eval.reset_noise_scale={noise!r} must be a number >= 0 (0: the env's default)"
        )
    if e.tasks not in EVAL_TASKS:
        errors.append(f"config.eval.tasks={e.tasks!r} must be one of {EVAL_TASKS}")

    try:
        mesh = make_mesh(c.mesh, devices)
    except ValueError as err:
        errors.append(f"config.mesh={tuple(map(tuple, c.mesh))}: {err}")
        return errors
    n_data, n_seq = mesh.shape.get(DATA), mesh.shape.get(SEQ)
    if n_data is None or n_seq is None:
        errors.append(f"config.mesh={tuple(map(tuple, c.mesh))} needs axes {DATA!r} and {SEQ!r}")
        return errors
    if isinstance(c.batch_size, int) and c.batch_size >= 1 and c.batch_size % n_data:
        errors.append(
            f"config.batch_size={c.batch_size} is not a multiple of the mesh's {DATA!r} axis "
            f"({n_data} devices); use a multiple of {n_data} or change config.mesh"
        )
    # Steps are permuted into the layout over the seq devices (zigzag: 2 chunks per device).
    unit = layout_unit(n_seq, m.layout) if m.layout in LAYOUTS else n_seq
    if steps is not None and steps % unit:
        what = (
            "config.data.context_steps"
            if d.mode == "dt"
            else "config.data.num_trajectories * config.data.horizon"
        )
        per = f"2 x the mesh's {SEQ!r} axis" if unit != n_seq else f"the mesh's {SEQ!r} axis"
        errors.append(
            f"{what} = {steps} context steps is not a multiple of {per} ({n_seq} devices, "
            f"layout {m.layout!r}); make it a multiple of {unit} or change config.mesh"
            + (" or config.model.layout" if unit != n_seq else "")
        )
    if m.attention == "dense" and n_seq != 1:
        errors.append(
            f"config.model.attention='dense' needs the mesh's {SEQ!r} axis of size 1, got {n_seq}"
        )
    return errors


def check(
    config: ml_collections.ConfigDict, *, devices: Sequence[jax.Device] | None = None
) -> None:
    """Raises `ConfigError` (a ValueError, one line per problem) if `validate` finds any."""
    errors = validate(config, devices=devices)
    if errors:
        raise ConfigError(errors)
