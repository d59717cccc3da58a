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


@pytest.mark.parametrize("like_activation", [False, True])
def test_cast_like(like_activation):
    """CastLike(y, ...) passes y's channels; CastLike(scalar, y) (the dynamo exporter's zero
    bias, unoptimized) reads only y's type and must not tie y's axes to a scalar."""
    def middle(g, y):
        if like_activation:
            zero = g.op("CastLike", [g.const(np.array(0.5, np.float64)), y])
            return g.op("Add", [y, zero]), C
        return g.op("CastLike", [y, g.const(np.zeros(1, np.float32))]), C
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


def _grouped_block(c=32, group=4, bn=False, tail=True):
    """x -> conv 1x1 (3 -> c) -> Relu -> grouped conv 3x3 (c -> c) [-> BN] -> Relu [-> conv 1x1 (c -> 4)]."""
    g = Graph()
    y = g.op("Relu", [g.conv(g.input([1, 3, 6, 6]), 3, c, k=1)])
    y = g.conv(y, c, c, k=3, group=group)
    if bn:
        var = g.const(np.abs(g.rng.standard_normal(c)).astype(np.float32) + 0.5)
        y = g.op("BatchNormalization", [y, g.weight(c), g.weight(c), g.weight(c), var])
    y = g.op("Relu", [y])
    g.output(g.conv(y, c, 4, k=1) if tail else y)
    return g.model()


def _conv_weights(model):
    inits = {t.name: t for t in model.graph.initializer}
    return [(list(inits[n.input[1]].dims), next(a.i for a in n.attribute if a.name == "group"))
            for n in model.graph.node if n.op_type == "Conv"]


