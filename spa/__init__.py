"""spa: Structurally Prune Anything — channel pruning of ONNX models at the graph level."""

from .api import DEFAULT_ROUND_TO, Analysis, PruneResult, analyze, prune
from .errors import (InputShapeError, ModelLoadError, OutputPathError, PlanFileError, SpaError,
                     StrictModeError, UnsupportedModelError, VerificationError)
from .model import load, save

__all__ = [
    # pipeline
    "prune", "analyze", "PruneResult", "Analysis", "DEFAULT_ROUND_TO",
    # files
    "load", "save",
    # errors
    "SpaError", "ModelLoadError", "InputShapeError", "UnsupportedModelError", "StrictModeError",
    "VerificationError", "OutputPathError", "PlanFileError",
]

__version__ = "0.1.0"
