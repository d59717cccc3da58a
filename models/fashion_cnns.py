"""Three small Fashion-MNIST CNNs *with real BatchNormalization nodes* for the accuracy
benchmark (benchmarks/accuracy.py): a ResNet-style network, a VGG-style network and a
MobileNetV3-small-style network (depthwise convs, squeeze-and-excitation, hardswish).

    python models/fashion_cnns.py [--only resnet|vgg|mobile] [--epochs N]
    python models/fashion_cnns.py --export-folded [--only ...]   # from the committed .pt files

Writes, next to this script (all small):
  fashion_<name>.onnx         opset 17, input "image" (N x 1 x 28 x 28, normalized), output
                              "logits" (N x 10), dynamic batch; BatchNorm kept as
                              BatchNormalization ops (not folded into the convs)
  fashion_<name>_folded.onnx  the same trained weights exported as most shipped files are
                              (legacy exporter, eval mode, constant folding): every BatchNorm
                              folded into the conv before it, no BatchNormalization node left
                              (``--export-folded`` writes only these, from the .pt files)
  fashion_<name>.pt           the trained torch state_dict (for build_<name>(), Torch-Pruning)
  fashion_calib.npz           512 *training* images ("image", "label"), calibration data
  fashion_eval.npz            the first 2000 *test* images ("image", "label"), evaluation data
                              (also available without the file: samples("eval"))

Data: the Debian package dataset-fashion-mnist (/usr/share/datasets/fashion-mnist, IDX).
Deterministic (seed 0), CPU, one torch thread by default; resnet and vgg train in about
five minutes or less (3 epochs), mobile in about ten (2 epochs: its depthwise convs are slow
on CPU; EPOCHS).
"""

from __future__ import annotations

import argparse
import gzip
import json
import time
from pathlib import Path

import numpy as np

DATA_DIR = Path("/usr/share/datasets/fashion-mnist")
OUT_DIR = Path(__file__).resolve().parent
MEAN, STD = 0.2860, 0.3530
N_CALIB, N_EVAL = 512, 2000
INPUT, OUTPUT = "image", "logits"
NAMES = ("resnet", "vgg", "mobile")
EPOCHS = {"resnet": 3, "vgg": 3, "mobile": 2}   # the defaults the committed models were trained with


# ---------------------------------------------------------------------------- data

