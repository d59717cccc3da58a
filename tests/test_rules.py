"""One tiny graph per op family: prune random channels, the oracle must hold."""

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph, assert_prunes

C = 8  # channels of the layer being pruned


def sandwich(middle, opset=17, shape=(1, 3, 10, 10), c_mid=C, tail=True):
    """x -> conv(3 -> C) -> middle(g, y) -> conv(C' -> 4) -> out."""
    g = Graph(opset)
    x = g.input(list(shape))
    y = g.conv(x, shape[1], C)
    y, c_out = middle(g, y)
    g.output(g.conv(y, c_out, 4) if tail else y)
    return g.model()


UNARY = ["Relu", "Sigmoid", "Tanh", "Erf", "Softplus", "Neg", "Abs", "Identity", "HardSwish",
         "Softsign", "Elu", "Selu", "Celu", "Exp", "Floor", "Ceil", "Round", "Sign", "Sin", "Cos"]


@pytest.mark.parametrize("op", UNARY)
def test_unary(op):
    assert_prunes(sandwich(lambda g, y: (g.op(op, [y]), C)))


@pytest.mark.parametrize("op,attrs,opset", [
    ("LeakyRelu", {"alpha": 0.1}, 17), ("HardSigmoid", {"alpha": 0.2, "beta": 0.5}, 17),
    ("Gelu", {}, 20), ("Mish", {}, 18), ("ThresholdedRelu", {"alpha": 0.3}, 17),
])
def test_unary_with_attributes(op, attrs, opset):
    assert_prunes(sandwich(lambda g, y: (g.op(op, [y], **attrs), C), opset=opset))


@pytest.mark.parametrize("op", ["Add", "Sub", "Mul", "Div", "Max", "Min", "Pow"])
@pytest.mark.parametrize("other_shape", [(C, 1, 1), (1, C, 1, 1), (1,), (1, 1, 10), ()])
def test_binary_broadcast_constant(op, other_shape):
    def middle(g, y):
        v = np.abs(g.rng.standard_normal(other_shape)).astype(np.float32) + 0.5
        return g.op(op, [g.op("Sigmoid", [y]) if op == "Pow" else y, g.const(v)]), C
    assert_prunes(sandwich(middle))


@pytest.mark.parametrize("op", ["Add", "Mul", "Max", "Sub"])
def test_binary_two_branches_are_coupled(op):
    def middle(g, y):
        z = g.conv(g.op("Relu", [y]), C, C)
        return g.op(op, [y, z]), C
    r = assert_prunes(sandwich(middle))
    # both convs feeding the residual op are in one group
    assert any(sum(m.startswith("w") and m.endswith("[0]") for m in grp["members"]) >= 2
               for grp in r.report["groups"])


def test_squeeze_excitation_mul_broadcast():
    def middle(g, y):
        s = g.op("GlobalAveragePool", [y])
        s = g.op("Relu", [g.conv(s, C, 4, k=1)])
        s = g.op("Sigmoid", [g.conv(s, 4, C, k=1)])
        return g.op("Mul", [y, s]), C
    assert_prunes(sandwich(middle))


def test_where_and_clip_and_prelu():
    def middle(g, y):
        cond = g.op("Greater", [y, g.const(np.float32(0))])
        y = g.op("Where", [cond, y, g.op("Mul", [y, g.const(np.float32(0.1))])])
        y = g.op("Clip", [y, g.const(np.float32(-1)), g.const(np.float32(2))])
        y = g.op("PRelu", [y, g.const(np.full((C, 1, 1), 0.25, np.float32))])
        return g.op("Cast", [y], to=1), C
    assert_prunes(sandwich(middle))


def test_dropout_passes_channels():
    assert_prunes(sandwich(lambda g, y: (g.op("Dropout", [y]), C)))


# ---- convolutions -----------------------------------------------------------------------------

@pytest.mark.parametrize("dims", [1, 2, 3])
def test_conv_nd(dims):
    g = Graph()
    x = g.input([1, 3] + [6] * dims)
    y = g.op("Relu", [g.conv(x, 3, C, dims=dims)])
    g.output(g.conv(y, C, 4, dims=dims))
    assert_prunes(g.model())


