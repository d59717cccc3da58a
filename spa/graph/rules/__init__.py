"""One axis rule per ONNX operator family, registered by op type (``registry.py`` says what
a rule is). Importing this package registers them all."""

from . import (attention, control, einsum, elementwise, fused, indexing, layout, linear,  # noqa: F401
               normalization, quantized, recurrent)  # (registration)
from .registry import RULES, apply_rule, rule

__all__ = ["RULES", "rule", "apply_rule"]
