"""One import root: the wheel installs `ringrl` only, and a user's own `configs/` folder or
`agents.py` in the working directory cannot shadow ours."""

import os
import shutil
import subprocess
import sys
import zipfile

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_wheel_top_level_is_ringrl_only(tmp_path):
    # Built from a copy: setuptools writes build/ and *.egg-info into the tree it builds.
    ignore = shutil.ignore_patterns(".venv", ".git", "build", "runs", "data", "wandb", "*.egg-info")
    src = shutil.copytree(ROOT, tmp_path / "src", ignore=ignore)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
        check=True, capture_output=True, cwd=tmp_path,
    )  # fmt: skip
    (wheel,) = [f for f in os.listdir(tmp_path) if f.endswith(".whl")]
    with zipfile.ZipFile(tmp_path / wheel) as zf:
        names = zf.namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"ringrl"}, top
    for sub in ("agents", "ring", "envs", "configs", "experiments"):
        assert f"ringrl/{sub}/__init__.py" in names
    assert "ringrl/configs/at_darkroom.py" in names


@pytest.mark.parametrize("module", ["agents", "configs", "experiments", "ring", "envs"])
def test_generic_names_are_not_importable_from_site_packages(module, tmp_path):
    """Only `ringrl.<name>` exists: the bare name imports nothing of ours."""
    proc = subprocess.run(
        [sys.executable, "-c", f"import {module}; print({module}.__file__)"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode != 0 or ROOT not in proc.stdout, proc.stdout


def test_train_smoke_with_user_configs_folder_and_agents_py(tmp_path):
    """The README's `ringrl-train` in a research folder that has its own configs/ and agents.py."""
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "__init__.py").write_text(
        "raise ImportError('user configs imported')\n"
    )
    (tmp_path / "configs" / "common.py").write_text("raise ImportError('user common imported')\n")
    (tmp_path / "agents.py").write_text("raise ImportError('user agents.py imported')\n")
    (tmp_path / "experiments").mkdir()
    (tmp_path / "experiments" / "__init__.py").write_text("raise ImportError('user experiments')\n")
    env = dict(os.environ, PYTHONPATH=str(tmp_path))  # the user's folder is on the path too
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f
    )
    # The console script, and `python -m`, which puts the working directory first on sys.path.
    script = os.path.join(os.path.dirname(sys.executable), "ringrl-train")
    for command in ([script], [sys.executable, "-m", "ringrl.experiments.train"]):
        proc = subprocess.run(
            [*command, "--config", "configs/at_darkroom.py:smoke", "--workdir", "run"],
            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert os.path.exists(tmp_path / "run" / "eval.json")
        assert "user" not in proc.stderr
        shutil.rmtree(tmp_path / "run")
