"""The throughput breakdown of experiments/bench_agent.py: the identity swaps take effect and are
undone, and the shares add up."""

import jax
import numpy as np
import pytest

from ringrl.agents import backbone, dt
from ringrl.experiments import bench_agent


def test_shares_add_up():
    s = bench_agent.shares(full_s=1.0, no_attention_s=0.6, no_ffn_s=0.7, host_s=0.1)
    assert s["attention"] == pytest.approx(0.4) and s["ffn"] == pytest.approx(0.3)
    assert s["other"] == pytest.approx(0.3) and s["host_per_step"] == pytest.approx(0.1)
    # Timing noise can make a variant slower than the full step: its share is 0, not negative.
    assert bench_agent.shares(1.0, 1.2, 0.5, 0.0)["attention"] == 0.0


def test_identity_swaps_take_effect_and_are_undone():
    model = dt.make_model(
        action_dim=2, discrete=False, context_steps=4, max_timestep=8,
        embed_dim=8, num_layers=1, num_heads=2, attention="dense", layout="contiguous",
    )  # fmt: skip
    batch = backbone.dummy_batch(model, 3, batch_size=1, steps=4)
    batch["observations"] = jax.random.normal(jax.random.key(0), batch["observations"].shape)
    params = backbone.init_params(model, jax.random.key(0), obs_dim=3)
    outputs = {}
    for part in (None, "attention", "ffn"):
        with bench_agent.without(part):
            outputs[part] = np.asarray(model.apply({"params": params}, batch))
    assert not np.allclose(outputs[None], outputs["attention"])
    assert not np.allclose(outputs[None], outputs["ffn"])
    assert backbone.attend.__name__ == "attend"
    np.testing.assert_array_equal(np.asarray(model.apply({"params": params}, batch)), outputs[None])
    traj = bench_agent.synthetic_trajectories(3, length=5)
    assert traj.num_episodes == 3 and traj.timeouts.sum() == 3


def test_suite_configs_are_the_suite_cells():
    """--d4rl_suite times the cells the continuous-control results were trained with."""
    from ringrl.configs import d4rl_suite

    (dt_name, dt_cfg), *ats = bench_agent.suite_configs((1, 8))
    base = d4rl_suite.get_config()
    assert (
        dt_cfg.to_dict() == d4rl_suite.cell(base, base.suite.ablation_sets[0], "dt", 1, 0).to_dict()
    )
    assert [c.data.num_trajectories for _, c in ats] == [1, 8]
    assert all(c.data.horizon == base.suite.cap and dict(c.mesh)["seq"] == -1 for _, c in ats)
