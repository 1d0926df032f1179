"""docs/plugins.md stays true to the code: every hook spec and contract method is
documented, and the guide's example plugin and example tests run."""
from __future__ import annotations

import ast
import importlib.util
import re
import sys
from pathlib import Path

import pytest

import dataclasses

import polyrec
from polyrec import (Encoder, FeedbackLearner, Fuser, IntentModel, Option, Ranker, Reader,
                     TrainingData)

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "plugins.md"
HOOKSPECS = ROOT / "engine" / "hookspecs.py"
CONTRACTS = (Encoder, Fuser, Ranker, FeedbackLearner, Reader, IntentModel)


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
    assert len(hook_specs()) == 7  # the parser works (a guard against a vacuous test)


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


def public_members(cls: type) -> list[str]:
    """Methods, properties, class/static methods, class attributes and annotated
    attributes a class defines itself (not inherited, no underscore)."""
    names = [n for n in vars(cls) if not n.startswith("_")]
    names += [n for n in getattr(cls, "__annotations__", {}) if not n.startswith("_")]
    return sorted(set(names))


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
def test_every_contract_method_is_documented(guide, contract):
    body = section(guide, f"### {contract.__name__}")
    public = public_members(contract)
    assert public
    for name in public:
        assert re.search(rf"\b{name}\b", body), f"{contract.__name__}.{name} is not documented"


@pytest.mark.parametrize("contract", CONTRACTS, ids=lambda c: c.__name__)
def test_every_contract_method_has_a_docstring(contract):
    for name, value in vars(contract).items():
        if name.startswith("_") or not (callable(value) or isinstance(
                value, (property, classmethod, staticmethod))):
            continue
        func = value.__func__ if isinstance(value, (classmethod, staticmethod)) else value
        func = func.fget if isinstance(func, property) else func
        assert (func.__doc__ or "").strip(), f"{contract.__name__}.{name} has no docstring"


def test_ranker_members_the_core_uses_are_in_the_contract():
    # the core reads these by name: they must be declared (with defaults) on the contract
    for name in ("defaults", "composite", "handles_cold_items", "info", "explain",
                 "components", "modality_weights", "item_vectors", "option_schema",
                 "check_options", "default_options"):
        assert name in public_members(Ranker), name


def test_option_fields_are_documented(guide):
    body = section(guide, "### Ranker")
    for f in dataclasses.fields(Option):
        if f.name == "inferred":  # internal: set when a plain default is read
            continue
        assert re.search(rf"\b{f.name}\b", body), f"Option.{f.name} is not documented"


def test_training_data_is_public_and_documented(guide):
    assert "TrainingData" in polyrec.__all__ and "Option" in polyrec.__all__
    body = section(guide, "### TrainingData")
    for name in public_members(TrainingData):
        assert re.search(rf"\b{name}\b", body), f"TrainingData.{name} is not documented"


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


@pytest.fixture(scope="module")
def my_ranker(guide, tmp_path_factory):
    """The guide's example ranker, written out and imported as ``my_ranker``."""
    marker = "<!-- example: my_ranker.py"
    source = code_blocks(guide[guide.index(marker):])[0]
    folder = tmp_path_factory.mktemp("guide_ranker")
    (folder / "my_ranker.py").write_text(source)
    spec = importlib.util.spec_from_file_location("my_ranker", folder / "my_ranker.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["my_ranker"] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules["my_ranker"]


def test_guide_example_ranker_trains_and_converts_options(my_ranker, tmp_path):
    import torch
    from polyrec import ConfigError, Engine
    cls = my_ranker.SmoothedPopular
    assert cls.check_options({"alpha": "[0.5,1]"}, text=True) == {"alpha": [0.5, 1.0]}
    with pytest.raises(ConfigError, match="option 'mode' expects str"):
        cls(mode="fancy")
    with Engine(tmp_path / "r.db", builtins=(), entrypoints=False, progress=False,
                plugins=[my_ranker]) as eng:
        eng.add_items([{"external_id": x} for x in "abc"])
        eng.add_interactions([{"user": "u", "item": "a", "kind": "rating", "value": 5},
                              {"user": "v", "item": "a", "kind": "rating", "value": 5},
                              {"user": "v", "item": "b", "kind": "rating", "value": 5}])
        report = eng.train("smoothed_popular", options={"alpha": 2})
        assert report.info == {"alpha": 2.0, "items": 3}
        recs = eng.recommend("u", k=2, explain=True)
        assert recs[0].item == "b" and "liked by 1 users" in recs[0].explanation["text"]
        assert torch.isfinite(torch.tensor([r.score for r in recs])).all()