@pytest.mark.parametrize("group,bn", [(2, False), (4, True), (8, False), (16, True)])
def test_group_width_thins_every_group(group, bn):
    """--group-width: the same positions go from every group, the group count stays; where
    there are more groups than channels per group (RegNet, ResNeXt) the width was whole."""
    c = 32
    r = assert_prunes(_grouped_block(c, group, bn), ratio=None, group_width=0.5)
    (w1, _), (w2, new_group), (w3, _) = _conv_weights(r.model)
    assert new_group == group
    assert w2[:2] == [c // 2, c // group // 2]        # out channels and in per group, halved
    assert w1[0] == c // 2 and w3[1] == c // 2
    assert {grp["kind"] for grp in r.report["groups"] if grp["removed"]} == {"group-width"}


def test_group_width_after_whole_groups():
    """--ratio removes whole groups (8 groups of 4), --group-width then thins those left."""
    r = assert_prunes(_grouped_block(32, 8, tail=True), ratio=0.5, group_width=0.5)
    (_, _), (w2, new_group), (_, _) = _conv_weights(r.model)
    assert new_group == 4 and w2[:2] == [8, 2]


def test_group_width_without_tail_or_bn():
    r = assert_prunes(_grouped_block(16, 4, tail=False), ratio=None, group_width=0.5)
    assert _conv_weights(r.model)[1] == ([16, 2, 3, 3], 4)   # output channels are the graph's


@pytest.mark.parametrize("multiplier", [1, 2])
def test_group_width_leaves_depthwise_alone(multiplier):
    """A depthwise conv has one channel per group: its groups are the channels, and
    --group-width leaves it as --ratio prunes it."""
    def middle(g, y):
        return g.conv(g.op("Relu", [y]), C, C * multiplier, group=C), C * multiplier
    r = assert_prunes(sandwich(middle), ratio=0.5, group_width=0.5)
    assert not any(grp["kind"] == "group-width" for grp in r.report["groups"])
    dw = [n for n in r.model.graph.node if n.op_type == "Conv"][1]
    assert [a.i for a in dw.attribute if a.name == "group"][0] == C // 2


def test_group_width_analysis_kinds():
    model = _grouped_block(32, 8)
    auto = spa.analyze(model)
    width = spa.analyze(model, conv_groups="width")
    assert sorted(g.kind for g in auto.groups) == ["channels"]           # 8 groups of 4 carry
    assert sorted((g.kind, g.size) for g in width.groups) == [("group-width", 4), ("group-width", 4)]
    assert any("merges this axis" in g.blocked for g in auto.blocked)    # the width was whole
    assert not any("merges this axis" in g.blocked for g in width.blocked)


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


def _concat_flatten_gemm(pieces, hw=6):
    """x [1, 6, hw, hw] -> pieces(g, x) -> Concat(axis 1) -> Flatten -> Gemm -> out; the Gemm
    weight's rows (``<w>[0]``) follow the concatenated channels, hw * hw rows each."""
    g = Graph()
    x = g.input([1, 6, hw, hw])
    parts, c = pieces(g, x)
    f = g.op("Flatten", [g.op("Concat", parts, axis=1)], axis=1)
    w = g.weight(c * hw * hw, 5)
    g.output(g.op("Gemm", [f, w]))
    return g.model(), w + "[0]"


def _flatten_rows_follow(model, rows, *filters):
    """Each conv named by index in ``filters`` loses channels in a group holding ``rows``."""
    r = assert_prunes(model, ratio=0.25)
    for k in filters:
        grp = [grp for grp in r.report["groups"] if conv_filters(model, k) in grp["members"]]
        assert grp and grp[0]["removed"] > 0 and rows in grp[0]["members"]
    return r


def test_flatten_of_concat_with_a_fixed_piece():
    """Concat of a prunable conv and the graph input (fixed) -> Flatten: the merged axis
    (10 x 6 x 6) has no free factor, only a partly free one, which must still carry the
    channels (it used to be treated as fixed: the Gemm rows were left out of the conv's group
    and the pruned model failed)."""
    model, rows = _concat_flatten_gemm(lambda g, x: ([g.op("Relu", [g.conv(x, 6, 4)]), x], 10))
    _flatten_rows_follow(model, rows, 0)


def test_flatten_of_concat_with_a_grouped_conv_piece():
    """The hypothesis case: a grouped conv (6 -> 2, group 2: its groups cannot be pruned, the
    input's per-group width of 3 carries) feeds two convs, and all three are concatenated, then
    flattened into a Gemm: the two convs' groups take their Gemm rows along."""
    def pieces(g, x):
        y = g.op("Relu", [g.conv(g.op("Relu", [g.conv(x, 6, 6)]), 6, 2, group=2)])
        a = g.op("Relu", [g.conv(y, 2, 4)])
        return [a, g.conv(y, 2, 4), y], 10
    model, rows = _concat_flatten_gemm(pieces)
    _flatten_rows_follow(model, rows, 2, 3)


def test_flatten_of_concat_of_prunable_convs():
    """Control: every piece prunable, the channel axis carries as before."""
    def pieces(g, x):
        return [g.op("Relu", [g.conv(x, 6, 4)]), g.conv(x, 6, 6)], 10
    model, rows = _concat_flatten_gemm(pieces)
    _flatten_rows_follow(model, rows, 0, 1)


def test_partly_fixed_factor_beside_a_free_one_is_fixed():
    """A merged axis [6 (4 prunable rows of W0, 2 of a graph input), 8 (W1's columns)]: the
    free factor carries, so the partly free one must be fixed whole (it was left free, and
    W0's rows were removed without the rows of W2 that read them)."""
    g = Graph()
    x, x2 = g.input([1, 3, 5]), g.input([1, 2, 5], name="x2")
    p = g.op("MatMul", [g.weight(4, 3), x])
    h = g.op("Relu", [g.op("MatMul", [g.op("Concat", [p, x2], axis=1), g.weight(5, 8)])])
    f = g.op("Reshape", [h, g.const(np.array([1, -1], np.int64))])
    g.output(g.op("MatMul", [f, g.weight(48, 3)]))
    model = g.model()
    r = assert_prunes(model)
    w0 = [n for n in model.graph.node if n.op_type == "MatMul"][0].input[0] + "[0]"
    assert is_blocked(r, w0)
    assert removed_with(r, matmul_columns(model, 1)) > 0


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


def test_group_norm_18_per_group_scale():
    """GroupNormalization-18 (deprecated in 21, still run by onnxruntime) has one scale and
    bias per group: they lose the removed groups."""
    g = Graph(18)
    y = g.conv(g.input([1, 3, 6, 6]), 3, 16)
    y = g.op("GroupNormalization", [y, g.weight(4), g.weight(4)], num_groups=4)
    g.output(g.conv(g.op("Relu", [y]), 16, 4))
    r = spa.prune(g.model(check=False), ratio=0.5, criterion="random", round_to=1, verify=True)
    assert r.report["verify"]["ok"], r.report["verify"]
    gn = [n for n in r.model.graph.node if n.op_type == "GroupNormalization"][0]
    inits = {t.name: t for t in r.model.graph.initializer}
    assert [a.i for a in gn.attribute if a.name == "num_groups"] == [2]
    assert list(inits[gn.input[1]].dims) == list(inits[gn.input[2]].dims) == [2]
    assert _conv_weights(r.model)[0][0][0] == 8


def test_group_norm_21_with_exporter_value_info():
    """onnx cannot infer GroupNormalization-21's output; an exporter's value_info can. The
    shape check must not hold that against the pruned model, whose value_info is gone."""
    def middle(g, y):
        return g.op("GroupNormalization", [y, g.weight(C), g.weight(C)], num_groups=4), C
    model = sandwich(middle, opset=21)
    gn = [n for n in model.graph.node if n.op_type == "GroupNormalization"][0]
    model.graph.value_info.append(onnx.helper.make_tensor_value_info(gn.output[0], onnx.TensorProto.FLOAT,
                                                                     [1, C, 10, 10]))
    out = model.graph.output[0]   # declared as the exporter would: Graph() could not infer it
    out.CopyFrom(onnx.helper.make_tensor_value_info(out.name, onnx.TensorProto.FLOAT, [1, 4, 10, 10]))
    onnx.shape_inference.infer_shapes(model, strict_mode=True)   # the original passes with its value_info
    assert_prunes(model, ratio=0.5)


def _decomposed_group_norm(c, groups):
    """conv -> Reshape [N, G, -1] -> InstanceNormalization -> Reshape back -> Mul/Add -> conv."""
    g = Graph()
    y = g.conv(g.input([1, 3, 6, 6]), 3, c)
    r = g.op("Reshape", [y, g.const(np.array([0, groups, -1], np.int64))])
    n = g.op("InstanceNormalization", [r, g.const(np.ones(groups, np.float32)), g.const(np.zeros(groups, np.float32))])
    s = g.op("Reshape", [n, g.op("Shape", [y])])
    s = g.op("Add", [g.op("Mul", [s, g.weight(c, 1, 1)]), g.weight(c, 1, 1)])
    g.output(g.conv(g.op("Relu", [s]), c, 4))
    return g.model()


@pytest.mark.parametrize("c,groups", [(16, 2), (16, 4), (16, 8)])
def test_decomposed_group_norm_prunes_whole_groups(c, groups):
    """The exporters' GroupNorm: Reshape [N, G, -1] -> InstanceNormalization -> Reshape to
    the input's shape -> Mul/Add per channel. C = G x C/G: whole groups go, G is rewritten,
    whichever of G and C/G is larger (C/G*H*W is normalized over, so C/G cannot carry)."""
    res = assert_prunes(_decomposed_group_norm(c, groups), ratio=0.5)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in res.model.graph.initializer}
    first = [n for n in res.model.graph.node if n.op_type == "Reshape"][0]
    inorm = [n for n in res.model.graph.node if n.op_type == "InstanceNormalization"][0]
    assert inits[first.input[1]].tolist() == [0, groups // 2, -1]
    assert inits[inorm.input[1]].shape == (groups // 2,)
    assert _conv_weights(res.model)[0][0][0] == c // 2


@pytest.mark.parametrize("c,groups,kept", [(32, 8, 16), (48, 4, 24), (24, 8, 24)])
def test_decomposed_group_norm_rounds_weight_channels(c, groups, kept):
    """The default rounding (keep a multiple of 8) counts conv filters, not GroupNorm groups:
    8 groups of 4 filters lose 4 groups (16 filters kept), 4 groups of 12 lose 2 (24 kept);
    8 groups of 3 filters stay whole (no fewer groups keep a multiple of 8 filters). Before,
    a group of at most 8 GroupNorm groups was always left whole: every diffusers UNet block."""
    res = spa.prune(_decomposed_group_norm(c, groups), ratio=0.5, criterion="random", verify=True)
    assert res.report["verify"]["ok"], res.report["verify"]
    assert _conv_weights(res.model)[0][0][0] == kept
    assert [grp["removed"] for grp in res.report["groups"]] == [(c - kept) // (c // groups)]


def test_reshape_regrouping_without_common_axes_stays_whole():
    """[1, 8, 6] -> [1, 6, 8]: no axis of one is a product of axes of the other. Neither
    side may lose channels (the output side was left free: the MatMul's rows were cut and
    the Reshape failed at run time)."""
    g = Graph()
    y = g.conv(g.input([1, 3, 6]), 3, 8, dims=1)
    r = g.op("Reshape", [y, g.const(np.array([1, 6, 8], np.int64))])
    g.output(g.op("MatMul", [g.op("Relu", [r]), g.weight(8, 5)]))
    r = assert_prunes(g.model(), ratio=0.5, expect_removed=False)
    assert sum(grp["removed"] for grp in r.report["groups"]) == 0


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


def test_reshape_size_read_from_another_tensor():
    """x.view(b, n, other.shape[-1]): the width read is a Concat piece of its own, which
    becomes a constant when either width changes, so the two are pruned apart."""
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


def _shape_dim(g, t, axis):
    """Unsqueeze(Gather(Shape(t), axis)): a size the legacy exporter reads at run time."""
    d = g.op("Gather", [g.op("Shape", [t]), g.const(np.array(axis, np.int64))])
    return g.op("Unsqueeze", [d, g.const(np.array([0], np.int64))])


def _legacy_window_attention(g, x, c=8, heads=2, n=4):
    """torchvision's shifted_window_attention as the legacy exporter writes it: the head
    size is ``C // heads`` computed from the input's width (Shape -> Gather -> Div -> Cast),
    the scale ``(C // heads) ** -0.5`` reads it as a number, and the output is reshaped to
    ``(b, n, C)`` with C read from the input again."""
    c_dim = g.op("Gather", [g.op("Shape", [x]), g.const(np.array(2, np.int64))])
    head = g.op("Cast", [g.op("Div", [c_dim, g.const(np.array(heads, np.int64))])], to=7)
    target = g.op("Concat", [_shape_dim(g, x, 0), _shape_dim(g, x, 1), g.const(np.array([3, heads], np.int64)),
                             g.op("Unsqueeze", [head, g.const(np.array([0], np.int64))])], axis=0)
    qkv = g.op("Add", [g.op("MatMul", [x, g.weight(c, 3 * c)]), g.weight(3 * c)])
    qkv = g.op("Transpose", [g.op("Reshape", [qkv, target])], perm=[2, 0, 3, 1, 4])     # 3, b, h, n, d
    q, k, v = (g.op("Gather", [qkv, g.const(np.array(i, np.int64))], axis=0) for i in range(3))
    scale = g.op("Pow", [g.op("Cast", [head], to=1), g.const(np.array(-0.5, np.float32))])
    att = g.op("Softmax", [g.op("MatMul", [g.op("Mul", [q, scale]), g.op("Transpose", [k], perm=[0, 1, 3, 2])])],
               axis=-1)
    o = g.op("Transpose", [g.op("MatMul", [att, v])], perm=[0, 2, 1, 3])                # b, n, h, d
    back = g.op("Concat", [_shape_dim(g, o, 0), _shape_dim(g, o, 1), _shape_dim(g, x, 2)], axis=0)
    return g.op("Add", [g.op("MatMul", [g.op("Reshape", [o, back]), g.weight(c, c)]), g.weight(c)])


@pytest.mark.parametrize("attention", ["heads", "head-dims"])
def test_legacy_window_attention_sizes_computed_from_the_width(attention):
    """Heads (or head dims) are pruned although the output size is read from the input's
    width and the head size is computed from it: those pieces become constants."""
    g = Graph()
    x = g.input([1, 4, 8])
    g.output(g.op("MatMul", [_legacy_window_attention(g, x), g.weight(8, 3)]))
    r = assert_prunes(g.model(), ratio=None, **{attention.replace("-", "_"): 0.5})
    assert {grp["kind"] for grp in r.report["groups"] if grp["removed"]} == {attention}


def test_size_read_from_a_pruned_width_keeps_its_old_value():
    """out.view(b, n, other.shape[-1]) where ``out`` cannot shrink (a graph output) but
    ``other`` can: the piece read from ``other`` becomes the constant it was."""
    g = Graph()
    x = g.input([1, 4, 6])
    other = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 8)])])
    h = g.op("MatMul", [x, g.weight(6, 8)])
    t = g.op("Transpose", [g.op("Reshape", [h, g.const(np.array([1, 4, 2, 4], np.int64))])], perm=[0, 1, 3, 2])
    target = g.op("Concat", [g.const(np.array([1, 4], np.int64)), _shape_dim(g, other, 2)], axis=0)
    g.output(g.op("Reshape", [t, target]))
    g.output(g.op("MatMul", [other, g.weight(8, 3)]))
    r = assert_prunes(g.model())
    assert [grp["removed"] for grp in r.report["groups"]] == [4]
    concat = next(n for n in r.model.graph.node if n.op_type == "Concat")
    assert concat.input[1] in {t.name for t in r.model.graph.initializer}


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
    numeric = [t for b in r.report["blocked"] for t in b["reasons"] if t["kind"] == "numeric"]
    assert numeric and all(t["op"] == "Cast" for t in numeric)   # where the size turns into a float


