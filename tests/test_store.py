"""The HDF5 episode store: round trip, commit protocol, locking, bad files, crash safety."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from episode_helpers import assert_same_episode, make_episode

from esper_cli.contracts import (
    N_FEATURES,
    Action,
    DecisionRecord,
    Episode,
    Outcome,
    SeedStage,
)
from esper_cli.data.store import (
    EpisodeReader,
    EpisodeWriter,
    NotAStoreError,
    StoreError,
    StoreLockedError,
)

REPO = Path(__file__).resolve().parents[1]


def committed(writer: EpisodeWriter, episodes: list[Episode], upto: int = 16) -> set[tuple[str, int, int]]:
    """(key, seed, index) of every index < `upto` of the runs of `episodes` that `writer` would not
    run again (its `missing` plan leaves them out): what the store has committed of those runs."""
    runs = {(e.key, e.seed) for e in episodes}
    return {(k, s, i) for k, s in runs for i in range(upto) if i not in writer.missing(k, s, upto)}


def write(path: Path, episodes: list[Episode]) -> None:
    with EpisodeWriter(path) as w:
        for ep in episodes:
            w.append(ep)


def run_python(code: str, **kwargs) -> subprocess.Popen:
    """A child python with the repo and this test module importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, **kwargs)


# ----------------------------------------------------------------------------- round trip
def test_round_trip_episodes_and_columns(tmp_path):
    path = tmp_path / "sub" / "dir" / "episodes.h5"  # a missing parent is created
    episodes = [make_episode(i, n=3 + i) for i in range(4)] + [make_episode(9, n=0)]
    with EpisodeWriter(path) as w:
        assert not w.recovered and committed(w, episodes) == set()
        w.append(episodes[0])
        w.append_many(episodes[1:])
    with EpisodeReader(path) as r:
        assert (r.n_episodes, r.n_decisions) == (5, sum(len(e.decisions) for e in episodes))
        for i, ep in enumerate(episodes):
            assert_same_episode(r.episode(i), ep)
        assert_same_episode(r.episode(-1), episodes[-1])
        index = r.index()
        assert list(index["key"]) == [e.key for e in episodes]
        assert list(index["length"]) == [len(e.decisions) for e in episodes]
        np.testing.assert_array_equal(index["seeds_fossilized"], 1)
        cols = r.decisions()
        flat = [d for e in episodes for d in e.decisions]
        np.testing.assert_array_equal(cols["observations"], np.stack([d.observation for d in flat]))
        np.testing.assert_array_equal(cols["actions"], [int(d.action) for d in flat])
        np.testing.assert_array_equal(cols["expert_actions"], [d.expert_action for d in flat])
        np.testing.assert_array_equal(cols["reward"], [d.outcome.reward for d in flat])
        np.testing.assert_array_equal(cols["valid"], [d.valid for d in flat])
        assert cols["valid"].dtype == bool
        np.testing.assert_array_equal(cols["episode"], np.repeat(np.arange(5), index["length"]))
        names = [r.blueprint_names[c] if c >= 0 else None for c in cols["blueprint"]]
        assert names == [d.blueprint for d in flat]
        meta = r.episode_meta(2)
        assert meta["id"] == episodes[2].id and meta["rng_seed"] == episodes[2].rng_seed
        assert meta["config"] == episodes[2].config.to_dict()


def test_decisions_for_selected_episodes(tmp_path):
    path = tmp_path / "s.h5"
    episodes = [make_episode(i, n=2 + i % 3) for i in range(6)]
    write(path, episodes)
    with EpisodeReader(path) as r:
        for sel in ([4, 1], [0], [], np.array([False, True, False, False, False, True])):
            cols = r.decisions(np.asarray(sel))
            chosen = np.flatnonzero(sel) if np.asarray(sel).dtype == bool else np.asarray(sel, int)
            want = [d for i in chosen for d in episodes[i].decisions]
            assert len(cols["actions"]) == len(want)
            np.testing.assert_array_equal(cols["observations"].reshape(-1, N_FEATURES),
                                          np.array([d.observation for d in want]).reshape(-1, N_FEATURES))
            np.testing.assert_array_equal(cols["episode"],
                                          np.repeat(chosen, [len(episodes[i].decisions) for i in chosen]))
        with pytest.raises(IndexError):
            r.decisions(np.array([6]))


