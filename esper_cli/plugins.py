"""The plugin manager: loads `simic` entry points in isolation and builds the registries.

Every Tamiyo policy, Kasmina blueprint and Tolaria task, built-in or third-party, arrives through
a hook (see `esper_cli.hookspecs` and docs/plugins.md). A plugin that fails to import or to
register is recorded (which plugin, why) and skipped; the rest keep working.

`SIMIC_LOAD_PLUGINS` (comma-separated plugin names, i.e. entry-point names, or distribution names;
empty for none) limits which entry-point plugins load. The core plugin (`esper_cli.simulation.builtins`:
blueprints and tasks) always loads. The variable is read when the manager is created; tests that
change it call `reset_plugin_manager()`.

Order and collisions: the `simic` distribution's own entry points load first, then every other
distribution's, sorted by name, so the result never depends on the order `sys.path` lists them.
The first plugin to register a name keeps it; a later registration of the same name is reported
on the later plugin and skipped, never silently overwritten.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from . import __version__, hookspecs
from .simulation import builtins
from .trainable import TrainablePolicy

ENTRY_POINT_GROUP = "simic"
CORE_PLUGIN = "simic-core"
CORE_DISTRIBUTION = "simic"
ENV_VAR = "SIMIC_LOAD_PLUGINS"
#: hook name -> (kind of thing registered, PluginInfo / Registry attribute)
HOOK_KINDS: dict[str, tuple[str, str]] = {
    "register_policies": ("policy", "policies"),
    "register_trainable_policies": ("trainable policy", "trainables"),
    "register_blueprints": ("blueprint", "blueprints"),
    "register_tasks": ("task", "tasks"),
}

_VALID_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")


def _normalize(name: str) -> str:
    """PEP 503 normalisation, so `Simic_Example.Policy` matches `simic-example-policy`."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass
class PluginInfo:
    """One plugin: where it comes from, what it registered, and every problem it had.

    The plugin manager keeps one per plugin it tried to load (registered with pluggy or not);
    `build_registry` hands out copies with the names each plugin registered filled in.
    """

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None  # the entry point's target, e.g. `simic_plugins.heuristic`
    policies: list[str] = field(default_factory=list)
    trainables: list[str] = field(default_factory=list)
    blueprints: list[str] = field(default_factory=list)
    tasks: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def error(self) -> str | None:
        return "; ".join(self.errors) or None

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "distribution": self.distribution, "version": self.version,
                "module": self.module, "policies": list(self.policies), "trainables": list(self.trainables),
                "blueprints": list(self.blueprints), "tasks": list(self.tasks), "error": self.error,
                "errors": list(self.errors)}


@dataclass
class Registry:
    """Everything the loaded plugins registered, plus a report per plugin."""

    policies: dict[str, Callable[..., Any]] = field(default_factory=dict)
    trainables: dict[str, Any] = field(default_factory=dict)  # name -> esper_cli.trainable.TrainablePolicy
    blueprints: dict[str, Callable[[int], Any]] = field(default_factory=dict)
    tasks: dict[str, Any] = field(default_factory=dict)
    owners: dict[tuple[str, str], str] = field(default_factory=dict)  # (kind, name) -> plugin name
    plugins: dict[str, PluginInfo] = field(default_factory=dict)

    def plugin_of(self, kind: str, name: str) -> PluginInfo | None:
        owner = self.owners.get((kind, name))
        return self.plugins.get(owner) if owner else None

    def unknown(self, kind: str, name: str) -> str:
        """Why `name` is not a registered `kind` ("policy", "task", ...), in one line: "unknown
        policy (available: ...)", or, where a plugin that failed to load may have been meant to
        provide it, that plugin and its error.

        A plugin that failed to import cannot say what it would have registered, so it is named
        as *the* cause only when it is recognisably the one: its plugin, module or distribution
        carries the name, or one of its errors is about that very name (an invalid registration);
        any other plugin that loaded nothing because of an error "may have provided it".
        """
        attr = dict(HOOK_KINDS.values())[kind]
        known = ", ".join(sorted(getattr(self, attr))) or "none"
        culprits, suspects = [], []
        for info in self.plugins.values():
            if not info.errors or (info.module is None and info.distribution is None):
                continue  # healthy, or a SIMIC_LOAD_PLUGINS name that matched nothing installed
            if _provides(info, kind, name):
                culprits.append(info)
            elif not any(getattr(info, a) for a in dict(HOOK_KINDS.values()).values()):
                suspects.append(info)
        if culprits:
            why = "; ".join(f"plugin '{p.name}' {_failure(p)}" for p in culprits)
            return f"{kind} unavailable: {why} (available: {known})"
        if suspects:
            why = "; ".join(f"plugin '{p.name}' {_failure(p)}" for p in suspects)
            return f"unknown {kind}; {why}, and may have provided it (available: {known})"
        return f"unknown {kind} (available: {known})"

    @property
    def problems(self) -> list[tuple[str, str]]:
        """(plugin name, problem) for every plugin that failed to load or to register something."""
        return [(p.name, e) for p in self.plugins.values() for e in p.errors]


