"""``PruneOptions``: everything a pruning run is told, in one frozen, validated value.

The command line, ``spa.prune(**kwargs)`` and every ``spa sweep`` cell build one; each check
and each default is written here and nowhere else. A field left ``None`` means "the default",
which the properties below work out (the defaults of some depend on others: the steps on the
budget, the allocation on the criterion), so ``replace`` never carries a stale default over.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from .errors import SpaError
from .score import CRITERIA
from .score.obspa import COMPENSATIONS, SYNTHETIC
from .plan.planner import PlanOptions

__all__ = ["PruneOptions", "DEFAULT_CRITERION", "DEFAULT_ROUND_TO", "HIDDEN_AS_RATIO", "CRITERIA",
           "BUDGET_KINDS"]

# benchmarks/accuracy.py: without data, OBSPA keeps more accuracy than l1 at every ratio >= 0.3
# on 7 of its 8 models (not the depthwise/SE mobile net, where both collapse); it falls back to
# l1 where the model cannot run
DEFAULT_CRITERION = "obspa"
# Kept channels are rounded to a multiple of this by default (see benchmarks/README.md).
DEFAULT_ROUND_TO = 8
# ``hidden=HIDDEN_AS_RATIO`` (a bare --hidden) prunes the residual width by ``ratio``.
HIDDEN_AS_RATIO = -1.0
# The uniform ratio when neither a ratio, a budget nor a structure is named.
DEFAULT_RATIO = 0.5
BUDGET_KINDS = ("macs", "params", "latency")
AGGREGATES = ("sum", "mean", "max")
ALLOCATIONS = ("auto", "measured", "uniform", "obs")
# the fractions removed, each in [0, 1), and the CLI's name of each
_RATIOS = {"ratio": "ratio", "heads": "heads", "mlp": "mlp", "head_dims": "head-dims", "hidden": "hidden",
           "group_width": "group-width", "max_ratio": "max-ratio"}


@dataclass(frozen=True)
class PruneOptions:
    """How much to remove, how to choose it, from what data, and what to check.

    Amounts: ``ratio`` of every group's channels, or per structure ``heads``, ``mlp``,
    ``head_dims``, ``hidden``, ``group_width``; or one budget, ``macs``/``params``/``latency``,
    the share of the original to keep. See ``spa.prune`` for what each means."""

    ratio: float | None = None
    heads: float | None = None
    mlp: float | None = None
    head_dims: float | None = None
    hidden: float | None = None
    group_width: float | None = None
    macs: float | None = None
    params: float | None = None
    latency: float | None = None
    criterion: str | None = None
    aggregate: str = "sum"
    global_rank: bool = False
    max_ratio: float = 0.9
    round_to: int | str = DEFAULT_ROUND_TO
    allocation: str = "auto"
    steps: int | None = None
    exclude: tuple = ()
    seed: int = 0
    calib: Any = None
    input_stats: dict = field(default_factory=dict)
    calib_samples: int | None = None
    recalibrate: bool = False
    damping: float | None = None    # None: spa.score.data.default_damping
    compensation: str = "obs"
    synthetic: str = "auto"
    input_shapes: dict = field(default_factory=dict)
    verify: bool | None = None
    strict: bool = False

    def __post_init__(self):
        object.__setattr__(self, "exclude", tuple(self.exclude or ()))
        object.__setattr__(self, "input_stats", dict(self.input_stats or {}))
        object.__setattr__(self, "input_shapes", {k: tuple(v) for k, v in (self.input_shapes or {}).items()})
        self._check_amounts()
        self._check_choices()

    def _check_amounts(self):
        for name, flag in _RATIOS.items():
            value = getattr(self, name)
            if value is None or (name == "hidden" and value == HIDDEN_AS_RATIO):
                continue
            if not _number(value) or not 0 <= value < 1:
                raise SpaError(f"--{flag} is the fraction removed, in [0, 1); got {value!r}")
        given = {k: getattr(self, k) for k in BUDGET_KINDS if getattr(self, k) is not None}
        for name, value in given.items():
            if not _number(value) or not 0 < value <= 1:
                raise SpaError(f"--{name} is the share of the original to keep, in (0, 1]; got {value!r}")
        if len(given) > 1:
            raise SpaError(f"give one budget, not {' and '.join('--' + k for k in given)}")
        if given and self.ratio is not None:
            raise SpaError("--ratio and a budget (--macs/--params/--latency F) exclude each other")
        if given and (self.head_dims or self.hidden or self.group_width):
            raise SpaError("a budget (--macs/--params/--latency) spends on channels and heads; --head-dims, "
                           "--group-width and --hidden cannot share it yet: give them with --ratio")

    def _check_choices(self):
        if self.criterion is not None and self.criterion not in CRITERIA:
            raise SpaError(f"unknown criterion {self.criterion!r}; choose from {', '.join(CRITERIA)}")
        if self.aggregate not in AGGREGATES:
            raise SpaError(f"--aggregate must be one of {', '.join(AGGREGATES)}, got {self.aggregate!r}")
        if self.allocation not in ALLOCATIONS:
            raise SpaError(f"allocation must be auto, measured, uniform or obs, got {self.allocation!r}")
        if self.allocation == "obs" and self.criterion_used != "obspa":
            raise SpaError(f"--allocate obs prices cuts by OBSPA's compensation: it needs --criterion obspa, "
                           f"not {self.criterion_used}")
        if self.round_to != "auto" and not _count(self.round_to):
            raise SpaError(f"--round-to must be at least 1 or 'auto', got {self.round_to!r}")
        for name in ("steps", "calib_samples"):
            value = getattr(self, name)
            if value is not None and not _count(value):
                raise SpaError(f"--{name.replace('_', '-')} must be at least 1, got {value!r}")
        if self.steps and self.steps > 1 and self.latency is not None:
            raise SpaError("--steps with --latency is not supported: use --macs, or one step")
        if self.compensation not in COMPENSATIONS:
            raise SpaError(f"compensation must be one of {', '.join(COMPENSATIONS)}, got {self.compensation!r}")
        if self.synthetic not in SYNTHETIC:
            raise SpaError(f"synthetic must be one of {', '.join(SYNTHETIC)}, got {self.synthetic!r}")
        if self.damping is not None and (not _number(self.damping) or self.damping <= 0):
            raise SpaError(f"damping must be a positive number, got {self.damping!r}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool):
            raise SpaError(f"--seed must be an integer, got {self.seed!r}")

    def replace(self, **changes) -> "PruneOptions":
        """A validated copy with ``changes``."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------ the defaults, worked out

    @property
    def criterion_used(self) -> str:
        return self.criterion or DEFAULT_CRITERION

    @property
    def may_fall_back(self) -> bool:
        """The default criterion falls back to l1 where the model cannot run on synthetic
        inputs; a criterion the user named never does."""
        return self.criterion is None

    @property
    def budget(self) -> tuple[str, float] | None:
        return next(((k, getattr(self, k)) for k in BUDGET_KINDS if getattr(self, k) is not None), None)

    @property
    def base_ratio(self) -> float:
        """The ratio of every group of a kind not named: structures the user does not name
        are left whole."""
        if self.ratio is not None:
            return self.ratio
        named = any(r is not None for r in (self.heads, self.mlp, self.head_dims, self.hidden, self.group_width))
        return 0.0 if named else DEFAULT_RATIO

    @property
    def chose_ratio(self) -> bool:
        """Whether nothing said how much to remove, so the default ratio applies."""
        return self.ratio is None and self.budget is None and self.base_ratio == DEFAULT_RATIO

    @property
    def hidden_ratio(self) -> float | None:
        if self.hidden == HIDDEN_AS_RATIO:
            return self.ratio if self.ratio is not None else DEFAULT_RATIO
        return self.hidden

    @property
    def round_unit(self) -> int:
        if self.round_to == "auto":   # the CPU's vector width (see benchmarks/round_to.py for what it buys)
            from .runtime import vector_channels
            return vector_channels()
        return self.round_to

    @property
    def allocation_used(self) -> str:
        if self.allocation != "auto":
            return self.allocation
        # benchmarks/allocation.py: measuring where to cut pays for magnitude criteria (l1
        # beats uniform in 8 of 12 cells, 9 of 12 with calibration images: Fashion ResNet
        # at 0.65 MACs 0.38 -> 0.82); for OBSPA, whose compensation repairs an even cut,
        # it is a coin toss (6 of 12 data-free, calibrated within a point). Nor does measuring
        # pay where no BatchNorm steers the synthetic inputs (issue 22, benchmarks/README.md:
        # Fashion CNNs with BatchNorm folded, top-1 at macs=0.5, mean of 3 seeds, uniform vs
        # measured: ResNet 0.731 vs 0.675, VGG 0.848 vs 0.857, mobile net 0.098 vs 0.212)
        # OBSPA: along its own cost curves (obs_costs.py) where its statistics are anchored in
        # real inputs (calibration data, or synthetic images steered by BatchNorm statistics);
        # one ratio elsewhere (the pipeline falls back when the curves say so). SmolLM2 at 20 %
        # of its parameters (benchmarks/lm_smollm2.py), perplexity 28.7 unpruned: calibrated
        # uniform 51.0, obs 46.1; data-free (self-written text) uniform 141.6, obs 231.8. Fashion
        # mobile net at half its MACs, data-free, BatchNorm steering: 0.250 -> 0.731 top-1; with
        # BatchNorm folded (unsteered) VGG 0.843 -> 0.363 (docs/benchmarks.md#where-to-cut).
        return "obs" if self.criterion_used == "obspa" else "measured"

    @property
    def steps_used(self) -> int:
        if self.steps is not None:
            return self.steps
        # benchmarks/steps.py: re-measuring between 3 steps pays for a measured allocation
        # (Fashion VGG l1 at 0.49 MACs: 0.54 -> 0.85 top-1) but not for OBSPA's even cut
        # (within +-4 points at 2-4x the time)
        budget = self.budget
        measured = budget is not None and self.allocation_used == "measured" and budget[0] != "latency"
        return 3 if measured else 1

    def plan_options(self) -> PlanOptions:
        """The first pass's ratios (heads and plain channels; the other kinds have passes of
        their own)."""
        ratios = tuple((k, r) for k, r in (("channels", self.mlp), ("heads", self.heads)) if r is not None)
        return PlanOptions(self.base_ratio, ratios, self.global_rank, self.max_ratio, self.round_unit)

    def pass_options(self, kind: str, ratio: float) -> PlanOptions:
        """A later pass that removes ``ratio`` of one ``kind`` only."""
        return PlanOptions(0.0, ((kind, ratio),), self.global_rank, self.max_ratio, self.round_unit)

    def as_report(self) -> dict:
        """What the report's ``options`` records (the values used, defaults worked out)."""
        out = {"ratio": self.base_ratio, "heads": self.heads, "mlp": self.mlp, "head_dims": self.head_dims,
               "hidden": self.hidden_ratio, "group_width": self.group_width, "criterion": self.criterion_used,
               "global": self.global_rank, "max_ratio": self.max_ratio, "round_to": self.round_unit,
               "exclude": list(self.exclude), "aggregate": self.aggregate, "seed": self.seed,
               "calib": self._calib_name(), "recalibrate": self.recalibrate,
               "compensation": self.compensation, "synthetic": self.synthetic}
        if self.budget is not None:
            kind, target = self.budget
            out["budget"] = {kind: target, "allocation": self.allocation_used}
        return out

    def _calib_name(self) -> str | None:
        if isinstance(self.calib, (str, os.PathLike)):
            return str(self.calib)
        return "given" if self.calib is not None else None


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1
