r"""ringrl-d4rl: DT and AT on generated MuJoCo sets over seeds, and AT's n-ablation (issue 15).

  ringrl-d4rl                                    # configs/d4rl_suite.py, runs/d4rl
  ringrl-d4rl --config configs/d4rl_suite.py:data=/path/to/sets --workdir runs/d4rl

One run per cell of configs/d4rl_suite.py in <workdir>/<cell> (cells with an eval.json are
reused; a cell trained with other settings is refused), then:
- per set, normalised scores (100 * (R - random) / (expert - random), references from the sets'
  own files), mean ± standard error over seeds of each run's mean over its evaluation episodes:
  the data (mean and best 10% of the set's episodes), DT on whole episodes, and at the cap
  (every episode cut at `suite.cap` steps, references cut there too) the data, DT, and AT's best
  and last of n attempts;
- the n-ablation on each of `suite.ablation_sets`: AT's first, last and best attempt at the cap
  against n, and its return per attempt against the data's slot k;
- on each of `suite.bc_sets`, %BC's score beside DT's, and where the set has DT cells too, what
  the two fit and how far DT's actions follow its return-to-go (`fit_probe`);
- d4rl_suite.json and score_vs_context.png (one panel per ablation set) in <workdir>.

With `--config.suite.targets="('high','low')"` the evaluation target of each (set, agent, n) is
chosen on validation episodes (other environment seeds) among the candidates, and the tables
report the test episodes at the chosen one (`select_targets`).
"""

import functools
import json
import os

import numpy as np
from absl import app, flags

from ringrl.configs import d4rl_suite, dt_d4rl
from ringrl.envs import generate
from ringrl.envs.scores import normalize, reference_scores
from ringrl.experiments import cli
from ringrl.experiments.cells import run_cell, slot_returns, stats

DEFAULT_CONFIG = cli.packaged_config("d4rl_suite")


def cells(suite) -> list[tuple[str, str, int, int]]:
    """(set, agent, n, seed) of every run, in the order they are trained: the DT/AT table first,
    then the ablation's other ns, then DT on the DT-only sets, then %BC on `suite.bc_sets`."""
    out = []
    for name in suite.sets:
        for seed in suite.seeds:
            out += [(name, "dt", 1, seed), (name, "at", suite.at_n, seed)]
    for name in suite.ablation_sets:
        for n in suite.ablation_ns:
            for seed in suite.seeds:
                if (name, "at", n, seed) not in out:
                    out.append((name, "at", n, seed))
    out += [(name, "dt", 1, seed) for name in suite.dt_sets for seed in suite.seeds]
    out += [(name, "bc", 1, seed) for name in suite.bc_sets for seed in suite.seeds]
    return out


def family_of(name: str) -> str:
    """ "hopper-medium-replay" -> "hopper" (configs/dt_d4rl.py's task family)."""
    return dt_d4rl.task_family("", name)


@functools.cache
def references(
    folder: str, family: str, cap: int | None = None, version: int = 0
) -> tuple[float, float]:
    """(random, expert) reference returns of a family: over whole episodes (cap None) the files'
    own ref_min_score / ref_max_score; over each episode's first `cap` steps, the mean return of
    the family's random and expert sets cut there (loaded once per call arguments)."""
    from ringrl.envs.datasets import load_d4rl

    if cap is None:
        return reference_scores(d4rl_suite.data_path(folder, f"{family}-random", version))
    out = [
        float(
            load_d4rl(d4rl_suite.data_path(folder, f"{family}-{level}", version))
            .returns_within(cap)
            .mean()
        )
        for level in ("random", "expert")
    ]
    return out[0], out[1]


def normalise(returns, ref: tuple[float, float]) -> np.ndarray:
    """100 * (R - random) / (expert - random), as a float64 array."""
    return np.asarray(normalize(np.asarray(returns, np.float64), ref))


