"""spa: Structurally Prune Anything — channel pruning of ONNX models at the graph level."""

from .analysis import Analysis, analyze
from .options import DEFAULT_ROUND_TO, PruneOptions
from .pipeline import prune
from .result import PruneResult
from .errors import (InputShapeError, ModelLoadError, OutputPathError, PlanFileError, SpaError,
                     StrictModeError, UnsupportedModelError, VerificationError)
from .loading.model import load, save

__all__ = [
    # pipeline
    "prune", "analyze", "PruneOptions", "PruneResult", "Analysis", "DEFAULT_ROUND_TO",
    # files
    "load", "save",
    # errors
    "SpaError", "ModelLoadError", "InputShapeError", "UnsupportedModelError", "StrictModeError",
    "VerificationError", "OutputPathError", "PlanFileError",
]

__version__ = "0.1.0"
