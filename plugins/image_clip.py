"""CLIP image encoder ("clip", modality "image") on open_clip_torch.

Images are read from local paths (absolute, or relative to ``image_root``), ``data:``
URIs or raw bytes; a torch DataLoader decodes and preprocesses them in worker processes
while the model encodes the previous batch. An image that is missing or cannot be
decoded is reported per item and gets no vector. CLIP's text tower embeds search
queries into the same space (``encode_query``).

Options:
    model        open_clip architecture (default "ViT-B-32"), "local-dir:DIR" or a
                 directory holding open_clip_config.json (and optionally weights).
    pretrained   open_clip tag (default "laion2b_s34b_b79k"), a local checkpoint file,
                 or "none" for random weights (testing only; a warning says so).
    image_root   directory that relative image paths are resolved against.
    batch_size   images per forward pass (default 32 on CPU, 256 on CUDA).
    num_workers  DataLoader worker processes (default 2; 0 decodes in the main process).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import warnings
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import urlparse

import torch

from polyrec import (ConfigError, Encoder, EncoderContext, EncodingError, autocast, hookimpl)
from polyrec.plugins.image_io import (ImageFilesEncoder, ImageSource, file_digest,
                                       image_batches, load_image, resolve_path)

log = logging.getLogger(__name__)

DEFAULT_MODEL = "ViT-B-32"
DEFAULT_PRETRAINED = "laion2b_s34b_b79k"
NO_WEIGHTS = ("none", "random", "")
RANDOM_SEED = 0
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")

__all__ = ["ClipEncoder", "NoPretrainedWeightsWarning", "load_image", "resolve_path"]


class NoPretrainedWeightsWarning(UserWarning):
    """Images are being encoded by a CLIP model with random weights."""


def _fix_hint(model: str) -> str:
    return (f"no pretrained weights could be loaded for CLIP model '{model}'. Fix: point "
            "the clip option 'pretrained' at a local checkpoint file (e.g. --set "
            "clip.pretrained=/path/to/open_clip_pytorch_model.bin), or use "
            "--set clip.pretrained=none to encode with random weights (testing only)")


def _local_dir(model: str) -> Path | None:
    """The directory of a "local-dir:" model or of a plain directory path; else None."""
    if model.startswith("local-dir:"):
        return Path(model[len("local-dir:"):]).expanduser()
    p = Path(model).expanduser()
    return p if p.is_dir() else None


def _dir_checkpoint(folder: Path) -> Path | None:
    found = sorted(p for p in folder.iterdir() if p.suffix in _WEIGHT_SUFFIXES)
    found.sort(key=lambda p: p.suffix != ".safetensors")
    return found[0] if found else None


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _download_host(cfg: dict[str, Any]) -> str:
    if cfg.get("hf_hub"):
        from huggingface_hub import constants
        return urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    return urlparse(cfg.get("url", "")).hostname or "?"


def _reachable(host: str, timeout: float = 3.0) -> bool:
    """Whether a TCP connection to ``host``:443 opens (a quick check before downloading)."""
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _cached_tag_file(cfg: dict[str, Any]) -> Path | None:
    """The already downloaded weights of an open_clip pretrained tag, if any."""
    hub = cfg.get("hf_hub")
    if hub:
        from huggingface_hub import try_to_load_from_cache
        repo, filename = os.path.split(hub)  # "org/name/" or "org/name/file.bin"
        stem = filename.rsplit(".", 1)[0] if filename else "open_clip_pytorch_model"
        for name in dict.fromkeys([f"{stem}.safetensors", "open_clip_model.safetensors",
                                   filename or "open_clip_pytorch_model.bin"]):
            found = try_to_load_from_cache(repo, name)
            if isinstance(found, str):
                return Path(found)
    if cfg.get("url"):
        found = Path("~/.cache/clip").expanduser() / os.path.basename(urlparse(cfg["url"]).path)
        if found.is_file():
            return found
    return None


def _any_downloads() -> bool:
    """Whether the Hugging Face hub cache or open_clip's URL cache holds anything at all."""
    from huggingface_hub import constants
    hub = Path(constants.HF_HUB_CACHE)
    clip = Path("~/.cache/clip").expanduser()
    return (hub.is_dir() and any(hub.glob("models--*"))) or (clip.is_dir() and any(clip.iterdir()))


def _tag_preprocess(cfg: dict[str, Any]) -> dict[str, Any]:
    """create_model_and_transforms arguments that a tag would have set (loading its file)."""
    out: dict[str, Any] = {"force_quick_gelu": bool(cfg.get("quick_gelu", False))}
    for key, arg in (("mean", "image_mean"), ("std", "image_std"),
                     ("interpolation", "image_interpolation"), ("resize_mode", "image_resize_mode")):
        if cfg.get(key) is not None:
            out[arg] = cfg[key]
    return out


