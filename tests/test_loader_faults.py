"""Property-based fault test of the dataset loaders (hypothesis, fixed seed: derandomize=True).

Random valid files are written, then mutated: truncated, a key dropped, a dtype or shape
changed, NaN/inf injected, one per-step key made shorter. Each mutated file must either load to
the same episodes as the original, or raise the documented ValueError whose message names the
file; any other exception fails the test. Mutations that break the data (NaN, unequal lengths,
bytes instead of numbers, a 3-d array) must raise.
"""

import os
import shutil
import tempfile

import h5py
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ringrl.envs.datasets import load_d4rl
from ringrl.envs.exorl import load_exorl
from ringrl.envs.trajectories import Trajectories

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    derandomize=True,  # the same examples on every run (and in CI)
    database=None,  # nothing written to .hypothesis/
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
D4RL_KEYS = ("observations", "actions", "rewards", "terminals", "timeouts")


@st.composite
def d4rl_data(draw):
    lengths = draw(st.lists(st.integers(1, 6), min_size=1, max_size=4))
    n = sum(lengths)
    obs_dim, act_dim = draw(st.integers(1, 3)), draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**16)))
    ends = np.cumsum(lengths) - 1
    timeout = draw(st.lists(st.booleans(), min_size=len(lengths), max_size=len(lengths)))
    terminals, timeouts = np.zeros(n, bool), np.zeros(n, bool)
    for end, is_timeout in zip(ends, timeout):
        (timeouts if is_timeout else terminals)[end] = True
    return {
        "observations": rng.normal(size=(n, obs_dim)).astype(np.float32),
        "actions": rng.uniform(-1, 1, (n, act_dim)).astype(np.float32),
        "rewards": rng.normal(size=n).astype(np.float32),
        "terminals": terminals,
        "timeouts": timeouts,
    }


MUTATIONS = st.one_of(
    st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
    st.tuples(st.just("drop"), st.sampled_from(D4RL_KEYS)),
    st.tuples(st.just("float64"), st.sampled_from(("observations", "actions", "rewards"))),
    st.tuples(st.just("int8"), st.sampled_from(("terminals", "timeouts"))),
    st.tuples(st.just("bytes"), st.sampled_from(D4RL_KEYS)),
    st.tuples(st.just("column"), st.sampled_from(("rewards", "terminals", "timeouts"))),
    st.tuples(st.just("3d"), st.sampled_from(("observations", "actions"))),
    st.tuples(st.just("nan"), st.sampled_from(("observations", "actions", "rewards"))),
    st.tuples(st.just("inf"), st.sampled_from(("observations", "actions", "rewards"))),
    st.tuples(st.just("shorter"), st.sampled_from(D4RL_KEYS)),
)
MUST_FAIL = ("bytes", "3d", "nan", "inf", "shorter")


def _mutate(data, mutation):
    kind, arg = mutation
    data = dict(data)
    if kind == "drop":
        del data[arg]
    elif kind in ("float64", "int8"):
        data[arg] = data[arg].astype(kind)
    elif kind == "bytes":
        data[arg] = data[arg].astype("S12")
    elif kind == "column":
        data[arg] = data[arg][:, None]
    elif kind == "3d":
        data[arg] = data[arg][..., None]
    elif kind in ("nan", "inf"):
        data[arg] = data[arg].copy()
        data[arg].reshape(-1)[len(data[arg].reshape(-1)) // 2] = np.nan if kind == "nan" else np.inf
    elif kind == "shorter":
        data[arg] = data[arg][:-1]
    return data


def _same_episodes(traj, data):
    n = len(data["rewards"])
    starts = np.unique(np.r_[0, np.flatnonzero(data["terminals"] | data["timeouts"]) + 1, n])
    np.testing.assert_array_equal(traj.episode_starts, starts)
    for key in D4RL_KEYS:
        np.testing.assert_array_equal(getattr(traj, key), data[key], err_msg=key)


@SETTINGS
@given(data=d4rl_data(), mutation=MUTATIONS)
def test_d4rl_loader_on_damaged_files(data, mutation):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "set.hdf5")
        with h5py.File(path, "w") as f:
            for key, value in _mutate(data, mutation).items():
                f[key] = value
        if mutation[0] == "truncate":
            os.truncate(path, int(os.path.getsize(path) * mutation[1]))
        try:
            traj = load_d4rl(path)
        except ValueError as err:
            assert path in str(err) and "\n" not in str(err), str(err)
            return
        assert mutation[0] not in MUST_FAIL, f"{mutation} loaded silently"
        if mutation[0] == "drop":
            assert mutation[1] == "timeouts"  # optional in D4RL: episodes split on terminals
            data = {**data, "timeouts": np.zeros_like(data["timeouts"])}
        _same_episodes(traj, data)


