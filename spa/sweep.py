"""``spa sweep``: prune one model at many settings and show the trade-off.

A *cell* is one criterion at one setting (a uniform ``ratio`` or a budget such as
``macs=0.6``). Each cell is pruned with ``spa.prune`` and measured: MACs, params, file size,
onnxruntime latency (interleaved with the original in the same process, as ``spa bench``
does) and quality — accuracy on labelled data, else fidelity to the original on the
calibration or synthetic inputs. Cells run on a backend: ``serial`` (this process), ``pool``
(local worker processes, the default) or ``ray`` (see ``spa.sweep_ray``).

Analysis is not shared between cells: ``spa.prune`` analyzes the model it is given and an
``Analysis`` holds closures that cannot be sent to another process. It costs 10-30 ms on the
bundled models against 0.1-3 s for a cell, so each worker instead reads the model, the data
and the original's reference outputs once and prunes from the proto in memory.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np
import onnx

from .errors import SpaError
from .options import PruneOptions

__all__ = ["Cell", "SweepConfig", "Sweep", "cells_of", "parse_ratios", "parse_targets", "parse_keep",
           "run_sweep", "pareto", "best_under", "latency_noisy", "Progress", "BACKENDS"]

BACKENDS = ("pool", "serial", "ray")
BUDGET_KINDS = ("macs", "params", "latency")
KEEP_KEYS = ("macs", "params", "size", "latency")


@dataclass(frozen=True)
class Cell:
    """One point of the sweep: a criterion and either ``ratio`` or a budget kind, and its value."""

    criterion: str
    kind: str          # "ratio" or one of BUDGET_KINDS
    value: float
    model: str = ""    # which model, when a sweep runs several (for progress lines only)

    @property
    def label(self) -> str:
        return f"{self.model + ': ' if self.model else ''}{self.criterion} {self.kind}={self.value:g}"

    def options(self, shared: PruneOptions) -> PruneOptions:
        """The options of this cell: the sweep's, with this criterion and amount."""
        amounts = {"ratio": None, "macs": None, "params": None, "latency": None, self.kind: self.value}
        return shared.replace(criterion=self.criterion, **amounts)


@dataclass
class SweepConfig:
    """What every cell shares; plain data, so that it can be sent to worker processes."""

    model: str
    calib: str | None = None
    eval: str | None = None
    options: PruneOptions = field(default_factory=PruneOptions)   # every cell's, but criterion and amount
    runs: int = 20
    samples: int = 64          # fidelity inputs: calibration samples used, or synthetic ones drawn

    @property
    def seed(self) -> int:
        return self.options.seed


@dataclass
class Sweep:
    """The original's measurements, one row per cell (in cell order) and what quality means."""

    original: dict
    rows: list[dict]
    quality: str               # "accuracy", "agreement" (top-1, classifiers) or "cosine"
    config: dict
    seconds: float = 0.0
    backend: str = "serial"
    jobs: int = 1

    def as_dict(self) -> dict:
        return {"model": self.config["model"], "quality": self.quality, "original": self.original,
                "cells": self.rows, "pareto": [i for i, r in enumerate(self.rows) if r.get("pareto")],
                "config": self.config, "backend": self.backend, "jobs": self.jobs, "seconds": self.seconds}


# ---------------------------------------------------------------- option values

