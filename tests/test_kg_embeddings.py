"""KG embeddings (TransE, RotatE) and the "kg" encoder's contract, on a small synthetic graph."""
from __future__ import annotations

import pytest
import torch
from sqlalchemy import func, select

from polyrec import Engine
from polyrec.contracts import EncoderContext, ItemView
from polyrec.errors import ConfigError, EncodingError
from polyrec.store.models import Artifact
from polyrec.knowledge_graph.embeddings import (KGEConfig, KGEmbeddings, head_corruption_probability,
                                        train_embeddings)
from polyrec.knowledge_graph.graph import load_tables
from polyrec.knowledge_graph.store import add_triples, link_items

N_FILMS, PER_DIRECTOR = 40, 5
FAST = {"dim": 16, "epochs": 30, "batch_size": 64, "negatives": 16, "chunk": 8, "threads": 1}


def _triples() -> list[tuple[str, str, str]]:
    out = []
    for i in range(N_FILMS):
        film, director = f"e{i}", f"d{i // PER_DIRECTOR}"
        out += [(film, "directed_by", director), (director, "director_of", film),
                (film, "genre", "g.all"), (film, "actor", f"a{(i * 7) % 20}")]
    return out


@pytest.fixture
def synth(engine: Engine) -> Engine:
    """40 films in 8 director groups of 5, one genre hub, 20 actors; items i0..i39 linked
    to e0..e39, item 'lone' linked to an entity with a single triple, 'bare' unlinked."""
    engine.add_items([{"external_id": f"i{i}", "title": f"Film {i}"} for i in range(N_FILMS)]
                     + [{"external_id": "lone"}, {"external_id": "bare"}])
    with engine.store.session() as s:
        add_triples(s, _triples() + [("e.lone", "directed_by", "d0")], source="synthetic")
        link_items(s, {**{f"i{i}": f"e{i}" for i in range(N_FILMS)}, "lone": "e.lone"})
    return engine


def _tables(eng: Engine):
    with eng.store.session() as s:
        return load_tables(s)


def _group_gap(vectors: torch.Tensor) -> float:
    """Mean cosine within director groups minus mean cosine across groups."""
    v = torch.nn.functional.normalize(vectors - vectors.mean(0), dim=1)
    sim = v @ v.T
    group = torch.arange(len(v)) // PER_DIRECTOR
    same = (group[:, None] == group[None, :]) & ~torch.eye(len(v), dtype=torch.bool)
    return float(sim[same].mean() - sim[group[:, None] != group[None, :]].mean())


@pytest.mark.parametrize("method,epochs", [("transe", 30), ("rotate", 60)])
def test_training_learns_the_structure(synth: Engine, method: str, epochs: int) -> None:
    tables = _tables(synth)
    opts = {k: v for k, v in FAST.items() if k not in ("threads", "epochs")}
    threads = torch.get_num_threads()
    emb = train_embeddings(tables, KGEConfig(method=method, epochs=epochs, **opts), progress=False,
                           threads=1)
    assert torch.get_num_threads() == threads  # restored
    assert emb.entity.shape == (tables.n_entities, 16)
    assert emb.relation.shape[0] == tables.n_relations
    assert emb.losses[-1] < 0.5 * emb.losses[0]
    films = emb.vectors([f"e{i}" for i in range(N_FILMS)])
    assert _group_gap(films) > 0.3
    if method == "transe":  # entities stay on the unit sphere
        assert torch.allclose(emb.entity.norm(dim=1), torch.ones(tables.n_entities), atol=1e-4)


def test_training_is_seeded_and_serialisable(synth: Engine) -> None:
    tables = _tables(synth)
    cfg = KGEConfig(dim=8, epochs=3, batch_size=64, negatives=4, chunk=4, seed=7)
    a = train_embeddings(tables, cfg, progress=False)
    b = train_embeddings(tables, cfg, progress=False)
    c = train_embeddings(tables, KGEConfig(**{**cfg.as_dict(), "seed": 8}), progress=False)
    assert torch.equal(a.entity, b.entity) and not torch.equal(a.entity, c.entity)
    back = KGEmbeddings.from_bytes(a.to_bytes())
    assert back.entities == a.entities and back.config == a.config
    assert torch.equal(back.entity, a.entity) and torch.equal(back.relation, a.relation)
    assert back.graph_fingerprint == tables.fingerprint
    assert torch.equal(back.vector("d3"), a.entity[a.index["d3"]])


def test_bernoulli_sampling_corrupts_the_many_side() -> None:
    from polyrec.knowledge_graph.graph import GraphTables
    import numpy as np
    # relation 0: one head, four tails (one-to-many) -> corrupt heads mostly
    tables = GraphTables(entities=list("abcde"), relations=["r"], heads=np.zeros(4, dtype=np.int64),
                         rels=np.zeros(4, dtype=np.int64), tails=np.arange(1, 5))
    assert head_corruption_probability(tables)[0] == pytest.approx(0.8)


def test_config_validation() -> None:
    assert KGEConfig().loss == "margin" and KGEConfig().margin == 1.0 and KGEConfig().negatives == 64
    rot = KGEConfig(method="rotate")
    assert rot.loss == "adversarial" and rot.margin == 6.0 and rot.negatives == 16
    for bad in ({"method": "distmult"}, {"loss": "hinge"}, {"method": "rotate", "dim": 15},
                {"epochs": 0}, {"lr": -1.0}, {"norm": 3}, {"sampling": "x"}):
        with pytest.raises(ConfigError):
            KGEConfig(**bad)


# -- the encoder -------------------------------------------------------------------------
def _encoder(eng: Engine, **options):
    return eng.registry("encoders").get("kg")(**{**FAST, **options})


