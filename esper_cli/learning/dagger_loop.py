"""DAgger (Ross et al., 2011) for a learned Tamiyo: collect, train, compare, repeat.

Behaviour cloning learns from the expert's own trajectories, so once the learner acts it drifts
into states the expert never visited. DAgger lets the learner act (mixed with the expert by
`beta`) and stores the expert's action at every visited state as the label; training on the
aggregated store teaches the learner what to do where it actually goes.

Round 0 trains on the store as it is (collecting expert episodes first if it is empty); each
round r >= 1 collects `episodes_per_round` episodes driven by round r-1's learner mixed with the
expert (beta_r = beta * decay^(r-1)), retrains on the whole store, and compares learner and
expert closed loop on held-out paired seeds (`eval_seed`): on-policy agreement and the paired
accuracy difference per round.

`run_dagger(config, registry, progress)` runs the rounds and returns one result per round;
`DaggerProgress` is how a caller (the `simic dagger` command draws progress bars) follows it.
Given a run state file, it saves where it stands after every round and continues from a saved
state (`learning.dagger_state`), so a killed run resumes at its next round.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from ..contracts import EpisodeConfig, episode_rng_seed
from ..data.store import EpisodeReader, EpisodeWriter, check_store_engine
from ..evaluation.comparison import (
    ComparisonConfig,
    PolicyRuns,
    PolicySpec,
    closed_loop_summary,
    held_out_seed,
    resolve_specs,
    run_comparison,
)
from ..plugins import Registry
from ..running.collection import CollectConfig, collect_episodes
from ..running.runner import DEFAULT_ENVS_PER_WORKER, BaseRunner, make_runner
from ..running.weights import checkpoint_options
from .dagger_state import DaggerResume, save_dagger_state
from .training import EpochStats, TrainConfig, train_policy

#: Where the comparison's run seeds start by default, away from the small seeds rounds collect with.
EVAL_SEED_START = 1000


def _nothing(*_: Any) -> None:
    return None


@dataclass
class DaggerProgress:
    """What `run_dagger` reports as it works; every callback does nothing unless given.

    A round is a sequence of stages (collect, train, compare), each announced by `on_stage`;
    `on_episode` and `on_train_epoch` count steps of the stage under way.
    """

    on_stage: Callable[[str, int], None] = _nothing  # a stage begins: its description, its planned steps
    on_episode: Callable[[], None] = _nothing  # one episode of a collect or compare stage finished
    on_train_epoch: Callable[[EpochStats], None] = _nothing  # training finished an epoch
    on_trained: Callable[[int], None] = _nothing  # training ran this many epochs
    on_round: Callable[[dict[str, Any]], None] = _nothing  # a round finished: its result
    log: Callable[[str], None] = _nothing  # a warning worth showing the user (one line, plain text)


@dataclass(frozen=True)
class DaggerConfig:
    """One DAgger run: who learns from whom, where the data and checkpoints go, how much of each."""

    policy: str  # the trainable learner (mlp, gru, ...)
    expert: str  # the policy whose actions are the labels
    episode: EpisodeConfig  # the episodes' config, without the DAgger fields (each round sets them)
    store: Path  # the aggregated episode store
    checkpoint: Path  # the final checkpoint; each round keeps its own next to it (`round_checkpoint`)
    rounds: int = 3  # rounds after round 0
    beta: float = 0.5  # round 1's probability that the expert's action is applied
    beta_decay: float = 0.5
    episodes_per_round: int = 10
    bootstrap_episodes: int = 50  # expert episodes collected first when the store is empty
    seed: int = 0  # run seed of the bootstrap episodes; round r collects with seed + r
    eval_seed: int | None = None  # run seed of the comparisons; None: the first held out (`avoided_rng_seeds`)
    compare_episodes: int = 5
    train_epochs: int = 1000
    train_seed: int = 0
    allow_missing_classes: bool = False
    workers: int | None = None
    backend: str = "local"  # where episodes run: local or ray
    ray_address: str | None = None  # the Ray cluster to join (backend ray); None: start a local one
    threads: int = 1
    envs_per_worker: int = DEFAULT_ENVS_PER_WORKER  # episodes a worker steps together

    def beta_of(self, r: int) -> float | None:
        """Round r's beta (None for round 0, which only trains)."""
        return None if r == 0 else self.beta * self.beta_decay ** (r - 1)


def store_episodes(path: Path) -> tuple[int, int]:
    """(episodes, decisions) committed in a store; (0, 0) when it does not exist yet."""
    if not path.exists():
        return 0, 0
    with EpisodeReader(path) as reader:
        return reader.n_episodes, reader.n_decisions


def store_rng_seeds(path: Path, task: str) -> set[int]:
    """RNG seeds of the `task` episodes committed in a store (empty when it does not exist yet)."""
    if not path.exists():
        return set()
    with EpisodeReader(path) as reader:
        metas = (reader.episode_meta(i) for i in range(reader.n_episodes))
        return {int(m["rng_seed"]) for m in metas if m["config"]["task"] == task}