def read_idx(path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = np.frombuffer(data, ">u4", count=ndim, offset=4)
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_split(prefix: str) -> tuple[np.ndarray, np.ndarray]:
    """prefix "train" or "t10k": normalized float32 images (N, 1, 28, 28) and int64 labels."""
    images = read_idx(DATA_DIR / f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(DATA_DIR / f"{prefix}-labels-idx1-ubyte.gz")
    x = ((images.astype(np.float32) / 255.0 - MEAN) / STD)[:, None]
    return x, labels.astype(np.int64)


def samples(which: str) -> dict[str, np.ndarray]:
    """"calib": N_CALIB training images (seed-0 permutation); "eval": the first N_EVAL test
    images. Dicts {"image": ..., "label": ...}; read from the .npz if present."""
    path = OUT_DIR / f"fashion_{which}.npz"
    if path.exists():
        with np.load(path) as f:
            return {k: f[k] for k in f.files}
    if which == "calib":
        x, y = load_split("train")
        idx = np.random.default_rng(0).permutation(len(x))[:N_CALIB]
        return {INPUT: x[idx], "label": y[idx]}
    if which == "eval":
        x, y = load_split("t10k")
        return {INPUT: x[:N_EVAL], "label": y[:N_EVAL]}
    raise ValueError(which)


def accuracy(model, data: dict[str, np.ndarray], batch: int = 500) -> float:
    """Top-1 accuracy of an ONNX model (ModelProto or path) on a samples() dict."""
    import onnx
    from spa.runtime import session
    sess = session(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
    name = sess.get_inputs()[0].name
    x, y = data[INPUT], data["label"]
    pred = np.concatenate([sess.run(None, {name: x[i:i + batch]})[0].argmax(1) for i in range(0, len(x), batch)])
    return float((pred == y).mean())


# ---------------------------------------------------------------------------- models

def _torch():
    import torch
    return torch


def build_resnet():
    """ResNet-style: conv stem (24 @ 28x28) + max-pool, four basic blocks with BatchNorm and
    identity / 1x1-projection shortcuts (24 @ 14x14, 48 @ 7x7, 48 @ 7x7, 96 @ 4x4), global
    average pool, Linear head. About 210K parameters, 8M MACs."""
    torch = _torch()
    nn = torch.nn

    def conv_bn(cin, cout, stride=1, k=3):
        return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))

    class Block(nn.Module):
        def __init__(self, cin, cout, stride=1):
            super().__init__()
            self.a = conv_bn(cin, cout, stride)
            self.b = conv_bn(cout, cout)
            self.short = conv_bn(cin, cout, stride, k=1) if (stride != 1 or cin != cout) else nn.Identity()

        def forward(self, x):
            return torch.relu(self.b(torch.relu(self.a(x))) + self.short(x))

    class ResNet(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(conv_bn(1, 24), nn.ReLU(), nn.MaxPool2d(2))
            self.layers = nn.Sequential(Block(24, 24), Block(24, 48, 2), Block(48, 48), Block(48, 96, 2))
            self.fc = nn.Linear(96, 10)

        def forward(self, x):
            x = self.layers(self.stem(x))
            return self.fc(x.mean(dim=(2, 3)))

    return ResNet()


def build_vgg():
    """VGG-style: conv-BN-ReLU stacks [16] pool [32, 32] pool [64, 64] pool, then Flatten
    (64 x 3 x 3) -> Linear 128 -> ReLU -> Linear 10. About 145K parameters, 5.5M MACs."""
    torch = _torch()
    nn = torch.nn
    layers, cin = [], 1
    for stage in ((16,), (32, 32), (64, 64)):
        for c in stage:
            layers += [nn.Conv2d(cin, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            cin = c
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers, nn.Flatten(), nn.Linear(64 * 3 * 3, 128), nn.ReLU(), nn.Linear(128, 10))


MOBILE_BLOCKS = (  # (expanded, out, squeeze-and-excitation, activation, stride), MobileNetV3-small-like
    (32, 16, True, "relu", 1),      # residual
    (48, 24, False, "relu", 1),
    (72, 24, False, "relu", 1),     # residual
    (96, 40, True, "hswish", 2),    # 14x14 -> 7x7
    (120, 40, True, "hswish", 1),   # residual
    (120, 48, True, "hswish", 1),
    (144, 48, True, "hswish", 1),   # residual
)


def build_mobile():
    """MobileNetV3-small-style: stride-2 conv stem (16 @ 14x14, BN, hardswish), seven
    inverted-residual blocks (MOBILE_BLOCKS: 1x1 expand-BN-act, 3x3 depthwise-BN-act,
    squeeze-and-excitation on five of them, 1x1 project-BN, identity shortcut where the shapes
    match, three of them; 16 @ 14x14 ... 48 @ 7x7), 1x1 conv 48 -> 192 (BN, hardswish), global average pool, Linear 192 -> 128 ->
    hardswish -> Linear 10. Squeeze-and-excitation = GlobalAveragePool -> 1x1 conv reducing to
    a quarter (rounded up to 8) -> ReLU -> 1x1 conv back -> HardSigmoid, multiplied into the
    expanded channels. About 124K parameters, 4.6M MACs."""
    torch = _torch()
    nn = torch.nn
    act = {"relu": nn.ReLU, "hswish": nn.Hardswish}

    def conv_bn(cin, cout, k=1, stride=1, groups=1):
        return [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]

    class SqueezeExcite(nn.Module):
        def __init__(self, c):
            super().__init__()
            mid = max(8, -(-c // 4 // 8) * 8)
            self.pool = nn.AdaptiveAvgPool2d(1)
            self.reduce, self.expand = nn.Conv2d(c, mid, 1), nn.Conv2d(mid, c, 1)
            self.gate = nn.Hardsigmoid()

        def forward(self, x):
            return x * self.gate(self.expand(torch.relu(self.reduce(self.pool(x)))))

    class InvertedResidual(nn.Module):
        def __init__(self, cin, exp, cout, se, a, stride):
            super().__init__()
            layers = conv_bn(cin, exp) + [act[a]()] + conv_bn(exp, exp, 3, stride, groups=exp) + [act[a]()]
            layers += [SqueezeExcite(exp)] if se else []
            self.body = nn.Sequential(*layers, *conv_bn(exp, cout))
            self.residual = stride == 1 and cin == cout

        def forward(self, x):
            y = self.body(x)
            return x + y if self.residual else y

    class Mobile(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Sequential(*conv_bn(1, 16, 3, 2), nn.Hardswish())
            blocks, cin = [], 16
            for exp, cout, se, a, stride in MOBILE_BLOCKS:
                blocks.append(InvertedResidual(cin, exp, cout, se, a, stride))
                cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.last = nn.Sequential(*conv_bn(cin, 192), nn.Hardswish(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
            self.hidden = nn.Sequential(nn.Linear(192, 128), nn.Hardswish())
            self.fc = nn.Linear(128, 10)

        def forward(self, x):
            return self.fc(self.hidden(self.last(self.blocks(self.stem(x)))))

    return Mobile()


BUILD = {"resnet": build_resnet, "vgg": build_vgg, "mobile": build_mobile}


def load_trained(name: str):
    """build_<name>() with the saved state_dict, in eval mode."""
    torch = _torch()
    model = BUILD[name]()
    model.load_state_dict(torch.load(OUT_DIR / f"fashion_{name}.pt", map_location="cpu"))
    return model.eval()


# ---------------------------------------------------------------------------- train / export

def train(name: str, epochs: int, batch: int = 256, lr: float = 4e-3):
    """A fresh build_<name>() (seed 0) trained with fit()'s recipe."""
    torch = _torch()
    torch.manual_seed(0)
    return fit(BUILD[name](), epochs, batch, lr, name=name)


def fit(model, epochs: int, batch: int = 256, lr: float = 4e-3, *, params=None, steps: int | None = None,
        weight_decay: float = 5e-4, name: str = "model"):
    """The training recipe, on a given model (also pruned ones, benchmarks/anytime.py): AdamW,
    one-cycle schedule (20 % warm-up), random horizontal flips, seed-0 data order. ``params``
    (default: all) are the ones trained; ``steps`` stops early (the schedule spans ``steps``)."""
    torch = _torch()
    x, y = load_split("train")
    params = list(model.parameters()) if params is None else list(params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    steps = steps or epochs * (len(x) // batch)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.2)
    rng = np.random.default_rng(0)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    t0 = time.time()
    done = 0
    for epoch in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(x)))
        total, n = 0.0, 0
        for i in range(min(len(x) // batch, steps - done)):
            idx = perm[i * batch:(i + 1) * batch]
            xb = xt[idx]
            # light augmentation: random horizontal flip
            flip = torch.from_numpy(rng.random(len(idx)) < 0.5)
            xb = torch.where(flip[:, None, None, None], xb.flip(3), xb)
            loss = torch.nn.functional.cross_entropy(model(xb), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
            n += len(idx)
            done += 1
        print(f"  {name} epoch {epoch + 1}/{epochs}: loss {total / max(n, 1):.4f} ({time.time() - t0:.0f} s)",
              flush=True)
    return model.eval()


def export(model, path: Path, folded: bool = False):
    """Legacy exporter, opset 17, constant folding, onnxruntime checked against torch.
    ``folded=False``: TrainingMode.PRESERVE on an eval-mode model, so the eval-mode peephole
    that folds BatchNorm into Conv is skipped and BN stays a BatchNormalization op (running
    statistics, training_mode=0). ``folded=True``: TrainingMode.EVAL, the way most shipped CNN
    files were written, BatchNorm folded into the preceding conv, none left (checked).
    Returns (BatchNormalization nodes, max |onnxruntime - torch|)."""
    torch = _torch()
    import onnx
    dummy = torch.zeros(2, 1, 28, 28)
    mode = torch.onnx.TrainingMode.EVAL if folded else torch.onnx.TrainingMode.PRESERVE
    torch.onnx.export(model.eval(), (dummy,), str(path), dynamo=False, opset_version=17,
                      training=mode, do_constant_folding=True,
                      input_names=[INPUT], output_names=[OUTPUT],
                      dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
    want = 0 if folded else sum(isinstance(mod, torch.nn.BatchNorm2d) for mod in model.modules())
    assert n_bn == want, f"{path.name}: {n_bn} BatchNormalization nodes, expected {want}"
    assert all(len(n.output) == 1 for n in m.graph.node if n.op_type == "BatchNormalization"), "training-mode BN"
    from spa.runtime import session
    x = samples("eval")[INPUT][:64]
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).numpy()
    err = float(np.abs(session(m).run(None, {INPUT: x})[0] - ref).max())
    assert err < 1e-3, f"onnxruntime differs from torch by {err}"
    return n_bn, err


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", choices=NAMES)
    p.add_argument("--epochs", type=int, help="default: EPOCHS (3 for resnet and vgg, 2 for mobile)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on the shared 2-core machine two threads were 7x slower)")
    p.add_argument("--export-folded", action="store_true",
                   help="only write fashion_<name>_folded.onnx (BatchNorm folded) from the saved .pt files")
    args = p.parse_args()
    torch = _torch()
    torch.set_num_threads(args.threads)
    if args.export_folded:
        ev = samples("eval")
        for name in ([args.only] if args.only else NAMES):
            path = OUT_DIR / f"fashion_{name}_folded.onnx"
            _, err = export(load_trained(name), path, folded=True)
            print(f"{path.name}: ORT-vs-torch {err:.1e}, eval accuracy {accuracy(path, ev):.4f} (2000)", flush=True)
        return
    for which in ("calib", "eval"):
        path = OUT_DIR / f"fashion_{which}.npz"
        if not path.exists():
            np.savez_compressed(path, **samples(which))
    ev = samples("eval")
    summary = {}
    for name in ([args.only] if args.only else NAMES):
        t0 = time.time()
        model = train(name, args.epochs or EPOCHS[name])
        torch.save(model.state_dict(), OUT_DIR / f"fashion_{name}.pt")
        onnx_path = OUT_DIR / f"fashion_{name}.onnx"
        n_bn, err = export(model, onnx_path)
        export(model, OUT_DIR / f"fashion_{name}_folded.onnx", folded=True)
        x, y = load_split("t10k")
        full = accuracy(onnx_path, {INPUT: x, "label": y})
        acc = accuracy(onnx_path, ev)
        params = sum(p.numel() for p in model.parameters())
        summary[name] = {"params": params, "test_acc_10k": full, "eval_acc_2000": acc,
                         "batchnorm_nodes": n_bn, "ort_vs_torch_max_abs": err,
                         "train_seconds": round(time.time() - t0)}
        print(f"{onnx_path.name}: {params} params, {n_bn} BatchNormalization nodes, ORT-vs-torch {err:.1e}, "
              f"test accuracy {full:.4f} (10k), {acc:.4f} (eval 2000)", flush=True)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
