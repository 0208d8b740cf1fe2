"""The engine version is part of an episode's identity (`EpisodeConfig.engine`).

Stores collected by the engine before the batched one (engine 1, configs stored without the
field) stay readable: they open, list, export and train as before. Episodes of two engines are
never mixed: not in one store (collect, `EpisodeWriter.append`, DAgger rounds, improve's bootstrap
store refuse), not in one training set (`simic train`, both objectives), and a run saved by
engine 1 is not resumed by this one. The engine-1 stores here hold real episodes whose config is
set back to engine 1, written by the real writer: what an old store holds, field for field.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from cli_helpers import info_json, invoke, one_line_error, succeed
from episode_helpers import assert_same_episode

from esper_cli import hookimpl
from esper_cli.contracts import ENGINE_VERSION, Episode, EpisodeConfig
from esper_cli.data.decisions import DataError, load_decisions, require_one_engine
from esper_cli.data.store import EngineMismatchError, EpisodeReader, EpisodeWriter, StoreError
from esper_cli.learning.dagger_state import run_state_path
from esper_cli.learning.run_state import RunStateError, config_difference, load_run_state, save_run_state
from esper_cli.learning.training import TrainConfig, train_policy
from esper_cli.plugins import build_registry, registered_plugin
from esper_cli.running.collection import CollectConfig, collect_episodes
from esper_cli.running.runner import SerialRunner
from esper_cli.simulation.episode import EpisodeSpec, run_episodes

EPOCHS = 4
SEED = 3


def as_engine_one(ep: Episode) -> Episode:
    """The episode as the engine before the batched one stored it: its config without an engine."""
    return replace(ep, config=replace(ep.config, engine=1))


def write_store(path: Path, episodes: list[Episode]) -> Path:
    with EpisodeWriter(path) as writer:
        writer.append_many(episodes)
    return path


def unguarded_append(path: Path, episodes: list[Episode]) -> None:
    """Append as the writer of the batched engine's first commit did, before it refused other engines
    (the one way a store came to mix engines), so the readers' own refusal can be tested."""
    with EpisodeWriter(path) as writer:
        writer.engine_versions.clear()
        writer.append_many(episodes)


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


@pytest.fixture(scope="module")
def episodes() -> list[Episode]:
    """Four real episodes of this engine, driven by `random` so every action occurs."""
    reg = build_registry()
    config = EpisodeConfig(epochs=EPOCHS)
    specs = [EpisodeSpec(reg.policies["random"](), config, SEED, i, "random", "1") for i in range(4)]
    out = run_episodes(specs, task=reg.tasks["digits"], blueprints=reg.blueprints)
    assert all(isinstance(ep, Episode) for ep in out), out
    return out


@pytest.fixture(scope="module")
def old_store(tmp_path_factory, episodes) -> Path:
    """A store of engine-1 episodes (read-only for the tests: copy it to write)."""
    return write_store(tmp_path_factory.mktemp("old") / "old.h5", [as_engine_one(ep) for ep in episodes])


@pytest.fixture
def old_copy(old_store, tmp_path) -> Path:
    copy = tmp_path / "old.h5"
    shutil.copyfile(old_store, copy)
    return copy


@pytest.fixture
def mixed_store(tmp_path, episodes) -> Path:
    path = write_store(tmp_path / "mixed.h5", [as_engine_one(ep) for ep in episodes[:2]])
    unguarded_append(path, episodes[2:])
    return path


# ------------------------------------------------------------------------ an engine-1 store reads
def test_an_engine_one_store_holds_what_old_stores_hold_and_reads_back(old_store, episodes):
    with EpisodeReader(old_store) as reader:
        assert reader.engine_versions() == {1: 4}
        assert reader.summary()["engine_versions"] == [1]
        # Stored like the episodes written before the engine had a version: no engine key at all.
        assert all("engine" not in reader.episode_meta(i)["config"] for i in range(4))
        got = [reader.episode(i) for i in range(4)]
    for ep, want in zip(got, episodes):
        assert ep.config.engine == 1 and ep.config == replace(want.config, engine=1)
        assert ep.key == as_engine_one(want).key != want.key  # the engine is part of the identity
        np.testing.assert_array_equal(ep.final_observation, want.final_observation)
        assert_same_episode(replace(ep, final_observation=None), replace(as_engine_one(want), final_observation=None))
    assert EpisodeConfig.from_dict({"epochs": EPOCHS}).engine == 1
    # The key of the default config as stores before the engine had a version hold it (tests/test_dagger.py).
    assert EpisodeConfig(engine=1).key("heuristic") == "e6fb07077d0600c7"


