"""onnxruntime latency, measured fairly: sessions interleaved in one process, median."""

from __future__ import annotations

import time

import numpy as np
import onnx

from .shapes import random_inputs
from .runtime import session
from .stop import interruptible

__all__ = ["latency", "provider_session"]


def latency(models: list[onnx.ModelProto], input_shapes: dict, runs: int = 30, warmup: int = 3,
            threads: int = 1, seed: int = 0, provider: str = "CPUExecutionProvider") -> list[float]:
    """Median seconds per run of each model on the same random inputs, interleaved so that
    machine noise hits every model alike, on onnxruntime's execution ``provider``."""
    sessions = [session(m, threads=threads, timed=True) if provider == "CPUExecutionProvider" else
                provider_session(m, provider, threads) for m in models]
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


def provider_session(model: onnx.ModelProto, provider: str, threads: int = 1):
    """A session on ``provider`` alone; a provider this onnxruntime lacks is a one-line error
    (onnxruntime itself would warn and quietly fall back to the CPU, timing the wrong thing)."""
    import onnxruntime as ort
    from .errors import SpaError
    from .model import materialized
    available = ort.get_available_providers()
    if provider not in available:
        raise SpaError(f"--provider {provider}: not in this onnxruntime; available: {', '.join(available)}")
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return interruptible(ort.InferenceSession, materialized(model).SerializeToString(), so, providers=[provider])
