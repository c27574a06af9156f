r"""Algorithm Distillation on DarkRoom (Laskin et al. 2022): distil learners, play in context.

  ringrl-train --config configs/ad_darkroom.py --workdir runs/ad_darkroom
  ringrl-train --config configs/ad_darkroom.py --workdir runs/ad_valid --config.eval.tasks=valid
  ringrl-train --config configs/ad_darkroom.py:smoke --workdir /tmp/smoke

Same data, model and goal split as configs/at_darkroom.py. A context holds n episodes of one
goal's learning history in learning order (every `history_stride`-th episode, so one context shows
the learner improving), with no target-return conditioning. At evaluation the agent plays
`eval.attempts` (40) episodes in a row on each test goal with a rolling context: the KV cache keeps
the n most recent episodes and drops the oldest (agents.act.Actor keep_episodes), so memory stays
constant however long it plays. Tune on the validation goals (--config.eval.tasks=valid).
"""

import ml_collections

from ringrl.configs import at_darkroom, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args (`configs/ad_darkroom.py:key=value,...`): n (episodes per context), stride, smoke."""
    arg = common.parse_arg(arg, n=0, stride=0, smoke=False)  # 0: the defaults below
    n = arg.n or (2 if arg.smoke else 8)
    config = at_darkroom.get_config(f"n={n}" + (",smoke" if arg.smoke else ""))
    config.name = "ad_darkroom"
    config.data.mode = "ad"  # n episodes of one learning history, in learning order
    # Learner episodes between consecutive episodes of a context: n = 8 episodes 4 apart span 29
    # of the 100-episode histories, enough to see the learner go from random to near its best.
    # Tuned on the validation goals (40 rolling episodes, mean of the last 10): n=8 stride 4 4000
    # steps 14.54 ± 1.27; stride 8 14.37 ± 1.40; n=16 stride 4 11.03 ± 2.24; 6000 steps 12.92 ±
    # 1.73 (one seed each).
    config.data.history_stride = arg.stride or 4
    config.eval.target_return = 0.0  # AD is not return-conditioned (its target tokens are 0)
    # Episodes in a row per goal: more than n, so the context rolls (the n most recent are kept).
    config.eval.attempts = 40
    config.eval.num_envs = 80  # 16 test goals x 10 rollouts in 2 batches of 80 environments
    if arg.smoke:
        config.data.history_stride = arg.stride or 1  # smoke histories have 4 episodes
        config.eval.attempts = 3  # > n = 2: the smoke run rolls too
        config.eval.num_envs = 2
    return config
