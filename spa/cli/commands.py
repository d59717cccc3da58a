"""The ``spa`` command: prune, inspect, bench, sweep (spa/cli/sweep.py)."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

from ..errors import SpaError
from ..score import CRITERIA
from ..analysis import Loaded, analyze
from ..pipeline import prune
from ..plan.landing import TOLERANCE as LANDING_TOLERANCE
from ..loading.data_files import accuracy, calibration_data, eval_data as read_eval
from ..loading.files import atomic_write
from ..loading.model import normalize, output_paths
from ..loading.scopes import all_nodes
from .args import (add_pruning_options, latency_arg, positive_arg, pruning_options, ratio_arg, read_checked,
                   share_arg)
from ..progress import StageProgress
from ..loading.shapes import graph_inputs, parse_input_shapes
from ..verify.oracle import describe as describe_verify
from ..stop import Terminated, stopping

__all__ = ["main"]


def _human(n: float, unit: str = "") -> str:
    for suffix in ("", "K", "M", "G", "T"):
        if abs(n) < 1000:
            return f"{n:.3g}{suffix}{unit}" if suffix or unit else f"{n:.4g}"
        n /= 1000
    return f"{n:.3g}P{unit}"


def format_table(rows: list[tuple[str, float | None, float | None]], fmt) -> str:
    # "after/before", not "ratio": --ratio is the fraction removed, this is the fraction kept
    lines = [f"{'':<14}{'before':>12}{'after':>12}{'after/before':>14}"]
    for name, before, after in rows:
        if before is None or after is None:
            continue
        ratio = f"{after / before:.3f}" if before else "-"
        lines.append(f"{name:<14}{fmt[name](before):>12}{fmt[name](after):>12}{ratio:>14}")
    return "\n".join(lines)


FORMATS = {
    "params": _human, "MACs": _human, "file size": lambda v: _human(v, "B"),
    "latency": lambda v: f"{v * 1e3:.3g} ms", "accuracy": lambda v: f"{v:.4f}",
}


CRITERION_HELP = ("how channels are ranked. From the weights alone, milliseconds: l1, l2 (magnitude), random, "
                  "bn-scale (|BatchNorm scale|). From activations on --calib or synthetic inputs: dead (channels "
                  "that never fire; one onnxruntime pass), activation (mean activation magnitude; a pass per "
                  "layer), obspa (Optimal Brain Surgeon: removes and compensates the kept weights, best without "
                  "fine-tuning; a Hessian per layer, from synthetic inputs when there is no --calib). "
                  "Default obspa (l1 where the model cannot run on synthetic inputs)")

PRUNE_EXAMPLES = """examples:
  spa prune model.onnx -o small.onnx --ratio 0.3                      # 30% of every group's channels, OBSPA, no data
  spa prune model.onnx -o small.onnx --macs 0.5 --criterion obspa --calib data.npz --eval test.npz
  spa prune bert.onnx -o bert.small.onnx --heads 0.25 --mlp 0.3 --report report.json
