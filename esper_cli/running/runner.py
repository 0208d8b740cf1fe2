"""Simic's episode runner: run many episodes in-process, on local worker processes, or on Ray.

Collection is embarrassingly parallel: every episode is a full morphogenetic training run that
depends only on (seed, index, config, policy). The runner ships picklable `EpisodeJob`s to
workers and yields each finished episode back to the caller with the job that ran it, as
`(job, episode)` in completion order: the job says which run, policy and draw it was, so no
caller needs to tag the episode.
The caller (the main process) is the one writer: it commits each episode to the store, so crash
safety and the store lock are the same whatever the backend.

    jobs = (EpisodeJob(policy="heuristic", config=config, seed=0, index=i) for i in todo)  # drawn lazily
    with make_runner(workers=4) as runner:          # or backend="ray", ray_address=...
        for job, episode in runner.run(jobs):       # strict=True: a lost episode raises JobFailed
            writer.append(episode)
    if runner.lost:                                 # workers that died more than `retries` times
        ...

Batches: a worker takes up to `envs_per_worker` jobs at a time and trains them together in the
fused engine (`simulation.engine`; jobs whose configs differ in what fixes the tensors' shapes
train in separate batches); with several workers the jobs left are shared evenly. An episode is
the same whichever jobs share its batch.

Workers: `workers=None` means the backend's whole capacity, never a guess: locally, one batch at
a time in this process; on Ray, as many tasks at a time as the cluster has CPUs (a local cluster
the runner starts gets every CPU of this machine).

Backends:
  serial  in this process (workers=1): no pickling, no start-up cost, the easiest to debug.
  local   worker processes on this machine (`spawn`: a fresh interpreter, safe with torch threads
          and CUDA); each builds the plugin registry itself, so installed policy plugins work.
  ray     Ray tasks on an existing cluster (`ray_address`), or on a local one started (and shut
          down) by the runner; needs the `ray` extra: pip install "simic[ray]".

Failures:
  * A worker that dies (killed, segfault, out of memory, node lost) loses only its batch: each job
    of it is re-run up to `retries` times, then recorded in `runner.lost` and the run goes on; with
    `run(jobs, strict=True)` the run then raises `JobFailed` naming the lost episodes.
  * A `PolicyError` (the policy raised or answered nonsense) is deterministic: never retried. It
    fails its own episode only; the runner stops handing out work, yields the episodes still
    finishing (the rest of its batch included), then raises `JobFailed`.
    Any other exception in a worker does the same (`JobFailed.traceback` holds the worker's).
  * KeyboardInterrupt: leaving the `with` block terminates the workers (or cancels the Ray
    tasks); every episode already yielded is the caller's.

Determinism: a job builds its policy fresh for its episode (nothing carries over from an earlier
episode on the same worker) and sets its own torch thread count, so 1 worker, N workers, Ray and
any batch width give identical episodes for the same (seed, index, config, policy).

Weights: a learned policy's checkpoint travels with its job as `Weights` (see `weights`): bytes to
local workers, on Ray one object-store entry per version; no worker opens a driver's path.

Other commands reuse this: `simic compare` runs jobs for several policies through one runner
(shadow policies ride on the driver's jobs as `EpisodeJob.observers`); DAgger collection sets
`EpisodeJob.expert`; a caller can pass its own `fn(job, context) -> Episode` (a module-level
function, so workers can import it) to `runner.run(jobs, fn=...)`, run job by job.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import traceback
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import wait as mp_wait
from typing import Any

from ..contracts import Episode, EpisodeConfig
from ..plugins import Registry, build_registry
from ..simulation.environment import SHARED_FIELDS
from ..simulation.episode import EpisodeSpec, PolicyError, run_episodes
from .threads import use_threads
from .weights import loaded

BACKENDS = ("local", "ray")
DEFAULT_RETRIES = 2
#: Episodes a worker steps together (`--envs-per-worker`). `bench/bench_engine.py` on the default
#: task (2-core CPU machine, heuristic driving): 4.3x the episodes per core-second of width 1 at
#: 64, 4.8x at 128 for twice the peak memory and half as many progress updates; 64 is the default.
DEFAULT_ENVS_PER_WORKER = 64


class BackendUnavailable(Exception):
    """The requested backend cannot be used here (e.g. Ray is not installed); one-line message."""


@dataclass(frozen=True)
class EpisodeJob:
    """Everything a worker needs to run one episode; picklable, small, self-contained."""

    policy: str  # registered policy name
    config: EpisodeConfig
    seed: int
    index: int
    policy_options: Mapping[str, Any] = field(default_factory=dict)  # factory kwargs; checkpoint= as `Weights`
    policy_version: str = ""  # recorded in the episode; the main process resolves it once
    threads: int = 1  # torch CPU threads inside the worker
    expert: str | None = None  # DAgger: a policy asked for a label at every decision
    expert_options: Mapping[str, Any] = field(default_factory=dict)
    #: Shadow mode: (label, policy, options) of policies asked on the same observations, never applied.
    observers: tuple[tuple[str, str, Mapping[str, Any]], ...] = ()
    #: The caller's own name for the job (a comparison: the policy's label); never read by a worker.
    tag: Any = None

    @property
    def label(self) -> str:
        return f"episode {self.index} (seed {self.seed})"


@dataclass(frozen=True)
class LostJob:
    """A job whose worker died on every attempt."""

    job: EpisodeJob
    attempts: int
    reason: str


class JobFailed(Exception):
    """A job failed deterministically (its policy raised, or the code did); the run stopped."""

    def __init__(self, job: EpisodeJob, message: str, *, policy_error: bool, traceback: str | None = None):
        super().__init__(message)
        self.job = job
        self.policy_error = policy_error
        self.traceback = traceback


# ------------------------------------------------------------------------------ worker side
class WorkerContext:
    """Per-process state of a worker: the plugin registry (plugins load in every process)."""

    def __init__(self, registry: Registry | None = None) -> None:
        self._registry = registry
        self._adopted: list[tuple[str, Mapping[str, Any], Any]] = []

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            self._registry = build_registry()
        return self._registry

    def adopt(self, name: str, options: Mapping[str, Any], policy: Any) -> None:
        """Use an already-built, never-run `policy` for the next episode of `name` (in-process)."""
        self._adopted.append((name, dict(options), policy))

    def policy(self, name: str, options: Mapping[str, Any]) -> Any:
        """A fresh policy for one episode: nothing carries over from the worker's last episode.

        Shipped `Weights` among the options reach the factory as the checked `Checkpoint`."""
        for i, (adopted_name, adopted_options, adopted) in enumerate(self._adopted):
            if adopted_name == name and adopted_options == dict(options):
                del self._adopted[i]
                return adopted
        factory = self.registry.policies.get(name)
        if factory is None:
            raise PolicyError(f"policy '{name}' is not registered in this worker "
                              "(is its plugin installed on every machine?)")
        try:
            return factory(**loaded(options))
        except Exception as exc:
            raise PolicyError(f"policy '{name}' could not be created: {exc}") from exc


_PROCESS_CONTEXT: WorkerContext | None = None


def process_context() -> WorkerContext:
    """This worker process's context (built on first use, kept for the process's life)."""
    global _PROCESS_CONTEXT
    if _PROCESS_CONTEXT is None:
        _PROCESS_CONTEXT = WorkerContext()
    return _PROCESS_CONTEXT


def _spec(job: EpisodeJob, context: WorkerContext) -> EpisodeSpec:
    """The job's episode with its policies built fresh (PolicyError if one cannot be)."""
    policy = context.policy(job.policy, job.policy_options)
    expert = context.policy(job.expert, job.expert_options) if job.expert is not None else None
    observers = {label: context.policy(name, options) for label, name, options in job.observers} or None
    return EpisodeSpec(policy, job.config, job.seed, job.index, job.policy, job.policy_version,
                       expert, job.expert if expert is not None else None, observers)


