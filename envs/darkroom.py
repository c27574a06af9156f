"""In-context tasks with a hidden, per-task goal: DarkRoom and DarkKeyToDoor (Laskin et al. 2022).

The agent sees only its own position, never the goal, so a single episode cannot reveal the task:
an agent has to find the goal by exploring across episodes and then exploit it, which is what an
in-context learner (Algorithm Distillation, multi-trajectory transformers) is tested on.

- DarkRoom: a 9x9 grid, the agent starts at the centre (4, 4); observation (x, y) as float32 in
  [0, 8]; actions 0 stay, 1 up (y+1), 2 down (y-1), 3 left (x-1), 4 right (x+1), moves clipped at
  the walls; reward 1 on every step that ends on the goal; episodes are truncated after 20 steps.
- DarkKeyToDoor: same grid and start, observation (x, y, has_key); reward 1 on the first step that
  ends on the key and 1 on a step that ends on the door once the key is held, which terminates the
  episode; truncated after 50 steps. Optimal return 2.

A task is an integer id mapped deterministically to its hidden cell(s): DarkRoom task t in
[0, 81) has its goal at (t % 9, t // 9); DarkKeyToDoor task t in [0, 6480) has its key at cell
t // 80 and its door at the (t % 80)-th of the other 80 cells. `reset(seed=...)` seeds only the
env's RNG (unused by the dynamics): it never moves the goal, which stays fixed for the task.

Both envs are registered with Gymnasium on import as "ringrl/DarkRoom-v0" and
"ringrl/DarkKeyToDoor-v0" (`gym.make("ringrl/DarkRoom-v0", task=3)`). `VectorDarkRoom` steps many
tasks at once in numpy with the same dynamics, for fast learning-history generation.
"""

from __future__ import annotations

from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

