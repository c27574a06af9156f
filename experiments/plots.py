"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def _save(fig: Any, path: str | os.PathLike) -> str:
    """Writes the figure atomically (temp file + rename) and closes it."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")
    plt.close(fig)
    os.replace(tmp, path)
    return path


def returns_by_attempt(
    results: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    reference: float | None = None,
    reference_label: str = "optimal",
) -> str:
    """Mean ± std return per attempt, one line per labelled evaluation result.

    Args:
      results: label -> `envs.evaluate.evaluate(...)` result (uses return_mean/return_std).
      path: PNG file to write.
      title: figure title.
      reference: a return to draw as a dashed line (e.g. the mean optimal return of the tasks).
      reference_label: its legend label.

    Returns:
      The written path.
    """
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, result in results.items():
        mean, std = np.asarray(result["return_mean"]), np.asarray(result["return_std"])
        x = np.arange(1, len(mean) + 1)
        ax.plot(x, mean, marker="o", label=f"{label} ({result['num_episodes']} episodes)")
        ax.fill_between(x, mean - std, mean + std, alpha=0.2)
    if reference is not None:
        ax.axhline(reference, ls="--", c="gray", label=reference_label)
    ax.set_xlabel("attempt (earlier attempts in context)")
    ax.set_ylabel("return (mean ± std over episodes)")
    ax.set_xticks(np.arange(1, max(len(r["return_mean"]) for r in results.values()) + 1))
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def return_vs_context(
    rows: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    title: str = "",
    baseline: Mapping[str, Any] | None = None,
    metric: str = "return",
) -> str:
    """Mean ± std (over seeds) of a return metric against n, trajectories in context.

    Args:
      rows: one per n, each with keys "n", "mean", "std".
      path: PNG file to write.
      title: figure title.
      baseline: optional {"label", "mean", "std"} drawn as a horizontal band (e.g. DT).
      metric: y-axis label.

    Returns:
      The written path.
    """
    fig, ax = plt.subplots(figsize=(5, 3.5))
    n = np.array([r["n"] for r in rows])
    mean = np.array([r["mean"] for r in rows])
    std = np.array([r["std"] for r in rows])
    ax.errorbar(n, mean, yerr=std, marker="o", capsize=4, label="AT, n trajectories in context")
    if baseline is not None:
        ax.axhline(baseline["mean"], ls="--", c="C1", label=baseline["label"])
        ax.axhspan(
            baseline["mean"] - baseline["std"],
            baseline["mean"] + baseline["std"],
            color="C1",
            alpha=0.15,
        )
    ax.set_xscale("log", base=2)
    ax.set_xticks(n, [str(v) for v in n])
    ax.set_xlabel("trajectories in context (n)")
    ax.set_ylabel(f"{metric} (mean ± std over seeds)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)
