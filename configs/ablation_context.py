r"""Context-length ablation: the DarkRoom agent with n trajectories in context (and DT and AD).

  ringrl-ablate                        # AT n in 1,2,4,8,16,32 x 3 seeds + DT + AD n=8, 4000 steps
  ringrl-ablate --config configs/ablation_context.py:smoke --workdir /tmp/abl
  ringrl-train --config configs/ablation_context.py:n=8,seed=1    # one cell of the table
  ringrl-train --config configs/ablation_context.py:n=8,seed=1,agent=ad   # one AD cell

experiments/ablate.py trains and evaluates `cell(config, n, seed, agent)` for every n and seed in
`config.ablation` (plus agent="dt", one trajectory window, as the baseline, and agent="ad",
Algorithm Distillation with n episodes of a learning history per context, evaluated for
`ablation.ad_attempts` episodes in a row with a rolling context). Everything else (data, model
size, steps, learning rate) is shared, and every cell sees the same number of trajectories per
step (`ablation.trajectories_per_step`: batch = that / n contexts), so the agents differ in how
much they see *at once* and in what order, not in how much data they are trained on.
"""

import ml_collections

from ringrl.configs import at_darkroom, common

AGENTS = ("at", "dt", "ad")


def cell(
    config: ml_collections.ConfigDict, n: int, seed: int, agent: str = "at"
) -> ml_collections.ConfigDict:
    """A copy of `config` for one table cell: n trajectories in context, one seed, AT, DT or AD."""
    if agent not in AGENTS:
        raise ValueError(f"ablation agent must be one of {AGENTS}, got {agent!r}")
    config = ml_collections.ConfigDict(config.to_dict())  # unlocked copy
    config.name = (
        f"ablation_dt_seed{seed}" if agent == "dt" else f"ablation_{agent}_n{n}_seed{seed}"
    )
    config.seed = seed  # model init and batch sampling
    config.eval.seed = 100 + 1000 * seed  # evaluation environments
    config.data.num_trajectories = n
    config.eval.attempts = n  # the agent with n slots makes n attempts, earlier ones in context
    per_step = config.get("ablation", {}).get("trajectories_per_step", 0)
    if per_step:  # same data per step for every n: batch = trajectories_per_step / n contexts
        if per_step % n:
            raise ValueError(
                f"ablation.trajectories_per_step={per_step} is not a multiple of n={n}; "
                "pick ns that divide it (or set it to 0 to keep batch_size)"
            )
        config.batch_size = per_step // n
    if agent == "dt":
        config.data.mode = "dt"  # one window of one trajectory, return-to-go targets
        config.data.num_trajectories = 1
        config.data.context_steps = config.data.horizon  # one whole DarkRoom episode
        config.eval.attempts = 1  # DT sees no earlier attempt, so one attempt says it all
        config.batch_size = per_step or config.batch_size  # one trajectory per window
    if agent == "ad":
        config.data.mode = "ad"  # n episodes of one learning history, in learning order
        config.data.history_stride = config.ablation.ad_stride
        config.eval.attempts = config.ablation.ad_attempts  # > n: the context rolls
        config.eval.target_return = 0.0  # AD is not return-conditioned
    config.lock()
    return config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args: n (trajectories in context), seed, agent ("at", "dt" or "ad"), smoke."""
    arg = common.parse_arg(arg, n=4, seed=0, agent="at", smoke=False)
    # The main job's length (4000 steps) and data per step (64 trajectories) for every cell.
    config = at_darkroom.get_config("smoke" if arg.smoke else None)
    config.ablation = dict(
        ns=(1, 2, 4, 8, 16, 32),  # trajectories in context, one trained agent each
        seeds=(0, 1, 2),  # independent runs per n (goal split fixed; init, batches, eval vary)
        dt_baseline=True,  # also train DT on one trajectory
        # Trajectories per train step, the same for every n (batch = this / n contexts; 0: keep
        # config.batch_size for every n). 64 = the default demo's 16 contexts x n=4.
        trajectories_per_step=64,
        # Algorithm Distillation cells (configs/ad_darkroom.py's settings), at equal compute:
        ad_ns=(8,),  # episodes per AD context (empty: no AD cells)
        ad_stride=4,  # every k-th episode of a learning history (data.history_stride)
        ad_attempts=40,  # episodes in a row per goal, the context rolling past n
    )
    if arg.smoke:  # tests/test_configs.py and a seconds-long ablate run
        config.ablation.ns = (1, 2)
        config.ablation.seeds = (0,)
        config.ablation.trajectories_per_step = 16  # n=2: batch 8, at_darkroom's smoke shapes
        config.ablation.ad_ns = (2,)
        config.ablation.ad_stride = 1  # smoke histories have 4 episodes
        config.ablation.ad_attempts = 3
    return cell(config, arg.n, arg.seed, arg.agent)
