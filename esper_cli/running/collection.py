"""Collecting episodes into a store: the sequence `simic collect` and every DAgger round share.

A run is identified by (config, policy, seed) and holds episodes 0..N-1; `collect_episodes` asks
the store which of them are missing, runs only those through the episode runner (in this
process, on worker processes or on Ray) and commits each as it arrives. Re-running after an
interruption therefore completes a run instead of duplicating it.

The caller owns the open `EpisodeWriter` (and so the store lock, recovery and closing), and sees
progress through callbacks. Failures are the runner's: `JobFailed` propagates (every episode
committed before it stands), and episodes whose worker died on every attempt come back in
`CollectResult.lost` for the caller to report.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..contracts import Episode, EpisodeConfig
from ..plugins import Registry
from .runner import DEFAULT_RETRIES, EpisodeJob, LostJob, SerialRunner, make_runner

if TYPE_CHECKING:
    from ..data.store import EpisodeWriter


@dataclass(frozen=True)
class CollectResult:
    """What one collection did: episodes committed now, those the store already held, the lost."""

    added: int
    present: int
    lost: list[LostJob] = field(default_factory=list)


def collect_episodes(
    writer: EpisodeWriter, registry: Registry, config: EpisodeConfig, *,
    policy: str, seed: int, episodes: int, version: str,
    options: Mapping[str, Any] | None = None, expert: str | None = None, threads: int = 1,
    agent: Any = None,
    backend: str = "local", workers: int | None = None, ray_address: str | None = None,
    retries: int = DEFAULT_RETRIES, on_event: Callable[[str], None] | None = None,
    on_start: Callable[[int, str | None], None] | None = None,
    on_episode: Callable[[Episode], None] | None = None,
) -> CollectResult:
    """Run the episodes 0..`episodes`-1 of `seed` that the store lacks and commit each one.

    `agent`, a `policy` instance already built with `options`, drives the first episode when the
    episodes run in this process (no second build). `on_start(todo, parallel)` is called once
    before any episode runs, with the number of episodes to run and, when they run in parallel,
    the runner's description (None in this process or when nothing runs); `on_episode(episode)`
    after each commit. Raises `BackendUnavailable` (no runner) and `JobFailed` (a policy failed;
    the episodes committed before it stand).
    """
    options = dict(options or {})
    todo = writer.missing(config.key(policy), seed, episodes)
    present = episodes - len(todo)
    if not todo:
        if on_start is not None:
            on_start(0, None)
        return CollectResult(0, present)
    # A generator, like `todo`: the runner draws jobs as workers free up, never all at once.
    jobs = (EpisodeJob(policy=policy, config=config, seed=seed, index=i, policy_options=options,
                       policy_version=version, threads=threads, expert=expert) for i in todo)
    runner = make_runner(backend, workers, ray_address=ray_address, registry=registry, retries=retries,
                         on_event=on_event)
    added = 0
    with runner:
        serial = isinstance(runner, SerialRunner)
        if serial and agent is not None:
            runner.context.adopt(policy, options, agent)
        if on_start is not None:
            on_start(len(todo), None if serial else runner.describe())
        for episode in runner.run(jobs):
            writer.append(episode)
            added += 1
            if on_episode is not None:
                on_episode(episode)
    return CollectResult(added, present, list(runner.lost))
