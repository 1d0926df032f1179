"""polyrec: a plugin-based multimodal recommendation engine.

Public API: :class:`Engine`, the ``hookimpl`` marker for plugins, the contracts a
plugin implements, and the error hierarchy.
"""
from polyrec.contracts import (EncodeResult, Encoder, EncoderContext, FeedbackLearner, Fuser,
                              ItemView, Option, Ranker, Reader, Row)
from polyrec.engine import Engine
from polyrec.errors import (ConfigError, DuplicateNameError, EncodingError, ModelNotTrainedError,
                           NotFoundError, PluginError, PolyrecError, ValidationError)
from polyrec.hookspecs import hookimpl
from polyrec.training_data import TrainingData

__version__ = "0.1.0"

__all__ = [
    "Engine", "hookimpl", "Encoder", "EncodeResult", "EncoderContext", "Fuser", "Ranker",
    "FeedbackLearner", "Reader", "Row", "ItemView", "PolyrecError", "ConfigError",
    "NotFoundError", "PluginError", "DuplicateNameError", "ValidationError", "EncodingError",
    "ModelNotTrainedError", "Option", "TrainingData", "__version__",
]
