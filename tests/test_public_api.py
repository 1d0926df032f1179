"""Built-in plugins use only the public API, as a third-party plugin must.

A built-in plugin (plugins/*.py, installed as ``polyrec.plugins``) may import from
polyrec only:

- names of the top-level package listed in ``polyrec.__all__`` (``from polyrec import X``),
- ``polyrec.knowledge_graph`` and its modules (the graph, its embeddings and builders),
- other built-in plugin modules (``polyrec.plugins.*``, or relative imports),

and never a private (underscore) name. Imports under ``if TYPE_CHECKING:`` count too: a
type a plugin needs is part of the contract and belongs in the public API.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

import polyrec

ROOT = Path(__file__).resolve().parents[1]
PLUGINS = sorted(p for p in (ROOT / "plugins").glob("*.py") if p.name != "__init__.py")

#: Packages under polyrec a built-in plugin may import from (besides ``polyrec`` itself).
ALLOWED_PACKAGES = ("polyrec.knowledge_graph", "polyrec.plugins")

#: (plugin file, module, name) imports still being removed by other work in progress.
#: Keep this empty; an entry needs a comment saying who removes it and why it is here.
ALLOWED_FOR_NOW: set[tuple[str, str, str]] = set()


def _imports(path: Path) -> list[tuple[int, str, str]]:
    """(line, module, name) for every import in ``path`` (name '' for ``import module``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, alias.name, "") for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: a sibling built-in plugin module
                module = ".".join(["polyrec.plugins", *([node.module] if node.module else [])])
            else:
                module = node.module or ""
            out += [(node.lineno, module, alias.name) for alias in node.names]
    return out


def violations(path: Path) -> list[str]:
    """What ``path`` imports from polyrec beyond the public API, one line each."""
    public = set(polyrec.__all__)
    found = []
    for line, module, name in _imports(path):
        if module != "polyrec" and not module.startswith("polyrec."):
            continue
        where = f"{path.name}:{line}: "
        if (path.name, module, name) in ALLOWED_FOR_NOW:
            continue
        if name.startswith("_") or any(p.startswith("_") for p in module.split(".")):
            found.append(f"{where}private name {module}.{name}".rstrip("."))
        elif module == "polyrec":
            if name and name not in public:
                found.append(f"{where}'{name}' is not in polyrec.__all__")
            elif not name:
                continue  # import polyrec
        elif not any(module == p or module.startswith(p + ".") for p in ALLOWED_PACKAGES):
            what = f"from {module} import {name}" if name else f"import {module}"
            found.append(f"{where}{what}: not the public API (import it from polyrec)")
    return found


def test_every_built_in_plugin_is_checked():
    assert {p.stem for p in PLUGINS} >= {"readers", "text_bert", "image_clip", "kg_entity",
                                         "fuse_attention", "rank_classic", "rank_two_tower"}


@pytest.mark.parametrize("path", PLUGINS, ids=[p.stem for p in PLUGINS])
def test_built_in_plugin_uses_only_the_public_api(path):
    assert violations(path) == []


def test_public_names_exist_and_are_not_private():
    for name in polyrec.__all__:
        assert hasattr(polyrec, name), name
        assert not name.startswith("_") or name == "__version__", name


def test_the_checker_catches_what_it_should(tmp_path):
    bad = tmp_path / "bad_plugin.py"
    bad.write_text("from typing import TYPE_CHECKING\n"
                   "from polyrec import Engine, hookimpl\n"
                   "from polyrec.device import autocast\n"
                   "import polyrec.store.catalog\n"
                   "from polyrec import _private\n"
                   "from polyrec.knowledge_graph.graph import load_graph, _helper\n"
                   "from polyrec.plugins.fuse_attention import FUSERS\n"
                   "from . import readers\n"
                   "if TYPE_CHECKING:\n"
                   "    from polyrec.feedback.events import Event\n")
    found = violations(bad)
    assert len(found) == 5, found
    assert "from polyrec.device import autocast" in found[0]
    assert "import polyrec.store.catalog" in found[1]
    assert "private name polyrec._private" in found[2]
    assert "private name polyrec.knowledge_graph.graph._helper" in found[3]
    assert "from polyrec.feedback.events import Event" in found[4]
