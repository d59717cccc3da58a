"""How much do correct prunings differ from their masked originals? Sets the oracle's rtol.

The oracle (``spa.verify.oracle.oracle``) compares the pruned model with the original whose removed
channels are zeroed where they are contracted; for a correct pruning the two compute the same
function, so what is left is float rounding (different summation lengths, onnxruntime fusing
the pruned graph differently from the masked one). A wrong rule leaves more. This script
measures the first and a few of the second, and prints the distribution of the relative error
(max |pruned - masked| / max |masked|, per output, the quantity the oracle's ``rtol`` bounds):

- every oracle call made by the tests that prune small graphs (tests/test_rules.py,
  tests/test_property.py's random CNNs, tests/test_hostile.py's float64 model, tests/test_foreign.py's
  non-zoo
  tests, tests/test_transformers.py's exported transformers): ``spa.pipeline.oracle`` is wrapped so
  every call is recorded, whatever the test asserts;
- exported models already on disk (models/*.onnx, the benchmarks' cache in
  benchmarks/results/cache/: ResNet-50, MobileNet-V3, EfficientNet-B0, BERT-base), pruned at
  several ratios and criteria;
- the oracle results recorded by earlier benchmark runs (benchmarks/results/*.json*: the
  torchvision sweep's 126 exports, the exporters table, the transformer table);
- wrong rules, for contrast: LRN and Softmax over channels treated as per-channel.

    python benchmarks/oracle_tolerance.py                # everything (several minutes on 2 cores)
    python benchmarks/oracle_tolerance.py --quick        # no tests/test_transformers.py, no BERT-base
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import spa  # noqa: E402
import spa.pipeline  # noqa: E402
from spa.errors import SpaError  # noqa: E402

RECORD: list[dict] = []
_SOURCE = ["?"]


def _recording_oracle(real):
    def wrapper(*args, **kwargs):
        result = real(*args, **kwargs)
        RECORD.append({"source": _SOURCE[0], "max_rel": result.max_rel, "max_abs": result.max_abs,
                       "ok": result.ok})
        return result
    return wrapper


def from_tests(quick: bool):
    import pytest
    runs = [("tests: rules", ["tests/test_rules.py"]),
            ("tests: property (random CNNs)", ["tests/test_property.py"]),
            ("tests: hostile (float64)", ["tests/test_hostile.py", "-k", "float"]),
            ("tests: foreign (not zoo)", ["tests/test_foreign.py", "-k", "not zoo"])]
    if not quick:
        runs.append(("tests: transformers", ["tests/test_transformers.py"]))
    for source, args in runs:
        _SOURCE[0] = source
        t = time.time()
        code = pytest.main(["-q", "-p", "no:cacheprovider", "--no-header", "-W", "ignore", *args])
        print(f"# {source}: pytest exit {int(code)}, {time.time() - t:.0f} s", flush=True)


def from_models(quick: bool):
    paths = sorted(glob.glob(str(ROOT / "models/*.onnx"))) + sorted(
        p for p in glob.glob(str(ROOT / "benchmarks/results/cache/*.onnx")) if not (quick and "bert" in p))
    for path in paths:
        name = Path(path).stem
        for options in ({"ratio": 0.3}, {"ratio": 0.5}, {"ratio": 0.7, "criterion": "random"},
                        {"ratio": 0.5, "global_rank": True}):
            if "bert" in name and options != {"ratio": 0.5}:
                continue  # 110M parameters: one pruning is enough
            _SOURCE[0] = f"model: {name}"
            try:
                spa.prune(path, verify=True, **options)
            except SpaError as e:
                print(f"# {name} {options}: {type(e).__name__}: {str(e)[:120]}", flush=True)
        print(f"# {name}: done", flush=True)


def from_recorded():
    """Oracle results stored by earlier benchmark runs (exact prunings only)."""
    def walk(o):
        if isinstance(o, dict):
            if "max_rel_error" in o and o.get("exact") is not False and "mean_cosine" not in o:
                yield o
            for v in o.values():
                yield from walk(v)
        elif isinstance(o, list):
            for v in o:
                yield from walk(v)

    for path in sorted(glob.glob(str(ROOT / "benchmarks/results/*.json*"))):
        if path.endswith("meta.json"):
            continue
        text = Path(path).read_text()
        docs = [json.loads(line) for line in text.splitlines() if line.strip()] if path.endswith(".jsonl") \
            else [json.loads(text)]
        for doc in docs:
            for v in walk(doc):
                RECORD.append({"source": f"recorded: {Path(path).name}", "max_rel": v["max_rel_error"],
                               "max_abs": v.get("max_abs_error", float("nan")), "ok": v.get("ok", True)})


def wrong_rules():
    """What the oracle sees when a rule is wrong: mixing ops treated as per-channel."""
    from spa.graph.rules.registry import RULES
    from test_rules import C, sandwich

    def per_channel(ctx):
        for i in range(len(ctx.in_shape(0))):
            ctx.same(ctx.inp(0, i), ctx.outp(0, i))

    out = []
    for op, attrs in [("LRN", {"size": 3}), ("LRN", {"size": 5}), ("Softmax", {"axis": 1})]:
        real = RULES[op]
        RULES[op] = per_channel
        try:
            before = len(RECORD)
            _SOURCE[0] = "wrong rule"
            try:
                spa.prune(sandwich(lambda g, y: (g.op(op, [y], **attrs), C)), ratio=0.5, round_to=1, verify=True)
            except SpaError:
                pass
            out.append((f"{op} {attrs} as per-channel", RECORD.pop(before)["max_rel"]))
        finally:
            RULES[op] = real
    return out


def summary(values):
    a = np.asarray(values, dtype=np.float64)
    return f"n={len(a):5d}  max={a.max():.2e}  p99={np.percentile(a, 99):.2e}  median={np.median(a):.2e}"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="skip tests/test_transformers.py and BERT-base")
    ap.add_argument("--only", choices=["tests", "models", "recorded"], action="append",
                    help="measure only these sources (repeatable)")
    args = ap.parse_args()
    os.chdir(ROOT)
    spa.pipeline.oracle = _recording_oracle(spa.pipeline.oracle)
    wanted = set(args.only or ["tests", "models", "recorded"])
    if "tests" in wanted:
        from_tests(args.quick)
    if "models" in wanted:
        from_models(args.quick)
    if "recorded" in wanted:
        from_recorded()
    wrong = wrong_rules()

    from spa.verify.oracle import ATOL, RTOL
    print(f"\nrelative error of correct prunings (max |pruned - masked| / max |masked|), by source:")
    for source in dict.fromkeys(r["source"] for r in RECORD):
        rows = [r for r in RECORD if r["source"] == source]
        print(f"  {source:40s} {summary([r['max_rel'] for r in rows])}"
              f"{'  (oracle failed: %d)' % sum(not r['ok'] for r in rows) if not all(r['ok'] for r in rows) else ''}")
    everything = [r["max_rel"] for r in RECORD]
    worst = max(RECORD, key=lambda r: r["max_rel"])
    print(f"  {'all':40s} {summary(everything)}   worst: {worst['source']}")
    print("\nwrong rules (must fail):")
    for what, rel in wrong:
        print(f"  {what:40s} max_rel={rel:.2e}")
    print(f"\nspa.verify.RTOL = {RTOL:g}: {RTOL / max(everything):.0f}x above the worst correct pruning, "
          f"{min(r for _, r in wrong) / RTOL:.1f}x below the smallest wrong rule (ATOL = {ATOL:.3g})")
    failed = [r for r in RECORD if not r["ok"] and not r["source"].startswith("recorded")]
    if failed or max(everything) >= RTOL or min(r for _, r in wrong) <= RTOL:
        print(f"TOLERANCE DOES NOT SEPARATE them ({len(failed)} correct prunings failed the oracle)")
        sys.exit(1)


if __name__ == "__main__":
    main()