def test_simic_info_shows_each_stores_engine(old_store, tmp_path, episodes, mixed_store):
    report = info_json(old_store)
    assert report["engine_versions"] == [1] and report["episodes_per_engine"] == {"1": 4}
    assert [e["engine"] for e in report["episodes"]] == [1] * 4
    assert f"1 (this Simic runs engine {ENGINE_VERSION})" in succeed("info", "--store", old_store)

    new = write_store(tmp_path / "new.h5", episodes[:1])
    assert info_json(new)["engine_versions"] == [ENGINE_VERSION]
    table = succeed("info", "--store", new)
    assert "engine" in table and "this Simic runs" not in table

    mixed = info_json(mixed_store)
    assert mixed["engine_versions"] == [1, 2] and mixed["episodes_per_engine"] == {"1": 2, "2": 2}
    assert [e["engine"] for e in mixed["episodes"]] == [1, 1, 2, 2]
    assert "1: 2 episodes, 2: 2 episodes (mixed" in succeed("info", "--store", mixed_store)
    assert info_json(write_store(tmp_path / "empty.h5", []))["engine_versions"] == []


def test_an_engine_one_store_trains_and_exports_as_before(old_store, tmp_path):
    out = tmp_path / "mlp.safetensors"
    trained = json.loads(succeed("train", "--store", old_store, "--epochs", 3, "--allow-missing-classes",
                                 "--out", out, "--json"))
    assert out.is_file() and trained["epochs_run"] == 3
    assert load_decisions(old_store).engine_versions() == {1: 4}
    d3 = tmp_path / "d3rlpy.h5"
    exported = json.loads(succeed("export", "--format", "d3rlpy", "--store", old_store, "--out", d3, "--json"))
    assert d3.is_file() and exported["episodes"] == 4


# --------------------------------------------------------------------- appends never mix engines
def test_the_writer_refuses_episodes_of_another_engine_and_writes_nothing(old_copy, episodes, tmp_path):
    before = digest(old_copy)
    with EpisodeWriter(old_copy) as writer:
        with pytest.raises(EngineMismatchError) as refused:
            writer.append(episodes[0])
        assert str(old_copy) in str(refused.value) and "engine 1" in str(refused.value)
        assert "engine 2" in str(refused.value)
        assert isinstance(refused.value, StoreError) and refused.value.exit_code == 2
        assert writer.n_episodes == 4
        with pytest.raises(EngineMismatchError):  # all or nothing: one foreign episode refuses the batch
            writer.append_many([as_engine_one(episodes[0]), episodes[1]])
        assert writer.n_episodes == 4 and writer.engine_versions == {1: 4}
    with EpisodeReader(old_copy) as reader:
        assert reader.n_episodes == 4 and reader.engine_versions() == {1: 4}
    assert digest(old_copy) == before

    # With the engine to append known, the store is refused at open; its lock is released.
    with pytest.raises(EngineMismatchError, match="holds engine 1 episodes"):
        EpisodeWriter(old_copy, engine=ENGINE_VERSION)
    assert digest(old_copy) == before and siblings(old_copy) == ["old.h5"]
    with EpisodeWriter(old_copy, engine=1) as writer:  # its own engine still appends
        assert writer.engine_versions == {1: 4}

    fresh = tmp_path / "fresh.h5"
    with EpisodeWriter(fresh) as writer:
        with pytest.raises(EngineMismatchError, match="engines 1 and 2"):
            writer.append_many([as_engine_one(episodes[0]), episodes[1]])
        assert writer.n_episodes == 0
        writer.append(episodes[0])  # the first engine appended is the store's
        with pytest.raises(EngineMismatchError, match="holds engine 2 episodes"):
            writer.append(as_engine_one(episodes[1]))
        assert writer.engine_versions == {ENGINE_VERSION: 1}


class Counted:
    """A plugin whose policy records every build: a refused collect must build none."""

    built: list[str] = []

    @hookimpl
    def register_policies(self, register):
        def factory():
            Counted.built.append("counted")
            return build_registry().policies["heuristic"]()

        register("counted", factory)


def test_simic_collect_into_a_store_of_another_engine_is_refused_before_any_episode(old_copy):
    before = digest(old_copy)
    Counted.built.clear()
    with registered_plugin(Counted(), name="counted"):
        result = invoke("collect", "--policy", "counted", "--store", old_copy, "--episodes", 1, "--epochs", EPOCHS)
    one_line_error(result, str(old_copy), "engine 1", f"engine {ENGINE_VERSION}")
    assert Counted.built == [] and digest(old_copy) == before and siblings(old_copy) == ["old.h5"]


def test_collect_episodes_refuses_before_any_episode_runs(old_copy):
    plan = CollectConfig(episode=EpisodeConfig(epochs=EPOCHS), policy="heuristic", seed=SEED, episodes=2, version="1")
    started = []
    with EpisodeWriter(old_copy) as writer, SerialRunner(registry=build_registry()) as runner:
        with pytest.raises(EngineMismatchError):
            collect_episodes(writer, runner, plan, on_start=lambda todo, _: started.append(todo))
        assert writer.n_episodes == 4
    assert started == []


