"""Collecting episodes into a store: the sequence `simic collect` and every DAgger round share.

A run is identified by (config, policy, seed) and holds episodes 0..N-1; `collect_episodes` asks
the store which of them are missing, runs only those through the episode runner (in this
process, on worker processes or on Ray) and commits each as it arrives. Re-running after an
interruption therefore completes a run instead of duplicating it.

The caller owns the open `EpisodeWriter` (and so the store lock, recovery and closing) and the
open runner (one per command, shared by every collection it makes), and sees progress through
callbacks. Failures are the runner's: `JobFailed` propagates (every episode
committed before it stands), and episodes whose worker died on every attempt come back in
`CollectResult.lost` for the caller to report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..contracts import Episode, EpisodeConfig
from .runner import BaseRunner, EpisodeJob, LostJob, SerialRunner

if TYPE_CHECKING:
    from ..data.store import EpisodeWriter


@dataclass(frozen=True)
class CollectConfig:
    """One collection: which run (config, policy, seed), how many episodes, how each is built."""

    episode: EpisodeConfig
    policy: str  # registered name of the policy that drives
    seed: int  # run seed; episode i uses the seed derived from (seed, i)
    episodes: int  # the run holds episodes 0..episodes-1
    version: str  # recorded in every episode (the caller resolves it once)
    options: Mapping[str, Any] = field(default_factory=dict)  # the policy factory's (checkpoint= as `Weights`)
    expert: str | None = None  # DAgger: a policy asked for a label at every decision
    threads: int = 1  # torch CPU threads per episode


@dataclass(frozen=True)
class CollectResult:
    """What one collection did: episodes committed now, those the store already held, the lost."""

    added: int
    present: int
    lost: list[LostJob] = field(default_factory=list)


def collect_episodes(
    writer: EpisodeWriter, runner: BaseRunner, plan: CollectConfig, *, agent: Any = None, strict: bool = False,
    on_start: Callable[[int, str | None], None] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
) -> CollectResult:
    """Run the episodes 0..`plan.episodes`-1 of `plan.seed` that the store lacks, on `runner`, and
    commit each one.

    `agent`, a `plan.policy` instance already built with `plan.options`, drives the first episode
    when the runner runs in this process (no second build). `on_start(todo, parallel)` is called
    once before any episode runs, with the number of episodes to run and, when they run in
    parallel, the runner's description (None in this process or when nothing runs);
    `on_episode(episode)` after each commit. Raises `JobFailed` (a policy failed; the episodes
    committed before it stand), and with `strict` also when an episode is lost; before any
    episode runs, `EngineMismatchError` when the store holds another engine's episodes.
    """
    writer.require_engine(plan.episode.engine)  # before any episode runs: a store holds one engine's
    todo = writer.missing(plan.episode.key(plan.policy), plan.seed, plan.episodes)
    present = plan.episodes - len(todo)
    if not todo:
        if on_start is not None:
            on_start(0, None)
        return CollectResult(0, present)
    # A generator, like `todo`: the runner draws jobs as workers free up, never all at once.
    jobs = (EpisodeJob(policy=plan.policy, config=plan.episode, seed=plan.seed, index=i,
                       policy_options=dict(plan.options), policy_version=plan.version, threads=plan.threads,
                       expert=plan.expert) for i in todo)
    serial = isinstance(runner, SerialRunner)
    if serial and agent is not None:
        runner.context.adopt(plan.policy, plan.options, agent)
    if on_start is not None:
        on_start(len(todo), None if serial else runner.describe())
    added = 0
    lost_before = len(runner.lost)
    for _job, episode in runner.run(jobs, strict=strict):
        writer.append(episode)
        added += 1
        if on_episode is not None:
            on_episode(episode)
    return CollectResult(added, present, list(runner.lost[lost_before:]))
