"""``--ray`` without Ray installed: one line naming the extra to install."""
from __future__ import annotations

import sys

import pytest
from click.testing import CliRunner

from polyrec.cli.main import cli


@pytest.mark.parametrize("args", [["encode", "--ray"], ["train", "--ray", "--ranker", "two_tower"],
                                  ["recommend", "--all", "--ray"]])
def test_ray_flag_without_ray_names_the_extra(monkeypatch, tmp_path, args):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` raises ImportError
    res = CliRunner().invoke(cli, ["--db", str(tmp_path / "x.db"), *args])
    assert res.exit_code == 1
    assert res.output.strip().splitlines() == [
        "Error: --ray needs Ray, which is not installed: pip install 'polyrec[ray]'"]