def test_argmax_and_topk_over_spatial_axes_keep_channels_free():
    def middle(g, y):
        values, _ = g.op("TopK", [y, g.const(np.array([3], np.int64))], n_out=2, axis=3)
        am = g.op("Cast", [g.op("ArgMax", [y], axis=2, keepdims=1)], to=1)    # (1, C, 1, 10)
        return g.op("Add", [g.op("ReduceSum", [values, g.const(np.array([3], np.int64))], keepdims=1), am]), C
    assert_prunes(sandwich(middle))


# ---- every op with a rule: the rule prunes where it may and blocks where it must ----------

def removed_with(r, member):
    """Channels removed from the group that holds ``member`` (``"w3[0]"``); 0 if it is blocked."""
    return sum(grp["removed"] for grp in r.report["groups"] if member in grp["members"])


def is_blocked(r, member):
    """``member`` is in no prunable group (a group fixed only as "not a channel axis" may not
    be listed under ``blocked`` at all)."""
    return not any(member in grp["members"] for grp in r.report["groups"])


def matmul_columns(model, k):
    """``"<weight>[1]"`` of the k-th MatMul node."""
    return [n for n in model.graph.node if n.op_type == "MatMul"][k].input[1] + "[1]"


def conv_filters(model, k):
    """``"<weight>[0]"`` of the k-th Conv node."""
    return [n for n in model.graph.node if n.op_type == "Conv"][k].input[1] + "[0]"


