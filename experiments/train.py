r"""ringrl-train: train an agent from offline data and evaluate it in Gymnasium environments.

  ringrl-train            # the in-context DarkRoom demo (configs/at_darkroom.py), runs/at_darkroom
  ringrl-train --config configs/dt_d4rl.py:path=data/hopper-medium-replay-ringrl-v0.hdf5 \
      --workdir runs/dt_hopper --config.num_steps=5000
  ringrl-train --workdir runs/at_darkroom --resume --config.num_steps=3000   # continue a run

Writes to the workdir: checkpoints/, metrics.jsonl, wandb/ (offline), eval.json and
returns_by_attempt.png, and prints the mean return per attempt. Bad input (unknown env, a
checkpoint of another config, too many attempts for the model) gives one line and exit code 2.
"""

import os
import sys

from absl import app, flags

from ringrl.experiments import cli

DEFAULT_CONFIG = cli.packaged_config("at_darkroom")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory (default: runs/<config.name>)")
_RESUME = flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in --workdir")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_process()  # joins other processes (ringrl-launch or a cluster) first
    import jax

    from ringrl.agents.trainer import train_and_evaluate
    from ringrl.agents.validate import ConfigError
    from ringrl.experiments import plots

    config = cli.flag_value()
    workdir = _WORKDIR.value or os.path.join("runs", config.name)
    try:
        result = train_and_evaluate(config, workdir, resume=_RESUME.value)
    except (ValueError, FileNotFoundError) as e:  # bad input: one line (per config field), exit 2
        lines = e.errors if isinstance(e, ConfigError) else [str(e).splitlines()[0]]
        print("\n".join(f"error: {line}" for line in lines), file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        ev = result["eval"]
        png = plots.returns_by_attempt(
            {f"{config.data.mode.upper()}, n={config.data.num_trajectories}": ev},
            os.path.join(workdir, "returns_by_attempt.png"),
            title=f"{ev['env_id']} ({config.eval.tasks} tasks)",
            reference=ev.get("reference_optimal"),
        )
        print(f"wrote {os.path.join(workdir, 'eval.json')} and {png}")


def run() -> None:
    """Console-script entry point (ringrl-train)."""
    cli.run(main, default=DEFAULT_CONFIG)


if __name__ == "__main__":
    run()
