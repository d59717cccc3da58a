"""Give synthetic activations the statistics of real ones, where the model recorded them.

An inference BatchNormalization holds the per-channel mean and variance of its input over the
training data. Synthetic inputs (noise, dead-leaves images) reach it with other statistics, and
every layer after it sees activations unlike the real ones. In the copy of the model that data-
free statistics are collected on, each such BatchNormalization normalizes with the statistics of
the batch in front of it instead: its output then has, per channel, the mean (its bias) and
scale (its scale) that it had on the training data, and the layers after it see inputs whose
first and second moments are the real ones. It is what model inversion (ZeroQ, DeepInversion)
optimizes the inputs for, reached in the forward pass, with no gradients.

Measured with data-free OBSPA (l1 choice, OBS compensation), top-1 at ratio 0.1 / 0.2 / 0.3 / 0.5:
Fashion mobile net 0.744 / 0.218 / 0.115 / 0.097 -> 0.875 / 0.791 / 0.344 / 0.197; Fashion ResNet
0.917 / 0.893 / 0.691 / 0.337 -> 0.922 / 0.916 / 0.838 / 0.498; Fashion VGG 0.919 / 0.894 / 0.879 /
0.666 -> 0.920 / 0.897 / 0.887 / 0.786.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ..loading.model import tensor_names, unique_name

__all__ = ["steer_batch_norms"]

MIN_SAMPLES = 8


def steer_batch_norms(model: onnx.ModelProto, batch: int = 16) -> tuple[onnx.ModelProto, int]:
    """A copy of ``model`` whose inference BatchNormalizations (main graph, initializer scale)
    normalize each channel over the batch and every axis but the channel one, and the number
    of them. Output names stay, so the statistics of any tensor can be read from the copy.
    ``batch``: the samples per run; a BatchNormalization of [N, C] data sees only N values per
    channel, and with fewer than MIN_SAMPLES its batch statistics would be noise (at N = 1 the
    output is its bias alone): such a layer stays as it is."""
    if not any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return model, 0                 # nothing to steer: no copy of the weights, no inference
    inits = {t.name: t for t in model.graph.initializer}
    types, ranks = _tensor_info(model)
    taken = tensor_names(model)
    steered = onnx.ModelProto()
    steered.CopyFrom(model)
    nodes, count = [], 0
    for i, node in enumerate(steered.graph.node):
        scale = inits.get(node.input[1]) if node.op_type == "BatchNormalization" and len(node.input) == 5 else None
        training = any(a.name == "training_mode" and a.i for a in node.attribute) or any(node.output[1:])
        # InstanceNormalization takes its scale in the input's type; BatchNormalization from
        # opset 15 may hold float32 parameters for float16 data: such a layer stays as it is
        mixed = scale is not None and types.get(node.input[0], scale.data_type) != scale.data_type
        few = ranks.get(node.input[0], 4) <= 2 and batch < MIN_SAMPLES
        if scale is None or training or mixed or few or len(scale.dims) != 1 or any(a.name == "spatial" and a.i == 0
                                                                               for a in node.attribute):
            nodes.append(node)
            continue
        count += 1
        prefix = unique_name(f"_spa_steer{i}_", taken)
        taken.add(prefix)
        nodes.extend(_batch_statistics_norm(steered, node, int(scale.dims[0]), prefix))
    del steered.graph.node[:]
    steered.graph.node.extend(nodes)
    return steered, count


def _tensor_info(model: onnx.ModelProto) -> tuple[dict[str, int], dict[str, int]]:
    """Element types and ranks of the tensors ONNX inference can name (on the weightless model)."""
    from ..loading.model import _weightless
    try:
        typed = onnx.shape_inference.infer_shapes(_weightless(model))
    except Exception:           # what inference cannot type is steered as before
        return {}, {}
    known = [vi for vi in list(typed.graph.input) + list(typed.graph.value_info) if vi.type.HasField("tensor_type")]
    types = {vi.name: vi.type.tensor_type.elem_type for vi in known if vi.type.tensor_type.elem_type}
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in known if vi.type.tensor_type.HasField("shape")}
    return types, ranks


def _batch_statistics_norm(model: onnx.ModelProto, node: onnx.NodeProto, channels: int, p: str):
    """[N, C, ...] -> [N, C, M] -> [C, N, M] -> [1, C, N*M]: InstanceNormalization of that one
    "instance" is the batch normalization with the batch's own statistics; then back the same
    way. Going through rank 3 makes it the same nodes for every input rank."""
    x, scale, bias = node.input[:3]
    eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
    for name, value in (("ncm", [0, channels, -1]), ("flat", [1, channels, -1])):
        model.graph.initializer.append(numpy_helper.from_array(np.array(value, np.int64), p + name))
    return [helper.make_node("Shape", [x], [p + "shape"]),
            helper.make_node("Reshape", [x, p + "ncm"], [p + "x3"]),
            helper.make_node("Transpose", [p + "x3"], [p + "cn"], perm=[1, 0, 2]),
            helper.make_node("Shape", [p + "cn"], [p + "cn_shape"]),
            helper.make_node("Reshape", [p + "cn", p + "flat"], [p + "row"]),
            helper.make_node("InstanceNormalization", [p + "row", scale, bias], [p + "norm"], epsilon=eps),
            helper.make_node("Reshape", [p + "norm", p + "cn_shape"], [p + "cn_norm"]),
            helper.make_node("Transpose", [p + "cn_norm"], [p + "y3"], perm=[1, 0, 2]),
            helper.make_node("Reshape", [p + "y3", p + "shape"], [node.output[0]])]
