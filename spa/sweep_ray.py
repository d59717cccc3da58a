"""``spa sweep --backend ray``: the cells as Ray tasks (optional extra ``ray``).

The model file (and its external data), the ``--calib`` and ``--eval`` files are put into Ray's
object store once, as bytes: a node of a cluster need not see this machine's paths. Each worker
process writes them into a temporary folder the first time it runs a cell of this sweep, reads
them once (the same ``_Worker`` the local pool uses) and keeps them for its later cells.

Without ``--address`` Ray starts a local instance on this machine's CPUs (or uses the one the
caller already started with ``ray.init``); ``--address HOST:PORT`` (or ``auto``) joins a running
cluster, whose nodes need spa and its dependencies installed (e.g. ``pip install spa-prune[ray]``
in the cluster's image).
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

from .errors import SpaError
from .sweep import Cell, SweepConfig, _Worker

__all__ = ["run_cells"]

# In a Ray worker process: sweep id -> its _Worker (a process may serve several sweeps).
_WORKERS: dict = {}


def _files_of(config: SweepConfig) -> tuple[dict, SweepConfig]:
    """Every file the cells read, as {relative name: bytes}, and the config naming them so."""
    from .model import read
    model = Path(config.model)
    _, files = read(model)     # the model and its external data, all inside the model's folder
    blobs = {}
    for path in files.values():
        rel = os.path.relpath(os.path.realpath(path), os.path.realpath(model.parent))
        blobs[os.path.join("model", rel)] = Path(path).read_bytes()
    renamed = {"model": os.path.join("model", model.name)}
    for key in ("calib", "eval"):
        if getattr(config, key):
            renamed[key] = f"{key}.npz"
            blobs[renamed[key]] = Path(getattr(config, key)).read_bytes()
    return blobs, replace(config, **renamed)


def _cell_task(sweep_id: str, blobs: dict, config: SweepConfig, cell: Cell) -> dict:
    worker = _WORKERS.get(sweep_id)
    if worker is None:
        folder = tempfile.mkdtemp(prefix="spa-ray-")
        atexit.register(shutil.rmtree, folder, True)
        for rel, data in blobs.items():
            target = Path(folder, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        local = {k: os.path.join(folder, getattr(config, k)) for k in ("model", "calib", "eval")
                 if getattr(config, k)}
        from . import runtime
        runtime.THREADS = 1          # the task asked Ray for one CPU: its sessions use one
        worker = _WORKERS[sweep_id] = _Worker(replace(config, **local))
    return worker.run(cell)


def run_cells(config: SweepConfig, cells: list[Cell], on_cell, address: str | None = None) -> tuple[list[dict], int]:
    """The rows in cell order, and how many CPUs the Ray instance offered."""
    try:
        import ray
    except ImportError:
        raise SpaError("--backend ray needs Ray: pip install 'spa-prune[ray]'") from None
    started = not ray.is_initialized()
    if started:
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
        except Exception as e:
            raise SpaError(f"Ray cannot start or join {address or 'a local instance'}: "
                           f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    try:
        blobs, remote_config = _files_of(config)
        blobs_ref = ray.put(blobs)   # once; every task gets the same object
        task = ray.remote(num_cpus=1)(_cell_task)
        sweep_id = uuid.uuid4().hex
        pending = {task.remote(sweep_id, blobs_ref, remote_config, cell): i for i, cell in enumerate(cells)}
        rows: list = [None] * len(cells)
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for ref in done:
                i = pending.pop(ref)
                rows[i] = ray.get(ref)
                on_cell(cells[i], rows[i])
        return rows, int(ray.cluster_resources().get("CPU", 0))
    finally:
        if started:
            ray.shutdown()