"""


def cmd_prune(args) -> int:
    options = pruning_options(args)
    outputs = {**output_paths(args.output), **({"--report": Path(args.report)} if args.report else {}),
               **({"--plan": Path(args.plan), "--plan arrays": Path(args.plan + ".npz")} if args.plan else {})}
    loaded = read_checked(args.model, outputs, {f"the {flag} file": Path(p) for flag, p in
                                                 (("--calib", args.calib), ("--eval", args.eval)) if p})
    eval_data = read_eval(args.eval, loaded.model) if args.eval else None
    if args.calib:
        options = options.replace(calib=calibration_data(args.calib, loaded.model))
    with StageProgress(enabled=not args.quiet) as on_stage:
        result = prune(loaded, options=options, on_stage=on_stage)
        if args.calib:
            result.report["options"]["calib"] = args.calib
        rep = result.report
        extra = []
        if args.latency:
            from ..verify.bench import latency
            on_stage("measure latency")
            before, after = latency([result.original, result.model], rep["input_shapes"], runs=args.runs)
            rep["before"]["latency_s"], rep["after"]["latency_s"] = before, after
            if rep.get("budget", {}).get("kind") == "latency" and before:
                # one figure: the search's own timing was shorter; the table's is the one to believe
                b = rep["budget"]
                b["searched"], b["achieved"] = b["achieved"], after / before
                b["met"] = b["achieved"] <= b["target"] * 1.05
            extra.append(("latency", before, after))
        if eval_data is not None:
            on_stage("evaluate")
            rep["before"]["accuracy"] = accuracy(result.original, eval_data)
            rep["after"]["accuracy"] = accuracy(result.model, eval_data)
            extra.append(("accuracy", rep["before"]["accuracy"], rep["after"]["accuracy"]))
        on_stage("save")
        written = _save_all(result, args.output, args.report, args.plan)
    rows = [("params", rep["before"]["params"], rep["after"]["params"]),
            ("MACs", rep["before"]["macs"], rep["after"]["macs"]),
            ("file size", rep["before"].get("file_bytes"), rep["after"].get("file_bytes"))] + extra
    if _no_target(args):   # the default cut is large: say so rather than leave it to be guessed
        where = "all channels, ranked together" if args.global_rank else "every group's channels"
        print(f"spa: note: no --ratio or budget given: removed {rep['options']['ratio']:.0%} of {where} "
              f"(--ratio {rep['options']['ratio']:g}); give --ratio, --macs, --params or --latency F",
              file=sys.stderr)
    if rep.get("probe"):
        from ..loading.probe import describe
        print(f"spa: note: {_one_line(describe(rep['probe']))}", file=sys.stderr)
    if (rep.get("data") or {}).get("fallback"):
        print(f"spa: note: OBSPA could not run this model on synthetic inputs "
              f"({_one_line(rep['data']['reason'])}): channels chosen by {rep['data']['fallback']}", file=sys.stderr)
    if "skipped" in rep.get("verify", {}):
        print(f"spa: warning: not verified: {_one_line(rep['verify']['skipped'])}", file=sys.stderr)
    if not args.quiet:
        print(f"{args.model} -> {written[0]}")
        for line in removal_summary(rep, args.ratio):
            print(line)
        print(format_table(rows, FORMATS))
        if "skipped" in rep.get("verify", {}):
            print("not verified (see the warning above)")
        elif rep.get("verify", {}).get("exact") is False:
            v = rep["verify"]
            print(f"inexact (hidden width): output error max abs {v['max_abs_error']:.3g}, relative "
                  f"{v['max_rel_error']:.3g}, mean cosine {v['mean_cosine']:.4f}")
        elif "verify" in rep:
            print(f"verified: pruned == masked original ({describe_verify(rep['verify'])})")
        if "budget" in rep:
            _print_budget(rep)
        for b in rep["blocked_nodes"][:10]:
            print(f"blocked: {b['reason']}")
        if len(rep["blocked_nodes"]) > 10:
            print(f"blocked: ... and {len(rep['blocked_nodes']) - 10} more nodes (see --report)")
    return 0


def _no_target(args) -> bool:
    """Neither a ratio, a structure ratio nor a budget: spa.prune's default ratio applies."""
    given = (args.ratio, args.macs, args.params, args.heads, args.mlp, args.head_dims, args.hidden,
             args.group_width, args.latency if args.latency is not True else None)
    return all(v is None for v in given)


NOUNS = {"channels": "channels", "heads": "attention heads", "head-dims": "head dims", "hidden": "hidden channels",
         "group-width": "channels of every conv group"}


def removal_summary(rep: dict, ratio: float | None = None) -> list[str]:
    """What was removed, per kind, as counts and the fraction actually removed (rounding to
    --round-to and the minimum kept per group make it differ from --ratio), then the groups."""
    totals: dict = {}
    for g in rep["groups"]:
        t = totals.setdefault(g["kind"], [0, 0, 0, 0])
        t[0] += g["removed"]
        t[1] += g["channels"]
        t[2] += 1
        t[3] += bool(g["removed"])
    parts = [f"{removed} of {total} {NOUNS.get(kind, kind)} ({removed / total:.1%}) in {cut} of {n} groups"
             for kind, (removed, total, n, cut) in sorted(totals.items()) if total]
    lines = [f"removed: {'; '.join(parts) if parts else 'nothing (no prunable group)'}"]
    chan = totals.get("channels")
    if ratio and chan and chan[1] and abs(chan[0] / chan[1] - ratio) > 0.02:
        lines[0] += (f" -- --ratio {ratio:g} asked for {ratio:.0%}: each group keeps a multiple of --round-to "
                     f"{rep['options']['round_to']} channels (at least one)")
    lines.append(f"groups: {len(rep['groups'])} prunable, {sum(t[3] for t in totals.values())} cut, "
                 f"{len(rep['blocked'])} left whole (blocked)")
    return lines


