"""The continuous-control suite (configs/d4rl_suite.py, ringrl-d4rl): cells share data per step and
schedule, AT's slots and evaluation episodes end at the cap, references are cut at the cap, and
an end-to-end smoke run on tiny generated Hopper sets writes the table, the JSON and the plot."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ringrl.configs import d4rl_suite
from ringrl.envs.trajectories import Trajectories
from ringrl.experiments import d4rl_suite as runner


def test_returns_within_cuts_each_episode():
    data = Trajectories(
        observations=np.zeros((6, 1), np.float32),
        actions=np.zeros((6, 1), np.float32),
        rewards=np.array([1, 2, 3, 10, 20, 5], np.float32),
        terminals=np.array([0, 0, 1, 0, 0, 1], bool),
        timeouts=np.zeros(6, bool),
        episode_starts=np.array([0, 3, 5, 6]),
    )
    np.testing.assert_array_equal(data.returns_within(2), [3, 30, 5])
    np.testing.assert_array_equal(data.returns_within(99), data.returns)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        data.returns_within(0)


def test_cells_share_schedule_and_data_per_step():
    base = d4rl_suite.get_config()
    s = base.suite
    dt = d4rl_suite.cell(base, "walker2d-medium-expert", "dt", 1, 2)
    assert dt.name == "dt_walker2d-medium-expert_seed2" and dt.seed == 2
    assert dt.data.path == "data/walker2d-medium-expert-ringrl-v0.hdf5"
    assert dt.data.context_steps == 20 and dt.eval.max_steps == 0  # whole episodes
    assert dt.eval.target_return == 5000.0
    assert dt.checkpoint_every * 4 == dt.num_steps  # a killed cell resumes from its last quarter
    for n in s.ablation_ns:
        at = d4rl_suite.cell(base, "hopper-medium-replay", "at", n, 1)
        # About equal tokens per train step (AT: 1 per step; DT: 3), schedule and backbone.
        assert at.batch_size * n * s.cap == s.trajectories_per_step * s.cap
        assert at.batch_size * n * s.cap >= dt.batch_size * 20  # env steps per train step
        assert (at.num_steps, at.optim.lr, at.optim.warmup_steps) == (
            dt.num_steps,
            dt.optim.lr,
            dt.optim.warmup_steps,
        )
        for key in ("embed_dim", "num_layers", "num_heads", "dropout", "embed_norm", "activation"):
            assert at.model[key] == dt.model[key], key
        assert at.data.horizon == at.eval.max_steps == s.cap and at.eval.attempts == n
        assert at.eval.target_return == pytest.approx(3600.0 * s.cap / 1000)
        assert (n * s.cap) % 16 == 0  # zigzag over 8 devices
        assert at.eval.seed == dt.eval.seed - 1000
    with pytest.raises(ValueError, match="not a multiple of n=3"):
        d4rl_suite.cell(base, "hopper-medium-replay", "at", 3, 0)
    cells = runner.cells(s)
    assert len(cells) == len(set(cells)) == 2 * 4 * 3 + 2 * 3 * 3
    # %BC: DT's cell (data, schedule, backbone, evaluation) on the best 10% of the steps, with
    # the return-to-go input zeroed; the only differences are those two fields and the name.
    bc = d4rl_suite.cell(base, "walker2d-medium-expert", "bc", 1, 2)
    assert bc.name == "bc10_walker2d-medium-expert_seed2"
    assert (bc.data.top_fraction, bc.model.return_scale) == (0.1, 0.0)
    assert (dt.data.top_fraction, dt.model.return_scale) == (1.0, 0.001)
    a, b = _flat(dt), _flat(bc)
    assert a.keys() == b.keys()
    assert {k for k in a if a[k] != b[k]} == {"name", "data.top_fraction", "model.return_scale"}
    with base.unlocked():
        base.suite.bc_sets = ("hopper-medium",)
    assert runner.cells(base.suite)[-3:] == [("hopper-medium", "bc", 1, seed) for seed in (0, 1, 2)]


def _flat(config, prefix=""):
    """{dotted key: value} of a config's leaves."""
    out = {}
    for key, value in config.items():
        if hasattr(value, "items"):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[prefix + key] = value
    return out


