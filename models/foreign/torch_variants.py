"""One small torch CNN exported in the ways that change the ONNX layout (main environment).

    python models/foreign/torch_variants.py OUT_DIR

The CNN (random init, seed 0, random BatchNorm running statistics): Conv+BN+ReLU stem, MaxPool,
a residual block, a depthwise-separable block, global average pool, Flatten, Linear-ReLU-Linear.
NCHW input "input" (N x 3 x 32 x 32), output "logits" (N x 10). Writes to OUT_DIR:
  torch_op9.onnx, torch_op11.onnx, torch_op13.onnx
                           legacy TorchScript exporter (dynamo=False) at opsets 9/11/13, static
                           shapes, training=EVAL (BatchNorm folded into Conv by the exporter)
  torch_op13_bn.onnx       same at opset 13 with training=PRESERVE and do_constant_folding=False
                           (model in eval mode): BatchNormalization nodes kept, not folded
  torch_dynamic.onnx       opset 13, dynamic_axes: batch "N", height "H", width "W"
  torch_ort_basic.onnx     onnxruntime-optimised torch_op13_bn.onnx (ORT_ENABLE_BASIC), saved
                           through SessionOptions.optimized_model_filepath
  torch_ort_extended.onnx  same at ORT_ENABLE_EXTENDED (fuses Conv+activation into
                           com.microsoft FusedConv etc.)
  torch_onnxslim.onnx      onnxslim.slim(torch_dynamic.onnx)         (if onnxslim is installed)
  torch_onnxsim.onnx       onnxsim.simplify(torch_op13_bn.onnx)      (if onnxsim is installed)
Prints one JSON line per file: max abs diff against torch on a random batch, versions.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

INPUT, OUTPUT = "input", "logits"
SHAPE = (3, 32, 32)


def build():
    import torch
    from torch import nn

    def cbr(cin, cout, k=3, groups=1, relu=True):
        layers = [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        return nn.Sequential(*layers, nn.ReLU()) if relu else nn.Sequential(*layers)

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(cbr(3, 32), cbr(32, 32), nn.MaxPool2d(2))      # 16 x 16
            self.res = nn.Sequential(cbr(32, 32), cbr(32, 32, relu=False))
            self.dw = nn.Sequential(cbr(32, 32, groups=32), cbr(32, 64, k=1), nn.MaxPool2d(2))
            self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 128),
                                      nn.ReLU(), nn.Linear(128, 10))

        def forward(self, x):
            x = self.stem(x)
            x = torch.relu(x + self.res(x))
            return self.head(self.dw(x))

    torch.manual_seed(0)
    model = CNN()
    g = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)
    return model.eval()


def ort_run(path, x):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT: x})[0]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import onnx
    import onnxruntime as ort
    import torch
    torch.set_num_threads(1)
    versions = {"torch": torch.__version__, "onnx_version": onnx.__version__, "onnxruntime": ort.__version__}
    model = build()
    x = np.random.default_rng(0).standard_normal((2, *SHAPE)).astype(np.float32)
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    dummy = torch.zeros(1, *SHAPE)
    written = []

    def report(name, **extra):
        path = out / f"{name}.onnx"
        m = onnx.load(str(path))
        onnx.checker.check_model(m)
        n = m.graph.input[0].type.tensor_type.shape.dim[0].dim_value or len(x)   # static: batch 1
        diff = float(np.abs(ort_run(path, x[:n]) - ref[:n]).max())
        print(json.dumps({"model": name, "onnx": path.name, "max_abs_diff": diff, **extra, **versions}),
              flush=True)
        written.append(name)

    def export(name, opset, **kw):
        torch.onnx.export(model, (dummy,), str(out / f"{name}.onnx"), dynamo=False, opset_version=opset,
                          input_names=[INPUT], output_names=[OUTPUT], **kw)
        report(name, opset=opset)

    for opset in (9, 11, 13):
        export(f"torch_op{opset}", opset)
    export("torch_op13_bn", 13, do_constant_folding=False, training=torch.onnx.TrainingMode.PRESERVE)
    export("torch_dynamic", 13, dynamic_axes={INPUT: {0: "N", 2: "H", 3: "W"}, OUTPUT: {0: "N"}})

    for level, name in ((ort.GraphOptimizationLevel.ORT_ENABLE_BASIC, "torch_ort_basic"),
                        (ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED, "torch_ort_extended")):
        so = ort.SessionOptions()
        so.graph_optimization_level = level
        so.optimized_model_filepath = str(out / f"{name}.onnx")
        so.intra_op_num_threads = 1
        ort.InferenceSession(str(out / "torch_op13_bn.onnx"), so, providers=["CPUExecutionProvider"])
        report(name, source="torch_op13_bn", level=str(level).split(".")[-1])

    try:
        import onnxslim
    except ImportError:
        print(json.dumps({"model": "torch_onnxslim", "skipped": "onnxslim not installed"}), flush=True)
    else:
        onnx.save(onnxslim.slim(onnx.load(str(out / "torch_dynamic.onnx"))), str(out / "torch_onnxslim.onnx"))
        report("torch_onnxslim", source="torch_dynamic", onnxslim=onnxslim.__version__)
    try:
        import onnxsim
    except ImportError:
        print(json.dumps({"model": "torch_onnxsim", "skipped": "onnxsim not installed"}), flush=True)
    else:
        simplified, ok = onnxsim.simplify(onnx.load(str(out / "torch_op13_bn.onnx")))
        assert ok, "onnxsim check failed"
        onnx.save(simplified, str(out / "torch_onnxsim.onnx"))
        report("torch_onnxsim", source="torch_op13_bn", onnxsim=str(onnxsim.__version__))


if __name__ == "__main__":
    main()
