"""Diffusion UNets (issue 11, part 6; the seed LD-Pruner): MACs and latency after pruning.

    python benchmarks/unets.py [--exporter dynamo] [--runs 300]
    python benchmarks/unets.py --render        # README section from the results file only

1. exports models/diffusion_unets.py's small random-init ``UNet2DModel`` and
   ``UNet2DConditionModel`` (diffusers) with one exporter, into a temporary directory;
2. prunes each at ratio 0.3 and 0.5 with the default criterion (data-free OBSPA) and with
   l1, at the default rounding, with the oracle on;
3. measures onnxruntime latency of each original and its four pruned models interleaved in one
   process (``spa.verify.bench.latency``, CPU, one thread, median), and the relative error of the pruned
   model's output (the predicted noise) against the original's on 8 random inputs: the
   weights are random, so this compares criteria only, it says nothing about image quality;
4. writes benchmarks/results/unets.jsonl and the table between ``<!-- unets:start -->`` and
   ``<!-- unets:end -->`` in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "models"))

import numpy as np  # noqa: E402

import diffusion_unets  # noqa: E402
import spa  # noqa: E402
import spa.verify.bench  # noqa: E402
from benchmarks._common import blocking_op, update_readme_markers  # noqa: E402
from spa.graph.groups import Group  # noqa: E402
from spa.plan.planner import round_unit, rounded_keep  # noqa: E402
from spa.runtime import session  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results" / "unets.jsonl"
TAG = "unets"
HEADING = "## Diffusion UNets"
RATIOS = (0.3, 0.5)
CRITERIA = (None, "l1")   # None: the default (data-free OBSPA)
SAMPLES = 8


def _feeds(name: str, n: int) -> list[dict]:
    """``n`` random inputs like the export's: Gaussian sample and text states, timesteps 0-999."""
    rng = np.random.default_rng(123)
    ex = diffusion_unets.example_inputs(name)
    out = []
    for _ in range(n):
        f = {k: rng.standard_normal(v.shape).astype(np.float32) for k, v in ex.items() if k != "timestep"}
        f["timestep"] = rng.integers(0, 1000, size=tuple(ex["timestep"].shape), dtype=np.int64)
        out.append(f)
    return out


def _rel_error(original, pruned, feeds: list[dict]) -> float:
    a, b = session(original, threads=1), session(pruned, threads=1)
    num = den = 0.0
    for f in feeds:
        ya, yb = a.run(None, f)[0].astype(np.float64), b.run(None, f)[0].astype(np.float64)
        num += float(((ya - yb) ** 2).sum())
        den += float((ya ** 2).sum())
    return (num / den) ** 0.5


def _why_whole(w: dict, ratio: float, round_to: int) -> str:
    """Why a prunable group kept every channel at ``ratio``: the planner's arithmetic."""
    n, kind, width = w["channels"], w["kind"], w["width"]
    gone = int(np.floor(n * ratio + 1e-9))
    of = f" of {width} filters" if width > 1 and kind == "channels" else ""
    if gone == 0:
        return f"{ratio} of {n} {kind}{of} rounds down to 0"
    group = Group(0, np.arange(n), [], kind=kind, width=width)
    unit = round_unit(group, round_to)
    return (f"{n} {kind}{of}: keeping {n - gone} is rounded to a multiple of {unit} "
            f"({round_to} filters), {rounded_keep(n, n - gone, unit)}")


def measure(name: str, path: Path, exporter: str, runs: int) -> list[dict]:
    rows = []
    feeds = _feeds(name, SAMPLES)
    groups = spa.analyze(path).groups
    original, pruned = None, []
    for criterion in CRITERIA:
        for ratio in RATIOS:
            start = time.perf_counter()
            r = spa.prune(path, ratio=ratio, criterion=criterion, verify=True)
            wall = time.perf_counter() - start
            rep = r.report
            original = r.original
            pruned.append(r.model)
            whole = []
            for g in rep["groups"]:
                if not g["removed"]:
                    group = groups[g["id"]]
                    assert (group.kind, group.size) == (g["kind"], g["channels"])
                    whole.append({"kind": g["kind"], "channels": g["channels"], "width": group.width,
                                  "member": g["members"][0]})
            blocked = sorted({(b["reasons"][0]["kind"] or "?") + (f" ({blocking_op(b)})" if blocking_op(b) else "")
                              for b in rep["blocked"]})
            row = {
                "model": name, "exporter": exporter, "criterion": rep["options"]["criterion"],
                "ratio": ratio, "round_to": rep["options"]["round_to"],
                "params_before": rep["before"]["params"], "params_after": rep["after"]["params"],
                "macs_before": rep["before"]["macs"], "macs_after": rep["after"]["macs"],
                "macs_kept": rep["after"]["macs"] / rep["before"]["macs"],
                "runs": runs, "oracle_ok": bool(rep["verify"]["ok"]),
                "groups": len(rep["groups"]), "groups_whole": len(whole), "whole": whole,
                "groups_by_kind": {k: sum(g["kind"] == k and g["removed"] > 0 for g in rep["groups"])
                                   for k in sorted({g["kind"] for g in rep["groups"]})},
                "blocked": blocked, "rel_output_error": _rel_error(r.original, r.model, feeds),
                "prune_s": round(wall, 2),
            }
            rows.append(row)
    # one interleaved measurement of the original and every pruned model: machine noise hits
    # all alike, and the two criteria's models of one ratio (same shapes) show how large it is
    times = spa.verify.bench.latency([original, *pruned], rep["input_shapes"], runs=runs, threads=1)
    for row, t in zip(rows, times[1:]):
        row.update(latency_original_ms=times[0] * 1e3, latency_pruned_ms=t * 1e3, latency_ratio=t / times[0])
        print(json.dumps(row), flush=True)
    return rows