def two_convs(middle, opset=17, shape=(1, 3, 10, 10)):
    """x -> conv A (3 -> C) -> relu -> conv B (C -> C) -> middle(g, y) -> conv(C' -> 4) -> out.
    A's filters (``conv_filters(model, 0)``) are always prunable, B's whatever ``middle`` allows."""
    g = Graph(opset)
    y = g.conv(g.input(list(shape)), shape[1], C)
    y = g.conv(g.op("Relu", [y]), C, C)
    y, c_out = middle(g, y)
    g.output(g.conv(y, c_out, 4))
    return g.model()


def assert_b_blocked(model, why=None):
    """Conv A is pruned, conv B (feeding the op under test) is left whole; the oracle holds."""
    r = assert_prunes(model)
    a, b = conv_filters(model, 0), conv_filters(model, 1)
    assert removed_with(r, a) > 0
    assert removed_with(r, b) == 0 and is_blocked(r, b)
    if why:
        assert any(why in x["reason"] for x in r.report["blocked"] if b in x["members"])
    return r


def assert_b_pruned(model):
    r = assert_prunes(model)
    assert removed_with(r, conv_filters(model, 0)) > 0 and removed_with(r, conv_filters(model, 1)) > 0
    return r


@pytest.mark.parametrize("op,attrs", [("DepthToSpace", {"blocksize": 2, "mode": "DCR"}),
                                      ("DepthToSpace", {"blocksize": 2, "mode": "CRD"}),
                                      ("SpaceToDepth", {"blocksize": 2})])
