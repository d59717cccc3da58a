"""Keras models converted to ONNX with tf2onnx (runs in the `tf` venv of make_envs.sh).

    $SPA_VENV_DIR/tf/bin/python models/foreign/keras_cnn.py OUT_DIR [--budget 110] [--threads 1] [--only cnn|apps]

Writes to OUT_DIR:
  keras_cnn.onnx         small Fashion-MNIST CNN (Conv2D+BatchNormalization+ReLU blocks, MaxPool,
                         a residual Add, Flatten, Dense head), trained briefly (at most 2 epochs
                         or --budget seconds on --threads threads, whichever ends first);
                         tf2onnx opset 13, NHWC input "image" (N x 28 x 28 x 1, normalized), output "logits" (N x 10)
  keras_cnn_test.npz     held-out labelled test sample: "image" (2000 x 28 x 28 x 1), "label"
  keras_mobilenetv2.onnx keras.applications.MobileNetV2(weights=None, input_shape=(96, 96, 3),
                         classifier_activation=None): random init, 1000 logits (a softmax head
                         would give a constant 1/1000 output at random init and make the oracle
                         vacuous); tf2onnx opset 15, NHWC input "image" (N x 96 x 96 x 3)
                         BatchNorm moving statistics set from one batch of random inputs
  keras_resnet50.onnx    keras.applications.ResNet50 at 64 x 64, same options
  keras_efficientnetv2b0.onnx  keras.applications.EfficientNetV2B0 at 96 x 96 (SE blocks, swish),
                         include_preprocessing=False, same options
Prints one JSON line per model (Keras test accuracy, ONNX-vs-Keras max abs diff, versions).

Data: Debian's dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, IDX), no download.
Deterministic seeds (TF CPU training is not bit-reproducible across thread counts).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
MEAN, STD = 0.2860, 0.3530
N_TEST = 2000
INPUT, OUTPUT = "image", "logits"


def read_idx(path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, ">u4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(prefix: str):
    """NHWC normalized float32 images and int64 labels."""
    x = read_idx(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz")
    y = read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    return ((x.astype(np.float32) / 255.0 - MEAN) / STD)[..., None], y.astype(np.int64)


def conv_bn(keras, x, filters, relu=True, name=None):
    x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def build_cnn(keras):
    inp = keras.Input((28, 28, 1), name=INPUT)
    x = conv_bn(keras, inp, 16, name="b1a")
    x = conv_bn(keras, x, 32, name="b1b")
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)                     # 14 x 14
    y = conv_bn(keras, x, 32, name="b2a")
    y = conv_bn(keras, y, 32, relu=False, name="b2b")
    x = keras.layers.ReLU(name="res_relu")(keras.layers.Add(name="res_add")([x, y]))
    x = conv_bn(keras, x, 64, name="b3")
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)                     # 7 x 7
    x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(128, activation="relu", name="fc1")(x)
    out = keras.layers.Dense(10, name=OUTPUT)(x)
    return keras.Model(inp, out, name="keras_cnn")


def _apps():
    import keras
    return [("keras_mobilenetv2", keras.applications.MobileNetV2, (96, 96, 3)),
            ("keras_resnet50", keras.applications.ResNet50, (64, 64, 3)),
            # V2: include_preprocessing=False, else a never-adapted Normalization layer's
            # mean/variance become extra graph inputs
            ("keras_efficientnetv2b0",
             lambda **kw: keras.applications.EfficientNetV2B0(include_preprocessing=False, **kw), (96, 96, 3))]


def calibrate_bn(keras, model, shape, rng, n=16):
    """Set every BatchNormalization's moving statistics to those of one batch of random inputs
    (momentum 0 for one training-mode call). Random-init Keras applications otherwise have
    vanishing activations (MobileNetV2's logits are ~1e-11), which makes the oracle's absolute
    tolerance meaningless."""
    bns = [l for l in model._flatten_layers() if isinstance(l, keras.layers.BatchNormalization)]
    saved = [b.momentum for b in bns]
    for b in bns:
        b.momentum = 0.0
    model(rng.standard_normal((n, *shape), dtype=np.float32), training=True)
    for b, m in zip(bns, saved):
        b.momentum = m
    return len(bns)


def to_onnx(tf, tf2onnx, model, shape, opset, path):
    """tf2onnx conversion of a Keras 3 model via a tf.function (from_keras does not support
    Keras 3 models); the input keeps the name INPUT, the output is renamed OUTPUT."""
    spec = (tf.TensorSpec((None,) + shape, tf.float32, name=INPUT),)
    fn = tf.function(tf.autograph.experimental.do_not_convert(lambda x: model(x, training=False)))
    onx, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset,
                                           output_path=None)
    import onnx
    old = onx.graph.output[0].name
    for n in onx.graph.node:
        n.output[:] = [OUTPUT if o == old else o for o in n.output]
        n.input[:] = [OUTPUT if i == old else i for i in n.input]
    onx.graph.output[0].name = OUTPUT
    onnx.checker.check_model(onx)
    onnx.save(onx, str(path))
    return onx


def onnx_diff(path, x, ref):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {INPUT: x})[0]
    return float(np.abs(got - ref).max()), got


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir")
    ap.add_argument("--budget", type=float, default=110.0, help="training seconds (max 2 epochs)")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=["cnn", "apps"])
    args = ap.parse_args(argv)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)

    import tensorflow as tf
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    import keras
    import tf2onnx
    versions = {"tensorflow": tf.__version__, "keras": keras.__version__, "tf2onnx": tf2onnx.__version__,
                "python": sys.version.split()[0]}
    keras.utils.set_random_seed(0)

    if args.only in (None, "cnn"):
        xtr, ytr = load_split("train")
        xte, yte = load_split("t10k")
        xte, yte = xte[:N_TEST], yte[:N_TEST]
        model = build_cnn(keras)
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])

        class Budget(keras.callbacks.Callback):
            def on_train_begin(self, logs=None):
                self.t0, self.batches = time.time(), 0

            def on_train_batch_end(self, batch, logs=None):
                self.batches += 1
                if time.time() - self.t0 > args.budget:
                    self.model.stop_training = True

        budget = Budget()
        t0 = time.time()
        model.fit(xtr, ytr, batch_size=128, epochs=args.epochs, shuffle=True, verbose=0,
                  callbacks=[budget])
        train_s = time.time() - t0
        ref = model.predict(xte, batch_size=500, verbose=0)
        acc = float((ref.argmax(1) == yte).mean())
        path = out / "keras_cnn.onnx"
        to_onnx(tf, tf2onnx, model, (28, 28, 1), 13, path)
        diff, got = onnx_diff(path, xte, ref)
        np.savez_compressed(out / "keras_cnn_test.npz", **{INPUT: xte, "label": yte})
        print(json.dumps({"model": "keras_cnn", "onnx": path.name, "train_seconds": round(train_s, 1),
                          "train_samples": budget.batches * 128, "test_acc_keras": acc,
                          "test_acc_onnx": float((got.argmax(1) == yte).mean()), "n_test": N_TEST,
                          "max_abs_diff": diff, "opset": 13, **versions}), flush=True)

    if args.only in (None, "apps"):
        rng = np.random.default_rng(0)
        for name, ctor, shape in _apps():
            model = ctor(weights=None, input_shape=shape, classifier_activation=None)
            calibrate_bn(keras, model, shape, rng)
            path = out / f"{name}.onnx"
            to_onnx(tf, tf2onnx, model, shape, 15, path)
            x = rng.standard_normal((2, *shape), dtype=np.float32)
            ref = model(x, training=False).numpy()
            diff, _ = onnx_diff(path, x, ref)
            print(json.dumps({"model": name, "onnx": path.name, "max_abs_diff": diff,
                              "output_std": float(ref.std()),
                              "params": int(model.count_params()), "opset": 15, **versions}), flush=True)


if __name__ == "__main__":
    main()
