"""The "numeric" encoder: numeric item attributes as smooth feature vectors.

Each chosen attribute (ml-100k's ``release_year``, a price, a size) is standardised
with the catalogue's mean and standard deviation, clipped to [-5, 5], and expanded into
Fourier features (sin/cos at log-spaced frequencies) or Gaussian RBF features, so that
nearby values get nearby vectors. Per attribute the vector holds the standardised value,
a missing flag and the features; the whole vector is L2-normalised by default.

Options (keyword arguments, e.g. ``eng.encode(["numeric"], options={"numeric": {...}})``):
    attributes   names of numeric attributes (list or comma string). Default: every
                 attribute that is a number for at least 90% of the items that have it
                 and takes at least two distinct values.
    features     "fourier" (default) or "rbf".
    n_features   frequencies (fourier) or centres (rbf) per attribute, default 8.
    normalize    L2-normalise each vector (default True).
    stats        {attribute: [mean, std]} to fix the standardisation instead of
                 computing it from the catalogue in ``prepare``.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Any, Iterable, Mapping, Sequence

import torch

from polyrec import ConfigError, EncodeResult, Encoder, EncoderContext, EncodingError, ItemView

FEATURES = ("fourier", "rbf")
#: Share of an attribute's present values that must be numbers for auto-detection.
AUTO_NUMERIC_SHARE = 0.9
CLIP = 5.0


def to_number(value: Any) -> float | None:
    """The value as a finite float, or None (missing, empty, non-numeric, NaN, bool)."""
    if value is None or isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
    else:
        return None
    return number if math.isfinite(number) else None


def _round(x: float) -> float:
    """Six significant digits: stable in the fingerprint and exactly what is used."""
    return float(f"{x:.6g}")


def summarize(values: Iterable[float]) -> dict[str, float | int]:
    """count, min, max, mean and (population) std of numbers; count 0 gives only count."""
    numbers = [float(v) for v in values]
    if not numbers:
        return {"count": 0}
    mean = math.fsum(numbers) / len(numbers)
    var = math.fsum((v - mean) ** 2 for v in numbers) / len(numbers)
    return {"count": len(numbers), "min": min(numbers), "max": max(numbers),
            "mean": mean, "std": math.sqrt(var)}


def numeric_attributes(items: Sequence[ItemView]) -> list[str]:
    """Attributes that are numbers for >= 90% of the items that have them, with >= 2
    distinct values, sorted by name."""
    present: dict[str, int] = {}
    numeric: dict[str, int] = {}
    distinct: dict[str, set[float]] = {}
    for item in items:
        for key, value in (item.attributes or {}).items():
            if value is None or value == "":
                continue
            present[key] = present.get(key, 0) + 1
            number = to_number(value)
            if number is not None:
                numeric[key] = numeric.get(key, 0) + 1
                if len(distinct.setdefault(key, set())) < 2:
                    distinct[key].add(number)
    return sorted(key for key, n in present.items()
                  if len(distinct.get(key, ())) >= 2 and numeric[key] >= AUTO_NUMERIC_SHARE * n)


def _parse_attributes(value: Any) -> list[str] | None:
    if value is None:
        return None
    names = value.split(",") if isinstance(value, str) else list(value)
    names = [str(n).strip() for n in names if str(n).strip()]
    if not names:
        raise ConfigError("numeric encoder: 'attributes' is empty")
    if len(set(names)) != len(names):
        raise ConfigError(f"numeric encoder: 'attributes' repeats a name: {names}")
    return names


class NumericEncoder(Encoder):
    """Standardised numeric item attributes with Fourier or RBF features."""

    name = "numeric"
    modality = "numeric"

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        known = {"attributes", "features", "n_features", "normalize", "stats", "batch_size"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ConfigError(f"numeric encoder: unknown option(s) {', '.join(unknown)} "
                              f"(known: {', '.join(sorted(known))})")
        self.attributes = _parse_attributes(options.get("attributes"))
        self.features = str(options.get("features", "fourier"))
        if self.features not in FEATURES:
            raise ConfigError(f"numeric encoder: features must be one of {FEATURES}, "
                              f"not {self.features!r}")
        try:
            self.n_features = int(options.get("n_features", 8))
        except (TypeError, ValueError):
            raise ConfigError("numeric encoder: n_features must be an integer") from None
        if not 1 <= self.n_features <= 256:
            raise ConfigError("numeric encoder: n_features must be between 1 and 256")
        self.normalize = bool(options.get("normalize", True))
        self.stats: dict[str, tuple[float, float]] | None = None
        if options.get("stats") is not None:
            self.stats = self._parse_stats(options["stats"])
            if self.attributes is None:
                self.attributes = list(self.stats)

    @staticmethod
    def _parse_stats(raw: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
        stats = {}
        for key, pair in dict(raw).items():
            try:
                mean, std = (float(v) for v in pair)
            except (TypeError, ValueError):
                raise ConfigError(f"numeric encoder: stats['{key}'] must be [mean, std]") from None
            if not (math.isfinite(mean) and math.isfinite(std) and std > 0):
                raise ConfigError(f"numeric encoder: stats['{key}'] needs a finite mean and "
                                  f"a positive std")
            stats[key] = (_round(mean), _round(std))
        return stats

    # -- the contract --------------------------------------------------------------------
    @property
    def per_attribute(self) -> int:
        """Width of one attribute's block: value, missing flag, features."""
        return 2 + (2 * self.n_features if self.features == "fourier" else self.n_features)

    @property
    def dim(self) -> int:
        if self.attributes is None:
            raise EncodingError("numeric encoder: call prepare() first (attributes are "
                                "detected from the catalogue)")
        return len(self.attributes) * self.per_attribute

    def prepare(self, ctx: EncoderContext) -> None:
        """Detect the attributes (unless given) and their mean and std (unless given)."""
        if self.attributes is not None and self.stats is not None \
                and set(self.attributes) <= set(self.stats):
            return
        items = ctx.engine.items()
        if self.attributes is None:
            self.attributes = numeric_attributes(items)
            if not self.attributes:
                raise ConfigError("numeric encoder: no item attribute holds numbers; pass "
                                  "attributes=[...] naming numeric ones")
        stats = dict(self.stats or {})
        for key in self.attributes:
            if key in stats:
                continue
            summary = summarize(v for v in (to_number((it.attributes or {}).get(key))
                                            for it in items) if v is not None)
            if not summary["count"]:
                raise ConfigError(f"numeric encoder: no item has a numeric attribute '{key}'")
            std = float(summary["std"]) or 1.0
            stats[key] = (_round(float(summary["mean"])), _round(std))
        self.stats = stats

    def fingerprint(self) -> str:
        if self.stats is None or self.attributes is None:
            raise EncodingError("numeric encoder: call prepare() before fingerprint()")
        settings = {"v": 1, "attributes": self.attributes, "features": self.features,
                    "n_features": self.n_features, "normalize": self.normalize,
                    "stats": {k: list(self.stats[k]) for k in self.attributes}}
        digest = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()
        return f"numeric-{self.features}{self.n_features}-{digest[:16]}"

    def values(self, item: ItemView) -> dict[str, float]:
        """The item's numeric values of the chosen attributes (absent ones left out)."""
        attrs = item.attributes or {}
        found = {}
        for key in self.attributes or ():
            number = to_number(attrs.get(key))
            if number is not None:
                found[key] = number
        return found

    def content(self, item: ItemView) -> str | None:
        values = self.values(item)
        if not values:
            return None
        return ";".join(f"{k}={v!r}" for k, v in values.items())

    def encode(self, items: Sequence[ItemView], ctx: EncoderContext) -> EncodeResult:
        if self.stats is None or self.attributes is None:
            raise EncodingError("numeric encoder: call prepare() before encode()")
        n, n_attr = len(items), len(self.attributes)
        raw = torch.zeros(n, n_attr, dtype=torch.float64)  # ids and prices need the digits
        present = torch.zeros(n, n_attr, dtype=torch.bool)
        failed: dict[int, str] = {}
        for row, item in enumerate(items):
            values = self.values(item)
            if not values:
                failed[item.id] = "no numeric value for " + ", ".join(self.attributes)
            for col, key in enumerate(self.attributes):
                if key in values:
                    raw[row, col] = values[key]
                    present[row, col] = True
        keep = torch.tensor([item.id not in failed for item in items], dtype=torch.bool)
        ids = [item.id for item in items if item.id not in failed]
        vectors = self.featurize(raw[keep].to(ctx.device), present[keep].to(ctx.device))
        return EncodeResult(vectors=vectors.cpu(), item_ids=ids, failed=failed)

    # -- the features --------------------------------------------------------------------
    def featurize(self, raw: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        """[n, A] raw values and presence -> [n, dim] features (absent blocks are zero
        apart from their missing flag)."""
        assert self.stats is not None and self.attributes is not None
        device = raw.device
        mean = torch.tensor([self.stats[k][0] for k in self.attributes], dtype=torch.float64,
                            device=device)
        std = torch.tensor([self.stats[k][1] for k in self.attributes], dtype=torch.float64,
                           device=device)
        z = ((raw.double() - mean.double()) / std.double()).clamp(-CLIP, CLIP).float()
        z = torch.where(present, z, torch.zeros_like(z))
        if self.features == "fourier":
            freqs = torch.logspace(math.log10(0.25), math.log10(4.0), self.n_features,
                                   device=device)
            angles = math.pi * z.unsqueeze(-1) * freqs  # [n, A, F]
            feats = torch.cat([torch.sin(angles), torch.cos(angles)], dim=-1)
        else:
            centres = torch.linspace(-2.5, 2.5, self.n_features, device=device)
            width = 5.0 / max(self.n_features - 1, 1)
            feats = torch.exp(-0.5 * ((z.unsqueeze(-1) - centres) / width) ** 2)
        feats = feats * present.unsqueeze(-1)
        block = torch.cat([z.unsqueeze(-1), (~present).float().unsqueeze(-1), feats], dim=-1)
        out = block.reshape(raw.shape[0], -1)
        if self.normalize and out.shape[0]:
            out = torch.nn.functional.normalize(out, dim=1)
        return out