@pytest.mark.parametrize("group", [2, 4])
def test_grouped_conv_prunes_within_groups(group):
    def middle(g, y):
        y = g.conv(g.op("Relu", [y]), C, 2 * C, group=group)
        return y, 2 * C
    r = assert_prunes(sandwich(middle), ratio=0.5)
    conv = [n for n in r.model.graph.node if n.op_type == "Conv"][1]
    new_group = [a.i for a in conv.attribute if a.name == "group"][0]
    w = {t.name: t for t in r.model.graph.initializer}[conv.input[1]]
    # per-group width kept and fewer groups, or the same groups with thinner ones
    assert new_group <= group and w.dims[0] % new_group == 0


@pytest.mark.parametrize("multiplier", [1, 2])
def test_depthwise_conv_changes_group(multiplier):
    def middle(g, y):
        return g.conv(g.op("Relu", [y]), C, C * multiplier, group=C), C * multiplier
    r = assert_prunes(sandwich(middle), ratio=0.5)
    dw = [n for n in r.model.graph.node if n.op_type == "Conv"][1]
    group = [a.i for a in dw.attribute if a.name == "group"][0]
    assert group < C and dw.input[1] in {t.name for t in r.model.graph.initializer}


def test_conv_transpose():
    def middle(g, y):
        w = g.weight(C, 6, 2, 2)
        return g.op("ConvTranspose", [y, w, g.weight(6)], strides=[2, 2]), 6
    assert_prunes(sandwich(middle))


def test_grouped_conv_transpose():
    def middle(g, y):
        w = g.weight(C, 3, 2, 2)
        return g.op("ConvTranspose", [y, w], strides=[2, 2], group=2), 6
    assert_prunes(sandwich(middle))


# ---- linear layers -------------------------------------------------------------------------

@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_chain(trans_b):
    g = Graph()
    x = g.input([2, 5])
    w1 = g.weight(*((16, 5) if trans_b else (5, 16)))
    h = g.op("Relu", [g.op("Gemm", [x, w1, g.weight(16)], transB=trans_b)])
    w2 = g.weight(*((3, 16) if trans_b else (16, 3)))
    g.output(g.op("Gemm", [h, w2, g.weight(3)], transB=trans_b))
    assert_prunes(g.model())


def test_matmul_constant_operand_3d():
    g = Graph()
    x = g.input([2, 4, 6])
    h = g.op("Add", [g.op("MatMul", [x, g.weight(6, 16)]), g.weight(16)])
    h = g.op("Relu", [h])
    g.output(g.op("MatMul", [h, g.weight(16, 5)]))
    assert_prunes(g.model())


def test_matmul_computed_operands():
    """q @ k^T ties q's and k's feature axis; the product is contracted over it."""
    g = Graph()
    x = g.input([1, 5, 6])
    q = g.op("MatMul", [x, g.weight(6, 16)])
    k = g.op("MatMul", [x, g.weight(6, 16)])
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 2, 1])])
    g.output(s)
    r = assert_prunes(g.model())
    assert r.report["after"]["macs"] < r.report["before"]["macs"]


def test_flatten_into_gemm():
    def middle(g, y):
        f = g.op("Flatten", [g.op("MaxPool", [y], kernel_shape=[2, 2], strides=[2, 2])], axis=1)
        return g.op("Gemm", [f, g.weight(7, C * 25), g.weight(7)], transB=1), None
    g = Graph()
    x = g.input([1, 3, 10, 10])
    y, _ = middle(g, g.op("Relu", [g.conv(x, 3, C)]))
    g.output(y)
    assert_prunes(g.model())


def test_reshape_flatten_into_matmul():
    g = Graph()
    x = g.input([1, 3, 4, 4])
    y = g.op("Relu", [g.conv(x, 3, C)])
    f = g.op("Reshape", [y, g.const(np.array([1, -1], np.int64))])
    g.output(g.op("MatMul", [f, g.weight(C * 16, 5)]))
    assert_prunes(g.model())


# ---- normalization -------------------------------------------------------------------------

def test_batch_norm():
    def middle(g, y):
        scale, bias = g.weight(C), g.weight(C)
        mean, var = g.weight(C), g.const(np.abs(g.rng.standard_normal(C)).astype(np.float32) + 0.5)
        return g.op("Relu", [g.op("BatchNormalization", [y, scale, bias, mean, var])]), C
    assert_prunes(sandwich(middle))


def test_instance_norm():
    assert_prunes(sandwich(lambda g, y: (g.op("InstanceNormalization", [y, g.weight(C), g.weight(C)]), C)))