def _tiny_set(path: str, rng: np.random.Generator, reward: float, episodes: int) -> None:
    lengths = rng.integers(10, 30, size=episodes)
    n = int(lengths.sum())
    ends = np.cumsum(lengths) - 1
    Trajectories(
        observations=rng.normal(size=(n, 11)).astype(np.float32),
        actions=rng.uniform(-1, 1, size=(n, 3)).astype(np.float32),
        rewards=(reward + rng.normal(size=n)).astype(np.float32),
        terminals=np.isin(np.arange(n), ends),
        timeouts=np.zeros(n, bool),
        episode_starts=np.concatenate([[0], np.cumsum(lengths)]),
        metadata={"env_id": "Hopper-v5", "ref_min_score": 0.0, "ref_max_score": 30.0},
    ).save(path)


# DT on the tiny medium-replay set alone: no DT/AT table sets, no ablation.
DT_ONLY = (
    "--config.suite.sets=()",
    "--config.suite.ablation_sets=()",
    "--config.suite.dt_sets=('hopper-medium-replay',)",
)


def _suite(data, work, *overrides):
    """ringrl-d4rl's smoke suite on the tiny sets in `data`, in a subprocess (absl flags)."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "ringrl.experiments.d4rl_suite",
            f"--config=configs/d4rl_suite.py:smoke,data={data}",
            f"--workdir={work}",
            *overrides,
        ],
        capture_output=True,
        text=True,
        cwd=work.parent,
        env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8"},
    )


@pytest.fixture(scope="module")
def suite_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("suite")
    data = root / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for level, reward in (("random", 0.0), ("expert", 1.0), ("medium-replay", 0.5)):
        _tiny_set(str(data / f"hopper-{level}-ringrl-v0.hdf5"), rng, reward, 12)
    work = root / "runs"
    return data, work, _suite(data, work)


def test_suite_smoke_writes_table_json_and_plot(suite_run):
    data, work, proc = suite_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "| hopper-medium-replay |" in out and "AT n-ablation" in out
    result = json.load(open(work / "d4rl_suite.json"))
    (row,) = result["table"]
    ref_cap = runner.references(str(data), "hopper", 16)
    assert row["ref_cap"] == pytest.approx(list(ref_cap))
    # DT's capped evaluation ends at 16 steps; AT's slots and episodes do too.
    cap = json.load(open(work / "dt_hopper-medium-replay_seed0" / "eval_cap.json"))
    assert np.max(cap["lengths"]) <= 16
    # The devices of the run (8 forced here) are recorded, and named in the header.
    assert result["devices"] == cap["devices"] == 8 and "8 cpu device(s)" in out
    at = json.load(open(work / "at_hopper-medium-replay_n2_seed0" / "eval.json"))
    assert at["attempts"] == 2 and np.max(at["lengths"]) <= 16
    # The table's AT score is the normalised mean of the run's episodes, recomputed here.
    best = np.max(runner.normalise(at["returns"], ref_cap), axis=1).mean()
    assert row["at_best_cap"]["values"][0] == pytest.approx(best)
    (rows,) = result["ablations"].values()
    assert [r["n"] for r in rows] == [1, 2] and len(rows[1]["data_by_slot"]) == 2
    assert os.path.getsize(work / "score_vs_context.png") > 1000
    # A second run reuses every cell: nothing is trained ("== <cell>" is printed per training).
    again = _suite(data, work)
    assert again.returncode == 0 and "== " not in again.stdout


def test_suite_with_dt_sets_only_writes_the_table_without_a_plot(suite_run):
    """DT on extra sets alone (no AT sets, no ablation): the table and json, no plot, exit 0."""
    data, work, proc = suite_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    only_dt = _suite(
        data,
        work,
        *DT_ONLY,
    )
    assert only_dt.returncode == 0, only_dt.stderr[-2000:]
    assert "== " not in only_dt.stdout  # the smoke run's DT cell is reused
    assert "| hopper-medium-replay |" in only_dt.stdout and "no plot" in only_dt.stdout
    (row,) = json.load(open(work / "d4rl_suite.json"))["table"]
    assert row["set"] == "hopper-medium-replay" and "at_best_cap" not in row


def test_suite_chooses_the_target_on_validation_episodes_and_reports_test_ones(suite_run):
    """suite.targets: every DT cell is evaluated at each candidate on environments other than the
    test ones; the table reports the test episodes at the candidate best on validation."""
    data, work, proc = suite_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    from ringrl.envs.datasets import load_d4rl

    candidates = ("high", "low", "max")
    out = _suite(data, work, *DT_ONLY, f"--config.suite.targets={candidates}")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "== " not in out.stdout and "target chosen on validation episodes" in out.stdout
    cell = work / "dt_hopper-medium-replay_seed0"
    test = json.load(open(cell / "eval.json"))
    valid = {t: json.load(open(cell / f"eval_valid_{t}.json")) for t in candidates}
    data_max = load_d4rl(str(data / "hopper-medium-replay-ringrl-v0.hdf5")).returns.max()
    assert [valid[t]["target_returns"] for t in candidates] == [[3600.0], [1800.0], [data_max]]
    assert {valid[t]["seed"] for t in candidates} == {test["seed"] + 500}
    ref = runner.references(str(data), "hopper")
    scores = {t: runner.run_score(v, ref) for t, v in valid.items()}
    (row,) = json.load(open(work / "d4rl_suite.json"))["table"]
    best = max(candidates, key=lambda t: scores[t])
    assert row["dt_target"]["target"] == best
    assert row["dt_target"]["valid"] == pytest.approx(scores)
    chosen = test if best == "high" else json.load(open(cell / f"eval_test_{best}.json"))
    assert chosen["seed"] == test["seed"]
    assert row["dt"]["values"] == pytest.approx([runner.run_score(chosen, ref)])


def test_suite_runs_percentile_bc_beside_dt(suite_run):
    """suite.bc_sets: %BC cells beside DT's, reported in their own table with DT's score."""
    data, work, proc = suite_run
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = _suite(
        data,
        work,
        *DT_ONLY,
        "--config.suite.bc_sets=('hopper-medium-replay',)",
        "--config.suite.start_noise=(0.1,)",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    trained = [line for line in out.stdout.splitlines() if line.startswith("== ")]
    assert len(trained) == 1 and "bc10_hopper-medium-replay_seed0" in trained[0]  # DT's reused
    assert "10%BC (DT's transformer" in out.stdout
    result = json.load(open(work / "d4rl_suite.json"))
    (row,) = result["bc"]
    ref = runner.references(str(data), "hopper")
    bc = json.load(open(work / "bc10_hopper-medium-replay_seed0" / "eval.json"))
    assert row["bc"]["values"] == pytest.approx([runner.run_score(bc, ref)])
    assert row["dt"] == result["table"][0]["dt"]
    # fit_probe: both agents' action MSE per band of episodes, and DT's return-to-go shifts.
    assert "What DT and 10%BC fit" in out.stdout
    (fit,) = result["fit"]["hopper-medium-replay"]
    for band in ("seen", "next", "rest"):
        assert set(fit[band]) == {"dt", "bc"}
        assert all(np.isfinite(v) and v >= 0 for v in fit[band].values())
    assert list(fit["shift"]) == ["high"] and fit["dt_bc"] > 0
    assert all(np.isfinite(v) and v >= 0 for v in fit["shift"].values())
    # start_noise: both agents again from wider starts, beside their default-noise scores.
    assert "from wider start states" in out.stdout
    default, wide = result["start_noise"]["hopper-medium-replay"]
    assert default["default"] and default["scale"] == 5e-3  # Hopper's own, the data's
    assert default["bc"] == row["bc"]
    assert default["dt"]["values"] == result["table"][0]["dt"]["values"]
    assert wide["scale"] == 0.1 and not wide["default"]
    assert (work / "score_vs_start_noise.png").stat().st_size > 0
    for agent in ("dt", "bc"):
        run = work / f"{agent}{'10' if agent == 'bc' else ''}_hopper-medium-replay_seed0"
        again = json.load(open(run / "eval_start0.1_high.json"))
        assert wide[agent]["values"] == pytest.approx([runner.run_score(again, ref)])
        assert again["returns"] != json.load(open(run / "eval.json"))["returns"]  # other starts


def test_max_target_is_the_sets_best_episode(tmp_path):
    """target "max": the set's highest episode return (cut at the cap for AT's episodes)."""
    from ringrl.configs import dt_d4rl
    from ringrl.envs.datasets import load_d4rl

    path = tmp_path / "hopper-medium-replay-ringrl-v0.hdf5"
    _tiny_set(str(path), np.random.default_rng(1), 0.5, 12)
    data = load_d4rl(str(path))
    suite = d4rl_suite.get_config(f"smoke,data={tmp_path}").suite
    best = float(data.returns.max())
    assert d4rl_suite.eval_target(suite, "hopper-medium-replay", "dt", "max") == best
    assert d4rl_suite.eval_target(suite, "hopper-medium-replay", "at", "max") == float(
        data.returns_within(suite.cap).max()
    )
    assert dt_d4rl.get_config(f"path={path},target=max").eval.target_return == best
    assert np.isnan(dt_d4rl.target_return("", str(tmp_path / "absent.hdf5"), "max"))
    with pytest.raises(ValueError, match=r"one of \('high', 'low', 'max'\) or a number"):
        dt_d4rl.target_return("", str(path), "best")
