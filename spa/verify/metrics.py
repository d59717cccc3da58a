"""Parameter count, multiply-accumulates and file size of a model.

A node's MACs are a sum of product terms: ``(macs, spaces)`` where ``macs`` scales with the
kept share of every listed (tensor, axis) space (a space may repeat: an RNN's H x H
recurrence scales with the hidden share squared). ``count_macs`` adds the terms up; the
budget's ``ResourceModel`` reads the same terms as functions of the groups' keep counts.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import onnx

from ..graph.rules.einsum import parse_equation
from ..loading.model import copies_of_equal, tensor_array
from ..loading.scopes import bodies

__all__ = ["count_params", "count_macs", "node_macs", "mac_terms", "weighted_nodes", "WEIGHT_TYPES"]

Space = tuple[str, int]
Term = tuple[int, list[Space]]   # MACs, and the spaces whose kept shares they scale with


WEIGHT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


def count_params(model: onnx.ModelProto) -> int:
    """Elements of float and 8-bit (quantized) initializers; integer size vectors don't count,
    nor a reader's copy of a tensor that still equals it (a tied embedding counts once)."""
    copies = copies_of_equal(model)
    return int(sum(math.prod(t.dims) for t in model.graph.initializer
                   if t.data_type in WEIGHT_TYPES and t.name not in copies))


def count_macs(model: onnx.ModelProto, shapes) -> int:
    """MACs of Conv, ConvTranspose, Gemm and MatMul (their integer and quantized forms, and the
    packed QKV projection of onnxruntime's fused Attention), LSTM (and DynamicQuantizeLSTM), GRU,
    RNN and Einsum, from static shapes. Elementwise work (bias adds, activations, gates, peepholes) is not counted.
    Nodes inside If/Loop/Scan bodies count as ``weighted_nodes`` says."""
    return int(round(sum(w * node_macs(node, shapes) for node, w in weighted_nodes(model, shapes))))


def weighted_nodes(model: onnx.ModelProto, shapes):
    """Every node with how many times it runs per run of the model, as far as shapes tell: 1
    in the main graph; an If's branches share their node's count (the mean of the branches:
    Silero VAD's 16 and 8 kHz networks, or two writings of one LSTM chosen by a size, count
    as one); a Scan body runs once per step of its scanned axis, a Loop body its trip count
    where that is a constant (else once)."""
    def visit(graph, weight):
        for node in graph.node:
            yield node, weight
            inner = bodies(node)
            if not inner:
                continue
            if node.op_type == "If":
                each = weight / len(inner)
            elif node.op_type == "Scan":
                each = weight * _scan_steps(node, shapes)
            elif node.op_type == "Loop":
                each = weight * _trips(node, shapes, inits)
            else:
                each = weight
            for _, body in inner:
                yield from visit(body, each)
    inits = {t.name: t for t in model.graph.initializer}
    yield from visit(model.graph, 1.0)


def _scan_steps(node: onnx.NodeProto, shapes) -> int:
    m = next((a.i for a in node.attribute if a.name == "num_scan_inputs"), 0)
    axes = next((list(a.ints) for a in node.attribute if a.name == "scan_input_axes"), [0] * m)
    if not m:
        return 1
    first = node.input[len(node.input) - m]
    shape = shapes.shape.get(first)
    return int(shape[axes[0] % len(shape)]) if shape else 1


def _trips(node: onnx.NodeProto, shapes, inits: dict) -> int:
    name = node.input[0] if node.input else ""
    value = shapes.value.get(name) if name in shapes.value else (
        tensor_array(inits[name]) if name in inits else None)
    return max(int(np.ravel(value)[0]), 0) if value is not None and np.size(value) == 1 else 1


def node_macs(node: onnx.NodeProto, shapes) -> int:
    """The node's MACs: the sum of its terms (0 for an op spa does not count or unknown shapes)."""
    return sum(macs for macs, _ in mac_terms(node, shapes))


def mac_terms(node: onnx.NodeProto, shapes) -> list[Term]:
    """The node's MACs as a sum of products of kept shares: ``[(macs, spaces), ...]``.

    A MatMul ``y = x @ w`` with x [2, 6] and w [6, 16] is one term,
    ``(192, [("y", 0), ("y", 1), ("x", 1)])``; an LSTM is two (input and recurrence).
    """
    handler = _HANDLERS.get(_AS.get(node.op_type, node.op_type))
    return [(int(m), s) for m, s in handler(node, shapes) if m] if handler else []


# Integer and quantized forms count as their float op; the weight is input 3 of QLinear ops.
_AS = {"ConvInteger": "Conv", "QLinearConv": "Conv", "MatMulInteger": "MatMul", "QLinearMatMul": "MatMul",
       "QGemm": "Gemm", "MatMulNBits": "MatMul"}


