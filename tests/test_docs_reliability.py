"""docs/reliability.md stays true: every test it names as proof exists."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reliability.md"


def named_tests() -> list[tuple[str, str | None]]:
    """(test file, test name or None for the whole file) for every proof in the page."""
    out = []
    for cell in re.findall(r"\| ([^|]*tests/[^|]*) \|", PAGE.read_text()):
        current = None
        for part in re.split(r",\s*", cell):
            m = re.match(r"(tests/\w+\.py)(?:::(\w+))?", part.strip())
            if m:
                current = m.group(1)
                out.append((current, m.group(2)))
            elif part.strip().startswith("::") and current:
                out.append((current, part.strip()[2:].split()[0]))
    return out


def test_every_named_test_exists():
    named = named_tests()
    assert len(named) > 30
    for file, name in named:
        path = ROOT / file
        assert path.is_file(), file
        if name is not None:
            tree = ast.parse(path.read_text())
            names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
            assert name in names, f"{file}::{name} is named in docs/reliability.md but missing"
