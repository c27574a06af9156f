"""Bad input at the command line: one clear line on stderr and exit code 2, before any training.

ringrl-train is called in-process (absl main, SystemExit caught); ringrl-eval, whose flags would
clash with ringrl-train's in one process, runs once as a subprocess.
"""

import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from ringrl.agents.checkpoint import Checkpointer
from ringrl.configs import at_darkroom

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def smoke_workdir(tmp_path_factory):
    """A workdir whose checkpoint was written with at_darkroom:smoke (n=2)."""
    workdir = tmp_path_factory.mktemp("run")
    config = at_darkroom.get_config("smoke")
    ckpt = Checkpointer(workdir / "checkpoints")
    ckpt.save(1, {"step": jnp.int32(1)}, sampler_state={}, config=config)
    ckpt.close()
    return workdir


def test_train_bad_input(smoke_workdir, tmp_path, monkeypatch, capsys):
    from ringrl.agents.checkpoint import ConfigMismatchError
    from ringrl.agents.trainer import train_and_evaluate
    from ringrl.experiments import train

    # Through the CLI (config flags parse once per process, so once here).
    monkeypatch.setattr(
        sys,
        "argv",
        [
            "ringrl-train",
            "--config=configs/at_darkroom.py:smoke",
            "--config.eval.env_id=ringrl/DarkRom-v0",
            f"--workdir={tmp_path / 'a'}",
        ],
    )
    with pytest.raises(SystemExit) as exit_info:
        train.run()
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1
    assert err[0].startswith("error: unknown environment id 'ringrl/DarkRom-v0'; did you mean")

    # The same except-branch of the CLI turns these into one line and exit 2.
    other = at_darkroom.get_config("smoke")
    with other.unlocked():
        other.data.num_trajectories = 3
        other.data.dir = str(tmp_path / "data")
    with pytest.raises(ConfigMismatchError, match=r"differs in data\.num_trajectories\); "):
        train_and_evaluate(other, smoke_workdir, resume=True)
    with pytest.raises(ValueError, match="already has a checkpoint .step 1.; pass --resume"):
        train_and_evaluate(at_darkroom.get_config("smoke"), smoke_workdir)
    unknown = at_darkroom.get_config("smoke")
    with unknown.unlocked():
        unknown.data.mode = "xx"
        unknown.data.dir = str(tmp_path / "data")
    with pytest.raises(ValueError, match=r"config.data.mode='xx' is unknown; use one of \('at', "):
        train_and_evaluate(unknown, tmp_path / "b")
    for field, value, message in (
        ("model.tokens_per_step", 3, r"config.model.tokens_per_step=3 is not supported; use 1 "),
        ("data.target", "oracle", r"config.data.target='oracle' is unknown; use one of "),
    ):
        bad = at_darkroom.get_config("smoke")
        with bad.unlocked():
            group, name = field.split(".")
            bad[group][name] = value
            bad.data.dir = str(tmp_path / "data")
        with pytest.raises(ValueError, match=message):
            train_and_evaluate(bad, tmp_path / "c")
    assert not os.path.exists(tmp_path / "data")  # refused before generating data