def _print_budget(rep):
    b = rep["budget"]
    missed = "" if b["met"] else " (not met: " + b.get("reason", "the caps and pinned kinds allow no more") + ")"
    if b["met"] and b.get("landed") is False:
        missed = f" (not within {LANDING_TOLERANCE:.0%}: {b.get('reason', 'no reachable point is closer')})"
    off = f"; {len(b['off_round'])} group(s) off --round-to to land" if b.get("off_round") else ""
    print(f"budget: {b['kind']} {b['target']:.3g} of the original -> {b['achieved']:.3g}{missed}{off}"
          + (f"; the cuts moved the outputs by {b['output_change']:.3g} (mean cosine distance before any "
             f"compensation, on {b['measured_on']}; where to cut is decided on these)" if "output_change" in b
             else ""))
    cut = sorted((g for g in rep["groups"] if g["channels"]), key=lambda g: g["removed"] / g["channels"])
    for title, chosen in (("cut most", cut[::-1][:5]), ("cut least", cut[:5])):
        print(f"{title}: " + ", ".join(f"{group_label(g)} (removed {g['removed']} of {g['channels']})"
                                        for g in chosen))


def group_label(g: dict) -> str:
    """A group as a person knows it: its first layer (and how many more), else its first weight."""
    layers = g.get("layers") or []
    if layers:
        return layers[0] + (f" +{len(layers) - 1} more" if len(layers) > 1 else "")
    return (g["members"] or [f"group {g['id']}"])[0]


def _save_all(result, output, report_path, plan_path=None) -> list[Path]:
    """The model, then the plan and the report; if one cannot be written the others go too,
    so a failed run leaves nothing behind."""
    from ..plan.plan_file import prepare_plan, write_prepared
    plan = prepare_plan(result, plan_path) if plan_path else None   # refuses before anything is written
    written = []
    try:
        result.save(output)
        written = [Path(p) for p in result.report["after"]["files"]]
        if plan is not None:
            written += write_prepared(plan)
        if report_path:
            atomic_write(report_path, lambda tmp: _dump_json(tmp, result.report))
    except BaseException:
        for f in written:
            if f.is_file():
                f.unlink()
        raise
    return written


def _dump_json(path, obj):
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def cmd_inspect(args) -> int:
    model = read_checked(args.model, {"--graph": Path(args.graph)}) if args.graph else args.model
    a = analyze(model, parse_input_shapes(args.input_shape), args.exclude, args.attention,
                    conv_groups=args.conv_groups)
    summary = a.summary()
    if args.graph:
        import networkx as nx
        graph = a.graph
        atomic_write(args.graph, lambda tmp: nx.write_graphml(graph, tmp))
        print(f"dependency graph: {graph.number_of_nodes()} spaces/operators, "
              f"{graph.number_of_edges()} couplings -> {args.graph}", file=sys.stderr)
    if args.json:
        print(json.dumps(summary, indent=1))
        return 0
    inside = sum(1 for _ in all_nodes(a.model.graph)) - len(a.model.graph.node)
    print(f"{args.model}: {len(a.model.graph.node)} nodes"
          f"{f' (and {inside} inside If/Loop/Scan bodies)' if inside else ''}, {len(a.groups)} prunable groups, "
          f"{len(a.blocked)} blocked groups, {len(a.dep.blocked_nodes)} blocked nodes")
    for g in summary["groups"]:
        members = ", ".join(g["members"][:6]) + (", ..." if len(g["members"]) > 6 else "")
        span = ""
        if g["span"] > 1:
            span = (f" (each = {g['span']} query heads: grouped-query attention)" if g["kind"] == "heads" else
                    f" (each = {g['span']} dims of a head: RoPE pairs)" if g["kind"] == "head-dims" else "")
        print(f"  group {g['id']:>4}: {g['channels']:>5} {g['kind']:<9}{span} {members}")
    for g in summary["blocked"]:
        members = ", ".join(g["members"][:4]) + (", ..." if len(g["members"]) > 4 else "")
        print(f"  blocked {g['id']:>3}: {g['channels']:>5} channels  {members}  <- {g['reason']}")
    for b in summary["blocked_nodes"]:
        print(f"  node {b['node']!r} ({b['op']}): {b['reason']}")
    return 0


