"""One pluggy PluginManager per Engine, the built-in plugins, entry points and registries.

Loading order: the built-in modules of DEFAULT_PLUGINS, then the installed plugins of
entry-point group ``polyrec`` (limited by ``POLYREC_LOAD_PLUGINS``), then the plugin
objects a host application passes in. Then every hook implementation is checked against
the hook specs and each plugin's components are registered, one plugin at a time.

Failure policy:
- a built-in plugin (DEFAULT_PLUGINS, or the ``builtins`` an application names) that is
  missing or fails to import raises PluginError naming the module and the error: an
  Engine never runs half-empty;
- an installed (entry-point) plugin that fails to import is recorded with its error
  (``polyrec plugins`` shows it) and left out; the engine still starts;
- an installed (entry-point) plugin that breaks a contract (unknown hook, bad hook
  signature, a component that is not a subclass of the contract, a duplicate name) is
  recorded and left out as a whole, so one bad third-party plugin cannot lock users out;
- a built-in plugin or one passed in by the host application that breaks a contract
  raises PluginError (DuplicateNameError for a name clash): that is a bug in the
  program itself, not in the environment.
"""
from __future__ import annotations

import difflib
import importlib
import importlib.metadata as md
import inspect
import os
import re
from dataclasses import dataclass, field
from types import ModuleType
from typing import Any, Callable, Iterable

import click
import pluggy

from polyrec import hookspecs
from polyrec.contracts import Encoder, FeedbackLearner, Fuser, IntentModel, Ranker, Reader
from polyrec.errors import DuplicateNameError, NotFoundError, PluginError

#: Built-in plugins, registered through the same ``pm.register`` as third-party ones.
DEFAULT_PLUGINS: tuple[str, ...] = (
    "polyrec.plugins.readers",
    "polyrec.plugins.text_bert",
    "polyrec.plugins.text_bert_tuned",
    "polyrec.plugins.image_clip",
    "polyrec.plugins.image_cnn",
    "polyrec.plugins.kg_entity",
    "polyrec.plugins.fuse_attention",
    "polyrec.plugins.rank_two_tower",
    "polyrec.plugins.rank_classic",
    "polyrec.plugins.rank_ensemble",
    "polyrec.plugins.rank_rerank",
    "polyrec.plugins.feedback_online",
    "polyrec.plugins.feedback_bandit",
    "polyrec.plugins.intent_multitask",
)

#: Registry kind -> (hook name, required base class).
REGISTRY_KINDS: dict[str, tuple[str, type]] = {
    "encoders": ("register_encoders", Encoder),
    "fusers": ("register_fusers", Fuser),
    "rankers": ("register_rankers", Ranker),
    "feedback_learners": ("register_feedback_learners", FeedbackLearner),
    "readers": ("register_readers", Reader),
    "intent_models": ("register_intent_models", IntentModel),
}

#: Class attributes a component of a kind must set besides ``name`` (attribute -> type).
REQUIRED_ATTRIBUTES: dict[str, dict[str, type]] = {
    "encoders": {"modality": str},
    "readers": {"suffixes": tuple},
}

#: The hook that adds CLI commands; its registrations appear as kind "commands".
COMMANDS_HOOK = "register_commands"

ENV_LOAD_PLUGINS = "POLYREC_LOAD_PLUGINS"

#: Component and command names: no spaces or commas, so they fit in comma lists and CLIs.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")

SOURCES = ("builtin", "entrypoint", "extra")


def hook_names() -> list[str]:
    """The names of all hook specs in engine/hookspecs.py, in definition order."""
    return [name for name, obj in vars(hookspecs).items()
            if callable(obj) and name.startswith("register_")]


@dataclass
class PluginRecord:
    """What the engine knows of one plugin: where it came from and what it registered.

    ``source`` is "builtin" (DEFAULT_PLUGINS), "entrypoint" (installed with pip) or
    "extra" (passed to the Engine by the host application). ``error`` is set when the
    plugin was left out; ``registered`` maps a kind ("encoders", ..., "commands") to
    the names the plugin registered.
    """

    name: str
    version: str | None
    source: str
    module: str | None = None
    distribution: str | None = None
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    @property
    def loaded(self) -> bool:
        return self.error is None

    def as_dict(self) -> dict[str, Any]:
        return {"name": self.name, "version": self.version, "source": self.source,
                "module": self.module, "distribution": self.distribution,
                "loaded": self.loaded, "hooks": list(self.hooks),
                "registered": {k: list(v) for k, v in self.registered.items()},
                "error": self.error}


