"""Schema v2's seed signal: `seed_improvement` is the seed's own measured worth.

TRAINING: validation accuracy through the isolated probe minus the host's; BLENDING: accuracy at
the current alpha minus at alpha 0. Measured in the validation pass, changing nothing.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from esper_cli.contracts import FEATURE_MEANINGS, FEATURE_NAMES, Action, Decision, EpisodeConfig, SeedStage
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.environment import MorphogeneticEnv
from esper_cli.tasks import BUILTIN_TASKS

W, G, A, C = Action.WAIT, Action.GERMINATE, Action.ADVANCE, Action.CULL


class Negate(nn.Module):
    """A harmful seed: at full strength it turns the host's features into their opposite."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(-2.0))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.scale * h


def make_env(**kw) -> MorphogeneticEnv:
    cfg = EpisodeConfig(**{"epochs": 12, **kw})
    return MorphogeneticEnv(cfg, BUILTIN_TASKS[cfg.task], {**BUILTIN_BLUEPRINTS, "negate": Negate})


def play(env: MorphogeneticEnv, *decisions: Decision):
    """A lone member's decisions in turn; its last observation."""
    obs = None
    for d in decisions:
        obs = env.step([d])[0].observation
    return obs


def freeze_hosts(env: MorphogeneticEnv) -> None:
    """Skip the hosts' optimiser step (their gradient dropped) while seeds keep theirs.

    The engine has one lr per member for host and seeds alike; a host that must stay at its
    weights while its seed learns is the host family's Adam step left out."""
    host = env.engine.host

    def no_step(*_):
        host.flat.grad = None

    host.adam = no_step


def test_every_feature_has_one_documented_v2_meaning():
    assert tuple(FEATURE_MEANINGS) == FEATURE_NAMES
    assert "probe" in FEATURE_MEANINGS["seed_improvement"] and "alpha 0" in FEATURE_MEANINGS["seed_improvement"]


def test_a_better_training_seed_shows_a_positive_worth():
    # The host is frozen at its (poor) initial weights while the seed learns: better than the host.
    env = make_env()
    env.reset([3])
    freeze_hosts(env)
    host = env.engine.host.flat.detach().clone()
    base = env.members[0].val_acc
    obs = play(env, Decision(G, blueprint="conv_enhance"), Decision(A), Decision(W), Decision(W))
    assert obs.seed_stage == SeedStage.TRAINING and obs.seed_alpha == 0.0
    assert torch.equal(env.engine.host.flat, host)
    assert obs.val_accuracy == base  # alpha 0: the host's output is its own
    assert obs.seed_improvement > 5.0


def test_a_harmful_training_seed_shows_a_negative_worth_and_the_host_is_unaffected():
    env = make_env()
    env.reset([3])
    play(env, *[Decision(W)] * 4)  # a trained host...
    env.engine.lr.zero_()  # ...then nothing learns (the member's lr, host and seeds alike)
    base = env.members[0].val_acc
    assert base > 50
    obs = play(env, Decision(G, blueprint="negate"), Decision(A))
    assert obs.seed_stage == SeedStage.TRAINING
    assert obs.val_accuracy == base  # alpha 0: the host's output is its own
    assert obs.seed_improvement < -5.0


def test_blending_worth_is_accuracy_at_alpha_minus_at_alpha_zero():
    env = make_env(blending_epochs=3)
    env.reset([5])
    obs = play(env, Decision(W), Decision(G, blueprint="conv_enhance"), Decision(A), Decision(W), Decision(A))
    assert obs.seed_stage == SeedStage.BLENDING and 0 < obs.seed_alpha < 1
    slot = env.members[0].active_slot()
    x, y = env.data.val_x, env.data.val_y
    [(_, at_alpha)] = env._evaluate(x, y)
    [(_, at_zero)] = env._evaluate(x, y, override={slot.index: 0.0})
    assert at_alpha == obs.val_accuracy and at_alpha != at_zero
    assert obs.seed_improvement == at_alpha - at_zero


def test_germinated_or_no_seed_reads_zero_and_a_cull_records_the_last_worth():
    env = make_env(lr=0.0)
    [obs] = env.reset([3])
    assert obs.seed_improvement == 0.0
    obs = play(env, Decision(G, blueprint="negate"))
    assert obs.seed_stage == SeedStage.GERMINATED and obs.seed_improvement == 0.0
    worth = play(env, Decision(A)).seed_improvement
    obs = play(env, Decision(C))
    assert not obs.has_active_seed and obs.seed_improvement == 0.0
    record = env.members[0].seeds[0]
    assert record.fate == "culled" and record.contribution == worth


def test_the_measurement_changes_nothing_in_the_host():
    # A fossilized norm seed (BatchNorm running statistics) upstream of a TRAINING seed.
    env = make_env()
    env.reset([7])
    play(env, Decision(G, blueprint="norm"), Decision(A), Decision(A), Decision(W), Decision(W), Decision(W),
         Decision(A), Decision(G, blueprint="conv_enhance"), Decision(A), Decision(W))
    slots = env.members[0].slots
    assert slots[0].stage == SeedStage.FOSSILIZED and slots[1].stage == SeedStage.TRAINING
    x, y = env.data.val_x, env.data.val_y
    model = env.model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert any("running_mean" in k for k in before)
    model.eval()
    with torch.no_grad():
        plain = model(x)
    val, [worth] = env._validate()
    assert worth is not None
    after = env.model(0).state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)  # weights and running statistics
    with torch.no_grad():
        again = model(x)
    assert torch.equal(plain, again)
    # the host's output is its own: the pass with the probe beside it gives what the host alone gives
    assert val == env._evaluate(x, y)
    assert val[0][1] == 100.0 * (plain.argmax(1) == y).sum().item() / len(y)


def test_the_observation_vector_is_the_design_contract():
    """The 27 feature names, in order, derived from TrainingSnapshot's fields alone."""
    from esper_cli.contracts import N_FEATURES, TrainingSnapshot

    design = ("epoch global_step train_loss val_loss loss_delta train_accuracy val_accuracy accuracy_delta "
              "plateau_epochs best_val_accuracy best_val_loss").split() + \
        [f"loss_history_{i}" for i in range(5)] + [f"accuracy_history_{i}" for i in range(5)] + \
        "has_active_seed seed_stage seed_epochs_in_stage seed_alpha seed_improvement available_slots".split()
    assert FEATURE_NAMES == tuple(design) and N_FEATURES == 27
    vec = np.arange(N_FEATURES, dtype=np.float32)
    vec[FEATURE_NAMES.index("seed_stage")] = SeedStage.BLENDING
    vec[FEATURE_NAMES.index("has_active_seed")] = 1
    snap = TrainingSnapshot.from_vector(vec)
    assert snap.seed_stage is SeedStage.BLENDING and isinstance(snap.epoch, int)
    assert snap.accuracy_history_5 == tuple(float(x) for x in vec[16:21])
    assert np.array_equal(snap.to_vector(), vec)
