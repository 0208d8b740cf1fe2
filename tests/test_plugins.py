"""Plugins: hooks, `simic plugins`, failure isolation, SIMIC_LOAD_PLUGINS, collisions.

Most tests register a plugin on the real process-wide plugin manager for the duration of one test
(`esper_cli.plugins.registered_plugin`) and drive the real CLI in-process. Broken *installed*
plugins are real distributions: a `.dist-info` with an `entry_points.txt` written to a temporary
folder put on `sys.path`, found by `importlib.metadata` exactly like a pip-installed one.
"""

from __future__ import annotations

import ast
import importlib
import json
import re
import sys
import textwrap
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from cli_helpers import info_json, one_line_error
from cli_helpers import invoke as simic
from episode_helpers import assert_same_episode

import esper_cli
from esper_cli import hookimpl, hookspecs
from esper_cli.checkpoint import load_checkpoint
from esper_cli.contracts import Action, Decision, EpisodeConfig, SeedStage
from esper_cli.data.store import EpisodeReader
from esper_cli.plugins import (
    CORE_PLUGIN,
    HOOK_KINDS,
    build_registry,
    get_plugin_manager,
    registered_plugin,
    reset_plugin_manager,
)
from esper_cli.simulation.episode import run_episode
from esper_cli.tasks import BUILTIN_TASKS, Task
from esper_cli.trainable import TrainablePolicy

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--epochs", "6"]


def plugins_json() -> dict[str, dict]:
    result = simic("plugins", "--json")
    assert result.exit_code == 0, result.output
    return {p["name"]: p for p in json.loads(result.stdout)}


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True)
def fresh_plugin_manager(monkeypatch):
    """Every test starts and ends with a manager built from the real environment (no filter)."""
    monkeypatch.delenv("SIMIC_LOAD_PLUGINS", raising=False)
    reset_plugin_manager()
    yield
    reset_plugin_manager()


@pytest.fixture
def use_plugin():
    """`use_plugin(obj, name)`: register a plugin for the rest of this one test."""
    with ExitStack() as stack:
        yield lambda plugin, name: stack.enter_context(registered_plugin(plugin, name=name))


