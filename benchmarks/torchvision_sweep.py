#!/usr/bin/env python
"""Prune every torchvision classification model (< 100M params) with both exporters.

For each (model, exporter), sequentially, each step in its own child process
(so a crash or hang costs one entry, not the sweep):

1. export   ``torchvision_zoo.export(name, exporter, cache)`` (cached files are reused);
2. cli      ``/usr/bin/time -f "%M %e" spa prune in.onnx -o out.onnx --ratio 0.5
            --criterion l1 --no-verify -q``: wall time (measured in the parent) and peak
            RSS of the child, compared with the ONNX file size;
3. measure  ``spa.prune(path, ratio=0.5, criterion="l1", verify=True)`` in-process:
            oracle result, MACs/params ratios, what blocked pruning; then
            ``spa.verify.bench.latency([original, pruned], threads=1)`` (interleaved, median).

One JSON line per (model, exporter) is appended to
``benchmarks/results/torchvision_sweep.jsonl`` as soon as it is done; entries already
there are skipped unless ``--force``.  ``--render`` writes the table and summary into
``benchmarks/README.md`` (between the torchvision_sweep markers); a full sweep renders
at the end too.

    nohup python benchmarks/torchvision_sweep.py > /tmp/torchvision_sweep.log 2>&1 &
    python benchmarks/torchvision_sweep.py --models resnet18,resnet50 --exporters legacy
    python benchmarks/torchvision_sweep.py --render
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _common import blocking_op, interleaved_latency  # noqa: E402
REPO = HERE.parent
RESULTS = HERE / "results" / "torchvision_sweep.jsonl"
META = HERE / "results" / "torchvision_sweep.meta.json"
README = HERE / "README.md"
START, END = "<!-- torchvision_sweep:start -->", "<!-- torchvision_sweep:end -->"

RATIO, CRITERION = 0.5, "l1"
EXPORT_TIMEOUT = 2400
CLI_TIMEOUT = 1200
MEASURE_TIMEOUT = 2400
LATENCY_BUDGET_S = 40.0  # target time for the interleaved latency loop of one model pair

# One thread everywhere: 2-core machine shared with other work; ORT sessions use 1 thread.
CHILD_ENV = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
             "OPENBLAS_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _first_line(text: str, limit: int = 240) -> str:
    for line in str(text).strip().splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[: limit - 3] + "..."
    return ""


def _last_error_line(stderr: str) -> str:
    """The most informative line of a child's stderr: the last exception/error line."""
    lines = [l.strip() for l in stderr.strip().splitlines() if l.strip()]
    for line in reversed(lines):
        if re.match(r"^(spa: |[\w.]*(Error|Exception|Killed)\b)", line):
            return _first_line(line)
    return _first_line(lines[-1]) if lines else ""


def _run(cmd: list[str], timeout: float) -> tuple[int | None, str, str, float]:
    """Run cmd in its own session; kill that process group on timeout.
    Returns (returncode or None on timeout, stdout, stderr, wall seconds)."""
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         env=CHILD_ENV, start_new_session=True)
    try:
        out, err = p.communicate(timeout=timeout)
        return p.returncode, out, err, time.perf_counter() - t0
    except subprocess.TimeoutExpired:
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        return None, out, err, time.perf_counter() - t0


