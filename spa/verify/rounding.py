"""What the oracle forgives quantized (QDQ) graphs, and how it checks them without rounding.

Quantized graphs round to steps, and rounding is chaotic: a float difference of 1e-7 before a
QuantizeLinear moves an element that sat on a rounding boundary by a whole step, and the layers
after it spread that step. So the oracle checks a QDQ graph twice (``spa.verify.oracle.oracle``):

1. its *float twin* (``float_twin``: the activations' QuantizeLinear -> DequantizeLinear pairs
   taken out, weights, scales, zero points and biases left as they are) against the masked
   original's twin, as float models: no rounding, so the ordinary float tolerance. This is what
   proves the rewrite sliced every per-channel scale, zero point and bias as the masks do.
2. the graphs as written, both unfused, where only rounding may differ (``rounding_ok``).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper

from ..loading.model import rename_inputs, tensor_array

__all__ = ["QDQ_SHARE", "QDQ_NOISE_FACTOR", "QDQ_MAX_STEPS", "QDQ_MAX_SHARE", "rounding_ok", "steps_apart",
           "output_steps", "has_qdq", "float_twin"]

# ResNet-18 through quantize_static (QDQ, per channel, output step 0.0425 on logits within
# +-0.85), pruned by 0.3: 141 and 148 of the 1000 logits of the two samples one step off, none
# more (by 0.5: 120 in all). The masked original itself, run by onnxruntime with its default
# (integer) kernels and unoptimized, differs in 132 and 156, each one step; its inputs times
# 1 + 1e-6 flip 142 and 159. A wrong pruning (the original unmasked) moves 987 by up to 129
# steps. So on an output made by a DequantizeLinear with a known scale, elements off by at most
# one step (or the most steps the masked original's two runs differ by) are rounding while there
# are no more than QDQ_NOISE_FACTOR times as many as those two runs differ in, or QDQ_SHARE of
# the output (at least one element) where they differ in fewer.
# That count is only a yardstick where no float twin could be checked (QOperator graphs, which
# compute in integers and so agree exactly, and activations quantized per axis): on other
# machines onnxruntime's fused kernels of the same ResNet-18 flipped none of the logits while a
# correct pruning left 279 a step off (issue 26). Where the twins agree, the caps below alone
# bound the rounding.
QDQ_SHARE = 0.01
QDQ_NOISE_FACTOR = 2.0
# and never more than this many steps or this share of an output, whatever onnxruntime's own
# runs disagree by (ResNet-18 QDQ at 224x224, eight weight and calibration seeds, by 0.3: one
# step, 240 to 367 of the 2000 logits of two samples; its own fused and unfused runs up to 2
# steps apart)
QDQ_MAX_STEPS = 2
QDQ_MAX_SHARE = 0.3


def rounding_ok(got: np.ndarray, want: np.ndarray, step, tol: float, noise_count: int = 0,
                noise_steps: int = 1) -> tuple[bool, int]:
    """Whether the elements of ``got`` beyond ``tol`` of ``want`` are rounding: each at most
    ``max(1, noise_steps)`` quantization ``step``s (a scalar, or an array broadcasting to the
    output) off, and no more of them than ``QDQ_NOISE_FACTOR * noise_count`` (the elements the
    masked original's own two runs differ in) or ``QDQ_SHARE`` of the output (at least one),
    never more than ``QDQ_MAX_STEPS`` steps or ``QDQ_MAX_SHARE`` of the output.
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


def steps_apart(a: np.ndarray, b: np.ndarray, step, tol: float) -> tuple[int, int]:
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


def has_qdq(model: onnx.ModelProto) -> bool:
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear") for n in model.graph.node)


def float_twin(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """``model`` without its activations' quantization: each QuantizeLinear that only
    DequantizeLinear nodes read, with its own per-tensor scale and zero point, goes with
    them, their readers reading its float input instead (an Identity keeps a graph output's
    name). Weights, their per-channel scales and zero points, and biases (DequantizeLinear of
    initializers) stay. None where a QuantizeLinear is left (its integers read by QLinearConv
    and the like, or quantized per axis): no float twin to compare."""
    g = model.graph
    values = {t.name: t for t in g.initializer}
    readers: dict[str, list] = {}
    for node in g.node:
        for i in node.input:
            readers.setdefault(i, []).append(node)
    outputs = {o.name for o in g.output}
    rename: dict[str, str] = {}
    dropped: set[int] = set()
    for q in g.node:
        if q.op_type != "QuantizeLinear" or q.output[0] in outputs:
            continue
        dqs = readers.get(q.output[0], [])
        if dqs and all(_same_quantization(q, dq, values) for dq in dqs):
            dropped.update(id(n) for n in [q, *dqs])
            rename.update((dq.output[0], q.input[0]) for dq in dqs)
    if any(n.op_type == "QuantizeLinear" and id(n) not in dropped for n in g.node):
        return None
    twin = onnx.ModelProto()
    twin.CopyFrom(model)
    nodes = [n for n in g.node if id(n) not in dropped]
    nodes += [helper.make_node("Identity", [rename[o]], [o], name=f"{o}__spa_twin") for o in outputs if o in rename]
    del twin.graph.node[:]
    twin.graph.node.extend(nodes)
    rename_inputs(twin.graph, rename)
    kept = [v for v in twin.graph.value_info if v.name not in rename]
    del twin.graph.value_info[:]
    twin.graph.value_info.extend(kept)
    return twin


def _same_quantization(q: onnx.NodeProto, dq: onnx.NodeProto, values: dict) -> bool:
    """Whether ``dq`` dequantizes with ``q``'s scale and zero point, one of each (per tensor)."""
    if dq.op_type != "DequantizeLinear" or len(dq.input) != len(q.input) or q.input[1] not in values:
        return False
    for a, b in zip(q.input[1:], dq.input[1:]):
        if a != b and not (a in values and b in values and np.array_equal(tensor_array(values[a]),
                                                                          tensor_array(values[b]))):
            return False
    return tensor_array(values[q.input[1]]).size == 1