def round_checkpoint(final: Path, r: int) -> Path:
    """Where round `r` keeps its checkpoint: next to the final one."""
    return final.with_name(f"{final.stem}.dagger-r{r}{final.suffix}")


def avoided_rng_seeds(cfg: DaggerConfig) -> set[int]:
    """RNG seeds the comparisons must stay off: every round trains on the whole store, so a
    comparison on an episode in it, or on one a round is about to collect, measures training data."""
    seeds = store_rng_seeds(cfg.store, cfg.episode.task)
    planned = [(cfg.seed, cfg.bootstrap_episodes)] if store_episodes(cfg.store)[0] == 0 else []
    planned += [(cfg.seed + r, cfg.episodes_per_round) for r in range(1, cfg.rounds + 1)]
    return seeds | {episode_rng_seed(s, i) for s, n in planned for i in range(n)}


def run_dagger(cfg: DaggerConfig, registry: Registry, progress: DaggerProgress | None = None,
               runner: BaseRunner | None = None, *, state: Path | None = None,
               resume: DaggerResume | None = None) -> list[dict[str, Any]]:
    """Run round 0 (bootstrap if the store is empty, train, compare) and rounds 1..`cfg.rounds`
    (collect with the learner mixed with the expert, train, compare); one result per round.

    Every episode runs on `runner`, or on one runner opened from `cfg` for the whole run.
    Every episode is committed as it arrives and every round writes its checkpoint
    (`round_checkpoint`), so an interrupted run keeps its work. With `state`, the run state is
    written there before any work and after every round; `resume` (`load_dagger_state` of it)
    continues a saved run at its next round, returning its completed rounds' results first.
    Raises `CompareError` (a policy cannot be built), `DataError` / `CheckpointError`
    (training), `StoreError` (`EngineMismatchError` before any work when rounds would append to a
    store of another engine's episodes) and `JobFailed`.
    """
    progress = progress or DaggerProgress()
    with ExitStack() as stack:
        if runner is None:
            runner = stack.enter_context(make_runner(cfg.backend, cfg.workers, ray_address=cfg.ray_address,
                                                     registry=registry, envs_per_worker=cfg.envs_per_worker))
        return _rounds(cfg, registry, progress, runner, state, resume)


def _rounds(cfg: DaggerConfig, registry: Registry, progress: DaggerProgress, runner: BaseRunner,
            state: Path | None, resume: DaggerResume | None) -> list[dict[str, Any]]:
    if cfg.rounds >= max(len(resume.results) if resume is not None else 0, 1):
        # Rounds to come append to the store: refused before any work (round 0 trains and compares)
        # when it holds another engine's episodes.
        check_store_engine(cfg.store, cfg.episode.engine)
    if resume is None:
        if cfg.eval_seed is None:
            cfg = replace(cfg, eval_seed=held_out_seed(avoided_rng_seeds(cfg), cfg.compare_episodes, EVAL_SEED_START))
        resume = DaggerResume(eval_seed=int(cfg.eval_seed or 0), bootstrap=store_episodes(cfg.store)[0] == 0,
                              results=[])
        if state is not None:  # before any work: a kill during the bootstrap resumes the same plan
            save_dagger_state(state, cfg, resume)
    else:
        cfg = replace(cfg, eval_seed=resume.eval_seed)
    _, expert_versions = resolve_specs([cfg.expert], registry, None)
    results = list(resume.results)
    if resume.bootstrap and not results:  # resumes per episode, like every collect stage
        plan = CollectConfig(episode=cfg.episode, policy=cfg.expert, seed=cfg.seed, episodes=cfg.bootstrap_episodes,
                             version=expert_versions[cfg.expert], threads=cfg.threads)
        _collect(cfg, runner, progress, plan, f"round 0: collect {cfg.expert}")
    expert_runs: PolicyRuns | None = None  # run again by the first round this call runs (it is seeded)
    # Replaced by each round's; round r >= 1 collects with round r-1's.
    ckpt = Path(results[-1]["checkpoint"]) if results else cfg.checkpoint
    for r in range(len(results), cfg.rounds + 1):
        if r > 0:
            _collect_with_learner(cfg, registry, runner, progress, r, ckpt)
        ckpt, metrics = _train(cfg, registry, progress, r)
        runs = _compare(cfg, registry, runner, progress, r, ckpt, expert_versions, with_expert=expert_runs is None)
        if expert_runs is None:
            expert_runs = runs[cfg.expert]
        result = _round_result(cfg, r, ckpt, metrics, expert_runs, runs[cfg.policy])
        results.append(result)
        progress.on_round(result)  # before the state: a kill in between runs (and logs) the round again
        if state is not None:
            save_dagger_state(state, cfg, replace(resume, results=results))
    return results


