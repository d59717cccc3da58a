"""PaddlePaddle models converted to ONNX with paddle2onnx (runs in the `paddle` venv of
make_envs.sh; paddle2onnx pins onnx<=1.17, so it never goes into the main environment).

    $SPA_VENV_DIR/paddle/bin/python models/foreign/paddle_cnn.py OUT_DIR

Writes to OUT_DIR (random init, seed 0; BatchNorm with random running statistics):
  paddle_cnn.onnx          Conv2D+BatchNorm2D+ReLU blocks, MaxPool2D, a residual add, Flatten,
                           Linear head; NCHW input "image" (N x 1 x 28 x 28), opset 11
  paddle_mobilenetv2.onnx  paddle.vision.models.mobilenet_v2(scale=0.5, num_classes=100) at
                           96 x 96, NCHW input "image", opset 13
Exported with paddle.jit.save (PIR program) + paddle2onnx.export (default options, incl. its
own graph optimisation). Prints one JSON line per model (ONNX-vs-Paddle max abs diff, versions).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np


def build(paddle):
    nn = paddle.nn

    def block(cin, cout, relu=True):
        layers = [nn.Conv2D(cin, cout, 3, padding=1, bias_attr=False), nn.BatchNorm2D(cout)]
        return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

    class CNN(nn.Layer):
        def __init__(self):
            super().__init__()
            self.b1 = nn.Sequential(block(1, 16), block(16, 32), nn.MaxPool2D(2))       # 14
            self.r1, self.r2 = block(32, 32), block(32, 32, relu=False)
            self.b3 = nn.Sequential(block(32, 64), nn.MaxPool2D(2))                     # 7
            self.head = nn.Sequential(nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(),
                                      nn.Linear(128, 10))

        def forward(self, x):
            x = self.b1(x)
            x = nn.functional.relu(x + self.r2(self.r1(x)))
            return self.head(self.b3(x))

    return CNN()


def randomize_bn(paddle, model, rng):
    for layer in model.sublayers():
        if isinstance(layer, paddle.nn.BatchNorm2D):
            n = layer.weight.shape[0]
            layer._mean.set_value(rng.normal(0, 0.1, n).astype(np.float32))
            layer._variance.set_value(rng.uniform(0.5, 1.5, n).astype(np.float32))
            layer.weight.set_value(rng.uniform(0.5, 1.5, n).astype(np.float32))
            layer.bias.set_value(rng.normal(0, 0.1, n).astype(np.float32))


def export(paddle, paddle2onnx, model, shape, opset, path):
    from paddle.static import InputSpec
    model.eval()
    with tempfile.TemporaryDirectory() as tmp:
        prefix = os.path.join(tmp, "model")
        paddle.jit.save(model, prefix, input_spec=[InputSpec([None, *shape], "float32", "image")])
        files = os.listdir(tmp)
        program = next(os.path.join(tmp, f) for f in files if f.endswith((".json", ".pdmodel")))
        paddle2onnx.export(program, prefix + ".pdiparams", str(path), opset_version=opset,
                           enable_onnx_checker=True)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import paddle
    import paddle2onnx
    import onnxruntime as ort
    paddle.set_device("cpu")
    paddle.seed(0)
    versions = {"paddlepaddle": paddle.__version__, "paddle2onnx": paddle2onnx.__version__,
                "python": sys.version.split()[0]}
    rng = np.random.default_rng(0)
    cnn = build(paddle)
    mbv2 = paddle.vision.models.mobilenet_v2(scale=0.5, num_classes=100)
    for name, model, shape, opset in (("paddle_cnn", cnn, (1, 28, 28), 11),
                                      ("paddle_mobilenetv2", mbv2, (3, 96, 96), 13)):
        randomize_bn(paddle, model, rng)
        model.eval()
        path = out / f"{name}.onnx"
        export(paddle, paddle2onnx, model, shape, opset, path)
        x = rng.standard_normal((2, *shape)).astype(np.float32)
        ref = model(paddle.to_tensor(x)).numpy()
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        got = sess.run(None, {sess.get_inputs()[0].name: x})[0]
        print(json.dumps({"model": name, "onnx": path.name, "max_abs_diff": float(np.abs(got - ref).max()),
                          "input": sess.get_inputs()[0].name, "opset": opset, **versions}), flush=True)


if __name__ == "__main__":
    main()
