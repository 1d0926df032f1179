"""docs/plugins.md stays true to the code: every hook spec and contract method is
documented, and the guide's example plugin and example tests run."""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

from polyrec import Encoder, FeedbackLearner, Fuser, Ranker, Reader

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
HOOKSPECS = ROOT / "engine" / "hookspecs.py"
CONTRACTS = (Encoder, Fuser, Ranker, FeedbackLearner, Reader)


def hook_specs() -> dict[str, list[str]]:
    """name -> parameter names of every ``def register_*`` in engine/hookspecs.py."""
    tree = ast.parse(HOOKSPECS.read_text())
    return {node.name: [a.arg for a in node.args.args] for node in tree.body
            if isinstance(node, ast.FunctionDef) and node.name.startswith("register_")}


def section(text: str, heading: str) -> str:
    """The text under a markdown heading, up to the next heading of the same level."""
    level = heading.split(" ", 1)[0]
    start = text.index(heading + "\n")
    rest = text[start + len(heading) + 1:]
    end = re.search(rf"^{level} ", rest, flags=re.M)
    return rest[:end.start()] if end else rest


def code_blocks(text: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", text, flags=re.S)


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE.read_text()


def test_hookspecs_found():
    assert len(hook_specs()) == 6  # the parser works (a guard against a vacuous test)


@pytest.mark.parametrize("hook", sorted(hook_specs()))
def test_every_hook_spec_is_documented(guide, hook):
    params = ", ".join(hook_specs()[hook])
    heading = f"### {hook}({params})"
    assert heading + "\n" in guide, f"docs/plugins.md lacks a section '{heading}'"
    body = section(guide, heading)
    example = [b for b in code_blocks(body) if f"@hookimpl\ndef {hook}({params}):" in b]
    assert example, f"the section on {hook} has no @hookimpl example"


def test_guide_documents_no_unknown_hook(guide):
    documented = set(re.findall(r"^### (register_\w+)\(", guide, flags=re.M))
    assert documented == set(hook_specs())


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
def test_every_contract_method_is_documented(guide, contract):
    body = section(guide, f"### {contract.__name__}")
    public = [n for n, v in vars(contract).items()
              if not n.startswith("_") and (callable(v) or isinstance(v, property))]
    public += [n for n in getattr(contract, "__annotations__", {}) if not n.startswith("_")]
    assert public
    for name in public:
        assert re.search(rf"\b{name}\b", body), f"{contract.__name__}.{name} is not documented"


@pytest.fixture(scope="module")
def my_plugin(guide, tmp_path_factory):
    """The guide's one-file plugin, written out and imported as ``my_plugin``."""
    marker = "<!-- example: my_plugin.py"
    source = code_blocks(guide[guide.index(marker):])[0]
    folder = tmp_path_factory.mktemp("guide")
    (folder / "my_plugin.py").write_text(source)
    spec = importlib.util.spec_from_file_location("my_plugin", folder / "my_plugin.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["my_plugin"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["my_plugin"]


def test_guide_example_plugin_registers(my_plugin, tmp_path):
    from polyrec import Engine
    with Engine(tmp_path / "g.db", builtins=(), entrypoints=False, progress=False,
                plugins=[my_plugin]) as eng:
        record = eng.plugins.records["my_plugin"]
        assert record.version == "0.1.0" and record.source == "extra"
        assert record.registered == {"encoders": ["trigram"], "commands": ["titles"]}


def test_guide_example_tests_pass(guide, my_plugin, tmp_path):
    block = next(b for b in code_blocks(guide) if b.startswith("import my_plugin\nfrom click"))
    namespace: dict = {}
    exec(compile(block, "docs/plugins.md", "exec"), namespace)
    tests = [f for n, f in namespace.items() if n.startswith("test_")]
    assert len(tests) == 2
    for n, test in enumerate(tests):
        folder = tmp_path / str(n)
        folder.mkdir()
        test(folder)


def test_guide_example_encoder_separates_titles(my_plugin, tmp_path):
    import torch
    from polyrec import EncoderContext, Engine
    with Engine(tmp_path / "s.db", builtins=(), entrypoints=False, progress=False,
                plugins=[my_plugin]) as eng:
        eng.add_items([{"external_id": "a", "title": "Black dress"},
                       {"external_id": "b", "title": "Black dresses"},
                       {"external_id": "c", "title": "Garden hose"}])
        enc = eng.registry("encoders").get("trigram")()
        result = enc.encode(eng.items(), EncoderContext(eng, torch.device("cpu")))
        v = result.vectors
        assert float(v[0] @ v[1]) > 0.7 > float(v[0] @ v[2])
