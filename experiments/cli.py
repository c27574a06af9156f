"""Config loading for the entry points: `--config configs/NAME.py:key=value,flag` and
`--config.group.field=value` (`ml_collections.config_flags`, locked configs), with mistakes reported
as one line and exit code 2.
"""

import difflib
import importlib.util
import os
import sys
from collections.abc import Callable

import ml_collections

import ringrl.configs

CONFIG_DIR = os.path.dirname(os.path.abspath(ringrl.configs.__file__))


def packaged_config(name: str) -> str:
    """The absolute path of one of ringrl's own config files, e.g. `packaged_config("at_darkroom")`.

    Entry points use it for their defaults, so a `configs/` folder in the user's working directory
    never shadows ours.
    """
    return os.path.join(CONFIG_DIR, f"{name}.py")


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


def _resolve_config_args(argv: list[str], flag_name: str) -> list[str]:
    """`--config PATH[:arg]` with PATH resolved as `load_config` does (absl reads it as written)."""
    out, i = [], 0
    while i < len(argv):
        a = argv[i]
        if a == f"--{flag_name}" and i + 1 < len(argv):
            path, sep, arg = argv[i + 1].partition(":")
            out += [a, resolve_config_path(path) + sep + arg]
            i += 2
            continue
        if a.startswith(f"--{flag_name}="):
            path, sep, arg = a.split("=", 1)[1].partition(":")
            a = f"--{flag_name}={resolve_config_path(path)}{sep}{arg}"
        out.append(a)
        i += 1
    return out


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

    from ringrl.experiments import xla_flags

    xla_flags.guard_host_devices()  # forced host devices: generous collective timeouts
    errors = (FileNotFoundError, KeyError, ValueError, flags.Error, AttributeError)
    try:
        _check_overrides(sys.argv[1:], flag_name, default)
        sys.argv[1:] = _resolve_config_args(sys.argv[1:], flag_name)
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


def setup_process() -> bool:
    """What every entry point does first: join the other processes (if any), then set the
    process-wide JAX options (partitionable threefry, so random numbers don't depend on the mesh)
    and quiet orbax's per-checkpoint INFO logs. Library code sets no JAX options itself.

    Returns:
      True if this process is part of a multi-process run.
    """
    import jax
    from absl import logging

    from ringrl.ring import distributed

    multi = distributed.maybe_initialize()
    jax.config.update("jax_threefry_partitionable", True)
    logging.set_verbosity(logging.WARNING)
    return multi
