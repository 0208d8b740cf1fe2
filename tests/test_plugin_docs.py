"""docs/plugins.md against the code: its generated feature table, its sample `simic plugins`
output, and its worked example, which is extracted, pip-installed, trained and compared for real."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from pip_helpers import is_installed, pip_installed, simic_process

import esper_cli
from esper_cli.checkpoint import Checkpoint
from esper_cli.contracts import feature_table
from esper_cli.plugins import CORE_DISTRIBUTION, build_registry

DOCS = Path(__file__).resolve().parents[1] / "docs" / "plugins.md"
TEXT = DOCS.read_text()
DIST = "simic-probe-policy"


def files_of_the_worked_example() -> dict[str, str]:
    """The fenced blocks whose info string names a file (```python title="src/x.py"```)."""
    blocks = re.findall(r'^```\w+ title="([^"]+)"\n(.*?)^```$', TEXT, flags=re.M | re.S)
    return dict(blocks)


def test_the_docs_feature_table_is_the_one_the_code_generates():
    table = re.search(r"<!-- features:begin[^>]*-->\n(.*?)\n<!-- features:end -->", TEXT, flags=re.S)
    assert table is not None, "docs/plugins.md lost its feature-table markers"
    assert table.group(1) == feature_table()
    assert len(table.group(1).splitlines()) == 2 + esper_cli.N_FEATURES


def test_what_a_policy_author_needs_is_public_api():
    for name in ("valid_action_mask", "FEATURE_NAMES", "FEATURE_MEANINGS", "Checkpoint", "CheckpointError",
                 "load_policy_checkpoint"):
        assert name in esper_cli.__all__ and f"`{name}`" in TEXT
    assert list(esper_cli.FEATURE_MEANINGS) == list(esper_cli.FEATURE_NAMES)
    assert "esper_cli.checkpoint.load_policy_checkpoint" not in (
        Path(esper_cli.__file__).parent / "trainable.py").read_text()  # one name for it, the public one


def test_the_sample_simic_plugins_output_shows_every_builtin_plugin_and_what_it_registers():
    sample = TEXT[TEXT.index("$ simic plugins"):]
    sample = sample[: sample.index("```")]
    builtin = [p for p in build_registry().plugins.values() if p.distribution == CORE_DISTRIBUTION]
    assert {p.name for p in builtin} >= {"simic-core", "baselines", "gru", "heuristic", "mlp"}
    for plugin in builtin:
        assert re.search(rf"^ {re.escape(plugin.name)} +simic ", sample, flags=re.M), plugin.name
        for name in plugin.policies + plugin.blueprints + plugin.tasks:
            assert re.search(rf"\b{re.escape(name)}\b", sample), name
        for name in plugin.trainables:
            assert f"{name} (trainable)" in sample


def test_checkpoint_hparams_are_what_the_network_builder_takes(tmp_path):
    meta = {"policy": "probe_mlp", "hparams": {"hidden": 8, "batch_size": 4}}
    ckpt = Checkpoint(path=tmp_path / "c.safetensors", tensors={}, meta=meta, sha256="0" * 64)
    assert ckpt.hparams == {"hidden": 8}
    assert meta["hparams"] == {"hidden": 8, "batch_size": 4}  # the stored record is left whole


def test_the_worked_example_has_a_build_system_and_every_file_it_needs():
    files = files_of_the_worked_example()
    assert set(files) == {"pyproject.toml", "src/simic_probe/__init__.py"}
    assert "[build-system]" in files["pyproject.toml"]
    compile(files["src/simic_probe/__init__.py"], "src/simic_probe/__init__.py", "exec")


# ----------------------------------------------------------------------------- for real
@pytest.fixture(scope="module")
def installed_worked_example(tmp_path_factory):
    """The docs' worked example written out from its code blocks, pip-installed, uninstalled after."""
    assert not is_installed(DIST), f"{DIST} is installed already; uninstall it to run this test"
    root = tmp_path_factory.mktemp("worked-example") / DIST
    for rel, text in files_of_the_worked_example().items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    with pip_installed(root, DIST) as dist:
        yield dist


@pytest.mark.slow
def test_the_worked_example_installs_trains_and_compares(installed_worked_example, tmp_path):
    listed = simic_process("plugins", "--json")
    assert listed.returncode == 0, listed.stderr
    row = {r["name"]: r for r in json.loads(listed.stdout)}[DIST]
    assert (row["policies"], row["trainables"], row["error"]) == (["cautious", "probe_mlp"], ["probe_mlp"], None)

    # Piped (this process's stdout is a pipe), the table keeps every name whole.
    table = simic_process("plugins")
    assert "simic-probe-policy" in table.stdout and "probe_mlp (trainable)" in table.stdout
    assert "…" not in table.stdout

    store, ckpt = tmp_path / "heuristic.h5", tmp_path / "probe_mlp.safetensors"
    result = simic_process("collect", "--episodes", "3", "--epochs", "10", "--store", str(store))
    assert result.returncode == 0, result.stderr
    result = simic_process("train", "--policy", "probe_mlp", "--store", str(store), "--out", str(ckpt),
                           "--epochs", "4", "--allow-missing-classes", "--json")
    assert result.returncode == 0, result.stderr
    trained = json.loads(result.stdout)
    assert trained["policy"] == "probe_mlp" and ckpt.exists()

    result = simic_process("compare", "heuristic", "cautious", f"probe_mlp={ckpt}", "--episodes", "2",
                           "--epochs", "10", "--mode", "closed-loop", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)["closed_loop"]
    assert report["cautious"]["n_episodes"] == 2 and report["probe_mlp"]["n_episodes"] == 2
    assert report["probe_mlp"]["policy_version"].startswith("0.1.0+")
    assert report["cautious"]["seeds_created"] >= 0

    piped = simic_process("compare", "heuristic", "cautious", "--episodes", "1", "--epochs", "4",
                          "--mode", "closed-loop")
    assert piped.returncode == 0, piped.stderr
    assert "final val" in piped.stdout and "expert agreement" in piped.stdout and "…" not in piped.stdout
