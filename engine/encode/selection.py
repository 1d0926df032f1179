"""Which encoders are in use where two encoders stand in for each other.

An encoder may declare ``stands_in_for = "other"`` (image_cnn for clip): where both are
registered, exactly one of the two is in use, and the default encoder set (``polyrec
encode`` without ``--encoder``), the fused item tower and similar items use that one:

1. the other (clip) when its ``has_pretrained_weights()`` is True, as configured for the
   run (the options given, else the options it was last encoded with, else defaults);
2. else the stand-in (image_cnn), unless it has no weights here either;
3. else the other one, whose error then says how to get weights.

The question is cheap (no model is loaded): see ``Encoder.has_pretrained_weights``.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping

from polyrec.contracts import Encoder
from polyrec.encode.pipeline import stored_options
from polyrec.errors import PolyrecError

if TYPE_CHECKING:  # pragma: no cover
    from polyrec.engine import Engine


@dataclass(frozen=True)
class Choice:
    """One pair of stand-ins: the encoder in use, the one passed over, and why."""

    modality: str
    encoder: str
    passed_over: str
    pretrained: bool | None  # whether the encoder in use has pretrained weights here
    reason: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def configured(engine: "Engine", name: str,
               options: Mapping[str, Mapping[str, Any]] | None = None) -> Encoder:
    """An unprepared ``name`` encoder with the options of this run, else its stored ones."""
    opts = options[name] if options and name in options else stored_options(engine, name) or {}
    return engine.registry("encoders").get(name)(**dict(opts))


def _weights(engine: "Engine", name: str,
             options: Mapping[str, Mapping[str, Any]] | None) -> bool | None:
    try:
        return configured(engine, name, options).has_pretrained_weights()
    except PolyrecError:  # options it cannot be built with: no usable weights
        return False


def choices(engine: "Engine", options: Mapping[str, Mapping[str, Any]] | None = None,
            among: Iterable[str] | None = None) -> list[Choice]:
    """The decision for every registered (stand-in, other) pair, in registry order;
    with ``among``, only for pairs that have an encoder in it."""
    registry = engine.registry("encoders")
    wanted = None if among is None else set(among)
    out: list[Choice] = []
    for name, cls in registry.items():
        other = getattr(cls, "stands_in_for", None)
        if not other or other not in registry or other == name:
            continue
        if wanted is not None and not wanted & {name, other}:
            continue
        modality = str(cls.modality)
        if _weights(engine, other, options):
            out.append(Choice(modality, other, name, True,
                              f"{other} has pretrained weights here"))
            continue
        own = _weights(engine, name, options)
        if own is False:
            out.append(Choice(modality, other, name, False,
                              f"neither {other} nor {name} has pretrained weights here"))
        else:
            out.append(Choice(modality, name, other, own,
                              f"{other} has no pretrained weights here"))
    return out


def passed_over(engine: "Engine", options: Mapping[str, Mapping[str, Any]] | None = None,
                among: Iterable[str] | None = None) -> set[str]:
    """Encoders not in use because their stand-in pair chose the other one."""
    return {c.passed_over for c in choices(engine, options, among)}


def in_use(engine: "Engine", names: Iterable[str],
           options: Mapping[str, Mapping[str, Any]] | None = None) -> list[str]:
    """``names`` without the encoders their stand-in pair passes over, order kept."""
    names = list(names)
    skip = passed_over(engine, options, among=names)
    return [n for n in names if n not in skip]


def report(engine: "Engine") -> list[dict[str, Any]]:
    """Per registered encoder in use: modality, name, whether it has pretrained weights
    here (None: not applicable) and, for a stand-in pair, which one it was chosen over."""
    picked = {c.encoder: c for c in choices(engine)}
    skip = {c.passed_over for c in picked.values()}
    out = []
    for name in engine.registry("encoders").names():
        if name in skip:
            continue
        choice = picked.get(name)
        pretrained = choice.pretrained if choice else _weights(engine, name, None)
        out.append({"modality": str(engine.registry("encoders").get(name).modality),
                    "encoder": name, "pretrained": pretrained,
                    "instead_of": choice.passed_over if choice else None,
                    "reason": choice.reason if choice else None})
    return out


def doctor_section(engine: "Engine", doctor_report: dict[str, Any]) -> None:
    """Add the encoders in use to a ``polyrec doctor`` report (key ``encoders``), with a
    warning when the catalogue has images and the image encoder in use has no
    pretrained weights (its vectors would be noise)."""
    rows = report(engine)
    doctor_report["encoders"] = rows
    checks = doctor_report.get("checks", {})
    with_images = (doctor_report.get("counts", {}).get("items", 0)
                   - checks.get("items_missing_image", {}).get("count", 0))
    for row in rows:
        if row["modality"] == "image" and row["pretrained"] is False and with_images > 0:
            doctor_report.setdefault("warnings", []).append(
                f"the image encoder in use ({row['encoder']}) has no pretrained weights here: "
                f"the images of {with_images:,} items would be encoded as noise")