def _ctx(eng: Engine) -> EncoderContext:
    return EncoderContext(engine=eng, device=eng.device, progress=False)


def test_encoder_contract(synth: Engine) -> None:
    enc = _encoder(synth)
    assert enc.name == "kg" and enc.modality == "kg" and enc.dim == 16
    items = {it.external_id: it for it in synth.items()}
    assert enc.content(items["bare"]) is None
    assert enc.content(items["i3"]) == "entity:e3"
    with pytest.raises(EncodingError):
        enc.fingerprint()
    enc.prepare(_ctx(synth))
    assert enc.trained
    linked = [it for it in items.values() if enc.content(it) is not None]
    result = enc.encode(linked, _ctx(synth))
    assert len(result.item_ids) == N_FILMS + 1 and not result.failed
    assert result.vectors.shape == (N_FILMS + 1, 16)
    assert torch.allclose(result.vectors.norm(dim=1), torch.ones(N_FILMS + 1), atol=1e-5)
    by_id = dict(zip(result.item_ids, result.vectors))
    films = torch.stack([by_id[items[f"i{i}"].id] for i in range(N_FILMS)])
    assert _group_gap(films) > 0.3


def test_encoder_reuses_stored_embeddings_and_retrains_on_change(synth: Engine) -> None:
    first = _encoder(synth)
    first.prepare(_ctx(synth))
    again = _encoder(synth, threads=2)  # threads is not part of the key
    again.prepare(_ctx(synth))
    assert first.trained and not again.trained
    assert again.fingerprint() == first.fingerprint()
    assert torch.equal(again.embeddings.entity, first.embeddings.entity)
    other_seed = _encoder(synth, seed=1)
    other_seed.prepare(_ctx(synth))
    assert other_seed.trained and other_seed.fingerprint() != first.fingerprint()
    with synth.store.session() as s:
        add_triples(s, [("e1", "actor", "a.new")])
    changed = _encoder(synth)
    changed.prepare(_ctx(synth))
    assert changed.trained and changed.fingerprint() != first.fingerprint()
    with synth.store.session() as s:
        assert s.execute(select(func.count()).select_from(Artifact)
                         .where(Artifact.name == "kg_embeddings")).scalar_one() == 3


def test_sparse_entities_blend_their_neighbours(synth: Engine) -> None:
    enc = _encoder(synth, sparse_degree=5, center=False, normalize=False)
    enc.prepare(_ctx(synth))
    lone = next(it for it in synth.items() if it.external_id == "lone")
    got = enc.encode([lone], _ctx(synth)).vectors[0]
    emb = enc.embeddings
    expected = 0.2 * emb.vector("e.lone") + 0.8 * emb.vector("d0")  # degree 1 of 5
    assert torch.allclose(got, expected, atol=1e-6)
    dense = next(it for it in synth.items() if it.external_id == "i0")  # degree 4 < 5
    film = enc.encode([dense], _ctx(synth)).vectors[0]
    assert not torch.allclose(film, emb.vector("e0"))
    plain = _encoder(synth, sparse_degree=0, center=False, normalize=False)
    plain.prepare(_ctx(synth))
    assert torch.equal(plain.encode([lone], _ctx(synth)).vectors[0], emb.vector("e.lone"))


def test_items_without_a_trained_entity_fail_cleanly(synth: Engine) -> None:
    with synth.store.session() as s:
        link_items(s, {"bare": "e.isolated"})  # an entity without triples
    enc = _encoder(synth)
    enc.prepare(_ctx(synth))
    bare = next(it for it in synth.items() if it.external_id == "bare")
    res = enc.encode([bare, ItemView(id=-1, external_id="ghost", entity="e.unknown")], _ctx(synth))
    assert res.item_ids == [] and res.vectors.shape == (0, 16)
    assert "no triples" in res.failed[bare.id] and "not in the trained graph" in res.failed[-1]


def test_encoder_options(engine: Engine) -> None:
    enc = engine.registry("encoders").get("kg")(dim="32", epochs="2", lr="0.1", center="false")
    assert enc.config.dim == 32 and enc.config.epochs == 2 and enc.config.lr == 0.1
    assert enc.center is False and enc.threads == 1
    assert engine.registry("encoders").get("kg")(threads="0").threads is None  # torch's own
    with pytest.raises(ConfigError, match="unknown kg option"):
        engine.registry("encoders").get("kg")(dimension=3)
    for bad in ({"dim": "many"}, {"threads": -1}, {"sparse_degree": -2}, {"center": "maybe"}):
        with pytest.raises(ConfigError):
            engine.registry("encoders").get("kg")(**bad)
    with pytest.raises(EncodingError, match="empty"):
        enc.prepare(_ctx(engine))


def test_engine_encode_stores_kg_vectors_once(synth: Engine) -> None:
    report = synth.encode(["kg"], options={"kg": FAST})
    rep = report["kg"]
    assert rep.error is None and rep.encoded == N_FILMS + 1 and rep.no_content == 1
    again = synth.encode(["kg"])["kg"]
    assert again.encoded == 0 and again.cached == N_FILMS + 1


def test_a_graph_change_alone_re_encodes_linked_items(synth: Engine) -> None:
    synth.encode(["kg"], options={"kg": FAST})
    with synth.store.session() as s:
        add_triples(s, [("e0", "actor", "a.new")], source="synthetic")
    rep = synth.encode(["kg"])["kg"]
    assert rep.error is None and rep.loaded
    assert rep.encoded == N_FILMS + 1  # every linked item: the embeddings were retrained
    assert synth.encode(["kg"])["kg"].encoded == 0
