"""The BERT text encoder: templates, equality with sentence-transformers, queries."""
from __future__ import annotations

import json

import pytest
import torch

from polyrec.contracts import EncoderContext, ItemView
from polyrec.errors import ConfigError, EncodingError
from polyrec.store import Store
from polyrec.store.vectors import load_vectors
from polyrec.plugins.text_bert import BertEncoder, auto_text, default_model_path, render_template

CPU = EncoderContext(engine=None, device=torch.device("cpu"), progress=False)  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def bert() -> BertEncoder:
    enc = BertEncoder()
    enc.prepare(CPU)
    return enc


@pytest.fixture(scope="module")
def sentence_transformer():
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(default_model_path()), device="cpu")


@pytest.fixture(scope="module")
def ml100k_titles(ml100k_dir) -> list[str]:
    lines = (ml100k_dir / "ml-100k.item").read_text(encoding="latin-1").splitlines()[1:]
    return [line.split("\t")[1] for line in lines]


def item(**kw) -> ItemView:
    return ItemView(id=kw.pop("id", 1), external_id=kw.pop("external_id", "x"), **kw)


def test_auto_template_uses_title_year_genres_and_skips_empty_fields():
    movie = item(title="Toy Story", attributes={"release_year": "1995",
                                                "class": ["Animation", "Children's", "Comedy"]})
    assert auto_text(movie) == "Toy Story (1995). Genres: Animation, Children's, Comedy"
    article = item(title="Pola seamless leggings", text="High-waisted leggings.",
                   attributes={"product_type_name": "Leggings/Tights", "product_type_no": 273,
                               "colour_group_name": "Black", "section_name": ""})
    assert auto_text(article) == ("Pola seamless leggings. Type: Leggings/Tights. "
                                  "Colour: Black. High-waisted leggings")
    assert auto_text(item(title="Heat", attributes={"class": "Action Crime"})) == \
        "Heat. Genres: Action, Crime"
    assert BertEncoder().content(item(title="", text=None, attributes={"x_no": 3})) is None


def test_custom_template_renders_fields_and_drops_dangling_separators():
    movie = item(title="Heat", attributes={"release_year": "1995"})
    assert render_template("{title}. {text}", movie) == "Heat"
    assert render_template("{title} ({release_year}) - {missing}", movie) == "Heat (1995)"
    assert BertEncoder(template="{external_id}: {title}").content(movie) == "x: Heat"


def test_bad_options_are_config_errors():
    with pytest.raises(ConfigError, match="unknown bert option"):
        BertEncoder(pooling="cls")
    with pytest.raises(ConfigError, match="template"):
        BertEncoder(template="{title")
    with pytest.raises(ConfigError, match="integers"):
        BertEncoder(max_length="long")


def test_missing_model_is_an_encoding_error(tmp_path):
    with pytest.raises(EncodingError, match="cannot load text model"):
        BertEncoder(model=str(tmp_path / "no-such-model")).prepare(CPU)


@pytest.mark.slow
def test_vectors_equal_sentence_transformers(bert, sentence_transformer, ml100k_titles):
    titles = ml100k_titles[:400]
    ours = bert.encode_texts(titles, CPU)
    theirs = sentence_transformer.encode(titles, batch_size=64, convert_to_tensor=True,
                                         normalize_embeddings=True).float()
    assert ours.shape == (400, 384) == tuple(theirs.shape)
    cosine = (ours * theirs).sum(dim=1)
    assert cosine.min().item() > 0.999
    assert torch.allclose(ours.norm(dim=1), torch.ones(400), atol=1e-4)


def test_stored_vectors_equal_sentence_transformers(ml100k_encoded_db, bert, sentence_transformer):
    store = Store(ml100k_encoded_db)
    with store.session() as s:
        ids, stored = load_vectors(s, "bert")
    store.close()
    from polyrec import Engine
    with Engine(ml100k_encoded_db, device="cpu", entrypoints=False, progress=False) as eng:
        views = {v.id: v for v in eng.items(ids[::8])}
    sample = [k for k, i in enumerate(ids) if i in views]
    texts = [bert.content(views[ids[k]]) for k in sample]
    theirs = sentence_transformer.encode(texts, convert_to_tensor=True,
                                         normalize_embeddings=True).float()
    cosine = torch.nn.functional.cosine_similarity(stored[sample], theirs, dim=1)
    assert len(sample) >= 200 and cosine.min().item() > 0.999


def test_encode_query_finds_the_matching_title(bert, ml100k_titles):
    titles = ml100k_titles[:200]
    vectors = bert.encode_texts(titles, CPU)
    query = bert.encode_query("the movie Toy Story", CPU)
    assert query.shape == (384,)
    assert titles[int((vectors @ query).argmax())] == "Toy Story"


def test_encode_keeps_item_order_and_fingerprint_tracks_settings(bert):
    views = [item(id=i, external_id=str(i), title=t) for i, t in
             enumerate(["A very long title about a heist in Los Angeles and a detective", "Up",
                        "Heat"], start=1)]
    result = bert.encode(views, CPU)
    assert result.item_ids == [1, 2, 3] and not result.failed
    single = bert.encode_texts(["Up"], CPU)[0]
    assert torch.allclose(result.vectors[1], single, atol=1e-5)
    other = BertEncoder(max_length=16)
    other.prepare(CPU)
    assert bert.fingerprint() != other.fingerprint()
    again = BertEncoder()
    again.prepare(CPU)
    assert again.fingerprint() == bert.fingerprint()
    assert len(bert.fingerprint()) <= 128
    assert json.dumps(bert.options)  # options are JSON-storable


def test_encoding_under_bf16_autocast_on_the_cpu(bert, ml100k_titles):
    """The CUDA path encodes under bf16 autocast; the same dtype handling runs here on
    the CPU: the linear layers compute in bf16 (LayerNorm stays float32 under autocast),
    the pooled vectors come back float32, normalised, close to the fp32 ones."""
    titles = ml100k_titles[:48]
    ref = bert.encode_texts(titles, CPU)
    seen: list[torch.dtype] = []
    linear = [m for m in bert._model.modules() if isinstance(m, torch.nn.Linear)][-1]
    hook = linear.register_forward_hook(lambda module, args, output: seen.append(output.dtype))
    try:
        with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
            out = bert.encode_texts(titles, CPU)
    finally:
        hook.remove()
    assert seen and set(seen) == {torch.bfloat16}
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert torch.allclose(out.norm(dim=1), torch.ones(len(titles)), atol=1e-3)
    cosine = (out * ref).sum(dim=1)
    assert cosine.min().item() > 0.98
