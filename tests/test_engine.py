"""The fused engine on mixed batches: DESIGN.md section 3's semantics hold per member, and a member's
episode never depends on who shares its batch (section 10).

Most tests read one scripted batch (`scenario`, run once for the module): thirteen members at
once, in every stage, with every built-in blueprint and one that the engine cannot pack (it falls
back to vmap), in both slots, with different lrs, blending lengths and embargoes, germinating,
culling and regrowing in the same epochs. "Twins" are members with the same rng seed: the same
initial host and data order, so a twin that grows nothing is the host its sibling would be if its
seed did not touch it.

The batch trains on a slice of the digits task (five optimiser steps an epoch) so the module takes
seconds; what is tested does not depend on how many images there are.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from cli_helpers import committed_episodes, simic_process, wait_for_episodes
from episode_helpers import assert_same_episode
from simic_plugins.baselines import EagerTamiyo, RandomTamiyo
from simic_plugins.heuristic import HeuristicTamiyo
from torch import nn

from esper_cli.contracts import (
    FEATURE_NAMES,
    Action,
    Decision,
    Episode,
    EpisodeConfig,
    SeedStage,
    TrainingSnapshot,
)
from esper_cli.data.store import EpisodeReader
from esper_cli.simulation.blueprints import BUILTIN_BLUEPRINTS
from esper_cli.simulation.environment import MorphogeneticEnv, StepResult
from esper_cli.simulation.episode import EpisodeSpec, PolicyError, run_episodes
from esper_cli.tasks import BUILTIN_TASKS, Task, TaskData, load_digits

W, G, A, C = Action.WAIT, Action.GERMINATE, Action.ADVANCE, Action.CULL
#: The observation's features before the seed's own (epoch ... accuracy_history_5): the host's.
HOST_FEATURES = slice(0, FEATURE_NAMES.index("has_active_seed"))
TASK_NAME = "digits-slice"


def _load_slice(data_dir: str | None, split_seed: int) -> TaskData:
    """The first images of each digits split: 160 to train on (5 steps of 32), 120 to validate
    and test on."""
    d = load_digits(data_dir, split_seed)
    return TaskData(d.train_x[:160], d.train_y[:160], d.val_x[:120], d.val_y[:120], d.test_x[:120], d.test_y[:120])


SLICE = Task(TASK_NAME, "digits, sliced small for tests", _load_slice, BUILTIN_TASKS["digits"].build_host)


class GroupNormSeed(nn.Module):
    """A seed that normalises over all of its channels at once: no packed form, so its family runs
    under vmap (`engine.packed_call`)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = nn.GroupNorm(1, channels)
        self.mix = nn.Conv2d(channels, channels, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.mix(self.norm(h))


BLUEPRINTS = {**BUILTIN_BLUEPRINTS, "group_norm": GroupNormSeed}


def g(blueprint: str) -> Decision:
    return Decision(G, "scripted", blueprint=blueprint)


def config(epochs: int, **kw) -> EpisodeConfig:
    return EpisodeConfig(task=TASK_NAME, epochs=epochs, **kw)


# ------------------------------------------------------------------------------ the scripted batch
S, T, U, V = 11, 12, 13, 14  # rng seeds; members sharing one are twins
EPOCHS = 9


@dataclass(frozen=True)
class Plan:
    name: str
    rng_seed: int
    script: tuple
    options: dict = field(default_factory=dict)


PLANS = [
    # Twins of S: a TRAINING seed of each blueprint in slot 0, one in slot 1, and the bare host.
    Plan("probe-conv_enhance", S, (g("conv_enhance"), A)),
    Plan("probe-attention", S, (g("attention"), A)),
    Plan("probe-norm", S, (g("norm"), A)),
    Plan("probe-depthwise", S, (g("depthwise"), A)),
    Plan("probe-pool_mixer", S, (g("pool_mixer"), A)),
    Plan("probe-group_norm", S, (g("group_norm"), A)),
    Plan("probe-slot1", S, (g("conv_enhance"), C, g("attention"), A), {"embargo_epochs": 2}),
    Plan("host-S", S, ()),
    # Twins of T: blend over 3 epochs and fossilize, then a second seed blending in slot 1; a
    # second lr, blending in one epoch, both slots fossilized; the bare host.
    Plan("blend3", T, (g("conv_enhance"), A, A, W, W, A, g("norm"), A, A), {"blending_epochs": 3}),
    Plan("blend1", T, (g("depthwise"), A, A, A, g("group_norm"), A, A, W, A), {"blending_epochs": 1, "lr": 0.005}),
    Plan("host-T", T, ()),
    # Cull from TRAINING, wait out a 2-epoch embargo, regrow the same blueprint in the same slot.
    Plan("regrow", U, (g("conv_enhance"), A, W, C, W, g("conv_enhance"), A), {"embargo_epochs": 2}),
    # No embargo: cull and regrow another blueprint at once; blend over 2 epochs and fossilize.
    Plan("swap", V, (g("attention"), A, C, g("pool_mixer"), A, A, W, A), {"embargo_epochs": 0, "blending_epochs": 2}),
]
K = {p.name: k for k, p in enumerate(PLANS)}


@dataclass
class Record:
    """What the scripted batch did, epoch by epoch (index e: after step e)."""

    env: MorphogeneticEnv
    start: list[TrainingSnapshot]
    results: list[list[StepResult]] = field(default_factory=list)
    hosts: list[torch.Tensor] = field(default_factory=list)
    #: (slot, blueprint) -> (flat, steps, m, v) of the seed family, after each step
    families: list[dict[tuple[int, str], tuple[torch.Tensor, ...]]] = field(default_factory=list)
    stages: list[list[tuple[SeedStage, ...]]] = field(default_factory=list)
    #: the alphas the engine trained with: per epoch, one (slots, members) tensor per optimiser step
    alphas: list[list[torch.Tensor]] = field(default_factory=list)

    def row(self, e: int, slot: int, blueprint: str, member: str) -> tuple[torch.Tensor, ...]:
        return tuple(t[K[member]] for t in self.families[e][(slot, blueprint)])

    def stage(self, e: int, member: str, slot: int = 0) -> SeedStage:
        return self.stages[e][K[member]][slot]

    def obs(self, e: int, member: str) -> TrainingSnapshot:
        return self.results[e][K[member]].observation


def decision(plan: Plan, e: int) -> Decision:
    d = plan.script[e] if e < len(plan.script) else W
    return d if isinstance(d, Decision) else Decision(d, "scripted")


@pytest.fixture(scope="module")
def scenario() -> Record:
    env = MorphogeneticEnv([config(EPOCHS, **p.options) for p in PLANS], SLICE, BLUEPRINTS)
    rec = Record(env, env.reset([p.rng_seed for p in PLANS]))
    train_step = env.engine.train_step

    def recording(x, y, alphas, trained):
        rec.alphas[-1].append(torch.stack([alphas[s] for s in range(env.engine.n_slots)]).clone())
        return train_step(x, y, alphas, trained)

    env.engine.train_step = recording  # the very alphas the engine computes with, step by step
    for e in range(EPOCHS):
        rec.alphas.append([])
        rec.results.append(env.step([decision(p, e) for p in PLANS]))
        rec.hosts.append(env.engine.host.flat.detach().clone())
        rec.families.append({key: tuple(t.detach().clone() for t in (f.flat, f.steps, f.m, f.v))
                             for key, f in env.engine.families.items()})
        rec.stages.append([tuple(s.stage for s in m.slots) for m in env.members])
    return rec


def test_the_script_ran_as_planned(scenario):
    # Every scripted action was carried out: the batch is as mixed as the plans say.
    assert all(r.valid for step in scenario.results for r in step), \
        [(p.name, e, r.message) for e, step in enumerate(scenario.results) for p, r in zip(PLANS, step) if not r.valid]
    last = EPOCHS - 1
    assert {scenario.stage(last, f"probe-{b}") for b in BLUEPRINTS} == {SeedStage.TRAINING}
    assert scenario.stages[last][K["probe-slot1"]] == (SeedStage.DORMANT, SeedStage.TRAINING)
    assert scenario.stages[last][K["blend3"]] == (SeedStage.FOSSILIZED, SeedStage.BLENDING)
    assert scenario.stages[last][K["blend1"]] == (SeedStage.FOSSILIZED, SeedStage.FOSSILIZED)
    assert scenario.stages[last][K["swap"]] == (SeedStage.FOSSILIZED, SeedStage.DORMANT)
    assert scenario.env.engine.families[(1, "group_norm")].leaves is None  # the vmap path is in the batch
    assert scenario.env.engine.families[(0, "conv_enhance")].leaves is not None
    # one epoch of the batch held TRAINING, BLENDING, FOSSILIZED, GERMINATED and CULLED members
    assert set(scenario.stages[3][K["blend3"]] + scenario.stages[3][K["blend1"]] + scenario.stages[3][K["regrow"]]
               + scenario.stages[3][K["swap"]] + scenario.stages[3][K["probe-norm"]]) >= {
        SeedStage.TRAINING, SeedStage.BLENDING, SeedStage.FOSSILIZED, SeedStage.GERMINATED, SeedStage.CULLED}


# ------------------------------------------------------------------------------------- isolation
def test_a_training_seed_learns_and_its_host_gets_nothing_from_it(scenario):
    spe = scenario.env.steps_per_epoch
    twins = [p.name for p in PLANS if p.rng_seed == S]
    bare = K["host-S"]
    for e in range(EPOCHS):
        # Every twin's host is, bit for bit, the host that grew nothing: no gradient through the
        # seed path, whatever blueprint in whichever slot, packed or under vmap.
        for name in twins:
            assert torch.equal(scenario.hosts[e][K[name]], scenario.hosts[e][bare]), (name, e)
            # ...and its output is the bare host's while alpha is 0 (train and validation metrics)
            got, want = scenario.obs(e, name).to_vector(), scenario.obs(e, "host-S").to_vector()
            assert np.array_equal(got[HOST_FEATURES], want[HOST_FEATURES]), (name, e)
    for blueprint in BLUEPRINTS:
        name = f"probe-{blueprint}"
        for e in range(1, EPOCHS):  # TRAINING from epoch 1: the seed's row learns every epoch
            flat, steps, _, _ = scenario.row(e, 0, blueprint, name)
            before = scenario.row(e - 1, 0, blueprint, name)[0]
            assert not torch.equal(flat, before), (name, e)
            assert steps.item() == e * spe
    # the slot-1 probe learns there; its culled slot-0 seed never trained (GERMINATED: no gradient)
    for e in range(3, EPOCHS):
        assert not torch.equal(scenario.row(e, 1, "attention", "probe-slot1")[0],
                               scenario.row(e - 1, 1, "attention", "probe-slot1")[0])
    flat, steps, m, v = scenario.row(EPOCHS - 1, 0, "conv_enhance", "probe-slot1")
    assert steps.item() == 0 and not m.any() and not v.any()
    assert torch.equal(flat, scenario.row(0, 0, "conv_enhance", "probe-slot1")[0])


def test_rows_of_members_outside_a_family_are_left_alone(scenario):
    # (0, conv_enhance) holds probe-conv_enhance, blend3 and regrow; nobody else's row ever moves.
    users = {K["probe-conv_enhance"], K["blend3"], K["regrow"], K["probe-slot1"]}
    for e in range(EPOCHS):
        flat, steps, m, v = scenario.families[e][(0, "conv_enhance")]
        others = [k for k in range(len(PLANS)) if k not in users]
        assert not flat[others].any() and not steps[others].any() and not m[others].any() and not v[others].any()


def test_blending_trains_host_and_seed_jointly(scenario):
    # blend3 and host-T are twins: the same host while the seed is GERMINATED or TRAINING (epochs
    # 0-1), apart once it blends (the host path is not detached) ...
    for e in (0, 1):
        assert torch.equal(scenario.hosts[e][K["blend3"]], scenario.hosts[e][K["host-T"]])
    assert scenario.stage(2, "blend3") == SeedStage.BLENDING
    for e in range(2, EPOCHS):
        assert not torch.equal(scenario.hosts[e][K["blend3"]], scenario.hosts[e][K["host-T"]])
        # ... and the seed keeps learning, blended and fossilized
        assert not torch.equal(scenario.row(e, 0, "conv_enhance", "blend3")[0],
                               scenario.row(e - 1, 0, "conv_enhance", "blend3")[0])
    # each member trains with its own lr: blend1 (lr 0.005) left host-T's path from the first step
    assert scenario.env.engine.lr[K["blend1"]].item() == pytest.approx(0.005)
    assert not torch.equal(scenario.hosts[0][K["blend1"]], scenario.hosts[0][K["host-T"]])


def test_blending_alpha_ramps_per_step_without_jumps_and_fossilized_is_one(scenario):
    spe = scenario.env.steps_per_epoch

    def alphas(member: str, slot: int, epochs: range) -> list[float]:
        return [float(step[slot, K[member]]) for e in epochs for step in scenario.alphas[e]]

    for member, slot, start, length in [("blend3", 0, 2, 3), ("swap", 0, 5, 2), ("blend1", 1, 6, 1)]:
        ramp = alphas(member, slot, range(start, start + length))
        steps = length * spe
        assert ramp == pytest.approx([(j + 1) / steps for j in range(steps)], abs=1e-7)  # no jumps
        assert ramp[-1] == 1.0 and alphas(member, slot, range(start)) == [0.0] * (start * spe)
        # the observed alpha after each blending epoch, and the ramp the member plans
        for i, e in enumerate(range(start, start + length)):
            assert scenario.obs(e, member).seed_alpha == pytest.approx((i + 1) / length)
    member = scenario.env.members[K["blend3"]]
    assert member.alphas_this_epoch(member.slots[1], spe) == pytest.approx([(j + 1) / (3 * spe) for j in
                                                                            range(spe, 2 * spe)])
    # FOSSILIZED: alpha 1 at every step from then on, in the slot's state too
    assert alphas("blend3", 0, range(5, EPOCHS)) == [1.0] * ((EPOCHS - 5) * spe)
    assert alphas("blend1", 0, range(3, EPOCHS)) == [1.0] * ((EPOCHS - 3) * spe)
    assert alphas("blend1", 1, range(8, EPOCHS)) == [1.0] * spe
    assert scenario.env.members[K["blend1"]].slots[1].alpha == 1.0
    # a TRAINING seed's slot is at alpha 0 throughout: its host's output is its own
    assert set(alphas("probe-norm", 0, range(EPOCHS))) == {0.0}


# ------------------------------------------------------------------------- lifecycle mid-batch
def test_germinate_cull_and_embargo_mid_batch(scenario):
    # Epoch 3: one member culls, one germinates, one fossilizes, one advances a seed in slot 1,
    # one keeps blending, the probes keep training: all in the same step.
    assert [scenario.results[3][K[n]].outcome.stage_after for n in ("regrow", "swap", "blend1", "probe-slot1",
                                                                   "blend3", "probe-norm")] == [
        SeedStage.CULLED, SeedStage.GERMINATED, SeedStage.FOSSILIZED, SeedStage.TRAINING, SeedStage.BLENDING,
        SeedStage.TRAINING]
    # regrow's embargo is 2 epochs: CULLED after the epoch it culled in, DORMANT after the next
    assert scenario.stage(3, "regrow") == SeedStage.CULLED and scenario.obs(3, "regrow").available_slots == 1
    assert scenario.stage(4, "regrow") == SeedStage.DORMANT and scenario.obs(4, "regrow").available_slots == 2
    # probe-slot1 germinated while its slot 0 was embargoed: the seed went to slot 1
    assert scenario.stages[1][K["probe-slot1"]] == (SeedStage.CULLED, SeedStage.DORMANT)
    assert scenario.stages[2][K["probe-slot1"]] == (SeedStage.DORMANT, SeedStage.GERMINATED)
    assert [(r.slot, r.fate) for r in scenario.env.members[K["probe-slot1"]].seeds] == [(0, "culled"), (1, "active")]
    # swap has no embargo: its slot is free in the epoch it culled, and regrown at once
    assert scenario.stage(2, "swap") == SeedStage.DORMANT and scenario.obs(2, "swap").available_slots == 2
    records = scenario.env.members[K["regrow"]].seeds
    assert [(r.blueprint, r.slot, r.fate) for r in records] == [("conv_enhance", 0, "culled"),
                                                                ("conv_enhance", 0, "active")]
    assert records[0].stages == [("GERMINATED", 0), ("TRAINING", 1), ("CULLED", 3)]
    assert records[1].stages == [("GERMINATED", 5), ("TRAINING", 6)]


def test_a_regrown_seed_starts_with_fresh_weights_and_fresh_adam_state(scenario):
    spe = scenario.env.steps_per_epoch
    member = scenario.env.members[K["regrow"]]
    # trained in epochs 1 and 2, culled before epoch 3: its row kept its step count
    assert scenario.row(2, 0, "conv_enhance", "regrow")[1].item() == 2 * spe
    assert scenario.row(4, 0, "conv_enhance", "regrow")[1].item() == 2 * spe
    # regrown at epoch 5 in the same (slot, blueprint) family: step count and moments from zero,
    # the weights of a new seed drawn from the episode's seed for seed number 1
    flat, steps, m, v = scenario.row(5, 0, "conv_enhance", "regrow")
    assert steps.item() == 0 and not m.any() and not v.any()
    torch.manual_seed(member.seed_torch_seed(1))
    fresh = BLUEPRINTS["conv_enhance"](member.slots[0].channels)
    assert torch.equal(flat, torch.cat([p.detach().reshape(-1) for p in fresh.parameters()]))
    assert scenario.row(6, 0, "conv_enhance", "regrow")[1].item() == spe
    # the family's other members were not reset with it
    assert scenario.row(5, 0, "conv_enhance", "probe-conv_enhance")[1].item() == 5 * spe
    assert scenario.row(5, 0, "conv_enhance", "blend3")[1].item() == 5 * spe
    # a member that culls and regrows another blueprint at once starts that one fresh too
    assert scenario.row(3, 0, "pool_mixer", "swap")[1].item() == 0
    assert scenario.row(4, 0, "pool_mixer", "swap")[1].item() == spe
    assert scenario.row(4, 0, "pool_mixer", "probe-pool_mixer")[1].item() == 4 * spe


# ---------------------------------------------------------------- the engine is the plain model
def _engine_log_probs(env: MorphogeneticEnv, x: torch.Tensor, classes: int = 10) -> torch.Tensor:
    """(members, images, classes): log-probabilities from the engine's own evaluation, its loss on
    one image with each label in turn (the engine returns losses, not logits)."""
    out = torch.zeros(env.n, len(x), classes, dtype=torch.float64)
    alphas = env._alphas_now()
    for i in range(len(x)):
        for c in range(classes):
            loss, _, _ = env.engine.evaluate(x[i:i + 1], torch.tensor([c]), alphas)
            out[:, i, c] = -loss
    return out


def test_the_fused_forward_is_each_members_plain_model(scenario):
    env = scenario.env
    x, y = env.data.val_x, env.data.val_y
    worth: dict[int, list[int]] = {}
    for m in env.members:
        slot = m.active_slot()
        if slot is not None and slot.stage in (SeedStage.TRAINING, SeedStage.BLENDING):
            worth.setdefault(slot.index, []).append(m.index)
    loss, correct, other = env.engine.evaluate(x, y, env._alphas_now(), worth)
    engine_lp = _engine_log_probs(env, x[:6])
    # both slots live with different blueprints, one of them under vmap
    assert [s.blueprint for s in env.members[K["blend1"]].slots] == ["depthwise", "group_norm"]
    assert [s.blueprint for s in env.members[K["blend3"]].slots] == ["conv_enhance", "norm"]
    for k, member in enumerate(env.members):
        model = env.model(k).eval()
        with torch.no_grad():
            logits = model(x)
        torch.testing.assert_close(engine_lp[k], F.log_softmax(logits[:6], 1).double(), atol=1e-5, rtol=1e-4)
        assert loss[k].item() == pytest.approx(F.cross_entropy(logits, y, reduction="sum").item(), rel=1e-5)
        assert correct[k].item() == (logits.argmax(1) == y).sum().item(), PLANS[k].name
        slot = member.active_slot()
        if slot is None or slot.stage not in (SeedStage.TRAINING, SeedStage.BLENDING):
            continue
        # the worth pass's counterfactual, as a plain model: the TRAINING probe is the seed at full
        # strength on the host; the BLENDING counterfactual is the slot at alpha 0
        plain = model.slots[slot.index]
        if slot.stage == SeedStage.TRAINING:
            plain.stage, plain.alpha = SeedStage.BLENDING, 1.0
        else:
            plain.alpha = 0.0
        with torch.no_grad():
            assert other[k].item() == (model(x).argmax(1) == y).sum().item(), PLANS[k].name


def test_a_fossilized_seed_is_part_of_the_members_model(scenario):
    model = scenario.env.model(K["blend3"])
    keys = model.state_dict().keys()
    assert any(k.startswith("slots.1.seed.norm.running_mean") for k in keys)
    seed = model.slots[0].seed
    assert seed is not None and {id(p) for p in seed.parameters()} <= {id(p) for p in model.parameters()}
    engine_row = scenario.env.engine.families[(0, "conv_enhance")].flat[K["blend3"]]
    assert torch.equal(torch.cat([p.reshape(-1) for p in seed.parameters()]), engine_row.detach())


# ------------------------------------------------------------------------------------ invalid actions
def _play(scripts: list[list[Decision]], configs: list[EpisodeConfig], seeds: list[int]):
    env = MorphogeneticEnv(configs, SLICE, BLUEPRINTS)
    env.reset(seeds)
    steps = [env.step([s[e] for s in scripts]) for e in range(len(scripts[0]))]
    return env, steps


def test_invalid_actions_are_recorded_no_ops_for_their_member_only():
    d = lambda a: Decision(a, "scripted")  # noqa: E731
    scripts = [
        [d(A), d(C), g("no-such"), d(W), d(A)],              # nothing to advance, cull, or grow by that name
        [g("norm"), g("attention"), d(A), d(A), d(A)],       # grow while a seed is active
        [g("conv_enhance"), d(A), d(A), d(A), d(A)],         # fossilized: nothing active to advance
        [d(W), d(A), d(W), d(W), d(C)],
    ]
    invalid = {(0, 0), (0, 1), (0, 2), (0, 4), (1, 1), (2, 4), (3, 1), (3, 4)}
    waits = [[d(W) if (k, e) in invalid else a for e, a in enumerate(s)] for k, s in enumerate(scripts)]
    configs = [config(5, invalid_action_penalty=p, blending_epochs=1) for p in (0.1, 0.1, 0.1, 0.5)]
    seeds = [21, 22, 22, 23]
    env, steps = _play(scripts, configs, seeds)
    twin, twin_steps = _play(waits, configs, seeds)
    for e, (step, other) in enumerate(zip(steps, twin_steps)):
        for k, (r, w) in enumerate(zip(step, other)):
            assert r.valid == ((k, e) not in invalid), (k, e, r.message)
            # a no-op: the member is where a WAIT would have left it, and so is everyone else
            assert np.array_equal(r.observation.to_vector(), w.observation.to_vector()), (k, e)
            penalty = 0.0 if r.valid else configs[k].invalid_action_penalty
            assert r.outcome.reward == pytest.approx(w.outcome.reward - penalty, abs=1e-12)
            assert (r.outcome.accuracy_change, r.outcome.stage_after) == (w.outcome.accuracy_change,
                                                                            w.outcome.stage_after)
    assert torch.equal(env.engine.host.flat, twin.engine.host.flat)
    messages = {(k, e): steps[e][k].message for k, e in invalid}
    assert "no active seed" in messages[0, 0] and "no active seed" in messages[0, 1]
    assert "unknown blueprint 'no-such'" in messages[0, 2] and "seed is active" in messages[1, 1]
    assert [s.blueprint for s in env.members[1].seeds] == ["norm"]
    assert env.members[0].seeds == [] and env.members[2].seeds[0].fate == "fossilized"


# ------------------------------------------------------------------------- episodes in batches
class Raising:
    """Waits, then raises in `decide` at `epoch` (or in `reset` when `epoch` is None)."""

    name = "raising"

    def __init__(self, epoch: int | None) -> None:
        self.epoch = epoch

    def reset(self, context) -> None:
        if self.epoch is None:
            raise RuntimeError("no state to reset")

    def decide(self, obs, context) -> Decision:
        if obs.epoch == self.epoch:
            raise ZeroDivisionError("division by zero in my feature code")
        return Decision(W, "waiting")


POLICIES = {"heuristic": HeuristicTamiyo, "eager": EagerTamiyo, "random": RandomTamiyo}


def _spec(policy: str, index: int, epochs: int, seed: int = 3, **options) -> EpisodeSpec:
    """A fresh policy for episode `index` (a policy instance never serves two episodes)."""
    return EpisodeSpec(POLICIES[policy](), config(epochs, **options), seed, index, policy)


def test_a_member_whose_policy_raises_fails_only_its_own_episode():
    def specs(with_failures: bool) -> list[EpisodeSpec]:
        out = [_spec("heuristic", 0, 6), _spec("eager", 2, 6), _spec("random", 3, 6, blending_epochs=1)]
        if with_failures:
            out.insert(1, EpisodeSpec(Raising(2), config(6), 3, 1, "raising"))
            out.append(EpisodeSpec(Raising(None), config(6), 3, 4, "raising"))
        return out

    results = run_episodes(specs(True), task=SLICE, blueprints=BLUEPRINTS)
    alone = run_episodes(specs(False), task=SLICE, blueprints=BLUEPRINTS)
    assert [type(r).__name__ for r in results] == ["Episode", "PolicyError", "Episode", "Episode", "PolicyError"]
    assert str(results[1]).startswith("policy 'raising' raised in decide() at epoch 2 of episode 1 (seed 3)")
    assert "ZeroDivisionError: division by zero in my feature code" in str(results[1])
    assert "raised in reset(): RuntimeError: no state to reset" in str(results[4])
    for got, want in zip([results[0], results[2], results[3]], alone):
        assert_same_episode(got, want)  # bit for bit: the failing members changed nothing for them
    assert isinstance(results[1], PolicyError)


def test_an_episode_is_the_same_at_any_batch_width_and_position():
    def specs(order: list[int]) -> list[EpisodeSpec]:
        table = [("heuristic", {}), ("eager", {}), ("random", {}), ("eager", {"blending_epochs": 2, "embargo_epochs": 0}),
                 ("random", {"lr": 0.02})]
        return [_spec(table[i][0], i, 10, seed=4, **table[i][1]) for i in order]

    def run(order: list[int]) -> dict[int, object]:
        return {e.index: e for e in run_episodes(specs(order), task=SLICE, blueprints=BLUEPRINTS)}

    lone = {}
    for i in range(5):
        lone.update(run([i]))
    stages = {name for e in lone.values() for s in e.seeds for name, _ in s.stages}
    assert stages >= {"TRAINING", "BLENDING", "FOSSILIZED", "CULLED"}  # every stage is exercised
    for batches in ([[0, 1], [2, 3], [4]], [[4, 3, 2, 1, 0]]):
        for batch in batches:
            for index, episode in run(batch).items():
                assert_same_episode(episode, lone[index])


# ------------------------------------------------------------------- whole `simic collect` runs
#: One run of twelve short episodes: eager with exploration, so that seeds grow, blend and get culled.
RUN = ["collect", "--episodes", "12", "--epochs", "3", "--policy", "eager", "--explore", "0.5", "--seed", "2"]


def _collect(store: Path, *extra: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "esper_cli", *RUN, "--store", str(store), *extra],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr


def _contents(store: Path) -> tuple[dict[str, np.ndarray], dict[str, Episode]]:
    """Every column of `columns()`, rows sorted by (episode id, step), without the store position;
    and every episode by id."""
    with EpisodeReader(store) as reader:
        cols = reader.columns()
        order = np.lexsort((cols["step"], cols["episode_id"]))
        cols = {name: col[order] for name, col in cols.items() if name != "episode"}
        episodes = {reader.episode_meta(i)["id"]: reader.episode(i) for i in range(reader.n_episodes)}
    return cols, episodes


def _assert_same_stores(got: Path, want: Path) -> None:
    got_cols, got_episodes = _contents(got)
    want_cols, want_episodes = _contents(want)
    assert got_cols.keys() == want_cols.keys() and got_episodes.keys() == want_episodes.keys()
    for name, col in want_cols.items():
        np.testing.assert_array_equal(got_cols[name], col, err_msg=name)
    for key, episode in want_episodes.items():
        assert_same_episode(got_episodes[key], episode)


def _assert_committed_are_the_references(store: Path, reference: Path) -> int:
    """Every episode `store` has committed is whole and is the reference's; how many there are."""
    if not store.exists():
        return 0
    _, want = _contents(reference)
    with EpisodeReader(store) as reader:
        index = reader.index()
        assert reader.n_decisions == int(index["length"].sum()) == 3 * reader.n_episodes
        for i in range(reader.n_episodes):
            assert_same_episode(reader.episode(i), want[reader.episode_meta(i)["id"]])
        return reader.n_episodes


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """The run collected one episode at a time."""
    store = tmp_path_factory.mktemp("reference") / "lone.h5"
    _collect(store, "--envs-per-worker", "1")
    _, episodes = _contents(store)
    stages = {name for e in episodes.values() for s in e.seeds for name, _ in s.stages}
    assert len(episodes) == 12 and stages >= {"TRAINING", "BLENDING", "CULLED"}
    return store


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--envs-per-worker", "5"], ["--envs-per-worker", "12"],
                                   ["--workers", "2", "--envs-per-worker", "3"]], ids=["5", "12", "2x3"])