def test_depth_space_rearrangement_blocks_channels(op, attrs):
    """Output channel c reads a strided set of input channels: the channel axis stays whole."""
    c_out = C // 4 if op == "DepthToSpace" else C * 4
    assert_b_blocked(two_convs(lambda g, y: (g.op(op, [y], **attrs), c_out)))


def test_gather_nd_on_leading_axis_passes_channels():
    def middle(g, y):   # indices (2, 1) pick batch rows: output (2, C, 10, 10)
        return g.op("GatherND", [y, g.const(np.array([[0], [0]], np.int64))]), C
    assert_b_pruned(two_convs(middle))


def test_gather_nd_with_batch_dims_passes_channels():
    def middle(g, y):   # batch_dims=1, indices (1, 3, 1) index H: output (1, 3, C... ) -> via transpose
        t = g.op("Transpose", [y], perm=[0, 2, 3, 1])                          # (1, 10, 10, C)
        idx = g.const(np.array([[[2], [5], [7]]], np.int64))                    # (1, 3, 1)
        s = g.op("GatherND", [t, idx], batch_dims=1)                           # (1, 3, 10, C)
        return g.op("Transpose", [s], perm=[0, 3, 1, 2]), C                    # (1, C, 3, 10)
    assert_b_pruned(two_convs(middle))


