"""One cell, measured: ``Worker`` reads the model, the data and the original's reference outputs
once per process and prunes and measures each cell it gets (MACs, params, size, latency
interleaved with the original's, quality)."""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx

from ..errors import SpaError
from .cells import Cell, SweepConfig

__all__ = ["Worker", "fidelity", "latency_noisy", "LATENCY_REPEATS"]

class Worker:
    """What a process needs for its cells, read once: the model (kept unnormalized: spa.prune
    copies a ModelProto before changing it), the data, and the original's reference outputs."""

    def __init__(self, config: SweepConfig):
        from ..analysis import Loaded
        from ..loading.data_files import calibration_data, eval_data
        from ..score.data import BatchLayout, Calibration
        from ..loading.probe import infer_shapes
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
        from ..loading.data_files import accuracy
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
        from ..verify.bench import timings
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
        from ..loading.data_files import accuracy
        from ..verify.metrics import count_macs, count_params
        from ..loading.probe import infer_shapes
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
        from ..pipeline import prune
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
    from ..runtime import session
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
