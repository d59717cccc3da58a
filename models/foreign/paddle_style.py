"""A hand-written CNN graph laid out the way older paddle2onnx (0.x/1.x) writes one (main
environment, onnx + numpy only).

    python models/foreign/paddle_style.py OUT_DIR

The real paddle2onnx 2.x (paddle_cnn.py, own venv) stores weights as initializers; older
versions, and several other converters, emit every weight as a `Constant` node instead. This
file keeps that layout so spa is measured on it too:
  * no initializers: every weight, BN statistic, bias and shape is a Constant node output
  * opset 11, paddle-style tensor names ("conv2d_0.w_0", "batch_norm_0.tmp_2", ...)
  * BatchNormalization kept (not folded), Relu, MaxPool, a residual Add
  * Flatten(axis=1) -> MatMul + Add head (paddle's Linear), then a `scale` as Mul by 1.0
  * symbolic batch dim "-1"-style name "p2o.DynamicDimension.0" as paddle2onnx writes it
Writes OUT_DIR/paddle_style_cnn.onnx: input "x" (N x 3 x 32 x 32), output
"save_infer_model/scale_0.tmp_0" (N x 10). Random weights, seed 0.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def build():
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    nodes = []
    counters: dict[str, int] = {}

    def const(name, arr):
        nodes.append(helper.make_node("Constant", [], [name], value=numpy_helper.from_array(arr, name)))
        return name

    def uid(kind):
        i = counters.get(kind, 0)
        counters[kind] = i + 1
        return f"{kind}_{i}"

    def conv_bn(x, cin, cout, relu=True):
        c, b = uid("conv2d"), uid("batch_norm")
        w = const(f"{c}.w_0", (rng.standard_normal((cout, cin, 3, 3)) * np.sqrt(2 / (9 * cin))).astype(np.float32))
        nodes.append(helper.make_node("Conv", [x, w], [f"{c}.tmp_0"], name=c, pads=[1, 1, 1, 1],
                                      strides=[1, 1], dilations=[1, 1], group=1, kernel_shape=[3, 3]))
        scale = const(f"{b}.w_0", rng.uniform(0.5, 1.5, cout).astype(np.float32))
        bias = const(f"{b}.b_0", rng.normal(0, 0.1, cout).astype(np.float32))
        mean = const(f"{b}.w_1", rng.normal(0, 0.1, cout).astype(np.float32))
        var = const(f"{b}.w_2", rng.uniform(0.5, 1.5, cout).astype(np.float32))
        y = f"{b}.tmp_2"
        nodes.append(helper.make_node("BatchNormalization", [f"{c}.tmp_0", scale, bias, mean, var], [y],
                                      name=b, epsilon=1e-5, momentum=0.9))
        if not relu:
            return y
        r = uid("relu")
        nodes.append(helper.make_node("Relu", [y], [f"{r}.tmp_0"], name=r))
        return f"{r}.tmp_0"

    def pool(x):
        p = uid("pool2d")
        nodes.append(helper.make_node("MaxPool", [x], [f"{p}.tmp_0"], name=p, kernel_shape=[2, 2],
                                      strides=[2, 2], pads=[0, 0, 0, 0]))
        return f"{p}.tmp_0"

    def linear(x, cin, cout):
        l = uid("linear")
        w = const(f"{l}.w_0", (rng.standard_normal((cin, cout)) * np.sqrt(2 / cin)).astype(np.float32))
        b = const(f"{l}.b_0", rng.normal(0, 0.01, cout).astype(np.float32))
        nodes.append(helper.make_node("MatMul", [x, w], [f"{l}.tmp_0"], name=f"{l}_matmul"))
        nodes.append(helper.make_node("Add", [f"{l}.tmp_0", b], [f"{l}.tmp_1"], name=f"{l}_add"))
        return f"{l}.tmp_1"

    x = conv_bn("x", 3, 32)
    x = pool(conv_bn(x, 32, 32))                                               # 16 x 16
    y = conv_bn(conv_bn(x, 32, 32), 32, 32, relu=False)
    nodes.append(helper.make_node("Add", [x, y], ["elementwise_add_0"], name="elementwise_add_0"))
    nodes.append(helper.make_node("Relu", ["elementwise_add_0"], ["relu_res.tmp_0"], name="relu_res"))
    x = pool(conv_bn("relu_res.tmp_0", 32, 64))                               # 8 x 8
    x = pool(conv_bn(x, 64, 64))                                               # 4 x 4
    nodes.append(helper.make_node("Flatten", [x], ["flatten_0.tmp_0"], name="flatten_0", axis=1))
    x = linear("flatten_0.tmp_0", 64 * 4 * 4, 128)
    nodes.append(helper.make_node("Relu", [x], ["relu_fc.tmp_0"], name="relu_fc"))
    x = linear("relu_fc.tmp_0", 128, 10)
    one = const("scale_0.scale", np.array(1.0, np.float32))
    out = "save_infer_model/scale_0.tmp_0"
    nodes.append(helper.make_node("Mul", [x, one], [out], name="scale_0"))

    dyn = "p2o.DynamicDimension.0"
    graph = helper.make_graph(
        nodes, "paddle-style",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [dyn, 3, 32, 32])],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, [dyn, 10])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 11)],
                              producer_name="PaddlePaddle", ir_version=6)
    onnx.checker.check_model(model, full_check=True)
    return model


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    import onnx
    import onnxruntime as ort
    model = build()
    path = out / "paddle_style_cnn.onnx"
    onnx.save(model, str(path))
    y = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"x": np.random.default_rng(1).standard_normal((2, 3, 32, 32), dtype=np.float32)})[0]
    print(json.dumps({"model": "paddle_style_cnn", "onnx": path.name, "output_shape": list(y.shape),
                      "finite": bool(np.isfinite(y).all()), "opset": 11, "onnx_version": onnx.__version__}))


if __name__ == "__main__":
    main()
