"""Do --macs/--params budgets land? For every benchmark model found, `spa.prune(path, macs=t)` and
`spa.prune(path, params=t)` for t in 0.75, 0.5, 0.3 with the defaults (--round-to 8, the default
allocation and steps), the share kept against the target, within 3 % or not, and the report's
reason when not; optionally the same at an older revision, to see what landing changed.

    python benchmarks/budget_landing.py                       # default criterion (data-free OBSPA)
    python benchmarks/budget_landing.py --criterion l1        # the measured allocation, 3 steps
    python benchmarks/budget_landing.py --baseline 2308b00    # also prune with spa as of that commit
    python benchmarks/budget_landing.py --models tiny_llama --kinds params --timeout 1800
    python benchmarks/budget_landing.py --render              # README section from the results file only

Models: models/*.onnx (demo_cnn, fashion_*, digits_mlp, tiny_llama), every .onnx in
models/foreign/ and under --foreign (benchmarks/exporters.py builds the Keras/JAX/Paddle exports
there: keras_cnn, jax_cnn, ...), and a PyTorch twin of models/foreign/jax_models.py's CNN (random
weights, exported here when torch is installed) that stands in for the foreign CNNs where they
were not built. Each model and revision runs in a child process (one thread); rows go to
benchmarks/results/budget_landing.jsonl, the table between <!-- budget_landing:start --> and
<!-- budget_landing:end --> in benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from _common import load_rows, update_readme_markers  # noqa: E402

RESULTS = HERE / "results" / "budget_landing.jsonl"
TARGETS = (0.75, 0.5, 0.3)
KINDS = ("macs", "params")
TOLERANCE = 0.03
TWIN = "jax_cnn_twin"

# run in the child: prune at every budget, one JSON line each
CHILD = r"""
import json, sys, time
import spa
path, criterion, kinds, targets = sys.argv[1], sys.argv[2], sys.argv[3].split(","), sys.argv[4].split(",")
for kind in kinds:
    for t in map(float, targets):
        t0 = time.perf_counter()
        try:
            r = spa.prune(path, **{kind: t}, **({} if criterion == "default" else {"criterion": criterion}), verify=False)
        except Exception as e:  # a row that failed says so
            print(json.dumps({"kind": kind, "target": t, "error": f"{type(e).__name__}: {e}"}), flush=True)
            continue
        rep, b = r.report, r.report["budget"]
        print(json.dumps({"kind": kind, "target": t, "achieved": rep["after"][kind] / rep["before"][kind],
                          "met": b.get("met"), "landed": b.get("landed"), "off_round": len(b.get("off_round", [])),
                          "reason": b.get("reason"), "allocation": b.get("allocation"), "steps": b.get("steps", 1),
                          "criterion": rep["options"]["criterion"], "wall_s": time.perf_counter() - t0}), flush=True)
