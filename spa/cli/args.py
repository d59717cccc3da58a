"""Arguments every ``spa`` subcommand that prunes shares: number types that fail with one
line, the pruning options and their ``PruneOptions``, and reading a model whose outputs are
checked against everything it reads."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..analysis import Loaded
from ..errors import SpaError
from ..loading.files import check_outputs
from ..loading.shapes import parse_input_shapes
from ..options import DEFAULT_ROUND_TO, HIDDEN_AS_RATIO, PruneOptions

__all__ = ["read_checked", "add_pruning_options", "pruning_options", "ratio_arg", "share_arg", "latency_arg",
           "positive_arg", "round_to_arg"]


def read_checked(model_path, outputs: dict, readers: dict | None = None) -> Loaded:
    """Read the model, checking the paths the run writes against every file it reads: once
    before reading anything (nothing a typo could destroy), and again with the model's
    external data files known."""
    readers = {"the input model": Path(model_path), **(readers or {})}
    check_outputs(outputs, readers)
    loaded = Loaded.read(model_path)
    check_outputs(outputs, {**readers, **loaded.files})
    return loaded


def _input_stats(specs: list[str] | None) -> dict:
    """``[name=]MEAN,STD`` with MEAN/STD scalars or ``a:b:c`` per channel."""
    out = {}
    for spec in specs or []:
        name, _, values = spec.rpartition("=")
        try:
            mean, std = (np.array([float(v) for v in part.split(":")]) for part in values.split(","))
        except ValueError:
            raise SpaError(f"bad --input-stats {spec!r}; expected [name=]MEAN,STD (per channel: m1:m2:m3,s1:s2:s3)") from None
        out[name or "*"] = (mean if mean.size > 1 else float(mean[0]), std if std.size > 1 else float(std[0]))
    return out


def _number(text: str, convert, ok, why: str):
    """An option value, or argparse's one-line complaint (comparisons also refuse nan)."""
    try:
        value = convert(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not {'an integer' if convert is int else 'a number'}: {text!r}") from None
    if not ok(value):
        raise argparse.ArgumentTypeError(f"{why}, got {text}")
    return value


def ratio_arg(text: str) -> float:
    return _number(text, float, lambda v: 0 <= v < 1, "must be in [0, 1)")


def share_arg(text: str) -> float:
    return _number(text, float, lambda v: 0 < v <= 1, "is the share of the original to keep, in (0, 1]")


def latency_arg(text: str):
    return True if text == "on" else share_arg(text)  # "on": a bare --latency, see _bare_latency


def positive_arg(text: str) -> int:
    return _number(text, int, lambda v: v >= 1, "must be at least 1")


def round_to_arg(text: str):
    return "auto" if text == "auto" else positive_arg(text)


def add_pruning_options(sp):
    """The options of how to prune that ``spa prune`` and ``spa sweep`` share (a sweep's cells
    set the criterion and the amount)."""
    sp.add_argument("--allocate", choices=["auto", "measured", "uniform", "obs"], default="auto",
                    help="how a budget is spent: where the measured output change per MAC saved is least, "
                         "one ratio for every group, or where OBSPA's compensated error per MAC saved is least "
                         "(obs); auto (default): measured; for obspa obs with --calib or BatchNorm-steered images, else uniform")
    sp.add_argument("--steps", type=positive_arg, default=None,
                    help="prune in N steps, re-scoring and re-compensating in between (default: 3 for a measured "
                         "--macs/--params budget, else 1)")
    sp.add_argument("--heads", type=ratio_arg, help="fraction of whole attention heads to remove")
    sp.add_argument("--mlp", type=ratio_arg, help="fraction of plain channels (MLP neurons, conv channels)")
    sp.add_argument("--head-dims", type=ratio_arg, help="fraction of the dims of every head (second pass)")
    sp.add_argument("--group-width", type=ratio_arg,
                    help="fraction of the channels of every group of a grouped conv, the same positions in each "
                         "group, the group count kept (a pass of its own)")
    sp.add_argument("--hidden", type=ratio_arg, nargs="?", const=HIDDEN_AS_RATIO,
                    help="also prune the residual width through LayerNorm/RMSNorm (inexact: the output "
                         "error is reported); a bare --hidden uses --ratio")
    sp.add_argument("--aggregate", choices=["sum", "mean", "max"], default="sum",
                    help="how a group combines its members' scores")
    sp.add_argument("--global", dest="global_rank", action="store_true",
                    help="rank all groups' channels together on normalized scores")
    sp.add_argument("--max-ratio", type=ratio_arg, default=0.9, help="per-group cap with --global")
    sp.add_argument("--round-to", type=round_to_arg, default=DEFAULT_ROUND_TO, metavar="N|auto",
                    help=f"keep a multiple of N channels, counted in filters: a GroupNorm group of C/G filters "
                         f"counts C/G (default {DEFAULT_ROUND_TO}; 1 = off; auto = this "
                         "CPU's float32 vector width: 16 with AVX-512, 8 with AVX2, else 4)")
    sp.add_argument("--seed", type=int, default=0, help="seed of the random criterion and synthetic inputs")
    sp.add_argument("--verify", dest="verify", action="store_true", default=None,
                    help="run the equivalence oracle (default: when the model is small)")
    sp.add_argument("--no-verify", dest="verify", action="store_false",
                    help="skip the equivalence oracle (large models: it builds two onnxruntime sessions)")
    sp.add_argument("--input-stats", action="append", metavar="[NAME=]MEAN,STD",
                    help="statistics of synthetic inputs when there is no --calib (default 0,1)")
    sp.add_argument("--calib-samples", type=positive_arg, default=None, metavar="N",
                    help="synthetic samples without --calib (default 64); with --calib, use at most N of its "
                         "samples, one from each of N clusters of the model's outputs (default: all)")
    sp.add_argument("--recalibrate", action="store_true",
                    help="after pruning, refit normalization scales and biases (BatchNorm, InstanceNorm, LayerNorm) "
                         "to the original's outputs, and with magnitude criteria correct consumer biases from "
                         "activation means; closed form, on --calib or synthetic inputs")
    sp.add_argument("--compensation", choices=("obs", "merge", "lsq"), default="obs",
                    help="without --calib, how OBSPA compensates removed channels: obs (default, OBS on synthetic "
                         "inputs), merge (into the most similar kept channel, from the weights alone) or lsq "
                         "(least squares over the kept channels, from the weights alone); the weight-only ones "
                         "apply where they are exact for proportional filters (ReLU-type chains), OBS elsewhere")
    sp.add_argument("--synthetic", choices=("auto", "noise", "invert"), default="auto",
                    help="without --calib, what OBSPA's statistics come from on an image classifier whose "
                         "BatchNorms were folded away: invert (images the model assigns to each of its classes, "
                         "found by gradient descent; needs pip install \"spa[invert]\"), noise (dead-leaves "
                         "images), auto (default: invert where it is installed and the model fits its budget)")
    sp.add_argument("--strict", action="store_true", help="fail if any node blocks pruning")


def pruning_options(args, **values) -> PruneOptions:
    """The ``PruneOptions`` of parsed arguments (``add_pruning_options`` and, for prune, the
    amount and criterion), checked before any file is read; ``values`` add or override."""
    fields = dict(heads=args.heads, mlp=args.mlp, head_dims=args.head_dims, hidden=args.hidden,
                  group_width=args.group_width, aggregate=args.aggregate, global_rank=args.global_rank,
                  max_ratio=args.max_ratio, round_to=args.round_to, allocation=args.allocate, steps=args.steps,
                  exclude=args.exclude, seed=args.seed, input_stats=_input_stats(args.input_stats),
                  calib_samples=args.calib_samples, recalibrate=args.recalibrate, verify=args.verify,
                  compensation=args.compensation, synthetic=args.synthetic,
                  strict=args.strict, input_shapes=parse_input_shapes(args.input_shape) or {})
    for name in ("ratio", "criterion", "macs", "params"):
        if hasattr(args, name):
            fields[name] = getattr(args, name)
    if getattr(args, "latency", None) not in (None, True):   # a bare --latency only measures
        fields["latency"] = args.latency
    return PruneOptions(**{**fields, **values})
