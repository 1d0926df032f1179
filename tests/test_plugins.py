"""The plugin system: one PluginManager per Engine, registries, entry points, errors.

Plugins here are small in-test objects (instances with @hookimpl methods) and, for
entry points, real modules with a dist-info directory on a temporary sys.path entry.
"""
from __future__ import annotations

import json
import sys
import textwrap
from typing import Sequence

import click
import pytest
import torch
from click.testing import CliRunner

from polyrec import DuplicateNameError, EncodeResult, Encoder, EncoderContext, Engine, ItemView, NotFoundError, PluginError, Ranker, hookimpl
from polyrec.plugin_host import ENV_LOAD_PLUGINS, PluginHost, hook_names

# -- small components and plugins ---------------------------------------------------------


def make_encoder(enc_name: str, modality: str = "text") -> type[Encoder]:
    class _Enc(Encoder):
        name = enc_name
        dim = 2

        def fingerprint(self) -> str:
            return f"{enc_name}-v1"

        def content(self, item: ItemView) -> str | None:
            return item.title

        def encode(self, items: Sequence[ItemView], ctx: EncoderContext) -> EncodeResult:
            vecs = torch.tensor([[len(i.title or ""), 1.0] for i in items])
            return EncodeResult(vectors=vecs, item_ids=[i.id for i in items])

    _Enc.modality = modality
    _Enc.__name__ = f"Enc_{enc_name}"
    return _Enc


class TinyRanker(Ranker):
    name = "tiny"

    def fit(self, data: object) -> None:
        self.fitted = True

    def score_users(self, user_index: torch.Tensor, data: object) -> torch.Tensor:
        return torch.zeros(len(user_index), 1)


class EncoderPlugin:
    """A plugin object registering the given encoder classes."""

    def __init__(self, *classes: type) -> None:
        self.classes = classes

    @hookimpl
    def register_encoders(self, register):  # type: ignore[no-untyped-def]
        for cls in self.classes:
            register(cls)


class PluginA(EncoderPlugin):
    pass


class PluginB(EncoderPlugin):
    pass


class RankerPlugin:
    @hookimpl
    def register_rankers(self, register):  # type: ignore[no-untyped-def]
        register(TinyRanker)


class CommandPlugin:
    def __init__(self, *names: str) -> None:
        self.names = names

    @hookimpl
    def register_commands(self, cli):  # type: ignore[no-untyped-def]
        for name in self.names:
            cli.add_command(click.Command(name, callback=lambda: click.echo("hi")))


def host(*plugins: object) -> PluginHost:
    return PluginHost(builtins=(), entrypoints=False, extra=plugins)


# -- one manager per engine, built-ins ----------------------------------------------------


def test_two_engines_with_different_plugin_sets(tmp_path):
    with Engine(tmp_path / "a.db", builtins=(), entrypoints=False, progress=False,
                plugins=[PluginA(make_encoder("alpha")), RankerPlugin()]) as a, \
            Engine(tmp_path / "b.db", builtins=(), entrypoints=False, progress=False,
                   plugins=[PluginB(make_encoder("beta", "image"))]) as b:
        assert a.plugins.pm is not b.plugins.pm
        assert a.registry("encoders").names() == ["alpha"]
        assert b.registry("encoders").names() == ["beta"]
        assert "tiny" in a.registry("rankers") and len(b.registry("rankers")) == 0
        assert a.registry("encoders").owner("alpha") == "PluginA"
        assert [r.name for r in b.plugins.describe()] == ["PluginB"]
        a.add_items([{"external_id": "x", "title": "abc"}])
        assert a.stats()["items"] == 1 and b.stats()["items"] == 0


def test_builtin_module_registered_through_pm(tmp_path):
    with Engine(tmp_path / "r.db", builtins=("polyrec.plugins.readers",),
                entrypoints=False, progress=False) as eng:
        record = eng.plugins.records["polyrec.plugins.readers"]
        assert record.source == "builtin" and record.error is None
        assert eng.plugins.pm.get_plugin("polyrec.plugins.readers") is sys.modules["polyrec.plugins.readers"]
        assert "register_readers" in record.hooks
        assert set(record.registered["readers"]) >= {"csv", "jsonl", "parquet", "recbole"}


