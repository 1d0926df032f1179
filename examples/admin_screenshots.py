"""Screenshots of the admin pages for docs/admin.md (docs/img/admin-*.png).

    make demo                                   # builds demo.db (MovieLens-100k, trained)
    .venv/bin/python examples/admin_screenshots.py [--db demo.db] [--out docs/img]

Works on a copy of the database, to which it adds what the demo lacks for the pictures:
placeholder posters (PNG files made here: a coloured card with the title's initials, as
MovieLens has no images) for the 200 most popular movies under an image root, a second
model version (``popular``, which fails the gate) and an A/B experiment with impressions,
clicks and purchases. Then it serves the copy (polyrec.serve.app), opens each page in
headless Chromium (Debian's, `make chromium`) through Playwright, and writes small PNGs
(resized to 1000 px wide and reduced to a 256-colour palette; each under ~150 KB).
"""
from __future__ import annotations

import argparse
import io
import shutil
import sys
import tempfile
from pathlib import Path

from sqlalchemy import func, select

from polyrec import Engine
from polyrec.feedback import experiments
from polyrec.serve.app import create_app, start_background
from polyrec.store.models import Interaction, Item, User

ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
EXPERIMENT = "ranking"
VARIANTS = {"control": 1, "diverse": {"weight": 1, "options": {"diversity": 0.3}}}


def top(engine: Engine, model, n: int) -> list:
    with engine.store.session() as s:
        col = Interaction.item_id if model is Item else Interaction.user_id
        return list(s.execute(select(model.external_id, getattr(model, "title", model.external_id))
                              .join(Interaction, col == model.id).group_by(model.id)
                              .order_by(func.count().desc(), model.id).limit(n)).all())


def prepare(db: Path, images: Path) -> str:
    """Add posters, a second model version and an experiment; returns a user to preview."""
    from PIL import Image, ImageDraw
    with Engine(db, device="cpu", progress=False, encode_on_arrival=False,
                image_root=images) as eng:  # the posters lie under the image root
        popular = top(eng, Item, 200)
        images.mkdir(parents=True, exist_ok=True)
        rows = []
        for n, (item, title) in enumerate(popular):
            img = Image.new("RGB", (120, 160), ((n * 53) % 180 + 40, (n * 97) % 180 + 40,
                                                (n * 29) % 180 + 40))
            initials = "".join(w[0] for w in (title or item).split()[:3] if w[:1].isalnum())
            ImageDraw.Draw(img).text((12, 70), initials.upper() or "?", fill=(255, 255, 255))
            img.save(images / f"{item}.png")
            rows.append({"external_id": item, "image": str(images / f"{item}.png")})
        eng.add_items(rows)
        if len(eng.models()) < 2:
            eng.train("popular", seed=0)
        experiments.create(eng, EXPERIMENT, VARIANTS)
        with eng.store.session() as s:
            ts = float(s.execute(select(func.max(Interaction.ts))).scalar_one()) + 3600
        events = []
        spec = experiments._normalize_variants(VARIANTS)
        for n, (user, _) in enumerate(top(eng, User, 300)):
            variant = experiments.choose(EXPERIMENT, spec, user)
            shown = [i for i, _ in popular[n % 100:n % 100 + 5]]
            events += [{"user": user, "item": i, "kind": "impression", "ts": ts} for i in shown]
            clicks = 1 + (n % 3 if variant == "diverse" else n % 2)
            events += [{"user": user, "item": i, "kind": "click", "ts": ts + 1} for i in shown[:clicks]]
            if n % 4 == 0:
                events.append({"user": user, "item": shown[0], "kind": "purchase", "ts": ts + 2})
        eng.feedback_many(events)
        return top(eng, User, 1)[0][0]


def compress(png: bytes, width: int = 1000) -> bytes:
    from PIL import Image
    img = Image.open(io.BytesIO(png)).convert("RGB")
    if img.width > width:
        img = img.resize((width, round(img.height * width / img.width)), Image.LANCZOS)
    out = io.BytesIO()
    img.quantize(colors=256, method=Image.Quantize.MEDIANCUT).save(out, "PNG", optimize=True)
    return out.getvalue()


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--db", default="demo.db", type=Path)
    ap.add_argument("--out", default="docs/img", type=Path)
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    args = ap.parse_args(argv)
    if not args.db.exists():
        sys.exit(f"{args.db} not found: run `make demo` first")
    from playwright.sync_api import sync_playwright
    work = Path(tempfile.mkdtemp(prefix="polyrec-shots-"))
    try:
        db = work / "demo.db"
        shutil.copyfile(args.db, db)
        user = prepare(db, work / "posters")
        args.out.mkdir(parents=True, exist_ok=True)
        shots = {"overview": ("/", None), "models": ("/admin/models", None),
                 "experiments": ("/admin/experiments", None),
                 "preview": (f"/admin/preview?user={user}&k=5", None),
                 "search": (f"/admin/preview?q=animated+comedy+from+the+90s&k=6", None),
                 "docs": ("/docs", ".opblock-summary-path")}
        with Engine(db, device="cpu", progress=False) as eng, \
                start_background(create_app(eng, token="demo-token")) as server, \
                sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            for name, (path, wait) in shots.items():
                page.goto(server.url + path, wait_until="networkidle", timeout=300_000)
                if wait:
                    page.locator(wait).first.wait_for(timeout=30_000)
                page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
                page.wait_for_function("Array.from(document.images).every(i => i.complete)")
                page.evaluate("window.scrollTo(0, 0)")
                height = min(page.evaluate("document.body.scrollHeight"), 1700)
                png = compress(page.screenshot(clip={"x": 0, "y": 0, "width": 1280, "height": height},
                                               full_page=True))
                target = args.out / f"admin-{name}.png"
                target.write_bytes(png)
                print(f"{target}  {len(png) / 1024:.0f} KB")
            browser.close()
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