def _provides(info: PluginInfo, kind: str, name: str) -> bool:
    """Whether a failed plugin is recognisably the one that would have registered `name`."""
    target = _normalize(name)
    module = (info.module or "").split(":")[0]
    names = {info.name, module, module.rsplit(".", 1)[-1], info.distribution or ""}
    if target in {_normalize(n) for n in names if n} or (
            info.distribution and _normalize(info.distribution).endswith(f"-{target}")):
        return True
    return any(f"{kind} '{name}'" in e for e in info.errors)


def _failure(info: PluginInfo) -> str:
    """A plugin's problems as a clause: "failed to import m: ImportError: ..." reads on its own."""
    return info.error if (info.error or "").startswith("failed") else f"failed to load: {info.error}"


class SimicPluginManager(pluggy.PluginManager):
    """A pluggy manager with a `PluginInfo` record for every plugin it tried to load."""

    def __init__(self) -> None:
        super().__init__("simic")
        self.add_hookspecs(hookspecs)
        self.records: dict[str, PluginInfo] = {}  # in load order; failed plugins included

    def add_plugin(self, plugin: Any, name: str, *, distribution: str | None = None,
                   version: str | None = None, module: str | None = None) -> bool:
        """Register `plugin` under `name`; on failure record why and return False (never raise)."""
        module = module or getattr(plugin, "__name__", None) or type(plugin).__module__
        if name in self.records:
            self.record_failure(name, distribution, version, module, self._duplicate(name))
            return False
        record = self.records[name] = PluginInfo(name, distribution, version, module)
        try:
            self.register(plugin, name=name)
        except Exception as exc:  # pluggy's own validation: unknown arguments, a bad marker...
            record.errors.append(f"failed to register: {type(exc).__name__}: {exc}")
            return False
        callers = self.get_hookcallers(plugin) or []
        unknown = sorted(c.name for c in callers if not c.has_spec())
        if unknown:
            record.errors.append(f"implements unknown hook(s) {', '.join(unknown)}, ignored "
                                 f"(known: {', '.join(HOOK_KINDS)})")
        if len(unknown) == len(callers):
            record.errors.append("implements no simic hook (did you forget the @hookimpl marker?)")
        return True

    def _duplicate(self, name: str) -> str:
        owner = self.records[name]
        return f"plugin name '{name}' is already used by '{owner.distribution or owner.module or 'another plugin'}'; skipped"

    def record_failure(self, name: str, distribution: str | None, version: str | None, module: str | None,
                       reason: str) -> None:
        """A plugin that is not loaded at all; a second plugin of a taken name gets its own key."""
        if name in self.records:
            name = f"{name} ({distribution or module or 'duplicate'})"
        self.records[name] = PluginInfo(name, distribution, version, module, errors=[reason])

    def remove_plugin(self, name: str) -> None:
        """Undo `add_plugin` (or a recorded failure) for `name`."""
        if self.has_plugin(name):
            self.unregister(name=name)
        self.records.pop(name, None)


