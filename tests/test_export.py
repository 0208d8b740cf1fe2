"""`simic export`: the dataset the real `minari.load_dataset` reads back holds the store's
observations (plus each final one), actions, rewards and action masks; the file the real
`d3rlpy.dataset.ReplayBuffer.load` reads back holds one aligned d3rlpy episode per store episode;
and `d3rlpy.datasets.get_minari` does with our Minari export what the README says it does."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from cli_helpers import invoke, one_line_error
from episode_helpers import make_episode

from esper_cli.data.interop import export_minari
from esper_cli.data.store import EpisodeReader, EpisodeWriter
from esper_cli.policy import valid_action_mask

minari = pytest.importorskip("minari")  # the rl extra; Minari 0.5 needs Python 3.11


def finished(index: int, n: int = 4):
    """A stored episode with its final observation, as collect now writes them."""
    rng = np.random.default_rng(index)
    return replace(make_episode(index, n=n), final_observation=rng.normal(size=27).astype(np.float32))


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "episodes.h5"
    with EpisodeWriter(path) as writer:
        writer.append_many([finished(0, 4), finished(1, 6), make_episode(2, n=3), finished(3, 5)])
    return path


def test_export_round_trips_through_minari(store, tmp_path, monkeypatch):
    out = tmp_path / "minari"
    result = invoke("export", "--format", "minari", "--store", store, "--out", out, "--dataset-id", "simic/test-v0")
    assert result.exit_code == 0, result.output
    assert "Skipped 1 episode" in result.stderr  # episode 2 has no final observation
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(out))
    dataset = minari.load_dataset("simic/test-v0")
    with EpisodeReader(store) as reader:
        kept = [reader.episode(i) for i in (0, 1, 3)]
        ids = [reader.episode_meta(i)["id"] for i in (0, 1, 3)]
    assert dataset.total_episodes == 3 and dataset.total_steps == 4 + 6 + 5
    assert dataset.observation_space.shape == (27,) and dataset.action_space.n == 4
    for got, want in zip(dataset.iterate_episodes(), kept):
        obs = np.stack([d.observation for d in want.decisions] + [want.final_observation])
        np.testing.assert_array_equal(got.observations, obs)
        np.testing.assert_array_equal(got.actions, [int(d.action) for d in want.decisions])
        np.testing.assert_array_equal(got.rewards, [d.outcome.reward for d in want.decisions])
        np.testing.assert_array_equal(got.terminations, np.arange(len(want.decisions)) == len(want.decisions) - 1)
        np.testing.assert_array_equal(got.infos["expert_action"][1:], [d.expert_action for d in want.decisions])
        # One mask per observation, the reset's included: the state's valid actions, as the env reports them.
        assert got.infos["action_mask"].shape == (len(obs), 4)
        np.testing.assert_array_equal(got.infos["action_mask"], valid_action_mask(obs).astype(np.int8))
    metadata = dataset.storage.metadata
    assert metadata["simic_episode_ids"] == ids
    schema = json.loads(metadata["simic_schema"])  # JSON text, as Minari keeps its own spaces
    assert schema["version"] == 2 and len(schema["feature_names"]) == 27
    resets = json.loads(metadata["simic_reset"])
    assert resets == [{"seed": e.seed, "options": {"index": e.index}} for e in kept]
    assert all(type(r["seed"]) is int and type(r["options"]["index"]) is int for r in resets)
    assert [m["simic_episode_id"] for m in dataset.storage.get_episode_metadata([0, 1, 2])] == ids


def test_export_never_overwrites_and_refuses_bad_input(store, tmp_path):
    out = tmp_path / "minari"
    export_minari(store, out, "simic/a-v0")
    marker = out / "simic" / "a-v0" / "data" / "metadata.json"
    before = marker.read_bytes()
    one_line_error(invoke("export", "--store", store, "--out", out, "--dataset-id", "simic/a-v0"), "already exists")
    assert marker.read_bytes() == before
    one_line_error(invoke("export", "--store", store, "--out", out, "--dataset-id", "no version"), "--dataset-id")
    one_line_error(invoke("export", "--store", store, "--out", store, "--dataset-id", "simic/b-v0"), "not a folder")
    one_line_error(invoke("export", "--format", "csv", "--store", store), "--format")
    one_line_error(invoke("export", "--store", tmp_path / "missing.h5"), "does not exist")


def test_a_store_without_final_observations_has_nothing_to_export(tmp_path):
    path = tmp_path / "old.h5"
    with EpisodeWriter(path) as writer:
        writer.append(make_episode(0))
    one_line_error(invoke("export", "--store", path, "--out", tmp_path / "m"), "before final observations")
    assert not (tmp_path / "m" / "simic" / "episodes-v0").exists()


@pytest.fixture
def same_config_store(tmp_path):
    """Episodes sharing one config (epochs 4), so the export records the env spec."""
    path = tmp_path / "same.h5"
    with EpisodeWriter(path) as writer:
        writer.append_many([finished(i, 4) for i in range(3)])
    return path


def test_minari_env_spec_carries_max_episode_steps(same_config_store, tmp_path, monkeypatch):
    export_minari(same_config_store, tmp_path / "m", "simic/same-v0")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "m"))
    dataset = minari.load_dataset("simic/same-v0")
    assert dataset.spec.env_spec.max_episode_steps == 4
    env = dataset.recover_environment()
    assert env.spec.max_episode_steps == 4 and env.unwrapped.config.epochs == 4
    # The stored reset seed and options, read back by Minari as numpy integers, replay the episode.
    meta = next(iter(dataset.storage.get_episode_metadata([1])))
    obs, info = env.reset(seed=meta["seed"], options=meta["options"])
    assert (info["run_seed"], info["index"]) == (7, 1)


def test_d3rlpy_get_minari_misaligns_our_minari_export(same_config_store, tmp_path, monkeypatch):
    """What the README says of `d3rlpy.datasets.get_minari`: it loads (the spec has
    max_episode_steps) but shifts episode k's observations by k rows; hence `--format d3rlpy`."""
    d3rlpy = pytest.importorskip("d3rlpy")
    export_minari(same_config_store, tmp_path / "m", "simic/same-v0")
    monkeypatch.setenv("MINARI_DATASETS_PATH", str(tmp_path / "m"))
    dataset, env = d3rlpy.datasets.get_minari("simic/same-v0")
    assert env.spec.max_episode_steps == 4
    with EpisodeReader(same_config_store) as reader:
        stored = [reader.episode(i) for i in range(3)]
    assert len(dataset.episodes) == 3
    np.testing.assert_array_equal(dataset.episodes[0].observations, [d.observation for d in stored[0].decisions])
    shifted = dataset.episodes[1].observations  # rows 4..7 of the stacked N+1 observations
    np.testing.assert_array_equal(shifted[0], stored[0].final_observation)
    np.testing.assert_array_equal(shifted[1:], [d.observation for d in stored[1].decisions[:3]])


