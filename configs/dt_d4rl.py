r"""Decision Transformer on a D4RL-schema dataset (a real D4RL file or one we generated).

  ringrl-collect mujoco --env Hopper-v5 ...         # writes data/hopper-*-ringrl-v0.hdf5
  ringrl-train --config configs/dt_d4rl.py:path=data/hopper-medium-replay-ringrl-v0.hdf5 \
      --workdir runs/dt_hopper
  ringrl-train --config configs/dt_d4rl.py:env=hopper-medium-v2,target=low   # by name
  ringrl-train --config configs/dt_d4rl.py:env=hopper-medium-v2,bc=0.1        # 10%BC

The settings of Chen et al. 2021 (their gym/experiment.py): K = 20 steps, 3 layers of width 128,
1 head, relu FFN, dropout 0.1, LayerNorm on the token embeddings, states normalised by the data's
mean and std, returns-to-go divided by 1000, AdamW lr 1e-4, weight decay 1e-4, 10k warmup steps,
batch 64, 100k steps, gradient clipping 0.25, evaluation on whole 1000-step episodes from the
target return of the task: Hopper 3600 (low 1800), Walker2d 5000 (2500), HalfCheetah 12000
(6000). Differences: after the warmup the learning rate decays (cosine) instead of staying
constant, and attention probabilities are not dropped (ring attention never forms them).

`bc=0.1` is the paper's percentile behaviour cloning baseline (10%BC): windows only from the
best-return episodes holding 10% of the steps, and no return conditioning. Chen et al.'s BC is an
MLP over the last K states; here it is this same transformer with the return-to-go input zeroed
(`model.return_scale = 0`), so DT and %BC differ only in the data drawn and the conditioning.
"""

import os

import ml_collections

from ringrl.configs import common

# Evaluation target returns (high, low) per task family (Chen et al. 2021, gym/experiment.py).
DT_TARGETS = {
    "hopper": (3600.0, 1800.0),
    "walker2d": (5000.0, 2500.0),
    "halfcheetah": (12000.0, 6000.0),
}
TARGET_CHOICES = ("high", "low")
DATA_TARGET = "max"  # the highest episode return in the data file


def data_max_return(path: str, cap: int | None = None) -> float:
    """The highest episode return in the D4RL-schema file at `path` (each episode cut at its
    first `cap` steps if given); NaN when the file does not exist yet (its loader's error comes
    first)."""
    if not path or not os.path.exists(path):
        return float("nan")
    from ringrl.envs.datasets import load_d4rl

    data = load_d4rl(path)
    return float((data.returns if cap is None else data.returns_within(cap)).max())


def task_family(env: str, path: str) -> str:
    """The task of a dataset: "hopper" for data/hopper-medium-ringrl-v0.hdf5, hopper-medium-v2 or
    Hopper-v5."""
    name = os.path.basename(path) if path else env
    return name.split("-")[0].lower()