class Registry:
    """Name -> component class for one kind, remembering which plugin registered each."""

    def __init__(self, kind: str, base: type) -> None:
        self.kind, self.base = kind, base
        self._classes: dict[str, type] = {}
        self._owner: dict[str, str] = {}

    @property
    def singular(self) -> str:
        return self.kind[:-1].replace("_", " ")

    def check(self, cls: object, plugin: str) -> str:
        """Raise PluginError unless ``cls`` may be registered by ``plugin``; its name."""
        if not (isinstance(cls, type) and issubclass(cls, self.base)):
            raise PluginError(f"plugin '{plugin}' registered {cls!r} as one of the {self.kind}, "
                              f"but it is not a subclass of {self.base.__name__}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise PluginError(f"plugin '{plugin}' registered {cls.__name__} without a 'name' "
                              f"(a class attribute, e.g. name = \"my_{self.singular}\")")
        if not NAME_PATTERN.match(name):
            raise PluginError(f"plugin '{plugin}' registered {cls.__name__} with name {name!r}: "
                              f"names are letters, digits, '_', '-' and '.', no spaces or commas")
        for attr, typ in REQUIRED_ATTRIBUTES.get(self.kind, {}).items():
            if not isinstance(getattr(cls, attr, None), typ):
                raise PluginError(f"plugin '{plugin}' registered {self.singular} '{name}' "
                                  f"without a {typ.__name__} class attribute '{attr}'")
        if inspect.isabstract(cls):
            missing = ", ".join(sorted(getattr(cls, "__abstractmethods__", ())))
            raise PluginError(f"plugin '{plugin}' registered {self.singular} '{name}' "
                              f"({cls.__name__}), which leaves abstract: {missing}")
        if name in self._classes:
            raise DuplicateNameError(
                f"{self.singular} name '{name}' is registered twice: by plugin "
                f"'{self._owner[name]}' and by plugin '{plugin}'")
        return name

    def add(self, cls: type, plugin: str) -> str:
        """Register ``cls`` under its ``name`` for ``plugin`` (checked first); the name."""
        name = self.check(cls, plugin)
        self._classes[name] = cls
        self._owner[name] = plugin
        return name

    def remove_plugin(self, plugin: str) -> None:
        """Forget everything ``plugin`` registered."""
        for name in [n for n, p in self._owner.items() if p == plugin]:
            del self._classes[name], self._owner[name]

    def get(self, name: str) -> type:
        try:
            return self._classes[name]
        except KeyError:
            known = ", ".join(sorted(self._classes)) or "none"
            raise NotFoundError(f"no {self.singular} named '{name}' (known: {known})") from None

    def owner(self, name: str) -> str:
        """The name of the plugin that registered ``name``."""
        self.get(name)
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
    return {_normalize(p) for p in raw.split(",") if p.strip()}


