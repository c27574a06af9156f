r"""Agentic Transformer on DarkRoom: the in-context demo, and ringrl-train's default config.

  ringrl-train                                     # this config, workdir runs/at_darkroom
  ringrl-train --config configs/at_darkroom.py:n=8 --workdir runs/at_n8 --config.eval.tasks=valid
  ringrl-train --config configs/at_darkroom.py:smoke --workdir /tmp/smoke    # seconds, for tests
  ringrl-train --config configs/at_darkroom.py:env=darkkeytodoor --workdir runs/at_darkkeytodoor

Learning histories of tabular Q-learners on the training goals are generated (and cached under
data/) on first use. The agent is trained on n return-sorted trajectories of one goal per context
(one token per step, no slot embedding, target token 0: nothing tells it where the goal is) and
evaluated on held-out goals for n attempts in a row, earlier attempts in context: tune on the
validation goals (--config.eval.tasks=valid), report the test goals (the default).
"""

import ml_collections

from ringrl.configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args (`configs/at_darkroom.py:key=value,...`): n (trajectories per context), env
    ("darkroom" or "darkkeytodoor"), smoke."""
    arg = common.parse_arg(arg, n=0, env="darkroom", smoke=False)  # n=0: 32, 8 or 2 (smoke)
    keytodoor = arg.env == "darkkeytodoor"
    if arg.env not in ("darkroom", "darkkeytodoor"):
        raise ValueError(f"env must be darkroom or darkkeytodoor, got {arg.env!r}")
    n = arg.n or (2 if arg.smoke else 8 if keytodoor else 32)
    config = ml_collections.ConfigDict()
    config.name = "at_darkroom"  # default workdir runs/<name>
    config.seed = 0  # model init and batch sampling
    # Train steps. n = 32 for 4000 steps beat n = 16 and n = 8 on the validation goals (12.93 ±
    # 1.83 against 10.33 ± 2.46 and 7.98 ± 2.25 at the last attempt); 4000 steps of n = 4 were no
    # better than 2000.
    config.num_steps = 4000
    # Contexts per step (a multiple of the mesh's data size): 64 trajectories per step, whatever n.
    config.batch_size = max(1, 64 // n)
    config.log_every = 50  # steps between logged train metrics
    config.checkpoint_every = 500  # steps between checkpoints (and one at the end)
    config.keep_checkpoints = 2  # most recent checkpoints kept on disk

    config.data = dict(
        env="darkroom",  # "darkroom" / "darkkeytodoor" (generated) or a D4RL file or name
        dir="data",  # where generated learning histories are cached
        num_train_tasks=55,  # goals in the training data (DarkRoom has 81)
        # Goals never seen in training: the first 10 of them (in a seeded order) are validation
        # goals for tuning (eval.tasks="valid"), the other 16 test goals for reporting ("test").
        num_heldout_tasks=26,
        num_valid_tasks=10,  # of the held-out goals, how many are validation goals
        split_seed=0,  # seed of the train / held-out goal split
        episodes_per_task=100,  # length of each goal's learning history, in episodes
        history_seed=0,  # seed of the Q-learners that write the histories
        # The Q-learners (envs.generate.learning_histories): exploratory steps go to cells not yet
        # visited in the episode and stay after a reward ("novel"; "uniform" = any action), so a
        # purely exploring episode returns 2.45 (uniform: 0.24); with lr 1 and epsilon decaying
        # over 70% of the history the first 10 / last 10 episodes on the training goals return
        # 2.32 / 15.98 (uniform, lr 0.5, 60%: 0.25 / 14.65).
        learner=dict(explore="novel", lr=1.0, decay_fraction=0.7),
        mode="at",  # sampler: "at" return-sorted trajectories, "ad" consecutive, "dt" window
        # "at" target token: "none" (0: no per-goal hint) or "best" (best return of the context,
        # which on DarkRoom is 21 - the goal's distance in most contexts: a hint of the goal).
        target="none",
        num_trajectories=n,  # n: trajectories per context
        horizon=20,  # steps reserved per trajectory (DarkRoom episodes have 20)
        context_steps=0,  # "dt" only: window of K steps; "at"/"ad" use n * horizon
        history_stride=1,  # "ad" only: a context takes every k-th episode of a learning history
    )
    config.model = dict(
        embed_dim=64,  # width W
        num_layers=2,
        num_heads=4,
        mlp_ratio=4,  # feed-forward hidden = mlp_ratio * W
        remat="none",  # jax.checkpoint policy per block (agents.backbone.REMAT_POLICIES)
        attention="ring",  # "ring" (sharded over the seq axis) or "dense" (1 device baseline)
        layout="contiguous",  # token layout over the ring: "contiguous" or "striped"
        # 1: one token per step (s_t, a_{t-1}, r_{t-1}, flags); 4: return, state, action, reward.
        tokens_per_step=1,
        slot_embedding=False,  # embed the trajectory slot (= rank in a return-sorted context)
        return_scale=0.05,  # target returns are multiplied by this (1 / horizon)
        reward_scale=1.0,  # rewards are multiplied by this (DarkRoom's are 0 or 1)
    )
    config.optim = dict(
        # Peak learning rate (AdamW). 3e-3 beats 1e-3 (the loss was still falling at 2000 steps)
        # and 5e-3 on held-out return, eval seeds 100 and 200.
        lr=3e-3,
        warmup_steps=100,  # linear warmup, then cosine decay to 0 at num_steps
        weight_decay=1e-4,
        grad_clip=1.0,  # global-norm clipping
    )
    config.eval = dict(
        every=0,  # steps between evaluations during training (0: only at the end)
        tasks="test",  # "test" (report), "valid" (tune), "heldout" (both) or "train" goals
        rollouts_per_task=10,  # rollouts of every goal (the policy samples, so they differ)
        attempts=n,  # episodes in a row per goal, earlier ones in context (<= n)
        num_envs=40,  # environments acting together (the cached actor's batch)
        seed=100,  # environment seeds
        # Target-return token at evaluation when data.target="best": about the mean best return
        # of the training goals (15.7). Ignored (0) for target "none" and for AD.
        target_return=15.0,
        oracle_target=False,  # target "best" only: each goal's own optimal return instead
        sample=True,  # sample actions from the predicted distribution (False: argmax)
        max_steps=0,  # cap on episode length at evaluation; 0 = the env's own time limit
        env_id="",  # Gymnasium id to act in; "" = the data's env
    )
    config.wandb = dict(mode="offline", project="ringrl")  # "offline" | "online" | "disabled"
    # -1: all remaining devices. The ring spans them: 2 contexts per step cannot be split over a
    # data axis of 8, but n * 20 steps can be over the seq axis (one device: both sizes are 1).
    config.mesh = (("data", 1), ("seq", -1))

    if keytodoor:  # 50-step episodes, two rewards (key, door); 6480 goal pairs
        config.name = "at_darkkeytodoor"
        config.data.env = "darkkeytodoor"
        config.data.horizon = 50
        config.data.num_train_tasks = 400  # of 6480 (key, door) pairs; 26 held out as above
        config.num_steps = 3000
        config.batch_size = max(1, 64 // n)
        config.eval.target_return = 2.0  # target "best" only: the optimal return
    if arg.smoke:  # a few CPU seconds; tests/test_configs.py
        common.shrink_for_smoke(config)
        config.data.num_train_tasks = 4
        config.data.num_heldout_tasks = 2
        config.data.num_valid_tasks = 1
        config.eval.rollouts_per_task = 2
        config.data.episodes_per_task = 4
        config.model.num_heads = 2
        config.mesh = (("data", -1), ("seq", 1))  # batch 8 over the data devices
    return config
