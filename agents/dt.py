"""Decision Transformer (Chen et al. 2021) on the ring backbone: the whole agent.

Dimension letters: B batch or environments, K steps per window, k = 3 tokens per step
(return-to-go, state, action).

* Model (`make_model`): tokens (return-to-go, state, action); continuous actions use a tanh mean
  with MSE, discrete ones cross-entropy. By default every layer has a sliding window of 3 * K
  tokens: within a training window it changes nothing (a query never looks back further), and
  when acting with the cache it keeps the attention span at the trained K steps however long the
  episode runs.
* Sampler (`WindowSampler`): one K-step window of one trajectory, drawn in proportion to episode
  length; the target token is the return-to-go (undiscounted sum of the episode's remaining
  rewards). With `top_fraction` < 1 only the highest-return episodes holding that fraction of
  the steps are drawn (Chen et al.'s percentile behaviour cloning, %BC, with the return-to-go
  zeroed by `model.return_scale = 0`: configs/dt_d4rl.py `bc=0.1`); the state normaliser still
  uses every episode, as the reference code does.
* Actor (`make_actor`, `WindowActor`): at every step the backbone runs over the last K steps of
  the current attempt only, laid out exactly as a training window (timesteps from the window's
  first step, padding after the current step). A KV cache cannot do this: cached keys of a
  deeper layer were computed from windows that reach further back, so at t > K a cached actor
  sees more than the K steps training used, and its window can begin with a stale action token.
  K steps of 3 tokens per call are cheap. Each attempt is its own context: DT is not an
  in-context learner across episodes.
* Conditioning (`return_to_go`, `make_policy`): the first step of an attempt gets the desired
  return; every later step gets it minus the rewards collected so far in the attempt.
* Evaluation contexts (`check_eval_context`): any number of attempts, episodes no longer than the
  timestep table.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from ringrl.agents import backbone
from ringrl.agents.act import ActorPolicy, check_episodes_fit, check_target_return, select_action
from ringrl.agents.backbone import Backbone
from ringrl.agents.batch import zeros
from ringrl.agents.sampler import ContextSampler
from ringrl.agents.sharding import put_batch, to_host

MODE = "dt"
TOKENS = ("return", "state", "action")


def make_model(
    *,
    action_dim: int,
    discrete: bool,
    context_steps: int,
    max_timestep: int,
    **model_kwargs: Any,
) -> Backbone:
    """The DT Backbone.

    Args:
      action_dim: number of discrete actions, or the continuous action size.
      discrete: cross-entropy (True) or tanh + MSE (False).
      context_steps: K, steps per training window.
      max_timestep: longest episode (timestep-embedding rows).
      **model_kwargs: other Backbone fields (e.g. config.model); `windows` overrides the default
        sliding window of 3 * K tokens per layer.
    """
    kwargs = dict(model_kwargs)
    # DT always has its three tokens; a shared config's AT field (e.g. the ablation's DT cell,
    # built from the AT config) does not apply.
    kwargs.pop("tokens_per_step", None)
    num_layers = int(kwargs.get("num_layers", Backbone.num_layers))
    if kwargs.get("windows") is None:
        kwargs["windows"] = (len(TOKENS) * int(context_steps),) * num_layers
    return Backbone(
        action_dim=int(action_dim),
        discrete=bool(discrete),
        tokens=TOKENS,
        max_timestep=int(max_timestep),
        max_trajectories=1,
        **kwargs,
    )


def model_for(config: ml_collections.ConfigDict, *, action_dim: int, discrete: bool) -> Backbone:
    """`make_model` of a config: window config.data.context_steps, timesteps config.data.horizon."""
    return make_model(
        action_dim=action_dim,
        discrete=discrete,
        context_steps=config.data.context_steps,
        max_timestep=config.data.horizon,
        **config.model.to_dict(),
    )


class WindowSampler(ContextSampler):
    """K-step windows of one trajectory with return-to-go targets.

    Args:
      trajectories: an `envs.trajectories.Trajectories`.
      context_steps: K, steps per window.
      seed: seed of the numpy generator.
      top_fraction: windows only from the best-return episodes holding this share of the steps
        (`top_episodes`; %BC).
      episodes: [E] bool, the episodes to draw from instead (diagnostics, e.g. the ones %BC did
        not see); overrides `top_fraction`.
    """

    def __init__(
        self,
        trajectories: Any,
        *,
        context_steps: int,
        seed: int = 0,
        top_fraction: float = 1.0,
        episodes: np.ndarray | None = None,
    ):
        super().__init__(trajectories, seed=seed)
        if context_steps is None or int(context_steps) < 1:
            raise ValueError(
                f"DT needs context_steps >= 1 (the K-step window); got {context_steps}"
            )
        self.context_steps = self.horizon = int(context_steps)
        returns = self._cum[self._starts[1:]] - self._cum[self._starts[:-1]]
        self.episode_returns = returns  # [E]
        if episodes is None:
            self.drawn = top_episodes(returns, self._lengths, top_fraction)
        else:
            self.drawn = np.asarray(episodes, bool)
            if self.drawn.shape != returns.shape or not self.drawn.any():
                raise ValueError(
                    f"episodes must be a bool mask of shape {returns.shape} with at least one "
                    f"True; got shape {self.drawn.shape} with {int(self.drawn.sum())} True"
                )
        # Windows are drawn in proportion to episode length (as in the reference code).
        lengths = np.where(self.drawn, self._lengths, 0)
        self._p = lengths / lengths.sum()

    def fill(self, out: dict[str, np.ndarray], i: int) -> None:
        """A window from a random step of a random episode; shorter at the episode's end."""
        k = self.context_steps
        e = int(self._rng.choice(len(self._lengths), p=self._p))
        length = int(self._lengths[e])
        offset = int(self._rng.integers(length))
        ln = min(k, length - offset)
        s = int(self._starts[e]) + offset
        self.copy_steps(out, i, 0, s, ln, first_timestep=offset)
        episode_end = int(self._starts[e]) + length
        rtg = self._cum[episode_end] - self._cum[s : s + ln]
        out["target_returns"][i, :ln] = rtg.astype(np.float32)
        if offset + ln == length:  # the episode's own end: terminated, else truncated
            out["truncated"][i, ln - 1] = 1.0 - out["terminated"][i, ln - 1]