def data_scores(folder: str, name: str, cap: int, version: int = 0) -> dict[str, float]:
    """The set's own episodes, normalised: mean and best-10% mean, whole and cut at `cap`."""
    from ringrl.envs.datasets import load_d4rl

    data = load_d4rl(d4rl_suite.data_path(folder, name, version))
    family = family_of(name)
    out = {}
    for suffix, returns, ref in (
        ("", data.returns, references(folder, family, None, version)),
        ("_cap", data.returns_within(cap), references(folder, family, cap, version)),
    ):
        out["mean" + suffix] = float(normalise(np.mean(returns), ref))
        out["best10" + suffix] = float(normalise(generate.best_mean(returns), ref))
    out["episodes"] = int(data.num_episodes)
    return out


def data_by_slot(config, ref: tuple[float, float], contexts: int = 1024) -> list[float]:
    """Normalised mean return of the trajectory in each slot of an AT cell's training contexts
    (slot k holds the k-th worst of the n draws, cut at the cap): what attempt k imitates."""
    per_slot = slot_returns(config, contexts).mean(axis=1)
    return [float(v) for v in normalise(per_slot, ref)]


def eval_file(workdir: str, tag: str, **overrides) -> dict:
    """A cell's checkpoint evaluated again with config.eval `overrides` (max_steps, target_return,
    seed), written once as <workdir>/eval_<tag>.json and reused."""
    from ringrl.agents.evaluation import evaluate_checkpoint, write_eval

    path = os.path.join(workdir, f"eval_{tag}.json")
    if not os.path.exists(path):
        _, result = evaluate_checkpoint(workdir, **overrides)
        write_eval(workdir, result, f"eval_{tag}.json")
    with open(path) as f:
        return json.load(f)


def run_score(result: dict, ref: tuple[float, float], which: str = "last") -> float:
    """One run's mean over its episodes of the normalised last (or best) attempt."""
    norm = normalise(result["returns"], ref)  # [episodes, attempts]
    return float((norm.max(1) if which == "best" else norm[:, -1]).mean())


def select_targets(base, root: str, evals: dict) -> dict:
    """The evaluation target of every (set, agent, n) among `suite.targets`, chosen on validation
    episodes; `evals` (cell -> its eval.json at `suite.target`) becomes the test episodes at it.

    Every cell is evaluated at every candidate on `suite.episodes` validation environments
    (seeds: the cell's test seed + `suite.valid_seed`); the candidate with the best mean over
    seeds (DT: whole episodes; AT: best attempt at the cap) wins, ties to the first; %BC cells
    keep `suite.target` (their return-to-go input is zeroed). Returns
    (set, agent, n) -> {"target", "valid": {candidate: mean validation score}}; test episodes
    at a candidate other than `suite.target` are eval_test_<target>.json (DT at the cap:
    eval_cap_<target>.json).
    """
    suite = base.suite
    candidates = tuple(suite.targets) or (suite.target,)
    if len(candidates) == 1 and candidates[0] == suite.target:
        return {}
    if suite.episodes >= suite.valid_seed:
        raise ValueError(
            f"suite.valid_seed={suite.valid_seed} must exceed suite.episodes={suite.episodes} so "
            "validation and test environments differ"
        )
    by_group = {}
    for key in evals:
        if key[1] != "bc":  # %BC reads no return-to-go: no target to choose
            by_group.setdefault((key[0], key[1], key[2]), []).append(key)
    chosen = {}
    for group, keys in by_group.items():
        name, agent, _ = group
        # DT: whole episodes; AT: its best attempt on episodes cut at the cap.
        cap, which = (None, "last") if agent == "dt" else (suite.cap, "best")
        ref = references(suite.data, family_of(name), cap, suite.data_version)
        valid = {}
        for t in candidates:
            value = d4rl_suite.eval_target(suite, name, agent, t)
            per_seed = []
            for key in keys:
                config = d4rl_suite.cell(base, *key)
                result = eval_file(
                    os.path.join(root, config.name),
                    f"valid_{t}",
                    target_return=value,
                    seed=config.eval.seed + suite.valid_seed,
                )
                per_seed.append(run_score(result, ref, which))
            valid[t] = float(np.mean(per_seed))
        best = max(candidates, key=lambda t: valid[t])  # first of equal ones
        chosen[group] = {"target": best, "valid": valid}
        if best == suite.target:
            continue
        value = d4rl_suite.eval_target(suite, name, agent, best)
        for key in keys:
            evals[key] = eval_file(
                os.path.join(root, d4rl_suite.cell(base, *key).name),
                f"test_{best}",
                target_return=value,
            )
    return chosen


