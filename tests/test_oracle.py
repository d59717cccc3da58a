"""The oracle is tested itself: deliberately wrong pruned models must fail it.

Each test builds a model that is wrong in one known way (a channel off by one, wrong Split
sizes, a mixing op treated as per-channel, outputs off by a small relative amount) and
expects ``ok == False`` from ``spa.verify.oracle`` or a ``VerificationError`` from
``spa.prune(..., verify=True)``; each has a correct twin that must pass, so a test cannot
pass because the oracle rejects everything.
"""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import spa
from graphs import Graph
from spa.errors import VerificationError
from spa.graph.rules.registry import RULES
from spa.plan import make_plan
from spa.rewrite import rewrite
from spa.verify import RTOL, masked_model, oracle

C = 8


def conv_relu_conv(middle=None, seed=0, opset=17):
    """x -> conv(3 -> C) -> middle -> conv(C -> 4) -> out."""
    g = Graph(opset, seed=seed)
    y = g.conv(g.input([1, 3, 10, 10]), 3, C)
    y = middle(g, y) if middle else g.op("Relu", [y])
    g.output(g.conv(y, C, 4))
    return g.model()


def removal(a, positions):
    """The plan that removes channels ``positions`` of the first conv's output."""
    space = (a.model.graph.node[0].output[0], 1)
    removals = []
    for g in a.groups:
        idx, ch = g.member(a.dep, space) if space in g.spaces else (np.array([]), np.array([], np.int64))
        removals.append(np.sort(ch[np.isin(idx, positions)]))
    return make_plan(a, removals)


def judge(pruned, masked, a):
    return oracle(pruned, masked, a.shapes.input_shapes, a.model)


def rejected(pruned, masked, a) -> bool:
    """The oracle says no: ``ok`` False, or it raises the verification error."""
    try:
        return not judge(pruned, masked, a).ok
    except VerificationError:
        return True


def test_same_removal_passes():
    a = spa.analyze(conv_relu_conv())
    removed = removal(a, [1, 4, 6])
    result = judge(rewrite(a.model, removed), masked_model(a.model, removed, a.shapes), a)
    assert result.ok and result.max_rel < RTOL / 10


@pytest.mark.parametrize("shift", [1, -1])
def test_channel_off_by_one_fails(shift):
    """The rewrite removed other channels than the masked original zeroes."""
    a = spa.analyze(conv_relu_conv())
    planned = np.array([1, 4, 6])
    pruned = rewrite(a.model, removal(a, planned))
    masked = masked_model(a.model, removal(a, (planned + shift) % C), a.shapes)
    result = judge(pruned, masked, a)
    assert not result.ok and result.max_rel > 10 * RTOL


def test_one_channel_of_many_off_fails():
    """Only one of the removed channels differs: still caught."""
    a = spa.analyze(conv_relu_conv())
    pruned = rewrite(a.model, removal(a, [0, 2, 5]))
    assert rejected(pruned, masked_model(a.model, removal(a, [0, 2, 6]), a.shapes), a)


