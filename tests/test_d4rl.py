"""D4RL HDF5 loader: episode splits, transitions, name resolution and bad input."""

import os

import h5py
import numpy as np
import pytest

from ringrl.envs.datasets import load_d4rl, qlearning_transitions, resolve_path
from ringrl.envs.trajectories import Trajectories

# Hand-made file with 10 rows: terminal at row 2, timeout at row 5, terminal at row 6, then a
# trailing partial episode (rows 7-9, no flag), as real D4RL files end.
TERM = [2, 6]
TOUT = [5]


def _write(path, n=10, obs_dim=3, act_dim=2, extra=None, drop=(), column=False, **override):
    rng = np.random.default_rng(0)
    data = {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        "rewards": np.arange(n, dtype=np.float32),
        "terminals": np.isin(np.arange(n), TERM),
        "timeouts": np.isin(np.arange(n), TOUT),
    }
    if column:  # some D4RL files store scalars as (N, 1) and flags as floats
        data["rewards"] = data["rewards"][:, None]
        data["terminals"] = data["terminals"].astype(np.float32)[:, None]
    data.update(override)
    with h5py.File(path, "w") as f:
        for k, v in data.items():
            if k not in drop:
                f[k] = v
        for k, v in (extra or {}).items():
            f[k] = v
    return data


def test_episode_split_and_trailing_partial(tmp_path):
    p = tmp_path / "d.hdf5"
    data = _write(
        p,
        column=True,
        extra={
            "metadata/algorithm": "SAC",
            "metadata/policy/fc0/weight": np.ones((2, 2)),
            "infos/qpos": np.zeros((10, 4)),
            "infos/action_log_probs": np.zeros(10),
        },
    )
    tr = load_d4rl(p)
    np.testing.assert_array_equal(tr.episode_starts, [0, 3, 6, 7, 10])
    np.testing.assert_array_equal(tr.lengths, [3, 3, 1, 3])
    np.testing.assert_array_equal(tr.returns, [0 + 1 + 2, 3 + 4 + 5, 6, 7 + 8 + 9])
    assert tr.rewards.shape == (10,) and tr.terminals.dtype == bool
    np.testing.assert_array_equal(np.flatnonzero(tr.terminals), TERM)
    np.testing.assert_array_equal(np.flatnonzero(tr.timeouts), TOUT)
    assert not tr.terminals[-1] and not tr.timeouts[-1]  # trailing partial: truncated, no flag
    np.testing.assert_array_equal(tr.observations, data["observations"])
    assert tr.metadata["algorithm"] == "SAC" and tr.task_id is None
    assert tr.next_observations is None
    # d4rl.sequence_dataset semantics on request.
    dropped = load_d4rl(p, drop_trailing_partial=True)
    np.testing.assert_array_equal(dropped.episode_starts, [0, 3, 6, 7])
    assert dropped.num_steps == 7


def test_terminal_and_timeout_on_one_row_counts_as_terminal(tmp_path):
    p = tmp_path / "d.hdf5"
    _write(p, timeouts=np.isin(np.arange(10), [2, 5]))
    tr = load_d4rl(p)
    assert tr.terminals[2] and not tr.timeouts[2] and tr.timeouts[5]


def test_no_timeouts_key_splits_on_terminals(tmp_path):
    p = tmp_path / "d.hdf5"
    _write(p, drop=("timeouts",))
    np.testing.assert_array_equal(load_d4rl(p).episode_starts, [0, 3, 7, 10])


def test_discrete_actions_and_task_ids(tmp_path):
    p = tmp_path / "d.hdf5"
    task = np.repeat([4, 5, 6, 7], [3, 3, 1, 3])
    _write(p, actions=np.arange(10)[:, None] % 5, extra={"infos/task_id": task})
    tr = load_d4rl(p)
    assert tr.actions.dtype == np.int64 and tr.actions.shape == (10,)
    np.testing.assert_array_equal(tr.task_id, [4, 5, 6, 7])
    task[1] = 9
    _write(p, extra={"infos/task_id": task})
    with pytest.raises(ValueError, match="task_id.*inside an episode"):
        load_d4rl(p)


def test_qlearning_transitions_without_next_observations(tmp_path):
    p = tmp_path / "d.hdf5"
    data = _write(p)
    q = qlearning_transitions(p)
    # Kept: every non-final row of an episode, plus terminal rows (2, 6). Dropped: the timeout
    # row 5 and the final row 9 of the partial episode (successor unknown).
    rows = [0, 1, 2, 3, 4, 6, 7, 8]
    succ = [1, 2, 2, 4, 5, 6, 8, 9]  # terminal rows point at themselves (masked placeholder)
    np.testing.assert_array_equal(q["observations"], data["observations"][rows])
    np.testing.assert_array_equal(q["next_observations"], data["observations"][succ])
    np.testing.assert_array_equal(q["actions"], data["actions"][rows])
    np.testing.assert_array_equal(q["rewards"], data["rewards"][rows])
    np.testing.assert_array_equal(q["terminals"], np.isin(rows, TERM))
    with pytest.raises(ValueError, match="drop_timeouts=True"):
        qlearning_transitions(p, drop_timeouts=False)