def test_group_norm_prunes_whole_groups():
    def middle(g, y):
        return g.op("GroupNormalization", [y, g.weight(C), g.weight(C)], num_groups=4), C
    r = assert_prunes(sandwich(middle, opset=21), ratio=0.5)
    gn = [n for n in r.model.graph.node if n.op_type == "GroupNormalization"][0]
    assert [a.i for a in gn.attribute if a.name == "num_groups"] == [2]


@pytest.mark.parametrize("op,attrs", [("LayerNormalization", {"axis": 1}), ("Softmax", {"axis": 1}),
                                      ("ReduceMean", {"axes": [1]}), ("LRN", {"size": 3})])
def test_mixing_over_channels_blocks(op, attrs):
    def middle(g, y):
        inputs = [y] + ([g.weight(C, 10, 10), g.weight(C, 10, 10)] if op == "LayerNormalization" else [])
        return g.op(op, inputs, **attrs), (1 if op == "ReduceMean" else C)
    model = sandwich(middle, opset=17)
    r = spa.prune(model, ratio=0.5, round_to=1, verify=True)
    assert sum(grp["removed"] for grp in r.report["groups"]) == 0 or all(
        "w1[0]" not in grp["members"] for grp in r.report["groups"] if grp["removed"])
    assert any("mixes" in b["reason"] for b in r.report["blocked"])


def test_layer_norm_over_last_axis_keeps_channels_free():
    g = Graph()
    x = g.input([1, 4, 6])
    h = g.op("MatMul", [x, g.weight(6, 16)])
    h = g.op("Transpose", [g.op("Relu", [h])], perm=[0, 2, 1])     # (1, 16, 4)
    h = g.op("LayerNormalization", [h, g.weight(4), g.weight(4)], axis=-1)
    h = g.op("Transpose", [h], perm=[0, 2, 1])
    g.output(g.op("MatMul", [h, g.weight(16, 3)]))
    assert_prunes(g.model())


# ---- pooling and reductions ----------------------------------------------------------------

@pytest.mark.parametrize("op,attrs", [
    ("MaxPool", {"kernel_shape": [2, 2]}), ("AveragePool", {"kernel_shape": [3, 3], "strides": [2, 2]}),
    ("LpPool", {"kernel_shape": [2, 2]}), ("GlobalAveragePool", {}), ("GlobalMaxPool", {}),
])
def test_pool(op, attrs):
    assert_prunes(sandwich(lambda g, y: (g.op(op, [y], **attrs), C)))


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceMax", "ReduceSum", "ReduceL2"])
@pytest.mark.parametrize("opset", [13, 18])
def test_reduce_spatial(op, opset):
    def middle(g, y):
        if opset >= 18 or (op == "ReduceSum" and opset >= 13):
            return g.op(op, [y, g.const(np.array([2, 3], np.int64))], keepdims=1), C
        return g.op(op, [y], axes=[2, 3], keepdims=1), C
    assert_prunes(sandwich(middle, opset=opset))


def test_reduce_sum_over_channels_is_exact():
    g = Graph()
    x = g.input([1, 3, 6, 6])
    y = g.op("Relu", [g.conv(x, 3, C)])
    g.output(g.op("ReduceSum", [y, g.const(np.array([1], np.int64))], keepdims=0))
    assert_prunes(g.model())


# ---- layout --------------------------------------------------------------------------------

def test_transpose_and_back():
    def middle(g, y):
        t = g.op("Transpose", [y], perm=[0, 2, 3, 1])
        t = g.op("Mul", [t, g.weight(C)])   # channels-last broadcast
        return g.op("Transpose", [t], perm=[0, 3, 1, 2]), C
    assert_prunes(sandwich(middle))


@pytest.mark.parametrize("opset", [11, 13])
def test_squeeze_unsqueeze(opset):
    def middle(g, y):
        p = g.op("GlobalAveragePool", [y])
        if opset >= 13:
            s = g.op("Squeeze", [p, g.const(np.array([2, 3], np.int64))])
            return g.op("Unsqueeze", [s, g.const(np.array([2, 3], np.int64))]), C
        s = g.op("Squeeze", [p], axes=[2, 3])
        return g.op("Unsqueeze", [s], axes=[2, 3]), C
    assert_prunes(sandwich(middle, opset=opset))


