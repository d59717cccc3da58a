"""What ``spa sweep`` shows and writes: the table, sweep.json, sweep.csv, sweep.png and the
models ``--keep`` asks for. Everything is written at the end, atomically; when one file
fails the others written so far are removed, so a failed sweep leaves nothing behind."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

from ..loading.files import atomic_write, check_outputs
from ..errors import OutputPathError

__all__ = ["format_sweep", "output_files", "check_output_dir", "write_all", "PLOT_MISSING"]

PLOT_MISSING = "matplotlib is not installed: sweep.png skipped (pip install 'spa-prune[plot]')"

CSV_COLUMNS = ["criterion", "kind", "value", "macs", "macs_ratio", "params", "params_ratio", "file_bytes",
               "size_ratio", "latency_s", "original_latency_s", "latency_ratio", "latency_noisy", "accuracy", "agreement",
               "cosine", "rel_error", "channels_removed", "channels", "budget_met", "verified", "pareto",
               "seconds", "error"]


def output_files(out_dir: Path, keeps: list[tuple[str, float]], plot: bool) -> dict[str, Path]:
    """What a sweep writes: role -> path."""
    files = {"sweep.json": out_dir / "sweep.json", "sweep.csv": out_dir / "sweep.csv"}
    if plot:
        files["sweep.png"] = out_dir / "sweep.png"
    for key, bound in keeps:
        files[f"--keep best:{key}<={bound:g}"] = out_dir / keep_name(key, bound)
    return files


def keep_name(key: str, bound: float) -> str:
    return f"best-{key}-{bound:g}.onnx"


def check_output_dir(out_dir: Path, files: dict[str, Path], inputs: dict[str, Path]):
    """Refuse before any work: -o must be a directory or a path whose parent is one we may
    write; its files must not be inputs."""
    if os.path.lexists(out_dir) and not out_dir.exists():
        raise OutputPathError(f"{out_dir}: -o of spa sweep is a broken symbolic link")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputPathError(f"{out_dir}: -o of spa sweep is a directory, and this is a file")
    if out_dir.is_dir():
        check_outputs(files, inputs)
        return
    parent = Path(os.path.realpath(out_dir)).parent
    if not parent.is_dir():
        raise OutputPathError(f"{out_dir}: directory {parent} does not exist")
    if not os.access(parent, os.W_OK):
        raise OutputPathError(f"{out_dir}: directory {parent} is not writable")


def _fmt(v, kind: str) -> str:
    if v is None:
        return "-"
    if kind == "count":
        for suffix in ("", "K", "M", "G", "T"):
            if abs(v) < 1000:
                return f"{v:.3g}{suffix}"
            v /= 1000
    if kind == "ms":
        return f"{v * 1e3:.3g}"
    return f"{v:.3f}"


def format_sweep(sweep) -> str:
    """One line per cell; '*' marks the Pareto front (least MACs for the quality), '?' a
    latency share that cannot be trusted."""
    from .worker import LATENCY_REPEATS
    q = sweep.quality
    head = (f"{'':2}{'criterion':<10}{'setting':<13}{'MACs':>8}{'/orig':>7}{'params':>8}{'/orig':>7}"
            f"{'size':>8}{'latency ms':>11}{'/orig':>7}{q:>10}")
    o = sweep.original
    lines = [head, f"{'':2}{'original':<23}{_fmt(o['macs'], 'count'):>8}{'':>7}{_fmt(o['params'], 'count'):>8}"
                   f"{'':>7}{_fmt(o['file_bytes'], 'count') + 'B':>8}{_fmt(o.get('latency_s'), 'ms'):>11}{'':>7}"
                   f"{_fmt(o.get(q), 'share'):>10}"]
    for r in sweep.rows:
        setting = f"{r['kind']}={r['value']:g}"
        if "error" in r:
            lines.append(f"{'':2}{r['criterion']:<10}{setting:<13} failed: {r['error']}")
            continue
        lines.append(f"{'*' if r.get('pareto') else '':2}{r['criterion']:<10}{setting:<13}"
                     f"{_fmt(r['macs'], 'count'):>8}{_fmt(r['macs_ratio'], 'share'):>7}"
                     f"{_fmt(r['params'], 'count'):>8}{_fmt(r['params_ratio'], 'share'):>7}"
                     f"{_fmt(r['file_bytes'], 'count') + 'B':>8}{_fmt(r['latency_s'], 'ms'):>11}"
                     f"{_fmt(r['latency_ratio'], 'share') + ('?' if r.get('latency_noisy') else ''):>7}"
                     f"{_fmt(r.get(q), 'share'):>10}")
    what = {"accuracy": "accuracy on the --eval data",
            "agreement": "top-1 agreement with the original", "cosine": "mean cosine similarity to the original"}[q]
    where = "" if q == "accuracy" else f" on {o['fidelity_inputs']}"
    lines.append(f"* Pareto front (no other cell has fewer MACs and better {q}); {q} = {what}{where}; "
                 f"/orig = after/before; latency interleaved with the original, the fastest of "
                 f"{LATENCY_REPEATS} rounds' medians")
    if any(r.get("latency_noisy") for r in sweep.rows):
        lines.append("? latency noisy even when measured again (the rounds disagree, or it is under half the "
                     "MACs share): not used by --keep best:latency<=; check with spa bench")
    return "\n".join(lines)


def _write_json(path, sweep):
    with open(path, "w") as f:
        json.dump(sweep.as_dict(), f, indent=1)


def _write_csv(path, sweep):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, CSV_COLUMNS, extrasaction="ignore")
        w.writeheader()
        for r in sweep.rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_COLUMNS})


def plot(sweep, path, title: str | None = None):
    """Quality and latency (share of the original) against the MACs share, one line per
    criterion and kind of setting, Pareto cells circled."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    q = sweep.quality
    fig, (ax_q, ax_l) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict = {}
    for r in sweep.rows:
        if "error" not in r:
            series.setdefault((r["criterion"], "ratio" if r["kind"] == "ratio" else "budget"), []).append(r)
    for (criterion, kind), rows in sorted(series.items()):
        rows = sorted(rows, key=lambda r: r["macs_ratio"])
        x = [r["macs_ratio"] for r in rows]
        label = criterion if kind == "ratio" else f"{criterion} ({rows[0]['kind']} budget)"
        line, = ax_q.plot(x, [r[q] for r in rows], "o-", label=label)
        ax_l.plot(x, [r["latency_ratio"] for r in rows], "o-", color=line.get_color(), label=label)
        noisy = [r for r in rows if r.get("latency_noisy")]
        ax_l.plot([r["macs_ratio"] for r in noisy], [r["latency_ratio"] for r in noisy], "x", ms=11, color="red")
        front = [r for r in rows if r.get("pareto")]
        ax_q.plot([r["macs_ratio"] for r in front], [r[q] for r in front], "o", ms=11, mfc="none",
                  color="black")
    ax_q.axhline(sweep.original.get(q, 1.0), color="grey", ls=":", label="original")
    ax_q.set(xlabel="MACs (share of the original)", ylabel=q, title=f"{q} (circled: Pareto front)")
    ax_l.plot([0, 1], [0, 1], color="grey", ls=":", label="latency = MACs")
    ax_l.set(xlabel="MACs (share of the original)", ylabel="latency (share of the original)",
             title="onnxruntime latency, 1 thread")
    for ax in (ax_q, ax_l):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title or Path(sweep.config["model"]).name)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def write_all(sweep, out_dir: Path, files: dict[str, Path], keep_models: dict[str, object]) -> list[Path]:
    """Create ``out_dir`` if needed and write every file; on any failure remove what was written
    (and the directory when this call made it)."""
    made = not out_dir.exists()
    written: list[Path] = []
    try:
        out_dir.mkdir(parents=False, exist_ok=True)
        for role, path in files.items():
            if role == "sweep.json":
                written.append(atomic_write(path, lambda tmp: _write_json(tmp, sweep)))
            elif role == "sweep.csv":
                written.append(atomic_write(path, lambda tmp: _write_csv(tmp, sweep)))
            elif role == "sweep.png":
                written.append(atomic_write(path, lambda tmp: plot(sweep, tmp)))
            else:
                result = keep_models[role]
                result.save(path)
                written.extend(Path(p) for p in result.report["after"]["files"])
    except BaseException:
        for f in written:
            if f.is_file():
                f.unlink()
        if made and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    return written