def _learner(cfg: DaggerConfig, registry: Registry, ckpt: Path) -> tuple[PolicySpec, str]:
    """The learner of checkpoint `ckpt` and its version."""
    _, versions = resolve_specs([f"{cfg.policy}={ckpt}"], registry, None)
    return PolicySpec(cfg.policy, str(ckpt), label=cfg.policy), versions[cfg.policy]


def _collect(cfg: DaggerConfig, runner: BaseRunner, progress: DaggerProgress, plan: CollectConfig,
             description: str) -> None:
    """Add the missing episodes of `plan` to the store (a lost one fails the run)."""
    with EpisodeWriter(cfg.store, engine=cfg.episode.engine) as writer:
        collect_episodes(writer, runner, plan, strict=True,
                         on_start=lambda todo, _parallel: progress.on_stage(description, todo),
                         on_episode=lambda _episode: progress.on_episode())


def _collect_with_learner(cfg: DaggerConfig, registry: Registry, runner: BaseRunner, progress: DaggerProgress,
                          r: int, ckpt: Path) -> None:
    """Round r's episodes: the learner of `ckpt` acts, mixed with the expert by round r's beta."""
    beta = cfg.beta_of(r)
    _, version = _learner(cfg, registry, ckpt)
    plan = CollectConfig(episode=replace(cfg.episode, expert=cfg.expert, beta=float(beta)), policy=cfg.policy,
                         seed=cfg.seed + r, episodes=cfg.episodes_per_round, version=version,
                         options=checkpoint_options(ckpt, cfg.policy), expert=cfg.expert, threads=cfg.threads)
    _collect(cfg, runner, progress, plan, f"round {r}: collect {cfg.policy}+{cfg.expert} beta {beta:.3g}")


def _train(cfg: DaggerConfig, registry: Registry, progress: DaggerProgress, r: int) -> tuple[Path, dict[str, Any]]:
    """Round r's learner, trained on the whole store: (its checkpoint, training metrics)."""
    progress.on_stage(f"round {r}: train {cfg.policy}", cfg.train_epochs)
    training = TrainConfig(cfg.policy, epochs=cfg.train_epochs, seed=cfg.train_seed,
                           allow_missing_classes=cfg.allow_missing_classes)
    ckpt, metrics = train_policy(cfg.store, training, out=round_checkpoint(cfg.checkpoint, r), registry=registry,
                                 on_epoch=progress.on_train_epoch, log=progress.log)
    progress.on_trained(metrics["epochs_run"])
    return ckpt, metrics


def _compare(cfg: DaggerConfig, registry: Registry, runner: BaseRunner, progress: DaggerProgress, r: int, ckpt: Path,
             expert_versions: dict[str, str], *, with_expert: bool) -> dict[str, PolicyRuns]:
    """Closed-loop runs of round r's learner (and of the expert, the first time) on the eval seed."""
    learner, version = _learner(cfg, registry, ckpt)
    specs = [PolicySpec(cfg.expert, label=cfg.expert), learner] if with_expert else [learner]
    progress.on_stage(f"round {r}: compare {cfg.expert} vs {cfg.policy}", cfg.compare_episodes * len(specs))
    plan = ComparisonConfig(specs=tuple(specs), versions={**expert_versions, cfg.policy: version},
                            episode=cfg.episode, episodes=cfg.compare_episodes, seed=int(cfg.eval_seed or 0),
                            mode="closed-loop", expert=cfg.expert, threads=cfg.threads)
    runs, _ = run_comparison(plan, runner, on_episode=lambda _label, _episode: progress.on_episode())
    return runs


def _round_result(cfg: DaggerConfig, r: int, ckpt: Path, metrics: dict[str, Any], expert_runs: PolicyRuns,
                  learner_runs: PolicyRuns) -> dict[str, Any]:
    """One round's entry of the report: the store after it, training, and the paired comparison."""
    summary = closed_loop_summary({cfg.expert: expert_runs, cfg.policy: learner_runs}, cfg.expert)
    learner = summary[cfg.policy]
    n_eps, n_dec = store_episodes(cfg.store)
    return {
        "round": r, "beta": cfg.beta_of(r), "store_episodes": n_eps, "store_decisions": n_dec,
        "checkpoint": str(ckpt), "val_balanced_accuracy": metrics["val"]["balanced_accuracy"],
        "val_classes_without_support": metrics["val"]["classes_without_support"],
        "on_policy_agreement": learner["expert_agreement"],
        "expert_labelled_decisions": learner["expert_labelled_decisions"],
        "final_accuracy_diff_mean": learner["final_accuracy_diff_mean"],
        "final_accuracy_diff_ci95": learner["final_accuracy_diff_ci95"],
        "learner_final_accuracy_mean": learner["final_accuracy_mean"],
        "expert_final_accuracy_mean": summary[cfg.expert]["final_accuracy_mean"],
        "invalid_actions": learner["invalid_actions"],
    }
