"""The oracle's uint8 reading of int8 integer-GEMM weights (spa/verify/integer_kernels.py): the same
function, summed without int16 saturation."""

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from spa.verify.integer_kernels import unsaturated
from spa.runtime import session


def model_of(nodes, inputs, inits, output_type=TensorProto.FLOAT):
    graph = helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", output_type, None)],
                              [numpy_helper.from_array(a, n) for n, a in inits.items()])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets, ir_version=9)


def run(model, x):
    return session(model).run(None, {"x": x})[0]


def matmul_integer(b, zero=None):
    """x (float) -> DynamicQuantizeLinear -> MatMulInteger with int8 weights ``b``, as
    quantize_dynamic writes it; int32 out."""
    inits = {"b": b} | ({"bz": zero} if zero is not None else {})
    nodes = [helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"]),
             helper.make_node("MatMulInteger", ["q", "b", "z"] + (["bz"] if zero is not None else []), ["y"])]
    return model_of(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, b.shape[0]])], inits,
                    TensorProto.INT32)


def dq_lstm(limit, per_channel, bidirectional, zero=0, hidden=8, features=6, seed=0):
    """A DynamicQuantizeLSTM with int8 weights within +-``limit`` (int8 zero points ``zero``)."""
    rng = np.random.default_rng(seed)
    dirs = 2 if bidirectional else 1
    q = (dirs, 4 * hidden) if per_channel else (dirs,)
    inits = {"W": rng.integers(-limit, limit + 1, (dirs, features, 4 * hidden)).astype(np.int8),
             "R": rng.integers(-limit, limit + 1, (dirs, hidden, 4 * hidden)).astype(np.int8),
             "B": (rng.standard_normal((dirs, 8 * hidden)) * 0.1).astype(np.float32),
             "ws": np.full(q, 0.004, np.float32), "wz": np.full(q, zero, np.int8),
             "rs": np.full(q, 0.004, np.float32), "rz": np.full(q, zero, np.int8)}
    node = helper.make_node("DynamicQuantizeLSTM", ["x", "W", "R", "B", "", "", "", "", "ws", "wz", "rs", "rz"], ["y"],
                            domain="com.microsoft", hidden_size=hidden,
                            direction="bidirectional" if bidirectional else "forward")
    return model_of([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, 2, features])], inits)


def test_uint8_reading_sums_without_saturation():
    """255 x 127 summed over 8: 259080. onnxruntime's u8s8 GEMM on x86 without VNNI returns
    4 x 32767 (each pair saturated in int16); read as uint8 it is exact on every CPU."""
    model = matmul_integer(np.full((8, 4), 127, np.int8))
    x = np.ones((2, 8), np.float32)   # quantizes to 255 throughout
    assert np.all(run(unsaturated(model), x) == 255 * 127 * 8)
    assert np.all(run(model, x) <= 255 * 127 * 8)   # 131068 here without VNNI


@pytest.mark.parametrize("per_channel,bidirectional,zero", [(False, False, 0), (True, True, 0), (False, True, -7)])
def test_uint8_reading_is_the_same_function(per_channel, bidirectional, zero):
    """Weights within +-63 saturate nowhere (2 x 255 x 63 < 32767): both readings agree."""
    model = dq_lstm(63, per_channel, bidirectional, zero)
    exact = unsaturated(model)
    inits = {t.name: numpy_helper.to_array(t) for t in exact.graph.initializer}
    assert {inits[n].dtype for n in ("W", "R", "wz")} == {np.dtype(np.int8)}   # the original's, read through Casts
    x = np.random.default_rng(1).standard_normal((5, 2, 6)).astype(np.float32)
    np.testing.assert_allclose(run(exact, x), run(model, x), rtol=0, atol=1e-6)
    reading = session(exact, optimize=False).run(None, {"x": x})[0]   # the Casts run, not folded
    np.testing.assert_allclose(reading, run(model, x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("zero", [None, np.full(4, 3, np.int8)])
def test_matmul_integer_zero_points(zero):
    """No zero point (0 in int8: 128 in uint8) and one per column."""
    b = np.random.default_rng(2).integers(-63, 64, (8, 4)).astype(np.int8)
    model = matmul_integer(b, zero)
    x = np.random.default_rng(3).standard_normal((2, 8)).astype(np.float32)
    assert np.array_equal(run(unsaturated(model), x), run(model, x))


def test_nothing_to_read():
    """uint8 weights, and a MatMulInteger whose activations no DynamicQuantizeLinear made (their
    type unknown here): left as they are."""
    assert unsaturated(matmul_integer(np.zeros((8, 4), np.uint8), np.zeros(4, np.uint8))) is None
    node = helper.make_node("MatMulInteger", ["x", "b"], ["y"])
    model = model_of([node], [helper.make_tensor_value_info("x", TensorProto.INT8, [2, 8])],
                     {"b": np.zeros((8, 4), np.int8)}, TensorProto.INT32)
    assert unsaturated(model) is None