def test_summary_and_committed_episodes(tmp_path):
    path = tmp_path / "s.h5"
    episodes = [make_episode(i) for i in range(3)] + [make_episode(0, policy="mlp")]
    write(path, episodes)
    with EpisodeWriter(path) as w:
        assert committed(w, episodes) == {(e.key, e.seed, e.index) for e in episodes}
        assert len(committed(w, episodes)) == 4  # same (seed, index), other policy: another key
    with EpisodeReader(path) as r:
        s = r.summary()
    counts = {a.name: sum(d.action == a for e in episodes for d in e.decisions) for a in Action}
    assert s["action_counts"] == counts
    assert (s["n_episodes"], s["n_decisions"]) == (4, 20)
    assert (s["seeds_created"], s["seeds_fossilized"], s["seeds_culled"]) == (8, 4, 4)
    assert s["mean_final_accuracy"] == pytest.approx(90 + 1 / 3)
    assert (s["schema_name"], s["schema_version"]) == ("tamiyo-snapshot", 2)
    assert s["path"] == str(path)


def test_empty_store(tmp_path):
    path = tmp_path / "empty.h5"
    EpisodeWriter(path).close()
    with EpisodeReader(path) as r:
        assert (r.n_episodes, r.n_decisions) == (0, 0)
        assert r.decisions()["observations"].shape == (0, N_FEATURES)
        assert r.summary()["mean_final_accuracy"] is None
        assert r.feature_names[0] == "epoch" and len(r.feature_names) == N_FEATURES


def test_the_layout_declaration_is_what_the_file_holds_and_columns_publishes(tmp_path):
    from esper_cli.data.store.layout import DECISION_COLUMNS, EPISODE_COLUMNS, LAYOUT

    path = tmp_path / "s.h5"
    with EpisodeWriter(path) as w:
        w.append_many([make_episode(i, n=3) for i in range(2)])
    with h5py.File(path, "r", libver="latest", swmr=True) as f:
        found: dict[str, h5py.Dataset] = {}
        f.visititems(lambda name, obj: found.update({name: obj}) if isinstance(obj, h5py.Dataset) else None)
        assert set(found) == {*LAYOUT, "commit"}
        for name, spec in LAYOUT.items():
            assert (found[name].dtype, found[name].shape[1:]) == (np.dtype(spec.dtype), spec.shape)
            if spec.absent is not None:
                assert found[name].fillvalue == spec.absent
    with EpisodeReader(path) as r:
        cols, index = r.columns(), r.index()
    public = [c.public for c in DECISION_COLUMNS if c.public is not None]
    assert set(cols) == {"episode_id", "episode", "step", "last", "action_mask", *public}
    assert set(index) == {c.name for c in EPISODE_COLUMNS}
    assert all(cols[c.public].dtype == bool for c in DECISION_COLUMNS if c.flag)
    assert all(index[c.name].dtype == bool for c in EPISODE_COLUMNS if c.flag)


def test_readers_see_only_committed_rows(tmp_path):
    """Rows beyond the commit record (an interrupted append) are invisible, then overwritten."""
    path = tmp_path / "s.h5"
    write(path, [make_episode(0), make_episode(1)])
    with h5py.File(path, "r+", libver="latest") as f:  # simulate a torn append: rows, no commit
        for name in ("decisions/actions", "episodes/length"):
            ds = f[name]
            ds.resize(ds.shape[0] + 3, axis=0)
            ds[-3:] = 3
    with EpisodeReader(path) as r:
        assert (r.n_episodes, r.n_decisions) == (2, 10)
        assert len(r.decisions()["actions"]) == 10 and len(r.index()["length"]) == 2
    write(path, [make_episode(2)])
    with EpisodeReader(path) as r:
        assert r.n_episodes == 3
        for i in range(3):
            assert_same_episode(r.episode(i), make_episode(i))


