"""Checkpoints: bitwise resume, keep-last-k, config refusal, restore onto a mesh."""

import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringrl.agents.checkpoint import Checkpointer, ConfigMismatchError, config_mismatch
from ringrl.ring.mesh import DATA, SEQ, make_mesh


@struct.dataclass
class _State:
    step: jax.Array
    params: dict
    opt_state: optax.OptState
    rng: jax.Array


class _Sampler:
    """Host numpy batch source with resumable state, like the context sampler."""

    def __init__(self, seed):
        self.rng = np.random.default_rng(seed)

    def sample(self, n):
        x = self.rng.normal(size=(n, 4)).astype(np.float32)
        return x, (x.sum(-1, keepdims=True) > 0).astype(np.float32)

    def state_dict(self):
        return {"bit_generator": self.rng.bit_generator.state, "marker": np.arange(3)}

    def load_state_dict(self, d):
        self.rng.bit_generator.state = d["bit_generator"]


_MODEL = nn.Sequential([nn.Dense(8), nn.relu, nn.Dense(1)])
_OPT = optax.adamw(1e-2)
_CONFIG = {"model": {"width": 8, "layers": [1, 2]}, "data": {"n": 4}, "optim": {"lr": 1e-2}}


@jax.jit
def _step(state, x, y):
    rng = jax.random.fold_in(state.rng, state.step)
    noise = 1e-3 * jax.random.normal(rng, y.shape)

    def loss_fn(params):
        return jnp.mean((_MODEL.apply(params, x) - y - noise) ** 2)

    grads = jax.grad(loss_fn)(state.params)
    updates, opt_state = _OPT.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state)


def _init():
    params = _MODEL.init(jax.random.key(1), jnp.zeros((1, 4)))
    return _State(jnp.int32(0), params, _OPT.init(params), jax.random.key(7))


def _train(state, sampler, until, ckpt=None):
    while int(state.step) < until:
        state = _step(state, *sampler.sample(16))
        if ckpt is not None:
            ckpt.save(int(state.step), state, sampler_state=sampler.state_dict(), config=_CONFIG)
    return state


def test_resume_is_bitwise_identical(tmp_path):
    n, k = 6, 3
    reference = _train(_init(), _Sampler(0), n)

    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    _train(_init(), _Sampler(0), k, ckpt)  # "killed" after step k
    ckpt.close()

    ckpt = Checkpointer(tmp_path / "ckpt", keep=2)
    assert ckpt.latest_step() == k
    assert ckpt.all_steps() == [k - 1, k]  # keep-last-2
    state, sampler_state = ckpt.restore(_init(), config=_CONFIG)
    assert int(state.step) == k
    assert jax.random.key_impl(state.rng) == jax.random.key_impl(reference.rng)
    np.testing.assert_array_equal(sampler_state["marker"], np.arange(3))
    sampler = _Sampler(123)
    sampler.load_state_dict(sampler_state)
    resumed = _train(state, sampler, n, ckpt)

    same = jax.tree.map(
        lambda a, b: np.array_equal(np.asarray(a), np.asarray(b)), resumed.params, reference.params
    )
    assert all(jax.tree.leaves(same)), "resumed params differ from uninterrupted run"
    for a, b in zip(jax.tree.leaves(resumed.opt_state), jax.tree.leaves(reference.opt_state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(
        jax.random.key_data(resumed.rng), jax.random.key_data(reference.rng)
    )


def test_refuses_other_config_and_restores_onto_mesh(tmp_path):
    ckpt = Checkpointer(tmp_path / "ckpt", keep=1)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        ckpt.restore(_init())
    state = _init()
    ckpt.save(0, state, sampler_state={}, config=_CONFIG)
    # An unfinished save (orbax's temporary directory) is not a checkpoint.
    os.makedirs(tmp_path / "ckpt" / "5.orbax-checkpoint-tmp-123")
    assert ckpt.latest_step() == 0

    other = {**_CONFIG, "model": {"width": 16, "layers": [1, 2]}, "optim": {"lr": 1.0}}
    assert config_mismatch(ckpt.saved_config(), other) == ["model.width"]
    with pytest.raises(ConfigMismatchError, match=r"differs in model\.width\)"):
        ckpt.restore(state, config=other)
    # A field added later matches a saved config without it only at its old behaviour's value.
    old, new = {"data": {"mode": "at"}}, {"data": {"mode": "at", "history_stride": 1}}
    assert config_mismatch(old, new) == []
    new["data"]["history_stride"] = 4
    assert config_mismatch(old, new) == ["data.history_stride"]
    # Optimizer fields may change on resume; tuples equal their JSON lists.
    ckpt.check_config({**_CONFIG, "model": {"width": 8, "layers": (1, 2)}, "optim": {"lr": 2}})

    mesh = make_mesh([(DATA, 2), (SEQ, 4)])
    sharded = {"kernel": NamedSharding(mesh, P(SEQ, None)), "bias": NamedSharding(mesh, P())}
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
        state,
    )
    target = target.replace(
        params={
            "params": {
                **target.params["params"],
                "layers_0": {
                    k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharded[k])
                    for k, v in target.params["params"]["layers_0"].items()
                },
            }
        }
    )
    restored, _ = ckpt.restore(target)
    kernel = restored.params["params"]["layers_0"]["kernel"]
    assert kernel.sharding == sharded["kernel"]
    assert len(kernel.addressable_shards) == 8
    np.testing.assert_array_equal(kernel, state.params["params"]["layers_0"]["kernel"])
    np.testing.assert_array_equal(jax.random.key_data(restored.rng), jax.random.key_data(state.rng))
    ckpt.close()


