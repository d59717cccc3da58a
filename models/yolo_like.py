"""A small YOLO-style detector (random weights): a strided CNN backbone, an FPN neck with
upsampling and concatenation of multi-scale features, and per-scale heads reshaped into
(N, anchors*H*W, 4 + 1 + classes), concatenated and split into boxes and scores.

    python models/yolo_like.py --out /tmp/yolo.onnx [--exporter legacy|dynamo]
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

ANCHORS, CLASSES = 3, 4


def conv(c_in, c_out, stride=1):
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False), nn.BatchNorm2d(c_out), nn.SiLU())


class Detector(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv(3, 16, 2)
        self.c3 = nn.Sequential(conv(16, 32, 2), conv(32, 32))
        self.c4 = nn.Sequential(conv(32, 64, 2), conv(64, 64))
        self.c5 = nn.Sequential(conv(64, 96, 2), conv(96, 96))
        self.lat5 = conv(96, 64)
        self.fuse4 = conv(64 + 64, 64)
        self.heads = nn.ModuleList(nn.Conv2d(c, ANCHORS * (5 + CLASSES), 1) for c in (64, 64))

    def forward(self, x):
        p3 = self.c3(self.stem(x))
        p4 = self.c4(p3)
        p5 = self.lat5(self.c5(p4))
        up = nn.functional.interpolate(p5, scale_factor=2.0, mode="nearest")
        f4 = self.fuse4(torch.cat([up, p4], 1))
        outs = []
        for head, f in zip(self.heads, (f4, p5)):
            y = head(f)
            n, _, h, w = y.shape
            y = y.view(n, ANCHORS, 5 + CLASSES, h, w).permute(0, 1, 3, 4, 2).reshape(n, -1, 5 + CLASSES)
            outs.append(y)
        y = torch.cat(outs, 1)
        boxes, obj, cls = y.split([4, 1, CLASSES], dim=2)
        return boxes, torch.sigmoid(obj) * torch.sigmoid(cls)


def export(path, exporter: str = "legacy", size: int = 64):
    torch.manual_seed(0)
    model = Detector().eval()
    for m in model.modules():  # non-trivial BatchNorm statistics
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
    x = torch.randn(1, 3, size, size)
    kw = {"dynamo": True, "external_data": False} if exporter == "dynamo" else {"dynamo": False, "opset_version": 13}
    torch.onnx.export(model, (x,), str(path), input_names=["images"], output_names=["boxes", "scores"], **kw)
    return path


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="yolo_like.onnx")
    p.add_argument("--exporter", default="legacy", choices=["legacy", "dynamo"])
    args = p.parse_args()
    print(export(args.out, args.exporter))