# ----------------------------------------------------------------------------- validation
@pytest.mark.parametrize("where", ["observation", "outcome", "confidence", "accuracy"])
def test_non_finite_rejected_and_store_unchanged(tmp_path, where):
    path = tmp_path / "s.h5"
    write(path, [make_episode(0)])
    before = path.read_bytes()
    bad = make_episode(1)
    d = bad.decisions[2]
    if where == "observation":
        d.observation[6] = np.nan
    elif where == "outcome":
        bad.decisions[2] = DecisionRecord(d.observation, d.action, d.valid, d.confidence, d.reason,
                                          d.blueprint, Outcome(np.inf, 0, 0, False, SeedStage.DORMANT, 0))
    elif where == "confidence":
        bad.decisions[2] = DecisionRecord(d.observation, d.action, d.valid, float("nan"), d.reason,
                                          d.blueprint, d.outcome)
    else:
        bad.final_accuracy = float("-inf")
    with EpisodeWriter(path) as w:
        with pytest.raises(ValueError, match="NaN or inf") as err:
            w.append_many([make_episode(5), bad])  # nothing of the batch is written
        if where == "observation":
            assert "val_accuracy" in str(err.value)
        assert committed(w, [make_episode(0), make_episode(5)]) == {(make_episode(0).key, 7, 0)}
    with EpisodeReader(path) as r:
        assert r.n_episodes == 1 and r.n_decisions == 5
    # A writer that opened and closed without committing may touch HDF5 housekeeping, not data.
    with EpisodeReader(path) as r:
        assert_same_episode(r.episode(0), make_episode(0))
    assert path.read_bytes() == before


def test_bad_observation_shape_rejected(tmp_path):
    ep = make_episode(0)
    ep.decisions[0] = DecisionRecord(np.zeros(26, np.float32), Action.WAIT, True, 1.0, "", None,
                                     ep.decisions[0].outcome)
    with EpisodeWriter(tmp_path / "s.h5") as w, pytest.raises(ValueError, match="shape"):
        w.append(ep)


# ----------------------------------------------------------------------------- bad files
def test_missing_store(tmp_path):
    with pytest.raises(StoreError, match="does not exist; run `simic collect` first"):
        EpisodeReader(tmp_path / "nope.h5")
    assert not (tmp_path / "nope.h5").exists()


def _not_a_store_files(tmp_path: Path) -> list[Path]:
    text = tmp_path / "notes.h5"
    text.write_text("not hdf5 at all\n")
    empty = tmp_path / "empty.h5"
    empty.write_bytes(b"")
    other = tmp_path / "other.h5"  # plain h5py file (old superblock)
    with h5py.File(other, "w") as f:
        f["x"] = np.arange(3)
    latest = tmp_path / "latest.h5"  # same superblock as ours, but no format attribute
    with h5py.File(latest, "w", libver="latest") as f:
        f["x"] = np.arange(3)
    return [text, empty, other, latest]


def test_not_a_store_never_modified(tmp_path):
    for path in _not_a_store_files(tmp_path):
        before = path.read_bytes()
        with pytest.raises(NotAStoreError, match="not a Simic episode store"):
            EpisodeReader(path)
        with pytest.raises(NotAStoreError, match="not a Simic episode store"):
            EpisodeWriter(path)
        assert path.read_bytes() == before, path
    with pytest.raises(NotAStoreError):
        EpisodeReader(tmp_path)  # a directory


def test_truncated_store(tmp_path):
    good = tmp_path / "good.h5"
    write(good, [make_episode(i, n=25) for i in range(40)])
    for fraction in (0.5, 0.999, 0.01):
        cut = tmp_path / f"cut{fraction}.h5"
        shutil.copy(good, cut)
        os.truncate(cut, int(good.stat().st_size * fraction))
        before = cut.read_bytes()
        with pytest.raises(StoreError, match="truncated"):
            EpisodeReader(cut)
        with pytest.raises(StoreError, match="truncated"):
            EpisodeWriter(cut)
        assert cut.read_bytes() == before


def test_schema_version_mismatch(tmp_path):
    path = tmp_path / "s.h5"
    write(path, [make_episode(0)])
    with h5py.File(path, "r+", libver="latest") as f:
        f.attrs["schema_version"] = 99
    before = path.read_bytes()
    with pytest.raises(StoreError, match="tamiyo-snapshot v99.*tamiyo-snapshot v2"):
        EpisodeReader(path)
    with pytest.raises(StoreError, match="v99"):
        EpisodeWriter(path)
    assert path.read_bytes() == before


def test_a_v1_store_still_reads_but_takes_no_v2_episode(tmp_path):
    path = tmp_path / "v1.h5"
    write(path, [make_episode(0)])
    with h5py.File(path, "r+", libver="latest") as f:
        f.attrs["schema_version"] = 1
    before = path.read_bytes()
    with EpisodeReader(path) as r:
        assert r.schema_version == 1 and r.n_episodes == 1
    with pytest.raises(StoreError, match="v1 observations; this Simic writes v2") as exc:
        EpisodeWriter(path)
    assert "\n" not in str(exc.value)
    assert path.read_bytes() == before


