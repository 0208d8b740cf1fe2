"""The episode store against what real files and disks do: symlinks, a full disk, flipped bytes,
bad content, refused paths; and its columnar read.

Real HDF5 files and, where the failure is a process-level one (locks, crashes, a full disk, a
hang), real `simic` processes.
"""

from __future__ import annotations

import math
import os
import random
import shutil
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import h5py
import numpy as np
import pytest
from episode_helpers import make_episode
from test_store import run_python

from esper_cli.contracts import ACTION_NAMES, N_FEATURES
from esper_cli.data.store import EpisodeReader, EpisodeWriter, StoreError, StoreLockedError
from esper_cli.policy import valid_action_mask

REPO = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "2"]


def simic(*args: str, cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """`simic ...` in a fresh process of this checkout's code, its own SIMIC_HOME."""
    env = {**os.environ, "SIMIC_HOME": str(cwd / "simic-home"),
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "plugins")])}
    return subprocess.run([sys.executable, "-m", "esper_cli", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=timeout)


def assert_one_line_error(proc: subprocess.CompletedProcess, code: int, *fragments: str) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, proc.stderr
    # Anything else on stderr is a progress bar's last frame, never part of the message.
    others = [line for line in proc.stderr.splitlines() if line.strip() and line not in errors]
    assert all(" ep/s " in line for line in others), proc.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


@pytest.fixture(scope="module")
def collected(tmp_path_factory) -> Path:
    """A real store from `simic collect --episodes 2 --epochs 2` (treat as read-only: copy it)."""
    where = tmp_path_factory.mktemp("collected")
    proc = simic("collect", "--episodes", "2", *TINY, "--store", "s.h5", cwd=where)
    assert proc.returncode == 0, proc.stderr
    return where / "s.h5"


def crash_writer(path: Path, episodes: int = 0) -> None:
    """A writer that commits `episodes` more and dies by kill -9: the store is left flagged open."""
    child = run_python(f"""
        import os, signal
        from esper_cli.data.store import EpisodeWriter
        from episode_helpers import make_episode
        w = EpisodeWriter({str(path)!r})
        n = w.n_episodes
        w.append_many([make_episode(n + i, n=25) for i in range({episodes})])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    child.communicate()
    assert child.returncode == -signal.SIGKILL


def superblock_flags(path: Path) -> int:
    return path.read_bytes()[11]


# ------------------------------------------------------------------------------------- symlinks
def test_symlink_cannot_bypass_the_lock(tmp_path):
    live, link = tmp_path / "live.h5", tmp_path / "link.h5"
    link.symlink_to("live.h5")
    with EpisodeWriter(live) as w:
        w.append(make_episode(0))
        with pytest.raises(StoreLockedError, match="locked"):
            EpisodeWriter(link)
        proc = simic("collect", "--episodes", "1", *TINY, "--store", str(link), cwd=tmp_path)
        assert_one_line_error(proc, 2, "locked", str(link))
        w.append(make_episode(1))  # the live writer was not disturbed
    assert link.is_symlink() and os.readlink(link) == "live.h5"
    with EpisodeReader(link) as r:
        assert r.n_episodes == 2
    assert not (tmp_path / "link.h5.lock").exists()  # the lock is the real file's


def test_recovery_through_symlink_fixes_the_real_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    live, link = data / "live.h5", tmp_path / "link.h5"
    link.symlink_to(live)
    with EpisodeWriter(live) as w:
        w.append_many([make_episode(i, n=25) for i in range(2)])
    crash_writer(live, episodes=1)
    assert superblock_flags(live) != 0
    proc = simic("collect", "--episodes", "1", *TINY, "--store", str(link), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "Recovered" in proc.stderr
    assert link.is_symlink() and os.readlink(link) == str(live)
    assert superblock_flags(live) == 0  # the real file was replaced by the clean copy
    with h5py.File(live, "r") as f:  # a plain (non-SWMR) open works again
        assert f.attrs["format"] == "simic-episode-store"
    with EpisodeReader(live) as r:
        assert r.n_episodes == 4  # 2 + the crashed writer's committed one + the collected one
    assert not list(tmp_path.glob("*.tmp")) + list(data.glob("*.tmp"))


def test_symlink_loop_is_one_line_error(tmp_path):
    a, b = tmp_path / "a.h5", tmp_path / "b.h5"
    a.symlink_to(b)
    b.symlink_to(a)
    for opener in (EpisodeReader, EpisodeWriter):
        with pytest.raises(StoreError) as err:
            opener(a)
        assert "\n" not in str(err.value) and str(a) in str(err.value)
    assert a.is_symlink() and b.is_symlink()


# ------------------------------------------------------------------------------------- disk full
@pytest.fixture
def tiny_disk(tmp_path):
    """Mount a tmpfs of a given size (KiB) at tmp_path/mnt; unmounted when the test ends."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    mounted = []

    def mount(kib: int) -> Path:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(mnt)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a small tmpfs to fill up (needs root): {proc.stderr.strip()}")
        mounted.append(mnt)
        return mnt

    try:
        yield mount
    finally:
        for where in mounted:
            subprocess.run(["umount", str(where)], check=False)


def test_disk_full_on_first_collect(tmp_path, tiny_disk):
    mnt = tiny_disk(600)  # room for an empty store, not for its first episode
    proc = simic("collect", "--episodes", "2", *TINY, "--store", str(mnt / "s.h5"), cwd=tmp_path)
    assert_one_line_error(proc, 1, "No space left on device")
    assert not list(mnt.glob("*.tmp"))
    if (mnt / "s.h5").exists():
        with EpisodeReader(mnt / "s.h5") as r:
            assert r.n_episodes == 0


def test_disk_full_mid_collect_keeps_committed_episodes(tmp_path, tiny_disk):
    # 2046 decisions: one 2-decision episode still fits the first observation chunk (2048 rows),
    # the next needs a new 216 KiB chunk, which the disk has no room for.
    store = tmp_path / "s.h5"
    episodes = [make_episode(i, n=66) for i in range(31)]
    with EpisodeWriter(store) as w:
        w.append_many(episodes)
    mnt = tiny_disk(math.ceil(store.stat().st_size / 4096) * 4 + 64)
    shutil.copy(store, mnt / "s.h5")
    proc = simic("collect", "--episodes", "3", *TINY, "--store", str(mnt / "s.h5"), cwd=tmp_path)
    assert_one_line_error(proc, 1, "No space left on device", "32 committed episodes are kept",
                          "1 added by this run")
    assert not list(mnt.glob("*.tmp"))
    with EpisodeReader(mnt / "s.h5") as r:
        assert r.n_episodes == 32 and r.n_decisions == 2048
        assert list(r.columns(range(31))["episode_id"][::66]) == [e.id for e in episodes]
        assert r.episode(31).policy == "heuristic" and len(r.episode(31).decisions) == 2


def test_recovery_without_room_leaves_the_store_unchanged(tmp_path, tiny_disk):
    store = tmp_path / "s.h5"
    with EpisodeWriter(store) as w:
        w.append_many([make_episode(i, n=25) for i in range(3)])
    crash_writer(store)
    mnt = tiny_disk(math.ceil(store.stat().st_size / 4096) * 4 + 64)  # no room for a copy
    shutil.copy(store, mnt / "s.h5")
    before = (mnt / "s.h5").read_bytes()
    assert superblock_flags(mnt / "s.h5") != 0
    proc = simic("collect", "--episodes", "1", *TINY, "--store", str(mnt / "s.h5"), cwd=tmp_path)
    assert_one_line_error(proc, 1, "No space left on device", "unchanged")
    assert not list(mnt.glob("*.tmp"))
    assert (mnt / "s.h5").read_bytes() == before
    with EpisodeReader(mnt / "s.h5") as r:
        assert r.n_episodes == 3


# ------------------------------------------------------------------------------------- flipped bytes
def flip_offsets(size: int) -> list[int]:
    """The offsets that hung readers for minutes, then a seeded sample: half in the first 20 KB
    (HDF5's own bookkeeping lives there), half anywhere in the file."""
    rng = random.Random(9)
    return ([44, 58, 1140, 10080, 14670, 15480]
            + sorted(rng.randrange(min(size, 20_000)) for _ in range(10))
            + sorted(rng.randrange(size) for _ in range(10)))


def test_flipped_byte_fails_fast_with_one_line(tmp_path, collected):
    data = collected.read_bytes()
    offsets = flip_offsets(len(data))
    for offset in offsets:
        damaged = bytearray(data)
        damaged[offset] ^= 0xFF
        (tmp_path / f"flip{offset}.h5").write_bytes(bytes(damaged))
    with ThreadPoolExecutor(4) as pool:  # a few at a time: each is mostly interpreter start-up
        runs = pool.map(lambda offset: (offset, simic("info", "--store", f"flip{offset}.h5",
                                                      cwd=tmp_path, timeout=20)), offsets)
        try:
            for offset, proc in runs:
                assert proc.returncode in (0, 2), (offset, proc.returncode, proc.stderr[-2000:])
                assert "Traceback" not in proc.stderr, (offset, proc.stderr[-2000:])
                if proc.returncode:
                    assert len(proc.stderr.strip().splitlines()) == 1, (offset, proc.stderr)
        except subprocess.TimeoutExpired as exc:
            pytest.fail(f"simic info hung on a store with one byte flipped ({exc.cmd[-1]})")


def test_flipped_byte_collect_fails_fast(tmp_path, collected):
    damaged = bytearray(collected.read_bytes())
    damaged[1140] ^= 0xFF
    path = tmp_path / "flip.h5"
    path.write_bytes(bytes(damaged))
    try:
        proc = simic("collect", "--episodes", "1", *TINY, "--store", str(path), cwd=tmp_path, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("simic collect hung on a store with one flipped byte")
    assert_one_line_error(proc, 2, str(path))
    assert path.read_bytes() == bytes(damaged)


# ------------------------------------------------------------------------------------- bad content
def test_corrupted_metadata_json_is_one_line_exit_2(tmp_path, collected):
    path = tmp_path / "s.h5"
    shutil.copy(collected, path)
    with h5py.File(path, "r+", libver="latest") as f:
        blob = f["meta_bytes"][...]
        second = int(f["episodes/meta_offset"][1])
        assert blob[second] == ord("{") and blob[second + 1] == ord('"')
        f["meta_bytes"][second + 1] = ord("}")  # '{}"id":...': no longer JSON
    for args in (["info"], ["train", "--out", str(tmp_path / "m.safetensors")],
                 ["eval", "--policy", "heuristic"]):
        proc = simic(*args, "--store", str(path), cwd=tmp_path)
        assert_one_line_error(proc, 2, str(path), "JSON")
    assert not (tmp_path / "m.safetensors").exists()


def test_out_of_range_stored_action_is_one_line_exit_2(tmp_path, collected):
    path = tmp_path / "s.h5"
    shutil.copy(collected, path)
    with h5py.File(path, "r+", libver="latest") as f:
        f["decisions/actions"][1] = 9
    proc = simic("info", "--store", str(path), cwd=tmp_path)
    assert_one_line_error(proc, 2, str(path), "actions", "9")
    with pytest.raises(StoreError, match="actions holds 9"):
        with EpisodeReader(path) as r:
            r.columns()


# -------------------------------------------------------------------------------------- refused paths
def test_refused_paths_leave_no_lock_file(tmp_path):
    text = tmp_path / "notes.h5"
    text.write_text("not a store\n")
    folder = tmp_path / "folder.h5"
    folder.mkdir()
    binary = tmp_path / "blob.h5"
    binary.write_bytes(bytes(range(256)) * 4)
    foreign = tmp_path / "foreign.h5"  # HDF5, but not a Simic store: refused after the lock
    with h5py.File(foreign, "w", libver="latest") as f:
        f["x"] = np.arange(3)
    for path in (text, folder, binary, foreign):
        with pytest.raises(StoreError, match="not a Simic episode store"):
            EpisodeWriter(path)
        assert not Path(f"{path}.lock").exists(), path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.h5", "folder.h5", "foreign.h5", "notes.h5"]


def test_store_cut_to_a_few_bytes_is_truncated(tmp_path):
    good = tmp_path / "good.h5"
    with EpisodeWriter(good) as w:
        w.append(make_episode(0))
    for size in (8, 47):
        cut = tmp_path / f"cut{size}.h5"
        cut.write_bytes(good.read_bytes()[:size])
        for opener in (EpisodeReader, EpisodeWriter):
            with pytest.raises(StoreError, match="truncated") as err:
                opener(cut)
            assert "not a Simic" not in str(err.value)
        assert cut.stat().st_size == size and not Path(f"{cut}.lock").exists()


# -------------------------------------------------------------------------------------- columns()
def test_columns_round_trip(tmp_path):
    path = tmp_path / "s.h5"
    episodes = [make_episode(i, n=3 + i) for i in range(4)] + [make_episode(9, n=0), make_episode(5, n=2)]
    with EpisodeWriter(path) as w:
        w.append_many(episodes)
    with EpisodeReader(path) as r:
        cols = r.columns()
        assert r.feature_names and len(r.feature_names) == N_FEATURES
    rows = [(e, t, d) for e in episodes for t, d in enumerate(e.decisions)]
    assert {len(col) for col in cols.values()} == {len(rows)}
    assert list(cols["episode_id"]) == [e.id for e, _, _ in rows]
    assert list(cols["step"]) == [t for _, t, _ in rows]
    assert list(cols["last"]) == [t == len(e.decisions) - 1 for e, t, _ in rows]
    np.testing.assert_array_equal(cols["observation"], np.array([d.observation for _, _, d in rows]))
    assert cols["observation"].shape == (len(rows), N_FEATURES)
    assert list(cols["action"]) == [int(d.action) for _, _, d in rows]
    assert list(cols["expert_action"]) == [d.expert_action for _, _, d in rows]
    assert list(cols["reward"]) == [d.outcome.reward for _, _, d in rows]  # exact: float64
    assert list(cols["confidence"]) == [d.confidence for _, _, d in rows]
    assert list(cols["valid"]) == [d.valid for _, _, d in rows]
    assert list(cols["seed_alive"]) == [d.outcome.seed_alive for _, _, d in rows]
    assert list(cols["val_accuracy_after"]) == [d.outcome.val_accuracy for _, _, d in rows]
    assert list(cols["stage_after"]) == [int(d.outcome.stage_after) for _, _, d in rows]
    assert list(cols["blueprint"]) == [d.blueprint or "" for _, _, d in rows]
    assert [ACTION_NAMES[a] for a in cols["action"]] == [d.action.name for _, _, d in rows]
    # Derived from each observation by the environment's own rule, not stored.
    assert cols["action_mask"].shape == (len(rows), 4) and cols["action_mask"].dtype == bool
    np.testing.assert_array_equal(cols["action_mask"], valid_action_mask(cols["observation"]))

    with EpisodeReader(path) as r:  # a selection: the same rows as the full table's
        some = r.columns([5, 1])
    keep = np.isin(cols["episode"], [5, 1])
    assert list(some["episode_id"]) == [episodes[5].id] * 2 + [episodes[1].id] * 4
    for name in ("step", "action", "reward"):
        assert sorted(some[name].tolist()) == sorted(cols[name][keep].tolist())


def test_columns_of_an_empty_store(tmp_path):
    path = tmp_path / "s.h5"
    with EpisodeWriter(path):
        pass
    with EpisodeReader(path) as r:
        cols = r.columns()
    assert cols["observation"].shape == (0, N_FEATURES)
    assert all(len(col) == 0 for col in cols.values())


def test_columns_into_pandas(tmp_path):
    pd = pytest.importorskip("pandas")
    path = tmp_path / "s.h5"
    episodes = [make_episode(i, n=4) for i in range(3)]
    with EpisodeWriter(path) as w:
        w.append_many(episodes)
    with EpisodeReader(path) as r:
        cols = r.columns()
        features = list(r.feature_names)
    obs = cols.pop("observation")
    cols.pop("action_mask")  # 2-D as well
    frame = pd.concat([pd.DataFrame(cols), pd.DataFrame(obs, columns=features)], axis=1)
    assert len(frame) == 12
    assert frame.groupby("episode_id")["reward"].sum().to_dict() == pytest.approx(
        {e.id: sum(d.outcome.reward for d in e.decisions) for e in episodes})
    assert list(frame.columns[-N_FEATURES:]) == features
    np.testing.assert_array_equal(frame[features].to_numpy(), obs)
