"""Simic's morphogenetic environment behind the Gymnasium interface: `simic/Morphogenetic-v0`.

    import gymnasium
    import esper_cli.gym_env  # registers simic/Morphogenetic-v0 (Gymnasium 1.x loads no plugins)

    env = gymnasium.make("simic/Morphogenetic-v0", task="digits", epochs=25)
    obs, info = env.reset(seed=0)          # episode 0 of run seed 0, as `simic collect --seed 0`
    obs, reward, terminated, truncated, info = env.step(env.action_space.sample(mask=info["action_mask"]))

Without the import, `gymnasium.make("esper_cli.gym_env:simic/Morphogenetic-v0", ...)` imports it.

It is the very environment `simic collect` runs (`environment.MorphogeneticEnv`), stepped the way
`episode.run_episode` steps it, so one seed gives the same episode either way:

- observation: the raw 27-float `TrainingSnapshot` vector, exactly as the store holds it
  (`Box(27)`, float32; bounds from each feature's meaning, see `observation_bounds`);
- action: `Discrete(4)` in `contracts.Action` order (WAIT, GERMINATE, ADVANCE, CULL); GERMINATE
  grows the environment's next blueprint in rotation. An action invalid in the current state
  (ADVANCE with no seed) is what it is in `run_episode`: a no-op that still trains the epoch, with
  reward reduced by `invalid_action_penalty` and `info["valid"]` False;
- reward: the stored reward (validation accuracy change over the epoch, minus that penalty);
- `terminated` after the last epoch (`epochs` steps); never truncated. The spec's
  `max_episode_steps` is the episode's `epochs` (`gymnasium.make(ENV_ID, epochs=E).spec` says E,
  so `TimeLimit`s rebuilt from it, as Minari's `recover_environment` and d3rlpy build them, never
  cut an episode short);
- info: `valid` and `message` (why a no-op), `action_mask` (int8, 1 = valid next), `seed_stage`
  (a `SeedStage` code) and its name, `epoch`, `val_accuracy`, `best_val_accuracy`, the outcome's
  `accuracy_change` / `loss_change`, the episode's `run_seed`, `index` and `rng_seed`; on the last
  step also `final_accuracy`, `best_accuracy` and `test_accuracy`.

Seeding: `reset(seed=s)` starts episode 0 of run seed `s` (`options={"index": i}` picks episode
i), which is the episode `simic collect --seed s` stores at index i. `reset()` without a seed goes
on to the next index of the same run; the first unseeded reset draws a run seed from Gymnasium's
generator. An episode reproduces exactly on CPU.
"""

from __future__ import annotations

import operator
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import numpy as np

try:
    import gymnasium as gym
    from gymnasium import spaces
    from gymnasium.envs.registration import EnvSpec
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(f"esper_cli.gym_env needs Gymnasium ({exc}); install the extra: "
                      'pip install "simic[rl]"') from None

from .contracts import (
    FEATURE_NAMES,
    LOSS_CAP,
    MAX_SEED,
    N_ACTIONS,
    N_FEATURES,
    Action,
    Decision,
    SeedStage,
    episode_rng_seed,
)
from .plugins import Registry, build_registry
from .simulation.environment import MorphogeneticEnv
from .simulation.gym_plugin import ENV_ID, register_envs
from .tasks import task_config

__all__ = ["ENV_ID", "MorphogeneticGymEnv", "observation_bounds", "register_envs"]

#: Counters with no bound known before the task loads (optimizer steps, slots): the largest
#: float32, so the space stays finite (Gymnasium warns about infinite bounds) and holds every value.
_UNBOUNDED = float(np.finfo(np.float32).max)


def observation_bounds(epochs: int) -> tuple[np.ndarray, np.ndarray]:
    """(low, high) of every feature, from its meaning in `contracts.FEATURE_MEANINGS`.

    Accuracies are percentages, losses clamped to [0, LOSS_CAP], counts of epochs at most
    `epochs`; deltas span the difference of two such values.
    """
    low = np.zeros(N_FEATURES, dtype=np.float32)
    high = np.zeros(N_FEATURES, dtype=np.float32)
    for i, name in enumerate(FEATURE_NAMES):
        if name in ("epoch", "plateau_epochs", "seed_epochs_in_stage"):
            lo, hi = 0.0, float(epochs)
        elif name in ("global_step", "available_slots"):
            lo, hi = 0.0, _UNBOUNDED
        elif name == "loss_delta":
            lo, hi = -LOSS_CAP, LOSS_CAP
        elif "loss" in name:
            lo, hi = 0.0, LOSS_CAP
        elif name in ("accuracy_delta", "seed_improvement"):
            lo, hi = -100.0, 100.0
        elif "accuracy" in name:
            lo, hi = 0.0, 100.0
        elif name in ("has_active_seed", "seed_alpha"):
            lo, hi = 0.0, 1.0
        elif name == "seed_stage":
            lo, hi = float(min(SeedStage)), float(max(SeedStage))
        else:  # a feature added to the snapshot without a bound here: keep the space honest
            lo, hi = -_UNBOUNDED, _UNBOUNDED
        low[i], high[i] = lo, hi
    return low, high


