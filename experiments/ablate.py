r"""Context-length ablation: return on held-out DarkRoom goals vs n trajectories in context.

  python -m experiments.ablate                       # configs/ablation_context.py, runs/ablation
  python -m experiments.ablate --config configs/ablation_context.py:smoke --workdir /tmp/abl
  python -m experiments.ablate --config.ablation.ns=1,2,4 --config.ablation.seeds=0,1

Trains one agent per (n, seed) cell in <workdir>/<cell name> (a finished cell, i.e. one with an
eval.json, is reused, so an interrupted ablation continues where it stopped), evaluates it on the
held-out goals with n attempts, and prints mean ± std over seeds of the last attempt's return
(the agent having read its n-1 earlier attempts), plus attempt 1 and the best attempt. Writes
ablation.json and return_vs_context.png.
"""

import json
import os
import sys

import numpy as np
from absl import app, flags
from ml_collections import config_flags

from configs import ablation_context, common

DEFAULT_CONFIG = "configs/ablation_context.py"
_CONFIG = config_flags.DEFINE_config_file(
    "config", common.resolve_config_path(DEFAULT_CONFIG), "config file[:args]", lock_config=True
)
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablation", "folder of the per-cell runs")


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": float(np.mean(values)), "std": float(np.std(values)), "values": values}


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import jax
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
    jax.config.update("jax_threefry_partitionable", True)
    from agents.trainer import train_and_evaluate
    from experiments import plots

    base, root = _CONFIG.value, _WORKDIR.value
    cells = [(n, s, "at") for n in base.ablation.ns for s in base.ablation.seeds]
    if base.ablation.dt_baseline:
        cells += [(1, s, "dt") for s in base.ablation.seeds]
    evals = {}
    for n, seed, agent in cells:
        config = ablation_context.cell(base, n, seed, agent)
        workdir = os.path.join(root, config.name)
        path = os.path.join(workdir, "eval.json")
        if not os.path.exists(path):
            print(f"== {config.name}", flush=True)
            try:
                train_and_evaluate(config, workdir, resume=True)
            except (ValueError, FileNotFoundError) as e:
                print(f"error: {e}".splitlines()[0], file=sys.stderr)
                sys.exit(2)
        with open(path) as f:
            evals[(n, seed, agent)] = json.load(f)

    def summary(keys):
        results = [evals[k] for k in keys]
        return {
            "last": _stats([r["last_attempt_return_mean"] for r in results]),
            "first": _stats([r["return_mean"][0] for r in results]),
            "best": _stats([r["best_attempt_return_mean"] for r in results]),
        }

    rows = [
        {"n": n, **summary([(n, s, "at") for s in base.ablation.seeds])} for n in base.ablation.ns
    ]
    dt = summary([(1, s, "dt") for s in base.ablation.seeds]) if base.ablation.dt_baseline else None
    optimal = next(iter(evals.values())).get("reference_optimal")
    print(
        f"held-out return, mean ± std over seeds {tuple(base.ablation.seeds)} "
        f"(optimal {optimal:.2f}):"
        if optimal
        else "return, mean ± std over seeds:"
    )
    print(f"{'agent':>8} {'n':>3}  {'attempt 1':>13}  {'last attempt':>13}  {'best attempt':>13}")
    fmt = lambda s: f"{s['mean']:6.2f} ± {s['std']:<4.2f}"
    for row in rows:
        print(
            f"{'AT':>8} {row['n']:>3}  {fmt(row['first'])}  {fmt(row['last'])}  {fmt(row['best'])}"
        )
    if dt:
        print(f"{'DT':>8} {1:>3}  {fmt(dt['first'])}  {fmt(dt['last'])}  {fmt(dt['best'])}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "ablation.json.tmp"), "w") as f:
        json.dump({"rows": rows, "dt": dt, "optimal": optimal}, f, indent=1)
    os.replace(os.path.join(root, "ablation.json.tmp"), os.path.join(root, "ablation.json"))
    png = plots.return_vs_context(
        [{"n": r["n"], **r["last"]} for r in rows],
        os.path.join(root, "return_vs_context.png"),
        title="DarkRoom held-out goals: last attempt",
        baseline={"label": "DT (one trajectory)", **dt["last"]} if dt else None,
        metric="return of attempt n",
    )
    print(f"wrote {os.path.join(root, 'ablation.json')} and {png}")


def run() -> None:
    """Console-script entry point (ringrl-ablate)."""
    common.run(main, default=DEFAULT_CONFIG)


if __name__ == "__main__":
    run()
