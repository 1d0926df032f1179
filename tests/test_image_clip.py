"""The CLIP image encoder with a tiny open_clip config (random weights) on real images."""
from __future__ import annotations

import base64
import json
import shutil

import pytest
import torch
from click.testing import CliRunner

from polyrec import Engine
from polyrec.cli.main import cli
from polyrec.contracts import EncoderContext, ItemView
from polyrec.errors import EncodingError
from polyrec.store.vectors import load_vectors
from polyrec.plugins.image_clip import ClipEncoder, NoPretrainedWeightsWarning

from conftest import copy_db

CPU = EncoderContext(engine=None, device=torch.device("cpu"), progress=False)  # type: ignore[arg-type]

#: A CLIP small enough for CI: 32-pixel images, one transformer layer per tower (~7 MB).
TINY = {"model_cfg": {"embed_dim": 32,
                      "vision_cfg": {"image_size": 32, "layers": 1, "width": 64,
                                     "head_width": 32, "patch_size": 8},
                      "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32,
                                   "heads": 2, "layers": 1}},
        "preprocess_cfg": {"mean": [0.481, 0.458, 0.408], "std": [0.269, 0.261, 0.276]}}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tiny")
    (folder / "open_clip_config.json").write_text(json.dumps(TINY))
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> ClipEncoder:
    enc = ClipEncoder(model=str(tiny_dir), pretrained="none", num_workers=0)
    with pytest.warns(NoPretrainedWeightsWarning, match="random weights"):
        enc.prepare(CPU)
    return enc


@pytest.fixture(scope="module")
def images(hm_dir):
    return sorted((hm_dir / "images").glob("*.jpg"))


def tiny_options(tiny_dir, **kw) -> dict:
    return {"clip": {"model": str(tiny_dir), "pretrained": "none", **kw}}


def test_hm_images_end_to_end_with_a_missing_and_a_corrupt_file(hm_db, tmp_path, tiny_dir):
    db = copy_db(hm_db, tmp_path)
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with_image = [v for v in eng.items() if v.image]
        assert len(with_image) == 100
        with pytest.warns(NoPretrainedWeightsWarning):
            rep = eng.encode(["clip"], options=tiny_options(tiny_dir, num_workers=2))["clip"]
        assert (rep.encoded, rep.no_content, rep.failed, rep.error) == (100, 900, {}, None)
        with eng.store.session() as s:
            ids, vectors = load_vectors(s, "clip")
        assert sorted(ids) == sorted(v.id for v in with_image)
        assert vectors.shape == (100, 32)
        assert torch.allclose(vectors.norm(dim=1), torch.ones(100), atol=2e-3)
        assert torch.pdist(vectors).min() > 0  # distinct images, distinct vectors

        corrupt = tmp_path / "corrupt.jpg"
        corrupt.write_bytes(b"\xff\xd8\xff\xe0 this is not really a jpeg")
        eng.image_root = str(tmp_path)  # local images lie under the image root
        eng.add_items([{"external_id": "gone", "title": "Missing", "image": str(tmp_path / "gone.jpg")},
                       {"external_id": "bad", "title": "Corrupt", "image": str(corrupt)}])
        rep = eng.encode(["clip"])["clip"]  # the stored tiny options are reused
        assert (rep.encoded, rep.cached) == (0, 100)
        assert set(rep.failed) == {"gone", "bad"}
        assert "not found" in rep.failed["gone"] and "cannot decode" in rep.failed["bad"]
        with eng.store.session() as s:
            ids, vectors = load_vectors(s, "clip")
        assert len(ids) == 100  # no vector, zero or otherwise, for the failed two