def test_gather_nd_indexing_the_channel_axis_blocks():
    def middle(g, y):   # indices (3, 2) pick (batch, channel) pairs: output (3, 10, 10)
        s = g.op("GatherND", [y, g.const(np.array([[0, 1], [0, 5], [0, 6]], np.int64))])
        return g.op("Unsqueeze", [s, g.const(np.array([0], np.int64))]), 3
    assert_b_blocked(two_convs(middle))


def test_scatter_elements_off_channel_axis_passes_channels():
    def middle(g, y):
        upd = g.op("Slice", [g.op("Relu", [y]), g.const(np.array([0], np.int64)),
                             g.const(np.array([2], np.int64)), g.const(np.array([3], np.int64))])  # (1, C, 10, 2)
        idx = np.zeros((1, C, 10, 2), np.int64)
        idx[..., 0], idx[..., 1] = 1, 7
        return g.op("ScatterElements", [y, g.const(idx), upd], axis=3), C
    assert_b_pruned(two_convs(middle))


def test_scatter_elements_along_channel_axis_blocks():
    def middle(g, y):
        upd = g.op("Slice", [g.op("Relu", [y]), g.const(np.array([0], np.int64)),
                             g.const(np.array([2], np.int64)), g.const(np.array([1], np.int64))])  # (1, 2, 10, 10)
        idx = np.zeros((1, 2, 10, 10), np.int64)
        idx[:, 0], idx[:, 1] = 3, 6
        return g.op("ScatterElements", [y, g.const(idx), upd], axis=1), C
    assert_b_blocked(two_convs(middle))


def test_max_roi_pool_passes_channels():
    def middle(g, y):
        rois = g.const(np.array([[0, 0, 0, 6, 6], [0, 2, 3, 9, 9]], np.float32))
        return g.op("MaxRoiPool", [y, rois], pooled_shape=[3, 3]), C            # (2, C, 3, 3)
    assert_b_pruned(two_convs(middle))


@pytest.mark.parametrize("op,attrs", [("LpNormalization", {"axis": -1, "p": 2}),
                                      ("LpNormalization", {"axis": 2, "p": 1}),
                                      ("Hardmax", {"axis": -1}), ("LogSoftmax", {"axis": -1}),
                                      ("LogSoftmax", {"axis": 2})])
def test_normalizing_over_a_spatial_axis_passes_channels(op, attrs):
    assert_b_pruned(two_convs(lambda g, y: (g.op(op, [y], **attrs), C), opset=13))


@pytest.mark.parametrize("op,attrs", [("LpNormalization", {"axis": 1, "p": 2}),
                                      ("Hardmax", {"axis": 1}), ("LogSoftmax", {"axis": 1})])
def test_normalizing_over_channels_blocks(op, attrs):
    assert_b_blocked(two_convs(lambda g, y: (g.op(op, [y], **attrs), C), opset=13), why="mixes")


@pytest.mark.parametrize("op", ["LogSoftmax", "Hardmax"])
@pytest.mark.parametrize("opset,prunable", [(11, False), (13, True)])
def test_softmax_family_before_opset13_flattens_trailing_axes(op, opset, prunable):
    """Opset < 13 coerces to 2-D at ``axis``: axis 1 of (1, 4, C) then mixes the C axis too."""
    g = Graph(opset)
    x = g.input([1, 4, 6])
    h = g.op("Relu", [g.op("MatMul", [x, g.weight(6, 16)])])                  # w1: (6, 16)
    h = g.op(op, [h], axis=1)
    g.output(g.op("MatMul", [h, g.weight(16, 3)]))
    model = g.model()
    r = assert_prunes(model, expect_removed=prunable)
    w = matmul_columns(model, 0)
    if prunable:
        assert removed_with(r, w) > 0
    else:
        assert removed_with(r, w) == 0 and is_blocked(r, w)


