"""The exceptions spa raises. Every message names the file, node or tensor and what to do."""

__all__ = ["SpaError", "ModelLoadError", "InputShapeError", "UnsupportedModelError",
           "StrictModeError", "VerificationError", "OutputPathError", "PlanFileError"]


class SpaError(Exception):
    """Base class: the CLI prints ``str(error)`` on one line and exits non-zero."""


class ModelLoadError(SpaError):
    """The file is missing, empty, truncated or not an ONNX model."""


class InputShapeError(SpaError):
    """An input has a symbolic dimension that spa cannot fix by itself."""


class UnsupportedModelError(SpaError):
    """The model is valid ONNX but spa cannot analyze or rewrite it."""


class StrictModeError(SpaError):
    """``strict=True`` and some group was blocked."""


class VerificationError(SpaError):
    """The pruned model is not equivalent to the masked original."""


class OutputPathError(SpaError):
    """The output path is the input path, or cannot be written."""


class PlanFileError(SpaError):
    """A plan file that is malformed or does not fit the module it is applied to."""
