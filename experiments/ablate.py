r"""ringrl-ablate: held-out DarkRoom return vs n trajectories in context (+ DT and AD baselines).

  ringrl-ablate                                   # configs/ablation_context.py, runs/ablation
  ringrl-ablate --config configs/ablation_context.py:smoke --workdir /tmp/abl

One agent per (n, seed) in <workdir>/<cell> (cells with an eval.json are reused), evaluated with n
attempts; prints mean ± std over seeds of attempt 1, the last and the best attempt, the
after-success split, the best-of-n return of the training contexts and, per n, the mean
return per attempt beside the training contexts' per-slot return; then the AD cells (n episodes
of a learning history per context, `ablation.ad_attempts` episodes in a row with a rolling
context): their return at episode 1, at episode n (comparable to AT's last attempt), at the last
episode and the mean of the last 10 episodes, mean ± standard error over seeds; writes
ablation.json and return_vs_context.png.
"""

import json
import os

import numpy as np
from absl import app, flags

from ringrl.configs import ablation_context
from ringrl.envs.evaluate import after_success
from ringrl.experiments import cli
from ringrl.experiments.cells import run_cell, slot_returns, stats

DEFAULT_CONFIG = cli.packaged_config("ablation_context")
_WORKDIR = flags.DEFINE_string("workdir", "runs/ablation", "folder of the per-cell runs")


