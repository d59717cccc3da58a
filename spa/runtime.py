"""onnxruntime sessions: how spa runs a model (CPU), and which session a check may trust."""

from __future__ import annotations

import functools

import onnx

from .errors import UnsupportedModelError, VerificationError
from .loading.tensors import check_mapped, materialized, tensor_bytes, weight_view
from .stop import interruptible

__all__ = ["session", "default_session", "any_session", "node_reads", "THREADS", "LARGE_GRAPH_NODES",
           "vector_channels", "weight_bytes"]

# Intra-op threads of every session spa makes when a caller gives none; 0: onnxruntime's
# default (every core). Parallel callers (a sweep's workers, a shared benchmark machine) set it.
THREADS = 0


# Above this many nodes an optimized session gets onnxruntime's basic optimizations (constant
# folding, no fusions or layout changes) unless it must have the users' defaults: the full set
# takes time growing much faster than the graph. One session of a Conv/Relu chain (CPU seconds,
# benchmarks/chain.py): 10k nodes 2.5 full / 0.8 basic, 30k 11 / 2.1, 100k 163 / 13.
LARGE_GRAPH_NODES = 20_000


# Above this many bytes of weights a session is given them as inputs fed from where they lie
# (external data memory-mapped, or spa's own arrays) instead of inside the serialized model.
# onnxruntime copies every initializer of a model it is given as bytes, and prepacks MatMul
# weights into another copy: a 623 MB LLaMA-shaped decoder peaked at 4.2x its size in the
# statistics session alone. Fed, its weights are never copied (benchmarks/big_model.py); what
# changes is that onnxruntime no longer sees them as constants (no prepacking, no fusion that
# needs a constant weight), which is why smaller models keep the session users make. Above it
# the oracle's check that the pruned model loads with the users' default options runs fed too,
# so an optimizer failure that needs constant weights would not show there.
FED_ABOVE = 64 << 20
# ... and these initializers are fed: floats of at least this many bytes (shapes, axes and
# quantized weights stay constants, which some kernels require).
_FED_MIN_BYTES = 4096
_FED_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE}


def session(model: onnx.ModelProto, threads: int = 0, optimize: bool = True, timed: bool = False,
            defaults: bool = False, outputs: tuple[str, ...] = ()):
    """A CPU session: optimized (all of onnxruntime's graph optimizations, the basic ones above
    ``LARGE_GRAPH_NODES`` nodes unless ``defaults``: a user's session, whatever the size) or not.
    With ``outputs``, it returns those tensors instead of the model's outputs and runs only the
    nodes they need (onnxruntime runs every node whatever a run fetches: a decoder's statistics
    would pay for the LM head). Building it and (unless ``timed``: a worker's handoff would be
    timed too) its runs can be stopped by a signal (spa.stop). A model with more than
    ``FED_ABOVE`` bytes of weights gets them fed as inputs unless ``timed``."""
    import onnxruntime as ort
    threads = threads or THREADS
    fed = {} if timed else _fed_weights(model)
    model = _structure(model, fed, outputs) if fed or outputs else materialized(model)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    if not optimize:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    elif not (defaults or timed) and len(model.graph.node) > LARGE_GRAPH_NODES:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    if threads:
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
    if timed:
        return interruptible(ort.InferenceSession, model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    if fed:
        so.add_session_config_entry("session.disable_prepacking", "1")   # a packed copy of each fed weight
    made = interruptible(_session_class(), model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    made.fed = fed
    return made


@functools.cache
def _session_class():
    """onnxruntime's session, its runs interruptible (spa.stop): building one and running it
    are the long C calls of a run. Fed weights (``fed``: name -> array) join every run's feed
    and are not among its inputs."""
    import onnxruntime as ort

    class Session(ort.InferenceSession):
        fed: dict = {}

        def run(self, output_names, input_feed, *args, **kwargs):
            if self.fed:
                check_mapped()
            return interruptible(super().run, output_names, {**input_feed, **self.fed}, *args, **kwargs)

        def get_inputs(self):
            return [i for i in super().get_inputs() if i.name not in self.fed]

    return Session


def _feedable(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for t in model.graph.initializer if t.data_type in _FED_TYPES and tensor_bytes(t) >= _FED_MIN_BYTES]


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the float weights a session of ``model`` would be fed (``FED_ABOVE``)."""
    return sum(tensor_bytes(t) for t in _feedable(model))


def _fed_weights(model: onnx.ModelProto) -> dict:
    """The initializers a session of ``model`` is fed (name -> array), or none below ``FED_ABOVE``."""
    big = _feedable(model)
    if sum(tensor_bytes(t) for t in big) <= FED_ABOVE:
        return {}
    listed = {i.name for i in model.graph.input}   # below IR 4 an initializer is also an input
    return {t.name: weight_view(t) for t in big if t.name not in listed}


def _structure(model: onnx.ModelProto, fed: dict, outputs) -> onnx.ModelProto:
    """``model`` without the bytes of ``fed`` (typed graph inputs instead); with ``outputs``,
    returning just those, through the nodes they need."""
    from .loading.model import add_typed_input, copy_fields
    m = onnx.ModelProto()
    copy_fields(model, m, skip={"graph"})
    copy_fields(model.graph, m.graph, skip={"initializer"} | ({"node", "output"} if outputs else set()))
    if outputs:
        m.graph.node.extend(_needed(model.graph, outputs))
        m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in dict.fromkeys(outputs))
    for t in model.graph.initializer:
        if t.name not in fed:
            m.graph.initializer.append(t)
            continue
        add_typed_input(m.graph, t)
    m.ir_version = max(m.ir_version, 4)
    return materialized(m)


def _needed(graph: onnx.GraphProto, outputs) -> list[onnx.NodeProto]:
    """The nodes ``outputs`` depend on, in the graph's order."""
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    keep, stack = set(), [t for t in outputs if t in producer]
    while stack:
        i = producer[stack.pop()]
        if i in keep:
            continue
        keep.add(i)
        stack.extend(t for t in node_reads(graph.node[i]) if t in producer)
    return [n for i, n in enumerate(graph.node) if i in keep]


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Every name a node reads, its subgraphs' too (their own names among them: harmless here)."""
    names = set(node.input)
    for a in node.attribute:
        for body in ([a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs)):
            for n in body.node:
                names |= node_reads(n)
            names.update(o.name for o in body.output)
    return names


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