def _git_rev() -> str:
    try:
        return subprocess.run(["git", "-C", str(REPO), "describe", "--always", "--dirty"],
                              capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return "?"


def _zoo():
    sys.path.insert(0, str(REPO / "models"))
    import torchvision_zoo as z
    return z


def _short_reason(reason: str, op: str | None = None) -> str:
    """Drop node/tensor names and the parenthesised explanation: the reason's kind."""
    r = reason
    if op:
        r = re.sub(r"\bnode '", f"{op} '", r, count=1)
    r = re.sub(r"'[^']*'", "", r)
    r = re.sub(r"\([^)]*\)", "", r)
    return re.sub(r"\s+", " ", r).strip(" :,;")


def _is_io(reason: str) -> bool:
    return reason.startswith("graph input") or reason.startswith("graph output")


def _blocking(m: dict) -> list[dict]:
    """What blocked pruning, other than the graph input/output: [{reason, kind, count}]."""
    reasons = collections.Counter()
    for bl in m.get("blocked", []):
        if not _is_io(bl["reason"]):
            reasons[(_short_reason(bl["reason"], bl.get("op")), "group")] += 1
    for bn in m.get("blocked_nodes", []):
        if not _is_io(bn["reason"]):
            reasons[(_short_reason(bn["reason"], bn.get("op")), "node")] += 1
    return [{"reason": r, "kind": k, "count": c} for (r, k), c in reasons.most_common()]


# ---------------------------------------------------------------------------
# Child steps
# ---------------------------------------------------------------------------
def worker_export(name: str, exporter: str, cache: str, out_json: str) -> int:
    res: dict = {}
    try:
        import torch
        torch.set_num_threads(1)
        z = _zoo()
        t0 = time.perf_counter()
        path = z.export(name, exporter, cache)
        res = {"path": str(path), "seconds": time.perf_counter() - t0}
    except BaseException as e:  # noqa: BLE001 - report anything
        res = {"error": f"{type(e).__name__}: {_first_line(str(e))}"}
    Path(out_json).write_text(json.dumps(res))
    return 0


def worker_measure(path: str, out_json: str) -> int:
    res: dict = {}

    def dump():
        Path(out_json).write_text(json.dumps(res))

    import numpy as np  # noqa: F401
    import spa
    import spa.verify.bench
    import spa.runtime as R

    # The oracle uses ORT's default thread count; keep it to one thread here (politeness
    # on a shared 2-core machine; results do not depend on it).
    R.THREADS = 1

    t0 = time.perf_counter()
    try:
        result = spa.prune(path, ratio=RATIO, criterion=CRITERION, verify=True)
        res["prune_verify_s"] = time.perf_counter() - t0
    except BaseException as e:  # noqa: BLE001
        res["error"] = f"{type(e).__name__}: {_first_line(str(e))}"
        res["error_stage"] = "verify" if type(e).__name__ == "VerificationError" else "prune"
        res["traceback_tail"] = [l for l in traceback.format_exc().strip().splitlines()[-4:]]
        dump()
        # still get the numbers without the oracle, if pruning itself works
        try:
            result = spa.prune(path, ratio=RATIO, criterion=CRITERION, verify=False)
        except BaseException:  # noqa: BLE001
            return 0
        res["verify"] = None
    rep = result.report
    if "verify" not in res:
        res["verify"] = rep.get("verify")
    res["before"] = {k: rep["before"].get(k) for k in ("params", "macs", "file_bytes")}
    res["after"] = {k: rep["after"].get(k) for k in ("params", "macs")}
    res["input_shapes"] = rep["input_shapes"]
    res["n_groups"] = len(rep["groups"])
    res["n_pruned_groups"] = sum(1 for g in rep["groups"] if g["removed"])
    res["blocked"] = [{"channels": b["channels"], "reason": b["reason"], "op": blocking_op(b)}
                      for b in rep["blocked"]]
    res["blocked_nodes"] = [{"op": b["op"], "reason": b["reason"]} for b in rep["blocked_nodes"]]
    dump()

    # latency: probe one run of the original, then size the interleaved loop
    res["latency"] = interleaved_latency(result.original, result.model, rep["input_shapes"], LATENCY_BUDGET_S,
                                         10, 500, probe_factor=1.7)
    dump()
    return 0


# ---------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------
def _load_results(path: Path = RESULTS) -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            line = line.strip()
            if not line:
                continue
            try:
                e = json.loads(line)
            except ValueError:
                continue
            out[(e["model"], e["exporter"])] = e  # last one wins (--force re-runs)
    return out


def _child(step: str, *args: str) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), "--_child", step, *args]


