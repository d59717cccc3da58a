"""Uniform ratio vs allocated budget at equal MACs, no fine-tuning.

For every model of the accuracy benchmark that trains here and every MACs target, two
prunings with the same criterion: **allocated** (``spa.prune(macs=target,
allocation="measured")``: the cut spent
where the measured output change per MAC saved is least) and **uniform** (the one ratio for
every group whose MACs come closest to what the allocated model kept, found by bisection).
Both with ``round_to=1`` so that the MACs can match. Prints a markdown table, appends raw rows to results/allocation.jsonl and
rewrites the "Where to cut" section of benchmarks/README.md.

    python models/fashion_cnns.py; python models/digits_mlp.py   # once: train the models
    python benchmarks/allocation.py [--models ...] [--criteria ...] [--targets ...] [--render]
    python benchmarks/allocation.py --torch-pruning   # add Torch-Pruning's global L1 at the same MACs
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import update_readme_section  # noqa: E402
from accuracy import TORCH_MODELS, Bench, git_rev, macs_of, spa_kwargs  # noqa: E402

RESULTS = HERE / "results" / "allocation.jsonl"
MODELS = ["fashion_resnet", "fashion_vgg", "fashion_mobile", "digits_mlp"]
CRITERIA = ["l1", "l1-calib", "obspa-free", "obspa-calib"]
LABELS = {"tp-global": "Torch-Pruning global L1 (PyTorch), MACs matched to l1 allocated",
          "l1": "l1 (sensitivity on 8 synthetic samples)", "l1-calib": "l1 (sensitivity on 8 calibration samples)",
          "obspa-free": "OBSPA data-free", "obspa-calib": "OBSPA calibrated (sensitivity on 8 of its samples)"}
TARGETS = [0.8, 0.65, 0.5, 0.35]
ROUND_TO = 1


def macs_share(rep) -> float:
    return rep["after"]["macs"] / rep["before"]["macs"]


def uniform_ratio(path: str, target: float) -> float:
    """The ratio whose l1 pruning (MACs depend on the counts only) comes closest to the target."""
    import spa
    lo, hi, best = 0.0, 0.95, (9.0, 0.0)
    for _ in range(12):
        mid = (lo + hi) / 2
        share = macs_share(spa.prune(path, ratio=mid, round_to=ROUND_TO, verify=False).report)
        best = min(best, (abs(share - target), mid))
        lo, hi = (mid, hi) if share > target else (lo, mid)
    return best[1]


def cell(bench: Bench, criterion: str, target: float, how: str, ratio: float | None) -> dict:
    import spa
    kw = dict(criterion="l1", calib=bench.calib) if criterion == "l1-calib" else spa_kwargs(criterion, bench.calib)
    budget = {"ratio": ratio} if how == "uniform" else {"macs": target, "allocation": "measured"}
    t0 = time.time()
    res = spa.prune(str(bench.path), round_to=ROUND_TO, verify=False, **budget, **kw)
    seconds = time.time() - t0
    rep = res.report
    return {"model": bench.name, "criterion": criterion, "target": target, "how": how, "ratio": ratio,
            "macs": macs_share(rep), "accuracy": bench.evaluate(res.model), "prune_s": round(seconds, 2),
            "runs": rep.get("budget", {}).get("runs"), "spa_rev": git_rev(),
            "kept": [g["kept"] for g in rep["groups"]], "channels": [g["channels"] for g in rep["groups"]]}


def tp_global(bench: Bench, target: float) -> dict:
    """Torch-Pruning's global L1 pruning (MetaPruner, global_pruning=True) in PyTorch, its
    ratio bisected so the exported model's MACs come closest to ``target``."""
    import tempfile

    import onnx
    import torch_pruning as tp

    import fashion_cnns as fc
    short = TORCH_MODELS[bench.name]
    original = macs_of(onnx.load(str(bench.path)))
    x = __import__("torch").from_numpy(bench.calib_labelled[fc.INPUT][:2])

    def pruned_at(ratio):
        model = fc.load_trained(short)
        final = model.fc if short == "resnet" else model[-1]
        tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=1), pruning_ratio=ratio,
                             global_pruning=True, ignored_layers=[final]).step()
        model.eval()
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / "tp.onnx"
            fc.export(model, path)
            return onnx.load(str(path))
    lo, hi, best = 0.0, 0.9, None
    for _ in range(8):
        mid = (lo + hi) / 2
        m = pruned_at(mid)
        share = macs_of(m) / original
        if best is None or abs(share - target) < abs(best[0] - target):
            best = (share, m, mid)
        lo, hi = (mid, hi) if share > target else (lo, mid)
    share, m, ratio = best
    return {"model": bench.name, "criterion": "tp-global", "target": target, "how": "global", "ratio": ratio,
            "macs": share, "accuracy": bench.evaluate(m), "torch_pruning": tp.__version__, "spa_rev": git_rev()}


def load() -> list[dict]:
    return [json.loads(line) for line in RESULTS.read_text().splitlines() if line.strip()] if RESULTS.exists() else []


