"""The small trained database the admin page tests (test_admin.py) and the browser tests
(test_browser.py) serve: MovieLens-100k with BERT and KG vectors, its Freebase graph and
the default pipeline trained (ml100k_default_db, version 1), plus a second version (EASE),
poster images (PNG files made here, one per item of the 200 most popular, under an image
root), an item with a remote image URL and one with a ``data:`` image, and an A/B
experiment with impressions, clicks and purchases. Built once per session, read-only.
"""
from __future__ import annotations

import shutil
from pathlib import Path

#: the experiment the database holds and its variants
EXPERIMENT = "ranking"
VARIANTS = {"control": 1, "diverse": {"weight": 1, "options": {"diversity": 0.3}}}
#: an item given a remote image URL (the pages must not fetch it) and one a data: URI
REMOTE_ITEM, DATA_ITEM = "REMOTE-IMG", "DATA-IMG"
#: a 1x1 PNG
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"
         "+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")


def admin_db(tmp_path_factory, ml100k_default_db: tuple[Path, object]) -> tuple[Path, Path]:
    """(the database, its image root), built on the first call of the session."""
    folder = tmp_path_factory.getbasetemp() / "admin-db"
    db, images = folder / "admin.db", folder / "posters"
    if db.exists():
        return db, images
    folder.mkdir(exist_ok=True)
    building = folder / "building.db"
    shutil.copyfile(ml100k_default_db[0], building)
    _fill(building, images)
    building.rename(db)
    return db, images


def posters(folder: Path, titles: dict[str, str]) -> dict[str, Path]:
    """A small PNG per item (a coloured card with the title's initials): real image files
    for the pages to serve. external id -> path."""
    from PIL import Image, ImageDraw
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for n, (item, title) in enumerate(sorted(titles.items())):
        img = Image.new("RGB", (96, 128), ((n * 53) % 200 + 30, (n * 97) % 200 + 30, (n * 29) % 200 + 30))
        initials = "".join(w[0] for w in title.split()[:3] if w[:1].isalnum()).upper() or "?"
        ImageDraw.Draw(img).text((10, 54), initials, fill=(255, 255, 255))
        path = folder / f"{item}.png"
        img.save(path, optimize=True)
        out[item] = path
    return out


def _fill(db: Path, images: Path) -> None:
    from conftest import _checkpoint, torch_threads

    from polyrec import Engine
    from polyrec.feedback import experiments

    with torch_threads(1), Engine(db, device="cpu", entrypoints=False, progress=False,
                                  encode_on_arrival=False, image_root=images) as eng:
        popular = popular_items(eng, 200)
        made = posters(images, {i: t or i for i, t in popular})
        eng.add_items([{"external_id": i, "image": str(p)} for i, p in made.items()]
                      + [{"external_id": REMOTE_ITEM, "title": "Remote picture",
                          "image": "https://images.example.com/remote.jpg"},
                         {"external_id": DATA_ITEM, "title": "Inline picture", "image": PIXEL}])
        eng.train("popular", seed=0)  # version 2: fails the gate, version 1 stays live
        experiments.create(eng, EXPERIMENT, VARIANTS)
        # events are tagged with the user's variant as they are stored (no recommend calls)
        events, ts = [], last_ts(eng) + 3600.0  # an hour after the dataset's last event
        for n, user in enumerate(busiest_users(eng, 60)):
            variant = experiments.choose(EXPERIMENT, experiments._normalize_variants(VARIANTS), user)
            shown = [i for i, _ in popular[n % 50:n % 50 + 5]]
            events += [{"user": user, "item": i, "kind": "impression", "ts": ts} for i in shown]
            clicked = 1 + (n % 3 if variant == "diverse" else n % 2)
            events += [{"user": user, "item": i, "kind": "click", "ts": ts + 1} for i in shown[:clicked]]
            if n % 4 == 0:
                events.append({"user": user, "item": shown[0], "kind": "purchase", "ts": ts + 2})
        eng.feedback_many(events)
    _checkpoint(db)


def last_ts(engine) -> float:
    from sqlalchemy import func, select

    from polyrec.store.models import Interaction
    with engine.store.session() as s:
        return float(s.execute(select(func.max(Interaction.ts))).scalar_one())


def popular_items(engine, n: int) -> list[tuple[str, str | None]]:
    """(external id, title) of the ``n`` items with the most interactions."""
    from sqlalchemy import func, select

    from polyrec.store.models import Interaction, Item
    with engine.store.session() as s:
        return [tuple(r) for r in s.execute(
            select(Item.external_id, Item.title).join(Interaction, Interaction.item_id == Item.id)
            .group_by(Item.id).order_by(func.count().desc(), Item.id).limit(n)).all()]


def busiest_users(engine, n: int) -> list[str]:
    """The ``n`` users with the most interactions (ties by id)."""
    from sqlalchemy import func, select

    from polyrec.store.models import Interaction, User
    with engine.store.session() as s:
        return list(s.execute(select(User.external_id).join(Interaction, Interaction.user_id == User.id)
                              .group_by(User.id).order_by(func.count().desc(), User.id)
                              .limit(n)).scalars())