def _float(text: str, what: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise SpaError(f"{what}: not a number: {text!r}") from None
    if not math.isfinite(value):
        raise SpaError(f"{what}: not a finite number: {text!r}")
    return value


def parse_ratios(spec: str) -> list[float]:
    """``START:STOP:STEP`` (STOP included) or ``R1,R2,...``; every ratio in [0, 1)."""
    if ":" in spec:
        parts = spec.split(":")
        if len(parts) != 3:
            raise SpaError(f"--ratios {spec!r}: expected START:STOP:STEP or R1,R2,...")
        start, stop, step = (_float(p, "--ratios") for p in parts)
        if step <= 0 or stop < start:
            raise SpaError(f"--ratios {spec!r}: STEP must be positive and STOP at least START")
        # rounding keeps 0.1:0.7:0.1 at seven values despite float error
        values = [round(start + i * step, 10) for i in range(int(math.floor((stop - start) / step + 1e-9)) + 1)]
    else:
        values = [_float(p, "--ratios") for p in spec.split(",") if p.strip()]
    if not values:
        raise SpaError(f"--ratios {spec!r}: no ratio given")
    bad = [v for v in values if not 0 <= v < 1]
    if bad:
        raise SpaError(f"--ratios {spec!r}: a ratio is the fraction removed, in [0, 1); got {bad[0]:g}")
    return sorted(set(values))


def parse_targets(spec: str) -> list[tuple[str, float]]:
    """``KIND=V1,V2,...`` with KIND macs, params or latency and every V in (0, 1]."""
    kind, sep, values = spec.partition("=")
    if not sep or kind not in BUDGET_KINDS:
        raise SpaError(f"--targets {spec!r}: expected KIND=V1,V2,... with KIND one of {', '.join(BUDGET_KINDS)}")
    out = [_float(v, "--targets") for v in values.split(",") if v.strip()]
    if not out:
        raise SpaError(f"--targets {spec!r}: no value given")
    bad = [v for v in out if not 0 < v <= 1]
    if bad:
        raise SpaError(f"--targets {spec!r}: a target is the share of the original to keep, in (0, 1]; "
                       f"got {bad[0]:g}")
    return [(kind, v) for v in sorted(set(out), reverse=True)]


def parse_keep(spec: str) -> tuple[str, float]:
    """``best:KEY<=V``: the best-quality cell whose KEY (a share of the original) is at most V."""
    m = re.fullmatch(r"best:(\w+)<=([^<=]+)", spec.strip())
    if not m or m.group(1) not in KEEP_KEYS:
        raise SpaError(f"--keep {spec!r}: expected best:KEY<=V with KEY one of {', '.join(KEEP_KEYS)} "
                       "(a share of the original, e.g. best:macs<=0.5)")
    value = _float(m.group(2), "--keep")
    if value <= 0:
        raise SpaError(f"--keep {spec!r}: the bound must be positive")
    return m.group(1), value


def cells_of(criteria: list[str], ratios: list[float], targets: list[tuple[str, float]]) -> list[Cell]:
    from .importance import CRITERIA
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown or not criteria:
        raise SpaError(f"--criteria: unknown criterion {unknown[0]!r}; choose from {', '.join(CRITERIA)}"
                       if unknown else "--criteria: no criterion given")
    cells = [Cell(c, "ratio", r) for c in dict.fromkeys(criteria) for r in ratios]
    cells += [Cell(c, k, v) for c in dict.fromkeys(criteria) for k, v in targets]
    if not cells:
        raise SpaError("nothing to sweep: give --ratios or --targets")
    return cells


# ---------------------------------------------------------------- one cell

class _Worker:
    """What a process needs for its cells, read once: the model (kept unnormalized: spa.prune
    copies a ModelProto before changing it), the data, and the original's reference outputs."""

    def __init__(self, config: SweepConfig):
        from .analysis import Loaded
        from .data_files import calibration_data, eval_data
        from .importance.data import BatchLayout, Calibration
        from .shapes import infer_shapes
        self.config = config
        loaded = Loaded.read(config.model)
        self.model = loaded.model
        self.file_bytes = sum(os.path.getsize(f) for f in loaded.files.values())
        self.calib = calibration_data(config.calib, self.model) if config.calib else None
        self.eval = eval_data(config.eval, self.model) if config.eval else None
        shapes = infer_shapes(self.model, dict(config.options.input_shapes), want_values=False)
        self.input_shapes = shapes.input_shapes
        self.layout = BatchLayout.of(self.model, self.input_shapes)
        data = None if self.calib is None else {   # the first samples, along each input's batch axis
            k: v if self.layout.axes.get(k) is None else np.take(v, np.arange(min(config.samples, v.shape[
                self.layout.axes[k]])), axis=self.layout.axes[k]) for k, v in self.calib.items()}
        self.feeds = Calibration(data, samples=config.samples, seed=config.seed).batches(self.model,
                                                                                         self.input_shapes)
        self.reference = _outputs(self.model, self.feeds)

    def run(self, cell: Cell) -> dict:
        from .data_files import accuracy
        c = self.config
        start = time.perf_counter()
        row = {"criterion": cell.criterion, "kind": cell.kind, "value": cell.value}
        try:
            result = self.prune(cell)
        except SpaError as e:   # one cell that cannot be pruned does not end the sweep
            return {**row, "error": " ".join(str(e).split()), "seconds": time.perf_counter() - start}
        rep = result.report
        with tempfile.TemporaryDirectory(prefix="spa-sweep-") as tmp:
            result.save(Path(tmp) / "cell.onnx")   # the size a user will get on disk
        groups = rep["groups"]
        row.update(
            macs=rep["after"]["macs"], macs_ratio=_share(rep["after"]["macs"], rep["before"]["macs"]),
            params=rep["after"]["params"], params_ratio=_share(rep["after"]["params"], rep["before"]["params"]),
            file_bytes=rep["after"]["file_bytes"], size_ratio=_share(rep["after"]["file_bytes"], self.file_bytes))
        row.update(self.latency(result.model, row["macs_ratio"]))
        row.update(
            channels_removed=sum(g["removed"] for g in groups),
            channels=sum(g["channels"] for g in groups),
            verified=rep.get("verify", {}).get("ok"))
        if "budget" in rep:
            row["budget_met"] = rep["budget"].get("met")
        if self.eval is not None:
            row["accuracy"] = accuracy(result.model, self.eval)
        row.update(fidelity(self.reference, _outputs(result.model, self.feeds)))
        row["seconds"] = time.perf_counter() - start
        return row

    def latency(self, pruned: onnx.ModelProto, macs_ratio: float | None) -> dict:
        """The pruned model's latency against the original's; a figure that the rounds
        disagree on, or that is far below the MACs share, is measured once more with twice
        the rounds and, still so, marked ``latency_noisy`` (issue 24: a MobileNetV3 cell timed
        at 0.056 of the original, 2.2 ms, where spa bench timed the same file at 14.3 ms)."""
        from .bench import timings
        c = self.config
        for repeats in (LATENCY_REPEATS, 2 * LATENCY_REPEATS):
            t = timings([self.model, pruned], self.input_shapes, runs=c.runs * repeats // LATENCY_REPEATS,
                        seed=c.seed, repeats=repeats)
            before, after = t.seconds
            ratio = _share(after, before)
            noisy = latency_noisy(ratio, macs_ratio, t.spread())
            if not noisy:
                break
        return {"latency_s": after, "original_latency_s": before, "latency_ratio": ratio,
                "latency_spread": t.spread(), "latency_noisy": noisy}

    def original(self) -> dict:
        from .data_files import accuracy
        from .metrics import count_macs, count_params
        from .shapes import infer_shapes
        shapes = infer_shapes(self.model, self.input_shapes, want_values=False)
        out = {"macs": count_macs(self.model, shapes), "params": count_params(self.model),
               "file_bytes": self.file_bytes, "classifier": _is_classifier(self.reference)}
        if self.eval is not None:
            out["accuracy"] = accuracy(self.model, self.eval)
        out["fidelity_inputs"] = (f"{sum(self.layout.count(f) for f in self.feeds)} calibration samples"
                                  if self.calib is not None else f"{self.config.samples} synthetic samples")
        return out

    def prune(self, cell: Cell):
        """The cell's pruned model again (to save it): the same call, so the same model."""
        from .pipeline import prune
        return prune(self.model, options=cell.options(self.config.options).replace(calib=self.calib))


def _share(a, b):
    return a / b if b else None


# Rounds of interleaved timing per cell; a cell whose rounds disagree on the pruned model's
# share of the original's latency by more than LATENCY_SPREAD of it, or whose latency share is
# below LATENCY_FLOOR times its MACs share (no pruning speeds a model up twice as much as it
# cuts its work), is noisy.
LATENCY_REPEATS = 3
LATENCY_SPREAD = 0.25
LATENCY_FLOOR = 0.5


def latency_noisy(latency_ratio: float | None, macs_ratio: float | None, spread: float) -> bool:
    """Whether a cell's latency share cannot be trusted (see LATENCY_SPREAD, LATENCY_FLOOR)."""
    if latency_ratio is None:
        return False
    implausible = macs_ratio is not None and latency_ratio < LATENCY_FLOOR * macs_ratio
    return bool(implausible or spread > LATENCY_SPREAD)


def _outputs(model: onnx.ModelProto, feeds: list[dict]) -> np.ndarray:
    """The first output of every batch, concatenated along the first axis."""
    from .runtime import session
    sess = session(model)
    return np.concatenate([np.asarray(sess.run(None, f)[0]) for f in feeds], axis=0)


def _is_classifier(y: np.ndarray) -> bool:
    return y.dtype.kind == "f" and y.ndim == 2 and y.shape[1] >= 2


def fidelity(reference: np.ndarray, pruned: np.ndarray) -> dict:
    """How close the pruned model's first output stays to the original's, without labels:
    top-1 agreement (classifiers: one row of scores per sample), mean cosine similarity
    per sample and the relative error ‖Δ‖/‖y‖ over everything."""
    ref = reference.astype(np.float64).reshape(len(reference), -1)
    new = pruned.astype(np.float64).reshape(len(pruned), -1)
    out = {}
    if _is_classifier(reference):
        out["agreement"] = float(np.mean(reference.argmax(1) == pruned.argmax(1)))
    cos = (ref * new).sum(1) / (np.linalg.norm(ref, axis=1) * np.linalg.norm(new, axis=1) + 1e-12)
    out["cosine"] = float(np.mean(cos))
    out["rel_error"] = float(np.linalg.norm(new - ref) / max(np.linalg.norm(ref), 1e-12))
    return out


def _init_worker(configs: list[SweepConfig], threads: int = 0):
    global _CONFIGS
    from . import runtime
    runtime.THREADS = threads   # the worker's share of the cores, for every session it makes
    _CONFIGS = configs


def _run_in_worker(model: int, cell: Cell) -> dict:
    """A cell of model ``model``; each process reads a model (and its data) once, when it first
    gets one of its cells."""
    if model not in _WORKERS:
        _WORKERS[model] = _Worker(_CONFIGS[model])
    return _WORKERS[model].run(cell)


_CONFIGS: list = []
_WORKERS: dict = {}


# ---------------------------------------------------------------- the sweep

class Progress:
    """Cells done / total, elapsed, ETA: a bar on a terminal, else one line per cell."""

    def __init__(self, total: int, quiet: bool = False, stream=None):
        self.total, self.done, self.quiet = total, 0, quiet
        self.stream = stream or sys.stderr
        self.start = time.perf_counter()
        self.bar = None
        if not quiet and self.stream.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, desc="spa sweep", unit="cell", file=self.stream, leave=False)

    def cell_done(self, cell: Cell, row: dict):
        self.done += 1
        if self.bar is not None:
            self.bar.set_postfix_str(cell.label)
            self.bar.update(1)
            return
        if self.quiet:
            return
        elapsed = time.perf_counter() - self.start
        eta = elapsed / self.done * (self.total - self.done)
        status = f"error: {row['error']}" if "error" in row else f"{row['seconds']:.1f}s"
        print(f"spa sweep: {self.done}/{self.total} {cell.label} {status} "
              f"(elapsed {_duration(elapsed)}, ETA {_duration(eta)})", file=self.stream, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _duration(s: float) -> str:
    return f"{s:.1f}s" if s < 60 else f"{int(s // 60)}m{int(s % 60):02d}s"


def run_sweep(config: SweepConfig, cells: list[Cell], backend: str = "pool", jobs: int | None = None,
              on_cell: Callable[[Cell, dict], None] | None = None, address: str | None = None) -> Sweep:
    """Prune and measure every cell; rows come back in cell order, Pareto front marked."""
    return run_sweeps([config], cells, backend, jobs, on_cell, address)[0]


def run_sweeps(configs: list[SweepConfig], cells: list[Cell], backend: str = "pool", jobs: int | None = None,
               on_cell: Callable[[Cell, dict], None] | None = None, address: str | None = None) -> list[Sweep]:
    """The same cells on every model: one sweep each. The local pool runs the cells of all
    models together (a worker reads each model once); Ray takes one model after another."""
    if backend not in BACKENDS:
        raise SpaError(f"--backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    tasks = [(m, replace(cell, model=Path(c.model).name if len(configs) > 1 else ""))
             for m, c in enumerate(configs) for cell in cells]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(tasks)))
    start = time.perf_counter()
    local = [_Worker(c) for c in configs]   # also validates every model and its data before any worker starts
    on_cell = on_cell or (lambda cell, row: None)
    rows: list = [None] * len(tasks)
    if backend == "serial":
        jobs = 1
        for i, (m, cell) in enumerate(tasks):
            rows[i] = local[m].run(cell)
            on_cell(cell, rows[i])
    elif backend == "pool":
        rows = _pool(configs, tasks, jobs, on_cell)
    else:
        from .sweep_ray import run_cells
        for m, config in enumerate(configs):
            mine = [i for i, (mm, _) in enumerate(tasks) if mm == m]
            got, jobs = run_cells(config, [tasks[i][1] for i in mine], on_cell, address)
            for i, row in zip(mine, got):
                rows[i] = row
    seconds = time.perf_counter() - start
    return [_sweep_of(config, local[m], [r for (mm, _), r in zip(tasks, rows) if mm == m], seconds, backend, jobs)
            for m, config in enumerate(configs)]


