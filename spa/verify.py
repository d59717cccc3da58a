"""Checks on a pruned model: valid ONNX, same signature, and the equivalence oracle.

Removing a channel is the same function as zeroing it wherever it is summed away (every
contraction recorded by the rules), so ``pruned(x) == masked_original(x)`` for any x.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .errors import UnsupportedModelError, VerificationError
from .model import _weightless, tensor_array, tensor_names, unique_name
from .plan import Plan
from .rewrite import apply_updates
from .runtime import any_session, default_session, session
from .shapes import infer_skeleton, random_inputs

__all__ = ["masked_model", "mask_contractions", "check_signature", "check_valid", "check_shapes", "oracle",
           "output_error", "OracleResult", "float_tolerance", "rounding_ok", "output_steps"]


@dataclass
class OracleResult:
    """``noise``: the largest rewrite noise credited (relative to the output's scale, see
    ``float_tolerance``), None where no float output needed it; ``rounded``: elements of
    quantized outputs off by whole steps (see ``rounding_ok``) and ``rounded_noise``: how many
    the masked original's own two runs differ in, both over all samples."""
    max_abs: float
    max_rel: float
    ok: bool
    samples: int
    noise: float | None = None
    rounded: int = 0
    rounded_noise: int = 0

    def as_dict(self):
        return {"max_abs_error": self.max_abs, "max_rel_error": self.max_rel, "ok": self.ok,
                "samples": self.samples, "noise": self.noise, "rounded": self.rounded,
                "rounded_noise": self.rounded_noise}

    def describe(self) -> str:
        """The numbers for a failure message."""
        extra = f", onnxruntime's own rewrite noise {self.noise:.3g}" if self.noise is not None else ""
        if self.rounded:
            extra += (f", {self.rounded} quantized elements off by whole steps where onnxruntime's "
                      f"own kernels flip {self.rounded_noise}")
        return f"max abs error {self.max_abs:.3g}, relative {self.max_rel:.3g}{extra}"


def _insert_before(model: onnx.ModelProto, at: dict, insert):
    """For each node named in ``at`` (name -> entries, each naming an input index first),
    ``insert(node, entry, taken)`` returns a node (or a list of nodes, the last one's output
    the result) computing a replacement for that input, placed just before the node, which
    then reads it instead. In place."""
    taken = tensor_names(model)
    new_nodes = []
    for node in model.graph.node:
        for entry in at.get(node.name, ()):
            made = insert(node, entry, taken)
            if made is not None:
                made = made if isinstance(made, list) else [made]
                new_nodes.extend(made)
                node.input[entry[0]] = made[-1].output[0]
        new_nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(new_nodes)


def _by_node(contractions) -> dict:
    at: dict = {}
    for node_name, *rest in contractions:
        at.setdefault(node_name, []).append(tuple(rest))
    return at


def mask_contractions(model: onnx.ModelProto, contractions, shapes, mask_of, as_inputs: bool = False):
    """A copy of ``model`` with a mask multiplied in wherever an axis is contracted
    (``contractions``: (node name, input index, axis), as the rules record them) and
    ``mask_of((tensor, axis))`` gives one (a 1-D array; None leaves the axis alone). The masks
    are initializers, or graph inputs with ``as_inputs`` (fed at run time, the given array
    being their neutral value). Returns the model and, per masked space, its masks as
    ``(name, broadcast shape, dtype)``."""
    masked = onnx.ModelProto()
    masked.CopyFrom(model)
    masks: dict = {}

    def insert(node, entry, taken):
        k, axis = entry
        tensor = node.input[k]
        if tensor not in shapes.shape:
            return None
        dtype = helper.tensor_dtype_to_np_dtype(shapes.dtype.get(tensor, onnx.TensorProto.FLOAT))
        values = mask_of((tensor, axis))
        if values is None:
            return None
        bshape = [1] * len(shapes.shape[tensor])
        bshape[axis] = shapes.shape[tensor][axis]
        name = unique_name(f"{node.name}__spa_mask{k}_{axis}", taken)
        if as_inputs:
            masked.graph.input.append(helper.make_tensor_value_info(
                name, helper.np_dtype_to_tensor_dtype(np.dtype(dtype)), bshape))
        else:
            masked.graph.initializer.append(numpy_helper.from_array(np.asarray(values, dtype).reshape(bshape), name))
        masks.setdefault((tensor, axis), []).append((name, bshape, dtype))
        out = unique_name(name + "_out", taken)
        return helper.make_node("Mul", [tensor, name], [out], name=out)

    _insert_before(masked, _by_node(contractions), insert)
    return masked, masks


