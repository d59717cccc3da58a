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


def count_macs(model: onnx.ModelProto, shapes) -> int:
    """MACs of Conv, ConvTranspose, Gemm and MatMul (and the packed QKV projection of
    onnxruntime's fused Attention), from static shapes."""
    return sum(node_macs(node, shapes) for node in model.graph.node)


def node_macs(node: onnx.NodeProto, shapes) -> int:
    ins = [shapes.shape.get(n) for n in node.input]
    out = shapes.shape.get(node.output[0]) if node.output else None
    if out is None or len(ins) < 2 or any(s is None for s in ins[:2]):
        return 0
    if node.op_type in ("Conv", "FusedConv"):
        return int(np.prod(out)) * int(np.prod(ins[1][1:]))
    if node.op_type == "ConvTranspose":
        return int(np.prod(ins[0])) * int(np.prod(ins[1][1:]))
    if node.op_type in ("Gemm", "FusedGemm"):
        return int(np.prod(out)) * int(ins[1][0] if not _attr(node, "transB") else ins[1][1])
    if node.op_type == "MatMul":
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
    if node.op_type in ("Conv", "FusedConv"):
        return [(out, a) for a in range(rank)] + [(node.input[1], 1)]
    if node.op_type == "ConvTranspose":
        return [(node.input[0], a) for a in range(len(shapes.shape[node.input[0]]))] + [(node.input[1], 1)]
    if node.op_type in ("Gemm", "FusedGemm"):
        return [(out, a) for a in range(rank)] + [(node.input[1], 1 if _attr(node, "transB") else 0)]
    if node.op_type == "MatMul":
        a_rank = len(shapes.shape[node.input[0]])
        return [(out, a) for a in range(rank)] + [(node.input[0], a_rank - 1)]
    if _fused_attention(node, [shapes.shape.get(n) for n in node.input]):
        return [(node.input[0], a) for a in range(len(shapes.shape[node.input[0]]))] + [(node.input[1], 1)]
    return []


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return 0
