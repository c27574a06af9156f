r"""Decision Transformer on a D4RL-schema dataset (a real D4RL file or one we generated).

  ringrl-collect mujoco --env Hopper-v5 ...         # writes data/hopper-*.hdf5
  ringrl-train --config configs/dt_d4rl.py:path=data/hopper-medium-replay-v2.hdf5 \
      --workdir runs/dt_hopper
  ringrl-train --config configs/dt_d4rl.py:env=hopper-medium-v2    # by name, $D4RL_DATASET_DIR
"""

import ml_collections

from ringrl.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args: env (D4RL dataset name), path (HDF5 file; wins over env), smoke."""
    arg = common.parse_arg(arg, env="hopper-medium-replay-v2", path="", smoke=False)
    config = ml_collections.ConfigDict()
    config.name = "dt_d4rl"  # default workdir runs/<name>
    config.seed = 0  # model init and batch sampling
    config.num_steps = 20_000  # train steps
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
    )
    config.model = dict(
        embed_dim=128,  # width W
        num_layers=3,
        num_heads=1,
        mlp_ratio=4,  # feed-forward hidden = mlp_ratio * W
        remat="none",  # jax.checkpoint policy per block (agents.backbone.REMAT_POLICIES)
        attention="ring",  # "ring" (sharded over the seq axis) or "dense" (1 device baseline)
        layout="contiguous",  # token layout over the ring: "contiguous" or "striped"
        return_scale=0.001,  # returns-to-go are multiplied by this (DT: 1/1000 for MuJoCo)
    )
    config.optim = dict(
        lr=1e-4,  # peak learning rate (AdamW)
        warmup_steps=1_000,  # linear warmup, then cosine decay to 0 at num_steps
        weight_decay=1e-4,
        grad_clip=0.25,  # global-norm clipping
    )
    config.eval = dict(
        every=5_000,  # steps between evaluations during training (0: only at the end)
        tasks="heldout",  # unused for single-task MuJoCo data
        attempts=1,  # episodes per environment (DT does not see earlier attempts)
        num_envs=10,  # environments acting together
        seed=100,  # environment seeds
        target_return=3600.0,  # initial return-to-go (DT paper, Hopper)
        sample=False,  # continuous actions: the tanh mean
        max_steps=0,  # cap on episode length at evaluation; 0 = the env's own time limit
        env_id="",  # Gymnasium id to act in; "" = from the dataset (metadata or name)
    )
    config.wandb = dict(mode="offline", project="ringrl")  # "offline" | "online" | "disabled"
    config.mesh = (("data", -1), ("seq", 1))  # -1: all remaining devices

    if arg.smoke:  # a few CPU seconds; tests/test_configs.py
        common.shrink_for_smoke(config)
        config.data.context_steps = 4
        config.eval.max_steps = 16  # random-ish Hopper episodes are short anyway
    return config