def masked_model(model: onnx.ModelProto, plan: Plan, shapes) -> onnx.ModelProto:
    """The interpreter of a plan for the oracle: the original with the plan's weight updates,
    and every channel the plan removes zeroed where it is contracted (set to the zero point
    where the summed input holds integers)."""
    def mask_of(space):
        kept = plan.kept_of(space)
        if kept is None:
            return None
        mask = np.zeros(plan.sizes[space])
        mask[kept] = 1
        return mask
    masked = mask_contractions(apply_updates(model, plan), plan.contractions, shapes, mask_of)[0]

    def to_zero_point(node, entry, taken):   # Where(kept, x, zero point)
        k, axis, zp, zp_axes = entry
        tensor = node.input[k]
        keep = mask_of((tensor, axis)).astype(bool)
        rank = len(shapes.shape[tensor])
        shape = [1] * rank
        shape[axis] = len(keep)
        cond = unique_name(f"{node.name}__spa_keep{k}", taken)
        masked.graph.initializer.append(numpy_helper.from_array(keep.reshape(shape), cond))
        made = []
        if zp < len(node.input) and node.input[zp] and zp_axes is not None:
            # the zero point's axes lie along zp_axes of the input: reshape it to broadcast there
            zero = unique_name(f"{node.name}__spa_zero{k}", taken)
            target = [1] * rank
            for i, a in enumerate(zp_axes):
                target[a] = shapes.shape[node.input[zp]][i]
            shape_name = unique_name(f"{zero}_shape", taken)
            masked.graph.initializer.append(numpy_helper.from_array(np.array(target, np.int64), shape_name))
            made.append(helper.make_node("Reshape", [node.input[zp], shape_name], [zero], name=zero))
        elif zp < len(node.input) and node.input[zp]:
            zero = node.input[zp]
        else:   # no zero point input: it is 0
            dtype = helper.tensor_dtype_to_np_dtype(shapes.dtype.get(tensor, onnx.TensorProto.UINT8))
            zero = unique_name(f"{node.name}__spa_zero{k}", taken)
            masked.graph.initializer.append(numpy_helper.from_array(np.zeros((), dtype), zero))
        out = unique_name(f"{cond}_out", taken)
        return made + [helper.make_node("Where", [cond, tensor, zero], [out], name=out)]

    _insert_before(masked, _by_node(plan.integer_contractions), to_zero_point)
    return masked


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
MASKED_NOISE_RTOL = 1e-2
# Quantized graphs round to steps, and rounding is chaotic: a float difference of 1e-7 before
# a QuantizeLinear moves an element that sat on a rounding boundary by a whole step, and the
# layers after it spread that step. ResNet-18 through quantize_static (QDQ, per channel, output
# step 0.0425 on logits within +-0.85), pruned by 0.3: 141 and 148 of the 1000 logits of the two
# samples one step off, none more (by 0.5: 120 in all). The masked original itself, run by onnxruntime with its
# default (integer) kernels and unoptimized, differs in 132 and 156, each one step; its inputs
# times 1 + 1e-6 flip 142 and 159. A wrong pruning (the original unmasked) moves 987 by up to
# 129 steps. So on an output made by a DequantizeLinear with a known scale, elements off by at
# most one step (or the most steps the masked original's two runs differ by) are rounding while
# there are no more than QDQ_NOISE_FACTOR times as many as those two runs differ in, or
# QDQ_SHARE of the output (at least one element) where they differ in fewer.
QDQ_SHARE = 0.01
QDQ_NOISE_FACTOR = 2.0
# and never more than this many steps or this share of an output, whatever onnxruntime's own
# runs disagree by (ResNet-18 QDQ: one step, 14 % of the logits)
QDQ_MAX_STEPS = 2
QDQ_MAX_SHARE = 0.3


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