def top_episodes(returns: np.ndarray, lengths: np.ndarray, fraction: float) -> np.ndarray:
    """Mask [E] of the highest-return episodes whose lengths add up to at most `fraction` of all
    steps, taken best first (at least the best one; equal returns: the earlier episode first),
    as the reference code's `pct_traj`.

    Raises:
      ValueError: `fraction` outside (0, 1].
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"top_fraction={fraction!r} must be in (0, 1] (1: every episode)")
    lengths = np.asarray(lengths, np.int64)
    order = np.argsort(-np.asarray(returns, np.float64), kind="stable")
    budget = max(int(fraction * lengths.sum()), 1)
    keep = np.cumsum(lengths[order]) <= budget
    keep[0] = True
    keep = np.logical_and.accumulate(keep)  # stop at the first episode that does not fit
    mask = np.zeros(len(lengths), bool)
    mask[order[keep]] = True
    return mask


def make_sampler(
    trajectories: Any, *, context_steps: int, seed: int, top_fraction: float = 1.0
) -> WindowSampler:
    """The DT sampler: K-step windows with return-to-go targets (from the best `top_fraction`
    of the steps, by episode return)."""
    return WindowSampler(
        trajectories, context_steps=context_steps, seed=seed, top_fraction=top_fraction
    )


def sampler_for(
    trajectories: Any, config: ml_collections.ConfigDict, *, seed: int
) -> WindowSampler:
    """`make_sampler` of a config (window config.data.context_steps).

    Raises:
      ValueError: config.data.num_trajectories is not 1.
    """
    if config.data.num_trajectories != 1:
        raise ValueError(
            f"config.data.num_trajectories={config.data.num_trajectories}: DT packs one trajectory "
            "window per context; set it to 1"
        )
    return make_sampler(
        trajectories,
        context_steps=config.data.context_steps,
        seed=seed,
        top_fraction=config.data.get("top_fraction", 1.0),
    )


class WindowActor:
    """DT acting on exactly the window training used: the last K steps of the current attempt.

    Same interface as agents.act.Actor (reset / act / act_with_prediction / observe), so
    `ActorPolicy` drives it. Its state is a host batch of agents.batch arrays [B, K, ...] plus the
    step `t` within the attempt and the number of filled steps.

    Args:
      model: the DT Backbone.
      mesh: (DATA, SEQ) mesh; environments split over DATA (K must divide over SEQ).
      context_steps: K.
      greedy: argmax / tanh mean, or sample.
      action_std: std of the Gaussian for non-greedy continuous actions.
    """

    def __init__(
        self,
        model: Backbone,
        mesh: jax.sharding.Mesh,
        *,
        context_steps: int,
        greedy: bool = True,
        action_std: float = 0.1,
    ) -> None:
        self.model, self.mesh, self.k = model, mesh, int(context_steps)
        self.n_data = backbone.mesh_sizes(mesh)[0]
        self.greedy, self.action_std = bool(greedy), float(action_std)

        def step(params, window, index, rng):
            pred = backbone.forward(model, params, window, mesh)  # [B, K, A]
            pred = jnp.take_along_axis(pred, index[:, None, None], axis=1)[:, 0]
            action = select_action(
                pred, rng, discrete=model.discrete, greedy=self.greedy, action_std=self.action_std
            )
            return action, pred

        self._step = jax.jit(step)
        self._default_rng = jax.random.key(0)

    def reset(self, batch_size: int) -> dict[str, np.ndarray]:
        """Empty windows for `batch_size` environments (a multiple of the DATA axis size)."""
        if batch_size % self.n_data:
            raise ValueError(
                f"{batch_size} environments do not split over the mesh's data axis of size "
                f"{self.n_data}; use a multiple of it"
            )
        m = self.model
        state = zeros(batch_size, self.k, 1, action_dim=m.action_dim, discrete=m.discrete)
        state["observations"] = None  # sized by the first observation
        state["t"] = np.zeros(batch_size, np.int32)  # step within the attempt
        state["filled"] = np.zeros(batch_size, np.int32)  # steps of the attempt in the window
        return state

    def act(self, params, state, observation, target_return, rng=None):
        """Like agents.act.Actor.act: (action [B] or [B, A], new state)."""
        action, _, state = self.act_with_prediction(params, state, observation, target_return, rng)
        return action, state

    def act_with_prediction(self, params, state, observation, target_return, rng=None):
        """Appends this step (state, return-to-go) to each window, dropping the oldest step of a
        full one, and predicts from it: (action, prediction [B, A], new state)."""
        obs = np.asarray(observation, np.float32)
        b = len(obs)
        if state["observations"] is None:
            state["observations"] = np.zeros((b, self.k, obs.shape[-1]), np.float32)
        full = state["filled"] == self.k
        window_keys = [k for k in state if k not in ("t", "filled")]
        for key in window_keys:  # full windows slide by one step
            state[key][full] = np.roll(state[key][full], -1, axis=1)
            state[key][full, -1] = 0
        index = np.minimum(state["filled"], self.k - 1)
        rows = np.arange(b)
        state["observations"][rows, index] = obs
        state["target_returns"][rows, index] = np.asarray(target_return, np.float32)
        state["timesteps"][rows, index] = state["t"]
        state["mask"][rows, index] = True
        state["filled"] = index + 1
        window = {k: state[k] for k in window_keys}
        action, pred = self._step(
            params,
            put_batch(window, self.mesh),
            jnp.asarray(index, jnp.int32),
            self._default_rng if rng is None else rng,
        )
        state["actions"][rows, index] = to_host(action)
        return action, pred, state

    def observe(self, state, reward, done, truncated=None):
        """Records the last step's reward; a done environment starts an empty window."""
        done = np.asarray(done, bool)
        rows, index = np.arange(len(done)), state["filled"] - 1
        state["rewards"][rows, index] = np.asarray(reward, np.float32)
        trunc = np.zeros_like(done) if truncated is None else np.asarray(truncated, bool) & done
        state["terminated"][rows, index] = done & ~trunc
        state["truncated"][rows, index] = trunc
        for key in state:
            if key not in ("t", "filled"):
                state[key][done] = 0
        state["filled"] = np.where(done, 0, state["filled"])
        state["t"] = np.where(done, 0, state["t"] + 1)
        return state