def ad_row(n: int, results: list[dict]) -> dict:
    """An AD row of the table from its seeds' eval results (K episodes each, K >= n): mean ± se
    over seeds of the return at episode 1, episode n, the last episode, the best episode and the
    mean of the last 10 episodes, and the mean return per episode."""
    last = min(10, len(results[0]["return_mean"]))
    return {
        "n": n,
        "first": stats(results, lambda r: r["return_mean"][0]),
        "at_n": stats(results, lambda r: r["return_mean"][min(n, len(r["return_mean"])) - 1]),
        "last": stats(results, lambda r: r["last_attempt_return_mean"]),
        "best": stats(results, lambda r: r["best_attempt_return_mean"]),
        "last10": stats(results, lambda r: float(np.mean(r["return_mean"][-last:]))),
        **after_success(results),
        "return_by_attempt": np.mean([r["return_mean"] for r in results], 0).tolist(),
    }


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_process()  # joins other processes (ringrl-launch or a cluster) first
    from ringrl.experiments import plots

    base, root = cli.flag_value(), _WORKDIR.value
    cells = [(n, s, "at") for n in base.ablation.ns for s in base.ablation.seeds]
    if base.ablation.dt_baseline:
        cells += [(1, s, "dt") for s in base.ablation.seeds]
    cells += [(n, s, "ad") for n in base.ablation.ad_ns for s in base.ablation.seeds]
    evals = {}
    for n, seed, agent in cells:
        config = ablation_context.cell(base, n, seed, agent)
        evals[(n, seed, agent)] = run_cell(config, os.path.join(root, config.name))

    def summary(keys):
        rs = [evals[k] for k in keys]
        firsts = ("first", lambda r: r["return_mean"][0])
        lasts, bests = (
            ("last", lambda r: r["last_attempt_return_mean"]),
            ("best", lambda r: r["best_attempt_return_mean"]),
        )
        return {
            **{name: stats(rs, key) for name, key in (firsts, lasts, bests)},
            **after_success(rs),
        }

    def data_curve(n: int) -> tuple[float, list[float]]:
        """Over 1024 sampled contexts of the training goals: the mean best of the n draws and
        the mean return of the trajectory in each slot (ascending: slot k holds the k-th worst of
        the n draws)."""
        per_context = slot_returns(ablation_context.cell(base, n, 0))  # [n, contexts]
        # The best of the n (the relabelled target with data.target="best"; computed from the
        # returns, since the default target token is 0).
        best = float(per_context.max(axis=0).mean())
        return best, [float(r) for r in per_context.mean(axis=1)]

    seeds = base.ablation.seeds
    rows = []
    for n in base.ablation.ns:
        keys = [(n, s, "at") for s in seeds]
        best, slots = data_curve(n)
        rows.append(
            {
                "n": n,
                **summary(keys),
                "data_best": best,
                "data_by_slot": slots,
                "return_by_attempt": np.mean([evals[k]["return_mean"] for k in keys], 0).tolist(),
            }
        )
    dt = summary([(1, s, "dt") for s in seeds]) if base.ablation.dt_baseline else None
    ad_rows = [ad_row(n, [evals[(n, s, "ad")] for s in seeds]) for n in base.ablation.ad_ns]
    print(
        f"{base.eval.tasks} goals' return, mean ± standard error over seeds {tuple(seeds)}; "
        f"optimal {next(iter(evals.values())).get('reference_optimal')}"
    )
    print(
        f"{'agent':>5} {'n':>3}  {'attempt 1':>13}  {'last attempt':>13}  {'best attempt':>13}"
        f"  {'after a success':>16}  {'after failures':>16}  {'data: best of n':>15}"
    )
    named = [("AT", r) for r in rows] + ([("DT", {"n": 1, **dt})] if dt else [])
    for name, row in named + [("AD", r) for r in ad_rows]:
        cols = "  ".join(
            f"{row[c]['mean']:6.2f} ± {row[c]['se']:<4.2f}" for c in ("first", "last", "best")
        )
        split = "  ".join(
            f"{row[c]['mean']:6.2f} (n={row[c]['count']:<4})" if row[c]["count"] else f"{'-':>16}"
            for c in ("after_success", "after_failures")
        )
        best = f"{row['data_best']:15.2f}" if "data_best" in row else f"{'-':>15}"
        print(f"{name:>5} {row['n']:>3}  {cols}  {split}  {best}")
    print("after a success / after failures: mean return of attempts 2.. when an earlier attempt")
    print("on the same goal scored / when none did (n = episodes, pooled over seeds)")
    print("data: best of n: mean return of the best of n trajectories in a training context (the")
    print("relabelled target the last slot imitates; training goals, where the goal is known)")
    if rows:
        print("per attempt (mean over seeds) against the data's slot k (k-th worst of n draws):")
    for row in rows:
        agent = " ".join(f"{r:5.2f}" for r in row["return_by_attempt"])
        data = " ".join(f"{r:5.2f}" for r in row["data_by_slot"])
        print(f"n={row['n']:<3} agent {agent}\n      data  {data}")
    if ad_rows:
        print(
            "AD: a rolling context of the n most recent episodes; last = episode "
            f"{base.ablation.ad_attempts} (the best attempt above is the best of them)"
        )
        print(
            f"{'agent':>5} {'n':>3}  {'episode 1':>13}  {'episode n':>13}  {'last episode':>13}"
            f"  {'mean of last 10':>15}"
        )
        for row in ad_rows:
            cols = "  ".join(
                f"{row[c]['mean']:6.2f} ± {row[c]['se']:<4.2f}"
                for c in ("first", "at_n", "last", "last10")
            )
            print(f"{'AD':>5} {row['n']:>3}  {cols}")
        for row in ad_rows:
            curve = " ".join(f"{r:5.2f}" for r in row["return_by_attempt"])
            print(f"AD n={row['n']} per episode (mean over seeds): {curve}")
    os.makedirs(root, exist_ok=True)
    with open(os.path.join(root, "ablation.json.tmp"), "w") as f:
        json.dump({"rows": rows, "dt": dt, "ad": ad_rows}, f, indent=1)
    os.replace(os.path.join(root, "ablation.json.tmp"), os.path.join(root, "ablation.json"))
    png = plots.return_vs_context(
        [{"n": r["n"], **r["last"]} for r in rows],
        os.path.join(root, "return_vs_context.png"),
        title=f"DarkRoom {base.eval.tasks} goals: last attempt",
        baseline={"label": "DT (one trajectory)", **dt["last"]} if dt else None,
        metric="return of attempt n",
        others={
            "AD, episode n (rolling context)": [{"n": r["n"], **r["at_n"]} for r in ad_rows],
            f"AD, mean of episodes {max(1, base.ablation.ad_attempts - 9)}-"
            f"{base.ablation.ad_attempts}": [{"n": r["n"], **r["last10"]} for r in ad_rows],
        }
        if ad_rows
        else None,
    )
    print(f"wrote {os.path.join(root, 'ablation.json')} and {png}")


def run() -> None:
    """Console-script entry point (ringrl-ablate)."""
    cli.run(main, default=DEFAULT_CONFIG)


if __name__ == "__main__":
    run()