def split_concat(g, y):
    """Split [3, 5] and concatenate the parts swapped: channel order depends on the sizes."""
    a, b = g.op("Split", [y, g.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
    return g.op("Concat", [g.op("Relu", [b]), a], axis=1)


def _split_sizes(model):
    node = next(n for n in model.graph.node if n.op_type == "Split")
    init = next(t for t in model.graph.initializer if t.name == node.input[1])
    return init


@pytest.mark.parametrize("wrong", [False, True])
def test_wrong_split_sizes_fail(wrong):
    a = spa.analyze(conv_relu_conv(split_concat))
    removed = removal(a, [0, 4, 5])          # Split [3, 5] becomes [2, 3]
    pruned = rewrite(a.model, removed)
    sizes = _split_sizes(pruned)
    assert numpy_helper.to_array(sizes).tolist() == [2, 3]
    if wrong:                                # same total, so every shape still fits
        sizes.CopyFrom(numpy_helper.from_array(np.array([3, 2], np.int64), sizes.name))
    masked = masked_model(a.model, removed, a.shapes)
    assert rejected(pruned, masked, a) == wrong


def per_channel(ctx):
    """A wrong rule: every axis passes through, as if the op worked on each channel alone."""
    for i in range(len(ctx.in_shape(0))):
        ctx.same(ctx.inp(0, i), ctx.outp(0, i))


@pytest.mark.parametrize("op,attrs", [("LRN", {"size": 3}), ("LRN", {"size": 5}), ("Softmax", {"axis": 1}),
                                      ("LogSoftmax", {"axis": 1}), ("LpNormalization", {"axis": 1})])
def test_mixing_op_treated_as_per_channel_fails(monkeypatch, op, attrs):
    """LRN with its default alpha changes the outputs by ~6e-4 of their scale: the oracle must
    still see it (it did not with a 1e-3 tolerance)."""
    model = conv_relu_conv(lambda g, y: g.op(op, [y], **attrs))
    monkeypatch.setitem(RULES, op, per_channel)
    with pytest.raises(VerificationError, match="differs from the masked original"):
        spa.prune(model, ratio=0.5, round_to=1, verify=True)


def test_per_channel_rule_is_right_for_a_per_channel_op(monkeypatch):
    """The twin of the test above: the same wrong-rule machinery on Relu prunes and passes."""
    monkeypatch.setitem(RULES, "Relu", per_channel)
    r = spa.prune(conv_relu_conv(), ratio=0.5, round_to=1, verify=True)
    assert r.report["verify"]["ok"] and sum(g["removed"] for g in r.report["groups"]) == C // 2


def _scale_output(model, factor):
    """The last conv's weights and bias times ``factor``: every output off by ``factor - 1``."""
    last = model.graph.node[-1]
    for t in model.graph.initializer:
        if t.name in last.input[1:]:
            t.CopyFrom(numpy_helper.from_array((numpy_helper.to_array(t) * np.float32(factor)), t.name))


@pytest.mark.parametrize("relative", [1e-3, 3 * RTOL])
def test_small_relative_error_fails(relative):
    """An error of 1e-3 of the output scale (what a subtly wrong rule leaves) fails the oracle."""
    a = spa.analyze(conv_relu_conv())
    removed = removal(a, [1, 4, 6])
    pruned = rewrite(a.model, removed)
    _scale_output(pruned, 1 + relative)
    masked = masked_model(a.model, removed, a.shapes)
    result = judge(pruned, masked, a)
    assert result.max_rel == pytest.approx(relative, rel=0.05)
    assert not result.ok


@pytest.mark.parametrize("scale", [1e-4, 1e-14])
def test_small_outputs_are_judged_relatively(scale):
    """Outputs of scale ~2e-3 or ~2e-13 (randomly initialized EfficientNet-B0's are ~3e-14):
    an error of 1e-3 of it still fails, a correct pruning still passes; no absolute floor
    swallows the error (it was 1e-5)."""
    a = spa.analyze(conv_relu_conv())
    removed = removal(a, [1, 4, 6])
    pruned = rewrite(a.model, removed)
    masked = masked_model(a.model, removed, a.shapes)
    _scale_output(masked, scale)
    _scale_output(pruned, scale)
    result = judge(pruned, masked, a)
    assert result.ok and result.max_rel < 1e-5
    _scale_output(pruned, 1 + 1e-3)
    result = judge(pruned, masked, a)
    assert result.max_abs / result.max_rel < 50 * scale and not result.ok


def test_error_below_tolerance_passes():
    """Float rounding of the kind correct prunings show (here 1e-6 relative) passes."""
    a = spa.analyze(conv_relu_conv())
    removed = removal(a, [1, 4, 6])
    pruned = rewrite(a.model, removed)
    _scale_output(pruned, 1 + 1e-6)
    assert judge(pruned, masked_model(a.model, removed, a.shapes), a).ok


def test_integer_output_must_match_exactly():
    """Integer outputs (an ArgMax over the consumer's channels) are compared exactly."""
    g = Graph(seed=0)
    y = g.op("Relu", [g.conv(g.input([1, 3, 10, 10]), 3, C)])
    sign = g.const(np.float32(1.0))
    out = g.op("ArgMax", [g.op("Mul", [g.conv(y, C, 4), sign])], axis=1)
    graph = onnx.helper.make_graph(g.nodes, "argmax", g.inputs, [onnx.helper.make_tensor_value_info(
        out, onnx.TensorProto.INT64, [1, 1, 10, 10])], g.inits)
    a = spa.analyze(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]))
    removed = removal(a, [1, 4, 6])
    pruned = rewrite(a.model, removed)
    masked = masked_model(a.model, removed, a.shapes)
    assert judge(pruned, masked, a).ok
    t = next(t for t in pruned.graph.initializer if t.name == sign)
    t.CopyFrom(numpy_helper.from_array(np.float32(-1.0), sign))  # argmin instead of argmax
    assert not judge(pruned, masked, a).ok


def test_pruned_model_that_does_not_load_is_an_error():
    a = spa.analyze(conv_relu_conv())
    removed = removal(a, [1, 4, 6])
    pruned = rewrite(a.model, removed)
    first = next(t for t in pruned.graph.initializer if t.name == pruned.graph.node[0].input[1])
    first.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(first)[:-1], first.name))  # one filter too few
    with pytest.raises(VerificationError):
        judge(pruned, masked_model(a.model, removed, a.shapes), a)