def make_actor(
    model: Backbone,
    mesh: jax.sharding.Mesh,
    *,
    attempts: int,
    horizon: int,
    greedy: bool = True,
) -> WindowActor:
    """DT actor for `attempts` episodes of at most `horizon` steps, each its own context.

    K is the model's window in steps (`make_model` sets every layer's window to 3 * K tokens);
    a model without windows attends over the whole attempt (K = horizon). Feed it the
    return-to-go (`return_to_go`, or `make_policy` does it).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    check_episodes_fit("the evaluation env", horizon, model.max_timestep)
    windows = [w for w in model.layer_windows if w is not None]
    k = max(windows) // len(TOKENS) if windows else int(horizon)
    return WindowActor(model, mesh, context_steps=k, greedy=greedy)


def return_to_go(
    targets: np.ndarray, reward: np.ndarray, done: np.ndarray, target: float
) -> np.ndarray:
    """DT conditioning: the remaining return after `reward`; `target` again when an attempt ends.

    Args:
      targets: [B] return-to-go tokens of the step just taken.
      reward: [B] its rewards.
      done: [B] the attempt ended with that step.
      target: the desired return of a whole attempt.
    """
    return np.where(done, target, targets - reward).astype(np.float32)


def make_policy(actor: WindowActor, params: Any, *, target_return: float, seed: int) -> ActorPolicy:
    """Evaluation policy: `target_return` at each attempt's start, then the return-to-go."""
    return ActorPolicy(actor, params, target=target_return, rule=return_to_go, seed=seed)


def check_eval_context(
    config: ml_collections.ConfigDict, env_id: str, *, attempts: int, episode_steps: int
) -> None:
    """Refuses evaluations the DT model cannot hold; every attempt is its own context.

    Args:
      config: the run's config (config.data.horizon rows in the timestep table).
      env_id: the evaluation env.
      attempts: attempts per environment (any number >= 1).
      episode_steps: longest evaluation episode.

    Raises:
      ValueError: one line naming the sizes and the fix, or a target return that is not a number
        (configs/dt_d4rl.py knows the targets of hopper, walker2d and halfcheetah only).
    """
    if attempts < 1:
        raise ValueError(f"attempts must be >= 1, got {attempts}")
    check_target_return(config, env_id, "DT")
    check_episodes_fit(env_id, episode_steps, config.data.horizon)