def render(rows: list[dict]) -> str:
    latest = {}
    for r in rows:
        latest[(r["model"], r["criterion"], r["target"], r["how"])] = r
    lines = ["## Where to cut: uniform ratio vs allocated budget at equal MACs", "",
             "Plots: `benchmarks/plots/allocation_<model>.png`.", "",
             "Generated by `benchmarks/allocation.py` (raw rows: `benchmarks/results/allocation.jsonl`). "
             f"No fine-tuning; `round_to={ROUND_TO}` for both; allocated = `spa.prune(macs=target, allocation='measured')` (so 3 steps, its default); uniform = one "
             "ratio for every group, found by bisection so its MACs come closest to what the allocated model kept. Cells: "
             "accuracy (MACs share kept); bold: the better of the pair.", "",
             f"- spa revision(s): {', '.join(sorted({'`' + r['spa_rev'] + '`' for r in latest.values()}))}", ""]
    for model in MODELS:
        have = [r for r in latest.values() if r["model"] == model]
        if not have:
            continue
        targets = sorted({r["target"] for r in have}, reverse=True)
        lines += [f"### {model}", "", "| criterion | " + " | ".join(f"MACs {t}" for t in targets) + " |",
                  "|---|" + "---|" * len(targets)]
        tp_cells = [latest.get((model, "tp-global", t, "global")) for t in targets]
        if any(tp_cells):
            lines.append(f"| {LABELS['tp-global']} | " + " | ".join(
                f"{r['accuracy']:.4f} ({r['macs']:.2f})" if r else "-" for r in tp_cells) + " |")
        for crit in CRITERIA:
            for how in ("uniform", "allocated"):
                cells = []
                for t in targets:
                    r = latest.get((model, crit, t, how))
                    other = latest.get((model, crit, t, "uniform" if how == "allocated" else "allocated"))
                    text = f"{r['accuracy']:.4f} ({r['macs']:.2f})" if r else "-"
                    cells.append(f"**{text}**" if r and other and r["accuracy"] > other["accuracy"] else text)
                if any(c != "-" for c in cells):
                    lines.append(f"| {LABELS[crit]}, {how} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--criteria", nargs="*", default=CRITERIA)
    p.add_argument("--targets", nargs="*", type=float, default=TARGETS)
    p.add_argument("--render", action="store_true", help="only redraw the table from the results")
    p.add_argument("--torch-pruning", action="store_true",
                   help="only add Torch-Pruning's global L1 at the MACs each l1 allocated cell kept")
    args = p.parse_args()
    if args.torch_pruning:
        for r in [r for r in load() if r["criterion"] == "l1" and r["how"] == "allocated"
                  and r["model"] in TORCH_MODELS and r["model"] in args.models]:
            row = tp_global(Bench(r["model"], HERE / "results" / "cache"), r["macs"])
            row["target"] = r["target"]
            print(json.dumps({k: v for k, v in row.items()}), flush=True)
            with RESULTS.open("a") as f:
                f.write(json.dumps(row) + "\n")
    elif not args.render:
        RESULTS.parent.mkdir(exist_ok=True)
        for name in args.models:
            bench = Bench(name, HERE / "results" / "cache")
            ratios = {}
            for target in args.targets:
                for crit in args.criteria:
                    allocated = cell(bench, crit, target, "allocated", None)
                    matched = round(allocated["macs"], 4)
                    if matched not in ratios:
                        ratios[matched] = uniform_ratio(str(bench.path), allocated["macs"])
                    for row in (allocated, cell(bench, crit, target, "uniform", ratios[matched])):
                        print(json.dumps({k: v for k, v in row.items() if k not in ("kept", "channels")}), flush=True)
                        with RESULTS.open("a") as f:
                            f.write(json.dumps(row) + "\n")
    rows = load()
    text = render(rows)
    print(text)
    update_readme_section(text)
    plot(rows)


def plot(rows: list[dict]):
    """plots/allocation_<model>.png: accuracy against MACs kept, uniform dashed, allocated solid."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    latest = {}
    for r in rows:
        latest[(r["model"], r["criterion"], r["target"], r["how"])] = r
    (HERE / "plots").mkdir(exist_ok=True)
    for model in MODELS:
        fig, ax = plt.subplots(figsize=(7, 4.5))
        drawn = False
        for i, crit in enumerate(CRITERIA):
            for how, style in (("uniform", "--"), ("allocated", "-")):
                pts = sorted((r["macs"], r["accuracy"]) for k, r in latest.items()
                             if k[0] == model and k[1] == crit and k[3] == how)
                if pts:
                    ax.plot(*zip(*pts), style, marker="o", color=f"C{i}", label=f"{LABELS[crit]}, {how}")
                    drawn = True
        if drawn:
            ax.set_xlabel("MACs kept (share of the original)")
            ax.set_ylabel("top-1 accuracy, no fine-tuning")
            ax.set_title(f"{model}: uniform ratio vs allocated budget")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            fig.savefig(HERE / "plots" / f"allocation_{model}.png", dpi=110)
        plt.close(fig)


if __name__ == "__main__":
    main()