class ClipEncoder(ImageFilesEncoder, Encoder):
    """Image vectors from an open_clip CLIP model; queries through its text tower."""

    name = "clip"
    modality = "image"

    def __init__(self, model: str = DEFAULT_MODEL, pretrained: str | None = DEFAULT_PRETRAINED,
                 image_root: str | None = None, batch_size: int | str | None = None,
                 num_workers: int | str | None = 2, **options: Any) -> None:
        if options:
            raise ConfigError(f"unknown clip option(s): {', '.join(sorted(options))} (known: "
                              "model, pretrained, image_root, batch_size, num_workers)")
        super().__init__(model=model, pretrained=pretrained, image_root=image_root,
                         batch_size=batch_size, num_workers=num_workers)
        self.model_name = str(model or DEFAULT_MODEL)
        self.pretrained = "none" if pretrained is None else str(pretrained).strip()
        self.image_root = Path(image_root).expanduser() if image_root else None
        try:
            self.batch_size = int(batch_size) if batch_size not in (None, "") else None
            self.num_workers = int(num_workers) if num_workers not in (None, "") else 2
        except ValueError as exc:
            raise ConfigError(f"clip batch_size and num_workers must be integers: {exc}") from None
        self._model: Any = None
        self._preprocess: Any = None
        self._tokenizer: Any = None
        self._device = torch.device("cpu")
        self._weights = ""
        self.random_weights = False

    # -- loading -------------------------------------------------------------------------
    def _config(self) -> dict[str, Any]:
        import open_clip
        folder = _local_dir(self.model_name)
        if folder is not None:
            cfg_file = folder / "open_clip_config.json"
            if not cfg_file.is_file():
                raise EncodingError(f"clip: {folder} has no open_clip_config.json")
            data = json.loads(cfg_file.read_text())
            return data.get("model_cfg", data)
        try:
            cfg = open_clip.get_model_config(self.model_name)
        except Exception as exc:  # noqa: BLE001 - hf-hub: config without network
            reason = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
            raise EncodingError(f"clip: cannot read the config of '{self.model_name}' ({reason}); "
                                "download the model and use model=local-dir:DIR, or a "
                                "built-in architecture name") from exc
        if cfg is None:
            raise EncodingError(f"clip: unknown open_clip model '{self.model_name}' "
                                f"(known: {', '.join(open_clip.list_models()[:12])}, ...)")
        return cfg

    def prepare(self, ctx: EncoderContext) -> None:
        """Build the model and load its weights; EncodingError when none can be loaded."""
        if self._model is not None and self._device == ctx.device:
            return
        import open_clip

        self._config()  # a clear error for an unknown architecture
        folder = _local_dir(self.model_name)
        name = f"local-dir:{folder}" if folder is not None else self.model_name
        hub = self.model_name.startswith("hf-hub:")
        no_weights = self.pretrained.lower() in NO_WEIGHTS and not hub
        checkpoint: Path | None = None
        tag: str | None = None
        file = Path(self.pretrained).expanduser()
        if no_weights:
            pass
        elif file.is_file():
            checkpoint = file
        elif folder is not None:
            checkpoint = _dir_checkpoint(folder)
            if checkpoint is None:
                raise EncodingError(f"clip: {_fix_hint(self.model_name)} ({folder} holds no "
                                    f"weights file and '{self.pretrained}' is not a file)")
        elif hub:
            pass  # an hf-hub: model brings its own weights (downloaded by open_clip)
        elif open_clip.get_pretrained_cfg(self.model_name, self.pretrained):
            tag = self.pretrained
        elif any(sep in self.pretrained for sep in "/\\") or file.suffix in _WEIGHT_SUFFIXES:
            raise EncodingError(f"clip: checkpoint file not found: {file}; "
                                f"{_fix_hint(self.model_name)}")
        else:
            known = open_clip.list_pretrained_tags_by_model(self.model_name)
            tags = ", ".join(known[:6]) + (", ..." if len(known) > 6 else "") if known else "none"
            raise EncodingError(f"clip: '{self.pretrained}' is not a pretrained tag of "
                                f"'{self.model_name}' (its tags: {tags}); "
                                f"{_fix_hint(self.model_name)}")
        weights_file, tag_kwargs = checkpoint, {}
        if tag is not None:  # without network, use the cached download (no retry storm)
            cfg = open_clip.get_pretrained_cfg(self.model_name, tag)
            host = _download_host(cfg)
            if _offline() or not _reachable(host):
                weights_file = _cached_tag_file(cfg)
                if weights_file is None:
                    raise EncodingError(
                        f"clip: {_fix_hint(self.model_name)} (tag '{tag}' must be downloaded "
                        f"from {host}, " + ("but HF_HUB_OFFLINE is set" if _offline() else
                                            "which cannot be reached")
                        + ", and it is not in the local cache)")
                tag_kwargs = _tag_preprocess(cfg)
        try:
            with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                torch.manual_seed(RANDOM_SEED)  # random weights are reproducible
                model, _, preprocess = open_clip.create_model_and_transforms(
                    name, pretrained=tag if weights_file is None else None,
                    load_weights=folder is None, **tag_kwargs)
            if weights_file is not None:
                open_clip.load_checkpoint(model, str(weights_file))
        except Exception as exc:  # noqa: BLE001 - download, network, format errors
            reason = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise EncodingError(f"clip: {_fix_hint(self.model_name)} ({reason})") from exc
        if checkpoint is not None:
            self._weights = f"file:{file_digest(checkpoint)[:16]}"
        elif tag is not None:
            self._weights = f"tag:{tag}"
        elif hub:
            self._weights = f"hub:{self.model_name}"
        else:
            self._weights = f"random:seed={RANDOM_SEED}:torch={torch.__version__}"
            self.random_weights = True
            message = (f"CLIP model '{self.model_name}' has NO pretrained weights "
                       "(pretrained=none): images are encoded with random weights, "
                       "useful for testing only")
            log.warning(message)
            warnings.warn(message, NoPretrainedWeightsWarning, stacklevel=2)
        self._model = model.eval().to(ctx.device)
        self._preprocess = preprocess
        self._tokenizer = open_clip.get_tokenizer(name)
        self._device = ctx.device

    # -- the contract --------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return int(self._config()["embed_dim"])

    def has_pretrained_weights(self) -> bool:
        """Whether real weights are here without downloading: a checkpoint file, a model
        directory holding one, an hf-hub model, or a tag whose download is cached (once
        prepared: whether it loaded real weights). A tag that would still have to be
        downloaded counts as no weights: use ``--encoder clip`` to download it."""
        if self._model is not None:
            return not self.random_weights
        if self.model_name.startswith("hf-hub:"):
            return True
        if self.pretrained.lower() in NO_WEIGHTS:
            return False
        if Path(self.pretrained).expanduser().is_file():
            return True
        folder = _local_dir(self.model_name)
        if folder is not None:
            return folder.is_dir() and _dir_checkpoint(folder) is not None
        if not _any_downloads():
            return False  # nothing was ever downloaded: no need to import open_clip
        import open_clip
        cfg = open_clip.get_pretrained_cfg(self.model_name, self.pretrained)
        return bool(cfg) and _cached_tag_file(cfg) is not None

    def fingerprint(self) -> str:
        if self._model is None:
            raise EncodingError("clip: fingerprint() needs prepare() first")
        import open_clip
        settings = json.dumps({"model": self.model_name, "config": self._config(),
                               "weights": self._weights, "open_clip": open_clip.__version__},
                              sort_keys=True)
        tail = Path(self.model_name).name[-40:]
        return f"clip/{tail}/{hashlib.sha256(settings.encode()).hexdigest()[:24]}"

    def encode_query(self, text: str, ctx: EncoderContext) -> torch.Tensor:
        """CLIP text-tower embedding of ``text`` (L2-normalised), comparable to image vectors."""
        self.prepare(ctx)
        tokens = self._tokenizer([text]).to(ctx.device)
        with torch.inference_mode(), autocast(ctx.device):
            out = self._model.encode_text(tokens)
        return torch.nn.functional.normalize(out.float(), dim=-1)[0].cpu()

    # -- the work ------------------------------------------------------------------------
    def _draft_size(self) -> int:
        """Twice the model's input side: JPEGs decode at a reduced scale no smaller."""
        size = getattr(self._model.visual, "image_size", 224)
        return 2 * int(max(size) if isinstance(size, (tuple, list)) else size)

    def encode_images(self, sources: Sequence[ImageSource], ctx: EncoderContext) -> tuple[
            torch.Tensor, list[int], dict[int, str]]:
        """Encode images given as paths, data: URIs or bytes.

        Returns (float32 L2-normalised vectors for the readable images, their positions in
        ``sources``, position -> reason for the others)."""
        self.prepare(ctx)
        batch = ctx.batch_size or self.batch_size or (256 if ctx.device.type == "cuda" else 32)
        done: list[int] = []
        chunks: list[torch.Tensor] = []
        errors: dict[int, str] = {}
        with torch.inference_mode(), autocast(ctx.device):
            for positions, pixels, bad in image_batches(
                    sources, self.image_root, self._preprocess, draft=self._draft_size(),
                    batch=batch, num_workers=self.num_workers, device=ctx.device):
                errors.update(bad)
                if pixels is None:
                    continue
                out = self._model.encode_image(pixels.to(ctx.device, non_blocking=True))
                chunks.append(torch.nn.functional.normalize(out.float(), dim=-1).cpu())
                done += positions
        vectors = torch.cat(chunks) if chunks else torch.empty(0, self.dim)
        return vectors, done, errors


@hookimpl
def register_encoders(register):  # type: ignore[no-untyped-def]
    register(ClipEncoder)
