"""Channel importance: one score per channel of each group (higher = keep)."""

from .magnitude import CRITERIA as MAGNITUDE_CRITERIA
from .magnitude import score_groups
from .obspa import DATA_CRITERIA

CRITERIA = MAGNITUDE_CRITERIA + DATA_CRITERIA

__all__ = ["CRITERIA", "DATA_CRITERIA", "score_groups"]
