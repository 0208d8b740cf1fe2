"""How Gymnasium finds `simic/Morphogenetic-v0`, without importing Gymnasium or torch on import.

`register_envs` is what `esper_cli.gym_env` calls on import and what the `gymnasium.envs`
entry point names (Gymnasium releases that load plugin entry points call it at their import; 1.x
does not). The registration names the environment class by string, so nothing heavy is imported
before `gymnasium.make` builds one.
"""

from __future__ import annotations

ENV_ID = "simic/Morphogenetic-v0"
ENTRY_POINT = "esper_cli.gym_env:MorphogeneticGymEnv"


def register_envs() -> None:
    """Register `simic/Morphogenetic-v0` with Gymnasium (once; a second call changes nothing)."""
    from gymnasium.envs.registration import register, registry

    if ENV_ID not in registry:
        register(id=ENV_ID, entry_point=ENTRY_POINT)
