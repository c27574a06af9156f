r"""Agentic Transformer on a D4RL-schema dataset: n return-sorted whole trajectories per context.

  ringrl-train --config configs/at_d4rl.py:path=data/hopper-medium-replay-v2.hdf5,n=4 \
      --workdir runs/at_hopper

n whole trajectories of up to 1000 steps, 4 tokens each step: n=4 is 16k tokens per context, a
job for several accelerators with config.mesh = (("data", 1), ("seq", -1)). Evaluation makes
`attempts` episodes in a row with earlier ones in context (at most n).
"""

import ml_collections

from ringrl.configs import common, dt_d4rl


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args: env (D4RL dataset name), path (HDF5 file; wins over env), n, target (as
    configs/dt_d4rl.py: "high", "low" or a number), smoke."""
    arg = common.parse_arg(
        arg, env="hopper-medium-replay-v2", path="", n=4, target="high", smoke=False
    )
    config = dt_d4rl.get_config(f"env={arg.env},path={arg.path},target={arg.target}")
    config.name = "at_d4rl"
    config.batch_size = 8  # contexts per step (each n * 1000 steps)
    config.data.mode = "at"  # n trajectories sorted by return, targets relabelled to the best
    config.data.num_trajectories = arg.n
    config.data.horizon = 1000  # steps per trajectory slot (MuJoCo time limit)
    config.data.context_steps = 0  # unused by "at" (context = n * horizon)
    config.data.target = "best"  # target token: the best return of the n (chain of hindsight)
    config.model.tokens_per_step = 1  # one token per step (s_t, a_{t-1}, r_{t-1}, flags)
    config.model.slot_embedding = False  # no embedding of the slot (= rank) of a trajectory
    config.model.reward_scale = 0.3  # Hopper rewards are about 3 per step
    config.eval.oracle_target = False  # (in-context tasks only) each task's optimum as target
    config.model.num_heads = 4
    # AT keeps its own schedule and model: the DT config's paper settings (100k steps, 10k warmup,
    # dropout, embedding LayerNorm, relu) are not inherited; override them to compare like for like.
    config.num_steps = 20_000
    config.optim.warmup_steps = 1_000
    config.eval.every = 5_000
    config.model.dropout = 0.0
    config.model.embed_norm = False
    config.model.activation = "gelu"
    # Balances causal work over the ring. Zigzag would do it at contiguous's total work, but it
    # needs n * horizon divisible by 2 x the seq devices (n = 1: 1000 steps on 8 devices is not).
    config.model.layout = "striped"
    # Long contexts: recompute each block in the backward, but keep the ring's output and
    # log-sum-exp so the backward does not walk the ring a second time.
    config.model.remat = "ring_residuals"
    config.eval.attempts = arg.n  # attempts in a row, earlier ones in context
    config.mesh = (("data", 1), ("seq", -1))  # the ring spans every device

    if arg.smoke:  # a few CPU seconds; tests/test_configs.py
        common.shrink_for_smoke(config)
        config.data.num_trajectories = 2
        config.data.horizon = 16  # trajectory slots of 16 steps ...
        config.eval.max_steps = 16  # ... so evaluation episodes are capped at 16 steps
        config.model.remat = "none"
        config.eval.attempts = 2
        config.mesh = (("data", -1), ("seq", 1))
    return config
