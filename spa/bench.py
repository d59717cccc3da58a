"""onnxruntime latency, measured fairly: sessions interleaved in one process, median."""

from __future__ import annotations

import time

import numpy as np
import onnx

from .shapes import random_inputs
from .runtime import session

__all__ = ["latency"]


def latency(models: list[onnx.ModelProto], input_shapes: dict, runs: int = 30, warmup: int = 3,
            threads: int = 1, seed: int = 0) -> list[float]:
    """Median seconds per run of each model on the same random inputs, interleaved so that
    machine noise hits every model alike."""
    sessions = [session(m, threads=threads) for m in models]
    feeds = random_inputs(models[0], input_shapes, np.random.default_rng(seed))
    for s in sessions:
        for _ in range(warmup):
            s.run(None, feeds)
    times = [[] for _ in sessions]
    for _ in range(runs):
        for s, t in zip(sessions, times):
            start = time.perf_counter()
            s.run(None, feeds)
            t.append(time.perf_counter() - start)
    return [float(np.median(t)) for t in times]
