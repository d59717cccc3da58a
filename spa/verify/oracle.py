"""Checks on a pruned model: valid ONNX, same signature, and the equivalence oracle.

Removing a channel is the same function as zeroing it wherever it is summed away (every
contraction recorded by the rules), so ``pruned(x) == masked_original(x)`` for any x
(``spa.verify.masked``), up to float rounding: judged relative to each output's scale, or where an
elementwise tail (a Sigmoid) hides that scale, by what the tail reads; quantized graphs through
their float twins and then by whole rounding steps (``spa.verify.rounding``).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx

from ..errors import UnsupportedModelError, VerificationError
from .integer_kernels import unsaturated
from ..loading.model import _weightless, tensor_array
from .masked import mask_contractions, masked_model
from .tails import fetched_name, pre_activation, readable, with_outputs
from .rounding import (QDQ_MAX_SHARE, QDQ_MAX_STEPS, QDQ_NOISE_FACTOR, QDQ_SHARE, float_twin, has_qdq,
                       output_steps, rounding_ok, steps_apart)
from ..runtime import any_session, default_session, session
from ..score.blocks import PartwiseSession, in_parts
from ..loading.shapes import branch_values, compared_values, infer_skeleton, random_inputs

__all__ = ["masked_model", "mask_contractions", "check_signature", "check_valid", "check_shapes", "oracle",
           "output_error", "OracleResult", "describe", "float_tolerance", "rounding_ok", "output_steps",
           "float_twin", "pre_activation", "QDQ_SHARE", "QDQ_NOISE_FACTOR", "QDQ_MAX_STEPS", "QDQ_MAX_SHARE"]


@dataclass
class OracleResult:
    """``noise``: the largest rewrite noise credited (relative to the output's scale, see
    ``float_tolerance``), None where no float output needed it; ``rounded``: elements of
    quantized outputs off by whole steps (see ``rounding_ok``) and ``rounded_noise``: how many
    the masked original's own two runs differ in, both over all samples; ``twin``: for a
    quantized graph, the relative error of its float twin (``float_twin``), None where it has
    none, and ``twin_ok``: whether the twins agreed (the numbers above are the twins' where they
    did not); ``upstream``: outputs judged by the tensor their elementwise tail reads
    (``pre_activation``) -> that tensor."""
    max_abs: float
    max_rel: float
    ok: bool
    samples: int
    noise: float | None = None
    rounded: int = 0
    rounded_noise: int = 0
    twin: float | None = None
    twin_ok: bool | None = None
    upstream: dict = field(default_factory=dict)
    branches: dict = field(default_factory=dict)   # input -> the further values it was fed (each If side)
    branches_skipped: dict = field(default_factory=dict)   # input -> {value: why the masked original failed}

    def as_dict(self):
        return {"max_abs_error": self.max_abs, "max_rel_error": self.max_rel, "ok": self.ok,
                "samples": self.samples, "noise": self.noise, "rounded": self.rounded,
                "rounded_noise": self.rounded_noise, "twin_max_rel_error": self.twin, "twin_ok": self.twin_ok,
                "judged_upstream": dict(self.upstream),
                **({"branch_values": dict(self.branches)} if self.branches else {}),
                **({"branch_values_skipped": dict(self.branches_skipped)} if self.branches_skipped else {})}

    def describe(self) -> str:
        """The numbers for a failure message."""
        return describe(self.as_dict())


def describe(verify: dict) -> str:
    """An oracle's numbers (``OracleResult.as_dict``, or a report's ``verify``) in words."""
    v = verify
    text = f"max abs error {v['max_abs_error']:.3g}, relative {v['max_rel_error']:.3g}"
    if v.get("twin_ok") is False:
        return f"float twins (activation quantization taken out): {text}"
    if v.get("noise") is not None:
        text += f", onnxruntime's own rewrite noise {v['noise']:.2g}"
    if v.get("judged_upstream"):
        text += ", " + ", ".join(f"{o!r} judged by {t!r}, the tensor its elementwise tail reads"
                                 for o, t in v["judged_upstream"].items())
    if v.get("twin_max_rel_error") is not None:
        text += f", float twin (activation quantization taken out) relative {v['twin_max_rel_error']:.3g}"
    if v.get("rounded"):
        text += f", {v['rounded']} quantized elements off by whole steps"
        if v.get("twin_max_rel_error") is None:
            text += f" where onnxruntime's own kernels flip {v.get('rounded_noise', 0)}"
    if v.get("branch_values"):
        text += "; also fed " + ", ".join(f"{name}={'/'.join(str(x) for x in values)}"
                                          for name, values in v["branch_values"].items())
        text += " (the other side of the comparisons that choose If branches)"
    if v.get("branch_values_skipped"):
        text += "; the original itself fails with " + ", ".join(
            f"{name}={value} {why.split(':')[0]}" for name, values in v["branch_values_skipped"].items()
            for value, why in values.items())
    return text


def _signature(model):
    def sig(vis):
        return [(v.name, v.type.tensor_type.elem_type,
                 tuple(d.dim_value if d.HasField("dim_value") else d.dim_param
                       for d in v.type.tensor_type.shape.dim)) for v in vis]
    inits = {t.name for t in model.graph.initializer}
    return sig([i for i in model.graph.input if i.name not in inits]), sig(model.graph.output)


def check_signature(original: onnx.ModelProto, pruned: onnx.ModelProto):
    if _signature(original) != _signature(pruned):
        raise VerificationError("pruned model's inputs/outputs differ from the original's")


def check_valid(pruned: onnx.ModelProto, original: onnx.ModelProto | None = None):
    """onnx.checker with strict shape inference, on the structure (weights stay where they
    are: external ones hold resolved paths that the checker would reject). Where the
    original fails it too, the model's own declarations are at fault, not the pruning."""
    try:
        onnx.checker.check_model(_weightless(pruned), full_check=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if original is not None:
            try:
                onnx.checker.check_model(_weightless(original), full_check=True)
            except Exception as o:
                if (first.startswith("No Op registered for") or
                        first.startswith("Op registered for") and "is deprecated" in first) and \
                        str(o).strip().startswith(first):
                    # an onnxruntime op in the default domain (SimplifiedLayerNormalization) or
                    # one the checker calls deprecated (GroupNormalization-18): the checker
                    # cannot judge the graph, onnxruntime (the oracle) does
                    return
                raise UnsupportedModelError(f"the model's declared shapes are inconsistent ({first[:300]}); "
                                            "fix its input/output declarations") from None
        raise VerificationError(f"pruned model fails onnx.checker: {first}") from None


def check_shapes(original: onnx.ModelProto, pruned: onnx.ModelProto, input_shapes: dict):
    """Cheap structural check that runs even without --verify: strict ONNX shape inference
    of the pruned model (weights left out), where the original passes it too."""
    def strict(model):
        skeleton = _weightless(model)
        # the pruned model carries no value_info (stale shapes): judge the original on the
        # same footing, or an op onnx cannot infer (GroupNormalization-21) fails only there
        del skeleton.graph.value_info[:]
        for inp in skeleton.graph.input:
            if inp.name in input_shapes:
                for d, v in zip(inp.type.tensor_type.shape.dim, input_shapes[inp.name]):
                    d.Clear()
                    d.dim_value = v
        infer_skeleton(skeleton, strict=True)

    try:
        strict(pruned)
    except Exception as e:
        try:
            strict(original)
        except Exception:
            return  # inference cannot judge this graph (custom ops...): the oracle must
        first = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
        raise VerificationError(f"pruned model has inconsistent shapes ({first}); please report this model") from None


# The oracle's tolerance: an output passes when max |pruned - masked| <= ATOL + RTOL * max |masked|.
# Measured by benchmarks/oracle_tolerance.py over 562 correct float32 prunings (the rule and
# property tests, exported transformers, the cached zoo models, the results of the torchvision
# sweep's 126 exports): relative error max 2.9e-6, p99 1.7e-6, median 0 (about 24 float32
# epsilons at worst: summation order, onnxruntime fusing the two graphs differently). A wrong
# rule leaves more: LRN (default alpha) treated as per-channel 6.4e-4, Softmax 1.0. RTOL = 1e-4
# passes the worst correct pruning with 35x margin and fails an error of 1e-3 (or the LRN rule)
# by 6x or more; it was 1e-3, which let the LRN rule through.
# The error stays relative however small the outputs are (randomly initialized EfficientNet-B0
# outputs ~3e-14, MobileNet-V3 ~7e-10, with relative errors under 1e-6), so the absolute floor is
# only for outputs that are all zero: float32's smallest normal number. It was 1e-5, under which
# the oracle accepted anything from such models.
RTOL = 1e-4
ATOL = float(np.finfo(np.float32).tiny)
# Models holding float16/bfloat16 tensors round ~1000x coarser: the former tolerance, unmeasured.
RTOL_16BIT = 1e-3
ATOL_16BIT = 1e-5

# Noise that is not pruning's fault, measured rather than guessed. RTOL holds where float
# rounding stays near the output's own scale. It does not where the outputs are far smaller
# than what the graph computed on the way: onnxruntime's Sigmoid resolves its tail only to
# 2**-24 = 6e-8 absolute, the spacing of floats at 0.5 (PP-OCRv5's outputs are multiples of it),
# so a logit rounded 1e-6 differently flips some tail outputs by one such step. Measured on the
# PP-OCRv5 text detector (output max ~5e-5) pruned by 0.3: pruned vs masked original 1.8e-7 =
# 3.6e-3 of the output's scale, and the masked original with onnxruntime's default
# optimizations vs without them differs by the same 3.6e-3 (at 320x320 by 0.5: 2.3e-4 vs
# 2.6e-4). Silero VAD (output ~4e-4) at 512 samples by 0.3: 1.6e-4, where the masks keep
# onnxruntime from fusing the masked original (0 between its two runs) but not the pruned model
# (1.6e-4 between its two runs, 0 between both models unoptimized).
# So where an output fails RTOL the oracle measures, on the same inputs, how far onnxruntime's
# own graph rewrites move each model: noise = max |default - unoptimized| of the masked
# original, and of the pruned model (credited up to REWRITE_RTOL of the scale: a rewrite that
# moves the pruned model further is broken, not noisy), and allows NOISE_FACTOR times it. A
# wrong pruning changes what both runs of the pruned model compute, not the gap between them,
# so it still fails once it exceeds the float noise of the function itself. Error/noise seen:
# 1.0 at most on the files above, 0.5 to 0.83 over ten seeds of the hand-built sigmoid tail in
# tests/test_oracle.py; NOISE_FACTOR leaves 4x to that. What it costs: there, a wrong logit of
# 0.01 (1 % of the outputs) passes; a wrong channel (>10x the bound) or 0.03 fails.
NOISE_FACTOR = 4.0
REWRITE_RTOL = 1e-3
# The masked original's own noise is credited up to 1 % of the scale (PP-OCRv5's was 0.36 %):
# a threshold, Floor or Where flipping one element between its two runs would otherwise
# excuse errors as large as the output itself (review: a wrong channel passed that way).
# That cap, like RTOL, follows the output's scale, which says nothing where the output is a few
# of the Sigmoid's 3e-8 steps: PP-OCRv4's detector pruned to half its MACs has every output under
# 2e-7 and a correct pruning off by 8.9e-8 (issue 20). Such an output is judged by the tensor its
# elementwise tail reads (``pre_activation``), which keeps its scale, the tails being the same.
MASKED_NOISE_RTOL = 1e-2


def float_tolerance(scale: float, noise_masked: float = 0.0, noise_pruned: float = 0.0,
                    rtol: float = RTOL, atol: float = ATOL) -> float:
    """How far (max abs) a float output of the pruned model may be from the masked original's:
    ``atol + rtol * scale`` plus ``NOISE_FACTOR`` times the measured rewrite noise, the
    pruned model's own counting at most ``REWRITE_RTOL * scale``.

    >>> float_tolerance(1.0) == ATOL + RTOL
    True
    >>> float_tolerance(1.0, noise_pruned=1.0) == ATOL + RTOL + NOISE_FACTOR * REWRITE_RTOL
    True
    """
    return atol + rtol * scale + NOISE_FACTOR * credited_noise(scale, noise_masked, noise_pruned)


def credited_noise(scale: float, noise_masked: float, noise_pruned: float) -> float:
    """The rewrite noise the oracle allows for: each model's capped (``MASKED_NOISE_RTOL``,
    ``REWRITE_RTOL`` of the scale), so that one element a threshold flips between two runs of
    the masked original cannot excuse a wrong pruning of the whole output."""
    return max(min(noise_masked, MASKED_NOISE_RTOL * scale), min(noise_pruned, REWRITE_RTOL * scale))


def _has_16bit_floats(model: onnx.ModelProto) -> bool:
    low = (onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    g = model.graph
    return (any(t.data_type in low for t in g.initializer)
            or any(v.type.tensor_type.elem_type in low for v in [*g.input, *g.output, *g.value_info])
            or any(a.name == "to" and a.i in low for n in g.node if n.op_type == "Cast" for a in n.attribute))


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| where both are finite (0 for none)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    both = np.isfinite(a) & np.isfinite(b)
    return float(np.max(np.abs(a - b)[both])) if both.any() else 0.0


def _lazy_runs(model: onnx.ModelProto, optimize: bool):
    """``run(feeds)`` -> the model's outputs in a session with (onnxruntime's defaults) or
    without graph optimizations, made on first use: only where an output fails the plain
    tolerance. None where onnxruntime cannot run it so; then no noise is credited for it."""
    made: list = []

    def run(feeds):
        if not made:
            try:
                made.append(session(model, optimize=optimize, defaults=True))
            except Exception:
                made.append(None)
        if made[0] is None:
            return None
        try:
            return made[0].run(None, feeds)
        except Exception:
            return None

    return run


@dataclass
class _Pair:
    """The two models the oracle compares and how it runs them. ``steps``: for quantized graphs,
    output -> its quantization step (``output_steps``), None for float graphs; ``twin_agrees``:
    their float twins agreed, so whatever else differs is rounding."""
    pruned: onnx.ModelProto
    masked: onnx.ModelProto
    run_pruned: object
    run_masked: object
    names: list
    original: onnx.ModelProto | None = None
    steps: dict | None = None
    twin_agrees: bool = False
    _upstream: dict | None = field(default=None, init=False, repr=False)

    def upstream(self) -> dict:
        """Output -> the pre-activation both models read through the same tail."""
        if self._upstream is None:
            pairs = {o: (pre_activation(self.pruned, o), pre_activation(self.masked, o)) for o in self.names}
            self._upstream = {o: p[0] for o, (p, m) in pairs.items() if p is not None and p == m}
        return self._upstream

    def variants(self) -> dict:
        """Further runs, each ``feeds -> outputs`` (None where onnxruntime cannot run it), each
        model made and loaded on first use only."""
        return {"pruned plain": _lazy_runs(self.pruned, optimize=False),
                "masked plain": _lazy_runs(self.masked, optimize=False),
                "masked fused": _lazy_runs(self.masked, optimize=True),
                "upstream": self._upstream_runs()}

    def _upstream_runs(self):
        """``feeds`` -> {pre-activation: (the pruned model's values, the masked original's)}."""
        made: dict = {}

        def run(feeds):
            if not made:
                made["names"] = sorted(set(self.upstream().values()), key=str)
                both = [with_outputs(m, made["names"]) for m in (self.pruned, self.masked)]
                made["order"] = [o.name for o in both[0].graph.output]
                made["runs"] = [_lazy_runs(m, optimize=True) for m in both] if made["names"] else []
            outs = [run(feeds) for run in made["runs"]]
            if not outs or any(o is None for o in outs):
                return None
            got, want = (dict(zip(made["order"], o)) for o in outs)
            return {n: (got[fetched_name(n)], want[fetched_name(n)]) for n in made["names"]}

        return run


class _Sample:
    """One sample's feeds, and what each further run of ``_Pair.variants`` returns on them."""

    def __init__(self, feeds: dict, variants: dict):
        self.feeds, self._variants, self._done = feeds, variants, {}

    def __getitem__(self, key):
        if key not in self._done:
            self._done[key] = self._variants[key](self.feeds)
        return self._done[key]


def _judge(pair: _Pair, sample: _Sample, j: int, g: np.ndarray, w: np.ndarray, rtol: float, atol: float,
           result: OracleResult) -> bool:
    """Whether output ``j`` of the pruned model (``g``) matches the masked original's (``w``)."""
    if g.dtype.kind not in "fc":
        return bool(np.array_equal(g, w))
    g64, w64 = g.astype(np.float64), w.astype(np.float64)
    if np.isnan(g64).any() or np.isnan(w64).any():
        raise VerificationError(_non_finite_message(pair.original if pair.original is not None else pair.masked))
    same_infinities = True
    finite = np.isfinite(w64)
    if not finite.all():  # infinities (masked logits) must sit where they were
        same_infinities = bool(np.array_equal(g64[~finite], w64[~finite]))
        g64, w64 = np.where(finite, g64, 0.0), np.where(finite, w64, 0.0)
    err = float(np.max(np.abs(g64 - w64))) if g.size else 0.0
    scale = float(np.max(np.abs(w64))) if w.size else 0.0
    result.max_abs = max(result.max_abs, err)
    result.max_rel = max(result.max_rel, err / scale if scale > 0 else err)
    tol = atol + rtol * scale
    if err <= tol:
        return same_infinities
    if pair.steps is not None:
        return same_infinities and _rounding(pair, sample, j, g64, w64, tol, result)
    return same_infinities and (_within_noise(sample, j, g, w, err, scale, rtol, atol, result)
                                or _upstream_agrees(pair, sample, j, rtol, atol, result))


def _within_noise(sample: _Sample, j: int, g, w, err: float, scale: float, rtol: float, atol: float,
                  result: OracleResult) -> bool:
    """Float noise: how far onnxruntime's rewrites move each model (``float_tolerance``)."""
    p_u, m_u = sample["pruned plain"], sample["masked plain"]
    of_masked = _gap(w, m_u[j]) if m_u is not None else 0.0
    of_pruned = _gap(g, p_u[j]) if p_u is not None else 0.0
    credited = credited_noise(scale, of_masked, of_pruned)
    result.noise = max(result.noise or 0.0, credited / scale if scale > 0 else credited)
    return err <= float_tolerance(scale, of_masked, of_pruned, rtol, atol)


def _upstream_agrees(pair: _Pair, sample: _Sample, j: int, rtol: float, atol: float,
                     result: OracleResult) -> bool:
    """An output made by the same elementwise tail in both models (``pre_activation``) is
    judged by what that tail reads: the tail adds its own rounding only."""
    pre = pair.upstream().get(pair.names[j])
    values = sample["upstream"] if pre is not None else None
    if values is None:
        return False
    g, w = (np.asarray(v, np.float64) for v in values[pre])
    if g.shape != w.shape or not (np.isfinite(g).all() and np.isfinite(w).all()):
        return False
    agrees = _gap(g, w) <= atol + rtol * (float(np.max(np.abs(w))) if w.size else 0.0)
    if agrees:
        result.upstream[pair.names[j]] = readable(pre)
    return agrees


def _rounding(pair: _Pair, sample: _Sample, j: int, g64, w64, tol: float, result: OracleResult) -> bool:
    """A quantized output: elements off by whole steps (``rounding_ok``), as many as the float
    twins allow (they agreed: every element may be rounding, up to the caps) or as
    onnxruntime's own kernels flip in the masked original."""
    step = pair.steps.get(pair.names[j])
    if step is None:
        return False
    if pair.twin_agrees:
        fine, n = rounding_ok(g64, w64, step, tol, noise_count=g64.size, noise_steps=QDQ_MAX_STEPS)
    else:
        fused = sample["masked fused"]
        count, most = steps_apart(fused[j], w64, step, tol) if fused else (0, 0)
        result.rounded_noise += count
        fine, n = rounding_ok(g64, w64, step, tol, count, most)
    result.rounded += n
    return fine


def _exact_integers(pruned: onnx.ModelProto, masked: onnx.ModelProto, s_pruned, shapes: dict, seed: int):
    """Both models with the int8 weights of onnxruntime's u8s8 integer GEMMs read as uint8
    (``unsaturated``): the same functions, but summed without the int16 saturation of x86
    CPUs without VNNI, which pairs a model's products differently from its masked original's
    and so moves both by up to a few percent. The pruned model as written (``s_pruned``) must
    still run: once, here. Unchanged where there are no such weights or onnxruntime does not
    take their uint8 reading."""
    exact = unsaturated(pruned)
    if exact is None:
        return pruned, masked, s_pruned
    try:
        s_pruned.run(None, random_inputs(pruned, shapes, np.random.default_rng(seed)))
    except Exception as e:
        raise VerificationError(f"onnxruntime fails on the pruned model: {str(e).splitlines()[0][:300]}") from None
    try:
        s_exact = session(exact)
    except Exception:   # onnxruntime does not take the uint8 reading here: compare as written
        return pruned, masked, s_pruned
    return exact, unsaturated(masked) or masked, s_exact


def oracle(pruned: onnx.ModelProto, masked: onnx.ModelProto, input_shapes: dict | list[dict],
           original: onnx.ModelProto | None = None, samples: int = 2, seed: int = 0,
           rtol: float = RTOL, atol: float = ATOL) -> OracleResult:
    """Run both models on the same random inputs; errors are relative to the output scale.

    The pruned model must load with default options (see ``default_session``). A list of
    input shapes runs ``samples`` times at the first and once at each other (a second probe
    size for symbolic dims spa chose): a failure there raises, naming those sizes.
    An output beyond ``atol + rtol * scale`` may still pass by what is not pruning's fault:
    float outputs by onnxruntime's measured rewrite noise (``float_tolerance``) or, made by an
    elementwise tail, by what that tail reads (``pre_activation``); outputs of a quantized
    graph's final DequantizeLinear by rounding (``rounding_ok``), once its float twin agreed."""
    runs = [input_shapes] if isinstance(input_shapes, dict) else list(input_shapes)
    s_pruned = default_session(pruned, original if original is not None else masked)
    pruned, masked, s_pruned = _exact_integers(pruned, masked, s_pruned, runs[0], seed)
    if _has_16bit_floats(pruned):
        rtol, atol = max(rtol, RTOL_16BIT), max(atol, ATOL_16BIT)
    if has_qdq(pruned):
        return _quantized_oracle(pruned, masked, runs, original, samples, seed, rtol, atol)
    s_masked = PartwiseSession(masked) if in_parts(masked) else any_session(masked)
    pair = _Pair(pruned, masked, s_pruned.run, s_masked.run, [o.name for o in masked.graph.output], original)
    return _compare(pair, runs, samples, seed, rtol, atol)


def _quantized_oracle(pruned, masked, runs, original, samples, seed, rtol, atol) -> OracleResult:
    """A quantized graph: its float twin (``float_twin``) first, as a float model; then the
    graphs as written, where only rounding may differ.

    Both as written run unfused: onnxruntime's optimizer turns DequantizeLinear -> Conv ->
    QuantizeLinear into integer kernels, which round otherwise, and the masks the oracle inserts
    break that pattern in the masked original only (the pruned model still has to load with
    default options: ``oracle``)."""
    twins = float_twin(pruned), float_twin(masked)
    twin = None
    if twins[0] is not None and twins[1] is not None:
        try:
            sessions = [any_session(t) for t in twins]
        except UnsupportedModelError:
            sessions = None
        if sessions is not None:
            twin = _compare(_Pair(*twins, sessions[0].run, sessions[1].run,
                                  [o.name for o in sessions[1].get_outputs()], original),
                            runs, samples, seed, rtol, atol)
            twin.twin, twin.twin_ok = twin.max_rel, twin.ok
            if not twin.ok:
                return twin
    s_pruned, s_masked = session(pruned, optimize=False), session(masked, optimize=False)
    pair = _Pair(pruned, masked, s_pruned.run, s_masked.run, [o.name for o in s_masked.get_outputs()], original,
                 steps=output_steps(masked), twin_agrees=twin is not None)
    result = _compare(pair, runs, samples, seed, rtol, atol)
    if twin is not None:
        result.twin, result.twin_ok = twin.max_rel, True
    return result


def _compare(pair: _Pair, runs: list[dict], samples: int, seed: int, rtol: float, atol: float) -> OracleResult:
    """Both models of ``pair`` on ``samples`` random inputs at the first shapes and one at each
    further (a failure there raises, naming the sizes that differ)."""
    result = OracleResult(0.0, 0.0, True, samples)
    rng = np.random.default_rng(seed)
    variants = pair.variants()
    for i, shapes in [(i, s) for i, s in enumerate(runs) for _ in range(samples if i == 0 else 1)]:
        if i and not result.ok:
            break  # already differs at the first shapes
        where = "" if not i else " at the second probe " + ", ".join(dict.fromkeys(
            f"{d.dim_param or f'{vi.name}[{a}]'}={n} (analyzed at {runs[0][vi.name][a]})"
            for vi in pair.pruned.graph.input if vi.name in shapes
            for a, (d, n) in enumerate(zip(vi.type.tensor_type.shape.dim, shapes[vi.name]))
            if n != runs[0][vi.name][a]))
        sample = _Sample(random_inputs(pair.pruned, shapes, rng), variants)
        try:
            got = pair.run_pruned(None, sample.feeds)
        except Exception as e:
            raise VerificationError(f"onnxruntime fails on the pruned model{where}: "
                                    f"{str(e).splitlines()[0][:300]}") from None
        want = pair.run_masked(None, sample.feeds)
        for j, (g, w) in enumerate(zip(got, want)):
            if g.shape != w.shape:
                raise VerificationError(f"pruned output shape {g.shape} differs from {w.shape}{where}")
            result.ok &= _judge(pair, sample, j, g, w, rtol, atol, result)
        if i and not result.ok:
            raise VerificationError(f"pruned model differs from the masked original{where} "
                                    f"({result.describe()}): a size fixed for the first probe")
    for shapes in runs:
        if result.ok:
            _other_branches(pair, shapes, rng, variants, rtol, atol, result)
    return result


def _other_branches(pair: _Pair, shapes: dict, rng, variants, rtol: float, atol: float, result: OracleResult):
    """One more sample per further value of each integer scalar input the graph compares with
    constants (``branch_values``: for ``If(sr == 16000)``, sr=16001 runs the else branch),
    one input at a time, at ``shapes``. A value the masked original does not run at (Silero
    VAD's 8 kHz network at the 16 kHz chunk size) is skipped there and said."""
    defaults = compared_values(pair.masked)
    for name, values in branch_values(pair.masked).items():
        for value in values:
            if value == defaults.get(name):
                continue
            feeds = random_inputs(pair.pruned, shapes, rng)
            feeds[name] = np.full(feeds[name].shape, value, feeds[name].dtype)
            try:
                want = pair.run_masked(None, feeds)
            except Exception as e:   # the model itself does not take this value at these sizes
                at = ", ".join(f"{k}={list(v)}" for k, v in shapes.items() if len(v))
                result.branches_skipped.setdefault(name, {})[value] = f"at {at}: {str(e).splitlines()[0][-160:]}"
                continue
            try:
                got = pair.run_pruned(None, feeds)
            except Exception as e:
                raise VerificationError(f"onnxruntime fails on the pruned model with {name}={value}, where the "
                                        f"masked original runs: {str(e).splitlines()[0][:300]}") from None
            sample = _Sample(feeds, variants)
            for j, (g, w) in enumerate(zip(got, want)):
                if g.shape != w.shape:
                    raise VerificationError(f"pruned output shape {g.shape} differs from {w.shape} with {name}={value}")
                result.ok &= _judge(pair, sample, j, g, w, rtol, atol, result)
            if value not in result.branches.setdefault(name, []):
                result.branches[name].append(value)
            if not result.ok:
                return


def _non_finite_message(model: onnx.ModelProto) -> str:
    for t in model.graph.initializer:
        if t.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                           onnx.TensorProto.BFLOAT16):
            values = tensor_array(t)
            if not np.isfinite(values.astype(np.float32)).all():
                return (f"the model has non-finite weights in {t.name!r}: its outputs are NaN or infinite, so "
                        f"the pruning cannot be verified (--no-verify skips the check)")
    return ("the model's outputs are NaN or infinite on random inputs, so the pruning cannot be verified "
            "(--no-verify skips the check)")


def output_error(reference: onnx.ModelProto, pruned: onnx.ModelProto, input_shapes: dict,
                 samples: int = 2, seed: int = 0) -> dict:
    """How far an inexact pruning moved the outputs: max abs/relative error and the mean
    cosine similarity of each output sample to the reference's."""
    s_new, s_ref = default_session(pruned, reference), any_session(reference)
    rng = np.random.default_rng(seed)
    max_abs = max_rel = 0.0
    cosines = []
    for _ in range(samples):
        feeds = random_inputs(pruned, input_shapes, rng)
        for g, w in zip(s_new.run(None, feeds), s_ref.run(None, feeds)):
            if g.dtype.kind not in "fc" or not g.size:
                continue
            g64, w64 = g.astype(np.float64).reshape(len(g), -1), w.astype(np.float64).reshape(len(w), -1)
            err = float(np.max(np.abs(g64 - w64)))
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / max(float(np.max(np.abs(w64))), 1e-12))
            num = (g64 * w64).sum(1)
            den = np.linalg.norm(g64, axis=1) * np.linalg.norm(w64, axis=1) + 1e-12
            cosines.extend((num / den).tolist())
    return {"exact": False, "max_abs_error": max_abs, "max_rel_error": max_rel,
            "mean_cosine": float(np.mean(cosines)) if cosines else None, "samples": samples,
            "finite": bool(np.isfinite(max_abs))}