def test_trainer_killed_and_resumed_matches_uninterrupted(tmp_path, monkeypatch):
    """train_and_evaluate killed right after checkpoint k, resumed to N: bitwise equal params."""
    from ringrl.agents import trainer
    from ringrl.configs import at_darkroom

    config = at_darkroom.get_config("smoke")
    with config.unlocked():
        config.num_steps, config.checkpoint_every = 4, 2
        config.data.dir = str(tmp_path / "data")
        config.mesh = [("data", 1), ("seq", 4)]  # as tests/test_configs.py: shares its compiles
    trainer.train_and_evaluate(config, tmp_path / "straight")

    real_save = Checkpointer.save

    def save_then_die(self, step, *args, **kwargs):
        real_save(self, step, *args, **kwargs)
        if step == 2:
            raise KeyboardInterrupt  # the process is killed right after checkpoint 2

    monkeypatch.setattr(Checkpointer, "save", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        trainer.train_and_evaluate(config, tmp_path / "killed")
    monkeypatch.setattr(Checkpointer, "save", real_save)
    assert Checkpointer(tmp_path / "killed" / "checkpoints").latest_step() == 2
    result = trainer.train_and_evaluate(config, tmp_path / "killed", resume=True)
    assert result["step"] == 4

    from ringrl.agents.agent import Agent, make_sampler
    from ringrl.envs.sources import load_data

    data = load_data(config, verbose=False)
    mesh = make_mesh(config.mesh)
    agent = Agent(config, make_sampler(config, data.trajectories, 0), mesh, data.env_id)
    target = agent.init_state(jax.random.key(0))
    restored = [
        Checkpointer(tmp_path / run / "checkpoints").restore(target, step=4)
        for run in ("straight", "killed")
    ]
    (a, sampler_a), (b, sampler_b) = restored
    assert int(a.step) == int(b.step) == 4
    for x, y in zip(
        jax.tree.leaves((a.params, a.opt_state)), jax.tree.leaves((b.params, b.opt_state))
    ):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    assert sampler_a == sampler_b


def test_train_loop_keeps_one_step_in_flight_on_cpu_devices(tmp_path, monkeypatch):
    """On virtual CPU devices each train step has finished before the next is queued (queued
    steps can deadlock XLA:CPU's in-process collectives: agents.trainer.one_step_in_flight)."""
    from ringrl.agents import step, trainer
    from ringrl.configs import at_darkroom

    assert trainer.one_step_in_flight()  # conftest: 8 CPU devices
    config = at_darkroom.get_config("smoke")
    with config.unlocked():
        config.num_steps = config.checkpoint_every = config.log_every = 6  # no sync in between
        config.data.dir = str(tmp_path / "data")
        config.mesh = [("data", 1), ("seq", 4)]
    ready = []
    make_train_step = step.make_train_step

    def recording(*args, **kwargs):
        train_step = make_train_step(*args, **kwargs)

        def recording_step(state, batch):
            ready.append(state.step.is_ready())  # the previous step's output, as it is queued
            return train_step(state, batch)

        return recording_step

    monkeypatch.setattr(step, "make_train_step", recording)
    trainer.train_and_evaluate(config, tmp_path / "run")
    assert len(ready) == 6 and all(ready)
