"""The ``spa sweep`` subcommand: options, checks before any work, table and files."""

from __future__ import annotations

import sys
from pathlib import Path

from ..errors import SpaError

__all__ = ["add_parser", "cmd_sweep"]

DEFAULT_RATIOS = "0.1:0.7:0.1"

EXAMPLES = """examples:
  spa sweep models/demo_cnn.onnx --ratios 0.1:0.7:0.2 --criteria l1,obspa --calib models/demo_calib.npz \\
      --eval models/demo_sample.npz -o sweep/
  spa sweep model.onnx --targets macs=0.8,0.6,0.4 --keep best:macs<=0.6 -o sweep/
  spa sweep model.onnx --ratios 0.2,0.4 --backend serial -o sweep/      # no worker processes
  spa sweep a.onnx b.onnx --ratios 0.3,0.5 -o sweep/    # one pool for both: sweep/a/, sweep/b/
"""


def add_parser(sub, common, positive, formatter):
    from ..options import DEFAULT_CRITERION
    sp = sub.add_parser("sweep", help="prune at many ratios/budgets and criteria; table, CSV, JSON, plot",
                        description="Prune a model (or several: the same cells, run together) at every ratio "
                                    "or budget with every criterion, measure each result (MACs, params, size, "
                                    "latency, quality) and mark the Pareto front. Quality is accuracy with "
                                    "--eval, else agreement with the original on --calib or synthetic inputs.",
                        epilog=EXAMPLES, formatter_class=formatter)
    common(sp, several=True)
    sp.add_argument("-o", "--output", required=True, metavar="DIR",
                    help="directory for sweep.json, sweep.csv, sweep.png and kept models (created if missing); "
                         "with several models, one folder per model inside it, named after the file")
    sp.add_argument("--ratios", metavar="START:STOP:STEP|R1,R2", default=None,
                    help="uniform ratios (fraction of channels removed), STOP included "
                         "(default 0.1:0.7:0.1 when no --targets)")
    sp.add_argument("--targets", action="append", metavar="KIND=V1,V2",
                    help="budgets: share of the original's macs, params or latency to keep (repeatable)")
    sp.add_argument("--criteria", default=DEFAULT_CRITERION, metavar="C1,C2",
                    help="comma-separated criteria (see spa prune --help for what each costs; default "
                         f"{DEFAULT_CRITERION}, as spa prune)")
    sp.add_argument("--calib", metavar="NPZ", help="calibration data: for data-aware criteria and for the "
                    "fidelity measurement (arrays named after the inputs)")
    sp.add_argument("--eval", metavar="NPZ", help="labelled sample (input arrays + 'label'): quality = accuracy")
    sp.add_argument("--keep", action="append", default=[], metavar="best:KEY<=V",
                    help="write the best-quality model whose KEY (macs, params, size or latency, as a share of "
                         "the original) is at most V, as DIR/best-KEY-V.onnx (repeatable)")
    sp.add_argument("--backend", choices=["pool", "serial", "ray"], default="pool",
                    help="where cells run: local worker processes (default), this process, or Ray tasks")
    sp.add_argument("--jobs", type=positive, default=None,
                    help="worker processes of the pool (default: the CPU count, at most one per cell)")
    sp.add_argument("--address", metavar="HOST:PORT",
                    help="with --backend ray: the cluster to join (default: a local Ray instance)")
    sp.add_argument("--runs", type=positive, default=20, help="latency runs per cell (default 20)")
    sp.add_argument("--samples", type=positive, default=64,
                    help="inputs for the fidelity measurement: first N --calib samples or N synthetic (default 64)")
    from .args import add_pruning_options
    add_pruning_options(sp)
    sp.add_argument("-q", "--quiet", action="store_true", help="no progress lines and no table")
    sp.set_defaults(func=cmd_sweep)
    return sp


def cmd_sweep(args) -> int:
    from ..sweep import Progress, SweepConfig, run_sweeps
    from ..sweep.report import PLOT_MISSING, have_matplotlib
    from .args import pruning_options

    # every option is checked before the model is read or a worker started
    options = pruning_options(args)
    cells, keeps = _cells_and_keeps(args)
    plot = have_matplotlib()
    models = [Path(m) for m in args.models]
    dirs, files = _output_plan(args, models, keeps, plot)
    if args.address and args.backend != "ray":
        raise SpaError("--address joins a Ray cluster: give it with --backend ray")

    configs = [SweepConfig(str(m), args.calib, args.eval, options, args.runs, args.samples) for m in models]
    progress = Progress(len(cells) * len(models), quiet=args.quiet)
    try:
        sweeps = run_sweeps(configs, cells, args.backend, args.jobs, progress.cell_done, args.address)
    finally:
        progress.close()
    results = [(sweep, d, f, *_kept(config, sweep, keeps))
               for config, sweep, d, f in zip(configs, sweeps, dirs, files)]
    _write(results, Path(args.output), several=len(models) > 1)
    if not args.quiet:
        _print(results, len(cells), several=len(models) > 1)
    if not plot:
        print(f"spa: note: {PLOT_MISSING}", file=sys.stderr)
    return 0


