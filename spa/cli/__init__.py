"""The ``spa`` command: prune, inspect, bench, sweep."""

from .commands import main

__all__ = ["main"]
