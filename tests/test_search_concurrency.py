"""One Engine shared by reader threads while the catalogue and its vectors are rebuilt:
every request succeeds and sees either the old or the new snapshot."""
from __future__ import annotations

import threading

from conftest import copy_db

from polyrec import Engine
from polyrec.retrieve.search import searcher

QUERIES = ["black dress", "warm winter jacket", "zebra scarf", "baby bodysuit"]
NEW = [{"external_id": f"zebra-{n}", "title": f"Zebra print scarf {n}",
        "text": "A light scarf with a zebra print.",
        "attributes": {"product_type_name": "Scarf", "colour_group_name": "White"}}
       for n in range(30)]


def test_reads_stay_consistent_while_snapshots_are_swapped(tmp_path, hm_bert_db):
    db = copy_db(hm_bert_db, tmp_path)
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        before = {q: eng.search(q, 5).ids() for q in QUERIES}  # warms the query cache
        old_ids = {v.external_id for v in eng.items()}
        new_ids = {r["external_id"] for r in NEW}
        srch = searcher(eng)
        old_catalog = srch._catalog
        stop = threading.Event()
        errors: list[BaseException] = []
        answers: list[tuple[str, list[str]]] = []

        def reader(offset: int) -> None:
            for n in range(2000):  # bounded
                if stop.is_set():
                    return
                q = QUERIES[(n + offset) % len(QUERIES)]
                try:
                    answers.append((q, eng.search(q, 5).ids()))
                    if n % 5 == 0:
                        answers.append(("similar", eng.similar("731960001", 3).ids()))
                except BaseException as exc:  # noqa: BLE001 - collected and asserted below
                    errors.append(exc)
                    return

        threads = [threading.Thread(target=reader, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        try:
            eng.add_items(NEW)                       # swaps the catalogue and the BM25 index
            eng.encode(["bert"], options={"bert": {"max_length": 64}})  # swaps the vectors
            found = eng.search("zebra scarf", 5).ids()
        finally:
            stop.set()
            for t in threads:
                t.join(60)
        assert not errors, errors[0]
        assert len(answers) > 20
        assert all(set(ids) <= old_ids | new_ids for _, ids in answers)
        assert set(found) <= new_ids and len(found) == 5
        assert srch._catalog is not old_catalog and srch._catalog.signature.count == 1030
        with eng.store.session() as s:
            assert srch.space(s, "bert").matrix.shape[0] == 1030
        for q in ("black dress", "baby bodysuit"):  # untouched queries answer as before
            assert eng.search(q, 5).ids() == before[q]