def rounding_ok(got: np.ndarray, want: np.ndarray, step, tol: float, noise_count: int = 0,
                noise_steps: int = 1) -> tuple[bool, int]:
    """Whether the elements of ``got`` beyond ``tol`` of ``want`` are rounding: each at most
    ``max(1, noise_steps)`` quantization ``step``s (a scalar, or an array broadcasting to the
    output) off, and no more of them than ``QDQ_NOISE_FACTOR * noise_count`` (the elements the
    masked original's own two runs differ in) or ``QDQ_SHARE`` of the output (at least one).
    Returns that and how many are off.

    >>> rounding_ok(np.array([0.0, 1.0, 2.0]), np.array([0.0, 1.5, 2.0]), 0.5, 1e-6)
    (True, 1)
    >>> rounding_ok(np.array([0.0, 1.0, 2.0]), np.array([0.0, 2.0, 2.0]), 0.5, 1e-6)[0]
    False
    """
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    off = diff > tol
    n = int(off.sum())
    if not n:
        return True, 0
    # whole steps, as the DequantizeLinear computes them in float32 on either side
    steps = min(max(1, noise_steps), QDQ_MAX_STEPS)
    limit = np.broadcast_to(steps * np.abs(np.asarray(step, np.float64)) * (1 + 1e-5) + tol, diff.shape)
    allowed = min(max(1, int(QDQ_SHARE * diff.size), int(QDQ_NOISE_FACTOR * noise_count)),
                  max(1, int(QDQ_MAX_SHARE * diff.size)))
    return bool(np.all(diff[off] <= limit[off]) and n <= allowed), n


def _steps_apart(a: np.ndarray, b: np.ndarray, step, tol: float) -> tuple[int, int]:
    """How many elements of two runs of a quantized output differ (beyond ``tol``), and by
    how many ``step``s at most."""
    diff = np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))
    diff = np.where(np.isfinite(diff), diff, 0.0)
    off = diff > tol
    if not off.any():
        return 0, 0
    return int(off.sum()), int(np.ceil(np.max((diff / np.abs(np.asarray(step, np.float64)))[off]) - 1e-3))