def _operands(node: onnx.NodeProto) -> tuple[str, list[str]]:
    """(the float op it counts as, [data input, weight input])."""
    op = _AS.get(node.op_type, node.op_type)
    k = 3 if node.op_type.startswith("QLinear") or node.op_type == "QGemm" else 1
    return op, [node.input[0], node.input[k] if len(node.input) > k else ""]


def _dense(node: onnx.NodeProto, shapes) -> list[Term]:
    """Conv, ConvTranspose, Gemm, MatMul, fused Attention: one product, output (or for
    ConvTranspose, input) elements times the contracted size."""
    op, (x, w) = _operands(node)
    xs, ws = shapes.shape.get(x), shapes.shape.get(w)
    y = node.output[0] if node.output else ""
    ys = shapes.shape.get(y)
    if ys is None or xs is None or ws is None:
        return []
    over = lambda name, shape: [(name, a) for a in range(len(shape))]  # noqa: E731 - every axis
    if op in ("Conv", "FusedConv"):
        return [(math.prod(ys) * math.prod(ws[1:]), over(y, ys) + [(w, 1)])]
    if op == "ConvTranspose":
        return [(math.prod(xs) * math.prod(ws[1:]), over(x, xs) + [(w, 1)])]
    if op in ("Gemm", "FusedGemm"):
        k = 1 if _attr(node, "transB") else 0
        return [(math.prod(ys) * int(ws[k]), over(y, ys) + [(w, k)])]
    if op == "MatMul":
        return [(math.prod(ys) * int(xs[-1]), over(y, ys) + [(x, len(xs) - 1)])]
    if node.domain == "com.microsoft" and len(ws) == 2:   # Attention: its projection only,
        return [(math.prod(xs) * int(ws[1]), over(x, xs) + [(w, 1)])]   # not the score products
    return []


from ..graph.rules.recurrent import LAYOUTS  # noqa: E402  (where each recurrent op keeps its axes: the rule's table)


def _recurrent(node: onnx.NodeProto, shapes) -> list[Term]:
    """LSTM, GRU, RNN and DynamicQuantizeLSTM (counted as the LSTM it quantizes): every step
    of every direction multiplies the input by W (G*H x in) and the state by R (G*H x H), so
    ``seq * batch * dirs * G * H * (in + H)`` as two terms, the second one quadratic in the
    hidden share. LSTM's peepholes (3 * H elementwise products a step) are not counted, like
    the gates' other elementwise work."""
    x, w = node.input[0], node.input[1]
    r = node.input[2] if len(node.input) > 2 else ""
    xs, ws, rs = shapes.shape.get(x), shapes.shape.get(w), shapes.shape.get(r)
    hidden = _attr(node, "hidden_size")
    if xs is None or ws is None or rs is None or len(xs) != 3 or not hidden:
        return []
    layout = LAYOUTS[node.op_type]
    seq, batch = (0, 1) if not _attr(node, "layout") else (1, 0)
    common = int(xs[seq]) * int(xs[batch]) * int(ws[0]) * layout.gates * int(hidden)
    steps = [(x, seq), (x, batch), (w, 0), (r, layout.cols)]   # sequence, batch, directions, hidden
    return [(common * int(xs[2]), steps + [(x, 2)]),               # W: input size
            (common * int(hidden), steps + [(r, layout.cols)])]    # R: hidden again


def _einsum(node: onnx.NodeProto, shapes) -> list[Term]:
    """Two or more operands: one multiply-add per point of the joint index space, the product
    of every label's size (``...`` dims included), over one space per label. One operand (a
    transpose, a sum or a diagonal) is not counted, like Transpose and ReduceSum."""
    ins = [shapes.shape.get(n) for n in node.input]
    if len(ins) < 2 or any(s is None for s in ins):
        return []
    equation = next((a.s for a in node.attribute if a.name == "equation"), b"")
    parsed = parse_equation(equation.decode(), [len(s) for s in ins])
    if isinstance(parsed, str):
        return []
    size: dict[str, tuple[int, Space]] = {}   # label -> (its size, an axis with that size)
    for name, term, shape in zip(node.input, parsed[0], ins):
        for axis, label in enumerate(term):
            if label not in size or shape[axis] > size[label][0]:   # skip size-1 broadcasts
                size[label] = (int(shape[axis]), (name, axis))
    return [(int(np.prod([n for n, _ in size.values()])), [s for _, s in size.values()])]


_HANDLERS: dict[str, Callable[[onnx.NodeProto, object], list[Term]]] = {
    **{op: _dense for op in ("Conv", "FusedConv", "ConvTranspose", "Gemm", "FusedGemm", "MatMul", "Attention")},
    **{op: _recurrent for op in LAYOUTS},
    "Einsum": _einsum,
}


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return 0
