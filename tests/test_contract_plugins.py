"""Plugins written from the contracts alone (engine/contracts.py, docs/plugins.md).

One plugin, ``contractplug``, provides an Encoder, a Fuser, two Rankers (one composite),
a Reader and a CLI command. It imports nothing but the public API (``from polyrec
import ...``) and uses only documented contract members; it is installed the way pip
would install it (a dist-info with an entry point) and exercised through the CLI
(``polyrec.cli.main.cli``) and the Python API on MovieLens-100k.
"""
from __future__ import annotations

import importlib
import json
import sys
import textwrap

import pytest
from click.testing import CliRunner

from conftest import copy_db

PLUGIN_SOURCE = '''
"""contractplug: every plugin kind, from the documented contracts only."""
import json
import zlib

import click
import torch

from polyrec import (ConfigError, EncodeResult, Encoder, Fuser, Option, Ranker, Reader, Row,
                     TrainingData, ValidationError, hookimpl)

__version__ = "0.3.0"


class GenreEncoder(Encoder):
    """Genres (the item attribute 'class', space separated) hashed into buckets."""

    name = "contract_genre"
    modality = "genre"

    def __init__(self, **options):
        super().__init__(**options)
        self.buckets = int(options.get("buckets", 32))
        if self.buckets < 4:
            raise ConfigError("contract_genre: buckets must be at least 4")

    @property
    def dim(self):
        return self.buckets

    def fingerprint(self):
        return f"contract-genre-v1-{self.buckets}"

    def content(self, item):
        genres = item.attributes.get("class")
        return " ".join(sorted(str(genres).split())) if genres else None

    def encode(self, items, ctx):
        out = torch.zeros(len(items), self.buckets)
        for row, item in enumerate(items):
            for genre in self.content(item).split():
                out[row, zlib.crc32(genre.encode()) % self.buckets] = 1.0
        return EncodeResult(torch.nn.functional.normalize(out, dim=1), [it.id for it in items])


class MeanFuser(Fuser):
    """Projects each modality to out_dim and averages the present ones."""

    name = "contract_mean"

    def __init__(self, dims, out_dim, **options):
        super().__init__(dims, out_dim, **options)
        self.proj = torch.nn.ModuleDict({m: torch.nn.Linear(d, out_dim) for m, d in dims.items()})

    def forward(self, tokens, present):
        weights = present.float() / present.float().sum(1, keepdim=True).clamp(min=1)
        fused = sum(weights[:, j:j + 1] * self.proj[m](tokens[m])
                    for j, m in enumerate(self.modalities))
        return fused, weights


class SmoothedPopular(Ranker):
    """Popularity with additive smoothing; items added after fit get the smoothing mass."""

    name = "contract_pop"
    defaults = {
        "alpha": Option(1.0, float, help="additive smoothing", grid=True),
        "mode": Option("log", choices=("log", "raw"), help="log or raw counts"),
        "cap": Option(None, int, help="count cap; None: none"),
        "seed": 0,
        "epochs": 1,
        "device": "cpu",
    }

    def fit(self, data: TrainingData) -> None:
        alpha = self.options["alpha"]
        grid = alpha if isinstance(alpha, list) else [alpha]
        self.alpha = grid[-1]
        self.ids = list(data.item_ids)
        counts = data.item_counts().float()
        if self.options["cap"] is not None:
            counts = counts.clamp(max=self.options["cap"])
        self.counts = counts
        self.info = {"alpha": self.alpha, "grid": grid,
                     "types": sorted({type(a).__name__ for a in grid}),
                     "seed": self.options["seed"], "epochs": self.options["epochs"],
                     "device": self.options["device"], "mode": self.options["mode"],
                     "fitted_items": data.n_items}

    def _value(self, counts):
        c = counts + self.alpha
        return c.log() if self.options["mode"] == "log" else c

    def score_users(self, user_index, data):
        # the catalogue may have grown since fit: map by id, score new items as unseen
        full = torch.zeros(data.n_items)
        pos = data.item_index()
        for j, ident in enumerate(self.ids):
            if ident in pos:
                full[pos[ident]] = self.counts[j]
        return self._value(full).expand(len(user_index), -1).clone()

    def state(self):
        return {"ids": self.ids, "counts": self.counts, "alpha": self.alpha, "info": self.info}

    def load_state(self, state):
        self.ids, self.counts = list(state["ids"]), state["counts"]
        self.alpha, self.info = float(state["alpha"]), dict(state["info"])

    def explain(self, user, item, data):
        return f"{int(data.item_counts()[item])} users liked it"


class Blend(Ranker):
    """Sum of its members' standardised scores (a composite ranker)."""

    name = "contract_blend"
    composite = True
    handles_cold_items = True
    defaults = {"members": Option(["contract_pop"], list, help="member names or specs"),
                "epochs": 1}

    def __init__(self, **options):
        super().__init__(**options)
        factory = self.options["factory"]
        self.labels, self.members = [], []
        for n, spec in enumerate(self.options["members"]):
            spec = {"name": spec, "options": {}} if isinstance(spec, str) else spec
            self.labels.append(f"{spec['name']}#{n}")
            self.members.append(factory(spec["name"], spec.get("options") or {}))

    def fit(self, data):
        for m in self.members:
            m.fit(data)
        self.info = {"members": self.labels, "epochs": self.options["epochs"]}

    def score_users(self, user_index, data):
        total = torch.zeros(len(user_index), data.n_items)
        for m in self.members:
            s = m.score_users(user_index, data).float()
            s = torch.where(torch.isfinite(s), s, torch.zeros_like(s))
            total += (s - s.mean(1, keepdim=True)) / s.std(1, keepdim=True).clamp(min=1e-9)
        return total

    def state(self):
        return {"members": [m.state() for m in self.members], "info": self.info}

    def load_state(self, state):
        for m, s in zip(self.members, state["members"]):
            m.load_state(s)
        self.info = dict(state["info"])

    def components(self):
        return list(zip(self.labels, self.members))

    def modality_weights(self, data):
        names = sorted(data.item_features)
        if not names:
            return None
        present = torch.stack([data.item_features[m][1].float() for m in names], 1)
        return names, present / present.sum(1, keepdim=True).clamp(min=1)

    def explain(self, user, item, data):
        return f"a blend of {len(self.members)} rankers"


class Broken(SmoothedPopular):
    """Breaks the growing-catalogue rule: always scores the items fit saw, no more."""

    name = "contract_broken"

    def score_users(self, user_index, data):
        return self._value(self.counts).expand(len(user_index), -1).clone()


class PipeReader(Reader):
    """'|'-separated text with a header line."""

    name = "contract_pipe"
    suffixes = (".pipe",)

    def columns(self, path):
        with open(path, encoding="utf-8") as fh:
            return [c.strip() for c in fh.readline().rstrip("\\n").split("|")]

    def read(self, path):
        try:
            fh = open(path, encoding="utf-8")
        except OSError as exc:
            raise ValidationError(f"cannot read: {exc}", file=str(path)) from None
        with fh:
            header = [c.strip() for c in fh.readline().rstrip("\\n").split("|")]
            for number, line in enumerate(fh, start=1):
                values = line.rstrip("\\n").split("|")
                if len(values) != len(header):
                    yield Row(number, {None: f"{len(values)} fields, expected {len(header)}"})
                    continue
                yield Row(number, {k: (v.strip() or None) for k, v in zip(header, values)})


@click.command("contract-report")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
@click.pass_obj
def report_command(state, as_json):
    """What this plugin sees of the store."""
    eng = state.engine()
    out = {"items": len(eng.items()),
           "rankers": sorted(n for n in eng.registry("rankers").names() if n.startswith("contract"))}
    click.echo(json.dumps(out) if as_json else f"{out['items']} items")


@hookimpl
def register_encoders(register):
    register(GenreEncoder)


@hookimpl
def register_fusers(register):
    register(MeanFuser)


@hookimpl
def register_rankers(register):
    register(SmoothedPopular)
    register(Blend)
    register(Broken)


@hookimpl
def register_readers(register):
    register(PipeReader)


@hookimpl
def register_commands(cli):
    cli.add_command(report_command)
'''

