"""bert quantize=int8: the int8 ONNX Runtime path, its fidelity, its cache and its errors."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from polyrec import Engine
from polyrec.contracts import EncoderContext
from polyrec.errors import ConfigError
from polyrec.store import Store
from polyrec.store.vectors import load_vectors
from polyrec.plugins.text_bert import BertEncoder
from polyrec.plugins import text_bert, text_bert_quant
from polyrec.plugins.text_bert_quant import INSTALL_HINT, RECIPE, artefact_key, cache_dir

CPU = EncoderContext(engine=None, device=torch.device("cpu"), progress=False)  # type: ignore[arg-type]

pytest.importorskip("onnxruntime", reason="the quant extra: pip install 'polyrec[quant]'")


@pytest.fixture(scope="module")
def artefacts(tmp_path_factory) -> object:
    """A private cache dir for the int8 graph, built once for this module."""
    mp = pytest.MonkeyPatch()
    path = tmp_path_factory.mktemp("polyrec-cache")
    mp.setenv("POLYREC_CACHE_DIR", str(path))
    yield path
    mp.undo()


@pytest.fixture(scope="module")
def int8(artefacts) -> BertEncoder:
    enc = BertEncoder(quantize="int8")
    enc.prepare(CPU)
    return enc


@pytest.fixture(scope="module")
def fp32() -> BertEncoder:
    enc = BertEncoder()
    enc.prepare(CPU)
    return enc


@pytest.fixture(scope="module")
def titles(ml100k_dir) -> list[str]:
    lines = (ml100k_dir / "ml-100k.item").read_text(encoding="latin-1").splitlines()[1:]
    return [line.split("\t")[1] for line in lines][:300]


@pytest.fixture(scope="module")
def articles(hm_dir, fp32) -> list[str]:
    """Long texts: H&M articles as the auto template renders them (~75 tokens)."""
    import pyarrow.parquet as pq

    from polyrec.contracts import ItemView
    rows = pq.read_table(hm_dir / "articles_sample.parquet").to_pylist()[:200]
    return [fp32.content(ItemView(id=k, external_id=str(r["article_id"]), title=r["prod_name"],
                                  text=r["detail_desc"], attributes=r)) or ""
            for k, r in enumerate(rows)]


def test_quantize_option_is_checked():
    with pytest.raises(ConfigError, match="quantize must be one of"):
        BertEncoder(quantize="int4")
    assert BertEncoder(quantize="off").quantize == "none"
    assert BertEncoder().quantize == "none"


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("POLYREC_CACHE_DIR", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
    monkeypatch.delenv("POLYREC_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert cache_dir() == tmp_path / "x" / "polyrec"


@pytest.mark.slow
def test_int8_vectors_stay_close_to_fp32(int8, fp32, titles):
    ours, ref = int8.encode_texts(titles, CPU), fp32.encode_texts(titles, CPU)
    assert ours.dtype == torch.float32 and ours.shape == ref.shape
    assert torch.allclose(ours.norm(dim=1), torch.ones(len(titles)), atol=1e-4)
    cosine = (ours * ref).sum(dim=1)
    assert cosine.mean().item() >= 0.99 and cosine.min().item() >= 0.97
    # queries land where the fp32 ones do
    query = int8.encode_query("the movie Toy Story", CPU)
    assert titles[int((ours @ query).argmax())] == "Toy Story"


@pytest.mark.slow
def test_int8_vectors_of_long_texts_stay_close_to_fp32(int8, fp32, articles):
    ours, ref = int8.encode_texts(articles, CPU), fp32.encode_texts(articles, CPU)
    tokens = [len(t) for t in fp32._tokenizer(articles, truncation=True, max_length=256)["input_ids"]]
    assert sum(tokens) / len(tokens) > 50  # long texts, not titles
    cosine = (ours * ref).sum(dim=1)
    assert cosine.mean().item() >= 0.99 and cosine.min().item() >= 0.97


@pytest.mark.slow
def test_the_graph_quantises_qkv_but_not_the_first_layer(int8):
    """The recipe's graph: attention left unfused so the Q/K/V projections of layers 1-5
    are int8 MatMuls; every weight MatMul of layer 0 stays fp32."""
    import onnx
    nodes = onnx.load(str(int8._int8.path), load_external_data=False).graph.node
    ops = {n.op_type for n in nodes}
    assert "Attention" not in ops and "SkipLayerNormalization" not in ops
    integer = [n.name for n in nodes if n.op_type == "MatMulInteger"]
    for layer in range(1, 6):
        for proj in ("query", "key", "value"):
            assert any(f"/layer.{layer}/attention/self/{proj}/" in n for n in integer), (layer, proj)
    assert not any("/layer.0/" in n for n in integer)
    fp32_layer0 = {n.name for n in nodes if n.op_type == "MatMul" and "/layer.0/" in n.name}
    for proj in ("self/query", "self/key", "self/value", "output/dense", "intermediate/dense"):
        assert any(f"/{proj}/MatMul" in n for n in fp32_layer0), proj


def test_a_new_recipe_changes_fingerprint_and_artefact(monkeypatch):
    """Vectors or graphs of another recipe are never reused."""
    enc = BertEncoder(quantize="int8")
    enc._model, enc._revision, enc.max_length = object(), "w", 256
    before, key = enc.fingerprint(), artefact_key("w", "m")
    monkeypatch.setattr(text_bert, "RECIPE", RECIPE + "-other")
    monkeypatch.setattr(text_bert_quant, "RECIPE", RECIPE + "-other")
    assert enc.fingerprint() != before and artefact_key("w", "m") != key


@pytest.mark.slow
def test_fingerprint_changes_and_the_graph_is_built_once(int8, fp32, artefacts):
    assert int8.fingerprint() != fp32.fingerprint()
    built = list(artefacts.glob("onnx/*/model-int8.onnx"))
    assert len(built) == 1 and built[0].stat().st_size > 1_000_000
    assert not list(artefacts.glob("onnx/*/.build-*"))  # no half-built leftovers
    stamp = built[0].stat().st_mtime_ns
    again = BertEncoder(quantize="int8")
    again.prepare(CPU)  # reuses the cached graph: not rebuilt
    assert built[0].stat().st_mtime_ns == stamp
    assert again.fingerprint() == int8.fingerprint()


@pytest.mark.slow
def test_switching_quantize_reencodes_every_item(tmp_path, artefacts):
    titles = ["Toy Story", "Heat", "Up", "Alien", "Fargo"]
    with Engine(tmp_path / "q.db", device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items([{"external_id": str(k), "title": t} for k, t in enumerate(titles)])
        assert eng.encode(["bert"])["bert"].encoded == 5
        report = eng.encode(["bert"], options={"bert": {"quantize": "int8"}})["bert"]
        assert report.encoded == 5 and report.cached == 0
        assert eng.encode(["bert"])["bert"].cached == 5  # the option is remembered
        fingerprint = report.fingerprint
    store = Store(tmp_path / "q.db")
    with store.session() as s:
        ids, vectors = load_vectors(s, "bert")
    store.close()
    assert len(ids) == 5 and "bert/" in fingerprint


@pytest.mark.slow
def test_missing_onnxruntime_names_what_to_install():
    code = ("import sys; sys.modules['onnxruntime'] = None\n"
            "import torch\n"
            "from polyrec.contracts import EncoderContext\n"
            "from polyrec.plugins.text_bert import BertEncoder\n"
            "try:\n"
            "    BertEncoder(quantize='int8').prepare(EncoderContext(engine=None, "
            "device=torch.device('cpu'), progress=False))\n"
            "except Exception as exc:\n"
            "    print(type(exc).__name__, exc)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300).stdout.strip().splitlines()
    assert out and out[-1].startswith("EncodingError bert quantize=int8 needs onnxruntime")
    assert INSTALL_HINT in out[-1]
