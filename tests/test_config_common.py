"""configs/common.py (the arg parser); experiments/cli.py (config loading, override checks)."""

import ml_collections
import pytest

from ringrl.configs import common
from ringrl.experiments import cli

CONFIG_TEXT = """
import ml_collections
from ringrl.configs import common

def get_config(arg=None):
    arg = common.parse_arg(arg, n=4, smoke=False, env="DarkRoom")
    config = ml_collections.ConfigDict()
    config.seed = 0
    config.data = dict(n=arg.n, env=arg.env)
    config.optim = dict(lr=1e-3 if not arg.smoke else 1e-2, steps=10)
    return config
"""


@pytest.fixture()
def config_file(tmp_path):
    path = tmp_path / "toy.py"
    path.write_text(CONFIG_TEXT)
    return str(path)


def test_parse_arg_types_and_flags():
    arg = common.parse_arg("n=8,smoke,env=Hopper", n=4, smoke=False, env="x", lr=0.1)
    assert arg.n == 8 and isinstance(arg.n, int)
    assert arg.smoke is True and arg.env == "Hopper" and arg.lr == 0.1
    assert common.parse_arg(None, n=4).n == 4


@pytest.mark.parametrize(
    "arg, match",
    [
        ("m=3", "unknown config arg 'm'"),
        ("n=abc", "is not a int"),
        ("n", "needs a value"),
        ("smoke=maybe", "not a boolean"),
    ],
)
def test_parse_arg_errors(arg, match):
    with pytest.raises(ValueError, match=match):
        common.parse_arg(arg, n=4, smoke=False)


def test_load_config_with_arg(config_file):
    config = cli.load_config(config_file + ":n=16,smoke")
    assert isinstance(config, ml_collections.ConfigDict)
    assert config.data.n == 16 and config.optim.lr == 1e-2


def test_missing_config_file_names_available():
    with pytest.raises(FileNotFoundError, match="not found; available in configs/"):
        cli.load_config("configs/does_not_exist.py")


def test_bad_override_names_nearest_key(config_file):
    with pytest.raises(KeyError, match=r"--config.optim.lrr; did you mean --config.optim.lr"):
        cli._check_overrides(["--config", config_file, "--config.optim.lrr=3"], "config", "")
    # Valid overrides pass.
    cli._check_overrides([f"--config={config_file}", "--config.optim.lr=3"], "config", "")


def test_flat_keys():
    config = ml_collections.ConfigDict(dict(a=1, b=dict(c=2, d=dict(e=3))))
    assert cli.flat_keys(config) == ["a", "b", "b.c", "b.d", "b.d.e"]


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config.optim.lrr=3"],
            "unknown override --config.optim.lrr; did you mean --config.optim.lr?",
        ),
        (["--config", "configs/nope.py"], "config file 'configs/nope.py' not found"),
        (["--config", "configs/at_darkroom.py:m=3"], "unknown config arg 'm'"),
        (["--config.optim.lr=abc"], "could not convert string to float: 'abc'"),
    ],
)
def test_entry_point_config_mistakes_exit_2_in_one_line(args, message):
    """Through the real entry point (no jax import happens before these checks)."""
    import subprocess
    import sys

    proc = subprocess.run(
        [sys.executable, "-m", "ringrl.experiments.train", *args], capture_output=True, text=True
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error: ") and message in proc.stderr