def test_error_messages_are_one_line(tmp_path):
    paths = _not_a_store_files(tmp_path) + [tmp_path / "missing.h5"]
    for path in paths:
        with pytest.raises(StoreError) as err:
            EpisodeReader(path)
        assert "\n" not in str(err.value) and str(path) in str(err.value)


# ----------------------------------------------------------------------------- concurrency
WRITER_THEN_WAIT = """
    import sys
    from esper_cli.data.store import EpisodeWriter
    from episode_helpers import make_episode
    with EpisodeWriter(sys.argv[1]) as w:
        for i in range(3):
            w.append(make_episode(i))
        print("ready", flush=True)
        sys.stdin.readline()
        w.append(make_episode(3))
    print("done", flush=True)
"""


@pytest.mark.slow
def test_lock_and_reading_during_write(tmp_path):
    path = tmp_path / "s.h5"
    child = run_python(WRITER_THEN_WAIT.replace("sys.argv[1]", repr(str(path))))
    try:
        assert child.stdout.readline().strip() == "ready"
        with pytest.raises(StoreLockedError, match="another process is writing it") as err:
            EpisodeWriter(path)
        assert str(path) in str(err.value) and "\n" not in str(err.value)
        with EpisodeReader(path) as r:  # readers need no lock and see the committed episodes
            assert r.n_episodes == 3
            assert_same_episode(r.episode(2), make_episode(2))
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().strip() == "done"
    finally:
        child.kill()
        child.wait()
    with EpisodeReader(path) as r:
        assert r.n_episodes == 4
    with EpisodeWriter(path) as w:  # the lock was released
        assert len(committed(w, [make_episode(0)])) == 4


def test_second_writer_in_same_process_is_locked(tmp_path):
    path = tmp_path / "s.h5"
    with EpisodeWriter(path):
        with pytest.raises(StoreLockedError):
            EpisodeWriter(path)


def test_a_writer_waiting_on_a_closing_writers_lock_excludes_the_next_one(tmp_path):
    # The closing writer deletes its lock file while still holding it; a writer already blocked on
    # that file must not end up holding a deleted file while a newcomer locks a fresh one.
    import threading

    path = tmp_path / "s.h5"
    first = EpisodeWriter(path)
    waiting: dict[str, EpisodeWriter] = {}
    thread = threading.Thread(target=lambda: waiting.setdefault("w", EpisodeWriter(path, lock_timeout=30)))
    thread.start()
    time.sleep(0.5)  # the second writer is now blocked on the first's lock file
    first.close()
    thread.join(timeout=30)
    second = waiting["w"]
    try:
        with pytest.raises(StoreLockedError):
            EpisodeWriter(path)
        second.append(make_episode(0))
    finally:
        second.close()
    assert not Path(f"{path}.lock").exists()
    with EpisodeReader(path) as r:
        assert r.n_episodes == 1


def test_reader_in_same_process_as_writer(tmp_path):
    path = tmp_path / "s.h5"
    with EpisodeWriter(path) as w:
        w.append(make_episode(0))
        with EpisodeReader(path) as r:
            assert r.n_episodes == 1
        w.append(make_episode(1))  # closing the reader left the writer working
    with EpisodeReader(path) as r:
        assert r.n_episodes == 2


# ----------------------------------------------------------------------------- crash safety
CRASH_WRITER = """
    import sys
    from esper_cli.data.store import EpisodeWriter
    from episode_helpers import make_episode
    path, batch = sys.argv[1], int(sys.argv[2])
    with EpisodeWriter(path) as w:
        i = w.n_episodes
        while True:
            w.append_many(make_episode(j, n=25) for j in range(i, i + batch))
            i += batch
            print(i, flush=True)
"""


def _crash(path: Path, delay: float, batch: int = 1, after_commits: int = 0) -> int:
    """Start a writer looping appends, SIGKILL it; return the commits it reported."""
    code = CRASH_WRITER.replace("sys.argv[1], int(sys.argv[2])", f"{str(path)!r}, {batch}")
    child = run_python(code)
    reported = 0
    try:
        for _ in range(after_commits):
            reported = int(child.stdout.readline())
        time.sleep(delay)
    finally:
        child.send_signal(signal.SIGKILL)
        out, _ = child.communicate()
    lines = out.split()
    return int(lines[-1]) if lines else reported