@pytest.fixture
def fake_dist(tmp_path, monkeypatch):
    """`fake_dist(dist, entry_points={name: module}, modules={module: source})`: a real installed
    distribution (dist-info on sys.path) for the rest of this one test."""
    site = tmp_path / "site"
    site.mkdir()
    monkeypatch.syspath_prepend(str(site))

    def make(dist: str, entry_points: dict[str, str], modules: dict[str, str], version: str = "9.9") -> None:
        info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        lines = "".join(f"{name} = {target}\n" for name, target in entry_points.items())
        (info / "entry_points.txt").write_text(f"[simic]\n{lines}")
        for module, source in modules.items():
            (site / f"{module}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        reset_plugin_manager()

    yield make
    for module in list(sys.modules):
        if (getattr(sys.modules[module], "__file__", None) or "").startswith(str(site)):
            del sys.modules[module]


# -------------------------------------------------------------------------------- test plugins
class WaitThenGrow:
    """A tiny deterministic policy: wait, germinate a named blueprint at epoch 2, then advance."""

    name = "grow"

    def __init__(self, blueprint: str | None = None) -> None:
        self.blueprint = blueprint
        self.resets = 0

    def reset(self, context) -> None:
        self.resets += 1

    def decide(self, obs, context) -> Decision:
        if not obs.has_active_seed and obs.epoch == 2:
            return Decision(Action.GERMINATE, "epoch 2: grow", 0.9, blueprint=self.blueprint)
        if obs.has_active_seed and obs.seed_stage == SeedStage.GERMINATED:
            return Decision(Action.ADVANCE, "train it", 1.0)
        return Decision(Action.WAIT, "wait", 0.5)


class TinySeed(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.mix = torch.nn.Conv2d(channels, channels, 1)
        torch.nn.init.zeros_(self.mix.weight)
        torch.nn.init.zeros_(self.mix.bias)

    def forward(self, h):
        return self.mix(h)


def _small_digits(data_dir, split_seed):
    """The bundled digits, cut to a quarter: a genuinely different (and faster) task."""
    from esper_cli.tasks import TaskData

    d = BUILTIN_TASKS["digits"].load(data_dir, split_seed)
    return TaskData(d.train_x[:270], d.train_y[:270], d.val_x[:90], d.val_y[:90], d.test_x[:90], d.test_y[:90])


SMALL_TASK = Task(name="small-digits", description="a quarter of digits", load=_small_digits,
                  build_host=BUILTIN_TASKS["digits"].build_host)


class EverythingPlugin:
    """A plugin adding one policy, one blueprint and one task: all three hooks."""

    @hookimpl
    def register_policies(self, register):
        register("grow", lambda: WaitThenGrow(blueprint="tiny_seed"))

    @hookimpl
    def register_blueprints(self, register):
        register("tiny_seed", TinySeed)

    @hookimpl
    def register_tasks(self, register):
        register("small-digits", SMALL_TASK)


# -------------------------------------------------------------------------------------- basics
def test_hookimpl_is_reexported_and_core_plugins_load_through_the_hooks():
    assert esper_cli.hookimpl is hookspecs.hookimpl
    reg = build_registry()
    assert reg.plugins[CORE_PLUGIN].blueprints == ["conv_enhance", "attention", "norm", "depthwise", "pool_mixer"]
    assert reg.plugins[CORE_PLUGIN].tasks == ["digits", "cifar10"]
    assert reg.plugin_of("policy", "heuristic").distribution == "simic"  # an ordinary entry point
    assert all(not p.errors for p in reg.plugins.values()), reg.problems


def test_the_public_api_is_what_esper_cli_lists_and_each_name_resolves():
    assert set(esper_cli.__all__) == {"__version__", *esper_cli._PUBLIC}
    from esper_cli.contracts import TrainingSnapshot
    from esper_cli.trainable import TrainablePolicy

    assert esper_cli.TrainingSnapshot is TrainingSnapshot and esper_cli.TrainablePolicy is TrainablePolicy
    assert all(getattr(esper_cli, name) is not None for name in esper_cli.__all__)
    with pytest.raises(AttributeError, match="no attribute 'training'"):  # internals are not the API
        esper_cli.training  # noqa: B018


def test_plugins_json_lists_every_plugin_with_distribution_version_and_registrations():
    rows = plugins_json()
    heuristic = rows["heuristic"]
    assert heuristic["distribution"] == "simic" and heuristic["version"] == esper_cli.__version__
    assert heuristic["policies"] == ["heuristic"] and heuristic["error"] is None
    assert heuristic["module"] == "simic_plugins.heuristic"
    for row in rows.values():
        assert {"name", "version", "policies", "blueprints", "tasks", "error"} <= set(row)
    table = simic("plugins")
    assert table.exit_code == 0 and "heuristic" in table.stdout and "simic-core" in table.stdout


def test_register_policies_blueprints_and_tasks_for_one_test(use_plugin, tmp_path):
    use_plugin(EverythingPlugin(), "everything")
    row = plugins_json()["everything"]
    assert (row["policies"], row["blueprints"], row["tasks"], row["error"]) == (
        ["grow"], ["tiny_seed"], ["small-digits"], None)

    # The CLI uses all three: the plugin's policy on the plugin's task, growing its blueprint.
    store = tmp_path / "s.h5"
    result = simic("collect", "--policy", "grow", "--task", "small-digits", "--episodes", "2",
                   "--store", str(store), *TINY)
    assert result.exit_code == 0, result.output
    report = info_json(store)
    assert report["n_episodes"] == 2
    assert {e["policy"] for e in report["episodes"]} == {"grow"}
    assert all(e["seeds_created"] == 1 and e["action_counts"]["GERMINATE"] == 1 for e in report["episodes"])

    reg = build_registry()
    episode = run_episode(reg.policies["grow"](), EpisodeConfig(task="small-digits", epochs=4), 0, 0,
                          task=reg.tasks["small-digits"], blueprints=reg.blueprints, policy_name="grow")
    assert [s.blueprint for s in episode.seeds] == ["tiny_seed"]


class CentroidNet(torch.nn.Module):
    """A third party's trainable network: logits = -squared distance to a learned centroid per action."""

    def __init__(self, scale: float = 1.0) -> None:
        super().__init__()
        self.centroids = torch.nn.Parameter(torch.zeros(4, 27))
        self.scale = scale

    def forward(self, x):
        return -self.scale * ((x[:, None, :] - self.centroids[None]) ** 2).sum(-1)


class CentroidTamiyo:
    """Decides from a `simic train --policy centroid` checkpoint: the nearest centroid's action."""

    name = "centroid"

    def __init__(self, checkpoint=None) -> None:
        from esper_cli import load_policy_checkpoint

        self.checkpoint = load_policy_checkpoint("centroid", checkpoint)
        self.centroids = self.checkpoint.tensors["centroids"].double().numpy()
        self.mean, self.std = self.checkpoint.normalisation

    def reset(self, context) -> None:
        pass

    def decide(self, obs, context=None) -> Decision:
        x = (obs.to_vector() - self.mean) / self.std
        return Decision(Action(int(((x - self.centroids) ** 2).sum(1).argmin())), "nearest centroid", 1.0)


class CentroidPlugin:
    @hookimpl
    def register_policies(self, register):
        register("centroid", CentroidTamiyo)

    @hookimpl
    def register_trainable_policies(self, register):
        from esper_cli import TrainablePolicy

        register("centroid", TrainablePolicy(CentroidNet, {"scale": 0.5, "batch_size": 16}, lr=0.05))
        register("bad-trainable", object())  # not a TrainablePolicy: reported and skipped
        register("no-policy", TrainablePolicy(CentroidNet))  # trainable, but nothing decides with it


def test_a_plugin_registers_a_trainable_policy_that_simic_train_fits_and_compare_runs(use_plugin, tmp_path):
    use_plugin(CentroidPlugin(), "centroid-plugin")
    row = plugins_json()["centroid-plugin"]
    assert row["policies"] == ["centroid"] and row["trainables"] == ["centroid", "no-policy"]
    assert "trainable policy 'bad-trainable' is not an esper_cli.trainable.TrainablePolicy" in row["error"]
    assert "centroid (trainable)" in simic("plugins").stdout

    store, ckpt = tmp_path / "s.h5", tmp_path / "centroid.safetensors"
    assert simic("collect", "--episodes", "3", "--store", str(store), *TINY).exit_code == 0
    result = simic("train", "--policy", "centroid", "--store", str(store), "--out", str(ckpt), "--epochs", "3",
                   "--allow-missing-classes", "--json")
    assert result.exit_code == 0, result.output
    meta = load_checkpoint(ckpt).meta
    assert meta["policy"] == "centroid" and meta["hparams"] == {"scale": 0.5, "batch_size": 16}
    assert meta["train_config"]["lr"] == 0.05 and json.loads(result.stdout)["epochs_run"] == 3
    result = simic("compare", "heuristic", f"centroid={ckpt}", "--episodes", "1", "--mode", "closed-loop",
                   "--json", *TINY)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["closed_loop"]["centroid"]["n_episodes"] == 1

    no_policy = simic("train", "--policy", "no-policy", "--store", str(store), "--out", str(tmp_path / "x"))
    assert no_policy.exit_code == 2 and "no policy of that name decides with it" in no_policy.stderr
    not_trainable = simic("train", "--policy", "heuristic", "--store", str(store))
    assert not_trainable.exit_code == 2
    assert "policy 'heuristic' cannot be trained: no plugin registers it as trainable (trainable: centroid, gru, mlp)" \
        in not_trainable.stderr


class ForgetfulTamiyo(CentroidTamiyo):
    """A trainable policy as the docs allow: it decides with the tensors and keeps no `checkpoint`."""

    name = "forgetful"

    def __init__(self, checkpoint=None) -> None:
        from esper_cli import load_policy_checkpoint

        ckpt = load_policy_checkpoint("forgetful", checkpoint)
        self.centroids = ckpt.tensors["centroids"].double().numpy()
        self.mean, self.std = ckpt.normalisation


class HoarderTamiyo(ForgetfulTamiyo):
    """Not trainable, and loads a checkpoint nobody handed it: its training episodes are unknown."""

    name = "hoarder"
    path: Path | None = None

    def __init__(self) -> None:
        from esper_cli import load_policy_checkpoint

        self.checkpoint = load_policy_checkpoint("forgetful", self.path)
        self.centroids = self.checkpoint.tensors["centroids"].double().numpy()
        self.mean, self.std = self.checkpoint.normalisation


class ForgetfulPlugin:
    @hookimpl
    def register_policies(self, register):
        register("forgetful", ForgetfulTamiyo)
        register("hoarder", HoarderTamiyo)

    @hookimpl
    def register_trainable_policies(self, register):
        from esper_cli import TrainablePolicy

        register("forgetful", TrainablePolicy(CentroidNet, {"scale": 0.5, "batch_size": 16}, lr=0.05))


@pytest.fixture
def forgetful(use_plugin, tmp_path, simic_home, monkeypatch):
    """A store of run seed 0 and a `forgetful` checkpoint trained on it at its default path."""
    use_plugin(ForgetfulPlugin(), "forgetful-plugin")
    store = tmp_path / "s.h5"
    ckpt = simic_home / "checkpoints" / "forgetful.safetensors"
    assert simic("collect", "--episodes", "6", "--store", str(store), *TINY).exit_code == 0
    result = simic("train", "--policy", "forgetful", "--store", str(store), "--out", str(ckpt), "--epochs", "2",
                   "--allow-missing-classes", "--val-fraction", "0.5")
    assert result.exit_code == 0, result.output
    monkeypatch.setattr(HoarderTamiyo, "path", ckpt)
    return store, ckpt, load_checkpoint(ckpt).meta["split"]


@pytest.mark.parametrize("named", [True, False], ids=["--checkpoint", "default checkpoint"])
def test_eval_holds_out_a_trainable_policys_training_episodes_without_its_help(forgetful, named):
    store, ckpt, split = forgetful
    which = ["--checkpoint", str(ckpt)] if named else ["--policy", "forgetful"]
    result = simic("eval", *which, "--store", str(store), "--split", "val", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_episodes"] == 6 - len(split["train_ids"]) == len(split["val_ids"])
    assert "held-out" in report["split_note"] and report["checkpoint"] == str(ckpt)


def test_compare_picks_a_seed_a_trainable_policy_did_not_train_on_without_its_help(forgetful):
    _, ckpt, _ = forgetful
    result = simic("compare", "heuristic", f"forgetful={ckpt}", "--episodes", "1", "--mode", "closed-loop",
                   "--json", *TINY)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["seed"] != 0 and report["seed_choice"]["held_out"]
    assert report["seed_choice"]["checkpoints_trained_on"] == ["forgetful"]


def test_a_policy_holding_a_checkpoint_nobody_handed_it_is_never_called_held_out(forgetful):
    store, _, _ = forgetful
    line = one_line_error(simic("eval", "--policy", "hoarder", "--store", str(store), "--split", "val"),
                          "--split val", "hoarder")
    assert "--split all" in line
    assert simic("eval", "--policy", "hoarder", "--store", str(store), "--split", "all").exit_code == 0
    result = simic("compare", "heuristic", "hoarder", "--episodes", "1", "--mode", "closed-loop", "--json", *TINY)
    assert result.exit_code == 0, result.output
    assert "Warning:" in result.stderr and "'hoarder'" in result.stderr
    choice = json.loads(result.stdout)["seed_choice"]
    assert not choice["held_out"] and choice["training_unknown"] == ["hoarder"]


def test_a_plugin_registered_for_one_test_is_gone_afterwards():
    with registered_plugin(EverythingPlugin(), name="temporary"):
        assert "grow" in build_registry().policies
    reg = build_registry()
    assert "grow" not in reg.policies and "temporary" not in reg.plugins
    assert not get_plugin_manager().has_plugin("temporary")


def test_a_hook_may_take_no_argument(use_plugin):
    class NoArgs:
        @hookimpl
        def register_policies(self):
            pass

    use_plugin(NoArgs(), "no-args")
    assert build_registry().plugins["no-args"].errors == []


# ------------------------------------------------------------------------------ collisions etc.
def test_policy_name_collision_is_reported_and_the_original_kept(use_plugin, tmp_path):
    class Impostor:
        @hookimpl
        def register_policies(self, register):
            register("heuristic", WaitThenGrow)
            register("impostor-only", WaitThenGrow)

    use_plugin(Impostor(), "impostor")
    reg = build_registry()
    assert type(reg.policies["heuristic"]()).__name__ == "HeuristicTamiyo"
    assert reg.plugin_of("policy", "heuristic").name == "heuristic"
    assert "impostor-only" in reg.policies  # the rest of the plugin still works
    assert plugins_json()["impostor"]["error"] == (
        "policy 'heuristic' is already registered by plugin 'heuristic'; skipped")
    result = simic("collect", "--episodes", "1", "--store", str(tmp_path / "s.h5"), *TINY)
    assert result.exit_code == 0, result.output
    assert "plugin 'impostor': policy 'heuristic' is already registered" in result.stderr
    assert info_json(tmp_path / "s.h5")["episodes"][0]["policy"] == "heuristic"


def test_an_installed_plugin_sorting_first_cannot_take_over_a_builtin_name(fake_dist):
    fake_dist("aaa-takeover", {"aaa": "aaa_takeover"}, {"aaa_takeover": """
        from esper_cli import hookimpl

        class Fake:
            def reset(self, context): pass
            def decide(self, obs, context): return 0

        @hookimpl
        def register_policies(register):
            register("heuristic", Fake)
    """})
    reg = build_registry()
    assert reg.plugin_of("policy", "heuristic").name == "heuristic"
    assert reg.plugins["aaa"].distribution == "aaa-takeover" and reg.plugins["aaa"].version == "9.9"
    assert "already registered by plugin 'heuristic'" in reg.plugins["aaa"].error


def test_two_distributions_with_one_plugin_name_first_wins(fake_dist):
    source = """
        from esper_cli import hookimpl
        @hookimpl
        def register_policies(register):
            register({name!r}, lambda: None)
    """
    fake_dist("dup-a", {"dup": "dup_a"}, {"dup_a": source.format(name="from-a")})
    fake_dist("dup-b", {"dup": "dup_b"}, {"dup_b": source.format(name="from-b")})
    reg = build_registry()
    assert "from-a" in reg.policies and "from-b" not in reg.policies
    assert "plugin name 'dup' is already used by 'dup-a'" in reg.plugins["dup (dup-b)"].error


def test_invalid_registrations_are_reported_and_skipped_one_by_one(use_plugin):
    class Sloppy:
        @hookimpl
        def register_policies(self, register):
            register("", WaitThenGrow)
            register("has space", WaitThenGrow)
            register("not-callable", 42)
            register("ok", WaitThenGrow)
            register("ok", WaitThenGrow)

        @hookimpl
        def register_tasks(self, register):
            register("not-a-task", object())

    use_plugin(Sloppy(), "sloppy")
    info = build_registry().plugins["sloppy"]
    assert info.policies == ["ok"] and info.tasks == []
    assert len(info.errors) == 5, info.errors
    assert any("name '' is not valid" in e for e in info.errors)
    assert any("'has space' is not valid" in e for e in info.errors)
    assert any("'not-callable' is not callable" in e for e in info.errors)
    assert any("'ok' registered twice" in e for e in info.errors)
    assert any("task 'not-a-task' has no callable load / build_host" in e for e in info.errors)


# --------------------------------------------------------------------------- failure isolation
def test_a_plugin_whose_hook_raises_is_skipped_whole_and_the_cli_keeps_working(use_plugin, tmp_path):
    class HalfBroken:
        @hookimpl
        def register_policies(self, register):
            register("half", WaitThenGrow)

        @hookimpl
        def register_blueprints(self, register):
            raise RuntimeError("weights file missing")

    use_plugin(HalfBroken(), "half-broken")
    reg = build_registry()
    assert "half" not in reg.policies  # nothing from a broken plugin is kept
    assert plugins_json()["half-broken"]["error"] == (
        "register_blueprints failed: RuntimeError: weights file missing; plugin skipped")
    result = simic("collect", "--episodes", "1", "--store", str(tmp_path / "s.h5"), *TINY)
    assert result.exit_code == 0, result.output
    assert "Warning: plugin 'half-broken': register_blueprints failed: RuntimeError: weights file missing" in (
        result.stderr)
    bad = simic("collect", "--policy", "half", "--store", str(tmp_path / "s.h5"), *TINY)
    assert bad.exit_code == 2 and "unknown policy" in bad.stderr


def test_a_plugin_that_fails_to_import_is_reported_and_skipped(fake_dist, tmp_path):
    fake_dist("simic-broken", {"broken": "broken_plugin"}, {"broken_plugin": """
        raise ImportError("needs a package that is not installed")
    """})
    fake_dist("simic-exits", {"exits": "exits_plugin"}, {"exits_plugin": """
        import sys
        sys.exit("plugin called sys.exit at import")
    """})
    rows = plugins_json()
    assert rows["broken"]["error"] == (
        "failed to import broken_plugin: ImportError: needs a package that is not installed")
    assert rows["broken"]["distribution"] == "simic-broken" and rows["broken"]["version"] == "9.9"
    assert rows["broken"]["policies"] == []
    assert rows["exits"]["error"].startswith("failed to import exits_plugin: SystemExit")
    assert rows["heuristic"]["error"] is None
    table = simic("plugins")
    assert table.exit_code == 0 and "broken (error)" in table.stdout
    assert "broken: failed to import broken_plugin: ImportError: needs a package that is not installed" in (
        table.stdout)
    assert "2 plugin(s) reported problems: broken, exits" in table.stderr

    store = tmp_path / "s.h5"
    result = simic("collect", "--episodes", "1", "--store", str(store), *TINY)
    assert result.exit_code == 0, result.output
    assert "plugin 'broken': failed to import broken_plugin: ImportError" in result.stderr
    assert info_json(store)["n_episodes"] == 1


def test_pluggy_validation_errors_unknown_hooks_and_missing_markers_are_reported(fake_dist):
    fake_dist("simic-odd", {"wrong-args": "wrong_args", "typo": "typo_hook", "unmarked": "unmarked"}, {
        "wrong_args": """
            from esper_cli import hookimpl
            @hookimpl
            def register_policies(register, extra):
                pass
        """,
        "typo_hook": """
            from esper_cli import hookimpl
            @hookimpl
            def register_policy(register):
                pass
            @hookimpl
            def register_tasks(register):
                pass
        """,
        "unmarked": """
            def register_policies(register):
                register("never-seen", object)
        """,
    })
    rows = plugins_json()
    assert rows["wrong-args"]["error"].startswith("failed to register: PluginValidationError")
    assert "unknown hook(s) register_policy" in rows["typo"]["error"]
    assert "did you forget the @hookimpl marker?" in rows["unmarked"]["error"]
    assert "never-seen" not in build_registry().policies


def test_a_policy_raising_in_decide_fails_that_episode_and_keeps_the_store(use_plugin, tmp_path):
    built = []

    class Flaky(WaitThenGrow):
        def __init__(self):
            super().__init__()
            built.append(self)
            self.nth = len(built)  # collect builds one policy per episode

        def decide(self, obs, context):
            if self.nth == 2 and obs.epoch == 3:
                raise ZeroDivisionError("division by zero in my feature code")
            return super().decide(obs, context)

    class FlakyPlugin:
        @hookimpl
        def register_policies(self, register):
            register("flaky", Flaky)

    use_plugin(FlakyPlugin(), "flaky-plugin")
    store = tmp_path / "s.h5"
    result = simic("collect", "--policy", "flaky", "--episodes", "3", "--store", str(store), *TINY)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    assert errors[0].startswith("Error: policy 'flaky' raised in decide() at epoch 3 of episode 1"), errors[0]
    assert "ZeroDivisionError: division by zero in my feature code" in errors[0]
    # The episodes batched with the failing one finish and are committed; the failing one is not.
    committed = int(re.search(r"\((\d+) episodes committed before it; the store is intact\)", errors[0]).group(1))
    report = info_json(store)  # the store opens and holds exactly the episodes the message counts
    indices = sorted(e["index"] for e in report["episodes"])
    assert report["n_episodes"] == committed >= 1 and 1 not in indices and set(indices) <= {0, 2}
    assert report["n_decisions"] == 6 * committed
    with EpisodeReader(store) as reader:  # no partial episode 1: every decision belongs to a whole episode
        assert reader.n_episodes == committed and len(reader.decisions()["actions"]) == 6 * committed
        kept = {reader.episode(i).index: reader.episode(i) for i in range(reader.n_episodes)}

    # Every committed episode is what a run without the failure gives (instances past the 2nd are
    # not flaky): the failing batch-mate changed nothing in them.
    clean = tmp_path / "clean.h5"
    assert simic("collect", "--policy", "flaky", "--episodes", "3", "--store", str(clean), *TINY).exit_code == 0
    with EpisodeReader(clean) as reader:
        reference = {reader.episode(i).index: reader.episode(i) for i in range(reader.n_episodes)}
    for index, episode in kept.items():
        assert_same_episode(episode, reference[index])

    # The run resumes where it stopped once the policy behaves.
    again = simic("collect", "--policy", "flaky", "--episodes", "3", "--store", str(store), *TINY)
    assert again.exit_code == 0, again.output
    assert sorted(e["index"] for e in info_json(store)["episodes"]) == [0, 1, 2]
    with EpisodeReader(store) as reader:
        for i in range(reader.n_episodes):
            assert_same_episode(reader.episode(i), reference[reader.episode(i).index])


# ---------------------------------------------------------------------------- SIMIC_LOAD_PLUGINS
def test_simic_load_plugins_empty_loads_only_the_core(monkeypatch, tmp_path):
    monkeypatch.setenv("SIMIC_LOAD_PLUGINS", "")
    reset_plugin_manager()
    rows = plugins_json()
    assert list(rows) == [CORE_PLUGIN] and rows[CORE_PLUGIN]["error"] is None
    monkeypatch.setenv("SIMIC_LOAD_PLUGINS", "simic-core")  # naming the core is allowed, changes nothing
    reset_plugin_manager()
    assert plugins_json() == rows
    result = simic("collect", "--store", str(tmp_path / "s.h5"), *TINY)
    assert result.exit_code == 2 and "--policy 'heuristic': unknown policy (available: none)" in result.stderr


@pytest.mark.parametrize("value", ["heuristic", " heuristic , ", "simic", "Simic"])
def test_simic_load_plugins_selects_by_plugin_or_distribution_name(monkeypatch, fake_dist, value):
    fake_dist("simic-other", {"other": "other_plugin"}, {"other_plugin": """
        from esper_cli import hookimpl
        @hookimpl
        def register_policies(register):
            register("other", lambda: None)
    """})
    everything = build_registry()
    assert "other" in everything.policies  # installed and loadable...
    monkeypatch.setenv("SIMIC_LOAD_PLUGINS", value)
    reset_plugin_manager()
    reg = build_registry()  # ...but not selected
    if value.strip(" ,") == "heuristic":
        expected = {"heuristic"}
    else:  # a distribution name selects every plugin it ships (heuristic and the learned policies)
        expected = {p.name for p in everything.plugins.values() if p.distribution == "simic"} - {CORE_PLUGIN}
        assert "heuristic" in expected
    assert set(reg.plugins) == {CORE_PLUGIN, *expected} and "other" not in reg.policies
    assert all(not p.errors for p in reg.plugins.values()), reg.problems


def test_simic_load_plugins_reports_a_name_that_matches_nothing(monkeypatch):
    monkeypatch.setenv("SIMIC_LOAD_PLUGINS", "heuristic,heuristc")
    reset_plugin_manager()
    rows = plugins_json()
    assert rows["heuristic"]["error"] is None
    assert rows["heuristc"]["error"] == (
        "named in SIMIC_LOAD_PLUGINS, but no installed plugin or distribution has this name")


# -------------------------------------------------------------------------------------- meta
def _hookspec_names() -> list[str]:
    tree = ast.parse(Path(hookspecs.__file__).read_text())
    return [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
            and any(isinstance(d, ast.Name) and d.id == "hookspec" for d in node.decorator_list)]


def test_every_hookspec_is_documented_handled_and_tested():
    names = _hookspec_names()
    assert names == ["register_policies", "register_trainable_policies", "register_blueprints", "register_tasks"]
    docs = (ROOT / "docs" / "plugins.md").read_text()
    tests = "".join(p.read_text() for p in sorted((ROOT / "tests").glob("test_plugins*.py")))
    for name in names:
        assert re.search(rf"^#+ `{name}`", docs, re.MULTILINE), f"docs/plugins.md has no heading for {name}"
        assert f"def {name}(" in docs, f"docs/plugins.md has no example implementing {name}"
        assert re.search(rf"@hookimpl\s+def {name}\(", tests), f"no test implements the hook {name}"
        assert name in HOOK_KINDS, f"build_registry does not handle {name}"
    assert set(HOOK_KINDS) == set(names)
    assert set(get_plugin_manager().hook.__dict__) >= set(names)


# -------------------------------------------------------------- a name a broken plugin would have
def error_line(result, *fragments: str) -> str:
    """Exit 2 with one `Error:` line (after the failed plugin's warnings) naming `fragments`."""
    assert result.exit_code == 2, result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.stderr
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def test_a_policy_of_a_plugin_that_failed_to_import_is_reported_as_unavailable_and_why(fake_dist, tmp_path):
    fake_dist("simic-never", {"never": "never_plugin"}, {"never_plugin": """
        import simic_not_installed_anywhere
    """})
    store = str(tmp_path / "s.h5")
    why = "plugin 'never' failed to import never_plugin: ModuleNotFoundError: No module named 'simic_not_installed_anywhere'"
    line = error_line(simic("collect", "--policy", "never", "--store", store, *TINY),
                          "--policy 'never': policy unavailable: " + why, "(available: eager, gru, heuristic, mlp, random, wait)")
    assert "unknown policy" not in line
    error_line(simic("compare", "heuristic", "never", *TINY), "policy 'never': policy unavailable: " + why)
    error_line(simic("eval", "--policy", "never", "--store", store), "policy unavailable: " + why)
    error_line(simic("train", "--policy", "never", "--store", store), "cannot be trained: policy unavailable: " + why)


def test_an_unknown_policy_names_the_plugins_that_failed_to_load_as_possible_causes(fake_dist, tmp_path):
    fake_dist("simic-probe", {"simic-probe": "probe_plugin"}, {"probe_plugin": """
        raise ImportError("needs scipy")
    """})
    line = error_line(simic("collect", "--policy", "never", "--store", str(tmp_path / "s.h5"), *TINY),
                          "--policy 'never': unknown policy; plugin 'simic-probe' failed to import probe_plugin: "
                          "ImportError: needs scipy, and may have provided it (available: eager, gru, heuristic,")
    assert "unavailable" not in line


# ------------------------------------------------------------------------------ piped output
class LongNames:
    """A plugin whose names are wider than an 80-column table leaves them."""

    @hookimpl
    def register_policies(self, register):
        register("probe_mlp_with_a_name_long_enough_to_be_cut", WaitThenGrow)

    @hookimpl
    def register_trainable_policies(self, register):
        register("probe_mlp_with_a_name_long_enough_to_be_cut", TrainablePolicy(network=lambda **_: None))


def test_piped_tables_are_never_ellipsized(tmp_path):
    # CliRunner's stdout is not a terminal, like `simic plugins | cat`.
    with registered_plugin(LongNames(), name="simic-probe-policy-from-a-distribution-with-a-long-name"):
        table = simic("plugins")
        compare = simic("compare", "heuristic", "probe_mlp_with_a_name_long_enough_to_be_cut", "--episodes", "1",
                        "--epochs", "2")
    assert table.exit_code == 0, table.output
    assert "simic-probe-policy-from-a-distribution-with-a-long-name" in table.stdout
    assert "probe_mlp_with_a_name_long_enough_to_be_cut (trainable)" in table.stdout
    assert compare.exit_code == 0, compare.output
    for header in ("final val", "Δ val vs heuristic", "Δ test 95% CI", "expert agreement"):
        assert header in compare.stdout
    assert "…" not in table.stdout + compare.stdout
