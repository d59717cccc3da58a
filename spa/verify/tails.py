"""An output's tail: the elementwise ops (and means) with constant other inputs that end it,
and the tensor they read, by which the oracle judges an output whose own scale says nothing
(``spa.verify.oracle``).

A tail is where an output's scale stops saying how precisely it was computed: onnxruntime's
Sigmoid resolves its outputs to 3e-8 however small they are, so a sigmoid map far in
saturation (a text detector pruned by half: every value under 2e-7) differs by whole such
steps for a logit rounded 1e-6 differently. The logits it reads keep their scale.

An output made by an If (Silero VAD's probability, a Sigmoid and a mean inside each branch)
has its tail inside the branches: the tensor each branch's tail reads is fetched through an
output added to the If and to both branches (``with_outputs``).
"""

from __future__ import annotations

import onnx
from onnx import helper

from ..graph.rules.elementwise import UNARY
from ..loading.model import tensor_array

__all__ = ["pre_activation", "with_outputs", "fetched_name", "readable"]

# Ops an output's tail may hold: applied to each element alone (or a mean over an axis, which
# adds its own rounding only), with constants for every other input.
_TAIL = (set(UNARY) - {"Cast", "CastLike", "Dropout", "IsInf", "IsNaN", "Not", "BitwiseNot"}) | {
    "Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "PRelu", "BatchNormalization",
    "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "ReduceMean"}


def _tail(producer: dict, values: dict, name: str) -> tuple[str, list]:
    """Walk back from ``name`` through tail ops: (the tensor the tail reads, the tail)."""
    tail = []
    while (node := producer.get(name)) is not None and node.op_type in _TAIL and node.domain in ("", "ai.onnx"):
        data = [i for i in node.input if i and i not in values]
        if len(data) != 1 or len(node.output) != 1:
            break
        tail.append((node.op_type, tuple(sorted(a.SerializeToString() for a in node.attribute)),
                     tuple(tensor_array(values[i]).tobytes() + str(values[i].dims).encode() if i in values
                           else b"" for i in node.input)))
        name = data[0]
    return name, tail


def _branches(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    by_name = {a.name: a.g for a in node.attribute if a.HasField("g")}
    return [by_name[b] for b in ("then_branch", "else_branch") if b in by_name]


def pre_activation(model: onnx.ModelProto, output: str) -> tuple[str | tuple, tuple] | None:
    """The tensor that ``output``'s tail reads (a Sigmoid, a per-channel affine, a Reshape...
    each with constant other inputs), and the tail as a comparable value (ops, attributes,
    constants); None where the output has no such tail. Where the tail goes on inside the
    branches of an If of the main graph, the tensor is ``("If", node, k, then's, else's)``,
    which ``with_outputs`` makes an output of the model (see ``fetched_name``)."""
    producer = {o: n for n in model.graph.node for o in n.output}
    values = {t.name: t for t in model.graph.initializer}
    name, tail = _tail(producer, values, output)
    node = producer.get(name)
    if node is not None and node.op_type == "If" and len(_branches(node)) == 2:
        k = list(node.output).index(name)
        inner = []
        for branch in _branches(node):
            local = {o: n for n in branch.node for o in n.output}
            pre, t = _tail(local, {**values, **{t.name: t for t in branch.initializer}}, branch.output[k].name)
            if not t:
                break
            inner.append((pre, tuple(t)))
        if len(inner) == 2:
            return ("If", node.name, k, inner[0][0], inner[1][0]), (tuple(tail), inner[0][1], inner[1][1])
    return (name, tuple(tail)) if tail else None


def fetched_name(pre) -> str:
    """The model output that ``with_outputs`` makes for a tensor ``pre_activation`` named."""
    return pre if isinstance(pre, str) else f"{pre[1]}__spa_pre{pre[2]}"


def readable(pre) -> str:
    return pre if isinstance(pre, str) else f"{pre[3]} / {pre[4]} (the branches of If {pre[1]!r})"


def with_outputs(model: onnx.ModelProto, names: list) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the tensors ``names`` (as ``pre_activation``
    names them: a tensor inside an If's branches through a new output of the If)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    present = {o.name for o in out.graph.output}
    nodes = {n.name: n for n in out.graph.node}
    for pre in names:
        if not isinstance(pre, str):
            node = nodes[pre[1]]
            node.output.append(fetched_name(pre))
            for branch, tensor in zip(_branches(node), pre[3:5]):
                branch.output.append(helper.make_empty_tensor_value_info(tensor))
        if fetched_name(pre) not in present:
            out.graph.output.append(helper.make_empty_tensor_value_info(fetched_name(pre)))
    return out
