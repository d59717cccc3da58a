"""Long chains against spa's time: `spa prune CHAIN -o OUT --ratio 0.3` on Conv/Relu and
Add/Relu/Mul chains of 1k, 10k and 100k nodes, stage by stage (the stage lines spa prints
when stderr is not a terminal), optionally under cProfile.

    python benchmarks/chain.py [--sizes 1000,10000,100000] [--kinds conv,elementwise]
                               [--dir /tmp/spa-chain] [--profile] [--root DIR] [extra spa prune args]

Each run is a child process (``--root``: the spa of another checkout, for a before/after);
the model is built by ``tests/graphs.py:chain_model``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import onnx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
from graphs import chain_model  # noqa: E402


def run(model: Path, out: Path, extra: list[str], profile: bool, root: Path = ROOT) -> tuple[float, str]:
    cmd = [sys.executable] + (["-m", "cProfile", "-o", str(model.with_suffix(".prof"))] if profile else []) + \
          ["-m", "spa", "prune", str(model), "-o", str(out), "--ratio", "0.3", *extra]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root)
    took = time.perf_counter() - start
    stages = [line for line in done.stderr.splitlines() if line.startswith("spa: ")]
    return took, f"exit {done.returncode}; " + "; ".join(s[5:] for s in stages)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--sizes", default="1000,10000,100000")
    p.add_argument("--kinds", default="conv,elementwise")
    p.add_argument("--dir", default="/tmp/spa-chain")
    p.add_argument("--profile", action="store_true", help="also write MODEL.prof (cProfile)")
    p.add_argument("--root", type=Path, default=ROOT, help="folder whose spa runs (default: this checkout)")
    args, extra = p.parse_known_args()
    folder = Path(args.dir)
    folder.mkdir(parents=True, exist_ok=True)
    for kind in args.kinds.split(","):
        for n in map(int, args.sizes.split(",")):
            model = folder / f"{kind}{n}.onnx"
            if not model.exists():
                onnx.save(chain_model(n, kind), model)
            took, stages = run(model, folder / f"{kind}{n}.pruned.onnx", [a for a in extra if a != "--"],
                               args.profile, args.root.resolve())
            print(f"{kind:<12}{n:>8} nodes {took:8.1f}s  {stages}", flush=True)


if __name__ == "__main__":
    main()