def test_channel_shuffle_reshape_transpose():
    def middle(g, y):
        y = g.op("Relu", [y])
        r = g.op("Reshape", [y, g.const(np.array([1, 2, C // 2, 10, 10], np.int64))])
        t = g.op("Transpose", [r], perm=[0, 2, 1, 3, 4])
        return g.op("Reshape", [t, g.const(np.array([1, C, 10, 10], np.int64))]), C
    r = assert_prunes(sandwich(middle))
    shapes = [t for t in r.model.graph.initializer if t.data_type == 7]
    assert any(list(np.frombuffer(t.raw_data, np.int64))[:3] == [1, 2, 2] for t in shapes)


# ---- offsets -------------------------------------------------------------------------------

def test_concat_of_branches():
    def middle(g, y):
        a = g.conv(g.op("Relu", [y]), C, 6)
        b = g.conv(g.op("Relu", [y]), C, 4)
        return g.op("Concat", [a, y, b], axis=1), 6 + C + 4
    assert_prunes(sandwich(middle))


@pytest.mark.parametrize("opset", [11, 13, 18])
def test_split(opset):
    def middle(g, y):
        if opset >= 13:
            a, b = g.op("Split", [y, g.const(np.array([3, 5], np.int64))], n_out=2, axis=1)
        else:
            a, b = g.op("Split", [y], n_out=2, axis=1, split=[3, 5])
        return g.op("Concat", [g.op("Relu", [b]), a], axis=1), C
    assert_prunes(sandwich(middle, opset=opset))


def test_split_equal_parts_without_sizes():
    def middle(g, y):
        a, b = g.op("Split", [y], n_out=2, axis=1, num_outputs=2)
        return g.op("Add", [g.op("Relu", [a]), b]), C // 2
    assert_prunes(sandwich(middle, opset=18))


@pytest.mark.parametrize("opset", [9, 13])
def test_slice(opset):
    def middle(g, y):
        if opset >= 10:
            ins = [y] + [g.const(np.array(v, np.int64)) for v in ([2], [7], [1], [1])]
            return g.op("Slice", ins), 5
        return g.op("Slice", [y], starts=[2], ends=[7], axes=[1]), 5
    assert_prunes(sandwich(middle, opset=opset))


def test_pad_spatial():
    def middle(g, y):
        return g.op("Pad", [y, g.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]), C
    assert_prunes(sandwich(middle, opset=13))


@pytest.mark.parametrize("op", ["Resize", "Upsample"])
def test_resize(op):
    def middle(g, y):
        scales = g.const(np.array([1, 1, 2, 2], np.float32))
        if op == "Resize":
            return g.op("Resize", [y, "", scales], mode="nearest"), C
        return g.op("Upsample", [y, scales], mode="nearest"), C
    assert_prunes(sandwich(middle, opset=13 if op == "Resize" else 9))


def test_resize_with_sizes_is_rewritten():
    def middle(g, y):
        sizes = g.const(np.array([1, C, 20, 20], np.int64))
        return g.op("Resize", [y, "", "", sizes], mode="nearest"), C
    assert_prunes(sandwich(middle, opset=13))


def test_expand_and_tile():
    def middle(g, y):
        p = g.op("GlobalAveragePool", [y])
        e = g.op("Expand", [p, g.const(np.array([1, C, 10, 10], np.int64))])
        t = g.op("Tile", [e, g.const(np.array([1, 1, 1, 1], np.int64))])
        return g.op("Add", [t, y]), C
    assert_prunes(sandwich(middle))


def test_gather_on_spatial_axis_keeps_channels():
    def middle(g, y):
        return g.op("Gather", [y, g.const(np.array([0, 2, 4], np.int64))], axis=3), C
    assert_prunes(sandwich(middle))


def test_gather_of_a_channel_blocks_that_axis():
    def middle(g, y):
        pick = g.op("Gather", [y, g.const(np.array([1, 3], np.int64))], axis=1)
        return pick, 2
    r = spa.prune(sandwich(middle), ratio=0.5, round_to=1, verify=True)
    assert r.report["verify"]["ok"]
    assert all(grp["removed"] == 0 for grp in r.report["groups"] if "w1[0]" in grp["members"])


def test_shape_of_pruned_tensor_computes_new_sizes():
    """x.view(x.size(0), x.size(1), -1): the Shape-derived dims follow the pruned channels."""
    g = Graph()
    x = g.input([1, 3, 6, 6])
    y = g.op("Relu", [g.conv(x, 3, C)])
    shape = g.op("Shape", [y])
    dims = g.op("Slice", [shape, g.const(np.array([0], np.int64)), g.const(np.array([2], np.int64))])
    target = g.op("Concat", [dims, g.const(np.array([-1], np.int64))], axis=0)
    r3 = g.op("Reshape", [y, target])
    s = g.op("ReduceSum", [r3, g.const(np.array([2], np.int64))], keepdims=0)   # (1, C)
    g.output(g.op("Gemm", [s, g.weight(C, 4)]))
    assert_prunes(g.model())


def test_unknown_op_blocks_only_what_it_touches():
    g = Graph()
    x = g.input([1, 3, 6, 6])
    a = g.op("Relu", [g.conv(x, 3, C)])
    b = g.conv(a, C, C)
    g.nodes.append(onnx.helper.make_node("MyOp", [b], ["custom"], domain="my.domain", name="mine"))
    g.output("custom")
    model = g.model(domains=["my.domain"])
    analysis = spa.analyze(model)
    assert any("my.domain.MyOp" in r for _, _, r in analysis.dep.blocked_nodes)
    assert [grp.size for grp in analysis.groups] == [C]  # the first conv's channels stay free
    with pytest.raises(spa.StrictModeError):
        spa.prune(model, strict=True, verify=False)


def test_cumsum_and_gather_elements_keep_channels_free():
    def middle(g, y):
        c = g.op("CumSum", [y, g.const(np.array(2, np.int64))])
        idx = g.const(np.zeros((1, C, 10, 10), np.int64))
        return g.op("Add", [c, g.op("GatherElements", [y, idx], axis=3)]), C
    assert_prunes(sandwich(middle))


def test_reshape_size_read_from_another_tensor_ties_the_two():
    """x.view(b, n, other.shape[-1]): the output width must stay equal to ``other``'s."""
    g = Graph()
    x = g.input([1, 4, 6])
    other = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 8)])])          # (1, 4, 8), prunable
    h = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 8)])])              # (1, 4, 8), prunable
    t = g.op("Transpose", [g.op("Reshape", [h, g.const(np.array([1, 4, 2, 4], np.int64))])],
             perm=[0, 1, 3, 2])
    shape = g.op("Shape", [other])
    target = g.op("Concat", [g.op("Slice", [shape, g.const(np.array([0], np.int64)), g.const(np.array([2], np.int64))]),
                             g.op("Slice", [shape, g.const(np.array([2], np.int64)), g.const(np.array([3], np.int64))])],
                  axis=0)
    merged = g.op("Reshape", [t, target])
    g.output(g.op("Add", [g.op("MatMul", [merged, g.weight(8, 3)]), g.op("MatMul", [other, g.weight(8, 3)])]))
    r = assert_prunes(g.model())
    assert r.report["verify"]["ok"]