def test_changed_or_removed_file_is_reencoded_or_dropped(tmp_path, tiny_dir, images):
    root = tmp_path / "imgs"
    root.mkdir()
    for k, name in enumerate("abc"):
        shutil.copyfile(images[k], root / f"{name}.jpg")
    with Engine(tmp_path / "c.db", device="cpu", entrypoints=False, progress=False,
                image_root=root) as eng:
        eng.add_items([{"external_id": n, "image": f"{n}.jpg"} for n in "abc"])
        opts = tiny_options(tiny_dir, image_root=str(root), num_workers=0)
        with pytest.warns(NoPretrainedWeightsWarning):
            assert eng.encode(["clip"], options=opts)["clip"].encoded == 3
        shutil.copyfile(images[5], root / "b.jpg")  # new bytes, new size/mtime
        (root / "c.jpg").unlink()
        rep = eng.encode(["clip"])["clip"]
        assert (rep.encoded, rep.cached, rep.removed) == (1, 1, 1)
        assert list(rep.failed) == ["c"]
        with eng.store.session() as s:
            ids, _ = load_vectors(s, "clip")
        assert [v.external_id for v in eng.items(ids)] == ["a", "b"]


def test_paths_bytes_and_data_uris_give_the_same_vector(tiny, images):
    raw = images[0].read_bytes()
    uri = "data:image/jpeg;base64," + base64.b64encode(raw).decode()
    vectors, ok, errors = tiny.encode_images([str(images[0]), raw, uri, b"junk"], CPU)
    assert ok == [0, 1, 2] and list(errors) == [3]
    assert torch.allclose(vectors[0], vectors[1]) and torch.allclose(vectors[0], vectors[2])
    item = ItemView(id=1, external_id="u", image=uri)
    assert tiny.content(item).startswith("data:sha256=")
    assert tiny.content(ItemView(id=2, external_id="n")) is None


def test_text_tower_embeds_queries(tiny):
    a = tiny.encode_query("a black dress", CPU)
    b = tiny.encode_query("red running shoes", CPU)
    assert a.shape == (32,) == b.shape and tiny.dim == 32
    assert abs(float(a.norm()) - 1) < 1e-4 and not torch.allclose(a, b)


def test_local_checkpoint_files_are_loaded(tiny, tiny_dir, tmp_path, images):
    checkpoint = tmp_path / "tiny.pt"
    torch.save(tiny._model.state_dict(), checkpoint)
    loaded = ClipEncoder(model=f"local-dir:{tiny_dir}", pretrained=str(checkpoint), num_workers=0)
    loaded.prepare(CPU)
    assert not loaded.random_weights
    assert loaded.fingerprint() != tiny.fingerprint()
    same, _, _ = loaded.encode_images([images[0]], CPU)
    want, _, _ = tiny.encode_images([images[0]], CPU)
    assert torch.allclose(same, want, atol=1e-5)
    with_weights = tmp_path / "model_dir"
    shutil.copytree(tiny_dir, with_weights)
    shutil.copyfile(checkpoint, with_weights / "open_clip_pytorch_model.bin")
    in_dir = ClipEncoder(model=str(with_weights), num_workers=0)  # weights found in the folder
    in_dir.prepare(CPU)
    assert not in_dir.random_weights


@pytest.mark.parametrize("pretrained, message", [
    ("laion2b_s34b_b79k", "not in the local cache"),  # a real tag; tests run offline
    ("no_such_tag", "is not a pretrained tag"),
    ("/nowhere/clip.bin", "checkpoint file not found"),
])
def test_unloadable_weights_say_so_and_how_to_fix(pretrained, message):
    with pytest.raises(EncodingError) as err:
        ClipEncoder(model="ViT-B-32", pretrained=pretrained).prepare(CPU)
    text = str(err.value)
    assert "no pretrained weights could be loaded" in text and message in text
    assert "local checkpoint file" in text and "pretrained=none" in text


def test_cli_reports_unloadable_weights_in_one_line(tmp_path, tiny_dir, images):
    db = tmp_path / "w.db"
    with Engine(db, device="cpu", entrypoints=False, progress=False,
                image_root=images[0].parent) as eng:
        eng.add_items([{"external_id": "p", "image": str(images[0])}])
    result = CliRunner().invoke(cli, ["--db", str(db), "-q", "encode", "-e", "clip",
                                      "--set", f"clip.model={tiny_dir}"])
    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1 and "no pretrained weights could be loaded" in errors[0]
