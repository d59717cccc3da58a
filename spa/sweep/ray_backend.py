"""``spa sweep --backend ray``: the cells as Ray tasks (optional extra ``ray``).

The model file (and its external data), the ``--calib`` and ``--eval`` files are put into Ray's
object store once, as bytes: a node of a cluster need not see this machine's paths. Each worker
process writes them into a temporary folder the first time it runs a cell of this sweep, reads
them once (the same ``Worker`` the local pool uses), removes the folder at once and keeps what
it read in memory for its later cells.

Without ``--address`` Ray starts a local instance on this machine's CPUs (or uses the one the
caller already started with ``ray.init``); ``--address HOST:PORT`` (or ``auto``) joins a running
cluster, whose nodes need spa and its dependencies installed (e.g. ``pip install spa-prune[ray]``
in the cluster's image).
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import uuid
from dataclasses import replace
from pathlib import Path

from ..errors import SpaError
from .cells import Cell, SweepConfig
from .worker import Worker

__all__ = ["run_cells"]

# In a Ray worker process: sweep id -> its Worker (a process may serve several sweeps).
_WORKERS: dict = {}


def _files_of(config: SweepConfig) -> tuple[dict, SweepConfig]:
    """Every file the cells read, as {relative name: bytes}, and the config naming them so."""
    from ..loading.model import read
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
        worker = _WORKERS[sweep_id] = _worker_from(blobs, config)
    return worker.run(cell)


def _worker_from(blobs: dict, config: SweepConfig) -> Worker:
    """A ``Worker`` read from the files in ``blobs``, which live on disk only while it reads
    them: Ray ends its worker processes without running ``atexit``, so a folder kept for later
    would outlive the sweep with the user's model and data in it."""
    folder = tempfile.mkdtemp(prefix="spa-ray-")
    try:
        for rel, data in blobs.items():
            target = Path(folder, rel)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
        local = {k: os.path.join(folder, getattr(config, k)) for k in ("model", "calib", "eval")
                 if getattr(config, k)}
        from .. import runtime
        runtime.THREADS = 1          # the task asked Ray for one CPU: its sessions use one
        from ..loading.model import materialized
        worker = Worker(replace(config, **local))
        worker.model = materialized(worker.model)   # its external data must not need the folder
        return worker
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _check_reachable(address: str | None, timeout: float = 10.0):
    """``HOST:PORT`` where nothing listens makes ``ray.init`` wait for minutes: try the port
    first and say so in one line."""
    if not address or address == "auto" or address.startswith("local"):
        return
    host, sep, port = address.split("://", 1)[-1].rpartition(":")
    if not sep or not port.isdigit():
        raise SpaError(f"--address {address!r}: expected HOST:PORT (or auto)")
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise SpaError(f"--address {address}: nothing answers there ({e.strerror or e}); is the Ray head "
                       "running?") from None


def run_cells(config: SweepConfig, cells: list[Cell], on_cell, address: str | None = None) -> tuple[list[dict], int]:
    """The rows in cell order, and how many CPUs the Ray instance offered."""
    try:
        import ray
    except ImportError:
        raise SpaError("--backend ray needs Ray: pip install 'spa-prune[ray]'") from None
    started = not ray.is_initialized()
    if started:
        _check_reachable(address)
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
