"""Smoke tests: every config trains a few steps and evaluates once (8 virtual CPU devices).

Runs with equal shapes build equal programs; XLA's persistent compilation cache (tests/conftest.py)
compiles them once, so ablation_at (the shapes of at_darkroom) costs little.
"""

import json
import os

import numpy as np
import pytest

from ringrl.agents.evaluation import evaluate_checkpoint
from ringrl.agents.trainer import train_and_evaluate
from ringrl.configs import ablation_context, ad_darkroom, at_d4rl, at_darkroom, dt_d4rl


@pytest.fixture(scope="module")
def hopper_file(tmp_path_factory):
    """A tiny D4RL-schema Hopper-v5 dataset of random-action episodes."""
    from ringrl.envs.generate import rollout_episodes, uniform_policy
    from ringrl.envs.trajectories import Trajectories

    path = str(tmp_path_factory.mktemp("d4rl") / "hopper-random-tiny.hdf5")
    episodes = rollout_episodes(
        "Hopper-v5", uniform_policy(-np.ones(3), np.ones(3)), num_episodes=8, seed=0
    )
    traj = Trajectories.from_episodes(episodes, metadata={"env_id": "Hopper-v5"})
    traj.save(path)
    return path


def _smoke(config, tmp_path):
    config.unlock()
    config.data.dir = str(tmp_path / "data")
    # All 8 virtual devices: batch and environments over 2, the ring over 4 (every smoke context
    # length divides by 4).
    config.mesh = (("data", 2), ("seq", 4))
    config.lock()
    result = train_and_evaluate(config, tmp_path / "run")
    assert result["step"] == config.num_steps
    assert np.isfinite(result["train/loss"])
    ev = result["eval"]
    assert len(ev["return_mean"]) == config.eval.attempts
    assert ev["num_episodes"] >= 1
    with open(tmp_path / "run" / "eval.json") as f:
        assert json.load(f)["attempts"] == config.eval.attempts
    rows = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert rows[-1]["step"] == config.num_steps and "eval/return_attempt1" in rows[-1]
    assert os.listdir(tmp_path / "run" / "checkpoints")
    # ringrl-eval's path: the restored checkpoint, evaluated the same way, acts the same.
    stored, again = evaluate_checkpoint(tmp_path / "run")
    assert stored.data.mode == config.data.mode
    np.testing.assert_array_equal(again["returns"], ev["returns"])
    return result


def test_state_normalisation_lives_in_the_checkpoint(tmp_path):
    """The state statistics are set from the data, untouched by training, saved with the params
    and restored from the checkpoint (not recomputed) when ringrl-eval rebuilds the agent."""
    import jax

    from ringrl.agents.agent import Agent, make_sampler
    from ringrl.agents.checkpoint import Checkpointer
    from ringrl.envs.sources import load_data
    from ringrl.ring.mesh import make_mesh

    config = at_darkroom.get_config("smoke")
    _smoke(config, tmp_path)
    data = load_data(config, verbose=False)
    sampler = make_sampler(config, data.trajectories, seed=0)
    mean, std = sampler.obs_stats()
    assert np.all(np.abs(std - 1) > 0.1)  # DarkRoom (x, y): a normalisation that matters
    agent = Agent(config, sampler, make_mesh(config.mesh), data.env_id)
    target = agent.init_state(jax.random.key(0))
    params = dict(target.params)
    params["embed"] = {
        **params["embed"],
        "obs_norm": jax.tree.map(jax.numpy.zeros_like, params["embed"]["obs_norm"]),
    }
    ckpt = Checkpointer(tmp_path / "run" / "checkpoints")
    state, _ = ckpt.restore(target.replace(params=params))
    ckpt.close()
    norm = jax.device_get(state.params["embed"]["obs_norm"])
    np.testing.assert_allclose(norm["mean"], mean, rtol=1e-6)
    np.testing.assert_allclose(norm["std"], std, rtol=1e-6)


@pytest.mark.parametrize(
    "get_config, arg",
    [
        (at_darkroom.get_config, "smoke"),
        (ad_darkroom.get_config, "smoke"),
        (ablation_context.get_config, "n=2,smoke"),  # same shapes as at_darkroom: no compile
        (ablation_context.get_config, "agent=dt,smoke"),
        (ablation_context.get_config, "n=2,agent=ad,smoke"),
    ],
    ids=["at_darkroom", "ad_darkroom", "ablation_at", "ablation_dt", "ablation_ad"],
)
def test_darkroom_configs(get_config, arg, tmp_path):
    config = get_config(arg)
    result = _smoke(config, tmp_path)
    assert result["eval"]["tasks"] and result["eval"]["reference_optimal"] > 0
    if config.data.mode == "ad":  # more episodes than the context holds: it rolled
        assert result["eval"]["attempts"] == config.eval.attempts > config.data.num_trajectories
        assert result["eval"]["context_episodes"] == config.data.num_trajectories


@pytest.mark.parametrize("get_config", [dt_d4rl.get_config, at_d4rl.get_config], ids=["dt", "at"])
def test_d4rl_configs(get_config, hopper_file, tmp_path):
    config = get_config(f"path={hopper_file},smoke")
    result = _smoke(config, tmp_path)
    assert result["eval"]["env_id"] == "Hopper-v5"
    # D4RL reference scores exist for Hopper: normalized scores are reported.
    assert result["eval"]["normalized_return_mean"] is not None


def test_ablation_cells_see_equal_trajectories_per_step():
    base = ablation_context.get_config()
    per_step = base.ablation.trajectories_per_step
    for n in base.ablation.ns:
        cell = ablation_context.cell(base, n, seed=0)
        assert cell.batch_size * cell.data.num_trajectories == per_step
    assert ablation_context.cell(base, 1, seed=0, agent="dt").batch_size == per_step
    for n in base.ablation.ad_ns:
        cell = ablation_context.cell(base, n, seed=0, agent="ad")
        assert cell.batch_size * n == per_step and cell.data.mode == "ad"
        assert cell.eval.attempts == base.ablation.ad_attempts > n
    with pytest.raises(ValueError, match="not a multiple of n=3"):
        ablation_context.cell(base, 3, seed=0)
