#!/usr/bin/env python
"""Compare two runs of a benchmark by what was pruned, not by how fast.

    python benchmarks/compare_sweep.py BEFORE.jsonl AFTER.jsonl     # torchvision_sweep.jsonl
    python benchmarks/compare_sweep.py BEFORE.json AFTER.json       # transformers_bench.json (structures)
    PYTHONPATH=/path/to/spa python benchmarks/compare_sweep.py --measure OUT.jsonl resnet18:legacy ...

For each entry (torchvision: model x exporter; transformers: family x exporter x structure)
re-run in AFTER (its ``time`` differs from BEFORE's; ``--all`` compares every common entry),
print which fields differ, in two kinds:

- pruning: status, error, oracle result, groups found / pruned, removed channels, params and
  MACs before/after and their ratios (and, where ``--measure`` recorded them, digests of every
  group's removed channel indices and of the pruned model's weights);
- report: blocked-group and blocked-node counts, their reasons (node and tensor names taken
  out), the op type recorded for each blocked group, the transformer table's reason cell.

Timing, latency and memory fields are ignored.  Exit status 1 if any entry differs.
Baselines: ``git show HEAD:benchmarks/results/<file> > /tmp/before``.

``--measure`` runs ``spa.prune(path, ratio=0.5, criterion="l1", verify=True)`` (the sweep's
settings, without its CLI and latency steps) on cached sweep exports
(``<cache>/<model>-<exporter>.onnx``) with whichever spa is on PYTHONPATH and writes
sweep-format lines with the extra fields above: run it with two spa checkouts, then compare
the two files with ``--all``.
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import re
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REL_TOL = 1e-9
# compared only where both sides recorded them (older sweep entries lack some)
OPTIONAL = {"removed channels", "plan digest", "weights digest", "blocked group ops"}
REPORT = {"blocked groups", "blocked nodes", "blocked group reasons", "blocked node reasons",
          "blocked group ops", "reason"}


def _strip_names(reason: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"'[^']*'", "'…'", reason)).strip()


def _is_io(reason: str) -> bool:
    return reason.startswith(("graph input", "graph output"))


def _reasons(items: list[dict]) -> dict:
    return dict(collections.Counter(
        (f"{b['channels']}ch " if "channels" in b else "") + _strip_names(b["reason"]) for b in items))


def _ops(blocked: list[dict]):
    """{op: count} of the op types recorded for blocked groups other than the graph
    input/output ("None" where the report typed no op); None if no op was recorded."""
    items = [b for b in blocked if not _is_io(b["reason"])]
    if not all("op" in b for b in items):
        return None
    return dict(collections.Counter(str(b["op"]) for b in items))


def _same(a, b) -> bool:
    if isinstance(a, float) or isinstance(b, float):
        if a is None or b is None:
            return a is b
        return abs(a - b) <= REL_TOL * max(abs(a), abs(b), 1e-30)
    return a == b


# ---------------------------------------------------------------------------
# torchvision sweep (.jsonl, last line per (model, exporter) wins)
# ---------------------------------------------------------------------------
def load_sweep(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip():
            e = json.loads(line)
            out[(e["model"], e["exporter"])] = e
    return out


def sweep_fields(e: dict) -> dict:
    m = e.get("measure") or {}
    v = m.get("verify") or {}
    return {
        "status": e.get("status"),
        "error": e.get("error"),
        "oracle ok": v.get("ok"),
        "groups": m.get("n_groups"),
        "pruned groups": m.get("n_pruned_groups"),
        "removed channels": m.get("removed_channels"),
        "plan digest": m.get("plan_digest"),
        "weights digest": m.get("weights_digest"),
        "params before": (m.get("before") or {}).get("params"),
        "MACs before": (m.get("before") or {}).get("macs"),
        "params after": (m.get("after") or {}).get("params"),
        "MACs after": (m.get("after") or {}).get("macs"),
        "MACs ratio": e.get("macs_ratio"),
        "params ratio": e.get("params_ratio"),
        "blocked groups": len(m.get("blocked", [])) if "blocked" in m else None,
        "blocked nodes": len(m.get("blocked_nodes", [])) if "blocked_nodes" in m else None,
        "blocked group reasons": _reasons(m.get("blocked", [])),
        "blocked node reasons": _reasons(m.get("blocked_nodes", [])),
        "blocked group ops": _ops(m.get("blocked", [])),
    }


def measure(out: Path, items: list[str], cache: str) -> int:
    """Pruning-only sweep entries with the spa on PYTHONPATH (see the module docstring)."""
    import onnx.numpy_helper as nh
    import spa
    sys.path.insert(0, str(HERE))
    from _common import blocking_op
    from torchvision_sweep import CRITERION, RATIO, _blocking

    with out.open("a") as f:
        for item in items:
            model, exporter = item.split(":")
            e = {"model": model, "exporter": exporter, "spa": spa.__file__, "time": f"measure {out.name}"}
            t0 = time.perf_counter()
            m: dict = {}
            try:
                r = spa.prune(f"{cache}/{model}-{exporter}.onnx", ratio=RATIO, criterion=CRITERION, verify=True)
                rep = r.report
                m["verify"] = rep.get("verify")
                m["before"] = {k: rep["before"].get(k) for k in ("params", "macs")}
                m["after"] = {k: rep["after"].get(k) for k in ("params", "macs")}
                m["n_groups"] = len(rep["groups"])
                m["n_pruned_groups"] = sum(1 for g in rep["groups"] if g["removed"])
                m["removed_channels"] = sum(g["removed"] for g in rep["groups"])
                m["plan_digest"] = hashlib.sha1(json.dumps(sorted(
                    [g["kind"], g["channels"], sorted(g["members"]), list(g["removed_channels"])]
                    for g in rep["groups"])).encode()).hexdigest()[:12]
                weights = sorted((list(t.dims), hashlib.sha1(nh.to_array(t).tobytes()).hexdigest())
                                 for t in r.model.graph.initializer if len(t.dims) >= 2)
                m["weights_digest"] = hashlib.sha1(json.dumps(weights).encode()).hexdigest()[:12]
                m["blocked"] = [{"channels": b["channels"], "reason": b["reason"], "op": blocking_op(b)}
                                for b in rep["blocked"]]
                m["blocked_nodes"] = [{"op": b["op"], "reason": b["reason"]} for b in rep["blocked_nodes"]]
                e["macs_ratio"] = m["after"]["macs"] / m["before"]["macs"]
                e["params_ratio"] = m["after"]["params"] / m["before"]["params"]
                e["status"] = "partial" if _blocking(m) else "ok"
            except Exception as ex:  # noqa: BLE001 - record, go on
                e.update(status="failed", error=f"{type(ex).__name__}: {str(ex).strip()[:300]}")
            e["measure"], e["seconds"] = m, round(time.perf_counter() - t0, 1)
            f.write(json.dumps(e) + "\n")
            f.flush()
            print(model, exporter, e["status"], f"{e['seconds']} s", flush=True)
    return 0


# ---------------------------------------------------------------------------
# transformers benchmark (.json, structures section)
# ---------------------------------------------------------------------------
def load_structures(path: Path) -> dict:
    sec = json.loads(path.read_text()).get("structures", {})
    rows = {(r["family"], r["exporter"], r["structure"]): r for r in sec.get("rows", [])}
    t = (sec.get("meta") or {}).get("time")
    for r in rows.values():  # rows carry no time of their own: the section's
        r.setdefault("time", t)
    return rows


def structure_fields(r: dict) -> dict:
    v = r.get("verify") or {}
    return {
        "status": r.get("status"),
        "error": r.get("error"),
        "oracle": v.get("ok", "exact=False" if v.get("exact") is False else v.get("skipped")),
        "groups": r.get("groups"),
        "pruned groups": r.get("pruned_groups"),
        "channels": r.get("channels"),
        "removed": r.get("removed"),
        "MACs ratio": r.get("macs_ratio"),
        "params ratio": r.get("params_ratio"),
        "zero output": r.get("zero_output", False),
        "blocked groups": r.get("blocked_groups"),
        "blocked nodes": r.get("blocked_nodes"),
        "reason": _strip_names(r["reason"]) if r.get("reason") else None,
    }


# ---------------------------------------------------------------------------
def _short(v) -> str:
    if isinstance(v, float):
        return f"{v:.4f}"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{k} x{n}" for k, n in sorted(v.items())) + "}"
    return str(v)


def compare(before: dict, after: dict, fields, all_entries: bool) -> int:
    keys = [k for k in after if k in before and (all_entries or after[k].get("time") != before[k].get("time"))]
    only_after = [k for k in after if k not in before]
    n_prune = n_report = 0
    width = max([len(" / ".join(k)) for k in keys + only_after] + [5])
    print(f"{'entry':<{width}}  result")
    print(f"{'-' * width}  ------")
    for k in keys:
        fb, fa = fields(before[k]), fields(after[k])
        diff = [f for f in fa if not _same(fb.get(f), fa.get(f))
                and not (f in OPTIONAL and (fb.get(f) is None or fa.get(f) is None))]
        label = " / ".join(k)
        if not diff:
            print(f"{label:<{width}}  same ({fa['status']}, {fa['groups']} groups, "
                  f"MACs {_short(fa['MACs ratio'])}, params {_short(fa['params ratio'])})")
            continue
        pruning = [f for f in diff if f not in REPORT]
        if pruning:
            n_prune += 1
            print(f"{label:<{width}}  PRUNING DIFFERS: " + ", ".join(diff))
        else:
            n_report += 1
            print(f"{label:<{width}}  same pruning; report differs: " + ", ".join(diff))
        for f in diff:
            print(f"{'':<{width}}    {f}: {_short(fb.get(f))} -> {_short(fa.get(f))}")
    for k in only_after:
        print(f"{' / '.join(k):<{width}}  new entry (not in before)")
    same = len(keys) - n_prune - n_report
    print(f"\n{len(keys)} entries compared: {same} identical, {n_prune} differ in pruning, "
          f"{n_report} differ only in what the report says blocked"
          + (f"; {len(only_after)} new" if only_after else ""))
    return 1 if n_prune or n_report else 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("before", type=Path, nargs="?")
    p.add_argument("after", type=Path, nargs="?")
    p.add_argument("--all", action="store_true", help="compare every common entry, not only the re-run ones")
    p.add_argument("--measure", type=Path, metavar="OUT.jsonl",
                   help="append pruning-only entries for the model:exporter items given after it")
    p.add_argument("--cache", default="/tmp/zoo", help="cached sweep exports for --measure")
    args, rest = p.parse_known_args(argv)
    if args.measure:
        items = [x for x in [args.before, args.after] if x] + rest
        return measure(args.measure, [str(x) for x in items], args.cache)
    if rest or not (args.before and args.after):
        p.error("give BEFORE and AFTER")
    if args.after.suffix == ".jsonl":
        return compare(load_sweep(args.before), load_sweep(args.after), sweep_fields, args.all)
    return compare(load_structures(args.before), load_structures(args.after), structure_fields, args.all)


if __name__ == "__main__":
    sys.exit(main())
