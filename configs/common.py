"""Shared config helpers: the `arg` parser every config uses, and config loading for entry points.

A config file is `configs/NAME.py` with `get_config(arg: str | None) -> ConfigDict`. Entry points
take `--config configs/NAME.py:key=value,flag --config.group.field=value`
(`ml_collections.config_flags`, locked configs).
"""

import difflib
import importlib.util
import os
import sys
from collections.abc import Callable

import ml_collections

CONFIG_DIR = os.path.dirname(os.path.abspath(__file__))


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


def resolve_config_path(path: str) -> str:
    """Finds a config file given as written, relative to cwd, or as `configs/NAME.py` in ringrl."""
    if os.path.exists(path):
        return path
    candidate = os.path.join(os.path.dirname(CONFIG_DIR), path)
    if os.path.exists(candidate):
        return candidate
    candidate = os.path.join(CONFIG_DIR, os.path.basename(path))
    if os.path.exists(candidate):
        return candidate
    return path


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Loads `path/to/config.py[:arg]` by calling its `get_config(arg)`."""
    path, _, arg = spec.partition(":")
    path = resolve_config_path(path)
    if not os.path.exists(path):
        available = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f[0] != "_")
        raise FileNotFoundError(
            f"config file {path!r} not found; available in configs/: {', '.join(available)}"
        )
    name = "_ringrl_config_" + os.path.splitext(os.path.basename(path))[0]
    module_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """All dotted field paths of a (nested) ConfigDict."""
    keys = []
    for key, value in config.items():
        path = f"{prefix}{key}"
        keys.append(path)
        if isinstance(value, ml_collections.ConfigDict):
            keys.extend(flat_keys(value, path + "."))
    return keys


def _check_overrides(argv: list[str], flag_name: str, default_spec: str) -> None:
    """Validates `--config ...` and `--config.a.b=v` before absl parses them, so mistakes give one
    clear line instead of a traceback."""
    spec, overrides = default_spec, []
    i = 0
    while i < len(argv):
        a = argv[i]
        if a in (f"--{flag_name}",) and i + 1 < len(argv):
            spec = argv[i + 1]
            i += 1
        elif a.startswith(f"--{flag_name}="):
            spec = a.split("=", 1)[1]
        elif a.startswith(f"--{flag_name}."):
            overrides.append(a[len(f"--{flag_name}.") :].split("=", 1)[0])
        i += 1
    config = load_config(spec)
    keys = set(flat_keys(config))
    for key in overrides:
        if key in keys:
            continue
        parts = key.split(".")
        # The first component that does not exist, and the keys at its level.
        depth = next(d for d in range(len(parts)) if ".".join(parts[: d + 1]) not in keys)
        parent = ".".join(parts[:depth]) + "." if depth else ""
        level = sorted(k[len(parent) :] for k in keys if k.startswith(parent))
        level = [k for k in level if "." not in k]
        near = difflib.get_close_matches(parts[depth], level, n=3, cutoff=0.6)
        if near:
            hint = "did you mean " + ", ".join(f"--{flag_name}.{parent}{n}" for n in near) + "?"
        else:
            hint = f"valid keys{' in ' + parent[:-1] if parent else ''}: {', '.join(level)}"
        raise KeyError(f"unknown override --{flag_name}.{key}; {hint}")


def run(main: Callable[[list[str]], None], *, flag_name: str = "config", default: str) -> None:
    """`absl.app.run(main)` with config mistakes reported as one line and exit code 2.

    The config flag is defined here, not at import, because `config_flags` parses the default and
    any `--config.x=y` overrides of sys.argv as soon as the flag is defined: a mistake there would
    otherwise escape as a traceback. `main` reads the config with `flag_value()`.

    Args:
      main: the entry point's main(argv).
      flag_name: name of the config flag.
      default: config spec used when the flag is not given.
    """
    from absl import app, flags
    from ml_collections import config_flags

    def fail(e: Exception) -> None:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"error: {msg}".splitlines()[0], file=sys.stderr)
        sys.exit(2)

    errors = (FileNotFoundError, KeyError, ValueError, flags.Error, AttributeError)
    try:
        _check_overrides(sys.argv[1:], flag_name, default)
        if flag_name not in flags.FLAGS:
            config_flags.DEFINE_config_file(
                flag_name, resolve_config_path(default), "config file[:args]", lock_config=True
            )
    except errors as e:
        fail(e)

    def parser(argv):
        try:
            return flags.FLAGS(argv)
        except errors as e:
            fail(e)

    app.run(main, flags_parser=parser)


def flag_value(flag_name: str = "config") -> ml_collections.ConfigDict:
    """The config given on the command line (inside a `main` started by `run`)."""
    from absl import flags

    return flags.FLAGS[flag_name].value