def test_missing_builtin_raises_naming_the_module(tmp_path):
    with pytest.raises(PluginError) as err:
        Engine(tmp_path / "m.db", builtins=("polyrec.plugins.readers",
                                            "polyrec.plugins.not_shipped_yet"),
               entrypoints=False, progress=False)
    message = str(err.value)
    assert "built-in plugin module 'polyrec.plugins.not_shipped_yet'" in message
    assert "ModuleNotFoundError" in message and "not_shipped_yet" in message
    assert not (tmp_path / "m.db").exists()  # raised before any database was opened


@pytest.mark.parametrize("module, source, expected", [
    ("broken_builtin_pr", "import json\nraise RuntimeError('boom')\n", "RuntimeError: boom"),
    ("needs_dep_pr", "import no_such_dependency_pr\n", "no_such_dependency_pr"),
])
def test_builtin_that_fails_to_import_raises(tmp_path, monkeypatch, module, source, expected):
    (tmp_path / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(PluginError) as err:
        Engine(tmp_path / "e.db", builtins=("polyrec.plugins.readers", module),
               entrypoints=False, progress=False)
    assert f"'{module}'" in str(err.value) and expected in str(err.value)
    assert isinstance(err.value.__cause__, Exception)  # the import error itself is kept


# -- registration errors --------------------------------------------------------------------


def test_duplicate_component_names_name_both_plugins():
    with pytest.raises(DuplicateNameError) as err:
        host(PluginA(make_encoder("same")), PluginB(make_encoder("same")))
    message = str(err.value)
    assert "'same'" in message and "'PluginA'" in message and "'PluginB'" in message


def test_duplicate_command_names_name_both_plugins():
    with pytest.raises(DuplicateNameError, match="'CommandPlugin'.*'Other'"):
        host(CommandPlugin("hello"), type("Other", (CommandPlugin,), {})("hello"))


@pytest.mark.parametrize("bad, expected", [
    (TinyRanker, "not a subclass of Encoder"),
    (object(), "not a subclass of Encoder"),
    (type("NoName", (Encoder,), {"modality": "text", "dim": 1, "fingerprint": lambda s: "",
                                  "content": lambda s, i: "", "encode": lambda s, i, c: None}),
     "without a 'name'"),
    (type("Abstract", (Encoder,), {"name": "abstract", "modality": "text"}),
     "leaves abstract: content, dim, encode, fingerprint"),
    (type("NoModality", (make_encoder("nm"),), {"modality": None}), "'modality'"),
    (type("Spaces", (make_encoder("x"),), {"name": "two words"}), "no spaces or commas"),
])
def test_bad_registration_is_a_plugin_error(bad, expected):
    with pytest.raises(PluginError, match=expected) as err:
        host(PluginA(bad))
    assert "'PluginA'" in str(err.value)


def test_misspelt_hook_fails_check_pending():
    class Typo:
        @hookimpl
        def register_encoder(self, register):  # type: ignore[no-untyped-def]
            register(make_encoder("t"))

    with pytest.raises(PluginError, match="unknown hook 'register_encoder'.*did you mean "
                                          "'register_encoders'"):
        host(Typo())


def test_wrong_hook_signature_is_refused():
    class WrongArgs:
        @hookimpl
        def register_encoders(self, reg):  # type: ignore[no-untyped-def]
            pass

    with pytest.raises(PluginError, match="'WrongArgs' could not be registered"):
        host(WrongArgs())


def test_exception_in_hook_names_plugin_and_hook():
    class Raises:
        @hookimpl
        def register_rankers(self, register):  # type: ignore[no-untyped-def]
            raise KeyError("oops")

    with pytest.raises(PluginError, match="'Raises' failed in register_rankers: KeyError"):
        host(Raises())


def test_registry_lookup_and_unknown_names():
    h = host(PluginA(make_encoder("alpha")), RankerPlugin())
    assert h.registry("encoders").get("alpha").modality == "text"
    with pytest.raises(NotFoundError, match="no encoder named 'nope' \\(known: alpha\\)"):
        h.registry("encoders").get("nope")
    with pytest.raises(NotFoundError, match="no registry 'widgets'"):
        h.registry("widgets")
    assert h.records["RankerPlugin"].registered == {"rankers": ["tiny"]}
    assert h.records["RankerPlugin"].hooks == ["register_rankers"]


def test_plugin_commands_added_to_a_group_without_clobbering():
    h = host(CommandPlugin("hello", "stats"))
    group = click.Group("polyrec", commands=[click.Command("stats", callback=lambda: None)])
    problems = h.add_commands(group)
    assert "hello" in group.commands
    assert problems == ["command 'stats' of plugin 'CommandPlugin' is not added: polyrec "
                        "already has a command of that name"]
    assert h.records["CommandPlugin"].registered == {"commands": ["hello", "stats"]}
    assert CliRunner().invoke(group, ["hello"]).output == "hi\n"


def test_hook_names_are_the_specs():
    assert hook_names() == ["register_encoders", "register_fusers", "register_rankers",
                            "register_feedback_learners", "register_readers",
                            "register_intent_models", "register_commands"]


# -- entry points -----------------------------------------------------------------------------

GOOD = '''
import click
import torch
from polyrec import hookimpl, Encoder, EncodeResult
__version__ = "ignored, the distribution's version wins"

class GoodEncoder(Encoder):
    name = "good_enc"
    modality = "text"
    dim = 1
    def fingerprint(self): return "good"
    def content(self, item): return item.title
    def encode(self, items, ctx):
        return EncodeResult(torch.ones(len(items), 1), [i.id for i in items])

@hookimpl
def register_encoders(register):
    register(GoodEncoder)

@click.command("good-cmd")
def good_cmd():
    click.echo("good")

@hookimpl
def register_commands(cli):
    cli.add_command(good_cmd)
'''
BAD = "raise ImportError('badplug needs libfoo, which is not installed')\n"
TYPO = '''
from polyrec import hookimpl
@hookimpl
def register_ranker(register):
    pass
'''
CLASH = '''
from polyrec import hookimpl
import goodplug_pt
@hookimpl
def register_encoders(register):
    register(type("Clash", (goodplug_pt.GoodEncoder,), {}))
'''
ENTRY_POINTS = {  # module -> (distribution, version, entry-point name, source)
    "goodplug_pt": ("good-plug-dist", "1.2.3", "goodplug", GOOD),
    "badplug_pt": ("bad-plug-dist", "0.0.1", "badplug", BAD),
    "typoplug_pt": ("typo-plug-dist", "0.3", "typoplug", TYPO),
    # installed plugins load in order of distribution name: this one after good-plug-dist
    "clashplug_pt": ("later-clash-plug", "0.4", "clashplug", CLASH),
}


@pytest.fixture(scope="module")
def site_dir(tmp_path_factory):
    """A directory with four installed (dist-info) plugins, as pip would leave them."""
    root = tmp_path_factory.mktemp("site")
    for module, (dist, version, ep_name, source) in ENTRY_POINTS.items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
        info = root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text(f"[polyrec]\n{ep_name} = {module}\n")
    yield root
    for module in ENTRY_POINTS:
        sys.modules.pop(module, None)


@pytest.fixture
def installed(site_dir, monkeypatch):
    monkeypatch.syspath_prepend(str(site_dir))
    monkeypatch.delenv(ENV_LOAD_PLUGINS, raising=False)
    return site_dir


def ours(h: PluginHost) -> dict[str, dict]:
    names = {ep for _, _, ep, _ in ENTRY_POINTS.values()}
    return {r.name: r.as_dict() for r in h.describe() if r.name in names}


def test_entry_points_loaded_and_failures_reported(installed, tmp_path):
    with Engine(tmp_path / "e.db", builtins=(), progress=False) as eng:
        recs = ours(eng.plugins)
        good = recs["goodplug"]
        assert good["loaded"] and good["version"] == "1.2.3"
        assert good["distribution"] == "good-plug-dist" and good["source"] == "entrypoint"
        assert good["registered"] == {"encoders": ["good_enc"], "commands": ["good-cmd"]}
        assert good["hooks"] == ["register_commands", "register_encoders"]
        assert recs["badplug"]["error"] == \
            "ImportError: badplug needs libfoo, which is not installed"
        assert "unknown hook 'register_ranker'" in recs["typoplug"]["error"]
        assert "did you mean 'register_rankers'" in recs["typoplug"]["error"]
        clash = recs["clashplug"]
        assert "'good_enc' is registered twice: by plugin 'goodplug' and by plugin " \
               "'clashplug'" in clash["error"] and clash["registered"] == {}
        assert eng.plugins.pm.get_plugin("typoplug") is None  # left out as a whole
        assert eng.registry("encoders").owner("good_enc") == "goodplug"
        eng.add_items([{"external_id": "i1", "title": "still works"}])
        assert eng.stats()["items"] == 1


@pytest.mark.parametrize("value, expected", [
    ("goodplug", {"goodplug"}),
    ("good-plug-dist, typoplug", {"goodplug", "typoplug"}),  # distribution names too
    ("GOOD_PLUG_DIST", {"goodplug"}),                         # compared like pip names
    ("", set()),
])
def test_load_plugins_env_limits_entry_points(installed, monkeypatch, value, expected):
    monkeypatch.setenv(ENV_LOAD_PLUGINS, value)
    sys.modules.pop("badplug_pt", None)
    h = PluginHost(builtins=("polyrec.plugins.readers",))
    assert set(ours(h)) == expected
    assert "badplug_pt" not in sys.modules  # a plugin left out is not even imported
    assert "polyrec.plugins.readers" in h.records  # built-ins load whatever the variable says


def test_load_plugins_env_names_an_unknown_plugin(installed, monkeypatch):
    monkeypatch.setenv(ENV_LOAD_PLUGINS, "goodplug,nosuchplug")
    h = PluginHost(builtins=())
    assert "no installed plugin has this name" in h.records["nosuchplug"].error
    assert h.records["goodplug"].loaded


def test_entry_point_clashing_with_extra_plugin_is_left_out(installed, monkeypatch):
    monkeypatch.setenv(ENV_LOAD_PLUGINS, "goodplug")
    h = PluginHost(builtins=(), extra=[PluginA(make_encoder("good_enc"))])
    assert "registered twice: by plugin 'PluginA' and by plugin 'goodplug'" \
        in h.records["goodplug"].error
    assert h.registry("encoders").owner("good_enc") == "PluginA"
    assert "good-cmd" not in h.commands  # none of a left-out plugin's registrations stay


def test_cli_plugins_json(installed, tmp_path):
    runner = CliRunner()
    from polyrec.cli.main import cli
    db = str(tmp_path / "cli.db")
    result = runner.invoke(cli, ["--db", db, "plugins", "--json"],
                           env={ENV_LOAD_PLUGINS: "goodplug,badplug"})
    assert result.exit_code == 0, result.output
    records = {r["name"]: r for r in json.loads(result.output)}
    assert records["goodplug"]["registered"]["encoders"] == ["good_enc"]
    assert records["badplug"]["loaded"] is False and "libfoo" in records["badplug"]["error"]
    assert "typoplug" not in records
    assert records["polyrec.plugins.readers"]["source"] == "builtin"
    text = runner.invoke(cli, ["--db", db, "plugins"], env={ENV_LOAD_PLUGINS: "goodplug,badplug"})
    assert text.exit_code == 0
    assert "goodplug 1.2.3 (entrypoint, good-plug-dist)" in text.output
    assert "  encoders: good_enc" in text.output and "  commands: good-cmd" in text.output
    assert "  ERROR: ImportError: badplug needs libfoo" in text.output


def test_cli_runs_entry_point_command(installed, monkeypatch):
    from polyrec.cli.main import PolyrecGroup, _add_plugin_commands
    monkeypatch.setenv(ENV_LOAD_PLUGINS, "goodplug")
    group = PolyrecGroup("polyrec")
    _add_plugin_commands(group)
    result = CliRunner().invoke(group, ["good-cmd"])
    assert result.exit_code == 0 and result.output == "good\n"
