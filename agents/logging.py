"""Metric logging: wandb (offline by default, never asks for a login) + JSON lines in the workdir.

Only process 0 logs (`jax.process_index() == 0`); on other processes the logger does nothing, so
multi-host runs write one metrics file and one wandb run.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

WANDB_MODES = ("offline", "online", "disabled")


def _scalar(value: Any) -> float | int | None:
    """A JSON-able Python number from a jax/numpy scalar; None for non-scalars."""
    arr = np.asarray(value)
    if arr.shape != () or arr.dtype.kind not in "biuf":
        return None
    item = arr.item()
    if isinstance(item, float) and not math.isfinite(item):
        return None if math.isnan(item) else item  # JSON has no NaN; keep inf as a number
    return item


class MetricLogger:
    """Writes metrics to `workdir/metrics.jsonl` and to wandb.

    Args:
      workdir: run directory; `metrics.jsonl` and `wandb/` are created inside it.
      config: the run config (ConfigDict or dict), recorded as the wandb run config.
      wandb_mode: "offline" (default: logs to disk, sync later with `wandb sync`), "online" or
        "disabled". The WANDB_MODE environment variable, if set, wins (tests set "disabled").
      project: wandb project name.
      name: wandb run name (default: the workdir's basename).
      resume_step: the step the run starts from. Rows of `metrics.jsonl` past it (written by a
        run that was killed or fell back to an older checkpoint) are dropped, so every step is
        logged once; None keeps the file as it is.
    """

    def __init__(
        self,
        workdir: str | os.PathLike,
        config: Any = None,
        *,
        wandb_mode: str = "offline",
        project: str = "ringrl",
        name: str | None = None,
        resume_step: int | None = None,
    ) -> None:
        mode = os.environ.get("WANDB_MODE", wandb_mode)
        if mode not in WANDB_MODES:
            raise ValueError(f"wandb mode must be one of {', '.join(WANDB_MODES)}, got {mode!r}")
        self.workdir = os.fspath(workdir)
        self.active = jax.process_index() == 0
        self.path = os.path.join(self.workdir, "metrics.jsonl")
        self._run = None
        self._file = None
        if not self.active:
            return
        os.makedirs(self.workdir, exist_ok=True)
        if resume_step is not None:
            drop_rows_after(self.path, resume_step)
        self._file = open(self.path, "a")  # append: a resumed run continues the same file
        if mode != "disabled":
            import wandb

            config_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config or {})
            self._run = wandb.init(
                project=project,
                name=name or os.path.basename(os.path.abspath(self.workdir)),
                dir=self.workdir,
                mode=mode,
                config=config_dict,
                resume="allow",
                id=_run_id(self.workdir),
                settings=wandb.Settings(silent=True, console="off"),
            )

    def log(self, step: int, metrics: Mapping[str, Any]) -> None:
        """Logs scalar metrics at `step`; non-scalar values are skipped.

        Args:
          step: training step.
          metrics: name -> scalar (python, numpy or jax). Names may contain "/" (e.g. "eval/...").
        """
        if not self.active:
            return
        row = {k: v for k, v in ((k, _scalar(v)) for k, v in metrics.items()) if v is not None}
        self._file.write(json.dumps({"step": int(step), **row}) + "\n")
        self._file.flush()
        if self._run is not None:
            self._run.log(row, step=int(step))

    def close(self) -> None:
        """Flushes and closes the metrics file and the wandb run."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._run is not None:
            self._run.finish()
            self._run = None


def drop_rows_after(path: str | os.PathLike, step: int) -> int:
    """Rewrites a metrics.jsonl file without its rows past `step` (atomically).

    A torn last line (the writer was killed mid-row) is dropped too.

    Returns:
      the number of rows dropped.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and int(row.get("step", 0)) <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    dropped = len(lines) - len(keep)
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
    return dropped


def _run_id(workdir: str) -> str:
    """A stable wandb run id per workdir, so --resume continues the same wandb run."""
    path = os.path.join(workdir, "wandb_run_id")
    if os.path.exists(path):
        with open(path) as f:
            return f.read().strip()
    run_id = uuid.uuid4().hex[:8]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(run_id)
    os.replace(tmp, path)
    return run_id


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
    """All rows of `workdir/metrics.jsonl` (empty if absent)."""
    path = os.path.join(os.fspath(workdir), "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
