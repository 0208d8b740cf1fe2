"""Each Heuristic Tamiyo v2 rule on crafted snapshots."""

from __future__ import annotations

import numpy as np
import pytest
from simic_plugins.heuristic import HeuristicTamiyo

from esper_cli.contracts import HISTORY_LEN, Action, SeedStage, TrainingSnapshot


def snap(**kw) -> TrainingSnapshot:
    base = dict(
        epoch=10, global_step=170, train_loss=0.3, val_loss=0.35, loss_delta=0.0, train_accuracy=90.0,
        val_accuracy=88.0, accuracy_delta=0.1, plateau_epochs=0, best_val_accuracy=88.5, best_val_loss=0.34,
        loss_history_5=(0.35,) * HISTORY_LEN, accuracy_history_5=(88.0,) * HISTORY_LEN,
        has_active_seed=False, seed_stage=SeedStage.DORMANT, seed_epochs_in_stage=0, seed_alpha=0.0,
        seed_improvement=0.0, available_slots=2,
    )
    base.update(kw)
    return TrainingSnapshot(**base)


def seed(stage, epochs, improvement=0.0, **kw):
    return snap(has_active_seed=True, seed_stage=stage, seed_epochs_in_stage=epochs,
                seed_improvement=improvement, **kw)


H = HeuristicTamiyo()


@pytest.mark.parametrize(
    "obs, expected",
    [
        # germinate on plateau
        (snap(epoch=1, plateau_epochs=9), Action.WAIT),  # warm-up, even on a plateau
        (snap(epoch=2, plateau_epochs=1), Action.GERMINATE),
        (snap(epoch=12, plateau_epochs=0), Action.WAIT),  # still improving
        (snap(epoch=12, plateau_epochs=6, available_slots=0), Action.WAIT),  # nowhere to grow
        (seed(SeedStage.GERMINATED, 0), Action.ADVANCE),
        # TRAINING: advance a seed whose probe beats the host, cull one that stays behind
        (seed(SeedStage.TRAINING, 1, improvement=5.0), Action.WAIT),  # minimum training time
        (seed(SeedStage.TRAINING, 2, improvement=0.28), Action.ADVANCE),  # one image ahead
        (seed(SeedStage.TRAINING, 2, improvement=0.0), Action.ADVANCE),  # level with the host
        (seed(SeedStage.TRAINING, 2, improvement=-3.0), Action.WAIT),  # too early to cull
        (seed(SeedStage.TRAINING, 2, improvement=-0.28), Action.WAIT),
        (seed(SeedStage.TRAINING, 3, improvement=-0.28), Action.CULL),  # still behind after 3 epochs
        (seed(SeedStage.TRAINING, 3, improvement=-1.4), Action.CULL),
        (seed(SeedStage.TRAINING, 4, improvement=0.56), Action.ADVANCE),
        # BLENDING: fossilize a positive contribution, else cull
        (seed(SeedStage.BLENDING, 2, improvement=3.0), Action.WAIT),
        (seed(SeedStage.BLENDING, 2, improvement=-3.0), Action.WAIT),  # judged once blended
        (seed(SeedStage.BLENDING, 3, improvement=0.3), Action.ADVANCE),
        (seed(SeedStage.BLENDING, 3, improvement=0.0), Action.CULL),
        (seed(SeedStage.BLENDING, 4, improvement=-0.8), Action.CULL),
    ],
)
def test_rules(obs, expected):
    decision = H.decide(obs)
    assert decision.action == expected
    assert decision.reason and 0.0 < decision.confidence <= 1.0


def test_a_training_seed_does_not_wait_forever():
    # A WAIT band between the thresholds exists only when they are set apart; the stage is bounded.
    patient = HeuristicTamiyo(advance_improvement=2.0, cull_below_improvement=0.0, max_training_epochs=6)
    assert patient.decide(seed(SeedStage.TRAINING, 5, improvement=1.0)).action == Action.WAIT
    assert patient.decide(seed(SeedStage.TRAINING, 6, improvement=1.0)).action == Action.CULL


def test_thresholds_are_configurable():
    eager = HeuristicTamiyo(min_epochs_before_germinate=0, plateau_epochs_to_germinate=1, cull_after_epochs=4,
                            fossilize_above=1.0)
    assert eager.decide(snap(epoch=0, plateau_epochs=1)).action == Action.GERMINATE
    assert eager.decide(seed(SeedStage.TRAINING, 3, improvement=-0.5)).action == Action.WAIT
    assert eager.decide(seed(SeedStage.TRAINING, 4, improvement=-0.5)).action == Action.CULL
    assert eager.decide(seed(SeedStage.BLENDING, 3, improvement=0.8)).action == Action.CULL
    with pytest.raises(ValueError, match="unknown heuristic option"):
        HeuristicTamiyo(no_such_threshold=1)


def test_decisions_depend_on_the_observation_vector_alone():
    obs = seed(SeedStage.BLENDING, 6, improvement=0.7)
    replayed = TrainingSnapshot.from_vector(obs.to_vector())
    np.testing.assert_allclose(replayed.to_vector(), obs.to_vector())
    assert replayed.seed_stage == SeedStage.BLENDING and replayed.available_slots == 2
    assert H.decide(replayed) == H.decide(obs)