def cmd_bench(args) -> int:
    from ..verify.bench import latency
    from ..verify.metrics import count_macs, count_params
    from ..loading.probe import infer_shapes
    loaded = [Loaded.read(p) for p in (args.model, args.pruned)]
    models = [normalize(m.model, copy=False) for m in loaded]
    signatures = [[(i.name, len(i.type.tensor_type.shape.dim)) for i in graph_inputs(m)] for m in models]
    if signatures[0] != signatures[1]:
        raise SpaError(f"{args.model} and {args.pruned} have different inputs ({signatures[0]} vs {signatures[1]}); "
                       "spa bench compares a model with its pruned copy")
    overrides = parse_input_shapes(args.input_shape)
    shapes = [infer_shapes(m, overrides, want_values=False) for m in models]
    if shapes[0].input_shapes != shapes[1].input_shapes:
        raise SpaError(f"{args.model} and {args.pruned} take inputs of different shapes ({shapes[0].input_shapes} vs "
                       f"{shapes[1].input_shapes}); spa bench compares a model with its pruned copy")
    try:
        lat = latency(models, shapes[0].input_shapes, runs=args.runs, threads=args.threads, provider=args.provider)
    except SpaError:
        raise
    except Exception as e:  # noqa: BLE001 - onnxruntime's errors share no base class
        raise SpaError(f"onnxruntime cannot run these models on the same inputs "
                       f"({str(e).splitlines()[0][:200] if str(e) else type(e).__name__})") from None
    sizes = [sum(os.path.getsize(f) for f in m.files.values()) for m in loaded]
    rows = [("params", count_params(models[0]), count_params(models[1])),
            ("MACs", count_macs(models[0], shapes[0]), count_macs(models[1], shapes[1])),
            ("file size", sizes[0], sizes[1]),
            ("latency", lat[0], lat[1])]
    print(format_table(rows, FORMATS))
    return 0