def load_d3rlpy(path):
    d3rlpy = pytest.importorskip("d3rlpy")
    with open(path, "rb") as f:
        return d3rlpy.dataset.ReplayBuffer.load(f, d3rlpy.dataset.InfiniteBuffer())


def test_d3rlpy_export_round_trips_through_d3rlpy(store, tmp_path):
    pytest.importorskip("d3rlpy")
    import h5py

    path = tmp_path / "episodes-d3rlpy.h5"
    result = invoke("export", "--format", "d3rlpy", "--store", store, "--out", path, "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["episodes"] == 4
    buffer = load_d3rlpy(path)
    with EpisodeReader(store) as reader:
        episodes = [reader.episode(i) for i in range(reader.n_episodes)]
        cols = reader.columns()
        ids = [reader.episode_meta(i)["id"] for i in range(reader.n_episodes)]
    # Every episode, the one without a final observation (2) included: d3rlpy needs only N.
    assert len(buffer.episodes) == 4 and buffer.transition_count == 4 + 6 + 3 + 5
    for got, want in zip(buffer.episodes, episodes):
        np.testing.assert_array_equal(got.observations, [d.observation for d in want.decisions])
        np.testing.assert_array_equal(got.actions.ravel(), [int(d.action) for d in want.decisions])
        np.testing.assert_array_equal(got.rewards.ravel(), [d.outcome.reward for d in want.decisions])
        assert got.terminated
    assert buffer.dataset_info.action_space.name == "DISCRETE" and buffer.dataset_info.action_size == 4
    with h5py.File(path, "r") as h5:
        group = h5["simic"]
        np.testing.assert_array_equal(group["action_mask"][()], cols["action_mask"])
        assert [s.decode() for s in group["episode_id"][()]] == ids
        np.testing.assert_array_equal(group["episode_length"][()], [4, 6, 3, 5])
        assert json.loads(group.attrs["schema"])["version"] == 2


def test_d3rlpy_export_never_overwrites_and_refuses_bad_input(store, tmp_path):
    pytest.importorskip("d3rlpy")
    existing = tmp_path / "taken.h5"
    existing.write_bytes(b"not ours")
    one_line_error(invoke("export", "--format", "d3rlpy", "--store", store, "--out", existing), "already exists")
    assert existing.read_bytes() == b"not ours"
    one_line_error(invoke("export", "--format", "d3rlpy", "--store", store, "--out", tmp_path / "no" / "f.h5"),
                   "does not exist")
    one_line_error(invoke("export", "--format", "d3rlpy", "--store", store, "--out", tmp_path / "x.h5",
                          "--dataset-id", "simic/a-v0"), "--dataset-id")
    one_line_error(invoke("export", "--format", "d3rlpy", "--store", tmp_path / "missing.h5",
                          "--out", tmp_path / "y.h5"), "does not exist")
    empty = tmp_path / "empty.h5"
    with EpisodeWriter(empty):
        pass
    one_line_error(invoke("export", "--format", "d3rlpy", "--store", empty, "--out", tmp_path / "z.h5"),
                   "no episodes")
    assert not any((tmp_path / n).exists() for n in ("x.h5", "y.h5", "z.h5"))


def test_load_d3rlpy_keeps_four_actions_where_the_data_never_culls(tmp_path):
    d3rlpy = pytest.importorskip("d3rlpy")
    from esper_cli.contracts import Action
    from esper_cli.data.interop import export_d3rlpy, load_d3rlpy

    episode = finished(0, 5)
    no_cull = [replace(d, action=Action.WAIT) if d.action == Action.CULL else d for d in episode.decisions]
    path = tmp_path / "s.h5"
    with EpisodeWriter(path) as writer:
        writer.append(replace(episode, decisions=no_cull))
    export_d3rlpy(path, tmp_path / "d.h5")
    assert load_d3rlpy(tmp_path / "d.h5").dataset_info.action_size == 4
    with open(tmp_path / "d.h5", "rb") as f:  # what d3rlpy alone infers: the largest action + 1
        assert d3rlpy.dataset.ReplayBuffer.load(f, d3rlpy.dataset.InfiniteBuffer()).dataset_info.action_size < 4
