"""Channel importance: one score per channel of each group (higher = keep)."""

from .magnitude import CRITERIA, score_groups

__all__ = ["CRITERIA", "score_groups"]