def test_scatter_nd_passes_trailing_channels():
    def middle(g, y):
        t = g.op("Transpose", [y], perm=[2, 3, 0, 1])                      # (10, 10, 1, C)
        idx = g.const(np.array([[0, 0], [3, 4]], np.int64))
        upd = g.op("Relu", [g.op("Gather", [t, g.const(np.array([0, 1], np.int64))], axis=0)])  # (2, 10, 1, C)
        upd = g.op("Gather", [upd, g.const(np.array(0, np.int64))], axis=1)                   # (2, 1, C)
        s = g.op("ScatterND", [t, idx, upd])
        return g.op("Transpose", [s], perm=[2, 3, 0, 1]), C
    assert_prunes(sandwich(middle))


def test_size_used_as_a_number_is_not_pruned():
    """x * (1 / sqrt(x.shape[-1])): removing a channel would change the scale."""
    g = Graph()
    x = g.input([1, 4, 6])
    h = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 16)])])
    d = g.op("Cast", [g.op("Gather", [g.op("Shape", [h]), g.const(np.array(-1, np.int64))])], to=1)
    scaled = g.op("Div", [h, g.op("Sqrt", [d])])
    g.output(g.op("MatMul", [scaled, g.weight(16, 3)]))
    r = spa.prune(g.model(), ratio=0.5, round_to=1, verify=True)
    assert r.report["verify"]["ok"]
    assert all(grp["removed"] == 0 for grp in r.report["groups"])
    assert any("used as a number" in b["reason"] for b in r.report["blocked"])


def test_argmax_and_topk_over_spatial_axes_keep_channels_free():
    def middle(g, y):
        values, _ = g.op("TopK", [y, g.const(np.array([3], np.int64))], n_out=2, axis=3)
        am = g.op("Cast", [g.op("ArgMax", [y], axis=2, keepdims=1)], to=1)    # (1, C, 1, 10)
        return g.op("Add", [g.op("ReduceSum", [values, g.const(np.array([3], np.int64))], keepdims=1), am]), C
    assert_prunes(sandwich(middle))