@pytest.mark.parametrize("axis,keepdims", [(2, 1), (3, 0), (0, 0)])
def test_arg_min_off_channel_axis_passes_channels(axis, keepdims):
    def middle(g, y):
        a = g.op("Cast", [g.op("ArgMin", [y], axis=axis, keepdims=keepdims)], to=1)
        if not keepdims:
            a = g.op("Unsqueeze", [a, g.const(np.array([axis], np.int64))])
        return g.op("Add", [y, a]), C
    assert_b_pruned(two_convs(middle))


def test_arg_min_over_channels_blocks():
    def middle(g, y):
        a = g.op("Cast", [g.op("ArgMin", [y], axis=1, keepdims=1)], to=1)      # (1, 1, 10, 10)
        return g.op("Mul", [g.op("Relu", [y]), a]), C
    assert_b_blocked(two_convs(middle), why="mixes")


def test_size_used_as_a_number_blocks():
    """y / size(y): removing a channel changes the element count, so the value."""
    def middle(g, y):
        n = g.op("Cast", [g.op("Size", [y])], to=1)
        return g.op("Div", [y, n]), C
    assert_b_blocked(two_convs(middle), why="used as a number")


def test_size_feeding_a_range_blocks():
    """Size(y) only sizes a Range whose max is a side output: pruning y would change that
    output (Range's output is fixed, nothing rewrites its length), so y is left whole."""
    def middle(g, y):
        n = g.op("Size", [y])
        rng = g.op("Range", [g.const(np.array(0, np.int64)), n, g.const(np.array(1, np.int64))])
        g.output(g.op("ReduceMax", [g.op("Cast", [rng], to=1)], keepdims=0))
        return g.op("Relu", [y]), C
    assert_b_blocked(two_convs(middle), why="used as a number")


def test_eye_like_blocks_the_columns_it_is_added_to():
    """EyeLike's 1 in column j sits on row j: removing a column moves the diagonal."""
    g = Graph()
    x = g.input([4, 6])
    a = g.op("Relu", [g.op("MatMul", [x, g.weight(6, C)])])                    # w1: free control
    h = g.op("MatMul", [a, g.weight(C, C)])                                    # w2
    h = g.op("Add", [h, g.op("EyeLike", [h], k=1)])
    g.output(g.op("MatMul", [h, g.weight(C, 3)]))
    model = g.model()
    r = assert_prunes(model)
    assert removed_with(r, matmul_columns(model, 0)) > 0
    assert removed_with(r, matmul_columns(model, 1)) == 0 and is_blocked(r, matmul_columns(model, 1))


def test_constant_of_shape_prunes_with_its_literal_size():
    """One value everywhere, C a literal of its shape vector: the literal is rewritten and
    the channels it is added to prune (it blocked them until the DynamicQuantizeLSTM work:
    ddddocr's LSTM states are ConstantOfShape(Concat([2], batch, [512])))."""
    def middle(g, y):
        ones = g.op("ConstantOfShape", [g.const(np.array([1, C, 1, 1], np.int64))],
                    value=onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.5]))
        return g.op("Add", [y, ones]), C
    assert_b_pruned(two_convs(middle))


def test_constant_of_shape_blocks_a_size_read_from_a_shape():
    """C read from y's shape: a number nothing rewrites (not a size slot), so it stays whole."""
    def middle(g, y):
        ones = g.op("ConstantOfShape", [g.op("Shape", [y])],
                    value=onnx.helper.make_tensor("v", onnx.TensorProto.FLOAT, [1], [0.5]))
        return g.op("Add", [y, ones]), C
    assert_b_blocked(two_convs(middle))


def test_range_blocks_the_channels_it_indexes():
    """y + arange(C) over the channel axis: channel j gets j, removing one shifts the rest."""
    def middle(g, y):
        r = g.op("Range", [g.const(np.float32(0)), g.const(np.float32(C)), g.const(np.float32(1))])
        t = g.op("Add", [g.op("Transpose", [y], perm=[0, 2, 3, 1]), r])      # channels last
        return g.op("Transpose", [t], perm=[0, 3, 1, 2]), C
    assert_b_blocked(two_convs(middle))


@pytest.mark.parametrize("repeats,prunable", [([1, 1, 2, 3], True), ([1, 2, 1, 1], False)])
def test_tile(repeats, prunable):
    """Tiling spatial axes passes channels; tiling the channel axis repeats them: blocked."""
    c_out = C * repeats[1]
    model = two_convs(lambda g, y: (g.op("Tile", [y, g.const(np.array(repeats, np.int64))]), c_out))
    (assert_b_pruned if prunable else assert_b_blocked)(model)


