"""Table cells shared by the experiment drivers (ringrl-ablate, ringrl-d4rl): one trained and
evaluated run per cell, reused when it exists, and mean ± standard error over seeds."""

import json
import os
import sys

import numpy as np


def run_cell(config, workdir: str) -> dict:
    """The eval.json of one cell: trained and evaluated into `workdir` unless it is there already
    (then only if the run was trained with `config`'s settings; else one line and exit 2)."""
    from ringrl.agents.checkpoint import Checkpointer, config_mismatch
    from ringrl.agents.trainer import train_and_evaluate

    path = os.path.join(workdir, "eval.json")
    if os.path.exists(path):  # reuse a finished cell only if it was trained like this one
        saved = Checkpointer(os.path.join(workdir, "checkpoints")).saved_config()
        groups = ("model", "data", "optim", "eval", "num_steps", "batch_size", "seed")
        diff = config_mismatch(saved, config.to_dict(), groups=groups)
        if diff:
            print(
                f"error: {workdir} was trained with other settings (differs in "
                f"{', '.join(diff)}); use a fresh --workdir",
                file=sys.stderr,
            )
            sys.exit(2)
    else:
        print(f"== {config.name}", flush=True)
        try:
            train_and_evaluate(config, workdir, resume=True)
        except (ValueError, FileNotFoundError) as e:
            print(f"error: {e}".splitlines()[0], file=sys.stderr)
            sys.exit(2)
    with open(path) as f:
        return json.load(f)


def stats(results: list, key) -> dict:
    """mean, std, standard error over seeds and the values of key(r) for each result r."""
    values = [key(r) for r in results]
    se = float(np.std(values, ddof=1) / np.sqrt(len(values))) if len(values) > 1 else 0.0
    return {
        "mean": float(np.mean(values)),
        "std": float(np.std(values)),
        "se": se,  # standard error over seeds
        "values": values,
    }


def slot_returns(config, contexts: int = 1024) -> np.ndarray:
    """[n, contexts] return of the trajectory in each slot of `contexts` training contexts
    sampled as `config`'s AT sampler does (slot k holds the k-th worst of the n draws)."""
    from ringrl.agents.agent import make_sampler
    from ringrl.envs.sources import load_data

    trajectories = load_data(config, verbose=False).trajectories
    batch = make_sampler(config, trajectories, seed=0).sample(contexts)
    return np.stack(
        [
            (batch["rewards"] * (batch["traj_index"] == k) * batch["mask"]).sum(1)
            for k in range(config.data.num_trajectories)
        ]
    )
