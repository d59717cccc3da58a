"""The ``spa`` command: prune, inspect, bench, sweep."""
