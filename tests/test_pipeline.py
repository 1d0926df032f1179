"""The encoding pipeline: caching by fingerprint and content hash, options, laziness."""
from __future__ import annotations

import pytest
import torch
from sqlalchemy import select

from polyrec import Engine, EncoderContext
from polyrec.errors import ConfigError, NotFoundError
from polyrec.store.models import ItemVector
from polyrec.store.vectors import cached_keys, load_vectors

N = 30


@pytest.fixture(scope="module")
def movies(ml100k_dir) -> list[dict]:
    """The first N MovieLens-100k items as add_items records."""
    from conftest import ml100k_movies
    return ml100k_movies(ml100k_dir, N)


@pytest.fixture
def db(tmp_path, movies):
    path = tmp_path / "p.db"
    with Engine(path, device="cpu", entrypoints=False, progress=False) as eng:
        eng.add_items(movies)
    return path


def open_engine(path) -> Engine:
    return Engine(path, device="cpu", entrypoints=False, progress=False)


def blobs(eng: Engine) -> dict[int, bytes]:
    with eng.store.session() as s:
        rows = s.execute(select(ItemVector.item_id, ItemVector.vector)
                         .where(ItemVector.encoder == "bert"))
        return {item: blob for item, blob in rows}


def test_second_run_encodes_nothing_and_changes_reencode_only_that_item(db, movies):
    with open_engine(db) as eng:
        first = eng.encode(["bert"])["bert"]
        assert (first.encoded, first.cached, first.no_content, first.failed) == (N, 0, 0, {})
        assert first.loaded and first.items_per_second > 0
        before = blobs(eng)
    with open_engine(db) as eng:  # a new engine: the cache lives in the store
        second = eng.encode(["bert"])["bert"]
        assert (second.encoded, second.cached) == (0, N)
        assert not second.loaded  # nothing to do: the model was never loaded
        eng.add_items([{"external_id": movies[4]["external_id"], "title": "A Different Title"}])
        third = eng.encode(["bert"])["bert"]
        assert (third.encoded, third.cached) == (1, N - 1)
        after = blobs(eng)
        changed = [i for i in before if before[i] != after[i]]
        assert len(changed) == 1
        assert eng.items(changed)[0].external_id == movies[4]["external_id"]
        forced = eng.encode(["bert"], force=True)["bert"]
        assert (forced.encoded, forced.cached) == (N, 0)


def test_item_that_loses_its_content_loses_its_vector(db, movies):
    with open_engine(db) as eng:
        eng.encode(["bert"])
        eng.add_items([{"external_id": movies[0]["external_id"], "title": "", "attributes": {}}])
        rep = eng.encode(["bert"])["bert"]
        assert (rep.encoded, rep.removed, rep.no_content, rep.cached) == (0, 1, 1, N - 1)
        with eng.store.session() as s:
            ids, matrix = load_vectors(s, "bert")
        assert len(ids) == N - 1 and matrix.shape == (N - 1, 384)
        assert eng.items(ids)[0].external_id != movies[0]["external_id"]


def test_options_are_remembered_and_rebuild_the_encoder(db):
    with open_engine(db) as eng:
        rep = eng.encode(["bert"], options={"bert": {"template": "{title}", "max_length": "32"}})
        assert rep["bert"].encoded == N
        enc = eng.encoder("bert")
        assert enc.template == "{title}" and enc.max_length == 32
        assert eng.encoder("bert") is enc  # loaded once per engine
    with open_engine(db) as eng:
        enc = eng.encoder("bert")  # same configuration in a new engine
        assert enc.template == "{title}"
        with eng.store.session() as s:
            stored = {fp for fp, _ in cached_keys(s, "bert").values()}
        assert stored == {enc.fingerprint()}
        query = enc.encode_query("Toy Story", EncoderContext(engine=eng, device=eng.device))
        assert query.shape == (384,) and abs(float(query.norm()) - 1) < 1e-4
        assert eng.encode(["bert"])["bert"].encoded == 0  # no options given: the stored ones
        assert eng.encode(["bert"], options={"bert": {"template": "{title}",
                                                      "max_length": "16"}})["bert"].encoded == N


def test_float32_storage_and_batch_size(db):
    with open_engine(db) as eng:
        eng.encode(["bert"], dtype="float32", batch_size=7)
        with eng.store.session() as s:
            dtypes = set(s.execute(select(ItemVector.dtype)).scalars())
            _, matrix = load_vectors(s, "bert")
        assert dtypes == {"float32"}
        assert torch.allclose(matrix.norm(dim=1), torch.ones(N), atol=1e-5)


def test_default_set_skips_image_encoder_without_images(db):
    """CLIP's default weights cannot be loaded offline, so the default set has image_cnn
    instead of clip (engine/encode/selection.py); with no images it is never loaded."""
    with open_engine(db) as eng:
        report = eng.encode()
        names = [r.encoder for r in report.encoders]
        assert names[:2] == ["bert", "image_cnn"] and "clip" not in names
        image = report["image_cnn"]
        assert (image.no_content, image.encoded, image.loaded, image.error) == (N, 0, False, None)
        assert report["bert"].encoded == N and not report.errors


def test_one_encoder_failing_to_load_does_not_stop_the_others(db, hm_dir):
    with open_engine(db) as eng:
        image = sorted((hm_dir / "images").glob("*.jpg"))[0]
        eng.image_root = str(hm_dir)  # local images lie under the image root
        eng.add_items([{"external_id": "photo", "title": "A photo", "image": str(image)}])
        report = eng.encode(["clip", "bert"])  # clip: default pretrained tag, offline
        assert "no pretrained weights could be loaded" in report.errors["clip"]
        assert "pretrained=none" in report.errors["clip"]
        assert report["bert"].encoded == N + 1
        assert report.as_dict()["errors"] == report.errors


def test_bad_requests_fail_before_any_work(db):
    with open_engine(db) as eng:
        with pytest.raises(NotFoundError, match="no encoder named 'nope'"):
            eng.encode(["nope"])
        with pytest.raises(ConfigError, match="not being run"):
            eng.encode(["bert"], options={"clip": {"pretrained": "none"}})
        with pytest.raises(ConfigError, match="unknown bert option"):
            eng.encode(["bert"], options={"bert": {"colour": "red"}})
        with pytest.raises(ConfigError, match="dtype"):
            eng.encode(["bert"], dtype="int8")
        assert eng.stats()["vectors_by_encoder"] == {}
