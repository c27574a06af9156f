"""Train state and the sharded train step.

Dimension letters: B batch, T steps (see agents.batch for the batch arrays).

One jitted `train_step(state, batch) -> (state, metrics)` over the (DATA, SEQ) mesh: params and
optimizer state replicated (P()), batch arrays P(DATA, SEQ), state donated. The loss is the mean
over every valid action target of the global batch (agents.backbone.loss), so its value and
gradient do not depend on the mesh. A model with dropout (`model.dropout` > 0) keeps a PRNG key
in the state and each step uses `jax.random.fold_in(state.rng, state.step)`, so a resumed run
draws the same masks; a deterministic model's state holds no key (`rng` is None), as before.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import chex
import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import struct

from ringrl.agents import backbone
from ringrl.agents.sharding import batch_sharding, replicated


@struct.dataclass
class TrainState:
    """Everything a training run carries from step to step.

    Attributes:
      step: int32 scalar, number of updates done.
      params: model parameters (the "params" collection).
      opt_state: optax state.
      rng: PRNG key of the dropout masks (folded with `step` every step); None without dropout.
    """

    step: jax.Array
    params: Any
    opt_state: Any
    rng: jax.Array | None = None


def _optim(config: ml_collections.ConfigDict) -> tuple[Any, int]:
    """(config.optim, total steps), with a clear error for missing fields."""
    for field in ("optim", "num_steps"):
        if field not in config:
            raise ValueError(f"config has no {field!r}; the train step needs config.{field}")
    for field in ("lr", "warmup_steps", "weight_decay", "grad_clip"):
        if field not in config.optim:
            raise ValueError(f"config.optim has no {field!r}; add config.optim.{field}")
    return config.optim, int(config.num_steps)


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
    """Linear warmup from 0 to optim.lr over optim.warmup_steps, cosine decay to 0 at num_steps."""
    optim, num_steps = _optim(config)
    warmup = int(optim.warmup_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=float(optim.lr),
        warmup_steps=warmup,
        decay_steps=max(num_steps, warmup + 1),
        end_value=0.0,
    )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
    """Global-norm clipping then AdamW (decay on matrices only) with `make_schedule`."""
    optim, _ = _optim(config)

    def decay_mask(params):  # biases, norms and scales are not decayed
        return jax.tree.map(lambda x: x.ndim >= 2, params)

    return optax.chain(
        optax.clip_by_global_norm(float(optim.grad_clip)),
        optax.adamw(make_schedule(config), weight_decay=float(optim.weight_decay), mask=decay_mask),
    )


def init_state(
    model: backbone.Backbone,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    rng: jax.Array,
    obs_dim: int,
) -> TrainState:
    """Initial TrainState, created directly with replicated shardings on the mesh.

    Shapes come from `jax.eval_shape`; the state is then built by a jit with `out_shardings`, so
    no host copy of the parameters is ever made.

    Args:
      model: the Backbone.
      config: needs config.optim (lr, warmup_steps, weight_decay, grad_clip) and num_steps.
      mesh: (DATA, SEQ) mesh.
      rng: PRNG key (jax.random.key) of the parameter initialisation; the dropout key (only with
        `model.dropout` > 0) is derived from it.
      obs_dim: S.
    """
    tx = make_optimizer(config)

    def init(rng):
        params = backbone.init_params(model, rng, obs_dim)
        dropout_rng = jax.random.fold_in(rng, 1) if model.dropout > 0 else None
        return TrainState(
            step=jnp.zeros((), jnp.int32),
            params=params,
            opt_state=tx.init(params),
            rng=dropout_rng,
        )

    abstract = jax.eval_shape(init, rng)
    shardings = jax.tree.map(lambda _: replicated(mesh), abstract)
    return jax.jit(init, out_shardings=shardings)(rng)


def make_train_step(
    model: backbone.Backbone,
    config: ml_collections.ConfigDict,
    mesh: jax.sharding.Mesh,
    example_batch: dict[str, Any] | None = None,
    max_traces: int | None = None,
) -> Callable[[TrainState, dict[str, jax.Array]], tuple[TrainState, dict]]:
    """The jitted `train_step(state, batch) -> (state, metrics)`.

    The function is jitted here, once, with explicit shardings (state replicated, batch
    P(DATA, SEQ)) and `donate_argnums=0`. Metrics: loss, grad_norm (before
    clipping), lr, num_targets. Tokens/s is the caller's to measure. With a key in the state
    (a model with dropout) the loss runs in training mode with this step's key.

    Args:
      model: the Backbone.
      config: needs config.optim (lr, warmup_steps, weight_decay, grad_clip) and num_steps.
      mesh: (DATA, SEQ) mesh.
      example_batch: optional batch (host or device) to validate shapes against the mesh now.
      max_traces: if set, fail when the step is traced more often (chex.assert_max_traces), to
        prove that it compiles once.
    """
    tx = make_optimizer(config)
    schedule = make_schedule(config)
    if example_batch is not None:
        backbone.check_batch(model, example_batch, mesh)

    def train_step(state: TrainState, batch: dict[str, jax.Array]):
        rng = None if state.rng is None else jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            return backbone.loss(model, params, batch, mesh, rng)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {
            "loss": loss,
            "grad_norm": optax.tree.norm(grads),
            "lr": schedule(state.step),
            "num_targets": aux["num_targets"],
        }
        new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
        return new_state, metrics

    if max_traces is not None:
        train_step = chex.assert_max_traces(train_step, n=max_traces)
    rep = replicated(mesh)
    return jax.jit(
        train_step,
        in_shardings=(rep, batch_sharding(mesh)),
        out_shardings=(rep, rep),
        donate_argnums=0,
    )


def make_eval_step(
    model: backbone.Backbone, mesh: jax.sharding.Mesh
) -> Callable[[Any, dict[str, jax.Array]], tuple[jax.Array, dict]]:
    """Jitted `eval_step(params, batch) -> (predictions [B, T, A], {"loss", "num_targets"})`.

    Predictions are logits (discrete) or tanh means (continuous), in original step order.
    """

    def eval_step(params, batch):
        pred = backbone.forward(model, params, batch, mesh)
        total, count = backbone.action_loss(pred, batch["actions"], batch["mask"], model.discrete)
        return pred, {"loss": total / jnp.maximum(count, 1.0), "num_targets": count}

    rep = replicated(mesh)
    return jax.jit(
        eval_step,
        in_shardings=(rep, batch_sharding(mesh)),
        out_shardings=(batch_sharding(mesh), rep),
    )