def run_jobs(jobs: Sequence[EpisodeJob], context: WorkerContext | None = None) -> list[tuple]:
    """Run jobs as few batches of the fused engine (jobs whose configs share the engine's
    `SHARED_FIELDS` and thread count step together); one outcome per job, in order:
    ("ok", episode) | ("policy", message, None) | ("error", message, traceback).

    Each episode is a pure function of its job: the same whichever jobs share its batch."""
    context = context or process_context()
    outcomes: list[tuple | None] = [None] * len(jobs)
    batches: dict[tuple, list[int]] = {}
    for i, job in enumerate(jobs):
        batches.setdefault((tuple(getattr(job.config, f) for f in SHARED_FIELDS), job.threads), []).append(i)
    for (_, threads), members in batches.items():
        use_threads(threads)
        task = context.registry.tasks.get(jobs[members[0]].config.task)
        specs, where = [], []
        for i in members:
            try:
                if task is None:
                    raise PolicyError(f"task '{jobs[i].config.task}' is not registered in this worker "
                                      "(is its plugin installed on every machine?)")
                specs.append(_spec(jobs[i], context))
                where.append(i)
            except PolicyError as exc:
                outcomes[i] = ("policy", str(exc), None)
        if not specs:
            continue
        try:
            results = run_episodes(specs, task=task, blueprints=context.registry.blueprints)  # type: ignore[arg-type]
        except Exception as exc:
            tb = traceback.format_exc()
            for i in where:
                outcomes[i] = ("error", f"{type(exc).__name__}: {exc}", tb)
            continue
        for i, result in zip(where, results):
            outcomes[i] = ("policy", str(result), None) if isinstance(result, PolicyError) else ("ok", result)
    return outcomes  # type: ignore[return-value]


