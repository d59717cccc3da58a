"""Choose the default --round-to from measurements.

Odd channel counts make onnxruntime's convolutions slower even as MACs drop, most of all on
depthwise/mobile networks. For each model and ratio this prunes with --round-to 1, 4, 8, 16
and measures every variant against the original, interleaved in one process (one thread,
median), then writes the table into benchmarks/README.md.

    python benchmarks/round_to.py [--models resnet50 ...] [--runs 20] [--cache /tmp/zoo]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "models"))

import spa  # noqa: E402
from spa.verify.bench import latency  # noqa: E402

MODELS = ["mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "mnasnet1_0", "shufflenet_v2_x1_0",
          "regnet_x_400mf", "resnet50"]
ROUNDS = [1, 4, 8, 16]
RATIOS = [0.3, 0.5]


def measure(path, ratio, runs):
    results = [spa.prune(path, ratio=ratio, round_to=r, verify=False) for r in ROUNDS]
    original = results[0].original
    times = latency([original] + [r.model for r in results], results[0].report["input_shapes"], runs=runs)
    macs = [r.report["after"]["macs"] / r.report["before"]["macs"] for r in results]
    return [(m, t / times[0]) for m, t in zip(macs, times[1:])]


def update_readme(section: str, text: str):
    readme = ROOT / "benchmarks" / "README.md"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    old = readme.read_text() if readme.exists() else "# Benchmarks\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in old and end in old:
        new = old[: old.index(start)] + block + old[old.index(end) + len(end):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    readme.write_text(new)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--runs", type=int, default=20)
    p.add_argument("--cache", default="/tmp/zoo")
    p.add_argument("--exporter", default="legacy")
    args = p.parse_args()
    import torchvision_zoo as zoo

    header = "| model | ratio | " + " | ".join(f"round {r}: MACs / latency" for r in ROUNDS) + " |"
    lines = [header, "|" + "---|" * (2 + len(ROUNDS))]
    per_round = {r: [] for r in ROUNDS}
    for name in args.models:
        path = zoo.export(name, args.exporter, args.cache)
        for ratio in RATIOS:
            row = measure(path, ratio, args.runs)
            for r, (_, lat) in zip(ROUNDS, row):
                per_round[r].append(lat)
            cells = " | ".join(f"{m:.3f} / {t:.3f}" for m, t in row)
            lines.append(f"| {name} | {ratio} | {cells} |")
            print(lines[-1], flush=True)
    summary = ["", "Geometric mean latency ratio (pruned / original) and worst case per --round-to:", "",
               "| round-to | geo-mean latency ratio | worst | slower than original |", "|---|---|---|---|"]
    for r in ROUNDS:
        v = np.array(per_round[r])
        summary.append(f"| {r} | {np.exp(np.log(v).mean()):.3f} | {v.max():.3f} | {(v > 1).sum()} of {len(v)} |")
    text = "\n".join(
        ["## Default --round-to", "",
         f"`python benchmarks/round_to.py --runs {args.runs}` ({args.exporter} exporter, 224x224, batch 1, "
         "onnxruntime CPU, one thread, median of interleaved runs). Cells: MACs ratio / latency ratio.", ""]
        + lines + summary)
    print("\n".join(summary))
    update_readme("round_to", text)


if __name__ == "__main__":
    main()