def _module(name, *args, cwd, timeout=300):
    """`python -m name args...` on CPU in `cwd`, output captured."""
    return subprocess.run(
        [sys.executable, "-m", name, *args],
        cwd=cwd,
        env={**os.environ, "JAX_PLATFORMS": "cpu"},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_eval_more_attempts_than_context(smoke_workdir, tmp_path):
    proc = _module(
        "ringrl.experiments.evaluate", f"--workdir={smoke_workdir}", "--attempts=5", cwd=tmp_path
    )
    lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1
    assert "5 attempts in context but the model was built for n=2 trajectories" in lines[0]


def test_eval_refuses_overrides_that_training_fixed(smoke_workdir, tmp_path):
    """ringrl-eval applies --config.eval.* overrides; any other field is refused, not ignored."""
    proc = _module(
        "ringrl.experiments.evaluate",
        f"--workdir={smoke_workdir}",
        "--config.model.embed_dim=8",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "error: --config.model.embed_dim cannot change a trained checkpoint" in proc.stderr


def _ablate(workdir, *overrides, cwd):
    return _module(
        "ringrl.experiments.ablate",
        f"--config={ROOT}/configs/ablation_context.py:smoke",
        f"--workdir={workdir}",
        "--config.wandb.mode=disabled",
        *overrides,
        cwd=cwd,
        timeout=600,
    )


def test_ablate_smoke_table_and_reuse(tmp_path):
    """ringrl-ablate end to end (n = 1, 2 and DT, 2 steps each), then rerun with other settings."""
    import json

    proc = _ablate(tmp_path / "abl", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(tmp_path / "abl" / "ablation.json") as f:
        table = json.load(f)
    assert [r["n"] for r in table["rows"]] == [1, 2]
    n2, dt = table["rows"][1], table["dt"]
    # n=2 makes 2 attempts on each of the 2 held-out goals: 2 second attempts, split by history.
    assert n2["after_success"]["count"] + n2["after_failures"]["count"] == 2
    assert dt["after_success"] == dt["after_failures"] == {"mean": None, "count": 0}  # 1 attempt
    assert os.path.getsize(tmp_path / "abl" / "return_vs_context.png") > 1000
    assert "after a success" in proc.stdout
    # The best of n trajectories of a training context grows with n (same goals, more draws).
    assert 0 < table["rows"][0]["data_best"] <= n2["data_best"]
    # Slots are return-sorted: the data's per-slot curve ascends, and its last slot's return is
    # the relabelled target (computed from target_returns, a separate path).
    slots = n2["data_by_slot"]
    assert len(slots) == 2 and slots[0] <= slots[1] == pytest.approx(n2["data_best"])
    assert len(n2["return_by_attempt"]) == 2
    # A finished cell is reused only if it was trained the same way.
    proc = _ablate(tmp_path / "abl", "--config.num_steps=3", cwd=tmp_path)
    assert proc.returncode == 2
    assert "differs in num_steps" in proc.stderr.strip().splitlines()[-1]


def test_after_success_split():
    from ringrl.envs.evaluate import after_success

    split = after_success([{"returns": [[0, 0, 3], [2, 5, 0]]}, {"returns": [[0, 0, 0]]}])
    assert split["after_success"] == {"mean": 2.5, "count": 2}  # 5 and 0, after the 2
    assert split["after_failures"] == {"mean": 0.75, "count": 4}  # 0, 3 and 0, 0


def test_plots_cli(tmp_path, capsys):
    import json

    from ringrl.experiments import plots

    result = {"return_mean": [1.0, 2.0], "return_std": [0.5, 0.5], "num_episodes": 3}
    (tmp_path / "a.json").write_text(json.dumps(result))
    plots.main([str(tmp_path / "p.png"), f"AT n=2={tmp_path / 'a.json'}", "--title", "t"])
    assert os.path.getsize(tmp_path / "p.png") > 1000
    with pytest.raises(SystemExit) as e:
        plots.main([str(tmp_path / "q.png"), f"x={tmp_path / 'missing.json'}"])
    assert e.value.code == 2 and "pass LABEL=PATH" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "q.png")


def test_plots_of_a_rolling_evaluation_and_ad_in_the_ablation(tmp_path, monkeypatch):
    """AD's 40-episode curve gets an SE band and a line where its context rolls; the ablation plot
    takes AD's points beside AT's."""
    from ringrl.experiments import plots

    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or str(path))
    result = {
        "return_mean": [1.0, 2.0, 3.0, 3.5, 4.0],
        "return_se": [0.5] * 5,
        "num_episodes": 20,
        "context_episodes": 2,
    }
    plots.returns_by_attempt({"AD, n=2": result}, tmp_path / "ad.png")
    ax = figures[-1].axes[0]
    assert [line.get_xdata()[0] for line in ax.lines if line.get_linestyle() == ":"] == [2.5]
    assert len(ax.collections) == 1  # the standard-error band
    assert ax.get_xlabel().startswith("episode in a row")
    rows = [{"n": 1, "mean": 1.0, "se": 0.1}, {"n": 2, "mean": 2.0, "se": 0.1}]
    plots.return_vs_context(
        rows, tmp_path / "abl.png", others={"AD": [{"n": 2, "mean": 3, "se": 1}]}
    )
    labels = figures[-1].axes[0].get_legend_handles_labels()[1]
    assert "AD" in labels
