"""`simic export --format minari`: the dataset the real `minari.load_dataset` reads back holds the
store's observations (plus each final one), actions and rewards."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from cli_helpers import invoke, one_line_error
from test_store import make_episode

from esper_cli.export import export_minari
from esper_cli.store import EpisodeReader, EpisodeWriter

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
    metadata = dataset.storage.metadata
    assert metadata["simic_episode_ids"] == ids
    assert metadata["simic_schema"]["version"] == 2 and len(metadata["simic_schema"]["feature_names"]) == 27
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
