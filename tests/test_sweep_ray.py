"""spa sweep on Ray: the same rows as in-process, on a local instance of 2 CPUs."""

from pathlib import Path

import pytest

from spa.errors import SpaError
from spa.sweep import Cell, SweepConfig, run_sweep
from spa.options import PruneOptions

DEMO = Path(__file__).resolve().parent.parent / "models"


def test_ray_backend_matches_serial():
    ray = pytest.importorskip("ray")
    config = SweepConfig(str(DEMO / "demo_cnn.onnx"), calib=str(DEMO / "demo_calib.npz"),
                         eval=str(DEMO / "demo_sample.npz"), runs=1, samples=8, options=PruneOptions(verify=False))
    cells = [Cell("l1", "ratio", 0.25), Cell("l1", "ratio", 0.5)]
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        done = []
        on_ray = run_sweep(config, cells, backend="ray", on_cell=lambda cell, row: done.append(cell))
    finally:
        ray.shutdown()
    assert on_ray.backend == "ray" and on_ray.jobs == 2 and sorted(done, key=cells.index) == cells
    here = run_sweep(config, cells, backend="serial")
    for a, b in zip(on_ray.rows, here.rows):
        for key in ("macs", "params", "file_bytes", "accuracy", "agreement"):
            assert a[key] == b[key], key


def test_ray_missing_is_one_clear_error(monkeypatch):
    import sys
    monkeypatch.setitem(sys.modules, "ray", None)
    config = SweepConfig(str(DEMO / "demo_cnn.onnx"), runs=1, samples=4, options=PruneOptions(verify=False))
    with pytest.raises(SpaError, match=r"pip install 'spa-prune\[ray\]'"):
        run_sweep(config, [Cell("l1", "ratio", 0.5)], backend="ray")