# ops that move elements without changing them, between a DequantizeLinear and a graph output
_LAYOUT = {"Reshape", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Transpose"}


def output_steps(model: onnx.ModelProto) -> dict:
    """Graph output -> the quantization step of the DequantizeLinear that makes it (through
    layout ops only): a float for a per-tensor scale, an array broadcasting to the output for a
    per-axis one read directly. Outputs computed further (a Softmax after the
    DequantizeLinear) or with scales that are not initializers have none."""
    producer = {o: n for n in model.graph.node for o in n.output}
    inits = {t.name: t for t in model.graph.initializer}
    steps = {}
    for out in model.graph.output:
        name, moved = out.name, False
        node = producer.get(name)
        while node is not None and node.op_type in _LAYOUT:
            name, moved = node.input[0], True
            node = producer.get(name)
        if node is None or node.op_type != "DequantizeLinear" or node.input[1] not in inits:
            continue
        scale = tensor_array(inits[node.input[1]]).astype(np.float64)
        if scale.size == 1:
            steps[out.name] = float(scale.reshape(()))
        elif not moved and out.type.tensor_type.shape.dim:     # a per-axis step needs the output's rank
            rank = len(out.type.tensor_type.shape.dim)
            axis = next((a.i for a in node.attribute if a.name == "axis"), 1) % max(rank, 1)
            steps[out.name] = scale.reshape([-1 if d == axis else 1 for d in range(rank)])
    return steps


def _has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


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


def oracle(pruned: onnx.ModelProto, masked: onnx.ModelProto, input_shapes: dict | list[dict],
           original: onnx.ModelProto | None = None, samples: int = 2, seed: int = 0,
           rtol: float = RTOL, atol: float = ATOL) -> OracleResult:
    """Run both models on the same random inputs; errors are relative to the output scale.

    The pruned model must load with default options (see ``default_session``). A list of
    input shapes runs ``samples`` times at the first and once at each other (a second probe
    size for symbolic dims spa chose): a failure there raises, naming those sizes.
    An output beyond ``atol + rtol * scale`` may still pass by what is not pruning's fault:
    float outputs by onnxruntime's measured rewrite noise (``float_tolerance``), outputs of a
    quantized graph's final DequantizeLinear by rounding (``rounding_ok``)."""
    runs = [input_shapes] if isinstance(input_shapes, dict) else list(input_shapes)
    s_pruned = default_session(pruned, original if original is not None else masked)
    qdq = _has_qdq(pruned)
    s_masked = None if qdq else any_session(masked)
    steps = {}
    if qdq:
        # onnxruntime's optimizer turns DequantizeLinear -> Conv -> QuantizeLinear into integer
        # kernels, which round otherwise; the masks the oracle inserts break that pattern in the
        # masked original only. Compare both as the graphs say, unfused; the pruned model must
        # still load by default (above). Both unfused, no float rewrite noise is credited; the
        # fused kernels' rounding is, on outputs of a DequantizeLinear (below).
        s_pruned, s_masked = session(pruned, optimize=False), session(masked, optimize=False)
        steps = output_steps(masked)
    plain_pruned, plain_masked = _lazy_runs(pruned, optimize=False), _lazy_runs(masked, optimize=False)
    fused_masked = _lazy_runs(masked, optimize=True)
    names = [o.name for o in s_masked.get_outputs()]
    rng = np.random.default_rng(seed)
    max_abs = max_rel = 0.0
    noise = None
    rounded = rounded_noise = 0
    ok = True
    if _has_16bit_floats(pruned):
        rtol, atol = max(rtol, RTOL_16BIT), max(atol, ATOL_16BIT)
    for i, shapes in [(i, s) for i, s in enumerate(runs) for _ in range(samples if i == 0 else 1)]:
        if i and not ok:
            break  # already differs at the first shapes
        where = "" if not i else " at the second probe " + ", ".join(dict.fromkeys(
            f"{d.dim_param or f'{vi.name}[{a}]'}={n} (analyzed at {runs[0][vi.name][a]})"
            for vi in pruned.graph.input if vi.name in shapes
            for a, (d, n) in enumerate(zip(vi.type.tensor_type.shape.dim, shapes[vi.name]))
            if n != runs[0][vi.name][a]))
        feeds = random_inputs(pruned, shapes, rng)
        try:
            got = s_pruned.run(None, feeds)
        except Exception as e:
            raise VerificationError(f"onnxruntime fails on the pruned model{where}: "
                                    f"{str(e).splitlines()[0][:300]}") from None
        want = s_masked.run(None, feeds)
        unoptimized = fused = None
        for j, (g, w) in enumerate(zip(got, want)):
            if g.shape != w.shape:
                raise VerificationError(f"pruned output shape {g.shape} differs from {w.shape}{where}")
            if g.dtype.kind not in "fc":
                ok &= bool(np.array_equal(g, w))
                continue
            g64, w64 = g.astype(np.float64), w.astype(np.float64)
            if np.isnan(g64).any() or np.isnan(w64).any():
                raise VerificationError(_non_finite_message(original if original is not None else masked))
            finite = np.isfinite(w64)
            if not finite.all():  # infinities (masked logits) must sit where they were
                ok &= bool(np.array_equal(g64[~finite], w64[~finite]))
                g64, w64 = np.where(finite, g64, 0.0), np.where(finite, w64, 0.0)
            err = float(np.max(np.abs(g64 - w64))) if g.size else 0.0
            scale = float(np.max(np.abs(w64))) if w.size else 0.0
            max_abs = max(max_abs, err)
            max_rel = max(max_rel, err / scale if scale > 0 else err)
            tol = atol + rtol * scale
            if err <= tol:
                continue
            if not qdq:   # float noise: how far onnxruntime's rewrites move each model
                if unoptimized is None:
                    unoptimized = plain_pruned(feeds), plain_masked(feeds)
                p_u, m_u = unoptimized
                of_masked = _gap(w, m_u[j]) if m_u is not None else 0.0
                of_pruned = _gap(g, p_u[j]) if p_u is not None else 0.0
                credited = credited_noise(scale, of_masked, of_pruned)
                noise = max(noise or 0.0, credited / scale if scale > 0 else credited)
                ok &= err <= float_tolerance(scale, of_masked, of_pruned, rtol, atol)
            elif names[j] in steps:  # quantized output: steps as many as onnxruntime's own kernels flip
                if fused is None:
                    fused = fused_masked(feeds) or []
                count, most = _steps_apart(fused[j], w, steps[names[j]], tol) if fused else (0, 0)
                rounded_noise += count
                fine, n = rounding_ok(g64, w64, steps[names[j]], tol, count, most)
                rounded += n
                ok &= fine
            else:
                ok = False
        if i and not ok:
            result = OracleResult(max_abs, max_rel, ok, samples, noise, rounded, rounded_noise)
            raise VerificationError(f"pruned model differs from the masked original{where} "
                                    f"({result.describe()}): a size fixed for the first probe")
    return OracleResult(max_abs, max_rel, ok, samples, noise, rounded, rounded_noise)


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
