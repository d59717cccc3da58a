"""What a sweep is made of: its cells (a criterion at a ratio or a budget), the settings every
cell shares, the finished sweep, and the option values that list them."""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field


from ..errors import SpaError
from ..options import PruneOptions

__all__ = ["Cell", "SweepConfig", "Sweep", "cells_of", "parse_ratios", "parse_targets", "parse_keep",
           "BACKENDS", "BUDGET_KINDS", "KEEP_KEYS"]

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
    from ..score import CRITERIA
    unknown = [c for c in criteria if c not in CRITERIA]
    if unknown or not criteria:
        raise SpaError(f"--criteria: unknown criterion {unknown[0]!r}; choose from {', '.join(CRITERIA)}"
                       if unknown else "--criteria: no criterion given")
    cells = [Cell(c, "ratio", r) for c in dict.fromkeys(criteria) for r in ratios]
    cells += [Cell(c, k, v) for c in dict.fromkeys(criteria) for k, v in targets]
    if not cells:
        raise SpaError("nothing to sweep: give --ratios or --targets")
    return cells