SIZE = 9
START = (SIZE // 2, SIZE // 2)
# (dx, dy) per action: stay, up, down, left, right.
MOVES = np.array([[0, 0], [0, 1], [0, -1], [-1, 0], [1, 0]], dtype=np.int64)

DARKROOM_ID = "ringrl/DarkRoom-v0"
DARKKEYTODOOR_ID = "ringrl/DarkKeyToDoor-v0"
ENV_IDS = {"darkroom": DARKROOM_ID, "darkkeytodoor": DARKKEYTODOOR_ID}  # name -> Gymnasium id
_ALIASES = {**{n: n for n in ENV_IDS}, **{i.lower(): n for n, i in ENV_IDS.items()}}
HORIZON = {"darkroom": 20, "darkkeytodoor": 50}
NUM_TASKS = {"darkroom": SIZE * SIZE, "darkkeytodoor": SIZE * SIZE * (SIZE * SIZE - 1)}


def canonical_name(env_name: str) -> str:
    """Maps "darkroom" / "ringrl/DarkRoom-v0" (any case) etc. to "darkroom" or "darkkeytodoor".

    Raises:
      ValueError: an unknown name; the message lists the valid ones.
    """
    key = str(env_name).lower()
    if key not in _ALIASES:
        raise ValueError(
            f"unknown in-context env {env_name!r}; valid: darkroom, darkkeytodoor, "
            f"{DARKROOM_ID}, {DARKKEYTODOOR_ID}"
        )
    return _ALIASES[key]


def num_tasks(env_name: str) -> int:
    """Number of distinct tasks (goal placements) of an env: 81 for DarkRoom, 6480 for KeyToDoor."""
    return NUM_TASKS[canonical_name(env_name)]


def _check_task(env_name: str, task: int) -> int:
    n = num_tasks(env_name)
    if isinstance(task, bool) or not isinstance(task, int | np.integer) or not 0 <= task < n:
        raise ValueError(f"{env_name} task must be an integer in [0, {n}), got {task!r}")
    return int(task)


def _cell(index: int) -> np.ndarray:
    return np.array([index % SIZE, index // SIZE], dtype=np.int64)


def task_cells(env_name: str, task: int) -> np.ndarray:
    """The hidden cell(s) of a task: [1, 2] (goal) for DarkRoom, [2, 2] (key, door) for KeyToDoor.

    Args:
      env_name: "darkroom" or "darkkeytodoor" (or their gym ids).
      task: task id in [0, num_tasks(env_name)).

    Returns:
      int64 array of (x, y) cells.
    """
    name = canonical_name(env_name)
    task = _check_task(name, task)
    if name == "darkroom":
        return _cell(task)[None]
    key, rest = divmod(task, SIZE * SIZE - 1)
    door = rest if rest < key else rest + 1  # the rest-th cell other than the key
    return np.stack([_cell(key), _cell(door)])


def optimal_return(env_name: str, task: int) -> float:
    """Best achievable undiscounted return of a task (shortest path, then stay / finish).

    DarkRoom: with the goal d > 0 moves from the start the agent is rewarded on steps d..20, so
    21 - d; a goal at the start gives 20. DarkKeyToDoor: 2 (key and door are always reachable).
    """
    name = canonical_name(env_name)
    cells = task_cells(name, task)
    if name == "darkkeytodoor":
        return 2.0
    d = int(np.abs(cells[0] - np.array(START)).sum())
    return float(HORIZON["darkroom"] if d == 0 else HORIZON["darkroom"] + 1 - d)


def task_split(
    env_name: str, num_train: int, num_heldout: int, seed: int = 0
) -> tuple[list[int], list[int]]:
    """Disjoint train / held-out task ids drawn without replacement.

    Args:
      env_name: "darkroom" or "darkkeytodoor".
      num_train: number of training tasks.
      num_heldout: number of held-out tasks (goals never seen in training).
      seed: the same seed always gives the same split.

    Returns:
      (train_tasks, heldout_tasks), each a sorted list of ints, with no id in both.

    Raises:
      ValueError: negative counts, or more tasks asked for than the env has.
    """
    n = num_tasks(env_name)
    if num_train < 0 or num_heldout < 0:
        raise ValueError(f"task counts must be >= 0, got {num_train}, {num_heldout}")
    if num_train + num_heldout > n:
        raise ValueError(
            f"{env_name} has {n} tasks; cannot split {num_train} train + {num_heldout} held-out"
        )
    perm = np.random.default_rng(seed).permutation(n)
    train = sorted(int(t) for t in perm[:num_train])
    heldout = sorted(int(t) for t in perm[num_train : num_train + num_heldout])
    return train, heldout


class _GridEnv(gym.Env):
    metadata = {"render_modes": []}
    name = ""

    def __init__(self, task: int = 0, render_mode: str | None = None):
        if render_mode is not None:
            raise ValueError(f"{type(self).__name__} has no render modes, got {render_mode!r}")
        self.task = _check_task(self.name, task)
        self.horizon = HORIZON[self.name]
        self._cells = task_cells(self.name, self.task)
        self.action_space = spaces.Discrete(len(MOVES))
        self._pos = np.array(START, dtype=np.int64)
        self._t = 0

    def _move(self, action: Any) -> None:
        if not self.action_space.contains(action):
            raise ValueError(f"action must be an int in [0, {len(MOVES)}), got {action!r}")
        self._pos = np.clip(self._pos + MOVES[int(action)], 0, SIZE - 1)
        self._t += 1


class DarkRoom(_GridEnv):
    """9x9 grid, hidden goal fixed by `task`; reward 1 on each step that ends on the goal."""

    name = "darkroom"

    def __init__(self, task: int = 0, render_mode: str | None = None):
        super().__init__(task, render_mode)
        self.goal = self._cells[0]
        self.observation_space = spaces.Box(0.0, SIZE - 1.0, (2,), np.float32)

    def _obs(self) -> np.ndarray:
        return self._pos.astype(np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)  # seeds self.np_random only; the goal belongs to the task
        self._pos = np.array(START, dtype=np.int64)
        self._t = 0
        return self._obs(), {}

    def step(self, action):
        self._move(action)
        reward = float(np.array_equal(self._pos, self.goal))
        return self._obs(), reward, False, self._t >= self.horizon, {}


class DarkKeyToDoor(_GridEnv):
    """9x9 grid with a hidden key and door fixed by `task`; pick up the key, then reach the door."""

    name = "darkkeytodoor"

    def __init__(self, task: int = 0, render_mode: str | None = None):
        super().__init__(task, render_mode)
        self.key, self.door = self._cells
        self.observation_space = spaces.Box(
            np.zeros(3, np.float32), np.array([SIZE - 1, SIZE - 1, 1], np.float32), dtype=np.float32
        )
        self._has_key = False

    def _obs(self) -> np.ndarray:
        return np.array([*self._pos, self._has_key], dtype=np.float32)

    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        self._pos = np.array(START, dtype=np.int64)
        self._t = 0
        self._has_key = False
        return self._obs(), {}

    def step(self, action):
        self._move(action)
        reward, terminated = 0.0, False
        if not self._has_key and np.array_equal(self._pos, self.key):
            self._has_key, reward = True, 1.0
        elif self._has_key and np.array_equal(self._pos, self.door):
            reward, terminated = 1.0, True
        truncated = not terminated and self._t >= self.horizon
        return self._obs(), reward, terminated, truncated, {}


class VectorDarkRoom:
    """Numpy batch of DarkRoom / DarkKeyToDoor envs, one task per row, the gym envs' dynamics.

    No auto-reset: call `reset(mask)` for the rows whose episodes ended. Observations are float32
    [N, 2] (DarkRoom) or [N, 3] (KeyToDoor), exactly what the gym env returns.
    """

    def __init__(self, env_name: str, tasks: np.ndarray | list[int]):
        self.name = canonical_name(env_name)
        self.tasks = np.asarray(tasks).ravel().tolist()
        if not self.tasks:
            raise ValueError("VectorDarkRoom needs at least one task")
        unique, inverse = np.unique(np.asarray(self.tasks), return_inverse=True)
        unique = [_check_task(self.name, t) for t in unique.tolist()]
        cells = np.stack([task_cells(self.name, t) for t in unique])[inverse]  # [N, C, 2]
        self.goal = cells[:, 0]
        self.door = cells[:, 1] if self.name == "darkkeytodoor" else None
        self.horizon = HORIZON[self.name]
        self.num_envs = len(self.tasks)
        self.pos = np.zeros((self.num_envs, 2), np.int64)
        self.t = np.zeros(self.num_envs, np.int64)
        self.has_key = np.zeros(self.num_envs, bool)
        self.reset()

    @property
    def obs_dim(self) -> int:
        return 2 if self.name == "darkroom" else 3

    def obs(self) -> np.ndarray:
        """Current observations, float32 [N, obs_dim]."""
        if self.name == "darkroom":
            return self.pos.astype(np.float32)
        return np.concatenate([self.pos, self.has_key[:, None]], axis=1).astype(np.float32)

    def state_index(self) -> np.ndarray:
        """Tabular state id per row: y * 9 + x, plus 81 when the key is held. int64 [N]."""
        return self.pos[:, 1] * SIZE + self.pos[:, 0] + SIZE * SIZE * self.has_key

    def set_state_index(self, index: np.ndarray) -> None:
        """Puts row i in tabular state index[i] (inverse of `state_index`; the step count is 0)."""
        index = np.asarray(index, np.int64)
        cell = index % (SIZE * SIZE)
        self.pos = np.stack([cell % SIZE, cell // SIZE], axis=1)
        self.has_key = index >= SIZE * SIZE
        self.t = np.zeros(self.num_envs, np.int64)

    @property
    def num_states(self) -> int:
        return SIZE * SIZE * (1 if self.name == "darkroom" else 2)

    def reset(self, mask: np.ndarray | None = None) -> np.ndarray:
        """Resets the rows where `mask` is True (all rows when None); returns all observations."""
        mask = np.ones(self.num_envs, bool) if mask is None else np.asarray(mask, bool)
        self.pos[mask] = START
        self.t[mask] = 0
        self.has_key[mask] = False
        return self.obs()

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Steps every row. Returns (obs [N, S], rewards f32 [N], terminated [N], truncated [N])."""
        actions = np.asarray(actions)
        if actions.shape != (self.num_envs,) or actions.min() < 0 or actions.max() >= len(MOVES):
            raise ValueError(
                f"actions must be ints in [0, {len(MOVES)}) of shape ({self.num_envs},), "
                f"got shape {actions.shape}"
            )
        self.pos = np.clip(self.pos + MOVES[actions], 0, SIZE - 1)
        self.t += 1
        on_goal = (self.pos == self.goal).all(axis=1)
        if self.name == "darkroom":
            rewards = on_goal.astype(np.float32)
            terminated = np.zeros(self.num_envs, bool)
        else:
            got_key = on_goal & ~self.has_key
            at_door = self.has_key & (self.pos == self.door).all(axis=1)
            self.has_key = self.has_key | got_key
            rewards = (got_key | at_door).astype(np.float32)
            terminated = at_door
        truncated = ~terminated & (self.t >= self.horizon)
        return self.obs(), rewards, terminated, truncated


def state_observations(env_name: str, index: np.ndarray) -> np.ndarray:
    """Observations [..., 2 or 3] float32 of tabular state ids (`VectorDarkRoom.state_index`)."""
    index = np.asarray(index, np.int64)
    cell = index % (SIZE * SIZE)
    cols = [cell % SIZE, cell // SIZE]
    if canonical_name(env_name) == "darkkeytodoor":
        cols.append(index >= SIZE * SIZE)
    return np.stack(cols, axis=-1).astype(np.float32)


def _register() -> None:
    for name, cls in (("darkroom", "DarkRoom"), ("darkkeytodoor", "DarkKeyToDoor")):
        env_id = ENV_IDS[name]
        if env_id not in gym.registry:
            # The envs truncate at their horizon themselves; max_episode_steps only advertises it
            # (spec.max_episode_steps) and truncates at the same step.
            gym.register(
                env_id, entry_point=f"ringrl.envs.darkroom:{cls}", max_episode_steps=HORIZON[name]
            )


_register()