def _sweep_of(config, local, rows, seconds, backend, jobs) -> Sweep:
    original = local.original()
    lat = [r["original_latency_s"] for r in rows if "original_latency_s" in r]
    original["latency_s"] = float(np.median(lat)) if lat else None
    quality = "accuracy" if config.eval else "agreement" if original["classifier"] else "cosine"
    original[quality] = original.get(quality, 1.0)
    for i in pareto(rows, quality):
        rows[i]["pareto"] = True
    if all("error" in r for r in rows):
        raise SpaError(f"{config.model}: every cell failed; the first: {rows[0]['error']}")
    described = {"model": config.model, "calib": config.calib, "eval": config.eval, "runs": config.runs,
                 "samples": config.samples, "options": config.options.as_report()}
    return Sweep(original, rows, quality, described, seconds, backend, jobs)


def _pool(configs: list[SweepConfig], tasks: list[tuple[int, Cell]], jobs: int, on_cell) -> list[dict]:
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor, as_completed
    # spawn, not fork: a forked onnxruntime (its thread pools) can hang in the child
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker,
                             initargs=(configs, max(1, (os.cpu_count() or 1) // jobs))) as pool:
        with _blas_threads(max(1, (os.cpu_count() or 1) // jobs)):  # workers start during submit
            futures = {pool.submit(_run_in_worker, m, cell): i for i, (m, cell) in enumerate(tasks)}
        rows: list = [None] * len(tasks)
        try:
            for f in as_completed(futures):
                i = futures[f]
                rows[i] = f.result()
                on_cell(tasks[i][1], rows[i])
        except BaseException:
            pool.shutdown(wait=False, cancel_futures=True)
            raise
    return rows


@contextlib.contextmanager
def _blas_threads(n: int):
    """Started workers inherit this environment: each one's BLAS (OBSPA's Hessians) gets its
    share of the cores instead of all of them, as Ray does for its workers (benchmarks/sweep.py on
    2 busy cores: without this an OBSPA cell took 2-3x its serial time in the pool, 1.5-2.5x with)."""
    names = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update({k: os.environ.get(k) or str(n) for k in names})   # the user's choice wins
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def pareto(rows: list[dict], quality: str) -> list[int]:
    """Indices of the cells no other cell beats: none has at most its MACs and at least its
    quality with one of the two strictly better."""
    ok = [(i, r["macs"], r[quality]) for i, r in enumerate(rows) if "error" not in r and r.get(quality) is not None]
    return [i for i, m, q in ok
            if not any(m2 <= m and q2 >= q and (m2 < m or q2 > q) for _, m2, q2 in ok)]


def best_under(sweep: Sweep, key: str, bound: float) -> int | None:
    """The cell of best quality whose ``key`` share of the original is at most ``bound``
    (ties: fewer MACs); None when no cell fits. A cell whose latency is ``latency_noisy``
    never fits a latency bound."""
    share = {"macs": "macs_ratio", "params": "params_ratio", "size": "size_ratio", "latency": "latency_ratio"}[key]
    fits = [(i, r) for i, r in enumerate(sweep.rows)
            if "error" not in r and r.get(share) is not None and r[share] <= bound + 1e-12
            and not (key == "latency" and r.get("latency_noisy"))]   # a noisy figure must not win
    if not fits:
        return None
    return max(fits, key=lambda ir: (ir[1][sweep.quality], -ir[1]["macs"]))[0]


def rerun(config: SweepConfig, cell: Cell):
    """The pruned model of one cell, pruned again in this process (to save it)."""
    return _Worker(config).prune(cell)
