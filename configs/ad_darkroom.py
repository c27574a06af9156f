r"""Algorithm Distillation on DarkRoom: n consecutive episodes of a learner's history per context.

  ringrl-train --config configs/ad_darkroom.py --workdir runs/ad_darkroom
  ringrl-train --config configs/ad_darkroom.py:smoke --workdir /tmp/smoke

Same data, model and evaluation as configs/at_darkroom.py; only the sampler differs: episodes in
learning order instead of return-sorted, and no target-return conditioning (Laskin et al. 2022).
"""

import ml_collections

from ringrl.configs import at_darkroom, common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    """Args (`configs/ad_darkroom.py:key=value,...`): n (episodes per context), smoke."""
    arg = common.parse_arg(arg, n=0, smoke=False)  # n=0: at_darkroom's default
    config = at_darkroom.get_config(f"n={arg.n}" + (",smoke" if arg.smoke else ""))
    config.name = "ad_darkroom"
    config.data.mode = "ad"  # consecutive episodes of one learning history, in learning order
    config.eval.target_return = 0.0  # AD is not return-conditioned (its target tokens are 0)
    return config