def render(rows: list[dict], meta: dict) -> str:
    L = [f"`{meta['command']}` (spa `{meta['rev']}`; diffusers {meta['diffusers']}, torch {meta['torch']}, "
         f"onnxruntime {meta['onnxruntime']}; {meta['cpu']}). Random-init models from "
         "`models/diffusion_unets.py`: `unet2d` (UNet2DModel, 3x32x32, channels 32/64/64, self-attention "
         "at 16x16) and `unet2d_cond` (UNet2DConditionModel, 4x16x16 latent, channels 32/64, "
         "self- and cross-attention to 8 tokens of width 32, 2 heads each), exported with the "
         f"{meta['exporter']} exporter; GroupNorm(8) everywhere. Default rounding (a multiple of 8 "
         "filters; a GroupNorm group of C/8 filters counts as C/8), the oracle on. Latency: "
         "onnxruntime CPU, one thread, the original and a model's four pruned versions interleaved in "
         f"one process (`spa.verify.bench.latency`, median of {meta['runs']} runs) on a 2-core machine shared "
         "with other jobs; both criteria keep the same shapes at a ratio, so the gap between their "
         "latency ratios is measurement noise. "
         "Output error: ‖pruned − original‖ / ‖original‖ of the predicted noise on 8 random "
         "inputs; random weights, so it compares the criteria, not image quality.",
         "",
         "| model | criterion | ratio | params before → after | MACs kept | latency ms (orig → pruned) | "
         "latency ratio | output error | pruned groups (whole) | oracle |",
         "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        kinds = ", ".join(f"{v} {k}" for k, v in r["groups_by_kind"].items() if v)
        L.append(f"| {r['model']} | {r['criterion']} | {r['ratio']} | {r['params_before']:,} → "
                 f"{r['params_after']:,} | {r['macs_kept']:.3f} | {r['latency_original_ms']:.2f} → "
                 f"{r['latency_pruned_ms']:.2f} | {r['latency_ratio']:.3f} | {r['rel_output_error']:.3f} | "
                 f"{kinds} ({r['groups_whole']}) | {'ok' if r['oracle_ok'] else 'FAILED'} |")
    blocked = sorted({b for r in rows for b in r["blocked"]})
    L += ["", "Blocked (not offered for pruning): " + ", ".join(blocked) + "; the LayerNorm-mixed "
          "width inside the transformer blocks is the inexact `hidden` kind (`--hidden`), not "
          "measured here. Prunable groups that kept every channel (count: why):", ""]
    for r in rows:
        counts: dict = {}
        for why in (_why_whole(w, r["ratio"], r["round_to"]) for w in r["whole"]):
            counts[why] = counts.get(why, 0) + 1
        if counts:
            L.append(f"- {r['model']} {r['criterion']} {r['ratio']}: " +
                     "; ".join(f"{c}: {why}" for why, c in counts.items()))
    L += ["", "With `round_to=1` every prunable group loses channels (tests/test_unets.py)."]
    return "\n".join(L)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exporter", choices=diffusion_unets.EXPORTERS, default="dynamo")
    ap.add_argument("--runs", type=int, default=300, help="latency runs per model (interleaved)")
    ap.add_argument("--render", action="store_true", help="only redraw the README section")
    args = ap.parse_args(argv)
    meta_path = RESULTS.with_suffix(".meta.json")
    if args.render:
        rows = [json.loads(x) for x in RESULTS.read_text().splitlines() if x.strip()]
        meta = json.loads(meta_path.read_text())
    else:
        import subprocess

        import diffusers
        import onnxruntime
        import torch
        rev = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True).stdout.strip()
        meta = {"command": "python benchmarks/unets.py" + (f" --exporter {args.exporter}" if args.exporter != "dynamo"
                                                           else "") + (f" --runs {args.runs}" if args.runs != 300 else ""),
                "rev": rev, "diffusers": diffusers.__version__, "torch": torch.__version__,
                "onnxruntime": onnxruntime.__version__, "cpu": platform.processor() or platform.machine(),
                "exporter": args.exporter, "runs": args.runs}
        rows = []
        with tempfile.TemporaryDirectory() as tmp:
            for name in diffusion_unets.MODELS:
                path = diffusion_unets.export(name, args.exporter, tmp)
                rows += measure(name, path, args.exporter, args.runs)
        RESULTS.parent.mkdir(exist_ok=True)
        RESULTS.write_text("".join(json.dumps(r) + "\n" for r in rows))
        meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    text = render(rows, meta)
    print(text)
    update_readme_markers(TAG, HEADING, text)


if __name__ == "__main__":
    main()
