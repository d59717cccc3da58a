"""Parameter count, multiply-accumulates and file size of a model."""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["count_params", "count_macs", "node_macs", "mac_spaces", "WEIGHT_TYPES"]


WEIGHT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


def count_params(model: onnx.ModelProto) -> int:
    """Elements of float and 8-bit (quantized) initializers; integer size vectors don't count."""
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in WEIGHT_TYPES))


# Integer and quantized forms count as their float op; the weight is input 3 of QLinear ops.
_AS = {"ConvInteger": "Conv", "QLinearConv": "Conv", "MatMulInteger": "MatMul", "QLinearMatMul": "MatMul",
       "QGemm": "Gemm", "MatMulNBits": "MatMul"}


def count_macs(model: onnx.ModelProto, shapes) -> int:
    """MACs of Conv, ConvTranspose, Gemm and MatMul (their integer and quantized forms, and the
    packed QKV projection of onnxruntime's fused Attention), from static shapes."""
    return sum(node_macs(node, shapes) for node in model.graph.node)


def _operands(node: onnx.NodeProto) -> tuple[str, list[str]]:
    """(the float op it counts as, [data input, weight input])."""
    op = _AS.get(node.op_type, node.op_type)
    k = 3 if node.op_type.startswith("QLinear") or node.op_type == "QGemm" else 1
    return op, [node.input[0], node.input[k] if len(node.input) > k else ""]


def node_macs(node: onnx.NodeProto, shapes) -> int:
    op, operands = _operands(node)
    ins = [shapes.shape.get(n) for n in operands]
    out = shapes.shape.get(node.output[0]) if node.output else None
    if out is None or any(s is None for s in ins):
        return 0
    if op in ("Conv", "FusedConv"):
        return int(np.prod(out)) * int(np.prod(ins[1][1:]))
    if op == "ConvTranspose":
        return int(np.prod(ins[0])) * int(np.prod(ins[1][1:]))
    if op in ("Gemm", "FusedGemm"):
        return int(np.prod(out)) * int(ins[1][0] if not _attr(node, "transB") else ins[1][1])
    if op == "MatMul":
        return int(np.prod(out)) * int(ins[0][-1])
    if _fused_attention(node, ins):   # its projection only: the score products are not counted
        return int(np.prod(ins[0])) * int(ins[1][1])
    return 0


def _fused_attention(node, ins) -> bool:
    return (node.op_type == "Attention" and node.domain == "com.microsoft" and len(ins) >= 2
            and ins[0] is not None and ins[1] is not None and len(ins[1]) == 2)


def mac_spaces(node: onnx.NodeProto, shapes) -> list[tuple[str, int]]:
    """The axes whose sizes a node's MACs are proportional to: (tensor, axis) spaces of its
    output (or, for ConvTranspose, input) and of the contracted dimension."""
    out = node.output[0]
    rank = len(shapes.shape.get(out, ()))
    op, (x, w) = _operands(node)
    if op in ("Conv", "FusedConv"):
        return [(out, a) for a in range(rank)] + [(w, 1)]
    if op == "ConvTranspose":
        return [(x, a) for a in range(len(shapes.shape[x]))] + [(w, 1)]
    if op in ("Gemm", "FusedGemm"):
        return [(out, a) for a in range(rank)] + [(w, 1 if _attr(node, "transB") else 0)]
    if op == "MatMul":
        return [(out, a) for a in range(rank)] + [(x, len(shapes.shape[x]) - 1)]
    if _fused_attention(node, [shapes.shape.get(n) for n in node.input]):
        return [(x, a) for a in range(len(shapes.shape[x]))] + [(w, 1)]
    return []


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return 0
