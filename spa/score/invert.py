"""Data-free inputs for image classifiers whose BatchNorms were folded away: images the model
itself assigns to each of its classes (model inversion), found by gradient descent on the
inputs through a PyTorch copy of the graph.

Synthetic images are steered by BatchNorm running statistics where the graph has them
(steer.py); most shipped files have them folded into the convs, and dead-leaves noise alone
leaves the statistics far from any real input. Inverting the classifier anchors them: start
from the dead-leaves images, label them round-robin over the classes and minimise the
cross-entropy of the model's outputs to those labels, with total-variation and L2 priors
that keep the images smooth and of moderate range ("class impressions", Nayak et al. 2019,
without BatchNorm terms). Fashion-MNIST CNNs with BatchNorm folded, no data, top-1 at 0.75 / 0.5 /
0.3 of the MACs, inverted against dead-leaves noise (benchmarks/accuracy.py, folded-default and
folded-noise): ResNet 0.908 / 0.858 / 0.543 against 0.911 / 0.727 / 0.346; VGG 0.879 / 0.828 /
0.822 against 0.916 / 0.845 / 0.584; the depthwise mobile net 0.883 / 0.637 / 0.261 against
0.388 / 0.099 / 0.097 (calibrated on 256 real images at 0.5: 0.916, 0.896, 0.880).

Needs torch and onnx2torch (``pip install "spa[invert]"``); without them, or on a model it
does not apply to, the dead-leaves images stay.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..loading.tensors import materialized

__all__ = ["inversion_target", "why_not_invert", "inverted_images", "INVERSION_BUDGET", "INVERTED_SAMPLES"]

log = logging.getLogger(__name__)

# multiply-adds spent inverting by default: samples x steps x 3 (forward and backward) x the
# model's MACs per sample; a larger model keeps the dead-leaves images unless inversion is asked
# for (--synthetic invert). Fashion ResNet: 256 x 200 x 3 x 7.9M = 1.2e12, about a minute on 2
# cores; an ImageNet ResNet-18 (1.8G MACs) would take hours on a CPU.
INVERSION_BUDGET = 2e12
STEPS = 200
# Small steps and a strong smoothness prior keep the images near natural ones: the model's
# class is reached (90 % of them) without the high-frequency patterns that large steps grow.
# Folded Fashion CNNs at half their MACs, top-1 (seed 0; /tmp experiments, then
# benchmarks/accuracy.py): lr 0.1 / TV 0.1 gave mobile net 0.637 (0.57 on seeds 1 and 2),
# VGG 0.828, ResNet 0.858; lr 0.03 / TV 0.5 mobile net 0.751 (0.670, 0.771), VGG 0.862,
# ResNet 0.878. More steps (500), more images (512) or more damping did not help.
LEARNING_RATE = 0.03
TV_WEIGHT, L2_WEIGHT = 0.5, 0.01
# more images than the 64 of dead-leaves noise: each is one class's, and 64 would show each of
# ten classes about six times
INVERTED_SAMPLES = 256
# images x pixels inverted at once (the activations kept for the gradient): all 256 Fashion
# images of 28 x 28, five of 224 x 224
PIXELS_AT_ONCE = 256 * 32 * 32
JITTER = 2         # each step sees the images shifted by up to this many pixels (DeepInversion)


def inversion_target(model: onnx.ModelProto) -> tuple[str, str] | str:
    """(image input, class-score output) where the model is an image classifier that inversion
    applies to, else why not: one float input of rank 4, no BatchNormalization to steer by
    instead, and an output of rank 2 (batch, classes)."""
    from ..loading.shapes import graph_inputs
    inputs = graph_inputs(model)
    if len(inputs) != 1 or len(inputs[0].type.tensor_type.shape.dim) != 4 or \
            inputs[0].type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        return "not one float image input"
    if any(n.op_type == "BatchNormalization" for n in model.graph.node):
        return "BatchNorm statistics steer its synthetic images instead"
    scores = [o.name for o in model.graph.output if len(o.type.tensor_type.shape.dim) == 2
              and o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    if len(scores) != 1:
        return "no single (batch, classes) output"
    return inputs[0].name, scores[0]


def _torch_modules():
    """(torch, onnx2torch), or why not: the extra not installed, or an install that fails to
    import (a default pruning must not fail on it)."""
    try:
        import torch
        import onnx2torch
    except ImportError:
        return 'torch and onnx2torch are not installed (pip install "spa[invert]")'
    except Exception as e:  # noqa: BLE001
        # a torchvision built for another torch lacks its operators; onnx2torch only imports it
        if "torchvision::nms" not in str(e):
            return f"torch or onnx2torch fails to import: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        import sys
        import torch
        for name in [m for m in sys.modules if m.split(".")[0] in ("torchvision", "onnx2torch")]:
            del sys.modules[name]       # half imported
        _define_torchvision_ops(torch)
        try:
            import onnx2torch
        except Exception as again:  # noqa: BLE001
            return f"torch or onnx2torch fails to import: {str(again).splitlines()[0]}"
    return torch, onnx2torch


_TORCHVISION_LIB = []


def _define_torchvision_ops(torch):
    lib = torch.library.Library("torchvision", "DEF")
    for op in ("nms", "qnms"):
        lib.define(f"{op}(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.append(lib)    # the definitions live as long as the library object


def why_not_invert(model: onnx.ModelProto, samples: int, macs, budget: float | None = None) -> str | None:
    """Why ``samples`` images are not inverted from ``model`` (it is no image classifier without
    BatchNorm, or it costs more than ``budget`` multiply-adds, default INVERSION_BUDGET); None
    if they are. ``macs()``, the model's per sample, is counted only where inversion applies."""
    target = inversion_target(model)
    if isinstance(target, str):
        return target
    cost, budget = samples * STEPS * 3 * max(macs(), 1), INVERSION_BUDGET if budget is None else budget
    if cost > budget:
        return f"{cost:.1e} multiply-adds to invert, over the budget of {budget:.1e} (--synthetic invert inverts anyway)"
    return None


