"""The baseline policies `wait`, `random` and `eager`: registered like the built-ins, deterministic
per episode seed, and never an invalid action."""

from __future__ import annotations

from simic_plugins.baselines import EagerTamiyo, RandomTamiyo, WaitTamiyo, valid_actions

from esper_cli.contracts import Action, EpisodeConfig
from esper_cli.plugins import build_registry
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.episode import EpisodeSpec, run_episode, run_episodes
from esper_cli.tasks import BUILTIN_TASKS

CFG = EpisodeConfig(epochs=10, embargo_epochs=1)


def run(policy, index: int, seed: int = 0):
    return run_episode(policy, CFG, seed, index, task=BUILTIN_TASKS["digits"], blueprints=BUILTIN_BLUEPRINTS,
                       policy_name=policy.name)


def run_many(policy_type, indices: range, seed: int = 0):
    """Episodes `indices` of `policy_type`, one fresh policy each, trained together."""
    specs = [EpisodeSpec(policy_type(), CFG, seed, i, policy_type.name) for i in indices]
    return run_episodes(specs, task=BUILTIN_TASKS["digits"], blueprints=BUILTIN_BLUEPRINTS)


def test_registered_through_the_entry_point_group():
    reg = build_registry()
    assert isinstance(reg.policies["wait"](), WaitTamiyo)
    assert isinstance(reg.policies["random"](), RandomTamiyo)
    assert reg.plugin_of("policy", "random").name == "baselines"
    assert isinstance(reg.policies["eager"](), EagerTamiyo) and reg.plugin_of("policy", "eager").name == "baselines"


def test_eager_grows_into_every_free_slot_at_once_and_never_culls():
    ep = run(EagerTamiyo(), 0)
    actions = [d.action for d in ep.decisions]
    assert actions[0] == Action.GERMINATE and Action.CULL not in actions
    assert all(d.valid for d in ep.decisions)
    # Each seed is advanced at every epoch it can be: germinated, trained, blended, fossilized.
    assert ep.seeds_created == 2 and ep.seeds_fossilized == 2 and ep.seeds_culled == 0


def test_wait_never_grows():
    ep = run(WaitTamiyo(), 0)
    assert set(ep.action_counts()) and ep.action_counts()["WAIT"] == len(ep.decisions) == 10
    assert ep.seeds == []


def test_random_is_deterministic_per_episode_seed_and_always_valid():
    first = run_many(RandomTamiyo, range(3))
    again = [run(RandomTamiyo(), i) for i in range(3)]  # one at a time: the same episodes
    actions = [[int(d.action) for d in e.decisions] for e in first]
    assert actions == [[int(d.action) for d in e.decisions] for e in again]
    assert len({tuple(a) for a in actions}) > 1  # another episode seed, another draw
    assert all(d.valid for e in first for d in e.decisions)
    assert {a for e in actions for a in e} >= {Action.WAIT, Action.GERMINATE, Action.ADVANCE}


def test_valid_actions_follow_the_observation():
    from test_heuristic import seed, snap

    from esper_cli.contracts import SeedStage

    assert valid_actions(snap(available_slots=2)) == [Action.WAIT, Action.GERMINATE]
    assert valid_actions(snap(available_slots=0)) == [Action.WAIT]
    assert valid_actions(seed(SeedStage.TRAINING, 1)) == [Action.WAIT, Action.ADVANCE, Action.CULL]