def fit_probe(base, root: str, name: str, seed: int) -> dict:
    """What DT and %BC learned on set `name` (seed `seed`): their action MSE on training windows
    (`suite.probe_windows` each) from %BC's episodes ("seen"), from the next episodes by return
    holding as many steps ("next": returns like %BC's, but %BC never saw them) and from the
    rest; DT's mean |action change| when each window's return-to-go is shifted to start at each
    candidate target ("shift", target -> value); and the mean |DT - %BC| action gap ("dt_bc").

    If DT follows its return-to-go, a shift moves its actions about as far as the DT - %BC gap.
    If %BC fits its own episodes far better than the "next" ones, it imitates those episodes
    rather than a behaviour that high returns share.
    """
    from ringrl.agents import step
    from ringrl.agents.dt import WindowSampler, top_episodes
    from ringrl.agents.evaluation import restore_checkpoint

    suite = base.suite
    restored = {}
    for agent in ("dt", "bc"):
        run = os.path.join(root, d4rl_suite.cell(base, name, agent, 1, seed).name)
        _, model, params, data = restore_checkpoint(run)
        restored[agent] = (model, params, step.make_eval_step(model.model, model.mesh))
    trajectories, k = data.trajectories, int(restored["bc"][0].config.data.context_steps)
    seen = restored["bc"][0].sampler.drawn
    returns = restored["bc"][0].sampler.episode_returns
    lengths = np.diff(np.asarray(trajectories.episode_starts))
    nxt = top_episodes(returns, lengths, min(1.0, 2 * suite.bc_fraction)) & ~seen
    bands = {"seen": seen, "next": nxt, "rest": ~(seen | nxt)}

    def predict(agent, batch):
        model, params, eval_step = restored[agent]
        return np.asarray(eval_step(params, model.put_batch(batch))[0])

    out = {}
    for band, episodes in bands.items():
        if not episodes.any():  # e.g. %BC on every episode: nothing unseen
            out[band] = None
            continue
        batch = WindowSampler(trajectories, context_steps=k, seed=seed, episodes=episodes).sample(
            suite.probe_windows
        )
        mask = batch["mask"] > 0
        out[band] = {
            agent: float(((predict(agent, batch) - batch["actions"]) ** 2)[mask].mean())
            for agent in restored
        }
    batch = WindowSampler(trajectories, context_steps=k, seed=seed).sample(suite.probe_windows)
    mask = batch["mask"] > 0
    dt = predict("dt", batch)
    out["dt_bc"] = float(np.abs(dt - predict("bc", batch))[mask].mean())
    out["shift"] = {}
    rtg = batch["target_returns"]
    for target in tuple(suite.targets) or (suite.target,):
        value = d4rl_suite.eval_target(suite, name, "dt", target)
        shifted = dict(batch, target_returns=((rtg - rtg[:, :1] + value) * mask).astype(np.float32))
        out["shift"][target] = float(np.abs(predict("dt", shifted) - dt)[mask].mean())
    return out