def run_job(job: EpisodeJob, context: WorkerContext | None = None) -> Episode:
    """Run one episode: a pure function of the job (same job, same episode, on any worker)."""
    kind, *rest = run_jobs([job], context)[0]
    if kind == "policy":
        raise PolicyError(rest[0])
    if kind == "error":
        raise RuntimeError(rest[0])
    return rest[0]


#: A caller's own job function, `fn(job, context) -> result`, run once per job (no batching).
JobFn = Callable[[EpisodeJob, WorkerContext], Episode]


def _execute_one(fn: JobFn, job: EpisodeJob, context: WorkerContext) -> tuple:
    """Run `fn` and turn the outcome into a message: ("ok", episode) | ("policy"|"error", msg, tb)."""
    try:
        return ("ok", fn(job, context))
    except PolicyError as exc:
        return ("policy", str(exc), None)
    except Exception as exc:
        return ("error", f"{type(exc).__name__}: {exc}", traceback.format_exc())


def _execute(fn: JobFn | None, jobs: Sequence[EpisodeJob], context: WorkerContext) -> list[tuple]:
    """One outcome per job: the fused engine for the default (`fn` None), else `fn` job by job."""
    if fn is None:
        return run_jobs(jobs, context)
    return [_execute_one(fn, job, context) for job in jobs]


