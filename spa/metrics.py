"""Parameter count, multiply-accumulates and file size of a model."""

from __future__ import annotations

import numpy as np
import onnx

__all__ = ["count_params", "count_macs"]


WEIGHT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
                onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT8}


def count_params(model: onnx.ModelProto) -> int:
    """Elements of float and 8-bit (quantized) initializers; integer size vectors don't count."""
    return int(sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in WEIGHT_TYPES))


def count_macs(model: onnx.ModelProto, shapes) -> int:
    """MACs of Conv, ConvTranspose, Gemm and MatMul, from static shapes."""
    total = 0
    for node in model.graph.node:
        ins = [shapes.shape.get(n) for n in node.input]
        out = shapes.shape.get(node.output[0]) if node.output else None
        if out is None or any(s is None for s in ins[:2]):
            continue
        if node.op_type in ("Conv", "FusedConv"):
            total += int(np.prod(out)) * int(np.prod(ins[1][1:]))
        elif node.op_type == "ConvTranspose":
            total += int(np.prod(ins[0])) * int(np.prod(ins[1][1:]))
        elif node.op_type in ("Gemm", "FusedGemm"):
            total += int(np.prod(out)) * int(ins[1][0] if not _attr(node, "transB") else ins[1][1])
        elif node.op_type == "MatMul":
            total += int(np.prod(out)) * int(ins[0][-1])
    return total


def _attr(node, name):
    for a in node.attribute:
        if a.name == name:
            return a.i
    return 0
