"""PNG plots of evaluation results (matplotlib, Agg backend: no display needed).

  python -m ringrl.experiments.plots OUT.png "AT n=4=runs/at/eval.json" "DT=runs/dt/eval.json" \
      [--title TEXT]    # return per attempt of several ringrl-eval JSONs in one plot
"""

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
    """Mean return per attempt with a standard-error band, one line per labelled result.

    A result whose agent played more attempts than its context holds (AD's rolling context:
    `context_episodes` < attempts, see agents.evaluation.evaluate_agent) gets a dotted line where
    its context starts to roll (from then on only the n most recent episodes are in context).

    Args:
      results: label -> `envs.evaluate.evaluate(...)` result (uses return_mean/return_se; results
        written before standard errors existed fall back to return_std).
      path: PNG file to write.
      title: figure title.
      reference: a return to draw as a dashed line (e.g. the mean optimal return of the tasks).
      reference_label: its legend label.

    Returns:
      The written path.
    """
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for label, result in results.items():
        mean = np.asarray(result["return_mean"])
        std = np.asarray(result.get("return_se") or result["return_std"])
        x = np.arange(1, len(mean) + 1)
        (line,) = ax.plot(
            x,
            mean,
            marker="o",
            markersize=3 if len(x) > 16 else 6,
            label=f"{label} ({result['num_episodes']} episodes)",
        )
        if len(x) == 1:  # one attempt: an error bar, a band would have no width
            ax.errorbar(x, mean, yerr=std, capsize=4, color=line.get_color())
        ax.fill_between(x, mean - std, mean + std, alpha=0.2, color=line.get_color())
        context = result.get("context_episodes")
        if context is not None and context < len(x):
            ax.axvline(
                context + 0.5,
                ls=":",
                c=line.get_color(),
                label=f"{label}: context rolls (keeps the {context} most recent)",
            )
    if reference is not None:
        ax.axhline(reference, ls="--", c="gray", label=reference_label)
    rolls = any(
        r.get("context_episodes") is not None and r["context_episodes"] < len(r["return_mean"])
        for r in results.values()
    )
    ax.set_xlabel(
        "episode in a row (the n most recent in context)"
        if rolls
        else "attempt (earlier attempts in context)"
    )
    ax.set_ylabel("return (mean ± standard error)")
    attempts = max(len(r["return_mean"]) for r in results.values())
    step = max(1, -(-attempts // 16))  # at most ~16 labelled ticks, so labels never overlap
    ax.set_xticks(np.arange(1, attempts + 1, step))
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
    others: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    label: str = "AT, n trajectories in context",
) -> str:
    """Mean ± standard error (over seeds) of a return metric against n, trajectories in context.

    Args:
      rows: one per n, each with keys "n", "mean", "se".
      path: PNG file to write.
      title: figure title.
      baseline: optional {"label", "mean", "se"} drawn as a horizontal band (e.g. DT).
      metric: y-axis label.
      others: label -> rows like `rows` of other agents (e.g. AD), drawn as further series.
      label: legend entry of `rows`.

    Returns:
      The written path.
    """
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for i, (label, series) in enumerate((others or {}).items()):
        if series:
            ax.errorbar(
                [r["n"] for r in series],
                [r["mean"] for r in series],
                yerr=[r["se"] for r in series],
                marker="sD^v"[i % 4],
                ls="none",
                capsize=4,
                color=f"C{i + 2}",
                label=label,
            )
    n = np.array([r["n"] for r in rows])
    mean = np.array([r["mean"] for r in rows])
    std = np.array([r["se"] for r in rows])
    ax.errorbar(n, mean, yerr=std, marker="o", capsize=4, label=label)
    if baseline is not None:
        ax.axhline(baseline["mean"], ls="--", c="C1", label=baseline["label"])
        ax.axhspan(
            baseline["mean"] - baseline["se"],
            baseline["mean"] + baseline["se"],
            color="C1",
            alpha=0.15,
        )
    ax.set_xscale("log", base=2)
    ticks = sorted(
        {int(v) for v in n} | {int(r["n"]) for rs in (others or {}).values() for r in rs}
    )
    ax.set_xticks(ticks, [str(v) for v in ticks])
    ax.set_xlabel("trajectories in context (n)")
    ax.set_ylabel(f"{metric} (mean ± standard error)")
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return _save(fig, path)


def score_vs_context_panels(
    panels: Mapping[str, Mapping[str, Any]],
    path: str | os.PathLike,
    *,
    cap: int,
) -> str:
    """One panel per dataset: AT's last and best attempt (mean ± standard error over seeds, as
    bands) against n, and DT as a horizontal band.

    Args:
      panels: dataset name -> {"last": rows, "best": rows, "dt": {"mean", "se"} or None}, rows
        one per n with keys "n", "mean", "se".
      path: PNG file to write.
      cap: steps per episode the scores were measured on (for the titles).

    Returns:
      The written path.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, panel) in zip(axes[0], panels.items()):
        for i, (key, label) in enumerate((("last", "AT, last attempt"), ("best", "AT, best of n"))):
            rows = panel[key]
            n = np.array([r["n"] for r in rows])
            mean = np.array([r["mean"] for r in rows])
            se = np.array([r["se"] for r in rows])
            ax.plot(n, mean, marker="os"[i], color=f"C{i}", label=label)
            ax.fill_between(n, mean - se, mean + se, color=f"C{i}", alpha=0.2)
        if panel.get("dt") is not None:
            dt = panel["dt"]
            ax.axhline(dt["mean"], ls="--", c="C3", label="DT (K = 20)")
            ax.axhspan(dt["mean"] - dt["se"], dt["mean"] + dt["se"], color="C3", alpha=0.12)
        ticks = [int(r["n"]) for r in panel["last"]]
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(v) for v in ticks])
        ax.set_xlabel("trajectories in context (n)")
        ax.set_ylabel("normalised score (mean ± s.e.)")
        ax.set_title(f"{name}, first {cap} steps", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def score_vs_start_noise(
    panels: Mapping[str, Sequence[Mapping[str, Any]]],
    path: str | os.PathLike,
    *,
    agent_label: str = "10%BC",
) -> str:
    """One panel per dataset: DT's and %BC's normalised score (mean ± standard error over seeds,
    as bands) against the evaluation's start-state noise scale (log axis), the env's default
    (the data's) marked.

    Args:
      panels: dataset name -> rows of {"scale", "default", "dt": {"mean", "se"}, "bc": ...}
        (experiments/d4rl_suite.py's `start_noise`).
      path: PNG file to write.
      agent_label: the %BC agent's name in the legend.

    Returns:
      The written path.
    """
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.6), squeeze=False)
    for ax, (name, rows) in zip(axes[0], panels.items()):
        rows = sorted(rows, key=lambda r: r["scale"])
        x = np.array([r["scale"] for r in rows])
        for i, (key, label) in enumerate((("dt", "DT (K = 20)"), ("bc", agent_label))):
            mean = np.array([r[key]["mean"] for r in rows])
            se = np.array([r[key]["se"] for r in rows])
            ax.plot(x, mean, marker="os"[i], color=f"C{i}", label=label)
            ax.fill_between(x, mean - se, mean + se, color=f"C{i}", alpha=0.2)
        for r in rows:
            if r.get("default"):
                ax.axvline(r["scale"], ls=":", c="0.4", label="env default (the data's)")
        ax.set_xscale("log")
        ax.set_xlabel("start-state noise (reset_noise_scale)")
        ax.set_ylabel("normalised score (mean ± s.e.)")
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return _save(fig, path)


def main(argv: Sequence[str] | None = None) -> None:
    """Plot the return per attempt of several `eval*.json` files together (LABEL=PATH each)."""
    import argparse
    import json
    import sys

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("out", help="PNG file to write")
    parser.add_argument("runs", nargs="+", metavar="LABEL=PATH", help="an eval JSON and its label")
    parser.add_argument("--title", default="")
    args = parser.parse_args(argv)
    results = {}
    for item in args.runs:
        label, sep, path = item.rpartition("=")
        try:
            if not sep or not label:
                raise ValueError(f"expected LABEL=PATH, got {item!r}")
            with open(path) as f:
                results[label] = json.load(f)
            if "return_mean" not in results[label]:
                raise KeyError("no return_mean: not an evaluation result")
        except (OSError, ValueError, KeyError) as e:
            print(f"error: {item}: {e!r}; pass LABEL=PATH of a ringrl-eval JSON", file=sys.stderr)
            sys.exit(2)
    print(f"wrote {returns_by_attempt(results, args.out, title=args.title)}")


if __name__ == "__main__":
    main()