MODULE = "contractplug_pt"
DIST, VERSION, EP = "polyrec-contract-plug", "0.3.0", "contractplug"


@pytest.fixture(scope="module")
def plugin_site(tmp_path_factory):
    """The plugin installed as pip would leave it (module + dist-info with the entry
    point), on sys.path, with POLYREC_LOAD_PLUGINS limited to it."""
    root = tmp_path_factory.mktemp("contract_site")
    (root / f"{MODULE}.py").write_text(textwrap.dedent(PLUGIN_SOURCE))
    info = root / f"{DIST.replace('-', '_')}-{VERSION}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {DIST}\nVersion: {VERSION}\n")
    (info / "entry_points.txt").write_text(f"[polyrec]\n{EP} = {MODULE}\n")
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(root))
        mp.setenv("POLYREC_LOAD_PLUGINS", EP)
        mp.delenv("POLYREC_NO_ENTRYPOINTS", raising=False)
        yield root
    sys.modules.pop(MODULE, None)


@pytest.fixture(scope="module")
def plugin(plugin_site):
    return importlib.import_module(MODULE)


def test_plugin_imports_only_the_public_api():
    imports = [line.strip() for line in PLUGIN_SOURCE.splitlines()
               if line.strip().startswith(("import ", "from "))]
    assert [i for i in imports if "polyrec" in i] == [
        "from polyrec import (ConfigError, EncodeResult, Encoder, Fuser, Option, Ranker, Reader, Row,"]
    assert not [i for i in imports if i.startswith("from polyrec.") or i.startswith("import polyrec")]