def test_simic_dagger_rounds_refuse_a_store_of_another_engine(old_copy, tmp_path):
    before = digest(old_copy)
    out = tmp_path / "ckpt" / "mlp.safetensors"
    result = invoke("dagger", "--rounds", 1, "--store", old_copy, "--out", out, "--episodes-per-round", 1,
                    "--compare-episodes", 1, "--eval-seed", 500, "--epochs", EPOCHS, "--train-epochs", 2,
                    "--allow-missing-classes")
    one_line_error(result, str(old_copy), "engine 1", f"engine {ENGINE_VERSION}")
    assert digest(old_copy) == before and not out.parent.exists()  # no checkpoint, no run state


def test_simic_improve_refuses_a_bootstrap_store_of_another_engine(old_store, tmp_path):
    out = tmp_path / "improved.safetensors"
    bootstrap = tmp_path / "improved.bootstrap.h5"  # where improve keeps (and reuses) its bootstrap episodes
    shutil.copyfile(old_store, bootstrap)
    before = digest(bootstrap)
    result = invoke("improve", "--out", out, "--episodes", 4, "--episodes-per-update", 4, "--bootstrap-episodes", 2,
                    "--epochs", EPOCHS)
    one_line_error(result, str(bootstrap), "engine 1", f"engine {ENGINE_VERSION}")
    assert digest(bootstrap) == before and siblings(bootstrap) == ["improved.bootstrap.h5"]


# ------------------------------------------------------------------ training sets never mix engines
@pytest.mark.parametrize("objective", ["bc", "outcome"])
def test_simic_train_refuses_a_store_mixing_engines(mixed_store, tmp_path, objective):
    out = tmp_path / "mlp.safetensors"
    result = invoke("train", "--store", mixed_store, "--objective", objective, "--epochs", 2,
                    "--allow-missing-classes", "--out", out)
    one_line_error(result, str(mixed_store), "engines 1 and 2", "2 of engine 1, 2 of engine 2")
    assert not out.exists()


def test_the_training_library_refuses_a_store_mixing_engines(mixed_store, old_store, tmp_path):
    # `train_policy` is what DAgger's rounds and improve's bootstrap train through.
    with pytest.raises(DataError, match="mixes episodes of engines 1 and 2"):
        train_policy(mixed_store, TrainConfig("mlp", epochs=2, allow_missing_classes=True), out=tmp_path / "m.pt")
    data = load_decisions(mixed_store)  # reading it is fine; building one training set of it is not
    assert data.engine_versions() == {1: 2, 2: 2}
    with pytest.raises(DataError):
        require_one_engine(data, "this training set")
    require_one_engine(data.select([0, 1]), "engine 1's episodes alone")
    require_one_engine(load_decisions(old_store), "an engine-1 store")


# --------------------------------------------------------------------- resume across engines
def drop_engine_from_state(path: Path) -> None:
    """Rewrite a run state as the engine before the batched one saved it: its episode config without
    the engine (the version this Simic reads as engine 1)."""
    tensors, state = load_run_state(path)
    del state["config"]["episode"]["engine"]
    save_run_state(path, tensors, state)


def test_a_dagger_run_saved_by_engine_one_is_not_resumed(tmp_path):
    store, out = tmp_path / "agg.h5", tmp_path / "mlp.safetensors"
    args = ("dagger", "--rounds", 0, "--store", store, "--out", out, "--bootstrap-episodes", 2, "--seed", SEED,
            "--compare-episodes", 1, "--eval-seed", 500, "--epochs", EPOCHS, "--train-epochs", 2,
            "--allow-missing-classes")
    succeed(*args)
    state = run_state_path(out)
    saved = load_run_state(state)[1]["config"]
    drop_engine_from_state(state)
    assert "engine" not in load_run_state(state)[1]["config"]["episode"]
    # The generic difference would read "null -> 2"; the refusal says what changed.
    assert config_difference(load_run_state(state)[1]["config"], saved) == "episode.engine: null -> 2"
    line = one_line_error(invoke(*args), str(state), "engine 1 -> 2", "--restart")
    assert "null" not in line


def test_an_improve_run_saved_by_engine_one_is_not_resumed(old_store, tmp_path):
    start = tmp_path / "start.safetensors"
    train_policy(old_store, TrainConfig("mlp", epochs=3, allow_missing_classes=True), out=start)
    out = tmp_path / "improved.safetensors"
    args = ("improve", "--from", start, "--out", out, "--episodes", 4, "--episodes-per-update", 4, "--epochs", EPOCHS,
            "--select-episodes", 1)
    succeed(*args)
    state = out.with_name("improved.run.safetensors")
    drop_engine_from_state(state)
    one_line_error(invoke(*args), str(state), "engine 1 -> 2", "--restart")


def test_a_run_state_refusal_names_the_engine_change_first(tmp_path):
    from esper_cli.learning.run_state import refuse_engine_change

    new = {"episode": EpisodeConfig(epochs=9).to_dict(), "seed": 1}
    old = {"episode": EpisodeConfig(epochs=3, engine=1).to_dict(), "seed": 0}
    with pytest.raises(RunStateError, match=r"engine 1 -> 2"):
        refuse_engine_change(tmp_path / "run.safetensors", old, new)
    refuse_engine_change(tmp_path / "run.safetensors", new, {**new, "seed": 2})  # same engine: the rest decides
