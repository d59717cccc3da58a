"""How calibrated OBSPA uses the data, chosen on data it did not see.

Refitting each group to the original's outputs on the calibration data is the best use of
real images (Fashion-MNIST ResNet at 49 % fewer MACs: 0.92 where one pass keeps less), but on
few sentences it overfits: MiniLM at ratio 0.1 with 30 sentences kept a mean cosine of 0.76
refit, 0.95 from one pass of statistics, 0.95 without data at all. Which one wins depends on
the model and the data. So the default use is tried on three quarters of the samples against
pruning without data, each judged by how far it moves the outputs of the held-out quarter;
where the data did worse, the better of the other uses is taken. The use chosen then runs on
all samples: data cannot make the result worse (on held-out samples) than no data."""

from __future__ import annotations

import numpy as np

from .data import BatchLayout, Calibration
from .obspa import SEQUENTIAL_BUDGET, data_aware_plan
from ..progress import phase

# (name, calibration data or synthetic, refit group after group)
USES = (("refit", True, True), ("one pass", True, False), ("data-free", False, None))


def choose_use(a, removals: list, calibration: Calibration, damping: float,
               macs: int, compensation: str = "obs", chosen_by_obs: bool = False) -> tuple[str | None, dict]:
    """How to use the calibration data (a name of ``USES``), with the held-out error of each
    use tried; None when the data is too small to hold samples out.

    The default use (refit where ``SEQUENTIAL_BUDGET`` allows, else one pass) stays unless it
    moves the held-out outputs more than pruning without data; then the better of the other
    two. Only a guard: on crepe tiny (ratio 0.3) refitting keeps 0.98 pitch accuracy against
    0.96 from one pass, though one pass moved 32 held-out outputs less (0.23 vs 0.33)."""
    from ..runtime import any_session

    split = calibration.split(a.model, a.shapes.input_shapes)
    if split is None:
        return None, {"skipped": "fewer than 8 samples: none held out"}
    fit, held = split
    reference = any_session(a.model)
    want = [reference.run(None, feeds) for feeds in held]
    layout = BatchLayout.of(a.model, a.shapes.input_shapes)
    samples = sum(layout.count(b) for b in fit.batches(a.model, a.shapes.input_shapes))
    refit_fits = sum(1 for r in removals if len(r)) * samples * macs <= SEQUENTIAL_BUDGET
    default = "refit" if refit_fits else "one pass"
    errors = {}

    def error(name):
        _, with_data, refit = next(u for u in USES if u[0] == name)
        source = fit if with_data else calibration.without_data()
        with phase(f"trying {name} on held-out samples"):
            errors[name] = _held_out_error(a, removals, source, refit, damping, macs, held, want, compensation,
                                           chosen_by_obs)
        return errors[name]

    best = default
    if error(default) > error("data-free"):
        others = [u[0] for u in USES if u[0] not in (default, "data-free") and (u[0] != "refit" or refit_fits)]
        best = min(others + ["data-free"], key=lambda name: errors.get(name) if name in errors else error(name))
    return best, {"chosen": best, "default": default, "held_out_samples": sum(layout.count(f) for f in held),
                  "relative_error": {k: float(f"{v:.4g}") for k, v in errors.items()}}


def _held_out_error(a, removals, source: Calibration, refit, damping, macs, held, want,
                    compensation: str = "obs", chosen_by_obs: bool = False) -> float:
    """Prune with OBSPA on ``source`` and measure the pruned model on the held-out feeds."""
    from ..plan.plan import make_plan
    from ..rewrite.apply import rewrite
    from ..runtime import any_session
    dplan = data_aware_plan(a.model, a.dep, a.groups, [len(r) for r in removals], "obspa", source,
                            a.shapes.input_shapes, damping=damping, chosen=removals, macs=macs, refit=refit,
                            compensation=compensation, chosen_by_obs=chosen_by_obs)
    chosen = [r if r is not None else old for r, old in zip(dplan.removals, removals)]
    pruned = rewrite(a.model, make_plan(a, chosen, updates=dplan.weights, new_biases=dplan.new_biases))
    return _relative_error(any_session(pruned), held, want)


def _relative_error(sess, feeds: list[dict], want: list[list[np.ndarray]]) -> float:
    """Squared distance of all float outputs to the original's, over their squared norm."""
    num = den = 0.0
    for f, w in zip(feeds, want):
        for got, ref in zip(sess.run(None, f), w):
            if ref.dtype.kind == "f" and ref.size:
                num += float(np.sum((got.astype(np.float64) - ref) ** 2))
                den += float(np.sum(ref.astype(np.float64) ** 2))
    return num / den if den else (0.0 if num == 0 else float("inf"))