@pytest.fixture
def polyrec_cli(plugin_site, monkeypatch):
    """``polyrec.cli.main.cli`` with plugin commands (re)loaded for this test only."""
    from polyrec.cli.main import cli
    monkeypatch.setattr(cli, "commands", dict(cli.commands))
    monkeypatch.setattr(cli, "_plugin_commands_added", False, raising=False)

    def run(db, *args, ok=(0,)):
        result = CliRunner().invoke(cli, ["--db", str(db), "--device", "cpu", "--quiet", *args])
        assert result.exit_code in ok, (args, result.output, result.exception)
        return result
    return run


def _json(result):
    return json.loads(result.stdout)


# -- options: the schema on the contract ----------------------------------------------------
def test_typed_defaults_convert_text_and_grids(plugin):
    from polyrec import ConfigError
    cls = plugin.SmoothedPopular
    assert cls.check_options({"alpha": "0.5"}, text=True) == {"alpha": 0.5}
    assert cls.check_options({"alpha": "[0.5,1]"}, text=True) == {"alpha": [0.5, 1.0]}
    assert cls.check_options({"alpha": "0.5, 1"}, text=True) == {"alpha": [0.5, 1.0]}
    assert cls.check_options({"alpha": 2}) == {"alpha": 2.0}
    assert cls.check_options({"cap": "7", "seed": "3"}, text=True) == {"cap": 7, "seed": 3}
    assert cls.check_options({"cap": None}) == {"cap": None}
    r = cls(alpha=[1, 2])
    assert r.options == {"alpha": [1.0, 2.0], "mode": "log", "cap": None, "seed": 0,
                         "epochs": 1, "device": "cpu"}
    assert r.info == {}
    schema = cls.option_schema()
    assert schema["alpha"].type is float and schema["alpha"].grid
    assert schema["seed"].type is int and not schema["seed"].grid
    with pytest.raises(ConfigError) as bad:
        cls.check_options({"alpha": "high"}, text=True)
    assert str(bad.value) == ("ranker 'contract_pop': option 'alpha' expects float or a list "
                              "of floats (a grid), not 'high'")
    with pytest.raises(ConfigError, match="option 'seed' expects int, not \\[1, 2\\]"):
        cls(seed=[1, 2])  # not a grid option
    with pytest.raises(ConfigError, match="option 'mode' expects str \\(one of log, raw\\)"):
        cls(mode="fancy")
    with pytest.raises(ConfigError, match="ranker 'contract_pop' has no option 'beta' "
                                          "\\(options: alpha, cap, device, epochs, mode, seed\\)"):
        cls(beta=1)


def test_ranker_without_defaults_is_unchecked():
    from polyrec import Ranker

    class Loose(Ranker):
        name = "loose"

        def fit(self, data):
            pass

        def score_users(self, user_index, data):
            return None

    assert Loose.check_options({"x": "[1,2]", "y": "abc"}, text=True) == {"x": [1, 2], "y": "abc"}
    assert Loose(anything="goes").options == {"anything": "goes"}
    assert Loose().components() == [] and Loose().explain(0, 0, None) is None
    assert Loose().modality_weights(None) is None and Loose().item_vectors(None) is None


