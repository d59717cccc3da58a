"""The plan back onto torchvision models exported with the defaults: BatchNorm folded into the convs.

    python benchmarks/folded_bn.py                      # 3 models x 2 exporters x 2 BatchNorm states
    python benchmarks/folded_bn.py --models resnet18 --exporters legacy --bn trained

For each model: export (dynamo with its default optimize=True, or the legacy exporter,
dynamo=False, in eval mode: both fold BatchNorm into the convs) -> ``spa.prune`` with the
defaults (data-free OBSPA, which changes kept weights and adds biases) at --ratio -> plan ->
``spa.torch.apply_plan`` on the module -> its forward against spa's pruned ONNX, and the
pruned module exported again (dynamo) against it. Errors are max |a - b| / max |b|, on the same
random input. "trained" draws BatchNorm statistics, scales and shifts and the other layers' biases
(as a trained model has: folding is not the identity, no two biases are equal); "fresh" keeps
torchvision's initialisation (γ = 1, β = μ = 0, var = 1: the folded biases are zero, the dynamo
exporter drops them and spa adds its own; the legacy one merges equal zero tensors into one).
Writes benchmarks/results/folded_bn.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path[:0] = [str(HERE), str(REPO / "models"), str(REPO)]

RESULTS = HERE / "results" / "folded_bn.json"


def _trained_like(model, seed: int = 0):
    import torch
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                m.bias.copy_(torch.rand(n, generator=g) - 0.5)
            elif isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)) and m.bias is not None:
                m.bias.copy_((torch.rand(m.bias.shape, generator=g) - 0.5) * 0.2)
    return model


def _run(path, x):
    import onnxruntime as ort
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x.numpy()})[0]


def _rel(a, b) -> float:
    import numpy as np
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def measure(name: str, exporter: str, bn: str, ratio: float) -> dict:
    import torch
    import torchvision_zoo  # noqa: F401  (defines torchvision's ops before torchvision is imported)
    import torchvision

    import spa
    import spa.torch
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    if bn == "trained":
        _trained_like(model)
    x = torch.randn(2, 3, 64, 64)
    row = {"model": name, "exporter": exporter, "bn": bn, "ratio": ratio}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        torch.onnx.export(model, (x,), str(tmp / "m.onnx"), dynamo=exporter == "dynamo", external_data=False,
                          input_names=["x"], output_names=["output"])
        result = spa.prune(tmp / "m.onnx", ratio=ratio)         # the defaults: data-free OBSPA
        result.save(tmp / "p.onnx")
        result.save_plan(tmp / "plan.json")
        doc = json.loads((tmp / "plan.json").read_text())
        applied = spa.torch.apply_plan(model, tmp / "plan.json")
        want = _run(tmp / "p.onnx", x)
        with torch.no_grad():
            got = model(x).numpy()
        torch.onnx.export(model, (x,), str(tmp / "again.onnx"), dynamo=True, external_data=False,
                          input_names=["x"], output_names=["output"])
        row.update(changed=sum("delta" in e for e in doc["tensors"].values()), added=len(doc["added"]),
                   through_bn=len(applied.through_bn), torch_error=_rel(got, want),
                   reexport_error=_rel(_run(tmp / "again.onnx", x), want), seconds=round(time.perf_counter() - t0, 1))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet18,mobilenet_v3_small,efficientnet_b0")
    ap.add_argument("--exporters", default="dynamo,legacy")
    ap.add_argument("--bn", default="trained,fresh")
    ap.add_argument("--ratio", type=float, default=0.3)
    args = ap.parse_args(argv)
    rows = []
    for name in args.models.split(","):
        for exporter in args.exporters.split(","):
            for bn in args.bn.split(","):
                rows.append(measure(name, exporter, bn, args.ratio))
                print(json.dumps(rows[-1]), flush=True)
    worst = max(max(r["torch_error"], r["reexport_error"]) for r in rows)
    text = _render(rows, args.ratio, worst)
    print(text)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    if argv is None and sys.argv[1:] == []:          # the full default run goes into the README
        from _common import update_readme_section
        update_readme_section(text)
    return 0 if worst < 1e-5 else 1


def _render(rows, ratio: float, worst: float) -> str:
    lines = ["## The plan back to PyTorch, BatchNorm folded by the exporter", "",
             "torchvision models exported with the defaults (BatchNorm folded into the convs), pruned with the "
             f"defaults (data-free OBSPA, ratio {ratio}), the plan applied with `spa.torch.apply_plan`: the module's "
             "forward and its re-export against spa's pruned ONNX (max |a − b| / max |b|). Generated by "
             "`benchmarks/folded_bn.py`.", "",
             "- command: `python benchmarks/folded_bn.py`", "",
             "| model | exporter | BatchNorm | plan tensors changed | biases added | mapped through a BatchNorm "
             "| torch vs spa's ONNX | re-export vs spa's ONNX |", "|---|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['exporter']} | {r['bn']} | {r['changed']} | {r['added']} | "
                     f"{r['through_bn']} | {r['torch_error']:.1e} | {r['reexport_error']:.1e} |")
    lines += ["", f"- worst error {worst:.1e} (target < 1e-5)"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