def _cells_and_keeps(args) -> tuple[list, list]:
    from ..sweep import cells_of, parse_keep, parse_ratios, parse_targets
    targets = [t for spec in args.targets or [] for t in parse_targets(spec)]
    ratios = parse_ratios(args.ratios) if args.ratios else [] if targets else parse_ratios(DEFAULT_RATIOS)
    cells = cells_of([c.strip() for c in args.criteria.split(",") if c.strip()], ratios, targets)
    return cells, [parse_keep(k) for k in args.keep]


def _output_plan(args, models: list[Path], keeps: list, plot: bool) -> tuple[list, list]:
    """Each model's folder and files, checked against every file the sweep reads (the models'
    external data once they are read) and kept inside -o, before any work."""
    from ..loading.files import check_inside
    from ..sweep.report import check_output_dir, output_files
    from .args import read_checked
    out_dir = Path(args.output)
    stems = [m.stem for m in models]
    odd = [str(m) for m, s in zip(models, stems) if len(models) > 1 and s in ("", ".", "..")]
    if odd:
        raise SpaError(f"{odd[0]}: spa sweep of several models names a folder after each file, and this "
                       "name makes none; rename the file")
    if len(set(stems)) != len(stems):
        raise SpaError("spa sweep of several models writes a folder per model, named after the file: "
                       f"give files with different names ({', '.join(sorted(s for s in stems if stems.count(s) > 1))})")
    dirs = [out_dir] if len(models) == 1 else [out_dir / s for s in stems]
    files = [output_files(d, keeps, plot) for d in dirs]
    for f in files:
        for role, path in f.items():
            check_inside(out_dir, path, role)
    readers = {f"the {flag} file": Path(p) for flag, p in (("--calib", args.calib), ("--eval", args.eval)) if p}
    inputs = {**({"the input model": models[0]} if len(models) == 1 else
                 {f"the input model {m}": m for m in models}), **readers}
    if len(models) > 1:
        check_output_dir(out_dir, {}, inputs)
    for d, f in zip(dirs, files):
        if len(models) == 1 or out_dir.is_dir():   # else the folders are made inside a new one
            check_output_dir(d, f, inputs)
    loaded = [read_checked(m, {}, readers) for m in models]
    for d, f in zip(dirs, files):
        if d.is_dir():   # the models' external data is known only now
            check_output_dir(d, f, {**inputs, **{k: v for one in loaded for k, v in one.files.items()}})
    return dirs, files


def _kept(config, sweep, keeps: list) -> tuple[dict, list]:
    """The ``--keep`` models (pruned again) and the rows they were chosen from."""
    from ..sweep import Cell, best_under, rerun
    keep_models, chosen = {}, []
    for key, bound in keeps:
        i = best_under(sweep, key, bound)
        if i is None:
            noisy = sum(1 for r in sweep.rows if r.get("latency_noisy") and key == "latency"
                        and r["latency_ratio"] <= bound)
            raise SpaError(f"--keep best:{key}<={bound:g}: no cell of {config.model} has {key} at most "
                           f"{bound:g} of the original; " + (
                               f"{noisy} cell(s) would, but their latency is noisy: give more --runs or a "
                               "quieter machine" if noisy else "add larger ratios or smaller --targets"))
        row = sweep.rows[i]
        keep_models[f"--keep best:{key}<={bound:g}"] = rerun(config, Cell(row["criterion"], row["kind"],
                                                                          row["value"]))
        chosen.append((key, bound, row))
    return keep_models, chosen


def _write(results: list, out_dir: Path, several: bool):
    """Every model's files; when one fails, what the others wrote goes too."""
    from ..sweep.report import write_all
    made = several and not out_dir.exists()
    if made:
        out_dir.mkdir()
    written: list = []                              # (directory, files) of each model written
    try:
        for sweep, d, f, keep_models, _ in results:
            written.append((d, write_all(sweep, d, f, keep_models)))   # removes its own files if it fails
    except BaseException:
        for d, files in written:                    # and the models before it go too (external data included)
            for path in files:
                path.unlink(missing_ok=True)
            if d != out_dir and d.is_dir() and not any(d.iterdir()):
                d.rmdir()
        if made and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise


def _print(results: list, cells: int, several: bool):
    from ..sweep.report import format_sweep, keep_name
    for sweep, d, f, _, chosen in results:
        if several:
            print(f"== {sweep.config['model']}")
        print(format_sweep(sweep))
        for key, bound, row in chosen:
            print(f"kept: {d / keep_name(key, bound)} = {row['criterion']} {row['kind']}={row['value']:g} "
                  f"({key} {row[key + '_ratio']:.3f}"
                  f" of the original, {sweep.quality} {row[sweep.quality]:.4f})")
        print(f"wrote {', '.join(str(p) for p in f.values() if p.suffix != '.onnx')} "
              f"({cells} cells in {sweep.seconds:.1f}s, backend {sweep.backend}, {sweep.jobs} job(s))")