def test_plain_defaults_stay_backward_compatible():
    from polyrec import ConfigError, Ranker

    class Plain(Ranker):
        name = "plain"
        defaults = {"k": 20, "l2": [10.0, 100.0], "names": ["a"], "fuser": "mean", "x": None}

        def fit(self, data):
            pass

        def score_users(self, user_index, data):
            return None

    assert Plain.check_options({"k": "5", "l2": "[1,2]", "x": "[1]"}, text=True) == {
        "k": 5, "l2": [1.0, 2.0], "x": [1]}
    assert Plain.check_options({"l2": 50}) == {"l2": 50.0}  # a grid option takes one value
    spec = {"name": "b", "options": {}}
    assert Plain.check_options({"names": ["b", spec]}) == {"names": ["b", spec]}
    assert Plain.check_options({"fuser": Plain})["fuser"] is Plain  # objects pass
    with pytest.raises(ConfigError, match="option 'fuser' expects str, not 3"):
        Plain(fuser=3)
    with pytest.raises(ConfigError, match="option 'k' expects int, not True"):
        Plain(k=True)


# -- the CLI, on MovieLens-100k -------------------------------------------------------------
@pytest.mark.slow
def test_every_plugin_kind_through_the_cli(polyrec_cli, ml100k_db, tmp_path):
    db = copy_db(ml100k_db, tmp_path)
    listed = _json(polyrec_cli(db, "plugins", "--json"))
    mine = next(r for r in listed if r["name"] == EP)
    assert mine["loaded"] and mine["error"] is None and mine["version"] == VERSION
    assert mine["registered"] == {
        "encoders": ["contract_genre"], "fusers": ["contract_mean"],
        "rankers": ["contract_pop", "contract_blend", "contract_broken"],
        "readers": ["contract_pipe"], "commands": ["contract-report"]}

    # encoder
    enc = _json(polyrec_cli(db, "encode", "--encoder", "contract_genre", "--json"))
    assert "contract_genre" in json.dumps(enc)

    # ranker: typed options from --set, --seed/--epochs reach it, info is reported
    first = _json(polyrec_cli(db, "train", "--ranker", "contract_pop", "--set", "alpha=0.5",
                              "--set", "mode=raw", "--set", "cap=300", "--seed", "3",
                              "--epochs", "2", "--json"))
    assert first["info"]["alpha"] == 0.5 and first["info"]["types"] == ["float"]
    assert (first["info"]["seed"], first["info"]["epochs"], first["info"]["mode"]) == (3, 2, "raw")
    assert first["info"]["device"] == "cpu"  # the engine's device, as a string
    assert first["options"] == {"alpha": 0.5, "mode": "raw", "cap": 300, "seed": 3, "epochs": 2}
    grid = _json(polyrec_cli(db, "train", "--ranker", "contract_pop", "--set", "alpha=[0.5,1]",
                             "--json", ok=(0, 3)))
    assert grid["info"]["grid"] == [0.5, 1.0] and grid["info"]["types"] == ["float"]

    # one clear error for a bad value and an unknown option
    bad = polyrec_cli(db, "train", "--ranker", "contract_pop", "--set", "alpha=high", ok=(1,))
    assert bad.stderr.strip() == ("Error: ranker 'contract_pop': option 'alpha' expects float "
                                  "or a list of floats (a grid), not 'high'")
    unknown = polyrec_cli(db, "train", "--ranker", "contract_pop", "--set", "beta=1", ok=(1,))
    assert "ranker 'contract_pop' has no option 'beta'" in unknown.stderr
    assert len(unknown.stderr.strip().splitlines()) == 1

    # evaluate: options per label, grids as typed lists
    ev = _json(polyrec_cli(db, "evaluate", "--models", "contract_pop,g=contract_pop,popular",
                           "-o", "contract_pop.alpha=2", "-o", "g.alpha=[0.5,1]",
                           "-o", "g.mode=raw", "--k", "10", "--json"))
    rows = {r["model"]: r for r in ev["models"]}
    assert rows["contract_pop"]["options"] == {"alpha": 2.0}
    assert rows["g"]["options"] == {"alpha": [0.5, 1.0], "mode": "raw"}
    assert rows["g"]["info"]["grid"] == [0.5, 1.0]
    assert rows["contract_pop"]["metrics"]["recall@10"] == pytest.approx(
        rows["popular"]["metrics"]["recall@10"], abs=0.02)  # both rank by popularity
    bad_ev = polyrec_cli(db, "evaluate", "--models", "contract_pop", "-o",
                         "contract_pop.cap=many", ok=(1,))
    assert bad_ev.stderr.strip() == ("Error: ranker 'contract_pop': option 'cap' expects int, "
                                     "not 'many'")

    # reader: new items through the plugin's format; the catalogue grows after training
    new = tmp_path / "new.pipe"
    new.write_text("item_id|title|class\nnew-1|A New Film|Comedy Drama\nnew-2|Another|\nbad|row\n")
    ing = polyrec_cli(db, "ingest", "items", str(new), "--on-error", "skip", "--json")
    report = _json(ing)  # the bad row is reported with its number and reason, and skipped
    assert report["format"] == "contract_pipe"
    assert [(e["row"], e["message"]) for e in report["errors"]] == [(3, "2 fields, expected 3")]

    # the ranker serves the grown catalogue and explains itself in its own words
    recs = _json(polyrec_cli(db, "recommend", "1", "-k", "5", "--explain", "--json"))
    assert len(recs) == 5
    assert recs[0]["explanation"]["ranker"]["ranker"].endswith("users liked it")
    assert "users liked it" in recs[0]["explanation"]["text"]

    # command
    out = _json(polyrec_cli(db, "contract-report", "--json"))
    assert out["items"] == 1682 + 2
    assert out["rankers"] == ["contract_blend", "contract_broken", "contract_pop"]