def allowed_plugin_names() -> set[str] | None:
    """The names in `SIMIC_LOAD_PLUGINS` (normalised), or None when the variable is unset."""
    raw = os.environ.get(ENV_VAR)
    if raw is None:
        return None
    return {_normalize(n.strip()) for n in raw.split(",") if n.strip()}


def _entry_points() -> list[EntryPoint]:
    """The group's entry points, the `simic` distribution's own first, then by distribution."""
    eps = list(entry_points(group=ENTRY_POINT_GROUP))

    def key(ep: EntryPoint) -> tuple[int, str, str]:
        dist = getattr(ep, "dist", None)
        dname = _normalize(dist.name) if dist is not None else ""
        return (0 if dname == CORE_DISTRIBUTION else 1, dname, ep.name)

    return sorted(eps, key=key)


def load_entry_point_plugins(pm: SimicPluginManager, allowed: set[str] | None = None) -> None:
    """Import and register every (allowed) entry point of the `simic` group, each in isolation."""
    seen: set[str] = {CORE_PLUGIN, CORE_DISTRIBUTION}  # always loaded; naming them is harmless
    for ep in _entry_points():
        dist = getattr(ep, "dist", None)
        dname, dversion = (dist.name, dist.version) if dist is not None else (None, None)
        if allowed is not None and _normalize(ep.name) not in allowed and (
                dname is None or _normalize(dname) not in allowed):
            continue
        seen.update(_normalize(n) for n in (ep.name, dname) if n)
        if ep.name in pm.records:  # two distributions, one plugin name: the first one wins, unimported
            pm.record_failure(ep.name, dname, dversion, ep.value, pm._duplicate(ep.name))
            continue
        try:
            plugin = ep.load()
        except (Exception, SystemExit) as exc:
            pm.record_failure(ep.name, dname, dversion, ep.value,
                              f"failed to import {ep.value}: {type(exc).__name__}: {exc}")
            continue
        pm.add_plugin(plugin, ep.name, distribution=dname, version=dversion, module=ep.value)
    for name in sorted((allowed or set()) - seen):
        pm.record_failure(name, None, None, None,
                          f"named in {ENV_VAR}, but no installed plugin or distribution has this name")


@lru_cache(maxsize=1)
def get_plugin_manager() -> SimicPluginManager:
    """The process-wide plugin manager, with the core plugin and every allowed entry point."""
    pm = SimicPluginManager()
    pm.add_plugin(builtins, CORE_PLUGIN, distribution=CORE_DISTRIBUTION, version=__version__,
                  module=builtins.__name__)
    load_entry_point_plugins(pm, allowed_plugin_names())
    return pm


def reset_plugin_manager() -> None:
    """Forget the process-wide manager: the next call re-reads entry points and `SIMIC_LOAD_PLUGINS`."""
    get_plugin_manager.cache_clear()


@contextmanager
def registered_plugin(plugin: Any, name: str | None = None, *,
                      pm: SimicPluginManager | None = None) -> Iterator[SimicPluginManager]:
    """Register `plugin` (a module, class instance or namespace with `@hookimpl` functions) on
    the process-wide manager for the duration of a `with` block, then remove it again.

        with registered_plugin(MyPlugin(), name="mine"):
            CliRunner().invoke(app, ["collect", "--policy", "mine"])

    Registration goes through the same checks as an installed plugin; a plugin that cannot be
    registered at all raises `ValueError` here, since a test wants to know at once.
    """
    pm = pm or get_plugin_manager()
    name = name or getattr(plugin, "__name__", None) or f"{type(plugin).__name__}-{id(plugin):x}"
    if name in pm.records:
        raise ValueError(f"a plugin named '{name}' is already registered")
    try:
        if not pm.add_plugin(plugin, name):
            raise ValueError(f"plugin '{name}' could not be registered: {pm.records[name].error}")
        yield pm
    finally:
        pm.remove_plugin(name)


