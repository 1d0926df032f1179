"""The admin pages over HTTP (a real uvicorn server on a small trained database,
tests/admin_db.py): what each page shows against the Engine's own answers, the write
token on activate / roll back, item images, and the offline API docs."""
from __future__ import annotations

import html
import re

import httpx
import pytest
from admin_db import DATA_ITEM, EXPERIMENT, REMOTE_ITEM, admin_db, busiest_users
from conftest import copy_db

from polyrec import Engine
from polyrec.feedback import experiments
from polyrec.serve.app import create_app, recommend_or_popular, start_background

TOKEN = "admin-test-token"


@pytest.fixture(scope="module")
def served(tmp_path_factory, ml100k_default_db):
    built, images = admin_db(tmp_path_factory, ml100k_default_db)
    db = copy_db(built, tmp_path_factory.mktemp("admin-http"))  # activate/rollback write
    with Engine(db, device="cpu", entrypoints=False, progress=False) as eng:
        with start_background(create_app(eng, token=TOKEN)) as server:
            with httpx.Client(base_url=server.url, timeout=120) as client:
                yield eng, client, images


def text(page: str) -> str:
    """A page's visible text, tags dropped and entities decoded, spaces collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page)).split())


def test_overview_counts_chart_encoders_and_doctor(served):
    eng, client, _ = served
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    stats, page = eng.stats(), text(r.text)
    assert f"{stats['items']:,} items" in page and f"{stats['users']:,} users" in page
    assert f"{stats['interactions']:,} interactions" in page
    # one bar per day with events, drawn in SVG, titled with the day's count
    chart = r.text[r.text.index('id="per-day"'):]
    chart = chart[:chart.index("</figure>")]
    bars = re.findall(r"<title>(\d{4}-\d\d-\d\d): ([\d,]+) interactions</title>", chart)
    assert len(bars) > 100 and len({d for d, _ in bars}) == len(bars)
    # encoders with their coverage: every item has a bert vector, linked items a kg one
    bert = stats["vectors_by_encoder"]["bert"]
    assert re.search(rf"bert\s+text\s+{bert:,}\s+{bert / stats['items']:.1%}", page)
    assert "kg" in stats["vectors_by_encoder"]
    # the doctor's checks with examples: the remote and data images are not files
    assert "items missing text" in page and "items unlinked to kg" in page
    report = eng.doctor()
    unlinked = report["checks"]["items_unlinked_to_kg"]
    assert f"items unlinked to kg {unlinked['count']:,} " + " ".join(unlinked["examples"]) in page
    for warning in report["warnings"]:
        assert html.escape(warning) in r.text


def test_models_page_lists_versions_metrics_and_live(served):
    eng, client, _ = served
    r = client.get("/admin/models")
    assert r.status_code == 200
    models = eng.models()
    assert [(m["version"], m["ranker"], m["verdict"], m["live"]) for m in models] == \
        [(1, "hybrid", "passed", True), (2, "popular", "failed", False)]
    page = text(r.text)
    assert "Live version: v1" in page and "2 stored versions" in page
    data = models[0]["data"]
    assert f"{data['users']:,} users · {data['items']:,} items · {data['interactions']:,} interactions" in page
    for m in models:
        assert f"{m['metrics']['recall@20']:.4f}" in page
    # the metrics chart: a line per metric through both versions
    assert r.text.count('<polyline class="line') == 4
    assert "recall@20 at v2: " in r.text
    # not live: v2 has an activate form, v1 none; the rollback form is there
    assert 'name="version" value="2"' in r.text and 'name="version" value="1"' not in r.text
    assert 'action="/admin/models/rollback"' in r.text


def test_activate_and_rollback_need_the_write_token(served):
    eng, client, _ = served
    live = lambda: client.get("/models").json()["live"]  # noqa: E731
    assert live() == 1
    for form in ({"version": "2"}, {"version": "2", "token": "wrong"}):
        r = client.post("/admin/models/activate", data=form)
        assert r.status_code == 401 and "write token is missing or wrong" in r.text
        assert live() == 1
    r = client.post("/admin/models/activate", data={"version": "2", "token": TOKEN})
    assert r.status_code == 303 and r.headers["location"].startswith("/admin/models?message=")
    assert live() == 2 and "version 2 is live" in text(client.get(r.headers["location"]).text)
    r = client.post("/admin/models/rollback", data={"token": "wrong"})
    assert r.status_code == 401 and live() == 2
    r = client.post("/admin/models/rollback", data={"token": TOKEN}, follow_redirects=True)
    assert r.status_code == 200 and "rolled back from version 2 to 1" in text(r.text)
    assert live() == 1
    r = client.post("/admin/models/activate", data={"version": "9", "token": TOKEN})
    assert r.status_code == 400 and "no version 9" in text(r.text) and live() == 1


def test_experiments_page_shows_the_report_with_intervals_and_verdict(served):
    eng, client, _ = served
    r = client.get("/admin/experiments")
    assert r.status_code == 200
    rep = experiments.report(eng, EXPERIMENT)
    page = text(r.text)
    for v in rep["variants"]:
        lo, hi = v["ctr_ci"]
        assert (f"{v['variant']} " in page and f"{v['impressions']:,} {v['clicks']:,} "
                f"{v['ctr']:.2%} {lo:.2%} – {hi:.2%}" in page)
        # the interval chart: whiskers at the bounds, titled with value and interval
        assert html.escape(f"{v['variant']}: {v['ctr']:.1%} [{lo:.1%}, {hi:.1%}]") in r.text
    diverse = rep["variants"][1]
    assert diverse["ctr_p_value"] < 0.05
    assert (f"diverse has a higher CTR than control ({diverse['ctr']:.2%} vs "
            f"{rep['variants'][0]['ctr']:.2%}, p = {diverse['ctr_p_value']:.3f}): significant"
            in page)


def test_preview_shows_history_recommendations_and_explanations(served):
    eng, client, images = served
    user = busiest_users(eng, 1)[0]
    r = client.get("/admin/preview", params={"user": user, "k": 8})
    assert r.status_code == 200
    expected = recommend_or_popular(eng, user, 8, explain=True)
    assert expected["basis"] == "model"
    recs = r.text[r.text.index('id="recommendations"'):r.text.index('id="history"')]
    shown = re.findall(r'<span class="muted">([^<]+)</span> · score', recs)
    assert shown == [x["item"] for x in expected["results"]]
    # explanations: modality weights (SVG meter), closest history items, a KG path
    assert recs.count('aria-label="modality weights"') == 8
    assert "closest in the history:" in recs
    paths = [x["explanation"]["kg_path"] for x in expected["results"] if "kg_path" in x["explanation"]]
    assert paths, "the ml-100k graph links some recommendations to the history"
    assert html.escape(" → ".join(paths[0]["via"])) in recs
    # history: the newest 20 of the user's interactions, paginated
    with eng.store.session() as s:
        from sqlalchemy import func, select

        from polyrec.store.models import Interaction, User
        total = s.execute(select(func.count()).select_from(Interaction).join(User)
                          .where(User.external_id == user)).scalar_one()
    hist = r.text[r.text.index('id="history"'):]
    assert f"({total:,} interactions)" in text(hist) and hist.count('class="card"') == 20
    page2 = client.get("/admin/preview", params={"user": user, "p": 2}).text
    first = set(re.findall(r'alt="image of ([^"]+)"', hist))
    assert first and first != set(re.findall(r'alt="image of ([^"]+)"', page2[page2.index('id="history"'):]))
    # images: the posters of the image root, served by the admin
    src = re.search(r'<img class="thumb" src="(/admin/image\?item=[^"]+)" alt="image of ([^"]+)"', hist)
    assert src, "the busiest user's history has popular items, which have posters"
    img = client.get(html.unescape(src.group(1)))
    assert img.status_code == 200 and img.headers["content-type"] == "image/png"
    assert img.content == (images / f"{src.group(2)}.png").read_bytes()


def test_preview_unknown_user_gets_popular_items_and_search_shows_understanding(served):
    _, client, _ = served
    page = text(client.get("/admin/preview", params={"user": "nobody-here"}).text)
    assert "basis: popular · unknown user 'nobody-here': popular items" in page
    assert "(0 interactions)" in page
    r = client.get("/admin/preview", params={"q": "comedy from the 90s", "k": 5})
    page = text(r.text)
    assert r.status_code == 200 and "Understood as:" in page
    assert re.search(r"Understood as: genre: Comedy", page), page[:600]
    assert len(re.findall(r'alt="image of|class="thumb none"', r.text[r.text.index('id="search"'):])) == 5


def test_item_images_local_data_remote_and_root(served, tmp_path):
    eng, client, images = served
    r = client.get("/admin/image", params={"item": DATA_ITEM})
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert r.content.startswith(b"\x89PNG")
    assert client.get("/admin/image", params={"item": REMOTE_ITEM}).status_code == 404  # never fetched
    assert client.get("/admin/image", params={"item": "no-such-item"}).status_code == 404
    assert client.get("/admin/image", params={"item": "1682"}).status_code == 404  # no image
    # an image root: files outside it are not served, files inside are
    poster = next(images.iterdir()).stem
    from fastapi.testclient import TestClient
    outside = TestClient(create_app(eng, image_root=str(tmp_path)))
    assert outside.get("/admin/image", params={"item": poster}).status_code == 404
    inside = TestClient(create_app(eng, image_root=str(images)))
    assert inside.get("/admin/image", params={"item": poster}).status_code == 200


def test_docs_are_offline_and_admin_pages_stay_out_of_the_schema(served):
    _, client, _ = served
    paths = client.get("/openapi.json").json()["paths"]
    assert "/" not in paths and not [p for p in paths if p.startswith(("/admin", "/docs"))]
    for page, assets in (("/docs", ["swagger-ui-bundle.js", "swagger-ui.css", "favicon.png"]),
                         ("/redoc", ["redoc.standalone.js", "favicon.png"])):
        r = client.get(page)
        assert r.status_code == 200 and "http://" not in r.text and "https://" not in r.text
        for asset in assets:
            assert f"/docs-static/{asset}" in r.text
            assert client.get(f"/docs-static/{asset}").status_code == 200
    redoc = client.get("/docs-static/redoc.standalone.js").text
    assert "cdn.redoc.ly" not in redoc and len(redoc) > 500_000
