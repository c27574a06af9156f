r"""ringrl-eval: evaluate a trained checkpoint in Gymnasium environments, several attempts each.

  ringrl-eval --workdir runs/at_darkroom                       # the run's own eval settings
  ringrl-eval --workdir runs/at_darkroom --attempts 2 --tasks train --num_envs 8 --seed 7

The config comes from the checkpoint; `--config` (optional) must agree with it in its model and
data fields. Writes <workdir>/eval_<tasks>_k<attempts>_s<seed>.json and a PNG of the return per
attempt, and prints the table. Bad input gives one line and exit code 2.
"""

import os
import sys

from absl import app, flags

from ringrl.experiments import cli

DEFAULT_CONFIG = cli.packaged_config("at_darkroom")
_WORKDIR = flags.DEFINE_string("workdir", None, "run directory with checkpoints/", required=True)
_ATTEMPTS = flags.DEFINE_integer("attempts", None, "attempts per env (default: config.eval)")
_NUM_ENVS = flags.DEFINE_integer("num_envs", None, "envs acting together (default: config.eval)")
_SEED = flags.DEFINE_integer("seed", None, "environment seed (default: config.eval.seed)")
_TASKS = flags.DEFINE_enum(
    "tasks", None, ["test", "valid", "heldout", "train"], "in-context goals to evaluate on"
)
_ENV_ID = flags.DEFINE_string("env_id", None, "Gymnasium id to act in (default: the data's env)")
_STEP = flags.DEFINE_integer("step", None, "checkpoint step (default: latest)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.setup_process()  # joins other processes (ringrl-launch or a cluster) first
    import jax

    from ringrl.agents.evaluation import evaluate_checkpoint, write_eval
    from ringrl.envs.evaluate import format_table
    from ringrl.experiments import plots

    overrides = {
        "attempts": _ATTEMPTS.value,
        "num_envs": _NUM_ENVS.value,
        "seed": _SEED.value,
        "tasks": _TASKS.value,
        "env_id": _ENV_ID.value,
    }
    # --config.eval.* overrides change how the checkpoint is evaluated (e.g. the target return);
    # other fields are fixed by training, so overriding them here would be silently meaningless.
    fields = [
        a[len("--config.") :].split("=", 1)[0] for a in sys.argv[1:] if a.startswith("--config.")
    ]
    fixed = [f for f in fields if not f.startswith("eval.")]
    if fixed:
        print(
            f"error: --config.{fixed[0]} cannot change a trained checkpoint; only --config.eval.* "
            "overrides apply in ringrl-eval",
            file=sys.stderr,
        )
        sys.exit(2)
    for field in fields:
        overrides[field[len("eval.") :]] = cli.flag_value().eval[field[len("eval.") :]]
    check = cli.flag_value() if flags.FLAGS["config"].present else None
    try:
        config, result = evaluate_checkpoint(
            _WORKDIR.value,
            step=_STEP.value,
            config=check,
            **{k: v for k, v in overrides.items() if v is not None},
        )
    except (ValueError, FileNotFoundError) as e:  # bad input: one line, exit 2
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        sys.exit(2)
    if jax.process_index() == 0:
        tag = (
            f"{config.eval.tasks}_k{result['attempts']}_s{config.eval.seed}"
            f"_r{'oracle' if config.eval.oracle_target else f'{config.eval.target_return:g}'}"
        )
        path = write_eval(_WORKDIR.value, result, f"eval_{tag}.json")
        png = plots.returns_by_attempt(
            {f"{config.data.mode.upper()}, n={config.data.num_trajectories}": result},
            os.path.join(_WORKDIR.value, f"returns_by_attempt_{tag}.png"),
            title=f"{result['env_id']} ({config.eval.tasks} tasks)",
            reference=result.get("reference_optimal"),
        )
        print(format_table(result))
        print(f"wrote {path} and {png}")


def run() -> None:
    """Console-script entry point (ringrl-eval)."""
    cli.run(main, default=DEFAULT_CONFIG)


if __name__ == "__main__":
    run()