def _check_item(kind: str, name: Any, obj: Any) -> str | None:
    """Why `register(name, obj)` is refused, or None when it is fine."""
    if not isinstance(name, str) or not _VALID_NAME.match(name):
        return (f"{kind} name {name!r} is not valid (letters, digits, '_', '-', '.', '+'; "
                "starting with a letter or digit)")
    if kind in ("policy", "blueprint") and not callable(obj):
        return f"{kind} '{name}' is not callable (register a factory, e.g. the class): {obj!r}"
    if kind == "task" and not (callable(getattr(obj, "load", None)) and callable(getattr(obj, "build_host", None))):
        return f"task '{name}' has no callable load / build_host (register an esper_cli.tasks.Task)"
    if kind == "trainable policy" and not isinstance(obj, TrainablePolicy):
        return f"trainable policy '{name}' is not an esper_cli.trainable.TrainablePolicy: {obj!r}"
    return None


def build_registry(pm: SimicPluginManager | None = None) -> Registry:
    """Call every plugin's hooks, one plugin at a time, and assemble the registries.

    A plugin whose hook raises is skipped as a whole (nothing it registered is kept) and the
    error recorded on it; an invalid single registration (bad name, not a factory) is reported
    and skipped; a name already taken keeps its first owner and the later one is reported.
    """
    pm = pm or get_plugin_manager()
    reg = Registry(plugins={name: replace(r, errors=list(r.errors)) for name, r in pm.records.items()})
    order = [name for name, _ in pm.list_name_plugin()]  # registration order: first owner wins

    # Each implementation is called on its own, not through `pm.hook.X(...)`: pluggy stops a hook
    # call at the first implementation that raises, and one plugin's bug must not hide the others.
    staged: dict[str, list[tuple[str, str, Any]]] = {name: [] for name in order}
    failed: set[str] = set()
    for hook_name, (kind, _attr) in HOOK_KINDS.items():
        for impl in getattr(pm.hook, hook_name).get_hookimpls():
            info = reg.plugins[impl.plugin_name]
            if impl.plugin_name in failed:
                continue
            if impl.hookwrapper or impl.wrapper:
                info.errors.append(f"{hook_name}: hook wrappers are not supported; plugin skipped")
                failed.add(impl.plugin_name)
                continue
            items: list[tuple[str, str, Any]] = []

            def register(name: str, obj: Any, *, _items: list = items, _kind: str = kind,
                         _info: PluginInfo = info) -> None:
                problem = _check_item(_kind, name, obj)
                if problem is None and any(n == name for _, n, _ in _items):
                    problem = f"{_kind} '{name}' registered twice by this plugin; the second is skipped"
                if problem is not None:
                    _info.errors.append(problem)
                    return
                _items.append((_kind, name, obj))

            try:  # an implementation may declare fewer arguments than the spec (pluggy's rule)
                impl.function(**{arg: register for arg in impl.argnames})
            except Exception as exc:
                info.errors.append(f"{hook_name} failed: {type(exc).__name__}: {exc}; plugin skipped")
                failed.add(impl.plugin_name)
                continue
            staged[impl.plugin_name].extend(items)

    attrs = dict(HOOK_KINDS.values())
    for plugin_name in order:
        if plugin_name in failed:
            continue
        info = reg.plugins[plugin_name]
        for kind, name, obj in staged[plugin_name]:
            owner = reg.owners.get((kind, name))
            if owner is not None:
                info.errors.append(f"{kind} '{name}' is already registered by plugin '{owner}'; skipped")
                continue
            getattr(reg, attrs[kind])[name] = obj
            reg.owners[(kind, name)] = plugin_name
            getattr(info, attrs[kind]).append(name)
    return reg
