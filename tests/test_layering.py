"""engine/ imports in one direction: a stage never imports a later stage.

The order is docs/architecture.md's: the base modules (errors, contracts, hook specs,
device, TrainingData, the plugin host) < store < knowledge_graph < ingest < encode <
rank < feedback < retrieve < the Engine facade (engine.py, services.py, the package's
__init__, i.e. the public API) < serve < cli (the HTTP app and the CLI are clients of the
Engine). Imports inside ``if TYPE_CHECKING:`` are type hints only and
do not count; imports inside functions do (they are the run-time cycles this forbids).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"

#: Layer of each top-level name under ``polyrec`` (a module of engine/ or a sub-package).
ORDER: list[tuple[str, ...]] = [
    ("errors", "hookspecs", "contracts", "device", "training_data", "plugin_host", "progress",
     "plots"),
    ("store",),
    ("knowledge_graph",),
    ("ingest",),
    ("encode",),
    ("rank",),
    ("feedback",),
    ("retrieve",),
    ("engine", "services", "__init__"),
    ("cluster",),  # Ray for the batch work: drives an Engine, used by the CLI
    ("serve",),
    ("cli",),
]
LAYER = {name: rank for rank, names in enumerate(ORDER) for name in names}


def layer_of(module: str) -> int | None:
    """Layer of a dotted module under polyrec ('polyrec.rank.train' -> rank's layer)."""
    parts = module.split(".")
    if parts[0] != "polyrec":
        return None
    if len(parts) == 1:
        return LAYER["__init__"]
    if parts[1] == "plugins":  # built-in plugins are loaded by name, never imported by the core
        return len(ORDER)
    return LAYER.get(parts[1])


def module_name(path: Path, root: Path = ENGINE) -> str:
    rel = path.relative_to(root).with_suffix("")
    parts = ["polyrec", *rel.parts]
    if parts[-1] == "__init__":
        parts = parts[:-1] if len(parts) > 1 else parts
    return ".".join(parts)


def _type_checking_lines(tree: ast.AST) -> set[int]:
    lines: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for child in node.body:
                lines.update(range(child.lineno, (child.end_lineno or child.lineno) + 1))
    return lines


def imports(path: Path, package: str) -> list[tuple[int, str]]:
    """(line, imported module) for every run-time import of ``path`` under polyrec."""
    tree = ast.parse(path.read_text(), filename=str(path))
    hints = _type_checking_lines(tree)
    found = []
    for node in ast.walk(tree):
        if getattr(node, "lineno", None) in hints:
            continue
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this package
                base = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                mod = f"{base}.{node.module}" if node.module else base
            else:
                mod = node.module or ""
            if mod == "polyrec":  # `from polyrec import rank` names a sub-package; any
                for a in node.names:  # other name comes from the public API (the facade)
                    found.append((node.lineno, f"polyrec.{a.name}" if a.name in LAYER else mod))
            else:
                found.append((node.lineno, mod))
    return [(n, m) for n, m in found if m.split(".")[0] == "polyrec"]


def upward_imports(root: Path = ENGINE) -> list[str]:
    """'file:line: module (layer a) imports target (layer b)' for every upward import."""
    problems = []
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        mine = layer_of(me)
        if mine is None:
            continue
        package = me if path.name == "__init__.py" else me.rsplit(".", 1)[0]
        for line, target in imports(path, package):
            theirs = layer_of(target)
            if theirs is not None and theirs > mine:
                problems.append(f"{path.relative_to(root.parent)}:{line}: {me} imports {target}")
    return problems


def test_every_engine_module_has_a_layer():
    unknown = [module_name(p) for p in ENGINE.rglob("*.py") if layer_of(module_name(p)) is None]
    assert unknown == []


def test_no_stage_imports_a_later_stage():
    assert upward_imports() == []


def test_the_check_fails_on_an_upward_import(tmp_path):
    """A store module that imports the feedback stage is caught (a guard against a
    vacuous check): built in a copy of engine/ so the real tree is never touched."""
    import shutil
    copy = tmp_path / "engine"
    shutil.copytree(ENGINE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "store" / "bad_shortcut.py").write_text(
        "def f():\n    from polyrec.feedback import events\n    return events\n")
    problems = upward_imports(copy)
    assert len(problems) == 1 and "polyrec.store.bad_shortcut imports polyrec.feedback" in problems[0]


@pytest.mark.parametrize("source,expected", [
    ("from polyrec.rank import train\n", []),
    ("if TYPE_CHECKING:\n    from polyrec.cli import main\n", []),
    ("from polyrec import retrieve\n", ["polyrec.retrieve"]),
])
def test_type_hints_do_not_count_and_subpackages_do(tmp_path, source, expected):
    path = tmp_path / "m.py"
    path.write_text("from typing import TYPE_CHECKING\n" + source)
    targets = [m for _, m in imports(path, "polyrec.rank") if layer_of(m) and layer_of(m) > LAYER["rank"]]
    assert targets == expected
