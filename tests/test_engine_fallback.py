"""A blueprint the engine cannot pack (its forward mixes channels) runs under vmap: detected when
it is first grown, and its episodes are still the same at any batch width."""

from __future__ import annotations

import torch
from torch import nn

from esper_cli.contracts import Action, Decision, EpisodeConfig
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.environment import MorphogeneticEnv
from esper_cli.simulation.episode import EpisodeSpec, run_episodes
from esper_cli.tasks import BUILTIN_TASKS


class Reversed(nn.Module):
    """Reverses the channel order between two convolutions: packed, it would swap episodes."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.a = nn.Conv2d(channels, channels, 3, padding=1)
        self.b = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(h)).flip(1))


BLUEPRINTS = {**BUILTIN_BLUEPRINTS, "reversed": Reversed}


class GrowReversed:
    """Germinates `reversed` at once, then advances it through to FOSSILIZED."""

    def reset(self, context) -> None:
        pass

    def decide(self, obs, context) -> Decision:
        if not obs.has_active_seed and obs.available_slots and obs.epoch < 1:
            return Decision(Action.GERMINATE, blueprint="reversed")
        return Decision(Action.ADVANCE if obs.has_active_seed else Action.WAIT)


def _episodes(indices: list[int]):
    config = EpisodeConfig(epochs=5, blending_epochs=1)
    specs = [EpisodeSpec(GrowReversed(), config, 0, i, "grow") for i in indices]
    return run_episodes(specs, task=BUILTIN_TASKS["digits"], blueprints=BLUEPRINTS)


def test_a_channel_mixing_blueprint_falls_back_to_vmap_and_stays_width_independent():
    env = MorphogeneticEnv(EpisodeConfig(epochs=2), BUILTIN_TASKS["digits"], BLUEPRINTS)
    env.reset([1, 2])
    env.step([Decision(Action.GERMINATE, blueprint="reversed"), Decision(Action.GERMINATE, blueprint="norm")])
    assert env.engine.families[(0, "reversed")].leaves is None  # not packable: vmap
    assert env.engine.families[(0, "norm")].leaves is not None  # the built-ins pack

    alone = _episodes([2])[0]
    together = _episodes([0, 1, 2])[2]
    assert [s.stages for s in alone.seeds] == [s.stages for s in together.seeds]
    assert alone.seeds[0].fate == "fossilized"
    assert [d.observation.tobytes() for d in alone.decisions] == [d.observation.tobytes() for d in together.decisions]
    assert (alone.final_accuracy, alone.test_accuracy) == (together.final_accuracy, together.test_accuracy)


def test_the_fused_forward_equals_the_members_plain_model_with_a_vmapped_seed():
    env = MorphogeneticEnv(EpisodeConfig(epochs=4, blending_epochs=1), BUILTIN_TASKS["digits"], BLUEPRINTS)
    env.reset([3, 4, 5])
    germinate = [Decision(Action.GERMINATE, blueprint=b) for b in ("reversed", "conv_enhance", "reversed")]
    env.step(germinate)
    for _ in range(2):  # TRAINING, then BLENDING at alpha 1 (one blending epoch)
        env.step([Decision(Action.ADVANCE)] * 3)
    x, y = env.data.val_x, env.data.val_y
    val = env._evaluate(x, y)
    for k in range(3):
        model = env.model(k).eval()
        with torch.no_grad():
            acc = 100.0 * int((model(x).argmax(1) == y).sum()) / len(y)
        assert acc == val[k][1], (k, acc, val[k][1])