def run_one(name: str, exporter: str, cache: str, n_params: int) -> dict:
    entry: dict = {"model": name, "exporter": exporter, "torchvision_params": n_params,
                   "spa_rev": _git_rev(), "time": datetime.datetime.now().isoformat(timespec="seconds"),
                   "loadavg_start": round(os.getloadavg()[0], 2)}
    tmp = Path(tempfile.mkdtemp(prefix="tv_sweep."))
    try:
        # 1. export
        rc, out, err, wall = _run(_child("export", name, exporter, cache, str(tmp / "export.json")),
                                  EXPORT_TIMEOUT)
        exp = json.loads((tmp / "export.json").read_text()) if (tmp / "export.json").exists() else {}
        if rc is None or "path" not in exp:
            why = (f"timeout after {EXPORT_TIMEOUT} s" if rc is None else
                   exp.get("error") or f"exit {rc}: {_last_error_line(err)}")
            entry.update(status="failed", stage="export", error=f"export failed: {why}")
            return entry
        path = exp["path"]
        entry["export_s"] = round(exp["seconds"], 2)
        entry["file_bytes"] = os.path.getsize(path)

        # 2. CLI prune, --no-verify: wall time and peak memory
        spa_exe = shutil.which("spa") or "spa"
        cmd = ["/usr/bin/time", "-f", "%M %e", "-o", str(tmp / "time.txt"), spa_exe, "prune", path,
               "-o", str(tmp / "pruned.onnx"), "--ratio", str(RATIO), "--criterion", CRITERION,
               "--no-verify", "-q"]
        rc, out, err, wall = _run(cmd, CLI_TIMEOUT)
        cli = {"wall_s": round(wall, 3), "rc": rc}
        try:
            kb, _el = (tmp / "time.txt").read_text().strip().splitlines()[-1].split()
            cli["maxrss_bytes"] = int(kb) * 1024
        except Exception:
            pass
        if rc != 0:
            cli["error"] = f"timeout after {CLI_TIMEOUT} s" if rc is None else _last_error_line(err)
        entry["cli"] = cli

        # 3. in-process prune + oracle + latency
        rc, out, err, wall = _run(_child("measure", path, str(tmp / "measure.json")), MEASURE_TIMEOUT)
        m = json.loads((tmp / "measure.json").read_text()) if (tmp / "measure.json").exists() else {}
        entry["measure_wall_s"] = round(wall, 1)
        if rc != 0 and "error" not in m:
            m["error"] = (f"timeout after {MEASURE_TIMEOUT} s" if rc is None else
                          f"child died (exit {rc}): {_last_error_line(err)}")
            m.setdefault("error_stage", "latency" if "before" in m else "prune")
        entry["measure"] = m
        b, a = m.get("before"), m.get("after")
        if b and a:
            entry["macs_ratio"] = a["macs"] / b["macs"] if b["macs"] else None
            entry["params_ratio"] = a["params"] / b["params"] if b["params"] else None
        lat = m.get("latency") or {}
        if "ratio" in lat:
            entry["latency_ratio"] = lat["ratio"]

        # status
        entry["blocking"] = reasons = _blocking(m)
        if "error" in m and m.get("error_stage") != "latency":
            entry.update(status="failed", stage=m.get("error_stage", "prune"), error=m["error"])
        elif rc != 0 and "before" not in m:
            entry.update(status="failed", stage="prune", error=m.get("error", "?"))
        elif cli.get("error"):
            entry.update(status="failed", stage="cli", error=f"spa prune CLI: {cli['error']}")
        elif reasons:
            entry["status"] = "partial"
        else:
            entry["status"] = "ok"
        if "error" in lat:
            entry["latency_error"] = lat["error"]
        elif m.get("error_stage") == "latency":
            entry["latency_error"] = m["error"]
        entry["loadavg_end"] = round(os.getloadavg()[0], 2)
        return entry
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _machine() -> dict:
    cpu = "?"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"nproc": os.cpu_count(), "cpu": cpu, "python": platform.python_version()}
    for mod in ("onnxruntime", "onnx", "torch", "torchvision"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:
            pass
    try:
        mem_kb = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal"))
        info["mem_gb"] = round(mem_kb / 2**20, 1)
    except Exception:
        pass
    return info


def sweep(args) -> int:
    z = _zoo()
    counts = z.param_counts()
    names = z.classification_models(args.max_params)
    names.sort(key=lambda n: counts[n])  # small models first
    if args.models:
        wanted = [m.strip() for m in args.models.split(",") if m.strip()]
        unknown = [m for m in wanted if m not in counts]
        if unknown:
            print(f"unknown models: {unknown}", file=sys.stderr)
            return 2
        names = [n for n in names if n in wanted] + [n for n in wanted if n not in names]
    exporters = [e.strip() for e in args.exporters.split(",") if e.strip()]
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    full = not args.models and set(exporters) == {"legacy", "dynamo"}
    meta = {"command": "python benchmarks/torchvision_sweep.py " + " ".join(shlex.quote(a) for a in sys.argv[1:]),
            "started": datetime.datetime.now().isoformat(timespec="seconds"), "machine": _machine(),
            "spa_rev": _git_rev(), "full_sweep": full}
    if full or not META.exists():
        META.write_text(json.dumps(meta, indent=1))
    else:  # a subset re-run: remember its command next to the full sweep's
        old = json.loads(META.read_text())
        old.setdefault("followup_commands", []).append(meta["command"])
        META.write_text(json.dumps(old, indent=1))
    done = _load_results()
    todo = [(n, e) for n in names for e in exporters if args.force or (n, e) not in done]
    print(f"{len(names)} models x {len(exporters)} exporters; {len(todo)} to run", flush=True)
    for i, (name, exporter) in enumerate(todo, 1):
        t0 = time.perf_counter()
        print(f"[{i}/{len(todo)}] {name} {exporter} ...", end=" ", flush=True)
        try:
            entry = run_one(name, exporter, args.cache, counts.get(name, 0))
        except Exception as e:  # a bug of this script: record, keep going
            entry = {"model": name, "exporter": exporter, "status": "failed", "stage": "sweep",
                     "error": f"sweep script: {type(e).__name__}: {_first_line(str(e))}"}
        entry["total_s"] = round(time.perf_counter() - t0, 1)
        with open(RESULTS, "a") as f:
            f.write(json.dumps(entry) + "\n")
        msg = entry["status"]
        if entry.get("error"):
            msg += f" ({entry['error']})"
        elif entry["status"] == "partial":
            msg += " (" + "; ".join(f"{b['reason']} x{b['count']}" for b in entry["blocking"][:2]) + ")"
        extra = []
        for k in ("macs_ratio", "latency_ratio"):
            if entry.get(k) is not None:
                extra.append(f"{k}={entry[k]:.3f}")
        if entry.get("cli", {}).get("wall_s") is not None:
            extra.append(f"cli={entry['cli']['wall_s']:.1f}s")
        print(msg, " ".join(extra), f"[{entry['total_s']:.0f} s]", flush=True)
    if full or args.render_after:
        render()
    return 0


# ---------------------------------------------------------------------------
# Render
# ---------------------------------------------------------------------------
def _fmt(v, spec=".3f", none="–"):
    return none if v is None else format(v, spec)


def _notes(e: dict) -> str:
    if e.get("status") == "failed":
        return e.get("error", "").replace("|", "\\|")
    parts = []
    if e.get("status") == "partial":
        by = collections.Counter()
        for b in (_blocking(e["measure"]) if e.get("measure") else e.get("blocking", [])):
            by[(b["reason"], b["kind"])] += b["count"]
        parts.append("; ".join(f"{r} ({c} {k}{'s' if c != 1 else ''})" for (r, k), c in by.most_common(3)))
    if e.get("latency_error"):
        parts.append(f"latency: {e['latency_error']}")
    if e.get("cli", {}).get("error"):
        parts.append(f"CLI: {e['cli']['error']}")
    return " / ".join(p for p in parts if p).replace("|", "\\|")


def render_markdown(results: dict, meta: dict) -> str:
    z = _zoo()
    counts = z.param_counts()
    expected = z.classification_models(100_000_000)
    entries = sorted(results.values(), key=lambda e: (counts.get(e["model"], 0), e["model"], e["exporter"] != "legacy"))
    n = len(entries)
    models = sorted({e["model"] for e in entries})
    st = collections.Counter(e.get("status") for e in entries)
    export_failed = sum(1 for e in entries if e.get("status") == "failed" and e.get("stage") == "export")
    spa_failed = st["failed"] - export_failed
    pruned = [e for e in entries if e.get("macs_ratio") is not None]
    lose40 = [e for e in pruned if e["macs_ratio"] <= 0.6]
    timed = [e for e in entries if e.get("latency_ratio") is not None]
    slower = [e for e in timed if e["latency_ratio"] > 1.0]
    slow_cli = [e for e in entries if (e.get("cli") or {}).get("wall_s", 0) > 5]

    m = meta.get("machine", {})
    L = []
    L.append("## torchvision sweep\n")
    L.append(f"Every torchvision classification model under 100M parameters ({len(expected)} models), "
             f"exported with the legacy (opset 17) and dynamo (opset 18) exporters at 224×224 "
             f"(inception_v3: 299), random init; pruned with `--ratio {RATIO} --criterion {CRITERION}`, "
             "default options. Generated by `benchmarks/torchvision_sweep.py`.\n")
    L.append(f"- command: `{meta.get('command', 'python benchmarks/torchvision_sweep.py').strip()}`"
             + "".join(f", then `{c}`" for c in meta.get("followup_commands", []))
             + ", then `python benchmarks/torchvision_sweep.py --render`")
    L.append(f"- machine: {m.get('nproc', '?')} cores, {m.get('cpu', '?')}, {m.get('mem_gb', '?')} GB RAM; "
             f"python {m.get('python', '?')}, onnxruntime {m.get('onnxruntime', '?')}, onnx {m.get('onnx', '?')}, "
             f"torch {m.get('torch', '?')}, torchvision {m.get('torchvision', '?')}")
    by_time = sorted(entries, key=lambda e: e.get("time", ""))
    revs = {e.get("spa_rev", "?") for e in entries}
    if len(revs) == 1:
        L.append(f"- spa revision: `{revs.pop()}`; started {meta.get('started', '?')}")
    elif by_time:
        L.append(f"- spa revisions: {len(revs)} distinct (spa was being developed during the sweep; each entry "
                 f"records its `spa_rev`): first `{by_time[0].get('spa_rev', '?')}` "
                 f"({by_time[0].get('time', '?')}), last `{by_time[-1].get('spa_rev', '?')}` "
                 f"({by_time[-1].get('time', '?')})")
    L.append("- status: **ok** = pruned, oracle passes, nothing blocked except the graph input/output; "
             "**partial** = pruned and oracle passes, but some groups/nodes are blocked by something else; "
             "**failed** = export failure, spa crash, invalid model or oracle failure.")
    L.append("- latency: onnxruntime CPU, 1 intra-op thread, original and pruned sessions interleaved in one "
             "process (`spa.verify.bench.latency`), median of 10–500 runs (about 40 s of measurement per pair); ratio = pruned / original.")
    L.append("- `spa prune` wall / peak RSS: the CLI as a child process with `--no-verify -q` "
             "(wall measured by the parent, includes interpreter start-up and imports; "
             "peak RSS from `/usr/bin/time -f %M`).")
    L.append("- the machine was shared with other jobs during the sweep (load average recorded per entry), "
             "so absolute times are noisy; latency *ratios* are less affected thanks to interleaving.\n")

    L.append("### Summary\n")
    L.append(f"- runs: {n} ({len(models)} models × exporters; expected {len(expected)} × 2 = {2 * len(expected)})")
    L.append(f"- ok **{st['ok']}**, partial **{st['partial']}**, failed **{st['failed']}** "
             f"(export failed {export_failed}, spa failed {spa_failed})")
    if n:
        L.append(f"- runs losing ≥ 40% of MACs (MACs ratio ≤ 0.60): {len(lose40)}/{n} "
                 f"({100 * len(lose40) / n:.0f}% of all runs; {len(lose40)}/{len(pruned)} of the pruned ones)")
    L.append(f"- pruned slower than original (latency ratio > 1.0): {len(slower)}/{len(timed)}"
             + (": " + ", ".join(f"{e['model']}/{e['exporter']} ({e['latency_ratio']:.2f})" for e in slower)
                if slower else ""))
    for exporter in ("legacy", "dynamo"):
        r = results.get(("resnet50", exporter))
        if not r:
            continue
        line = f"- ResNet-50 ({exporter}): "
        if r.get("latency_ratio") is not None and r.get("macs_ratio"):
            lr, mr = r["latency_ratio"], r["macs_ratio"]
            ok = "✅" if lr <= 1.25 * mr else "❌"
            line += (f"latency ratio {lr:.3f} vs MACs ratio {mr:.3f} → {lr / mr:.2f}× "
                     f"(target ≤ 1.25×) {ok}; ")
        cli = r.get("cli") or {}
        if cli.get("wall_s") is not None and r.get("file_bytes"):
            w = cli["wall_s"]
            line += f"`spa prune` wall {w:.2f} s (target < 3 s) {'✅' if w < 3 else '❌'}"
            if cli.get("maxrss_bytes"):
                rss, fb = cli["maxrss_bytes"], r["file_bytes"]
                line += (f", peak RSS {rss / 1e6:.0f} MB vs file {fb / 1e6:.0f} MB = {rss / fb:.2f}× "
                         f"(target < 3×) {'✅' if rss < 3 * fb else '❌'}")
        L.append(line)
    if slow_cli:
        L.append(f"- `spa prune` wall > 5 s: " + ", ".join(
            f"{e['model']}/{e['exporter']} ({e['cli']['wall_s']:.1f} s)" for e in slow_cli))
    missing = [f"{x}/{ex}" for x in expected for ex in ("legacy", "dynamo") if (x, ex) not in results]
    if missing:
        L.append(f"- not yet run ({len(missing)}): " + ", ".join(missing[:20]) + (" ..." if len(missing) > 20 else ""))
    L.append("")

    L.append("### Results\n")
    L.append("| model | params (M) | exporter | status | MACs ratio | params ratio | latency ratio | "
             "orig latency (ms) | max rel err | prune wall (s) | peak RSS (MB) | file (MB) | RSS / file | notes |")
    L.append("|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for e in entries:
        meas = e.get("measure") or {}
        v = meas.get("verify") or {}
        lat = meas.get("latency") or {}
        cli = e.get("cli") or {}
        rss, fb = cli.get("maxrss_bytes"), e.get("file_bytes")
        L.append("| " + " | ".join([
            e["model"], f"{counts.get(e['model'], 0) / 1e6:.1f}", e["exporter"], e.get("status", "?"),
            _fmt(e.get("macs_ratio")), _fmt(e.get("params_ratio")), _fmt(e.get("latency_ratio")),
            _fmt(lat["original_s"] * 1e3 if "original_s" in lat else None, ".1f"),
            _fmt(v.get("max_rel_error"), ".1e"),
            _fmt(cli.get("wall_s"), ".2f"), _fmt(rss / 1e6 if rss else None, ".0f"),
            _fmt(fb / 1e6 if fb else None, ".1f"), _fmt(rss / fb if rss and fb else None, ".2f"),
            _notes(e),
        ]) + " |")
    return "\n".join(L) + "\n"


def render() -> int:
    results = _load_results()
    meta = json.loads(META.read_text()) if META.exists() else {}
    body = render_markdown(results, meta)
    section = f"{START}\n{body}{END}"
    if README.exists():
        text = README.read_text()
        if START in text and END in text and text.index(START) < text.index(END):
            pre, rest = text.split(START, 1)
            post = rest.split(END, 1)[1]
            text = pre + section + post
        else:
            text = text.rstrip("\n") + "\n\n" + section + "\n"
    else:
        text = "# Benchmarks\n\n" + section + "\n"
    README.write_text(text)
    print(f"wrote {README} ({len(results)} entries)")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--_child"]:
        step, rest = argv[1], argv[2:]
        return worker_export(*rest) if step == "export" else worker_measure(*rest)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", help="comma-separated subset (default: all under --max-params)")
    ap.add_argument("--exporters", default="legacy,dynamo", help="comma-separated: legacy,dynamo")
    ap.add_argument("--cache", default="/tmp/zoo", help="directory of cached ONNX exports")
    ap.add_argument("--max-params", type=int, default=100_000_000)
    ap.add_argument("--force", action="store_true", help="re-run entries already in the results file")
    ap.add_argument("--render", action="store_true", help="only write the table into benchmarks/README.md")
    ap.add_argument("--render-after", action="store_true", help="render after a partial (subset) sweep too")
    args = ap.parse_args(argv)
    if args.render:
        return render()
    return sweep(args)


if __name__ == "__main__":
    sys.exit(main())