def _worker_main(conn: Any) -> None:
    """A local worker process: receive (fn, job), send the outcome back, until told to stop."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops us
    context = process_context()
    while True:
        try:
            message = conn.recv()
        except (EOFError, OSError):  # the main process is gone: nothing to report to
            return
        if message is None:
            return
        fn, jobs = message
        outcomes = _execute(fn, jobs, context)
        try:
            conn.send(outcomes)
        except (BrokenPipeError, OSError):
            return
        except Exception as exc:
            conn.send(("error", f"could not send the result back: {type(exc).__name__}: {exc}",
                       traceback.format_exc()))


# ------------------------------------------------------------------------------ main side
class _Tracker:
    """Shared bookkeeping: retries, lost jobs, the first deterministic failure, events."""

    def __init__(self, retries: int, on_event: Callable[[str], None] | None) -> None:
        self.retries = retries
        self.on_event = on_event or (lambda message: None)
        self.attempts: dict[int, int] = {}
        self.lost: list[LostJob] = []
        self.failure: JobFailed | None = None
        self.retried = 0

    def died(self, n: int, job: EpisodeJob, reason: str) -> bool:
        """Record a worker death while running job `n`; True when the job should be re-run."""
        self.attempts[n] = self.attempts.get(n, 0) + 1
        if self.attempts[n] <= self.retries:
            self.retried += 1
            self.on_event(f"{reason} while running {job.label}; re-running it "
                          f"(retry {self.attempts[n]} of {self.retries})")
            return True
        self.lost.append(LostJob(job, self.attempts[n], reason))
        self.on_event(f"{reason} while running {job.label}; giving up on it after "
                      f"{self.attempts[n]} attempt(s)")
        return False

    def failed(self, job: EpisodeJob, outcome: tuple) -> None:
        kind, message, tb = outcome
        if kind == "error":
            message = f"{job.label} failed in a worker: {message}"
        if self.failure is None:
            self.failure = JobFailed(job, message, policy_error=kind == "policy", traceback=tb)


class BaseRunner:
    """What every backend offers: `run(jobs)` yields episodes; `lost` lists the jobs given up on.

    A worker takes up to `envs_per_worker` jobs at a time and steps them together (the fused
    engine); with several workers, the jobs left are shared evenly among them."""

    backend = "serial"
    parallelism = 1

    def __init__(self, *, retries: int = DEFAULT_RETRIES, on_event: Callable[[str], None] | None = None,
                 envs_per_worker: int = DEFAULT_ENVS_PER_WORKER) -> None:
        if envs_per_worker < 1:
            raise ValueError(f"envs per worker must be at least 1, got {envs_per_worker}")
        self._tracker = _Tracker(retries, on_event)
        self.envs_per_worker = envs_per_worker

    @property
    def lost(self) -> list[LostJob]:
        return self._tracker.lost

    @property
    def retried(self) -> int:
        return self._tracker.retried

    def run(self, jobs: Iterable[EpisodeJob], fn: JobFn | None = None, *,
            strict: bool = False) -> Iterator[tuple[EpisodeJob, Episode]]:
        """Run `jobs` (drawn lazily), yielding `(job, episode)` as each batch finishes.

        `fn(job, context)`, a caller's own module-level function, replaces the fused engine and
        runs job by job. A deterministic failure raises `JobFailed` once the episodes still
        finishing are yielded. A job whose worker died on every attempt is recorded in `lost`;
        with `strict`, the run then ends in `JobFailed` naming every episode this run lost.
        """
        before = len(self.lost)
        yield from self._run(jobs, fn)
        lost = self.lost[before:]
        if strict and lost:
            names = ", ".join(f"{x.job.policy} {x.job.label}: {x.reason}" for x in lost)
            raise JobFailed(lost[0].job, f"{len(lost)} episode(s) lost, their worker died on every attempt "
                                         f"({names})", policy_error=False)

    def _batch_size(self, pending: _JobQueue, idle: int = 1, fused: bool = True) -> int:
        """How many jobs the next worker takes: up to `envs_per_worker` (1 for a caller's own job
        function, which runs job by job), sharing what is left evenly among the `idle` workers
        about to take work."""
        width = self.envs_per_worker if fused else 1
        left = pending.available(width * max(self.parallelism, 1))
        return max(1, min(width, -(-left // max(idle, 1))))

    def _run(self, jobs: Iterable[EpisodeJob], fn: JobFn | None) -> Iterator[tuple[EpisodeJob, Episode]]:
        raise NotImplementedError

    def close(self) -> None:
        """Stop every worker (idempotent); work already yielded is the caller's."""

    def __enter__(self) -> BaseRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        return f"1 worker (in-process), {self.envs_per_worker} episodes at a time"


def _batch(pending: _JobQueue, size: int) -> list[tuple[int, EpisodeJob]]:
    return [pending.pop() for _ in range(min(size, pending.available(size)))]