class _Parser(argparse.ArgumentParser):
    """Usage mistakes get one line, like every other error."""

    def error(self, message):
        print(f"spa: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="spa", description="Structurally prune ONNX models: remove whole channels and attention "
                                         "heads and write a smaller ONNX model with the same inputs and outputs.")
    p.add_argument("-v", "--verbose", action="store_true", help="log what each stage does")
    from .. import __version__
    p.add_argument("--version", action="version", version=f"spa {__version__}", help="print the version and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser, metavar="COMMAND",
                           help="prune, inspect, bench or sweep (spa COMMAND --help for its options)")

    def common(sp, several=False):
        if several:
            sp.add_argument("models", nargs="+", metavar="model", help="input .onnx file(s)")
        else:
            sp.add_argument("model", help="input .onnx file")
        sp.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...",
                        help="fix an input's symbolic dims (repeatable)")
        sp.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="never prune tensors or nodes whose name matches (fnmatch; repeatable)")

    sp = sub.add_parser("prune", help="prune a model", epilog=PRUNE_EXAMPLES,
                        formatter_class=argparse.RawDescriptionHelpFormatter,
                        description="Prune a model, check it against the original and print what changed.")
    common(sp)
    sp.add_argument("-o", "--output", required=True, help="output .onnx file (never the input)")
    sp.add_argument("--ratio", type=ratio_arg, default=None,
                    help="fraction of channels removed from every group (default 0.5, or 0 for the "
                         "structures not named when --heads/--mlp/--head-dims is given)")
    sp.add_argument("--macs", type=share_arg, metavar="F", help="keep this share of the MACs, cut where it hurts least")
    sp.add_argument("--params", type=share_arg, metavar="F", help="keep this share of the weights (file size)")
    sp.add_argument("--criterion", choices=CRITERIA, default=None, help=CRITERION_HELP)
    sp.add_argument("--calib", metavar="NPZ", help="calibration data for data-aware criteria and "
                    "--recalibrate: arrays named after the inputs, first axis = samples")
    add_pruning_options(sp)
    sp.add_argument("--report", metavar="JSON", help="write the full report as JSON")
    sp.add_argument("--plan", metavar="JSON", help="also write the plan: per tensor of the original, the kept "
                    "indices and value changes (large ones in JSON.npz), for spa.torch.apply_plan")
    sp.add_argument("--latency", type=latency_arg, nargs="?", const=True, default=None, metavar="F",
                    help="keep this share of the onnxruntime latency (measured here); a bare --latency only "
                         "measures it before and after")
    sp.add_argument("--runs", type=positive_arg, default=30, help="latency runs")
    sp.add_argument("--eval", metavar="NPZ", help="labelled sample (input arrays + 'label'): report accuracy")
    sp.add_argument("-q", "--quiet", action="store_true", help="print nothing but warnings and errors")
    sp.set_defaults(func=cmd_prune)

    sp = sub.add_parser("inspect", help="show the coupled groups and what blocks what")
    common(sp)
    sp.add_argument("--json", action="store_true", help="print the groups and blockers as JSON")
    sp.add_argument("--attention", choices=["heads", "head-dims"], default="heads",
                    help="show attention splits as whole heads or as head dims")
    sp.add_argument("--conv-groups", choices=["auto", "width"], default="auto",
                    help="show a grouped conv's channels as the larger of groups and per-group width (auto, "
                         "what --ratio prunes) or as the per-group width (what --group-width prunes)")
    sp.add_argument("--graph", metavar="OUT.graphml",
                    help="also write the dependency graph (tensor axes, couplings, group ids) as GraphML")
    sp.set_defaults(func=cmd_inspect)

    sp = sub.add_parser("bench", help="params, MACs, file size and latency of two models")
    sp.add_argument("model", help="the original .onnx file")
    sp.add_argument("pruned", help="its pruned copy (same inputs)")
    sp.add_argument("--input-shape", action="append", metavar="NAME=D0,D1,...",
                    help="fix an input's symbolic dims (repeatable)")
    sp.add_argument("--runs", type=positive_arg, default=50, help="timed runs of each model, interleaved (default 50)")
    sp.add_argument("--threads", type=positive_arg, default=1, help="onnxruntime intra-op threads (default 1)")
    sp.add_argument("--provider", default="CPUExecutionProvider", metavar="NAME",
                    help="onnxruntime execution provider, e.g. CUDAExecutionProvider (default CPU; any installed "
                         "one: python -c 'import onnxruntime; print(onnxruntime.get_available_providers())')")
    sp.set_defaults(func=cmd_bench)

    from .sweep import add_parser as add_sweep
    add_sweep(sub, common, positive_arg, argparse.RawDescriptionHelpFormatter)
    return p


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _bare_latency(argv: list[str]) -> list[str]:
    """A bare ``--latency`` (measure only) must not swallow the next word (the model path)."""
    out = list(argv)
    for i, a in enumerate(out):
        if a == "--latency":
            try:
                float(out[i + 1])
            except (IndexError, ValueError):
                out[i] = "--latency=on"
    return out


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(_bare_latency(sys.argv[1:] if argv is None else argv))
    except SystemExit as e:  # usage errors (one line printed by _Parser.error) and --help
        return e.code if isinstance(e.code, int) else 2
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        with stopping(), warnings.catch_warnings():
            if not args.verbose:   # numpy's overflow notes on odd data: stderr keeps to spa's own lines
                warnings.simplefilter("ignore", RuntimeWarning)
            return args.func(args)
    except SpaError as e:
        print(f"spa: error: {_one_line(str(e))}", file=sys.stderr)
        return 2
    except Terminated as e:
        print(f"spa: terminated by {e}", file=sys.stderr)
        return 128 + e.signum
    except BrokenPipeError:  # `spa inspect model.onnx | head`
        sys.stdout = open(os.devnull, "w")
        return 0
    except KeyboardInterrupt:
        print("spa: interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("spa: error: out of memory", file=sys.stderr)
        return 2
    except Exception as e:  # a bug of ours: still one line, the traceback only with -v
        if args.verbose:
            raise
        stages = getattr(e, "spa_stages", None)
        where = f" in stage {stages[-1]} (after {', '.join(stages[:-1]) or 'nothing'})" if stages else ""
        print(f"spa: internal error{where}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''} "
              f"(please report; -v shows the traceback)", file=sys.stderr)
        return 3


if __name__ == "__main__":
    sys.exit(main())