def test_qlearning_transitions_with_next_observations(tmp_path):
    p = tmp_path / "d.hdf5"
    nxt = np.random.default_rng(1).normal(size=(10, 3)).astype(np.float32)
    data = _write(p, extra={"next_observations": nxt})
    q = qlearning_transitions(p)
    rows = [0, 1, 2, 3, 4, 6, 7, 8, 9]  # only the timeout row goes
    np.testing.assert_array_equal(q["observations"], data["observations"][rows])
    np.testing.assert_array_equal(q["next_observations"], nxt[rows])
    q_all = qlearning_transitions(load_d4rl(p, load_next_observations=True), drop_timeouts=False)
    np.testing.assert_array_equal(q_all["next_observations"], nxt)
    np.testing.assert_array_equal(q_all["terminals"], np.isin(np.arange(10), TERM))


def test_name_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    _write(tmp_path / "hopper_medium_replay-v2.hdf5", obs_dim=11, act_dim=3)  # d4rl's spelling
    tr = load_d4rl("hopper-medium-replay-v2")  # also checked against Hopper-v5's spaces
    assert tr.metadata["dataset_name"] == "hopper-medium-replay-v2"
    _write(tmp_path / "mine-v0.hdf5")
    assert resolve_path("mine-v0") == (str(tmp_path / "mine-v0.hdf5"), "mine-v0")
    with pytest.raises(FileNotFoundError, match="walker2d-medium-v2.*D4RL_DATASET_DIR"):
        load_d4rl("walker2d-medium-v2")


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_d4rl(tmp_path / "nope.hdf5")


def test_not_hdf5(tmp_path):
    p = tmp_path / "x.hdf5"
    p.write_text("hello")
    with pytest.raises(ValueError, match="x.hdf5: not an HDF5 file; fix"):
        load_d4rl(p)


def test_missing_required_key(tmp_path):
    p = tmp_path / "d.hdf5"
    _write(p, drop=("rewards",))
    with pytest.raises(ValueError, match=r"d.hdf5: missing required key\(s\) \['rewards'\]"):
        load_d4rl(p)


def test_unequal_lengths(tmp_path):
    p = tmp_path / "d.hdf5"
    _write(p, actions=np.zeros((9, 2), np.float32))
    with pytest.raises(ValueError, match="unequal lengths.*'actions': 9"):
        load_d4rl(p)


@pytest.mark.parametrize("key", ["observations", "rewards"])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite(tmp_path, key, bad):
    p = tmp_path / "d.hdf5"
    data = _write(p)
    data[key][4] = bad
    _write(p, **{key: data[key]})
    with pytest.raises(ValueError, match=f"d.hdf5: '{key}' contains NaN or inf .*row 4.*fix"):
        load_d4rl(p)


def test_empty_dataset(tmp_path):
    p = tmp_path / "d.hdf5"
    _write(p, n=0, terminals=np.zeros(0, bool), timeouts=np.zeros(0, bool))
    with pytest.raises(ValueError, match="empty"):
        load_d4rl(p)


def test_actions_outside_env_bounds(tmp_path):
    p = tmp_path / "d.hdf5"
    acts = np.random.default_rng(0).uniform(-1, 1, (10, 3)).astype(np.float32)
    acts[7, 1] = 1.5
    _write(p, obs_dim=11, actions=acts)
    with pytest.raises(ValueError, match="'actions' row 7 .*outside Hopper-v5's action bounds"):
        load_d4rl(p, env_id="Hopper-v5")
    assert load_d4rl(p, env_id="Hopper-v5", check_env=False).num_steps == 10
    acts[7, 1] = 1.0
    _write(p, obs_dim=11, actions=acts)
    assert load_d4rl(p, env_id="Hopper-v5").num_steps == 10


