"""Flax (nnx) models converted to ONNX with jax2onnx (runs in the `jax` venv of make_envs.sh).

    $SPA_VENV_DIR/jax/bin/python models/foreign/jax_models.py OUT_DIR

Writes to OUT_DIR (random init, seed 0):
  jax_cnn.onnx   Flax nnx CNN: Conv+BatchNorm+ReLU blocks, max/avg pooling, a residual add,
                 reshape, Linear head; NHWC input "image" (B x 28 x 28 x 1, symbolic batch "B"),
                 output "logits" (B x 10); BatchNorm in inference mode with random running stats
  jax_cnn_nchw.onnx  the same CNN exported with inputs_as_nchw=[0]: NCHW input (B x 1 x 28 x 28)
                 that jax2onnx transposes to NHWC inside the graph
  jax_mlp.onnx   Flax nnx MLP 784-512-256-10 (ReLU, GELU), input "x" (B x 784), output "logits"
Prints one JSON line per model (ONNX-vs-JAX max abs diff, versions). jax2onnx's default opset.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")

import numpy as np


def build(nnx, jax):
    class CNN(nnx.Module):
        def __init__(self, rngs):
            self.c1 = nnx.Conv(1, 16, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.b1 = nnx.BatchNorm(16, use_running_average=True, rngs=rngs)
            self.c2 = nnx.Conv(16, 32, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.b2 = nnx.BatchNorm(32, use_running_average=True, rngs=rngs)
            self.c3 = nnx.Conv(32, 32, (3, 3), padding="SAME", rngs=rngs)
            self.c4 = nnx.Conv(32, 32, (3, 3), padding="SAME", rngs=rngs)
            self.c5 = nnx.Conv(32, 64, (3, 3), padding="SAME", use_bias=False, rngs=rngs)
            self.b5 = nnx.BatchNorm(64, use_running_average=True, rngs=rngs)
            self.fc1 = nnx.Linear(7 * 7 * 64, 128, rngs=rngs)
            self.fc2 = nnx.Linear(128, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.b1(self.c1(x)))
            x = nnx.relu(self.b2(self.c2(x)))
            x = nnx.max_pool(x, window_shape=(2, 2), strides=(2, 2))                # 14 x 14
            y = self.c4(nnx.relu(self.c3(x)))
            x = nnx.relu(x + y)
            x = nnx.relu(self.b5(self.c5(x)))
            x = nnx.avg_pool(x, window_shape=(2, 2), strides=(2, 2))                # 7 x 7
            x = x.reshape((x.shape[0], -1))
            return self.fc2(nnx.relu(self.fc1(x)))

    class MLP(nnx.Module):
        def __init__(self, rngs):
            self.l1 = nnx.Linear(784, 512, rngs=rngs)
            self.l2 = nnx.Linear(512, 256, rngs=rngs)
            self.l3 = nnx.Linear(256, 10, rngs=rngs)

        def __call__(self, x):
            return self.l3(nnx.gelu(self.l2(nnx.relu(self.l1(x)))))

    rngs = nnx.Rngs(0)
    cnn, mlp = CNN(rngs), MLP(rngs)
    # non-trivial BatchNorm statistics (fresh ones are mean 0 / var 1 / scale 1 / bias 0)
    rng = np.random.default_rng(0)
    for bn in (cnn.b1, cnn.b2, cnn.b5):
        n = bn.mean.value.shape[0]
        bn.mean.value = jax.numpy.asarray(rng.normal(0, 0.1, n), np.float32)
        bn.var.value = jax.numpy.asarray(rng.uniform(0.5, 1.5, n), np.float32)
        bn.scale.value = jax.numpy.asarray(rng.uniform(0.5, 1.5, n), np.float32)
        bn.bias.value = jax.numpy.asarray(rng.normal(0, 0.1, n), np.float32)
    return cnn, mlp


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import jax
    import flax
    from flax import nnx
    import jax2onnx
    from jax2onnx import to_onnx
    import onnx
    import onnxruntime as ort
    from importlib.metadata import version
    versions = {"jax": jax.__version__, "flax": flax.__version__, "jax2onnx": version("jax2onnx"),
                "python": sys.version.split()[0]}

    cnn, mlp = build(nnx, jax)
    rng = np.random.default_rng(0)
    img = rng.standard_normal((4, 28, 28, 1), dtype=np.float32)
    for name, model, spec, inp, sample, kw in (
            ("jax_cnn", cnn, ("B", 28, 28, 1), "image", img, {}),
            ("jax_cnn_nchw", cnn, ("B", 28, 28, 1), "image", img, {"inputs_as_nchw": [0]}),
            ("jax_mlp", mlp, ("B", 784), "x", rng.standard_normal((4, 784), dtype=np.float32), {})):
        onx = to_onnx(model, [spec], model_name=name, input_names=[inp], output_names=["logits"], **kw)
        onnx.checker.check_model(onx)
        path = out / f"{name}.onnx"
        onnx.save(onx, str(path))
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        feed = sample.transpose(0, 3, 1, 2) if kw.get("inputs_as_nchw") else sample
        got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {inp: feed})[0]
        ref = np.asarray(model(sample))
        print(json.dumps({"model": name, "onnx": path.name, "max_abs_diff": float(np.abs(got - ref).max()),
                          "opset": [o.version for o in onx.opset_import if o.domain in ("", "ai.onnx")][0],
                          **versions}), flush=True)


if __name__ == "__main__":
    main()
