"""The int8 CPU inference path of the BERT text encoder (``bert`` option ``quantize=int8``).

The model's fp32 weights, as installed, are exported to ONNX, fused by ONNX Runtime's
transformer optimiser (embedding + LayerNorm, bias + GELU) and dynamically quantised: the
MatMul weights to int8, **per output channel**, with the activations quantised per batch
at run time (int8 MatMul, VNNI where the CPU has it). The optimiser's attention and
skip + LayerNorm fusions are switched off (:data:`FUSIONS_OFF`): the fused ``Attention``
op keeps the Q/K/V projection in fp32 and, with ``SkipLayerNormalization``, was the
slowest part of the graph on CPU; unfused, the Q/K/V projections are plain MatMuls that
are quantised too (H&M article texts, ~75 tokens: 1.3 -> 1.6-1.75 x the fp32 torch model).
Kept in fp32: the embeddings, the attention scores and softmax, LayerNorms and every
MatMul of the first transformer layer, which alone moves the vectors most (on MiniLM-L6
quantising it takes the minimum cosine to fp32 from 0.989 to 0.980). Mean pooling and L2
normalisation stay in torch, in float32.

The artefact is built once, locally, from the installed weights (never downloaded),
and cached under :func:`cache_dir` in a folder named by a hash of the weights, the
recipe and the library versions, written atomically (a half-written model is never
used). Needs the optional extra ``quant``: ``pip install "polyrec[quant]"``
(onnxruntime and onnx).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import numpy as np
import torch

from polyrec import EncodingError

#: Values of the bert option ``quantize``.
QUANTIZE_MODES = ("none", "int8")
#: Names the recipe; part of the artefact key and of the encoder fingerprint, so a change
#: of recipe never reuses vectors or artefacts of another.
RECIPE = "onnx-opt-unfused-attention/int8-dynamic-per-channel/matmul+qkv/fp32-layer0/v2"
#: ONNX Runtime transformer-optimiser fusions the recipe switches off (see the module doc).
FUSIONS_OFF = ("enable_attention", "enable_skip_layer_norm", "enable_bias_skip_layer_norm")
INSTALL_HINT = 'pip install "polyrec[quant]" (or: pip install onnxruntime onnx)'
_BUILD_LOCK = threading.Lock()


def cache_dir() -> Path:
    """Where built artefacts live: ``$POLYREC_CACHE_DIR``, else ``$XDG_CACHE_HOME/polyrec``,
    else ``~/.cache/polyrec``."""
    if os.environ.get("POLYREC_CACHE_DIR"):
        return Path(os.environ["POLYREC_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "polyrec"


def require_onnx() -> Any:
    """Import onnxruntime and onnx, or fail with one line naming what to install."""
    try:
        import onnx  # noqa: F401
        import onnxruntime
        from onnxruntime.quantization import quantize_dynamic  # noqa: F401
        from onnxruntime.transformers import optimizer  # noqa: F401
    except ImportError as exc:
        raise EncodingError(f"bert quantize=int8 needs onnxruntime and onnx ({exc}): "
                            f"{INSTALL_HINT}") from None
    return onnxruntime


def artefact_key(weights_revision: str, model_name: str) -> str:
    """Hash of everything the int8 graph depends on."""
    ort = require_onnx()
    import onnx
    settings = json.dumps({"weights": weights_revision, "model": model_name, "recipe": RECIPE,
                           "onnxruntime": ort.__version__, "onnx": onnx.__version__,
                           "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return hashlib.sha256(settings.encode()).hexdigest()[:20]


class _LastHidden(torch.nn.Module):
    """(input_ids, attention_mask) -> last_hidden_state: the graph that is exported."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.m = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.m(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


def build_int8(source: str, dest: Path) -> None:
    """Export the model at ``source`` (eager attention, fp32), optimise and quantise it to
    ``dest`` (an .onnx file), atomically."""
    require_onnx()
    import warnings

    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic
    from onnxruntime.transformers import optimizer
    from onnxruntime.transformers.fusion_options import FusionOptions
    from transformers import AutoModel

    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # transformers' "Loading weights" bar
    try:
        model = AutoModel.from_pretrained(source, attn_implementation="eager").eval().float()
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    cfg = model.config
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=".build-") as tmp:
        fp32, fused = Path(tmp) / "fp32.onnx", Path(tmp) / "fused.onnx"
        ids = torch.full((2, 16), 1000, dtype=torch.long)
        mask = torch.ones_like(ids)
        mask[1, 8:] = 0
        axes = {0: "batch", 1: "tokens"}
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")  # tracer warnings about the mask's shape checks
            torch.onnx.export(_LastHidden(model), (ids, mask), str(fp32),
                              input_names=["input_ids", "attention_mask"],
                              output_names=["last_hidden_state"],
                              dynamic_axes={"input_ids": axes, "attention_mask": axes,
                                            "last_hidden_state": axes},
                              opset_version=17, dynamo=False)
        fusions = FusionOptions("bert")
        for name in FUSIONS_OFF:
            setattr(fusions, name, False)
        opt = optimizer.optimize_model(str(fp32), model_type="bert",
                                       num_heads=int(cfg.num_attention_heads),
                                       hidden_size=int(cfg.hidden_size), opt_level=1,
                                       optimization_options=fusions)
        opt.save_model_to_file(str(fused))
        graph = onnx.load(str(fused), load_external_data=False).graph
        keep_fp32 = [n.name for n in graph.node
                     if n.op_type == "MatMul" and "/layer.0/" in n.name]
        out = Path(tmp) / "model.onnx"
        quantize_dynamic(str(fused), str(out), per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], nodes_to_exclude=keep_fp32,
                         extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT})
        os.replace(out, dest)


def int8_model_path(source: str, weights_revision: str, model_name: str) -> Path:
    """The cached int8 graph of this model, built on first use."""
    key = artefact_key(weights_revision, model_name)
    path = cache_dir() / "onnx" / f"{Path(model_name).name[-40:]}-{key}" / "model-int8.onnx"
    with _BUILD_LOCK:
        if not path.is_file():
            try:
                build_int8(source, path)
            except EncodingError:
                raise
            except Exception as exc:  # noqa: BLE001 - exporter, optimiser or quantiser failure
                shutil.rmtree(path.parent, ignore_errors=True)
                raise EncodingError(f"bert quantize=int8: cannot build the int8 ONNX model "
                                    f"from '{model_name}': {exc}".splitlines()[0]) from exc
    return path


class Int8Bert:
    """An ONNX Runtime session over the int8 graph: token ids and mask -> hidden states."""

    def __init__(self, path: Path, threads: int | None = None) -> None:
        ort = require_onnx()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = int(threads or torch.get_num_threads())
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.path = path
        self.session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """float32 last hidden states [batch, tokens, dim] (CPU tensors in and out)."""
        feeds = {"input_ids": input_ids.numpy().astype(np.int64, copy=False),
                 "attention_mask": attention_mask.numpy().astype(np.int64, copy=False)}
        return torch.from_numpy(self.session.run(None, feeds)[0])