class MorphogeneticGymEnv(gym.Env[np.ndarray, np.int64]):
    """`simic/Morphogenetic-v0`: one morphogenetic training run per episode, one epoch per step.

    Keyword arguments are `EpisodeConfig` fields (`task`, `epochs`, `device`, `data_dir`, `lr`,
    `invalid_action_penalty`, ...); `registry` supplies tasks and blueprints (default: every
    installed Simic plugin, as `simic collect` loads them).
    """

    metadata: dict[str, Any] = {"render_modes": []}
    _spec: EnvSpec | None = None

    # The registration cannot know `epochs` (a make() kwarg), and a registered max_episode_steps
    # would truncate every longer episode: the spec make() assigns takes the episode's own length.
    @property  # type: ignore[override]
    def spec(self) -> EnvSpec | None:
        """The Gymnasium spec `make` gave this env, with `max_episode_steps` = its `epochs`."""
        return self._spec

    @spec.setter
    def spec(self, value: EnvSpec | None) -> None:
        self._spec = None if value is None else replace(value, max_episode_steps=self.config.epochs)

    def __init__(self, task: str = "digits", epochs: int = 25, *, registry: Registry | None = None,
                 **config: Any) -> None:
        for unused in ("expert", "beta", "explore"):  # the agent acting here is the caller
            if config.get(unused):
                raise ValueError(f"{unused} is a collection setting; the Gymnasium env applies the actions it is given")
        reg = registry if registry is not None else build_registry()
        if task not in reg.tasks:
            raise ValueError(f"unknown task {task!r} (available: {', '.join(sorted(reg.tasks)) or 'none'})")
        self.config = task_config(task, reg.tasks[task], epochs=int(epochs), **config)
        self._env = MorphogeneticEnv(self.config, reg.tasks[task], reg.blueprints)
        low, high = observation_bounds(self.config.epochs)
        self.observation_space = spaces.Box(low, high, dtype=np.float32)
        self.action_space = spaces.Discrete(N_ACTIONS)
        self._run_seed: int | None = None
        self._index = 0
        self._started = False

    def reset(self, *, seed: int | None = None,
              options: Mapping[str, Any] | None = None) -> tuple[np.ndarray, dict[str, Any]]:
        """Start an episode: `seed` = the run seed, `options["index"]` = the episode (default 0,
        or the next one of the current run when `seed` is None)."""
        # Integral numpy seeds too: Minari's HDF5 backend reads stored seeds and options back as numpy.
        seed = None if seed is None else operator.index(seed)
        super().reset(seed=seed)
        options = dict(options or {})
        if seed is not None:
            self._run_seed, index = int(seed), int(options.get("index", 0))
        elif self._run_seed is None:
            self._run_seed, index = int(self.np_random.integers(2**31)), int(options.get("index", 0))
        else:
            index = int(options.get("index", self._index + 1))
        if not 0 <= self._run_seed <= MAX_SEED or not 0 <= index <= MAX_SEED:
            raise ValueError(f"seed {self._run_seed} / index {index}: each must be in 0..{MAX_SEED}")
        self._index = index
        self._rng_seed = episode_rng_seed(self._run_seed, index)
        (snapshot,) = self._env.reset([self._rng_seed])  # the fused engine, one episode wide
        self._started = True
        return snapshot.to_vector(), self._info()

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        """Apply `action` (0..3), train one epoch, validate: (observation, reward, terminated,
        truncated, info). An action invalid in this state is a penalised no-op, as in collect."""
        if not self._started:
            raise RuntimeError("call reset() before step()")
        try:
            chosen = Action(int(action))
        except (TypeError, ValueError):
            raise ValueError(f"action {action!r} is not one of 0..{N_ACTIONS - 1} "
                             f"({', '.join(a.name for a in Action)})") from None
        (result,) = self._env.step([Decision(chosen)])
        terminated = self._env.done
        info = self._info()
        info.update(valid=bool(result.valid), message=result.message, blueprint=result.blueprint or "",
                    accuracy_change=float(result.outcome.accuracy_change),
                    loss_change=float(result.outcome.loss_change))
        if terminated:
            ((final, best, test),) = self._env.finish()
            info.update(final_accuracy=float(final), best_accuracy=float(best), test_accuracy=float(test))
            self._started = False
        return result.observation.to_vector(), float(result.outcome.reward), terminated, False, info

    def action_masks(self) -> np.ndarray:
        """Which actions are valid now (bool, `Action` order); the name sb3-contrib's maskable
        algorithms look for."""
        mask = np.zeros(N_ACTIONS, dtype=bool)
        mask[[int(a) for a in self._env.members[0].valid_actions()]] = True
        return mask

    def _info(self) -> dict[str, Any]:
        env = self._env.members[0]
        slot = env.active_slot()
        stage = slot.stage if slot is not None else SeedStage.DORMANT
        return {
            "action_mask": self.action_masks().astype(np.int8),
            "seed_stage": int(stage),
            "seed_stage_name": SeedStage(stage).name,
            "epoch": int(env.epoch),
            "val_accuracy": float(env.val_acc),
            "best_val_accuracy": float(env.best_val_acc),
            "run_seed": int(self._run_seed or 0),
            "index": int(self._index),
            "rng_seed": int(self._rng_seed),
        }


register_envs()
