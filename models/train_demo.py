"""Train the small Fashion-MNIST CNN that serves as spa's demo model.

The network deliberately mixes the structures a structural pruner must handle:
a residual block (identity add), a two-branch block joined by a channel
concat, and a depthwise-separable block (grouped conv with groups == channels),
followed by global average pooling and a Linear head.

Outputs, written next to this script:
  demo_cnn.onnx    the trained model (opset 17, input "image", output "logits",
                   dynamic batch; BatchNorm is folded into the convs on export)
  demo_sample.npz  the first 500 Fashion-MNIST *test* images, already
                   normalized, as "image" (float32, N x 1 x 28 x 28) and
                   "label" (int64), for measuring accuracy before/after pruning
  demo_calib.npz   256 *training* images (every 200th), the calibration data for
                   data-aware pruning (--calib); disjoint from the sample above
                   (`python models/train_demo.py --calib-only` writes just this)

Data comes from the Debian package:  apt-get install dataset-fashion-mnist

Run from the repository root (takes a few minutes on a 2-core CPU):
    python models/train_demo.py
"""

import gzip
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = Path(__file__).resolve().parent
MEAN, STD = 0.2860, 0.3530
EPOCHS = 4
BATCH = 128
N_SAMPLE = 500


def read_idx(path):
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, ">u4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(prefix):
    images = read_idx(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    x = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    return x, labels.astype(np.int64)


def conv_bn(cin, cout, k, groups=1):
    # bias=False: BN supplies the shift, and the exporter folds BN into the conv.
    return [nn.Conv2d(cin, cout, k, padding=k // 2, groups=groups, bias=False),
            nn.BatchNorm2d(cout)]


class Residual(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.body = nn.Sequential(*conv_bn(c, c, 3), nn.ReLU(), *conv_bn(c, c, 3))
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + x)


class TwoBranch(nn.Module):
    def __init__(self, cin, cout_each):
        super().__init__()
        self.a = nn.Sequential(*conv_bn(cin, cout_each, 3), nn.ReLU())
        self.b = nn.Sequential(*conv_bn(cin, cout_each, 1), nn.ReLU())

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], dim=1)


class DepthwiseSeparable(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.dw = nn.Sequential(*conv_bn(cin, cin, 3, groups=cin), nn.ReLU())
        self.pw = nn.Sequential(*conv_bn(cin, cout, 1), nn.ReLU())

    def forward(self, x):
        return self.pw(self.dw(x))


def build_model():
    return nn.Sequential(
        nn.Sequential(*conv_bn(1, 32, 3), nn.ReLU()),  # stem, 28x28
        nn.MaxPool2d(2),                                # 14x14: keeps CPU training fast
        Residual(32),
        TwoBranch(32, 32),                              # -> 64 channels
        nn.MaxPool2d(2),                                # 7x7
        DepthwiseSeparable(64, 96),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(96, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def torch_accuracy(model, x, y):
    model.eval()
    with torch.no_grad():
        preds = torch.cat([model(xb).argmax(1) for xb in torch.from_numpy(x).split(1000)])
    return (preds.numpy() == y).mean()


def main():
    missing = [p for p in ("train", "t10k") for k in ("images-idx3", "labels-idx1")
               if not (DATA_DIR / f"{p}-{k}-ubyte.gz").exists()]
    if missing:
        sys.exit(f"error: Fashion-MNIST not found in {DATA_DIR}; "
                 "run `apt-get install dataset-fashion-mnist`")

    torch.manual_seed(0)
    torch.set_num_threads(2)

    x_train, y_train = load_split("train")
    x_test, y_test = load_split("t10k")

    model = build_model()
    n_params = sum(p.numel() for p in model.parameters())
    print(f"params: {n_params:,}")

    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train)
    steps = EPOCHS * ((len(xt) + BATCH - 1) // BATCH)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)

    start = time.time()
    for epoch in range(EPOCHS):
        model.train()
        perm = torch.randperm(len(xt))
        total = 0.0
        for idx in perm.split(BATCH):
            loss = F.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        print(f"epoch {epoch + 1}/{EPOCHS}: loss {total / len(xt):.4f} "
              f"({time.time() - start:.0f}s)")
    print(f"train time: {time.time() - start:.0f}s")
    print(f"test accuracy (torch, {len(y_test)} images): "
          f"{torch_accuracy(model, x_test, y_test):.4f}")

    onnx_path = OUT_DIR / "demo_cnn.onnx"
    dummy = torch.from_numpy(x_test[:1])
    torch.onnx.export(model.eval(), dummy, str(onnx_path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"],
                      dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    print(f"wrote {onnx_path} ({onnx_path.stat().st_size / 1024:.1f} KiB)")

    # Test images, never seen in training, so pruning is judged on held-out data.
    sample_path = OUT_DIR / "demo_sample.npz"
    image, label = x_test[:N_SAMPLE], y_test[:N_SAMPLE]
    np.savez_compressed(sample_path, image=image, label=label)
    print(f"wrote {sample_path}")

    sess = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    logits = sess.run(["logits"], {"image": image})[0]
    print(f"onnx accuracy on {N_SAMPLE}-image sample: {(logits.argmax(1) == label).mean():.4f}")


def write_calibration():
    x_train, _ = load_split("train")
    path = OUT_DIR / "demo_calib.npz"
    np.savez_compressed(path, image=x_train[::200][:256])
    print(f"wrote {path}")


if __name__ == "__main__":
    if "--calib-only" in sys.argv:
        write_calibration()
    else:
        main()
        write_calibration()