class SerialRunner(BaseRunner):
    """Runs jobs in this process, a batch at a time (the default; today's `simic collect`)."""

    def __init__(self, registry: Registry | None = None, **kw: Any) -> None:
        super().__init__(**kw)
        self.context = WorkerContext(registry)

    def _run(self, jobs: Iterable[EpisodeJob], fn: JobFn | None) -> Iterator[tuple[EpisodeJob, Episode]]:
        if fn is not None:  # the caller's own function, job by job; its errors reach it as they are
            for job in jobs:
                try:
                    yield job, fn(job, self.context)
                except PolicyError as exc:
                    raise JobFailed(job, str(exc), policy_error=True) from exc
            return
        pending = _JobQueue(jobs)
        tracker = self._tracker
        while pending and tracker.failure is None:
            batch = _batch(pending, self._batch_size(pending))
            for (_, job), outcome in zip(batch, run_jobs([job for _, job in batch], self.context)):
                if outcome[0] == "ok":
                    yield job, outcome[1]
                else:
                    tracker.failed(job, outcome)
        if tracker.failure is not None:
            failure, tracker.failure = tracker.failure, None
            raise failure


class _JobQueue:
    """The caller's jobs, numbered and drawn lazily; a job to re-run goes to the front.

    Never lists the whole iterable: a run of a billion episodes holds only the jobs in flight
    (and the few drawn ahead), so memory does not grow with the size of the plan.
    """

    def __init__(self, jobs: Iterable[EpisodeJob]) -> None:
        self._source = enumerate(jobs)
        self._ready: deque[tuple[int, EpisodeJob]] = deque()

    def available(self, n: int) -> int:
        """How many jobs are left, counted up to `n` (draws at most `n` ahead)."""
        while len(self._ready) < n:
            item = next(self._source, None)
            if item is None:
                break
            self._ready.append(item)
        return len(self._ready)

    def __bool__(self) -> bool:
        return self.available(1) > 0

    def pop(self) -> tuple[int, EpisodeJob]:
        """The next job (a re-run first); IndexError when none is left."""
        self.available(1)
        return self._ready.popleft()

    def retry(self, item: tuple[int, EpisodeJob]) -> None:
        self._ready.appendleft(item)


@dataclass
class _Slot:
    proc: Any
    conn: Any
    batch: list[tuple[int, EpisodeJob]] = field(default_factory=list)


