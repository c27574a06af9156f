"""The `arg` parser every config uses.

A config file is `configs/NAME.py` with `get_config(arg: str | None) -> ConfigDict`; the command
line that loads it (`--config configs/NAME.py:key=value,flag`) lives in `ringrl.experiments.cli`.
"""

import difflib

import ml_collections


def parse_arg(arg: str | None, **defaults) -> ml_collections.ConfigDict:
    """Parses `"key=value,flag"` against typed defaults.

    A bare `flag` sets a boolean default to True. Values are cast to the default's type.

    Raises:
      ValueError: an unknown key, or a value that does not parse as the default's type.
    """
    out = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, sep, value = item.partition("=")
        key = key.strip()
        if key not in defaults:
            near = difflib.get_close_matches(key, defaults, n=3)
            hint = (
                f"; did you mean {', '.join(near)}?" if near else f"; valid: {', '.join(defaults)}"
            )
            raise ValueError(f"unknown config arg {key!r}{hint}")
        default = defaults[key]
        if not sep:
            if not isinstance(default, bool):
                raise ValueError(f"config arg {key!r} needs a value: {key}=...")
            out[key] = True
        elif isinstance(default, bool):
            if value.lower() not in ("true", "false", "1", "0"):
                raise ValueError(f"config arg {key}={value!r} is not a boolean")
            out[key] = value.lower() in ("true", "1")
        elif default is None:
            out[key] = value
        else:
            try:
                out[key] = type(default)(value)
            except ValueError:
                raise ValueError(
                    f"config arg {key}={value!r} is not a {type(default).__name__}"
                ) from None
    return out


def shrink_for_smoke(config: ml_collections.ConfigDict) -> None:
    """The sizes every config's `smoke` variant shares: 2 steps, a 1-layer width-16 model and a
    2-environment evaluation at the end only (a few CPU seconds; tests/test_configs.py)."""
    config.num_steps = 2
    config.batch_size = 8
    config.log_every = 1
    config.checkpoint_every = 2
    config.eval.every = 0
    config.eval.num_envs = 2
    config.model.embed_dim = 16
    config.model.num_layers = 1