def _check_complete(path: Path, at_least: int) -> int:
    with EpisodeReader(path) as r:
        n = r.n_episodes
        assert n >= at_least
        for i in range(n):
            assert_same_episode(r.episode(i), make_episode(i, n=25))
        assert r.n_decisions == 25 * n
        np.testing.assert_array_equal(r.decisions()["episode"], np.repeat(np.arange(n), 25))
    return n


# (seconds to wait, episodes per commit, commits to see first): right after start (likely before
# the store exists), then at assorted moments of a loop of small and of large commits.
@pytest.mark.slow
@pytest.mark.parametrize("delay, batch, after", [(0.0, 1, 0), (0.3, 1, 0), (0.0, 1, 1), (0.003, 1, 1),
                                                 (0.02, 1, 2), (0.2, 1, 1), (0.01, 40, 1), (0.03, 40, 1)])
def test_kill_9_leaves_committed_episodes(tmp_path, delay, batch, after):
    path = tmp_path / "crash.h5"
    reported = _crash(path, delay, batch, after)
    if not path.exists():  # killed before the store was created: nothing half-made either
        assert reported == 0 and list(tmp_path.glob("crash.h5")) == []
        return
    n = _check_complete(path, reported)
    with EpisodeWriter(path) as w:  # recovery: a fresh clean file with the committed episodes
        if after:
            assert w.recovered
        assert w.n_episodes == n
        w.append_many([make_episode(n, n=25), make_episode(n + 1, n=25)])
    assert not list(tmp_path.glob("*.tmp"))
    assert _check_complete(path, n + 2) == n + 2
    with h5py.File(path, "r") as f:  # recovered and closed cleanly: a plain open works again
        assert f.attrs["format"] == "simic-episode-store"


KILL_BEFORE_COMMIT = """
    import os, signal, h5py
    from esper_cli.data.store import EpisodeWriter
    from episode_helpers import make_episode
    set_item = h5py.Dataset.__setitem__
    def die_on_commit(ds, key, value):
        if ds.name == "/commit" and w.n_episodes == 2:  # rows of episode 2 written and flushed
            os.kill(os.getpid(), signal.SIGKILL)
        set_item(ds, key, value)
    h5py.Dataset.__setitem__ = die_on_commit
    w = EpisodeWriter(PATH)
    for i in range(5):
        w.append(make_episode(i, n=25))
"""


@pytest.mark.slow
def test_kill_between_rows_and_commit(tmp_path):
    """Deterministic worst moment: every row of an episode is on disk, the commit is not."""
    path = tmp_path / "crash.h5"
    child = run_python(KILL_BEFORE_COMMIT.replace("PATH", repr(str(path))))
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    with h5py.File(path, "r", libver="latest", swmr=True) as f:  # the torn episode is physically there
        assert f["episodes/length"].shape[0] == 3 and f["decisions/actions"].shape[0] == 75
    assert _check_complete(path, 2) == 2
    with EpisodeWriter(path) as w:
        assert w.recovered and w.n_episodes == 2
    with h5py.File(path, "r") as f:  # recovery dropped it physically
        assert f["episodes/length"].shape[0] == 2 and f["decisions/actions"].shape[0] == 50


@pytest.mark.slow
def test_kill_right_after_open(tmp_path):
    """A writer killed before its first append leaves a store readers and writers accept."""
    path = tmp_path / "s.h5"
    write(path, [make_episode(0, n=25)])
    child = run_python(f"""
        import os, signal
        from esper_cli.data.store import EpisodeWriter
        w = EpisodeWriter({str(path)!r})
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert _check_complete(path, 1) == 1
    with EpisodeWriter(path) as w:
        assert w.recovered and w.n_episodes == 1


@pytest.mark.slow
def test_repeated_crashes_then_resume(tmp_path):
    path = tmp_path / "crash.h5"
    n = 0
    for delay in (0.3, 0.05, 0.1):
        reported = _crash(path, delay, after_commits=1)
        n = _check_complete(path, max(reported, n))
    with EpisodeWriter(path) as w:
        assert w.recovered and w.n_episodes == n


def test_leftover_temp_files_are_removed(tmp_path):
    path = tmp_path / "s.h5"
    write(path, [make_episode(0)])
    for suffix in ("recover.tmp", "create.tmp"):
        (tmp_path / f"s.h5.{suffix}").write_bytes(b"half a file")
    with EpisodeWriter(path) as w:
        assert w.n_episodes == 1 and not w.recovered
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.h5"]  # a closed writer leaves no lock file