class ProcessRunner(BaseRunner):
    """Local worker processes, one batch at a time each; the main process stays the writer."""

    backend = "local"

    def __init__(self, workers: int, *, start_method: str = "spawn", **kw: Any) -> None:
        super().__init__(**kw)
        self.parallelism = max(1, int(workers))
        self._mp = multiprocessing.get_context(start_method)
        self._slots: list[_Slot] = []

    def describe(self) -> str:
        return f"{self.parallelism} local worker processes, up to {self.envs_per_worker} episodes at a time each"

    def _start_worker(self) -> _Slot:
        parent, child = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(target=_worker_main, args=(child,), daemon=True, name="simic-worker")
        proc.start()
        child.close()
        return _Slot(proc, parent)

    def _replace(self, slot: _Slot) -> None:
        self._stop(slot)
        self._slots[self._slots.index(slot)] = self._start_worker()

    @staticmethod
    def _stop(slot: _Slot, timeout: float = 2.0) -> None:
        if slot.proc.is_alive():
            slot.proc.terminate()
        slot.proc.join(timeout)
        if slot.proc.is_alive():
            slot.proc.kill()
            slot.proc.join()
        slot.conn.close()

    def _run(self, jobs: Iterable[EpisodeJob], fn: JobFn | None) -> Iterator[tuple[EpisodeJob, Episode]]:
        tracker = self._tracker
        pending = _JobQueue(jobs)
        while len(self._slots) < min(self.parallelism, pending.available(self.parallelism)):
            self._slots.append(self._start_worker())

        def dispatch() -> None:
            for slot in self._slots:
                if not slot.batch and pending and tracker.failure is None:
                    idle = sum(not s.batch for s in self._slots)
                    slot.batch = _batch(pending, self._batch_size(pending, idle, fused=fn is None))
                    try:
                        slot.conn.send((fn, [job for _, job in slot.batch]))
                    except (BrokenPipeError, OSError):
                        pass  # the worker just died; its sentinel wakes the loop below

        dispatch()
        while any(slot.batch for slot in self._slots):
            busy = [slot for slot in self._slots if slot.batch]
            waitables: dict[Any, _Slot] = {}
            for slot in busy:
                waitables[slot.conn] = slot
                waitables[slot.proc.sentinel] = slot
            ready = mp_wait(list(waitables))
            finished: list[tuple[EpisodeJob, Episode]] = []
            for slot in {id(waitables[r]): waitables[r] for r in ready}.values():
                if not slot.batch:
                    continue
                outcomes = None
                try:
                    if slot.conn.poll():
                        outcomes = slot.conn.recv()
                except (EOFError, OSError):  # the pipe closed: the worker is dying
                    outcomes = None
                else:
                    if outcomes is None and slot.proc.sentinel not in ready:
                        continue  # nothing to read yet
                batch, slot.batch = slot.batch, []
                if outcomes is None:
                    slot.proc.join(2.0)
                    reason = f"worker process {slot.proc.pid} died ({_describe_exit(slot.proc.exitcode)})"
                    self._replace(slot)
                    for n, job in reversed(batch):
                        if tracker.died(n, job, reason):
                            pending.retry((n, job))
                    continue
                for (_, job), outcome in zip(batch, outcomes):
                    if outcome[0] == "ok":
                        finished.append((job, outcome[1]))
                    else:
                        tracker.failed(job, outcome)
            dispatch()  # keep the workers busy while the caller commits
            yield from finished
        if tracker.failure is not None:
            failure, tracker.failure = tracker.failure, None
            raise failure

    def close(self) -> None:
        slots, self._slots = self._slots, []
        for slot in slots:  # workers hold nothing worth a graceful exit: the main process writes
            if slot.proc.is_alive():
                slot.proc.terminate()
        for slot in slots:
            self._stop(slot)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "no exit code"
    if code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


def available_cpus() -> int:
    """CPUs this process may use (its affinity mask where the OS has one)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def parse_workers(value: str | int | None) -> int | None:
    """`--workers`: a positive integer or `auto` (= this machine's CPUs); None stays None."""
    if value is None:
        return None
    if isinstance(value, int):
        n = value
    elif value.strip().lower() == "auto":
        return available_cpus()
    else:
        try:
            n = int(value)
        except ValueError:
            raise ValueError(f"workers {value!r}: expected a positive number or 'auto'") from None
    if n < 1:
        raise ValueError(f"workers {value!r}: expected a positive number or 'auto'")
    return n


def __getattr__(name: str) -> Any:
    """`RayRunner` and `import_ray` live in `ray_backend`, which builds on this module's classes;
    imported on first use, so either module may be imported first (a Ray worker imports that one)."""
    if name in ("RayRunner", "import_ray", "RAY_INSTALL_HINT"):
        from . import ray_backend

        return getattr(ray_backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def make_runner(backend: str = "local", workers: int | None = None, *, ray_address: str | None = None,
                registry: Registry | None = None, retries: int = DEFAULT_RETRIES,
                on_event: Callable[[str], None] | None = None,
                envs_per_worker: int = DEFAULT_ENVS_PER_WORKER) -> BaseRunner:
    """The runner for a backend: `local` with 1 worker runs in-process (using `registry`).

    `workers=None` is the backend's whole capacity: in this process locally, every CPU of the
    cluster on Ray (see the module docstring)."""
    if backend == "ray":
        from .ray_backend import RayRunner

        return RayRunner(workers, ray_address, retries=retries, on_event=on_event, envs_per_worker=envs_per_worker)
    if backend != "local":
        raise ValueError(f"unknown backend {backend!r} (available: {', '.join(BACKENDS)})")
    kw: dict[str, Any] = dict(retries=retries, on_event=on_event, envs_per_worker=envs_per_worker)
    if (workers or 1) == 1:
        return SerialRunner(registry, **kw)
    return ProcessRunner(workers or 1, **kw)