def _normalize(name: str) -> str:
    """Compare plugin and distribution names as pip does: case and -_. are not significant."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _polyrec_version() -> str | None:
    try:
        return md.version("polyrec")
    except md.PackageNotFoundError:
        return None


def _describe_exception(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


class PluginHost:
    """Owns one PluginManager, the records of every plugin and the registries filled from it.

    ``builtins`` are module names imported and registered first, ``entrypoints`` turns
    loading installed plugins on or off, and ``extra`` are plugin objects (modules,
    classes or instances with hookimpls) passed in by the host application.
    """

    def __init__(self, *, builtins: Iterable[str] = DEFAULT_PLUGINS,
                 entrypoints: bool = True, extra: Iterable[object] = ()) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.records: dict[str, PluginRecord] = {}
        self.registries = {kind: Registry(kind, base) for kind, (_, base) in REGISTRY_KINDS.items()}
        #: command name -> (click command, plugin name)
        self.commands: dict[str, tuple[click.Command, str]] = {}
        self.allowed = _allowed_plugins()
        for modname in builtins:
            self._load_builtin(modname)
        if entrypoints:
            self._load_entrypoints()
        for plugin in extra:
            self._load_extra(plugin)
        self._check_pending()
        # Installed plugins register their components last, so that a clash with a
        # built-in or a plugin the application passed in leaves out the installed one.
        order = ("builtin", "extra", "entrypoint")
        for record in sorted(self.records.values(), key=lambda r: order.index(r.source)):
            if record.loaded:
                self._register_components(record.name)

    # -- loading -------------------------------------------------------------------------
    def _record(self, record: PluginRecord) -> PluginRecord:
        key, n = record.name, 2
        while key in self.records:  # two plugins claiming one name: keep both on record
            key, n = f"{record.name}#{n}", n + 1
        record.name = key
        self.records[key] = record
        return record

    def _fail(self, record: PluginRecord, error: PluginError) -> None:
        """Leave out an entry-point plugin; raise for built-in and extra ones."""
        if record.source != "entrypoint":
            raise error
        if self.pm.get_plugin(record.name) is not None:  # pluggy may have half-registered it
            self.pm.unregister(name=record.name)
        for registry in self.registries.values():
            registry.remove_plugin(record.name)
        for cmd in [c for c, (_, p) in self.commands.items() if p == record.name]:
            del self.commands[cmd]
        record.registered = {}
        record.error = f"{error} (plugin left out)"

    def _register(self, plugin: object, record: PluginRecord) -> None:
        """``pm.register`` the plugin under the record's name; failures go to _fail."""
        record = self._record(record)
        try:
            self.pm.register(plugin, name=record.name)
        except (ValueError, pluggy.PluginValidationError) as exc:
            reason = str(exc)
            if isinstance(exc, ValueError) and self.pm.is_registered(plugin):
                reason = f"the same plugin object is already registered as " \
                         f"'{self.pm.get_name(plugin)}'"
            self._fail(record, PluginError(f"plugin '{record.name}' could not be registered: "
                                           f"{reason}"))
            return
        record.hooks = sorted(h.name for h in (self.pm.get_hookcallers(plugin) or []))

    def _load_builtin(self, modname: str) -> None:
        """Import and register one built-in module. A built-in that is missing or fails to
        import raises PluginError naming the module and the import error: an Engine never
        runs with part of its own plugins (that is a broken install, not a user choice)."""
        try:
            module = importlib.import_module(modname)
        except Exception as exc:  # noqa: BLE001 - re-raised, named after the module
            raise PluginError(f"built-in plugin module '{modname}' could not be imported: "
                              f"{_describe_exception(exc)} (an Engine does not start without "
                              f"its built-in plugins)") from exc
        self._register(module, PluginRecord(modname, _polyrec_version(), "builtin",
                                            module=modname, distribution="polyrec"))

    def _load_entrypoints(self) -> None:
        seen: set[str] = set()
        found = md.entry_points(group=hookspecs.PROJECT_NAME)
        # A stable order (by distribution, then entry-point name) makes clashes reproducible.
        for ep in sorted(found, key=lambda e: (_normalize(e.dist.name) if e.dist else "", e.name)):
            dist = getattr(ep, "dist", None)
            dist_name = dist.name if dist is not None else None
            keys = {_normalize(ep.name)} | ({_normalize(dist_name)} if dist_name else set())
            if self.allowed is not None and not keys & self.allowed:
                continue
            seen |= keys
            record = PluginRecord(ep.name, dist.version if dist is not None else None,
                                  "entrypoint", module=ep.value, distribution=dist_name)
            try:
                plugin = ep.load()
            except Exception as exc:  # noqa: BLE001 - reported by `polyrec plugins`
                record.error = _describe_exception(exc)
                self._record(record)
                continue
            if self.pm.is_registered(plugin):
                continue  # e.g. a built-in module that is also declared as an entry point
            self._register(plugin, record)
        for name in sorted((self.allowed or set()) - seen):
            self._record(PluginRecord(name, None, "entrypoint", error=(
                f"named in {ENV_LOAD_PLUGINS} but no installed plugin has this name")))

    def _load_extra(self, plugin: object) -> None:
        if isinstance(plugin, str):
            raise PluginError(f"plugins=[{plugin!r}]: pass the plugin object (module, class or "
                              f"instance); module names go in builtins=")
        module = plugin.__name__ if isinstance(plugin, ModuleType) else \
            getattr(plugin, "__module__", None)
        name = getattr(plugin, "__name__", None) or type(plugin).__name__
        version = getattr(plugin, "__version__", None)
        self._register(plugin, PluginRecord(name, version if isinstance(version, str) else None,
                                            "extra", module=module))

    # -- validation and registration -----------------------------------------------------
    def _check_pending(self) -> None:
        """Every hook implementation must match a hook spec (a misspelt hook is an error)."""
        specs = hook_names()
        for hook_name in list(vars(self.pm.hook)):
            if hook_name.startswith("_"):
                continue
            caller = getattr(self.pm.hook, hook_name)
            if caller.has_spec():
                continue
            for impl in caller.get_hookimpls():
                if impl.optionalhook:
                    continue
                hint = difflib.get_close_matches(hook_name, specs, n=1)
                did_you_mean = f" (did you mean '{hint[0]}'?)" if hint else ""
                record = self.records[impl.plugin_name]
                self._fail(record, PluginError(
                    f"plugin '{impl.plugin_name}' implements unknown hook '{hook_name}'"
                    f"{did_you_mean}; the hooks are: {', '.join(specs)}"))
        try:
            self.pm.check_pending()
        except pluggy.PluginValidationError as exc:  # pragma: no cover - caught above
            raise PluginError(str(exc)) from exc

    def _call(self, plugin: object, hook_name: str, record: PluginRecord, **kwargs: Any) -> None:
        """Call hook ``hook_name`` of one plugin only, through pluggy's
        ``subset_hook_caller`` (every other plugin left out); nothing when the plugin does
        not implement it."""
        if getattr(self.pm.hook, hook_name) not in (self.pm.get_hookcallers(plugin) or []):
            return
        others = [p for p in self.pm.get_plugins() if p is not plugin]
        caller = self.pm.subset_hook_caller(hook_name, remove_plugins=others)
        try:
            caller(**kwargs)
        except PluginError:
            raise
        except Exception as exc:  # noqa: BLE001 - named after the plugin that raised it
            raise PluginError(f"plugin '{record.name}' failed in {hook_name}: "
                              f"{_describe_exception(exc)}") from exc

    def _register_components(self, name: str) -> None:
        """Run one plugin's register_* hooks; all of its components go in, or none."""
        record = self.records[name]
        plugin = self.pm.get_plugin(name)
        try:
            for kind, (hook_name, _) in REGISTRY_KINDS.items():
                registry = self.registries[kind]

                def register(cls: type, _registry: Registry = registry, _kind: str = kind) -> None:
                    added = _registry.add(cls, name)
                    record.registered.setdefault(_kind, []).append(added)

                self._call(plugin, hook_name, record, register=register)
            scratch = click.Group(name="polyrec")
            self._call(plugin, COMMANDS_HOOK, record, cli=scratch)
            for cmd_name, command in scratch.commands.items():
                self._add_command(cmd_name, command, record)
        except PluginError as exc:
            for registry in self.registries.values():
                registry.remove_plugin(name)
            for cmd in [c for c, (_, p) in self.commands.items() if p == name]:
                del self.commands[cmd]
            record.registered = {}
            self._fail(record, exc)

    def _add_command(self, cmd_name: str, command: click.Command, record: PluginRecord) -> None:
        if not NAME_PATTERN.match(cmd_name):
            raise PluginError(f"plugin '{record.name}' added a command named {cmd_name!r}")
        if cmd_name in self.commands:
            raise DuplicateNameError(
                f"command name '{cmd_name}' is registered twice: by plugin "
                f"'{self.commands[cmd_name][1]}' and by plugin '{record.name}'")
        self.commands[cmd_name] = (command, record.name)
        record.registered.setdefault("commands", []).append(cmd_name)

    # -- queries -------------------------------------------------------------------------
    def registry(self, kind: str) -> Registry:
        """The registry of one kind: encoders, fusers, rankers, feedback_learners, readers,
        intent_models."""
        try:
            return self.registries[kind]
        except KeyError:
            raise NotFoundError(f"no registry '{kind}' (known: {', '.join(self.registries)})") \
                from None

    def add_commands(self, cli: click.Group) -> list[str]:
        """Add the plugins' commands to ``cli``. A command whose name the group already
        has is not added; the returned list says which and why (empty when all fit)."""
        problems = []
        for cmd_name, (command, plugin) in self.commands.items():
            if cmd_name in cli.commands:
                problems.append(f"command '{cmd_name}' of plugin '{plugin}' is not added: "
                                f"polyrec already has a command of that name")
                continue
            cli.add_command(command, cmd_name)
        return problems

    def describe(self) -> list[PluginRecord]:
        """Every plugin on record: built-ins, installed, then extra ones, in load order."""
        return sorted(self.records.values(), key=lambda r: SOURCES.index(r.source))

    def errors(self) -> list[PluginRecord]:
        """The plugins that were left out, with their errors."""
        return [r for r in self.describe() if r.error is not None]

    def call(self, hook_name: str) -> Callable[..., Any]:
        """The pluggy hook caller of ``hook_name`` (for hooks added after this version)."""
        return getattr(self.pm.hook, hook_name)
