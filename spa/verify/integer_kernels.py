"""Integer products computed exactly, for the oracle.

onnxruntime's CPU kernels multiply uint8 activations by int8 weights (MLAS's u8s8 GEMM) on
x86 without VNNI (AVX2's vpmaddubsw) by adding each pair of neighbouring products in int16,
which saturates: 255 x 127 + 255 x 127 comes out as 32767. Which products are neighbours
depends on the position along the summed axis, so a model without a channel and the same model
with that channel zeroed (the oracle's masked original) pair the others differently and differ
by up to a few percent of the output, though both compute the same function. With AVX-512 VNNI
or AVX-VNNI the products are summed in int32 and the two agree exactly.

int8 weights read as uint8 (w + 128, zero point + 128) are the same function, and uint8 by
uint8 products are summed in int32 everywhere, so the oracle compares both models so: exactly,
at its usual tolerance, on any CPU.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ..loading.model import tensor_names, unique_name

__all__ = ["unsaturated"]

# op -> (weight input, its zero point input) pairs multiplied by uint8 activations in MLAS's
# u8s8 GEMM (ConvInteger's int8 weights are summed exactly already)
_WEIGHTS = {("com.microsoft", "DynamicQuantizeLSTM"): ((1, 9), (2, 11)), ("", "MatMulInteger"): ((1, 3),)}


def _int8(graph: onnx.GraphProto) -> Callable[[str], bool]:
    """``is_int8(name)`` for tensors the graph types itself (initializers, inputs, value_info)."""
    types = {t.name: t.data_type for t in graph.initializer}
    for v in [*graph.input, *graph.value_info]:
        types.setdefault(v.name, v.type.tensor_type.elem_type)
    return lambda name: types.get(name) == TensorProto.INT8


def _targets(model: onnx.ModelProto) -> list[tuple[int, int, int]]:
    """(node position, weight input, zero point input) for every int8 weight the u8s8 GEMM
    reads. The zero point tells the type (one type constraint with the weight), since a weight
    the oracle masks is a computed tensor while its zero point stays an initializer."""
    int8 = _int8(model.graph)
    producer = {o: n for n in model.graph.node for o in n.output}
    found = []
    for i, node in enumerate(model.graph.node):
        for k, zk in _WEIGHTS.get((node.domain if node.domain != "ai.onnx" else "", node.op_type), ()):
            if k >= len(node.input) or not node.input[k]:
                continue
            if node.op_type == "MatMulInteger" and getattr(producer.get(node.input[0]), "op_type", None) \
                    != "DynamicQuantizeLinear":   # uint8 activations known: what quantize_dynamic writes
                continue
            zero = node.input[zk] if zk < len(node.input) and node.input[zk] else None
            if int8(zero) if zero is not None else int8(node.input[k]):
                found.append((i, k, zk))
    return found


def unsaturated(model: onnx.ModelProto) -> onnx.ModelProto | None:
    """A copy of ``model`` whose int8 weights of u8s8 integer GEMMs (and their zero points,
    a missing one being 0) are read as uint8 shifted by 128: the same function, computed
    without int16 saturation (see the module's docstring). None where it has none."""
    if not _targets(model):
        return None
    out = onnx.ModelProto()
    out.CopyFrom(model)
    taken = tensor_names(out)
    shift = unique_name("spa_uint8_shift", taken)
    out.graph.initializer.append(numpy_helper.from_array(np.array(128, np.int32), shift))
    added: dict[str, str] = {}   # int8 tensor -> its uint8 reading, made once
    made: dict[int, list] = {}   # position of the reader -> nodes to place before it

    def as_uint8(name: str, at: int) -> str:
        if name not in added:
            wide, moved, done = (unique_name(f"{name}__spa_{s}", taken) for s in ("int32", "shifted", "uint8"))
            made.setdefault(at, []).extend([
                helper.make_node("Cast", [name], [wide], name=wide, to=TensorProto.INT32),
                helper.make_node("Add", [wide, shift], [moved], name=moved),
                helper.make_node("Cast", [moved], [done], name=done, to=TensorProto.UINT8)])
            added[name] = done
        return added[name]

    for at, k, zk in _targets(out):
        node = out.graph.node[at]
        node.input[k] = as_uint8(node.input[k], at)
        if zk < len(node.input) and node.input[zk]:
            node.input[zk] = as_uint8(node.input[zk], at)
        else:   # no zero point: 0 in int8, 128 in uint8
            zero = unique_name(f"{node.name or node.op_type}__spa_uint8_zero", taken)
            out.graph.initializer.append(numpy_helper.from_array(np.array(128, np.uint8), zero))
            node.input.extend([""] * (zk + 1 - len(node.input)))
            node.input[zk] = zero
    ordered = [m for i, n in enumerate(out.graph.node) for m in [*made.get(i, []), n]]
    del out.graph.node[:]
    out.graph.node.extend(ordered)
    return out