"""


def revision(root: Path) -> str:
    try:
        out = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "spa"], capture_output=True,
                               text=True).stdout.strip()
        return out + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def export_twin(folder: Path) -> Path | None:
    """models/foreign/jax_models.py's CNN (conv 16, conv 32, pool, a residual pair of 32, conv 64,
    pool, dense 128, dense 10; BatchNorm after the first two and the fifth conv) in PyTorch."""
    try:
        import torch
        import torch.nn as nn
    except ImportError:
        return None

    class CNN(nn.Module):
        def __init__(self):
            super().__init__()
            self.c1, self.b1 = nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.c2, self.b2 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
            self.c3, self.c4 = nn.Conv2d(32, 32, 3, padding=1), nn.Conv2d(32, 32, 3, padding=1)
            self.c5, self.b5 = nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64)
            self.fc1, self.fc2 = nn.Linear(7 * 7 * 64, 128), nn.Linear(128, 10)

        def forward(self, x):
            x = torch.relu(self.b1(self.c1(x)))
            x = nn.functional.max_pool2d(torch.relu(self.b2(self.c2(x))), 2)
            x = torch.relu(x + self.c4(torch.relu(self.c3(x))))
            x = nn.functional.avg_pool2d(torch.relu(self.b5(self.c5(x))), 2)
            return self.fc2(torch.relu(self.fc1(x.flatten(1))))

    torch.manual_seed(0)
    path = folder / f"{TWIN}.onnx"
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(CNN().eval(), torch.randn(1, 1, 28, 28), str(path), input_names=["image"],
                          output_names=["logits"], dynamo=False)
    return path


def models(foreign: Path, tmp: Path) -> dict[str, Path]:
    found = {p.stem: p for p in sorted((REPO / "models").glob("*.onnx"))}
    for folder in (REPO / "models" / "foreign", foreign):
        if folder.is_dir():
            found.update({p.stem: p for p in sorted(folder.rglob("*.onnx"))})
    twin = export_twin(tmp)
    if twin is not None:
        found[TWIN] = twin
    return found


def run(path: Path, root: Path, criterion: str, timeout: float, kinds=KINDS) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    try:
        p = subprocess.run([sys.executable, "-c", CHILD, str(path), criterion, ",".join(kinds),
                            ",".join(map(str, TARGETS))], capture_output=True, text=True, env=env, timeout=timeout, cwd=str(root))
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        return [json.loads(x) for x in out.splitlines() if x.startswith("{")] + [{"error": f"timed out after {timeout:.0f} s"}]
    rows = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    if p.returncode:
        rows.append({"error": (p.stderr.strip().splitlines() or ["?"])[-1]})
    return rows


def render(rows: list[dict]) -> str:
    latest: dict = {}
    for r in rows:   # the last run of each cell
        latest[(r["model"], r["revision_role"], r["criterion_asked"], r.get("kind"), r.get("target"))] = r
    rows = list(latest.values())
    criteria = sorted({r["criterion_asked"] for r in rows})
    lines = ["`python benchmarks/budget_landing.py [--criterion l1] [--baseline REV]`: `spa.prune(path, macs=t)` and "
             "`spa.prune(path, params=t)` with the defaults (`--round-to 8`, the default allocation and steps), "
             "`verify=False`; achieved = after/before of the report's MACs or params. Within 3 %: "
             "|achieved - target| <= 0.03 target. *before*: the same call at the baseline revision; (over): "
             "more than the target kept. *off --round-to*: groups the landing took to a finer multiple "
             "(of the last step, where there are several).", ""]
    for crit in criteria:
        cells = [r for r in rows if r["criterion_asked"] == crit]
        now = sorted((r for r in cells if r["revision_role"] == "now"),
                     key=lambda r: (r["model"], KINDS.index(r["kind"]) if r.get("kind") in KINDS else 9,
                                    -r.get("target", 0)))
        before = {(r["model"], r.get("kind"), r.get("target")): r for r in cells if r["revision_role"] == "baseline"}
        revs = sorted({r["revision"] for r in now})
        base_revs = sorted({r["revision"] for r in before.values()})
        name = "default criterion (data-free OBSPA, 1 step: OBS cost curves where BatchNorm steers the synthetic inputs, else one ratio for every group)" if crit == "default" else \
            f"`criterion=\"{crit}\"` (measured allocation, 3 steps)"
        lines += [f"### {name}", "",
                  f"spa revision(s): {', '.join(f'`{r}`' for r in revs)}"
                  + (f"; before: {', '.join(f'`{r}`' for r in base_revs)}" if base_revs else ""), "",
                  "| model | budget | target | achieved | within 3 % | off --round-to | before | reason (when not within 3 %) | time (s) |",
                  "|---|---|---:|---:|---|---:|---:|---|---:|"]
        landed = 0
        for r in now:
            b = before.get((r["model"], r.get("kind"), r.get("target")))
            old = "–" if b is None or "achieved" not in b else \
                f"{b['achieved']:.3f}" + (" (over)" if b["achieved"] > b["target"] + 1e-9 else "")
            if "achieved" not in r:
                lines.append(f"| {r['model']} | {r.get('kind', '?')} | {r.get('target', '?')} | – | error | | {old} | "
                             f"{r.get('error', '?')} | |")
                continue
            ok = abs(r["achieved"] - r["target"]) <= TOLERANCE * r["target"] + 1e-9
            landed += ok
            lines.append(f"| {r['model']} | {r['kind']} | {r['target']} | {r['achieved']:.3f} | {'yes' if ok else '**no**'} | "
                         f"{r['off_round']} | {old} | {'' if ok else (r.get('reason') or '').replace('|', '/')} | "
                         f"{r['wall_s']:.1f} |")
        done = [b for b in before.values() if "achieved" in b]
        old_ok = sum(abs(b["achieved"] - b["target"]) <= TOLERANCE * b["target"] + 1e-9 for b in done)
        old_over = sum(b["achieved"] > b["target"] + 1e-9 for b in done)
        over = sum(r.get("achieved", 0) > r.get("target", 1) + 1e-9 for r in now)
        lines += ["", f"Within 3 %: {landed} of {len(now)}, over the target: {over}"
                  + (f" (before: {old_ok} of {len(before)}, over the target: {old_over})" if before else ""), ""]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--criterion", default="default", help="'default' (spa's) or a criterion name, e.g. l1")
    p.add_argument("--models", default="", help="comma-separated names (file stems); default: all found")
    p.add_argument("--foreign", default="/tmp/foreign", help="where benchmarks/exporters.py built the foreign models")
    p.add_argument("--baseline", default="", help="a git revision to prune with as well (its spa/ only)")
    p.add_argument("--kinds", default=",".join(KINDS), help="budgets to try: macs, params")
    p.add_argument("--timeout", type=float, default=900, help="seconds per model and revision")
    p.add_argument("--render", action="store_true")
    args = p.parse_args()
    if not args.render:
        with tempfile.TemporaryDirectory() as tmp:
            tmp = Path(tmp)
            found = models(Path(args.foreign), tmp)
            wanted = [m for m in args.models.split(",") if m] or list(found)
            roots = [("now", REPO, revision(REPO))]
            if args.baseline:
                base = tmp / "baseline"
                base.mkdir()
                archive = subprocess.run(["git", "-C", str(REPO), "archive", args.baseline, "spa"], capture_output=True,
                                         check=True).stdout
                subprocess.run(["tar", "-x", "-C", str(base)], input=archive, check=True)
                roots.append(("baseline", base, args.baseline))
            for name in wanted:
                if name not in found:
                    print(f"skipped {name}: not found", file=sys.stderr)
                    continue
                for role, root, rev in roots:
                    for row in run(found[name], root, args.criterion, args.timeout, args.kinds.split(",")):
                        row.update(model=name, revision=rev, revision_role=role, criterion_asked=args.criterion)
                        RESULTS.parent.mkdir(exist_ok=True)
                        with RESULTS.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
    text = render(load_rows(RESULTS))
    print(text)
    update_readme_markers("budget_landing", "## Budgets that land", text)


if __name__ == "__main__":
    main()
