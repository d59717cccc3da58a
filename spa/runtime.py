"""onnxruntime sessions: how spa runs a model (CPU), and which session a check may trust."""

from __future__ import annotations

import functools

import onnx

from .errors import UnsupportedModelError, VerificationError
from .loading.model import materialized
from .stop import interruptible

__all__ = ["session", "default_session", "any_session", "THREADS", "LARGE_GRAPH_NODES", "vector_channels"]

# Intra-op threads of every session spa makes when a caller gives none; 0: onnxruntime's
# default (every core). Parallel callers (a sweep's workers, a shared benchmark machine) set it.
THREADS = 0


# Above this many nodes an optimized session gets onnxruntime's basic optimizations (constant
# folding, no fusions or layout changes) unless it must have the users' defaults: the full set
# takes time growing much faster than the graph. One session of a Conv/Relu chain (CPU seconds,
# benchmarks/chain.py): 10k nodes 2.5 full / 0.8 basic, 30k 11 / 2.1, 100k 163 / 13.
LARGE_GRAPH_NODES = 20_000


def session(model: onnx.ModelProto, threads: int = 0, optimize: bool = True, timed: bool = False,
            defaults: bool = False):
    """A CPU session: optimized (all of onnxruntime's graph optimizations, the basic ones above
    ``LARGE_GRAPH_NODES`` nodes unless ``defaults``: a user's session, whatever the size) or not.
    Building it and (unless ``timed``: a worker's handoff would be timed too) its runs can be
    stopped by a signal (spa.stop)."""
    import onnxruntime as ort
    threads = threads or THREADS
    model = materialized(model)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif not (defaults or timed) and len(model.graph.node) > LARGE_GRAPH_NODES:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    kind = ort.InferenceSession if timed else _session_class()
    return interruptible(kind, model.SerializeToString(), so, providers=["CPUExecutionProvider"])


@functools.cache
def _session_class():
    """onnxruntime's session, its runs interruptible (spa.stop): building one and running it
    are the long C calls of a run."""
    import onnxruntime as ort

    class Session(ort.InferenceSession):
        def run(self, *args, **kwargs):
            return interruptible(super().run, *args, **kwargs)

    return Session


def _try_session(model, optimize: bool):
    """A session as users make it (the checks and references below), or why there is none."""
    try:
        return session(model, optimize=optimize, defaults=True), None
    except Exception as e:
        return None, str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__


def default_session(pruned: onnx.ModelProto, original: onnx.ModelProto):
    """The pruned model in onnxruntime with default options, the ones users have. When it
    does not load, the original tells whose fault that is: if the original loads, the pruning
    broke it; if the original loads only without graph optimizations, neither is fit to
    write; if it does not load at all, the model cannot be verified here."""
    s_pruned, pruned_error = _try_session(pruned, optimize=True)
    if s_pruned is not None:
        return s_pruned
    if _try_session(original, optimize=True)[0] is not None:
        raise VerificationError(f"onnxruntime cannot load the pruned model with default options: "
                                f"{pruned_error}; please report this model")
    if _try_session(original, optimize=False)[0] is None:
        raise UnsupportedModelError(f"onnxruntime cannot run the original model, so it cannot be "
                                    f"verified: {pruned_error}")
    raise VerificationError(f"onnxruntime loads the original model only without graph optimizations, and "
                            f"the pruned one not with default options either ({pruned_error}); spa does not "
                            f"write models that onnxruntime's default session cannot load (--no-verify writes "
                            f"it unchecked)")


def any_session(model: onnx.ModelProto):
    """A reference to compare with: optimized, or unoptimized where onnxruntime's optimizer
    trips over the graph (the oracle's masking Muls can do that)."""
    s, error = _try_session(model, optimize=True)
    if s is None:
        s, error = _try_session(model, optimize=False)
    if s is None:
        raise UnsupportedModelError(f"onnxruntime cannot run the original model, so it cannot be verified: "
                                    f"{error}")
    return s


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def vector_channels() -> int:
    """float32 lanes of this CPU's widest vector unit, the multiple of channels onnxruntime's
    kernels process at once: AVX-512 16, AVX2 8, anything else (SSE, NEON) 4. Where the CPU
    cannot be read (not Linux), 8, the default."""
    flags = _cpu_flags()
    if not flags:
        return 8
    return 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
