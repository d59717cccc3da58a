#!/usr/bin/env python
"""Does a refactor prune the same channels and weights? Run it with two checkouts, compare.

    PYTHONPATH=/path/to/old python benchmarks/same_pruning.py --out /tmp/old.json
    PYTHONPATH=$PWD python benchmarks/same_pruning.py --out /tmp/new.json --compare /tmp/old.json

For every bundled model and a set of settings (magnitude and OBSPA, ratios, measured and
uniform budgets, global ranking with a cap, heads and MLP of the tiny LLaMA, calibration data)
it records, per run, a digest of every group's removed channel indices, a digest of the pruned
model's weights, MACs and params; ``--compare`` prints each row that differs and exits 1 if any
does. Only ``spa.prune``'s keyword API is used, so any version of spa runs it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

CNNS = ["demo_cnn", "fashion_resnet", "fashion_vgg", "fashion_mobile"]
SETTINGS = [
    ("l1 ratio 0.3", {"ratio": 0.3, "criterion": "l1"}),
    ("obspa ratio 0.3", {"ratio": 0.3}),
    ("l1 macs 0.5 (measured, 3 steps)", {"macs": 0.5, "criterion": "l1"}),
    ("obspa macs 0.5 (uniform)", {"macs": 0.5}),
    ("l1 params 0.7", {"params": 0.7, "criterion": "l1"}),
    ("l1 global 0.4 cap 0.5", {"ratio": 0.4, "criterion": "l1", "global_rank": True, "max_ratio": 0.5}),
    ("obspa calibrated 0.3", {"ratio": 0.3, "calib": "fashion_calib.npz", "calib_samples": 64}),
]
LLAMA = [
    ("l1 heads 0.25 mlp 0.3", {"heads": 0.25, "mlp": 0.3, "criterion": "l1"}),
    ("obspa heads 0.25 mlp 0.3", {"heads": 0.25, "mlp": 0.3}),
]


def digest(items) -> str:
    h = hashlib.sha256()
    for item in items:
        h.update(item if isinstance(item, bytes) else repr(item).encode())
    return h.hexdigest()[:12]


def measure(model: str, label: str, kwargs: dict) -> dict:
    import spa
    kwargs = dict(kwargs)
    if "calib" in kwargs:
        with np.load(MODELS / kwargs["calib"]) as f:
            kwargs["calib"] = {k: f[k] for k in f.files}
    start = time.perf_counter()
    try:
        r = spa.prune(str(MODELS / f"{model}.onnx"), verify=False, **kwargs)
    except Exception as e:  # noqa: BLE001 - a refusal is a result to compare too
        return {"model": model, "setting": label, "error": f"{type(e).__name__}: {str(e)[:200]}"}
    groups = [(g["kind"], g["channels"], tuple(g["removed_channels"])) for g in r.report["groups"]]
    weights = sorted((t.name, numpy_helper.to_array(t).astype(np.float32).round(5).tobytes())
                     for t in r.model.graph.initializer)
    return {"model": model, "setting": label, "macs": r.report["after"]["macs"],
            "params": r.report["after"]["params"], "removed": sum(g[2].__len__() for g in groups),
            "plan_digest": digest(groups), "weights_digest": digest(name.encode() + w for name, w in weights),
            "seconds": round(time.perf_counter() - start, 2)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--compare", help="an earlier --out file: print the rows that differ")
    ap.add_argument("-k", default="", help="only models or settings whose name contains this")
    args = ap.parse_args()
    import spa
    print(f"spa from {Path(spa.__file__).parent}", file=sys.stderr)
    runs = [(m, label, kw) for m in CNNS for label, kw in SETTINGS if "calib" not in kw or m != "demo_cnn"]
    runs += [("tiny_llama", label, kw) for label, kw in LLAMA]
    rows = []
    for model, label, kw in runs:
        if args.k and args.k not in model and args.k not in label:
            continue
        rows.append(measure(model, label, kw))
        print(json.dumps(rows[-1]), file=sys.stderr)
    Path(args.out).write_text(json.dumps(rows, indent=1))
    if not args.compare:
        return 0
    before = {(r["model"], r["setting"]): r for r in json.loads(Path(args.compare).read_text())}
    differ = 0
    print(f"{'model':<16}{'setting':<34}result")
    for r in rows:
        old = before.get((r["model"], r["setting"]))
        keys = ("error", "macs", "params", "removed", "plan_digest", "weights_digest")
        diff = [k for k in keys if old is None or old.get(k) != r.get(k)]
        differ += bool(diff)
        print(f"{r['model']:<16}{r['setting']:<34}{'same' if not diff else 'DIFFERS: ' + ', '.join(diff)}")
    print(f"{len(rows) - differ} of {len(rows)} runs prune the same channels and weights")
    return 1 if differ else 0


if __name__ == "__main__":
    sys.exit(main())
