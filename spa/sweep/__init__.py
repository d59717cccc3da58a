"""``spa sweep``: many prunings of one model, measured; a local pool, serial, or Ray.

``cells`` says what a sweep is made of, ``worker`` prunes and measures one cell,
``run`` runs the cells on a backend (``ray_backend`` for Ray), ``report`` shows and writes it."""

from .cells import Cell, Sweep, SweepConfig, cells_of, parse_keep, parse_ratios, parse_targets
from .run import Progress, best_under, pareto, rerun, run_sweep, run_sweeps
from .worker import Worker, fidelity, latency_noisy

__all__ = ["Cell", "Sweep", "SweepConfig", "cells_of", "parse_keep", "parse_ratios", "parse_targets",
           "Progress", "best_under", "pareto", "rerun", "run_sweep", "run_sweeps", "Worker", "fidelity",
           "latency_noisy"]