def test_collect_stores_the_same_episodes_at_any_width_and_worker_count(tmp_path, reference, extra):
    store = tmp_path / "s.h5"
    _collect(store, *extra)
    _assert_same_stores(store, reference)


@pytest.mark.slow
def test_sigkill_during_a_batched_collect_keeps_every_committed_episode_and_resumes_exactly(tmp_path, reference):
    store = tmp_path / "s.h5"
    args = [*RUN, "--store", str(store), "--envs-per-worker", "3"]  # four batches of three
    kept = []
    # at start-up, mid-batch, just as a batch commits, a little after
    for wait_for, extra_delay in ((0, 0.05), (1, 0.0), (3, 0.1), (6, 0.0), (7, 0.3)):
        proc = simic_process(*args)
        if wait_for:
            wait_for_episodes(store, min(max(committed_episodes(store) + 1, wait_for), 12), proc, timeout=300)
        time.sleep(extra_delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kept.append(_assert_committed_are_the_references(store, reference))
    assert kept == sorted(kept) and any(0 < n < 12 for n in kept), kept  # killed with a run half done
    # the same command completes the run; batches made of what is missing give the same episodes
    _collect(store, "--envs-per-worker", "3")
    _assert_same_stores(store, reference)


@pytest.mark.slow
def test_ctrl_c_during_a_batched_collect_keeps_every_committed_episode_and_resumes_exactly(tmp_path, reference):
    store = tmp_path / "s.h5"
    proc = simic_process(*RUN, "--store", str(store), "--envs-per-worker", "2")
    wait_for_episodes(store, 2, proc, timeout=300)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert "Interrupted" in stderr and "Traceback" not in stderr
    kept = _assert_committed_are_the_references(store, reference)
    assert 2 <= kept < 12 and f"{kept} new episodes committed" in stderr
    _collect(store, "--envs-per-worker", "3")
    _assert_same_stores(store, reference)