def inverted_images(model: onnx.ModelProto, images: np.ndarray, seed: int = 0, info: dict | None = None,
                    announce=None) -> np.ndarray | None:
    """``images`` (the synthetic start, N x C x H x W) moved until the model, one that
    ``why_not_invert`` allows, assigns image i to class i mod K; None where torch cannot be
    imported or the model does not convert (``info`` says why). ``announce()`` is called once
    inversion starts."""
    info = {} if info is None else info
    modules = _torch_modules()
    if isinstance(modules, str):
        info["inversion_skipped"] = modules
        return None
    torch, onnx2torch = modules
    try:
        return _invert(torch, onnx2torch, model, images, seed, info, announce)
    except Exception as e:  # noqa: BLE001 - onnx2torch lacks an op, or the graph does not convert
        info["inversion_skipped"] = f"could not invert: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        log.info("model inversion failed (%s); dead-leaves images instead", info["inversion_skipped"])
        return None


def _invert(torch, onnx2torch, model, images, seed, info, announce=None) -> np.ndarray:
    torch.manual_seed(seed)
    net = onnx2torch.convert(materialized(model)).eval()     # (its weights, wherever they lie)
    for p in net.parameters():
        p.requires_grad_(False)
    index = [o.name for o in model.graph.output].index(inversion_target(model)[1])

    def scores(x):
        out = net(x)
        return out[index] if isinstance(out, (list, tuple)) else out
    images = np.asarray(images, np.float32)
    # the L2 prior pulls towards the start's per-channel mean, in units of its spread (the
    # input statistics the user stated, or 0 and 1)
    centre = torch.tensor(images.mean(axis=(0, 2, 3), keepdims=True))
    spread = torch.tensor(images.std(axis=(0, 2, 3), keepdims=True) + 1e-6)
    with torch.no_grad():
        first = scores(torch.tensor(images[:1]))
    probabilities = bool((first >= 0).all() and torch.allclose(first.sum(1), torch.ones(1), atol=1e-3))
    classes = first.shape[1]
    labels = np.arange(len(images)) % classes
    if announce is not None:
        announce()
    chunk = max(1, PIXELS_AT_ONCE // int(np.prod(images.shape[2:])))
    done, hits = [], 0
    for at in range(0, len(images), chunk):
        x = torch.tensor(images[at:at + chunk], requires_grad=True)
        y = torch.tensor(labels[at:at + chunk])
        opt = torch.optim.Adam([x], lr=LEARNING_RATE)
        rng = np.random.default_rng(seed)
        for _ in range(STEPS):
            opt.zero_grad()
            dy, dx = rng.integers(-JITTER, JITTER + 1, 2) if JITTER else (0, 0)
            z = scores(torch.roll(x, shifts=(int(dy), int(dx)), dims=(2, 3)) if dy or dx else x)
            logp = torch.log(z.clamp_min(1e-12)) if probabilities else torch.log_softmax(z, 1)
            tv = (x[..., 1:, :] - x[..., :-1, :]).abs().mean() + (x[..., 1:] - x[..., :-1]).abs().mean()
            prior = (((x - centre) / spread) ** 2).mean()
            loss = torch.nn.functional.nll_loss(logp, y) + TV_WEIGHT * tv + L2_WEIGHT * prior
            loss.backward()
            opt.step()
        with torch.no_grad():
            hits += int((scores(x).argmax(1) == y).sum())
        done.append(x.detach().numpy())
    info.update(inverted_images=len(images), inversion_steps=STEPS, classes=int(classes),
                inverted_hit_rate=round(hits / len(images), 3))
    return np.concatenate(done)
