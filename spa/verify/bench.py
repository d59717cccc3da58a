"""onnxruntime latency, measured fairly: sessions interleaved in one process, in several
rounds that alternate which model runs first; each model's figure is its fastest round's median.

Load from other processes only ever adds time, so the fastest round is the one least
disturbed; interleaving makes a burst of load hit every model alike within a round, and the
rounds tell how much the comparison itself moved (``Timing.spread``)."""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import onnx

from ..loading.shapes import graph_inputs, random_inputs
from ..runtime import session
from ..stop import interruptible

__all__ = ["Timing", "latency", "timings", "provider_session"]

_clock = time.perf_counter   # a test gives its own


@dataclass
class Timing:
    """Per model, the median seconds of each round (``rounds[r][m]``)."""

    rounds: list[list[float]]

    @property
    def seconds(self) -> list[float]:
        """Per model, the fastest round's median."""
        return [min(r[m] for r in self.rounds) for m in range(len(self.rounds[0]))]

    def spread(self, model: int = 1, base: int = 0) -> float:
        """How far the rounds disagree on ``model``'s time as a share of ``base``'s: (largest -
        smallest ratio) / median ratio; 0 with one round."""
        ratios = [r[model] / r[base] for r in self.rounds if r[base] > 0]
        if len(ratios) < 2:
            return 0.0
        return float((max(ratios) - min(ratios)) / max(np.median(ratios), 1e-12))


def latency(models: list[onnx.ModelProto], input_shapes: dict, runs: int = 30, warmup: int = 3,
            threads: int = 1, seed: int = 0, provider: str = "CPUExecutionProvider", repeats: int = 3) -> list[float]:
    """Seconds per run of each model on the same random inputs (``timings(...).seconds``)."""
    return timings(models, input_shapes, runs, warmup, threads, seed, provider, repeats).seconds


def timings(models: list[onnx.ModelProto], input_shapes: dict, runs: int = 30, warmup: int = 3,
            threads: int = 1, seed: int = 0, provider: str = "CPUExecutionProvider", repeats: int = 3) -> Timing:
    """Time each model ``runs`` times in all, in ``repeats`` rounds, interleaved run by run so
    that machine noise hits every model alike, on onnxruntime's execution ``provider``; odd
    rounds run the models in reverse order (whoever runs first meets a colder cache)."""
    sessions = [session(m, threads=threads, timed=True) if provider == "CPUExecutionProvider" else
                provider_session(m, provider, threads) for m in models]
    feeds = random_inputs(models[0], input_shapes, np.random.default_rng(seed))
    # the same values in each model's own input types (a float16 copy takes float16)
    own = [_cast_to_inputs(feeds, m) for m in models]
    for s, f in zip(sessions, own):
        for _ in range(warmup):
            s.run(None, f)
    per_round = max(1, math.ceil(runs / max(1, repeats)))
    rounds = []
    for r in range(max(1, repeats)):
        order = list(range(len(sessions)))[::-1 if r % 2 else 1]
        times: list[list[float]] = [[] for _ in sessions]
        for _ in range(per_round):
            for m in order:
                start = _clock()
                sessions[m].run(None, own[m])
                times[m].append(_clock() - start)
        rounds.append([float(np.median(t)) for t in times])
    return Timing(rounds)


def _cast_to_inputs(feeds: dict, model: onnx.ModelProto) -> dict:
    types = {i.name: i.type.tensor_type.elem_type for i in graph_inputs(model)}
    return {k: v.astype(onnx.helper.tensor_dtype_to_np_dtype(types[k])) if types.get(k) else v
            for k, v in feeds.items()}


def provider_session(model: onnx.ModelProto, provider: str, threads: int = 1):
    """A session on ``provider`` alone; a provider this onnxruntime lacks is a one-line error
    (onnxruntime itself would warn and quietly fall back to the CPU, timing the wrong thing)."""
    import onnxruntime as ort
    from ..errors import SpaError
    from ..loading.model import materialized
    available = ort.get_available_providers()
    if provider not in available:
        raise SpaError(f"--provider {provider}: not in this onnxruntime; available: {', '.join(available)}")
    so = ort.SessionOptions()
    so.log_severity_level = 4
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    return interruptible(ort.InferenceSession, materialized(model).SerializeToString(), so, providers=[provider])
