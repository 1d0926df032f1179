"""One pluggy PluginManager per Engine, the built-in plugins, entry points and registries."""
from __future__ import annotations

import importlib
import importlib.metadata as md
import os
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Iterable

import pluggy

from engine import hookspecs
from engine.contracts import Encoder, FeedbackLearner, Fuser, Ranker, Reader
from engine.errors import DuplicateNameError, NotFoundError, PluginError

#: Built-in plugins, registered through the same ``pm.register`` as third-party ones.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "plugins.readers",
    "plugins.text_bert",
    "plugins.image_clip",
    "plugins.kg_entity",
    "plugins.fuse_attention",
    "plugins.rank_two_tower",
    "plugins.rank_classic",
    "plugins.rank_rerank",
    "plugins.feedback_online",
    "plugins.feedback_bandit",
)

#: Registry kind -> (hook name, required base class).
REGISTRY_KINDS: dict[str, tuple[str, type]] = {
    "encoders": ("register_encoders", Encoder),
    "fusers": ("register_fusers", Fuser),
    "rankers": ("register_rankers", Ranker),
    "feedback_learners": ("register_feedback_learners", FeedbackLearner),
    "readers": ("register_readers", Reader),
}

ENV_LOAD_PLUGINS = "POLYREC_LOAD_PLUGINS"


@dataclass
class PluginRecord:
    """What the engine knows of one plugin: where it came from and what it registered."""

    name: str
    version: str | None
    source: str  # "builtin" or "entrypoint"
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "source": self.source,
                "hooks": self.hooks, "registered": self.registered, "error": self.error}


class Registry:
    """Name -> component class for one kind, remembering which plugin registered each."""

    def __init__(self, kind: str, base: type) -> None:
        self.kind, self.base = kind, base
        self._classes: dict[str, type] = {}
        self._owner: dict[str, str] = {}

    def add(self, cls: type, plugin: str) -> None:
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(f"plugin '{plugin}' registered {cls!r} as one of the {self.kind}, "
                              f"but it is not a subclass of {self.base.__name__}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registered {cls.__name__} without a 'name'")
        if name in self._classes:
            raise DuplicateNameError(
                f"{self.kind[:-1]} name '{name}' is registered twice: by plugin "
                f"'{self._owner[name]}' and by plugin '{plugin}'")
        self._classes[name] = cls
        self._owner[name] = plugin

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes)) or "none"
            raise NotFoundError(f"no {self.kind[:-1]} named '{name}' (known: {known})") from None

    def owner(self, name: str) -> str:
        return self._owner[name]

    def names(self) -> list[str]:
        return list(self._classes)

    def items(self) -> Iterable[tuple[str, type]]:
        return self._classes.items()

    def __contains__(self, name: object) -> bool:
        return name in self._classes

    def __len__(self) -> int:
        return len(self._classes)


def _allowed_plugins() -> set[str] | None:
    """Names allowed by POLYREC_LOAD_PLUGINS; None when the variable is unset (all load)."""
    raw = os.environ.get(ENV_LOAD_PLUGINS)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


def _module_version(module: ModuleType) -> str | None:
    return getattr(module, "__version__", None)


class PluginHost:
    """Owns one PluginManager and the registries filled from it."""

    def __init__(self, *, builtins: Iterable[str] = DEFAULT_PLUGINS,
                 entrypoints: bool = True, extra: Iterable[object] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        allowed = _allowed_plugins()
        for modname in builtins:
            self._register_builtin(modname)
        if entrypoints:
            self._load_entrypoints(allowed)
        for plugin in extra:
            name = getattr(plugin, "__name__", None) or type(plugin).__name__
            self._register(plugin, name, version=_module_version(plugin)
                           if isinstance(plugin, ModuleType) else None, source="extra")
        self.pm.check_pending()
        self.registries = {kind: Registry(kind, base) for kind, (_, base) in REGISTRY_KINDS.items()}
        self._fill_registries()

    # -- loading -------------------------------------------------------------------------
    def _register(self, plugin: object, name: str, *, version: str | None, source: str) -> None:
        try:
            self.pm.register(plugin, name=name)
        except ValueError as exc:  # pluggy refuses a second plugin of the same name
            raise PluginError(f"plugin '{name}' could not be registered: {exc}") from exc
        hooks = sorted(h.name for h in (self.pm.get_hookcallers(plugin) or []))
        self.records[name] = PluginRecord(name=name, version=version, source=source, hooks=hooks)

    def _register_builtin(self, modname: str) -> None:
        try:
            module = importlib.import_module(modname)
        except ImportError as exc:
            if getattr(exc, "name", None) == modname:
                return  # a built-in that this checkout does not ship yet
            self.records[modname] = PluginRecord(modname, None, "builtin",
                                                 error=f"{type(exc).__name__}: {exc}")
            return
        except Exception as exc:  # noqa: BLE001 - a broken plugin must not stop the engine
            self.records[modname] = PluginRecord(modname, None, "builtin",
                                                 error=f"{type(exc).__name__}: {exc}")
            return
        from importlib.metadata import PackageNotFoundError, version
        try:
            ver = version("polyrec")
        except PackageNotFoundError:
            ver = None
        self._register(module, modname, version=ver, source="builtin")

    def _load_entrypoints(self, allowed: set[str] | None) -> None:
        for ep in md.entry_points(group=hookspecs.PROJECT_NAME):
            if allowed is not None and ep.name not in allowed:
                continue
            dist = getattr(ep, "dist", None)
            version = dist.version if dist is not None else None
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - reported by `polyrec plugins`
                self.records[ep.name] = PluginRecord(ep.name, version, "entrypoint",
                                                     error=f"{type(exc).__name__}: {exc}")
                continue
            if self.pm.is_registered(plugin):
                continue
            self._register(plugin, ep.name, version=version, source="entrypoint")

    def _fill_registries(self) -> None:
        for kind, (hook_name, _) in REGISTRY_KINDS.items():
            registry = self.registries[kind]
            caller = getattr(self.pm.hook, hook_name)
            for impl in caller.get_hookimpls():
                plugin_name = self.pm.get_name(impl.plugin) or repr(impl.plugin)
                record = self.records.get(plugin_name)

                def register(cls: type, _plugin: str = plugin_name,
                             _record: PluginRecord | None = record, _kind: str = kind) -> None:
                    registry.add(cls, _plugin)
                    if _record is not None:
                        _record.registered.setdefault(_kind, []).append(cls.name)

                impl.function(register=register)

    # -- queries -------------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        return self.registries[kind]

    def add_commands(self, cli: Any) -> None:
        """Let every plugin add its click commands to ``cli``."""
        self.pm.hook.register_commands(cli=cli)

    def describe(self) -> list[PluginRecord]:
        return sorted(self.records.values(), key=lambda r: (r.source != "builtin", r.name))
