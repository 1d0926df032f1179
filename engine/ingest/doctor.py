"""``polyrec doctor``: a data quality report over the store.

Checks: items missing text, missing images, image references whose local file does
not exist or is not an image, duplicate titles, orphan interactions (user or item row gone), users and items
with fewer than N interactions, sparsity of the user x item matrix, items not linked to
the knowledge graph. Every check gives a count and a few example external ids.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, func, or_, select

from polyrec.store.models import Entity, Interaction, Item, User

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine


def _check(count: int, examples: list[Any]) -> dict[str, Any]:
    return {"count": int(count), "examples": examples}


def _is_local(ref: str) -> bool:
    return "://" not in ref and not ref.startswith("data:")


def is_image_file(path: str) -> bool:
    """Whether Pillow recognises the file as an image (it reads the header only)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img.verify()
        return True
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
    except Exception:  # noqa: BLE001 - a decoder bug on a hostile file is "not an image"
        return False


def doctor(engine: "Engine", *, min_interactions: int = 5, examples: int = 5) -> dict[str, Any]:
    """The report as a dict: ``counts``, ``checks`` (name -> count and examples),
    ``sparsity`` and ``warnings`` (one human-readable line per failed check)."""
    with engine.store.session() as s:
        n_items = s.execute(select(func.count()).select_from(Item)).scalar_one()
        n_users = s.execute(select(func.count()).select_from(User)).scalar_one()
        n_inter = s.execute(select(func.count()).select_from(Interaction)).scalar_one()

        def ids(query: Any) -> tuple[int, list[Any]]:
            total = s.execute(select(func.count()).select_from(query.subquery())).scalar_one()
            return total, list(s.execute(query.limit(examples)).scalars())

        no_text = ids(select(Item.external_id).where(or_(Item.text.is_(None), func.trim(Item.text) == ""))
                      .order_by(Item.id))
        no_image = ids(select(Item.external_id).where(or_(Item.image.is_(None), Item.image == ""))
                       .order_by(Item.id))
        broken: list[str] = []
        not_images: list[str] = []
        n_broken = n_not_images = 0
        for ext, ref in s.execute(select(Item.external_id, Item.image)
                                  .where(Item.image.is_not(None), Item.image != "").order_by(Item.id)):
            if not _is_local(ref):
                continue
            if not os.path.isfile(ref):
                n_broken += 1
                if len(broken) < examples:
                    broken.append(ext)
            elif not is_image_file(ref):
                n_not_images += 1
                if len(not_images) < examples:
                    not_images.append(ext)

        title = func.lower(func.trim(Item.title))
        dup_q = (select(func.min(Item.title), func.count().label("n")).where(Item.title.is_not(None))
                 .group_by(title).having(func.count() > 1).order_by(func.count().desc(), title))
        dups = s.execute(dup_q).all()
        dup_items = sum(n for _, n in dups)

        orphan_q = (select(Interaction.id)
                    .outerjoin(User, User.id == Interaction.user_id)
                    .outerjoin(Item, Item.id == Interaction.item_id)
                    .where(or_(User.id.is_(None), Item.id.is_(None))))
        orphans = ids(orphan_q)

        per_user = (select(User.external_id, func.count(Interaction.id).label("n"))
                    .outerjoin(Interaction, Interaction.user_id == User.id).group_by(User.id))
        per_item = (select(Item.external_id, func.count(Interaction.id).label("n"))
                    .outerjoin(Interaction, Interaction.item_id == Item.id).group_by(Item.id))
        few_users = _few(s, per_user, min_interactions, examples)
        few_items = _few(s, per_item, min_interactions, examples)
        cold_items = _few(s, per_item, 1, examples)
        cold_users = _few(s, per_user, 1, examples)

        pairs = s.execute(select(func.count()).select_from(
            select(Interaction.user_id, Interaction.item_id).distinct().subquery())).scalar_one()
        unlinked = ids(select(Item.external_id).outerjoin(Entity, Entity.item_id == Item.id)
                       .where(Entity.id.is_(None)).order_by(Item.id))
        n_linked = n_items - unlinked[0]
        by_kind = dict(s.execute(select(Interaction.kind, func.count())
                                 .group_by(Interaction.kind)).all())
        out_of_range = ids(select(Interaction.id).where(and_(
            Interaction.kind == "rating", or_(Interaction.value.is_(None), Interaction.value < 0))))

    cells = n_users * n_items
    density = pairs / cells if cells else 0.0
    checks = {
        "items_missing_text": _check(*no_text),
        "items_missing_image": _check(*no_image),
        "image_files_missing": _check(n_broken, broken),
        "image_files_not_images": _check(n_not_images, not_images),
        "duplicate_titles": {"count": len(dups), "items": int(dup_items),
                             "examples": [t for t, _ in dups[:examples]]},
        "orphan_interactions": _check(*orphans),
        "ratings_without_value": _check(*out_of_range),
        "items_without_interactions": _check(*cold_items),
        "users_without_interactions": _check(*cold_users),
        "items_below_min_interactions": _check(*few_items),
        "users_below_min_interactions": _check(*few_users),
        "items_unlinked_to_kg": _check(*unlinked),
    }
    report = {
        "counts": {"items": n_items, "users": n_users, "interactions": n_inter,
                   "interactions_by_kind": by_kind, "user_item_pairs": pairs,
                   "linked_items": n_linked},
        "min_interactions": min_interactions,
        "sparsity": 1.0 - density if cells else None,
        "density": density if cells else None,
        "checks": checks,
    }
    report["warnings"] = _warnings(report)
    return report


def _few(session: Any, per: Any, minimum: int, examples: int) -> tuple[int, list[Any]]:
    sub = per.subquery()
    q = select(sub.c.external_id).where(sub.c.n < minimum).order_by(sub.c.n, sub.c.external_id)
    total = session.execute(select(func.count()).select_from(q.subquery())).scalar_one()
    return total, list(session.execute(q.limit(examples)).scalars())


def _warnings(report: dict[str, Any]) -> list[str]:
    """One line per check that found something, in plain words."""
    c, counts, n = report["checks"], report["counts"], report["min_interactions"]
    lines = []
    texts = {  # check -> (what it means, the table its share is of)
        "items_missing_text": ("items have no text", "items"),
        "items_missing_image": ("items have no image", "items"),
        "image_files_missing": ("items reference an image file that does not exist", "items"),
        "image_files_not_images": ("items reference a file that is not an image Pillow can "
                                   "read", "items"),
        "orphan_interactions": ("interactions point to a missing user or item", "interactions"),
        "ratings_without_value": ("rating interactions have no or a negative value",
                                  "interactions"),
        "items_without_interactions": ("items have no interactions (cold items)", "items"),
        "users_without_interactions": ("users have no interactions", "users"),
        "items_below_min_interactions": (f"items have fewer than {n} interactions", "items"),
        "users_below_min_interactions": (f"users have fewer than {n} interactions", "users"),
        "items_unlinked_to_kg": ("items are not linked to a knowledge-graph entity", "items"),
    }
    for key, (text, table) in texts.items():
        count, total = c[key]["count"], counts[table]
        if count:
            share = f" ({count / total:.1%})" if total else ""
            lines.append(f"{count:,} {text}{share}")
    dup = c["duplicate_titles"]
    if dup["count"]:
        lines.append(f"{dup['count']:,} titles are shared by {dup['items']:,} items")
    if report["sparsity"] is not None and report["sparsity"] > 0.99:
        lines.append(f"the user x item matrix is {report['sparsity']:.2%} empty "
                     "(collaborative filtering will struggle)")
    return lines