@SETTINGS
@given(
    lengths=st.lists(st.integers(2, 6), min_size=1, max_size=3),
    mutation=st.one_of(
        st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
        st.tuples(st.just("drop"), st.sampled_from(("observation", "action", "reward"))),
        st.tuples(st.just("nan"), st.sampled_from(("observation", "action", "reward"))),
        st.tuples(st.just("shorter"), st.sampled_from(("observation", "action", "reward"))),
        st.tuples(st.just("bytes"), st.sampled_from(("observation", "action", "reward"))),
    ),
    victim=st.integers(0, 2),
)
def test_exorl_loader_on_damaged_files(lengths, mutation, victim):
    rng = np.random.default_rng(len(lengths))
    with tempfile.TemporaryDirectory() as tmp:
        episodes, paths = [], []
        for i, t in enumerate(lengths):
            ep = {
                "observation": rng.normal(size=(t, 3)).astype(np.float32),
                "action": rng.uniform(-1, 1, (t, 2)).astype(np.float32),
                "reward": rng.normal(size=(t, 1)).astype(np.float32),
                "discount": np.ones((t, 1), np.float32),
            }
            episodes.append(ep)
            paths.append(os.path.join(tmp, f"ep_{i}_{t}.npz"))
        victim %= len(lengths)
        for i, (ep, path) in enumerate(zip(episodes, paths)):
            kind, key = mutation
            ep = dict(ep)
            if i == victim and kind == "drop":
                del ep[key]
            elif i == victim and kind == "nan":  # a row that becomes a transition's
                ep[key] = ep[key].copy()
                ep[key][0 if key == "observation" else 1, 0] = np.nan
            elif i == victim and kind == "shorter":
                ep[key] = ep[key][:-1]
            elif i == victim and kind == "bytes":
                ep[key] = ep[key].astype("S12")
            np.savez(path, **ep)
        if mutation[0] == "truncate":
            os.truncate(paths[victim], int(os.path.getsize(paths[victim]) * mutation[1]))
        try:
            traj = load_exorl(tmp)
        except ValueError as err:
            assert tmp in str(err) and "\n" not in str(err), str(err)
            return
        assert mutation[0] == "truncate", f"{mutation} loaded silently"
        np.testing.assert_array_equal(
            traj.observations, np.concatenate([ep["observation"][:-1] for ep in episodes])
        )


MINARI_KEYS = ("observations", "actions", "rewards", "terminations", "truncations")


@pytest.fixture(scope="module")
def minari_dataset(tmp_path_factory):
    """A small exported Minari dataset (3 episodes) and the Trajectories it came from."""
    pytest.importorskip("minari")
    from ringrl.envs.minari_io import export_minari

    root = tmp_path_factory.mktemp("minari")
    rng = np.random.default_rng(0)
    episodes = [
        {
            "observations": rng.normal(size=(t, 2)).astype(np.float32),
            "actions": rng.uniform(-1, 1, (t, 1)).astype(np.float32),
            "rewards": rng.normal(size=t).astype(np.float32),
            "terminals": np.r_[np.zeros(t - 1), 1].astype(bool),
            "timeouts": np.zeros(t, bool),
        }
        for t in (2, 3, 4)
    ]
    traj = Trajectories.from_episodes(episodes)
    old = os.environ.get("MINARI_DATASETS_PATH")
    os.environ["MINARI_DATASETS_PATH"] = str(root)
    try:
        export_minari(traj, "ringrl/faults/base-v0")
    finally:
        _restore_env("MINARI_DATASETS_PATH", old)
    return root / "ringrl" / "faults" / "base-v0", traj


def _restore_env(name, value):
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


@settings(SETTINGS, max_examples=40)
@given(
    mutation=st.one_of(
        st.tuples(st.just("truncate"), st.floats(0.0, 0.99)),
        st.tuples(st.just("metadata"), st.floats(0.0, 0.99)),
        st.tuples(st.just("drop"), st.sampled_from(MINARI_KEYS)),
        st.tuples(st.just("nan"), st.sampled_from(("observations", "actions", "rewards"))),
        st.tuples(st.just("shorter"), st.sampled_from(MINARI_KEYS)),
        st.tuples(st.just("bytes"), st.sampled_from(("observations", "actions", "rewards"))),
    ),
    episode=st.integers(0, 2),
)
def test_minari_loader_on_damaged_datasets(minari_dataset, mutation, episode):
    from ringrl.envs.minari_io import load_minari

    base, traj = minari_dataset
    kind, arg = mutation
    with tempfile.TemporaryDirectory() as tmp:
        folder = os.path.join(tmp, "ringrl", "faults", "x-v0")
        shutil.copytree(base, folder)
        main = os.path.join(folder, "data", "main_data.hdf5")
        meta = os.path.join(folder, "data", "metadata.json")
        if kind == "truncate":
            os.truncate(main, int(os.path.getsize(main) * arg))
        elif kind == "metadata":
            os.truncate(meta, int(os.path.getsize(meta) * arg))
        else:
            with h5py.File(main, "r+") as f:
                name = f"episode_{episode}/{arg}"
                value = f[name][()]
                del f[name]
                if kind == "nan":
                    value = value.astype(np.float32)
                    value.reshape(-1)[0] = np.nan
                elif kind == "shorter":
                    value = value[:-1]
                elif kind == "bytes":
                    value = value.astype("S12")
                if kind != "drop":
                    f[name] = value
        old = os.environ.get("MINARI_DATASETS_PATH")
        os.environ["MINARI_DATASETS_PATH"] = tmp
        try:
            loaded = load_minari("ringrl/faults/x-v0")
        except ValueError as err:
            assert "'ringrl/faults/x-v0'" in str(err) and "\n" not in str(err), str(err)
            return
        finally:
            _restore_env("MINARI_DATASETS_PATH", old)
        assert kind in ("truncate", "metadata"), f"{mutation} loaded silently"
        for key in ("observations", "actions", "rewards", "terminals", "timeouts"):
            np.testing.assert_array_equal(getattr(loaded, key), getattr(traj, key), err_msg=key)