def target_return(env: str, path: str, target: str) -> float:
    """The evaluation target return that `target` ("high", "low", "max" or a number) picks for
    the data: the paper's high or low target of the task, the highest episode return in the file
    at `path`, or the number.

    NaN for a named target of a task without a table entry, or "max" without the file: the data
    may not exist yet (its own error comes first), so `agents.dt.check_eval_context` refuses it
    before training instead.

    Raises:
      ValueError: an unparsable target.
    """
    if target == DATA_TARGET:
        return data_max_return(path)
    if target not in TARGET_CHOICES:
        try:
            return float(target)
        except ValueError:
            raise ValueError(
                f"config arg target={target!r} must be one of "
                f"{(*TARGET_CHOICES, DATA_TARGET)} or a number"
            ) from None
    family = task_family(env, path)
    if family not in DT_TARGETS:
        return float("nan")
    return DT_TARGETS[family][TARGET_CHOICES.index(target)]


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args: env (D4RL dataset name), path (HDF5 file; wins over env), target ("high", "low",
    "max" or a number: the evaluation target return, `target_return`), bc (0: DT; e.g. 0.1:
    Chen et al.'s 10%BC, the same transformer with returns-to-go zeroed, trained on the best 10%
    of the steps), smoke."""
    arg = common.parse_arg(
        arg, env="hopper-medium-replay-v2", path="", target="high", bc=0.0, smoke=False
    )
    config = ml_collections.ConfigDict()
    config.name = "dt_d4rl"  # default workdir runs/<name>
    config.seed = 0  # model init and batch sampling
    config.num_steps = 100_000  # train steps (DT: 10 iterations of 10k)
    config.batch_size = 64  # windows per step (a multiple of the mesh's data size)
    config.log_every = 100  # steps between logged train metrics
    config.checkpoint_every = 2_000  # steps between checkpoints (and one at the end)
    config.keep_checkpoints = 2  # most recent checkpoints kept on disk

    config.data = dict(
        env=arg.env,  # D4RL dataset name, looked up in $D4RL_DATASET_DIR (see envs.datasets)
        path=arg.path,  # D4RL-schema HDF5 file; "" = find `env` by name
        mode="dt",  # sampler: one K-step window of one trajectory, return-to-go targets
        num_trajectories=1,  # DT reads one trajectory
        horizon=1000,  # longest episode (MuJoCo time limit): timestep-embedding rows
        context_steps=20,  # K, steps per window (DT paper: 20)
        top_fraction=1.0,  # windows from the best episodes holding this share of the steps (%BC)
    )
    config.model = dict(
        embed_dim=128,  # width W
        num_layers=3,
        num_heads=1,
        mlp_ratio=4,  # feed-forward hidden = mlp_ratio * W
        remat="none",  # jax.checkpoint policy per block (agents.backbone.REMAT_POLICIES)
        dropout=0.1,  # training-time dropout on embeddings and residual branches (GPT-2 DT)
        embed_norm=True,  # LayerNorm on the token embeddings (GPT-2 DT's embed_ln)
        activation="relu",  # FFN nonlinearity (DT's gym runs: relu)
        attention="ring",  # "ring" (sharded over the seq axis) or "dense" (1 device baseline)
        layout="contiguous",  # token layout over the ring: "contiguous" or "striped"
        return_scale=0.001,  # returns-to-go are multiplied by this (DT: 1/1000 for MuJoCo)
    )
    config.optim = dict(
        lr=1e-4,  # peak learning rate (AdamW)
        warmup_steps=10_000,  # linear warmup, then cosine decay to 0 at num_steps
        weight_decay=1e-4,
        grad_clip=0.25,  # global-norm clipping
    )
    config.eval = dict(
        every=10_000,  # steps between evaluations during training (0: only at the end)
        tasks="heldout",  # unused for single-task MuJoCo data
        attempts=1,  # episodes per environment (DT does not see earlier attempts)
        num_envs=10,  # environments acting together
        seed=100,  # environment seeds
        # Initial return-to-go; NaN: no table entry for the task, pass target=<number>.
        target_return=target_return(arg.env, arg.path, arg.target),
        sample=False,  # continuous actions: the tanh mean
        max_steps=0,  # cap on episode length at evaluation; 0 = the env's time limit (1000)
        # > 0: gym.make's reset_noise_scale, the start-state noise (Hopper and Walker2d: 5e-3,
        # HalfCheetah: 0.1, as in the data); 0 = the env's default.
        reset_noise_scale=0.0,
        env_id="",  # Gymnasium id to act in; "" = from the dataset (metadata or name)
    )
    config.wandb = dict(mode="offline", project="ringrl")  # "offline" | "online" | "disabled"
    config.mesh = (("data", -1), ("seq", 1))  # -1: all remaining devices

    if arg.bc:  # percentile behaviour cloning: no return conditioning, the best episodes only
        config.name = "bc_d4rl"
        config.data.top_fraction = float(arg.bc)
        config.model.return_scale = 0.0
    if arg.smoke:  # a few CPU seconds; tests/test_configs.py
        common.shrink_for_smoke(config)
        config.data.context_steps = 4
        config.eval.max_steps = 16  # random-ish Hopper episodes are short anyway
    return config