# -- the Python API -------------------------------------------------------------------------
@pytest.fixture
def api_engine(plugin, ml100k_db, tmp_path):
    from polyrec import Engine
    db = copy_db(ml100k_db, tmp_path)
    with Engine(db, device="cpu", entrypoints=False, progress=False, plugins=[plugin]) as eng:
        eng.encode(["contract_genre"])
        yield eng


@pytest.mark.slow
def test_composite_ranker_explains_through_the_contract(api_engine):
    eng = api_engine
    report = eng.train("contract_blend", options={"members": [
        "contract_pop", {"name": "contract_pop", "options": {"mode": "raw", "alpha": "2"}}]},
        epochs=4)
    # --epochs reached the composite and, through with_option, each member spec
    assert report.info == {"members": ["contract_pop#0", "contract_pop#1"], "epochs": 4}
    assert report.options["members"][1]["options"] == {"mode": "raw", "alpha": "2", "epochs": 4}
    recs = eng.recommend("1", k=3, explain=True)
    e = recs[0].explanation
    assert {"contract_pop#0", "contract_pop#1"} <= set(e["scores"])  # components()
    assert e["modalities"] == {"genre": 1.0}  # modality_weights()
    assert e["ranker"]["ranker"] == "a blend of 2 rankers"  # explain()
    assert e["ranker"]["contract_pop#0"].endswith("users liked it")
    assert e["because"]  # similar history items from the stored encoder vectors


@pytest.mark.slow
def test_fuser_and_encoder_feed_a_builtin_ranker(api_engine):
    eng = api_engine
    if "two_tower" not in eng.registry("rankers"):
        pytest.skip("two_tower is not shipped in this checkout")
    report = eng.train("two_tower", options={
        "fuser": "contract_mean", "modalities": "genre", "validation": False, "refit": False,
        "dim": 16, "n_random": 256}, epochs=1)
    assert report.info["modalities"] == ["genre"]
    recs = eng.recommend("1", k=3, explain=True)
    assert recs and recs[0].explanation["modalities"] == {"genre": 1.0}


@pytest.mark.slow
def test_reader_reports_bad_rows_and_keeps_good_ones(api_engine, tmp_path):
    eng = api_engine
    path = tmp_path / "more.pipe"
    path.write_text("item_id|title|class\nx-1|Good|Drama\nbroken line\nx-2|Also good|\n")
    from polyrec import ValidationError
    with pytest.raises(ValidationError, match="row 2"):
        eng.ingest(path, "items")
    eng.ingest(path, "items", on_error="skip")
    ids = {it.external_id for it in eng.items()}
    assert {"x-1", "x-2"} <= ids


@pytest.mark.slow
def test_growing_catalogue_rule_is_enforced_by_name(api_engine, tmp_path):
    """A ranker that ignores new items is reported by name; the engine serves the last
    version that scores the current catalogue."""
    eng = api_engine
    good = eng.train("contract_pop")
    eng.train("contract_broken")
    eng.add_items([{"external_id": "grown-1", "title": "Added after training"}])
    recs = eng.recommend("1", k=3)
    assert len(recs) == 3
    rec = eng.services.recommender()
    assert rec.version == good.version
    assert any("contract_broken" in str(err.get("error", "")) + str(err.get("ranker", ""))
               for err in rec.errors)