def test_wrong_observation_dim_for_env(tmp_path, monkeypatch):
    p = tmp_path / "d.hdf5"
    _write(p, obs_dim=17, act_dim=3)
    with pytest.raises(ValueError, match="dimension 17 but Hopper-v5 observations have shape"):
        load_d4rl(p, env_id="Hopper-v5")
    # Same check through a D4RL name and through metadata written by Trajectories.save.
    monkeypatch.setenv("D4RL_DATASET_DIR", str(tmp_path))
    _write(tmp_path / "hopper-random-v2.hdf5", obs_dim=17, act_dim=3)
    with pytest.raises(ValueError, match="Hopper-v5"):
        load_d4rl("hopper-random-v2")
    tr = load_d4rl(p, check_env=False)
    tr.metadata["env_id"] = "Hopper-v5"
    tr.save(tmp_path / "ours.hdf5")
    with pytest.raises(ValueError, match="ours.hdf5.*Hopper-v5"):
        load_d4rl(tmp_path / "ours.hdf5")


def test_unknown_env_id(tmp_path):
    p = tmp_path / "d.hdf5"
    _write(p)
    with pytest.raises(ValueError, match="NoSuchEnv-v0.*cannot be built"):
        load_d4rl(p, env_id="NoSuchEnv-v0")


def test_discrete_actions_outside_darkroom():
    import gymnasium as gym

    import ringrl.envs  # noqa: F401 (registers ringrl/DarkRoom-v0)
    from ringrl.envs.datasets import check_spaces

    assert "ringrl/DarkRoom-v0" in gym.registry

    tr = Trajectories(
        observations=np.full((4, 2), 4.0),
        actions=np.array([0, 1, 5, 2]),
        rewards=np.zeros(4),
        terminals=np.zeros(4, bool),
        timeouts=np.eye(4, dtype=bool)[3],
        episode_starts=np.array([0, 4]),
    )
    with pytest.raises(ValueError, match="row 2 = 5 outside ringrl/DarkRoom-v0"):
        check_spaces(tr, "ringrl/DarkRoom-v0")


def test_d4rl_reference_scores():
    from ringrl.envs.scores import normalized_score, reference_scores

    assert reference_scores("halfcheetah-medium-replay-v2") == (-280.178953, 12135.0)
    assert reference_scores("hopper-expert-v0") == (-20.272305, 3234.3)
    assert reference_scores("walker2d-random-v2") == (1.629008, 4592.3)
    assert reference_scores("Hopper-v5") == (-20.272305, 3234.3)
    assert reference_scores("maze2d-umaze-dense-v1") == (68.537689, 193.66285642381482)
    assert reference_scores("antmaze-large-diverse-v2") == (0.0, 1.0)
    assert normalized_score("hopper-medium-v2", 3234.3) == pytest.approx(100.0)
    assert normalized_score("hopper-medium-v2", -20.272305) == pytest.approx(0.0)
    r = np.array([1000.0, 2000.0])
    np.testing.assert_allclose(
        normalized_score("walker2d-medium-v2", r), 100 * (r - 1.629008) / (4592.3 - 1.629008)
    )
    with pytest.raises(ValueError, match="no reference scores for 'CartPole-v1'.*hopper"):
        normalized_score("CartPole-v1", 1.0)
    with pytest.raises(ValueError, match="no reference scores"):
        reference_scores("maze2d-eval-umaze-v1")  # not in d4rl's reference table either


def test_dataset_reference_scores(tmp_path):
    from ringrl.envs.scores import normalized_score, reference_scores

    tr = Trajectories(
        observations=np.zeros((4, 2)),
        actions=np.zeros((4, 1)),
        rewards=np.ones(4),
        terminals=np.zeros(4, bool),
        timeouts=np.eye(4, dtype=bool)[3],
        episode_starts=np.array([0, 4]),
        metadata={"ref_min_score": 10.0, "ref_max_score": 30.0, "env_id": "Hopper-v5"},
    )
    assert reference_scores(tr) == (10.0, 30.0)  # the data's own references win
    assert normalized_score(tr, 25.0) == pytest.approx(75.0)
    path = tr.save(tmp_path / "gen.hdf5")
    assert normalized_score(path, 20.0) == pytest.approx(50.0)
    # A file's own references win over the D4RL table even when its name looks like D4RL's.
    path = tr.save(tmp_path / "hopper-medium-ringrl-v0.hdf5")
    assert reference_scores(path) == (10.0, 30.0)
    with pytest.raises(ValueError, match="generated ringrl datasets carry their own"):
        reference_scores("hopper-medium-ringrl-v0")  # a bare name must not fall back to D4RL's
    import stat

    assert stat.S_IMODE(os.stat(path).st_mode) & 0o044  # readable by others (umask permitting)
    tr.metadata = {"env_id": "Hopper-v5"}
    assert reference_scores(tr) == (-20.272305, 3234.3)
    tr.metadata = {}
    with pytest.raises(ValueError, match="ref_min_score and ref_max_score"):
        reference_scores(tr)
    tr.metadata = {"ref_min_score": 5, "ref_max_score": 5}
    with pytest.raises(ValueError, match="must exceed"):
        normalized_score(tr, 1.0)
