"""polyrec: a plugin-based multimodal recommendation engine.

Public API (``__all__``): :class:`Engine`, the ``hookimpl`` marker for plugins, the
contracts a plugin implements, the error hierarchy, and the helpers a plugin may use
(devices, validation splits and metrics, stored artifacts, feedback events). Built-in
plugins import nothing else from polyrec (tests/test_public_api.py).
"""
from typing import TYPE_CHECKING

from polyrec.contracts import (EncodeResult, Encoder, EncoderContext, FeedbackLearner, Fuser,
                              IntentData, IntentModel, IntentPrediction, ItemView,
                              LearnerContext, Option, Ranker, Reader, RetrievalKeys, Row)
from polyrec.engine import Engine
from polyrec.errors import (ConfigError, DuplicateNameError, EncodingError, ModelNotTrainedError,
                           NotFoundError, PluginError, PolyrecError, ValidationError)
from polyrec.hookspecs import hookimpl
from polyrec.training_data import TrainingData

__version__ = "0.1.0"

#: Helpers for plugin authors, imported on first use (``from polyrec import autocast``)
#: so that ``import polyrec`` stays light: name -> module that defines it.
_LAZY: dict[str, str] = {
    # devices: "auto" picks CUDA when present; bf16 autocast on the GPU
    "resolve_device": "polyrec.device", "autocast": "polyrec.device",
    # progress of long work: tqdm on a terminal, log lines elsewhere
    "progress_bar": "polyrec.progress", "stage": "polyrec.progress",
    # rankers: validation splits, metrics and tuning on the training data they are given
    "validation_split": "polyrec.rank.evaluation", "user_metrics": "polyrec.rank.evaluation",
    "mask_scores": "polyrec.rank.evaluation", "evaluate_ranker": "polyrec.rank.evaluation",
    "tune_on_validation": "polyrec.rank.evaluation",
    # trained models kept in the store (versioned blobs), e.g. an encoder's embeddings
    "save_artifact": "polyrec.store.artifacts", "load_artifact": "polyrec.store.artifacts",
    "list_artifacts": "polyrec.store.artifacts", "prune_artifacts": "polyrec.store.artifacts",
    # what feedback learners observe and the item space they work in
    "Event": "polyrec.feedback.events", "ItemSpace": "polyrec.feedback.events",
    # a general English thesaurus (WordNet 3.0's files, the `thesaurus` extra; None if absent)
    "WordNet": "polyrec.retrieve.thesaurus",
}


if TYPE_CHECKING:  # pragma: no cover - what type checkers see of the names above
    from polyrec.device import autocast, resolve_device
    from polyrec.progress import progress_bar, stage
    from polyrec.feedback.events import Event, ItemSpace
    from polyrec.retrieve.thesaurus import WordNet
    from polyrec.rank.evaluation import (evaluate_ranker, mask_scores, tune_on_validation,
                                         user_metrics, validation_split)
    from polyrec.store.artifacts import (list_artifacts, load_artifact, prune_artifacts,
                                         save_artifact)


def __getattr__(name: str) -> object:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'polyrec' has no attribute '{name}'")
    import importlib
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "Engine", "hookimpl", "Encoder", "EncodeResult", "EncoderContext", "Fuser", "Ranker",
    "FeedbackLearner", "LearnerContext", "Reader", "Row", "ItemView", "PolyrecError", "ConfigError",
    "NotFoundError", "PluginError", "DuplicateNameError", "ValidationError", "EncodingError",
    "ModelNotTrainedError", "Option", "TrainingData", "RetrievalKeys",
    "IntentModel", "IntentData", "IntentPrediction", "__version__",
    *_LAZY,
]