def ms_model(op, with_bias=True, with_skip=False, **attrs):
    g = Graph()
    x = g.input([1, 4, 6])
    h = g.op("MatMul", [x, g.weight(6, 16)])                                   # w1
    inputs = [h] + ([g.weight(16)] if with_bias else []) + ([g.op("MatMul", [x, g.weight(6, 16)])]
                                                            if with_skip else [])
    g.nodes.append(onnx.helper.make_node(op, inputs, ["ms_out"], domain="com.microsoft", name="ms", **attrs))
    g.output(g.op("MatMul", ["ms_out", g.weight(16, 3)]))
    return g.model(domains=["com.microsoft"])


@pytest.mark.parametrize("op,kw", [("BiasGelu", {}), ("FastGelu", {}), ("FastGelu", {"with_bias": False}),
                                   ("QuickGelu", {"with_bias": False, "alpha": 1.702})])
def test_microsoft_elementwise(op, kw):
    model = ms_model(op, **kw)
    r = assert_prunes(model)
    assert removed_with(r, matmul_columns(model, 0)) > 0


def test_microsoft_bias_add_has_no_rule():
    """com.microsoft.BiasAdd has no CPU kernel, so no oracle can check a rule for it: it blocks."""
    model = ms_model("BiasAdd", with_skip=True)
    analysis = spa.analyze(model)
    assert any("com.microsoft.BiasAdd" in reason for _, _, reason in analysis.dep.blocked_nodes)
    assert [grp.size for grp in analysis.groups] == []


def test_constant_table_cut_at_a_computed_length_stays_whole():
    """Position ids [1, 512] cut to the sequence length read from the input's shape (BERT's
    buffer): at the analysed length the entries past it look unused, but a longer input reads
    them; they must stay (they were removed, and the second probe size failed)."""
    g = Graph()
    x = g.input([1, "seq"])
    table = g.const(np.arange(512, dtype=np.float32).reshape(1, 512))
    length = g.op("Gather", [g.op("Shape", [x]), g.const(np.array([1], np.int64))])
    window = g.op("Slice", [table, g.const(np.array([0], np.int64)), length, g.const(np.array([1], np.int64))])
    h = g.op("Add", [x, window])
    g.output(g.op("MatMul", [g.op("Relu", [g.op("Unsqueeze", [h, g.const(np.array([2], np.int64))])]),
                             g.weight(1, 4)]))
    r = spa.prune(g.model(), ratio=0.5, round_to=1, verify=True)
    assert r.report["verify"]["ok"]
    assert [t for t in r.model.graph.initializer if t.name == table][0].dims == [1, 512]
    assert any("computed at run time" in b["reason"] for b in r.report["blocked"])


def test_size_computed_from_a_sequence_and_a_pruned_width_keeps_computing():
    """Reshape(h, [1, S * hidden]) with S and hidden both read from h's shape: pruned, the
    entry still reads the new width at run time; made a constant it would hold for the probe's
    S only. The pruned model runs at another S."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    ints = lambda v, n: numpy_helper.from_array(np.array(v, np.int64), n)  # noqa: E731
    inits = [numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2"),
             ints([1], "one"), ints(1, "i1"), ints(2, "i2"), ints([0], "ax0")]
    n = helper.make_node
    nodes = [n("MatMul", ["x", "w1"], ["h0"]), n("Relu", ["h0"], ["h"]), n("Shape", ["h"], ["sh"]),
             n("Gather", ["sh", "i1"], ["s1"]), n("Gather", ["sh", "i2"], ["s2"]), n("Mul", ["s1", "s2"], ["p"]),
             n("Unsqueeze", ["p", "ax0"], ["pu"]), n("Concat", ["one", "pu"], ["t1"], axis=0),
             n("Reshape", ["h", "t1"], ["flat"]), n("Unsqueeze", ["s1", "ax0"], ["s1u"]),
             n("Unsqueeze", ["s2", "ax0"], ["s2u"]), n("Concat", ["one", "s1u", "s2u"], ["t2"], axis=0),
             n("Reshape", ["flat", "t2"], ["back"]), n("MatMul", ["back", "w2"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "S", 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "S", 8])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])
    r = assert_prunes(model, ratio=0.5)
    from spa.runtime import session
    sess = session(r.model)
    for s in (7, 33):
        assert sess.run(None, {"x": np.ones((1, s, 16), np.float32)})[0].shape == (1, s, 8)
