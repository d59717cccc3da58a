"""``spa sweep``: prune one model at many settings and show the trade-off.

A *cell* is one criterion at one setting (a uniform ``ratio`` or a budget such as
``macs=0.6``). Each cell is pruned with ``spa.prune`` and measured: MACs, params, file size,
onnxruntime latency (interleaved with the original in the same process, as ``spa bench``
does) and quality — accuracy on labelled data, else fidelity to the original on the
calibration or synthetic inputs. Cells run on a backend: ``serial`` (this process), ``pool``
(local worker processes, the default) or ``ray`` (see ``spa.sweep.ray_backend``).

Analysis is not shared between cells: ``spa.prune`` analyzes the model it is given and an
``Analysis`` holds closures that cannot be sent to another process. It costs 10-30 ms on the
bundled models against 0.1-3 s for a cell, so each worker instead reads the model, the data
and the original's reference outputs once and prunes from the proto in memory.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import numpy as np

from ..errors import SpaError
from .cells import BACKENDS, Cell, Sweep, SweepConfig
from .worker import Worker

__all__ = ["run_sweep", "run_sweeps", "pareto", "best_under", "rerun", "Progress"]

def _init_worker(configs: list[SweepConfig], threads: int = 0):
    global _CONFIGS
    from .. import runtime
    runtime.THREADS = threads   # the worker's share of the cores, for every session it makes
    _CONFIGS = configs


def _run_in_worker(model: int, cell: Cell) -> dict:
    """A cell of model ``model``; each process reads a model (and its data) once, when it first
    gets one of its cells."""
    if model not in _WORKERS:
        _WORKERS[model] = Worker(_CONFIGS[model])
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
    local = [Worker(c) for c in configs]   # also validates every model and its data before any worker starts
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
        from .ray_backend import run_cells
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
    return Worker(config).prune(cell)
