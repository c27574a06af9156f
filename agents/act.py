"""Acting with a sharded KV cache, across steps and across attempts.

Dimension letters: B environments, S obs dim, A action dim, H heads, D head dim, k tokens per step.

The token stream at evaluation mirrors training: for every attempt and every step, the tokens of
the step in the model's order, e.g. (target return, state) -> predict the action from the state
token -> then (action, reward). Each `Actor.act` call appends the previous step's trailing tokens
(action, reward; not yet known when that step was predicted) followed by this step's leading tokens
(target return, state), runs them through every layer against that layer's KV cache
(`ring.decode.append` + `ring.decode.decode_step`: each device attends over its own slice of the
cache, partial softmaxes merged over SEQ), and returns the action predicted from the state token.
With one token per step ("step") there are no trailing tokens: the step's single token carries
the previous step's action, reward and terminated / truncated flags from the actor state, exactly
as agents.batch.link_previous lays them out in training. So every step appends exactly k tokens
and costs O(context / n) per device, however long the context; earlier attempts simply stay in
the cache.

A *rolling* actor (`keep_episodes=n`, Algorithm Distillation's evaluation) plays any number of
episodes with a context of the n most recent ones: its caches are ring buffers
(`ring.decode.init_cache(rolling=True)`) of n episodes' capacity, and every step hides the tokens
before the first step of the oldest kept episode (`decode_step(start=...)`: the last n - 1 finished
episodes plus the current one), so no half-overwritten episode stays visible and memory is
constant however long the evaluation runs. The model must have no absolute position: with
`slot_embedding` the attempt index would keep growing past the slots it was trained on. Keys and
values of the first layer are exactly what a recompute over the kept episodes gives; deeper layers
keep the keys each token got when it was appended (it then saw its own n most recent episodes),
the usual sliding-window cache.

At the very first call there is no previous step: its trailing-token slots are appended as
padding (segment id 0, invisible to real tokens, as in training). Real tokens have segment id 1.
(The Decision Transformer does not use this cache: agents.dt.WindowActor recomputes its K-step
window.)

`ActorPolicy` drives an Actor from the evaluation harness (envs.evaluate); what target-return
token it feeds is the agent's conditioning rule (agents.at / agents.ad: a fixed target;
agents.dt: the return-to-go). `recompute_predict` is the baseline: the full backbone over the whole
history each step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import struct
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from ringrl.agents import backbone
from ringrl.agents.sharding import put_global, to_host
from ringrl.ring import decode
from ringrl.ring.mesh import DATA


@struct.dataclass
class ActorState:
    """Per-environment context of an Actor (all arrays sharded over DATA; caches also over SEQ).

    Attributes:
      caches: one ring.decode.KVCache per layer (keys [B, H, D, T_max], values [B, H, T_max, D],
        segment ids).
      attempt: [B] int32, current attempt (trajectory index of the next step).
      t: [B] int32, step within the current attempt.
      prev_action: [B] int32 or [B, A] float32, action of the last step.
      prev_reward: [B] float32, its reward (set by `observe`).
      prev_terminated: [B] float32, 1 if that step ended its attempt by termination.
      prev_truncated: [B] float32, 1 if that step ended its attempt by a time limit.
      prev_attempt: [B] int32, attempt of the last step.
      prev_t: [B] int32, timestep of the last step.
      has_prev: [B] bool, a last step exists (False before the first act).
      episode_starts: [B, n] int32, rolling actor: first token position of each of the n most
        recent episodes, episode e at column e mod n ([B, 1] zeros otherwise).
    """

    caches: tuple[decode.KVCache, ...]
    attempt: jax.Array
    t: jax.Array
    prev_action: jax.Array
    prev_reward: jax.Array
    prev_terminated: jax.Array
    prev_truncated: jax.Array
    prev_attempt: jax.Array
    prev_t: jax.Array
    has_prev: jax.Array
    episode_starts: jax.Array


class Actor:
    """Cached acting for a Backbone over a (DATA, SEQ) mesh.

    Args:
      model: the trained Backbone (its attention/layout settings are irrelevant here).
      mesh: (DATA, SEQ) mesh; the cache is split over SEQ, environments over DATA.
      max_steps: steps per environment the context must hold (all attempts together, e.g.
        attempts * max_episode_steps); capacity is k * max_steps tokens rounded up to the mesh.
      windows: per-layer attention windows in tokens for acting (default: the model's).
      greedy: argmax / tanh mean (True) or sample from the logits / Gaussian around the mean.
      action_std: std of the Gaussian for non-greedy continuous actions.
      keep_episodes: 0 keeps every step (at most max_steps); n >= 1 makes a rolling actor that
        keeps the n most recent episodes (max_steps must hold n of the longest episodes).

    Raises:
      ValueError: max_steps < 1, keep_episodes < 0, a wrong number of windows, or a rolling
        actor for a model with a slot embedding.
    """

    def __init__(
        self,
        model: backbone.Backbone,
        mesh: jax.sharding.Mesh,
        *,
        max_steps: int,
        windows: tuple[int | None, ...] | None = None,
        greedy: bool = True,
        action_std: float = 0.1,
        keep_episodes: int = 0,
    ):
        n_data, n_seq = backbone.mesh_sizes(mesh)
        if max_steps < 1:
            raise ValueError(f"max_steps must be >= 1, got {max_steps}")
        if keep_episodes < 0:
            raise ValueError(
                f"keep_episodes must be >= 0 (0: keep everything), got {keep_episodes}"
            )
        if keep_episodes and model.slot_embedding:
            raise ValueError(
                "a rolling context (more episodes than the model's n slots) needs a model without "
                "absolute positions, but this one embeds the trajectory slot; train with "
                "config.model.slot_embedding=False"
            )
        self.keep_episodes = int(keep_episodes)
        self.model = model
        self.mesh = mesh
        self.k = model.tokens_per_step
        self.state_index = model.action_token
        self.leading = tuple(model.tokens[: self.state_index + 1])  # known before acting
        self.trailing = tuple(model.tokens[self.state_index + 1 :])  # known after acting
        self.max_steps = int(max_steps)
        self.capacity = -(-self.k * self.max_steps // n_seq) * n_seq
        if windows is None:
            windows = model.layer_windows
        if len(windows) != model.num_layers:
            raise ValueError(f"windows needs {model.num_layers} entries, got {len(windows)}")
        self.windows = tuple(windows)
        self.greedy = bool(greedy)
        self.action_std = float(action_std)
        self.n_data = n_data
        self._env = NamedSharding(mesh, P(DATA))
        self._rep = NamedSharding(mesh, P())
        self._default_rng = self._put_rng(jax.random.key(0))
        self._step = jax.jit(self._step_impl, donate_argnums=(1,))
        self._observe = jax.jit(self._observe_impl, donate_argnums=(0,))

    def reset(self, batch_size: int) -> ActorState:
        """Empty contexts for `batch_size` environments (a multiple of the DATA axis size)."""
        if batch_size % self.n_data:
            raise ValueError(
                f"{batch_size} environments do not split over mesh axis {DATA!r} of size "
                f"{self.n_data}; use a multiple of it"
            )
        b = int(batch_size)
        head_dim = self.model.embed_dim // self.model.num_heads
        caches = tuple(
            decode.init_cache(
                b,
                self.capacity,
                self.model.num_heads,
                head_dim,
                mesh=self.mesh,
                with_segment_ids=True,
                rolling=self.keep_episodes > 0,
            )
            for _ in range(self.model.num_layers)
        )
        if self.model.discrete:
            prev_action = np.zeros((b,), np.int32)
        else:
            prev_action = np.zeros((b, self.model.action_dim), np.float32)
        zeros_i = np.zeros((b,), np.int32)
        host = dict(
            attempt=zeros_i,
            t=zeros_i,
            prev_action=prev_action,
            prev_reward=np.zeros((b,), np.float32),
            prev_terminated=np.zeros((b,), np.float32),
            prev_truncated=np.zeros((b,), np.float32),
            prev_attempt=zeros_i,
            prev_t=zeros_i,
            has_prev=np.zeros((b,), bool),
            episode_starts=np.zeros((b, max(1, self.keep_episodes)), np.int32),
        )
        arrays = {k: put_global(v, self._env) for k, v in host.items()}
        return ActorState(caches=caches, **arrays)

    def act(
        self,
        params: Any,
        state: ActorState,
        observation: np.ndarray | jax.Array,
        target_return: np.ndarray | jax.Array,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, ActorState]:
        """Appends this step's tokens and returns (action [B] or [B, A], new state).

        Args:
          params: model parameters (replicated on the mesh).
          state: from `reset` / the last call (donated: do not reuse it).
          observation: [B, S].
          target_return: [B] target-return token (AT: a constant such as the best return; DT:
            the remaining return-to-go; AD: 0).
          rng: key for sampling when the Actor is not greedy.
        """
        action, _, state = self.act_with_prediction(params, state, observation, target_return, rng)
        return action, state

    def act_with_prediction(
        self,
        params: Any,
        state: ActorState,
        observation: np.ndarray | jax.Array,
        target_return: np.ndarray | jax.Array,
        rng: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array, ActorState]:
        """Like `act`, also returning the raw prediction (logits or tanh mean) [B, A]."""
        obs = put_global(np.asarray(observation, np.float32), self._env)
        target = put_global(np.asarray(target_return, np.float32), self._env)
        if rng is None:  # unused by a greedy actor; one fixed key avoids a transfer per step
            rng = self._default_rng
        elif not self.greedy:
            rng = self._put_rng(rng)
        else:
            rng = self._default_rng
        return self._step(params, state, obs, target, rng)

    def observe(
        self,
        state: ActorState,
        reward: np.ndarray | jax.Array,
        done: np.ndarray | jax.Array,
        truncated: np.ndarray | jax.Array | None = None,
    ) -> ActorState:
        """Records the outcome of the last action: reward [B], done [B] (the attempt ended).

        `truncated` [B] says which ends were time limits (None: none were); the others are
        terminations. The flags reach the model exactly as the samplers write them (agents.batch
        `terminated` / `truncated`). A done environment's next `act` starts the next attempt
        (timestep 0, trajectory index + 1) with all earlier attempts still in its context.
        """
        done = np.asarray(done, bool)
        truncated = np.zeros_like(done) if truncated is None else np.asarray(truncated, bool) & done
        reward = put_global(np.asarray(reward, np.float32), self._env)
        terminated = put_global(done & ~truncated, self._env)
        truncated = put_global(truncated, self._env)
        return self._observe(state, reward, terminated, truncated)

    def _put_rng(self, rng: jax.Array) -> jax.Array:
        """A key replicated on the mesh (works when the mesh spans several processes)."""
        data = put_global(np.asarray(jax.random.key_data(rng)), self._rep)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(rng))

    def _observe_impl(
        self, state: ActorState, reward: jax.Array, terminated: jax.Array, truncated: jax.Array
    ) -> ActorState:
        done = terminated | truncated
        return state.replace(
            prev_reward=reward,
            prev_terminated=terminated.astype(jnp.float32),
            prev_truncated=truncated.astype(jnp.float32),
            t=jnp.where(done, 0, state.t + 1),
            attempt=jnp.where(done, state.attempt + 1, state.attempt),
        )

    def _segment(self, attempt: jax.Array) -> jax.Array:
        return jnp.ones_like(attempt)

    def _visible_start(self, state: ActorState) -> tuple[jax.Array, jax.Array]:
        """Rolling actor: (episode_starts with this step's episode recorded, [B] first visible
        token position: the first token of the oldest of the n most recent episodes)."""
        n = self.keep_episodes
        # This step's first token follows the previous step's trailing tokens.
        first = state.caches[0].lengths + len(self.trailing)  # [B]
        column = jnp.arange(n)[None, :]
        new = (state.t == 0)[:, None] & (column == (state.attempt % n)[:, None])
        starts = jnp.where(new, first[:, None], state.episode_starts)
        oldest = jnp.take_along_axis(starts, ((state.attempt + 1) % n)[:, None], axis=1)[:, 0]
        return starts, jnp.where(state.attempt >= n - 1, oldest, 0)

    def _step_impl(self, params, state: ActorState, obs, target, rng):
        model = self.model
        rolling = self.keep_episodes > 0
        starts, start = self._visible_start(state) if rolling else (state.episode_starts, None)
        prev = {
            "actions": state.prev_action,
            "rewards": state.prev_reward,
            "terminated": state.prev_terminated,
            "truncated": state.prev_truncated,
        }
        cur = {
            "observations": obs,
            "target_returns": target,
            # One-token steps carry the previous step's outcome (agents.batch.link_previous).
            "prev_actions": state.prev_action,
            "prev_rewards": state.prev_reward,
            "prev_terminated": state.prev_terminated,
            "prev_truncated": state.prev_truncated,
            "has_prev": state.has_prev,
        }
        if rolling:
            cur["start"] = start

        def body(m, caches, prev, cur, state):
            # Per shard: this device's environments only (state is sharded P(DATA)).
            seg_prev = jnp.where(state.has_prev, self._segment(state.prev_attempt), 0)
            seg_cur = self._segment(state.attempt)
            segment_ids = jnp.stack(
                [seg_prev] * len(self.trailing) + [seg_cur] * len(self.leading), axis=1
            ).astype(jnp.int32)  # [B_local, k]
            emb = m.embed
            pos_prev = emb.position(state.prev_t, state.prev_attempt)
            pos_cur = emb.position(state.t, state.attempt)
            xs = [emb.token(kind, prev) + pos_prev for kind in self.trailing]
            xs += [emb.token(kind, cur) + pos_cur for kind in self.leading]
            x = emb.normalize(jnp.stack(xs, axis=1))  # [B, k, W]
            new_caches = []
            for blk, cache, window in zip(m.blocks, caches, self.windows):
                q, k, v = blk.project(x)
                cache = decode.append(cache, k, v, segment_ids=segment_ids)
                a = decode.decode_step(
                    q, cache, window=window, segment_ids=segment_ids, start=cur.get("start")
                )
                x = blk.finish(x, a)
                new_caches.append(cache)
            return m.predict(x[:, -1]), tuple(new_caches)

        def per_shard(params, caches, prev, cur, state):
            return model.apply({"params": params}, caches, prev, cur, state, method=body)

        cache_specs = tuple(decode.cache_specs(c, self.mesh) for c in state.caches)
        env = P(DATA)
        small = state.replace(caches=())
        small_spec = jax.tree.map(lambda _: env, small)
        pred, caches = jax.shard_map(
            per_shard,
            mesh=self.mesh,
            in_specs=(P(), cache_specs, env, env, small_spec),
            out_specs=(env, cache_specs),
        )(params, state.caches, prev, cur, small)

        action = self._select(pred, rng)
        new_state = state.replace(
            caches=caches,
            prev_action=action,
            prev_attempt=state.attempt,
            prev_t=state.t,
            has_prev=jnp.ones_like(state.has_prev),
            episode_starts=starts,
        )
        return action, pred, new_state

    def _select(self, pred: jax.Array, rng: jax.Array) -> jax.Array:
        return select_action(
            pred, rng, discrete=self.model.discrete, greedy=self.greedy, action_std=self.action_std
        )


def select_action(
    pred: jax.Array, rng: jax.Array, *, discrete: bool, greedy: bool, action_std: float
) -> jax.Array:
    """The action of a prediction [B, A]: argmax / tanh mean (greedy), or a sample from the
    logits / a Gaussian of std `action_std` around the mean clipped to [-1, 1]."""
    if discrete:
        if greedy:
            return jnp.argmax(pred, axis=-1).astype(jnp.int32)
        return jax.random.categorical(rng, pred, axis=-1).astype(jnp.int32)
    if greedy:
        return pred
    noise = action_std * jax.random.normal(rng, pred.shape, pred.dtype)
    return jnp.clip(pred + noise, -1.0, 1.0)


# (targets [B], reward [B], done [B], target) -> the target-return tokens of the next step.
TargetRule = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def check_target_return(config: ml_collections.ConfigDict, env_id: str, agent: str) -> None:
    """Raises ValueError (one line) if config.eval.target_return is not a finite number.

    configs/dt_d4rl.py and configs/at_d4rl.py leave it NaN for a task whose target they do not
    know (the data may not exist yet when the config is built); the check runs before training.
    """
    target = config.eval.target_return
    if not np.isfinite(target):
        raise ValueError(
            f"config.eval.target_return={target} for {env_id}: no {agent} target return is known "
            "for this task; fix: pass the return to condition on, e.g. "
            f"--config=configs/{agent.lower()}_d4rl.py:path=...,target=3000"
        )


def fixed_target(
    targets: np.ndarray, reward: np.ndarray, done: np.ndarray, target: float
) -> np.ndarray:
    """Conditioning rule of in-context agents: the same target-return token at every step."""
    del reward, done, target
    return targets


class ActorPolicy:
    """`envs.evaluate.Policy` over a cached `Actor`: the context of every environment (all its
    earlier attempts) stays in the sharded KV cache between calls.

    Args:
      actor: the agent's Actor (from its module's `make_actor`).
      params: model parameters (replicated on the mesh).
      target: target-return token of the first step of every attempt.
      rule: the agent's conditioning rule, applied after every step (e.g. `fixed_target`, or
        agents.dt.return_to_go).
      seed: seed of the sampling keys (a greedy actor ignores them).
    """

    def __init__(
        self, actor: Actor, params: Any, *, target: float, rule: TargetRule, seed: int
    ) -> None:
        self.actor, self.params, self.rule = actor, params, rule
        self.target, self.seed = float(target), int(seed)

    def reset(self, num_envs: int) -> None:
        """Empty contexts for `num_envs` environments."""
        self.state = self.actor.reset(num_envs)
        self.targets = np.full(num_envs, self.target, np.float32)
        self.rng = jax.random.key(self.seed)
        self.calls = 0

    def act(self, observation: np.ndarray, active: np.ndarray) -> np.ndarray:
        """Actions [B] or [B, A] for observations [B, S] (`active` is the harness's mask)."""
        del active  # finished environments act too; the harness ignores their actions
        rng = jax.random.fold_in(self.rng, self.calls)
        self.calls += 1
        action, self.state = self.actor.act(self.params, self.state, observation, self.targets, rng)
        return to_host(action)

    def observe(
        self,
        reward: np.ndarray,
        done: np.ndarray,
        active: np.ndarray,
        truncated: np.ndarray | None = None,
    ) -> None:
        """Records each environment's reward and end of attempt (`truncated`: which ends were
        time limits); updates the target tokens."""
        del active
        self.state = self.actor.observe(self.state, reward, done, truncated)
        self.targets = np.asarray(self.rule(self.targets, reward, done, self.target), np.float32)


def check_episodes_fit(env_id: str, episode_steps: int, max_timestep: int) -> None:
    """Raises ValueError if episodes of `env_id` outlast the model's timestep table.

    Args:
      env_id: the evaluation env (named in the message).
      episode_steps: its longest episode (time limit, or config.eval.max_steps).
      max_timestep: rows of the model's timestep table (config.data.horizon).
    """
    if episode_steps > max_timestep:
        raise ValueError(
            f"{env_id} episodes last up to {episode_steps} steps but the model was built for "
            f"{max_timestep} (config.data.horizon); set --config.eval.max_steps <= "
            f"{max_timestep} or train with horizon >= {episode_steps}"
        )


def recompute_predict(
    model: backbone.Backbone,
    params: Any,
    history: dict[str, jax.Array],
    step: jax.Array | int,
    mesh: jax.sharding.Mesh,
) -> jax.Array:
    """Baseline: the full backbone over the whole history, prediction at `step` [B, A].

    Args:
      history: step arrays [B, T, ...] as the sampler packs them, steps in the order they were
        taken (attempts back to back), `mask` False for steps not taken yet.
      step: index of the current step (its target return and state are in `history`).
    """
    pred = backbone.forward(model, params, history, mesh)
    return jax.lax.dynamic_index_in_dim(pred, step, axis=1, keepdims=False)