def start_noise(base, root: str, evals: dict, chosen: dict) -> dict:
    """DT and %BC on every set of `suite.bc_sets` that has both, evaluated again on their test
    episodes (same environment seeds, DT at its chosen target) with each start-state noise scale
    of `suite.start_noise` (eval_start<scale>_<target>.json). Returns set -> rows of {"scale",
    "default", "dt", "bc"} (stats over seeds), the first row the test episodes at the env's
    default noise (the data's).

    An agent that replays the data's luckiest episodes from the near-identical starts the data
    had should lose more, as the starts spread, than one that acts well from any nearby state.
    """
    suite = base.suite
    out = {}
    for name in suite.bc_sets:
        if name not in tuple(suite.sets) + tuple(suite.dt_sets):
            continue
        from ringrl.envs.evaluate import default_reset_noise

        ref = references(suite.data, family_of(name), None, suite.data_version)
        env_id = evals[(name, "dt", 1, suite.seeds[0])]["env_id"]
        rows = [{"scale": default_reset_noise(env_id), "default": True}]
        for agent in ("dt", "bc"):
            keys = [(name, agent, 1, s) for s in suite.seeds]
            rows[0][agent] = stats([run_score(evals[k], ref) for k in keys], lambda v: v)
        for scale in suite.start_noise:
            row = {"scale": float(scale), "default": False}
            for agent in ("dt", "bc"):
                target = chosen.get((name, agent, 1), {}).get("target", suite.target)
                results = [
                    eval_file(
                        os.path.join(root, d4rl_suite.cell(base, name, agent, 1, s).name),
                        f"start{float(scale):g}_{target}",
                        reset_noise_scale=float(scale),
                        target_return=d4rl_suite.eval_target(suite, name, "dt", target),
                    )
                    for s in suite.seeds
                ]
                row[agent] = stats([run_score(r, ref) for r in results], lambda v: v)
            rows.append(row)
        out[name] = rows
    return out


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_process()
    base, root = cli.flag_value(), flags.FLAGS.workdir
    suite = base.suite
    evals, caps = {}, {}
    for key in cells(suite):
        config = d4rl_suite.cell(base, *key)
        evals[key] = run_cell(config, os.path.join(root, config.name))
    chosen = select_targets(base, root, evals)
    for key in evals:  # DT again on episodes cut at the cap, from its (chosen) target
        if key[1] == "dt":
            target = chosen.get(key[:3], {}).get("target", suite.target)
            caps[key] = eval_file(
                os.path.join(root, d4rl_suite.cell(base, *key).name),
                "cap" if target == suite.target else f"cap_{target}",
                max_steps=suite.cap,
                target_return=d4rl_suite.eval_target(suite, key[0], "dt", target),
            )

    def scores(results, ref, which="last"):
        # Each run: the mean over its episodes of the normalised best or last attempt.
        return stats([run_score(r, ref, which) for r in results], lambda v: v)

    seeds = suite.seeds
    table = []
    for name in tuple(suite.sets) + tuple(suite.dt_sets):
        family = family_of(name)
        full = references(suite.data, family, None, suite.data_version)
        cut = references(suite.data, family, suite.cap, suite.data_version)
        dt = [(name, "dt", 1, s) for s in seeds]
        row = {
            "set": name,
            "data": data_scores(suite.data, name, suite.cap, suite.data_version),
            "dt": scores([evals[k] for k in dt], full),
            "dt_cap": scores([caps[k] for k in dt], cut),
            "dt_length": float(np.mean([evals[k]["length_mean"][0] for k in dt])),
            "ref": full,
            "ref_cap": cut,
            "dt_target": chosen.get((name, "dt", 1), {"target": suite.target}),
        }
        if name in suite.sets:
            row["at_target"] = chosen.get((name, "at", suite.at_n), {"target": suite.target})
            at = [evals[(name, "at", suite.at_n, s)] for s in seeds]
            row["at_best_cap"] = scores(at, cut, "best")
            row["at_last_cap"] = scores(at, cut, "last")
        table.append(row)
    bc_rows = []
    for name in suite.bc_sets:
        full = references(suite.data, family_of(name), None, suite.data_version)
        dt_row = next((r for r in table if r["set"] == name), None)
        bc_rows.append(
            {
                "set": name,
                "data": data_scores(suite.data, name, suite.cap, suite.data_version),
                "bc": scores([evals[(name, "bc", 1, s)] for s in seeds], full),
                "bc_length": float(
                    np.mean([evals[(name, "bc", 1, s)]["length_mean"][0] for s in seeds])
                ),
                "dt": dt_row["dt"] if dt_row else None,
            }
        )
    start = start_noise(base, root, evals, chosen) if suite.start_noise else {}
    fits = {}  # what DT and %BC fit, on the sets that have both (fit_probe)
    if suite.probe_windows:
        for name in suite.bc_sets:
            if name in tuple(suite.sets) + tuple(suite.dt_sets):
                fits[name] = [fit_probe(base, root, name, s) for s in seeds]
    ablations = {}
    for name in suite.ablation_sets:
        cut = references(suite.data, family_of(name), suite.cap, suite.data_version)
        rows = []
        for n in suite.ablation_ns:
            rs = [evals[(name, "at", n, s)] for s in seeds]
            rows.append(
                {
                    "n": n,
                    "target": chosen.get((name, "at", n), {"target": suite.target}),
                    "best": scores(rs, cut, "best"),
                    "last": scores(rs, cut, "last"),
                    "first": stats(
                        rs, lambda r, cut=cut: float(normalise(r["returns"], cut)[:, 0].mean())
                    ),
                    "by_attempt": np.mean(
                        [normalise(r["returns"], cut).mean(0) for r in rs], 0
                    ).tolist(),
                    "data_by_slot": data_by_slot(
                        d4rl_suite.cell(base, name, "at", n, seeds[0]), cut
                    ),
                }
            )
        ablations[name] = rows

    def fmt(x):
        return f"{x['mean']:6.1f} ± {x['se']:<4.1f}"

    import jax

    devices = jax.device_count()

    print(
        f"normalised score, mean ± standard error over seeds {tuple(seeds)} of each run's mean "
        f"over {suite.episodes} episodes (DT: rounded up to whole shards of its data mesh); "
        f"{suite.steps} train steps per run; cap = first "
        f"{suite.cap} steps of every episode (references cut there too); AT n = {suite.at_n}; "
        f"{devices} {jax.default_backend()} device(s) in this process (the cells' rings and DT's "
        "data mesh span them; XLA_FLAGS=--xla_force_host_platform_device_count=8 for 8 on CPU)"
    )
    print(
        "| set | data mean | data best 10% | DT | data mean (cap) | data best 10% (cap) | "
        "DT (cap) | AT best of n (cap) | AT last (cap) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for row in table:
        d = row["data"]
        print(
            f"| {row['set']} | {d['mean']:.1f} | {d['best10']:.1f} | {fmt(row['dt'])} | "
            f"{d['mean_cap']:.1f} | {d['best10_cap']:.1f} | {fmt(row['dt_cap'])} | "
            + (
                f"{fmt(row['at_best_cap'])} | {fmt(row['at_last_cap'])} |"
                if "at_best_cap" in row
                else "- | - |"
            )
        )
    if bc_rows:
        pct = round(100 * suite.bc_fraction)
        label = "BC" if pct == 100 else f"{pct}%BC"
        print(
            f"\n{label} (DT's transformer, returns-to-go zeroed, trained on the best {pct}% of "
            "the steps by episode return) against DT, whole episodes, the same seeds and episodes:"
        )
        print(f"| set | data mean | data best 10% | {label} | DT | DT - {label} | 90% of {label} |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for row in bc_rows:
            d, bc, dt = row["data"], row["bc"], row["dt"]
            diff = (
                f"{dt['mean'] - bc['mean']:+.1f} ± {np.hypot(dt['se'], bc['se']):.1f}"
                if dt
                else "-"
            )
            print(
                f"| {row['set']} | {d['mean']:.1f} | {d['best10']:.1f} | {fmt(bc)} | "
                f"{fmt(dt) if dt else '-'} | {diff} | {0.9 * bc['mean']:.1f} |"
            )
    if start:
        pct = round(100 * suite.bc_fraction)
        print(
            f"\nDT and {pct}%BC from wider start states (gym's reset_noise_scale; the data's is "
            "the env default), the same test episodes' seeds, whole episodes:"
        )
        print(f"| set | start noise | DT | {pct}%BC | DT - {pct}%BC |")
        print("|---|---:|---:|---:|---:|")
        for name, rows in start.items():
            for row in rows:
                dt, bc = row["dt"], row["bc"]
                scale = f"{row['scale']:g}" + (" (default)" if row["default"] else "")
                diff = f"{dt['mean'] - bc['mean']:+.1f} ± {np.hypot(dt['se'], bc['se']):.1f}"
                print(f"| {name} | {scale} | {fmt(dt)} | {fmt(bc)} | {diff} |")
    if fits:
        pct = round(100 * suite.bc_fraction)
        print(
            f"\nWhat DT and {pct}%BC fit (mean over seeds): action MSE on {suite.probe_windows} "
            f"training windows from {pct}%BC's episodes (seen), from the next episodes by return "
            f"holding as many steps (next: unseen by {pct}%BC) and from the rest; DT's mean "
            "|action change| when its windows' return-to-go is shifted to start at each target, "
            f"against the mean |DT - {pct}%BC| action gap:"
        )
        print(
            f"| set | DT seen | {pct}%BC seen | DT next | {pct}%BC next | DT rest | {pct}%BC rest "
            f"| DT shift by target | DT - {pct}%BC |"
        )
        print("|---|---:|---:|---:|---:|---:|---:|---|---:|")
        for name, runs in fits.items():

            def mse(band, agent, runs=runs):
                values = [r[band][agent] for r in runs if r[band] is not None]
                return f"{np.mean(values):.4f}" if values else "-"

            cols = " | ".join(
                mse(band, agent) for band in ("seen", "next", "rest") for agent in ("dt", "bc")
            )
            shift = ", ".join(
                f"{t}: {np.mean([r['shift'][t] for r in runs]):.3f}" for t in runs[0]["shift"]
            )
            gap = np.mean([r["dt_bc"] for r in runs])
            print(f"| {name} | {cols} | {shift} | {gap:.3f} |")
    if chosen:
        print("\ntarget chosen on validation episodes (mean validation score of each candidate):")
        for (name, agent, n), c in chosen.items():
            cands = ", ".join(f"{t}: {v:.1f}" for t, v in c["valid"].items())
            label = agent.upper() + (f" n={n}" if agent == "at" else "")
            print(f"  {name} {label}: {cands} -> {c['target']}")
    for name, rows in ablations.items():
        print(f"\nAT n-ablation on {name} (cap {suite.cap}):")
        print("| n | attempt 1 | last attempt | best attempt |")
        print("|---:|---:|---:|---:|")
        for row in rows:
            cols = " | ".join(fmt(row[k]) for k in ("first", "last", "best"))
            print(f"| {row['n']} | {cols} |")
        print("per attempt (mean over seeds) against the data's slot k (k-th worst of n draws):")
        for row in rows:
            agent = " ".join(f"{v:5.1f}" for v in row["by_attempt"])
            data = " ".join(f"{v:5.1f}" for v in row["data_by_slot"])
            print(f"n={row['n']:<2} agent {agent}\n     data  {data}")
    from ringrl.experiments import plots

    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, "d4rl_suite.json.tmp")
    with open(tmp, "w") as f:
        json.dump(
            {
                "table": table,
                "bc": bc_rows,
                "fit": fits,
                "start_noise": start,
                "ablations": ablations,
                "suite": suite.to_dict(),
                "devices": devices,  # of this invocation; each eval_*.json records its own
            },
            f,
            indent=1,
        )
    os.replace(tmp, os.path.join(root, "d4rl_suite.json"))
    if start:
        png = plots.score_vs_start_noise(
            start,
            os.path.join(root, "score_vs_start_noise.png"),
            agent_label=f"{round(100 * suite.bc_fraction)}%BC",
        )
        print(f"wrote {png}")
    if not ablations:  # e.g. only DT sets (--config.suite.ablation_sets='()'): nothing to plot
        print(f"wrote {os.path.join(root, 'd4rl_suite.json')} (no ablation sets: no plot)")
        return
    dt_rows = {r["set"]: r for r in table}
    png = plots.score_vs_context_panels(
        {
            name: {
                "last": [{"n": r["n"], **r["last"]} for r in rows],
                "best": [{"n": r["n"], **r["best"]} for r in rows],
                "dt": dt_rows[name]["dt_cap"] if name in dt_rows else None,
            }
            for name, rows in ablations.items()
        },
        os.path.join(root, "score_vs_context.png"),
        cap=suite.cap,
    )
    print(f"wrote {os.path.join(root, 'd4rl_suite.json')} and {png}")


def run() -> None:
    """Console-script entry point (ringrl-d4rl)."""
    # Defined here, not at import: tests import this module beside ringrl-train's own --workdir.
    flags.DEFINE_string("workdir", "runs/d4rl", "folder of the per-cell runs")
    cli.run(main, default=DEFAULT_CONFIG)


if __name__ == "__main__":
    run()
