"""Reading images for the image encoders (clip, image_cnn): one decoding path for both.

Images come from local paths (absolute, or relative to an ``image_root``), ``data:`` URIs
or raw bytes. :func:`image_batches` runs a torch DataLoader whose worker processes decode
(PIL, with JPEG draft mode) and preprocess while the model encodes the previous batch;
an image that is missing or cannot be decoded comes back as a per-position reason, never
as a placeholder tensor. This module registers nothing; it is a helper of the encoders.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import torch

ImageSource = str | Path | bytes

__all__ = ["ImageSource", "ImageDataset", "ImageFilesEncoder", "collate_images", "file_digest",
           "image_batches", "image_content", "load_image", "resolve_path"]


def resolve_path(ref: str, root: Path | None) -> Path:
    """A local image path: absolute as given, relative ones against ``root`` (or the cwd)."""
    p = Path(ref).expanduser()
    if p.is_absolute() or root is None:
        return p
    return root / p


def load_image(source: ImageSource, root: Path | None = None, draft: int | None = None) -> Any:
    """Decode one image to an RGB PIL image; raise ValueError with a short reason.

    ``draft`` lets the JPEG decoder scale down by a power of two while both sides stay
    at least ``draft`` pixels (much faster for large photos that get resized anyway)."""
    from PIL import Image, UnidentifiedImageError

    if isinstance(source, bytes):
        stream: Any = io.BytesIO(source)
    else:
        ref = str(source)
        if ref.startswith("data:"):
            try:
                stream = io.BytesIO(base64.b64decode(ref.split(",", 1)[1], validate=True))
            except (IndexError, binascii.Error):
                raise ValueError("malformed data: URI") from None
        elif "://" in ref:
            raise ValueError(f"remote image {ref} is not fetched; store a local path")
        else:
            path = resolve_path(ref, root)
            if not path.is_file():
                raise ValueError(f"image file not found: {path}")
            stream = path
    try:
        with Image.open(stream) as img:
            if draft:
                img.draft("RGB", (draft, draft))
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ValueError(f"cannot decode image: {exc}") from None


def image_content(ref: str | None, root: Path | None) -> str | None:
    """An item's image reference as cache content: the resolved path plus the file's size
    and mtime (so a replaced file re-encodes), a digest of a ``data:`` URI, a URL as it
    is; None for no image."""
    ref = (ref or "").strip()
    if not ref:
        return None
    if ref.startswith("data:"):
        return "data:sha256=" + hashlib.sha256(ref.encode()).hexdigest()
    if "://" in ref:
        return ref
    path = resolve_path(ref, root)
    try:
        st = os.stat(path)
    except OSError:
        return f"{path}|missing"
    return f"{path}|{st.st_size}|{st.st_mtime_ns}"


class ImageDataset(torch.utils.data.Dataset):
    """Decodes and preprocesses image k; failures come back as (k, None, reason)."""

    def __init__(self, sources: Sequence[ImageSource], root: Path | None,
                 preprocess: Callable[[Any], torch.Tensor], draft: int | None = None) -> None:
        self.sources, self.root, self.preprocess = list(sources), root, preprocess
        self.draft = draft

    def __len__(self) -> int:
        return len(self.sources)

    def __getitem__(self, k: int) -> tuple[int, torch.Tensor | None, str | None]:
        try:
            return k, self.preprocess(load_image(self.sources[k], self.root, self.draft)), None
        except ValueError as exc:
            return k, None, str(exc)
        except Exception as exc:  # noqa: BLE001 - one bad image must not stop the batch
            return k, None, f"cannot read image: {type(exc).__name__}: {exc}"


def collate_images(rows: list[tuple[int, torch.Tensor | None, str | None]]) -> tuple[
        list[int], torch.Tensor | None, dict[int, str]]:
    """(positions of the decoded images, their stacked pixels or None, position -> reason)."""
    good = [(k, t) for k, t, _ in rows if t is not None]
    errors = {k: e or "unreadable image" for k, t, e in rows if t is None}
    pixels = torch.stack([t for _, t in good]) if good else None
    return [k for k, _ in good], pixels, errors


def image_batches(sources: Sequence[ImageSource], root: Path | None,
                  preprocess: Callable[[Any], torch.Tensor], *, draft: int | None, batch: int,
                  num_workers: int, device: torch.device) -> Iterator[
                      tuple[list[int], torch.Tensor | None, dict[int, str]]]:
    """Batches of (positions, pixels on the host or None, position -> failure reason),
    decoded by ``num_workers`` DataLoader processes (0: in this process; never more
    workers than batches) while the caller encodes the previous batch."""
    workers = min(num_workers, max(1, len(sources) // batch)) if num_workers > 0 else 0
    loader = torch.utils.data.DataLoader(
        ImageDataset(sources, root, preprocess, draft), batch_size=batch, num_workers=workers,
        collate_fn=collate_images, pin_memory=device.type == "cuda",
        prefetch_factor=2 if workers else None)
    yield from loader


def file_digest(path: Path) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks: names weights in fingerprints."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class ImageFilesEncoder:
    """What the image encoders share, mixed in before ``Encoder``: an item's content is
    its image reference plus the file's size and mtime (an edited file re-encodes), and
    ``encode`` hands the items' image references to the encoder's ``encode_images``
    (which needs ``image_root`` and returns vectors, readable positions, reasons)."""

    image_root: Path | None

    def content(self, item: Any) -> str | None:
        """The image reference plus the file's size and mtime (so an edited file re-encodes)."""
        return image_content(item.image, self.image_root)

    def encode(self, items: Sequence[Any], ctx: Any) -> Any:
        from polyrec import EncodeResult
        sources = [(item.image or "").strip() for item in items]
        vectors, ok, errors = self.encode_images(sources, ctx)  # type: ignore[attr-defined]
        return EncodeResult(vectors=vectors, item_ids=[items[k].id for k in ok],
                            failed={items[k].id: reason for k, reason in errors.items()})
