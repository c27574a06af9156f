r"""Makes our own datasets.

ringrl-collect darkroom [--tasks N --episodes E --out F]
ringrl-collect mujoco --env Hopper-v5 --steps 100000 [--dataset-steps N --out data/ --version 0]
    random, medium, medium-replay, expert and medium-expert sets; resumable: rerun the same
    command after an interruption (SAC continues from its checkpoint, written sets are kept);
    --version 1 picks the medium and expert policies on sampled-action returns (from the same
    SAC run: no more training once one version exists)
ringrl-collect table [--out data/ --version V]   markdown table of the generated sets in a folder
ringrl-collect policies --env Hopper-v5 [--episodes 50 --out data/ --version 0]
    what the policies behind the medium and expert sets score, acting stochastically (as in
    the sets) and deterministically (their mean action), against the sets' mean and best 10%"""

import argparse
import os
import sys
import tempfile
import time

import numpy as np

from ringrl.envs import darkroom, generate

HISTORIES = {"darkroom": (64, 17, 1000), "darkkeytodoor": (100, 20, 1000)}  # train, held-out, eps
MUJOCO = ("Hopper-v5", "HalfCheetah-v5", "Walker2d-v5")
XLA_ONE_THREAD = "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"


def fail(message: str, code: int = 2) -> None:
    print(f"error: {message}", file=sys.stderr)
    sys.exit(code)


def check_writable(folder: str) -> None:
    try:  # fail before minutes of work, not when saving
        os.makedirs(folder, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        fail(f"cannot write to {folder!r} ({err.strerror}); fix: pass a writable --out", 1)


def histories(args: argparse.Namespace) -> None:
    train_n, heldout_n, episodes = HISTORIES[args.kind]
    train_n = train_n if args.tasks is None else args.tasks
    episodes = episodes if args.episodes is None else args.episodes
    out = args.out or os.path.join("data", f"{args.kind}_histories.hdf5")
    if os.path.isdir(out):  # checked before generating, not when saving
        fail(
            f"--out {out!r} is a directory; pass a file path, e.g. "
            f"{os.path.join(out, args.kind + '_histories.hdf5')}"
        )
    check_writable(os.path.dirname(os.path.abspath(out)))
    train, heldout = darkroom.task_split(args.kind, train_n, heldout_n, args.seed)
    t0 = time.time()
    data = generate.learning_histories(args.kind, train, episodes, args.seed, progress=True)
    data.metadata.update(train_tasks=train, heldout_tasks=heldout)
    print(f"{generate.describe_histories(data)} ({time.time() - t0:.1f} s)")
    print(f"held-out tasks {heldout}\nwrote {data.save(out)}")


def mujoco(args: argparse.Namespace) -> None:
    if args.env not in MUJOCO:
        fail(f"unknown --env {args.env!r}; valid: {', '.join(MUJOCO)}")
    out = args.out or "data"
    if os.path.exists(out) and not os.path.isdir(out):
        fail(f"--out {out!r} is a file; mujoco writes several datasets, pass a folder")
    check_writable(out)
    # Small nets on a shared CPU: one XLA thread per op is ~2x faster than contended threads.
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_ONE_THREAD}"
    from ringrl.agents import sac_collect  # noqa: PLC0415 (jax only for this command)

    t0 = time.time()
    paths = sac_collect.collect_datasets(
        args.env,
        args.steps,
        out,
        dataset_steps=args.dataset_steps,
        seed=args.seed,
        version=args.version,
    )
    print(f"done in {(time.time() - t0) / 60:.1f} min (this invocation)")
    if paths:
        print(generate.dataset_table(out, args.env, args.version))


def table(args: argparse.Namespace) -> None:
    out = args.out or "data"
    if not os.path.isdir(out):
        fail(f"--out {out!r} is not a folder; pass the folder ringrl-collect mujoco wrote to")
    print(generate.dataset_table(out, version=args.version_given))


def policies(args: argparse.Namespace) -> None:
    if args.env not in MUJOCO:
        fail(f"unknown --env {args.env!r}; valid: {', '.join(MUJOCO)}")
    out = args.out or "data"
    episodes = 50 if args.episodes is None else args.episodes
    if episodes < 1:
        fail(f"--episodes must be >= 1, got {episodes}")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {XLA_ONE_THREAD}"
    from ringrl.agents import sac_collect  # noqa: PLC0415 (jax only for this command)
    from ringrl.envs.datasets import load_d4rl  # noqa: PLC0415
    from ringrl.envs.scores import normalize, reference_scores  # noqa: PLC0415

    rows = sac_collect.behaviour_scores(
        args.env, out, episodes=episodes, seed=args.seed + 20_000, version=args.version
    )
    print(
        f"{args.env}: {episodes} episodes per row (environment seeds {args.seed + 20_000} on), "
        "normalised with the sets' references; mean ± standard error over episodes"
    )
    print(
        "| policy | SAC step | actions | return | normalised | normalised best 10% | set | "
        "set mean | set best 10% |"
    )
    print("|---|---:|---|---:|---:|---:|---|---:|---:|")
    for row in rows:
        path = generate.dataset_path(out, args.env, row["level"], args.version)
        ref = reference_scores(path)
        norm = np.asarray(normalize(row["returns"], ref))
        data = np.asarray(normalize(load_d4rl(path).returns, ref))
        se = norm.std(ddof=1) / np.sqrt(len(norm)) if len(norm) > 1 else float("nan")
        print(
            f"| {row['level']} | {row['policy_step']} | {row['mode']} | "
            f"{row['returns'].mean():.1f} | {norm.mean():.1f} ± {se:.1f} | "
            f"{generate.best_mean(norm):.1f} | {os.path.basename(path)} | {data.mean():.1f} | "
            f"{generate.best_mean(data):.1f} |"
        )


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("kind", help="darkroom | darkkeytodoor | mujoco | table | policies")
    p.add_argument("--tasks", type=int, help="training tasks (histories)")
    p.add_argument("--episodes", type=int, help="episodes per history (policies: per row)")
    p.add_argument("--env", default="Hopper-v5", help=f"mujoco env: {', '.join(MUJOCO)}")
    p.add_argument("--steps", type=int, default=100_000, help="SAC training steps")
    p.add_argument("--dataset-steps", type=int, help="steps per rolled-out set (default --steps)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="file (histories) or folder (mujoco); default under data/")
    p.add_argument(
        "--version",
        type=int,
        help="mujoco / policies: which picks of the medium and expert policies (0 default: "
        "deterministic evaluation and the final snapshot; 1: sampled-action returns and the best "
        "snapshot); table: only this version (default every one)",
    )
    commands = {**dict.fromkeys(HISTORIES, histories), "mujoco": mujoco, "table": table}
    commands["policies"] = policies
    if (args := p.parse_args(argv)).kind not in commands:
        fail(f"unknown dataset kind {args.kind!r}; valid: {', '.join(commands)}")
    args.version_given = args.version
    args.version = 0 if args.version is None else args.version
    if args.version not in generate.DATASET_VERSIONS:
        fail(f"--version must be one of {generate.DATASET_VERSIONS}, got {args.version}")
    try:
        commands[args.kind](args)
    except ValueError as err:  # library errors already name the problem and the fix
        fail(str(err))


if __name__ == "__main__":
    main()
