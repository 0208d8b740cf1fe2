"""The Ray backend of the episode runner: episodes as Ray tasks, on a cluster or a local one.

Weights travel through the object store: each checkpoint version a job carries is put there once
(`RayRunner._put`) and the tasks carry its reference, so a node that cannot see the driver's disk
runs any job. See `runner` for what every backend promises.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import replace
from typing import Any

from ..contracts import Episode
from .runner import (
    BackendUnavailable,
    BaseRunner,
    EpisodeJob,
    JobFn,
    _batch,
    _execute,
    _JobQueue,
    available_cpus,
    process_context,
)
from .weights import Weights, by_reference, shipped

RAY_INSTALL_HINT = 'pip install "simic[ray]" (or: pip install "ray>=2.9")'


def _ray_task(fn: JobFn | None, jobs: list[EpisodeJob]) -> list[tuple]:
    """The body of a Ray task, a batch of jobs (module-level, so Ray workers import it by name)."""
    return _execute(fn, jobs, process_context())


def import_ray() -> Any:
    """Import Ray quietly (no usage stats), or say how to install it."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError as exc:
        raise BackendUnavailable(f"the ray backend needs Ray, which is not installed ({exc}); "
                                 f"install the extra: {RAY_INSTALL_HINT}") from None
    return ray


class RayRunner(BaseRunner):
    """Episodes as Ray tasks (`num_cpus` = the job's torch threads), on a cluster or a local one."""

    backend = "ray"

    def __init__(self, workers: int | None = None, address: str | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        ray = self._ray = import_ray()
        self._owns = False
        self._in_flight: dict[Any, list[tuple[int, EpisodeJob]]] = {}
        self._weights: dict[str, Weights] = {}  # sha256 -> the version in the object store
        if not ray.is_initialized():
            common = dict(logging_level=logging.WARNING, log_to_driver=True)
            try:
                if address:
                    ray.init(address=address, **common)
                else:  # a private local cluster, offline, no dashboard
                    # address="local": without it Ray joins whatever cluster its address file
                    # names, even one that died without `ray stop`; a running one is joined only
                    # when asked (`ray_address`).
                    ray.init(address="local", num_cpus=workers or available_cpus(), include_dashboard=False, **common)
            except Exception as exc:
                where = f"the Ray cluster at {address}" if address else "a local Ray cluster"
                raise BackendUnavailable(f"could not start or reach {where}: {type(exc).__name__}: {exc}") from None
            self._owns = True
        cpus = int(ray.cluster_resources().get("CPU", 1))
        self.parallelism = max(1, workers or cpus)
        self._remote = ray.remote(_ray_task)

    def describe(self) -> str:
        where = "a local Ray cluster" if self._owns else "the Ray cluster"
        return f"{self.parallelism} Ray tasks at a time on {where}"

    def _put(self, weights: Weights) -> Weights:
        """The version in the object store (put there the first time it is seen)."""
        stored = self._weights.get(weights.sha256)
        if stored is None:
            stored = self._weights[weights.sha256] = by_reference(weights, self._ray.put(weights.data))
        return stored

    def _shipped(self, job: EpisodeJob) -> EpisodeJob:
        """`job` with every checkpoint it carries replaced by its object-store reference."""
        return replace(job, policy_options=shipped(job.policy_options, self._put),
                       expert_options=shipped(job.expert_options, self._put),
                       observers=tuple((label, name, shipped(options, self._put))
                                       for label, name, options in job.observers))

    def _run(self, jobs: Iterable[EpisodeJob], fn: JobFn | None) -> Iterator[tuple[EpisodeJob, Episode]]:
        ray, tracker = self._ray, self._tracker
        pending = _JobQueue(jobs)
        in_flight = self._in_flight

        def submit() -> None:
            while pending and len(in_flight) < self.parallelism and tracker.failure is None:
                batch = _batch(pending, self._batch_size(pending, self.parallelism - len(in_flight), fused=fn is None))
                threads = max(job.threads for _, job in batch)
                ref = self._remote.options(num_cpus=threads, max_retries=0).remote(
                    fn, [self._shipped(job) for _, job in batch])
                in_flight[ref] = batch

        submit()
        while in_flight:
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            finished: list[tuple[EpisodeJob, Episode]] = []
            for ref in ready:
                batch = in_flight.pop(ref)
                try:
                    outcomes = ray.get(ref)
                except ray.exceptions.RayTaskError as exc:  # the task itself raised (not our code)
                    cause = getattr(exc, "cause", None) or exc
                    outcomes = [("error", f"{type(cause).__name__}: {cause}", str(exc))] * len(batch)
                except ray.exceptions.RayError as exc:  # worker or node died, object lost, ...
                    reason = f"Ray worker lost ({type(exc).__name__})"
                    for n, job in reversed(batch):
                        if tracker.died(n, job, reason):
                            pending.retry((n, job))
                    continue
                for (_, job), outcome in zip(batch, outcomes):
                    if outcome[0] == "ok":
                        finished.append((job, outcome[1]))
                    else:
                        tracker.failed(job, outcome)
            submit()
            yield from finished
        if tracker.failure is not None:
            failure, tracker.failure = tracker.failure, None
            raise failure

    def close(self) -> None:
        ray = self._ray
        refs, self._in_flight = list(self._in_flight), {}
        for ref in refs:
            try:
                ray.cancel(ref, force=True)
            except Exception:
                pass
        self._weights = {}
        if self._owns and ray.is_initialized():
            ray.shutdown()
            self._owns = False
