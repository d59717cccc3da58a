"""Peak memory of ``spa.analyze`` on hostile (huge declared axes) and normal models.

Each case runs in its own subprocess, so the numbers do not mix: the table gives the peak
resident memory the analysis added (ru_maxrss after ``spa.analyze`` minus ru_maxrss after
``import spa``; it includes loading the file and ONNX shape inference), optionally the
tracemalloc peak of the whole ``spa.analyze`` (``--tracemalloc``) and of the channel
analysis alone (``--channel-peak``: ``build_dependency`` + ``find_groups`` run again on the
loaded model), the wall time, the model's weight bytes and what spa said (groups found, or
the one-line refusal).

    python benchmarks/memory.py                          # all cases
    python benchmarks/memory.py --cases relu-2^27 --mem-limit-gb 8 --timeout 600
    python benchmarks/memory.py --tracemalloc --channel-peak
    PYTHONPATH=/tmp/spa_orig python benchmarks/memory.py # another copy of the spa package

``--mem-limit-gb`` caps each subprocess's address space (like ``ulimit -v``); a case that
hits it or ``--timeout`` is reported as killed, with the time it had run.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent


# ---- models ---------------------------------------------------------------------------------
def _model(nodes, inputs, outputs, inits=()) -> onnx.ModelProto:
    g = helper.make_graph(nodes, "memory", inputs, outputs, list(inits))
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def _vi(name, shape):
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, list(shape))


def _wide(width: int, build, inits=(), tail=True) -> onnx.ModelProto:
    """A [1, 1] input expanded to a [1, width] tensor "x", then ``build(nodes) -> name``, then
    summed back to [1, 1]: the huge axis is declared inside the graph, so no input is huge."""
    shape = numpy_helper.from_array(np.array([1, width], np.int64), "wide_shape")
    nodes = [helper.make_node("Expand", ["x0", "wide_shape"], ["x"], name="expand")]
    y = build(nodes)
    nodes.append(helper.make_node("ReduceSum", [y], ["y"], name="sum", keepdims=1))
    return _model(nodes, [_vi("x0", (1, 1))], [_vi("y", (1, 1))], [shape, *inits])


def relu_wide(width: int) -> onnx.ModelProto:
    """No weights: a [1, width] tensor -> Relu. A few hundred bytes on disk."""
    return _wide(width, lambda nodes: nodes.append(helper.make_node("Relu", ["x"], ["h"], name="relu")) or "h")


def relu_input(width: int) -> onnx.ModelProto:
    """The same, with the width declared on the graph input itself."""
    return _model([helper.make_node("Relu", ["x"], ["y"], name="relu")],
                  [_vi("x", (1, width))], [_vi("y", (1, width))])


def reshape_wide(width: int) -> onnx.ModelProto:
    """[1, width] -> Reshape [a, b] -> Relu -> Reshape back: products of huge axes."""
    a = 1 << (width.bit_length() // 2)
    shape1 = numpy_helper.from_array(np.array([a, width // a], np.int64), "s1")
    shape2 = numpy_helper.from_array(np.array([1, width], np.int64), "s2")

    def build(nodes):
        nodes += [helper.make_node("Reshape", ["x", "s1"], ["r"], name="reshape1"),
                  helper.make_node("Relu", ["r"], ["h"], name="relu"),
                  helper.make_node("Reshape", ["h", "s2"], ["b"], name="reshape2")]
        return "b"
    return _wide(width, build, [shape1, shape2])


def scaled_wide(width: int) -> onnx.ModelProto:
    """A tiny weight tied to nothing wide: [1, width] * scalar weight -> Relu."""
    s = numpy_helper.from_array(np.array([0.5], np.float32), "scale")

    def build(nodes):
        nodes += [helper.make_node("Mul", ["x", "scale"], ["m"], name="mul"),
                  helper.make_node("Relu", ["m"], ["h"], name="relu")]
        return "h"
    return _wide(width, build, [s])


def concat_wide(width: int) -> onnx.ModelProto:
    """A 16-byte weight concatenated onto a huge axis: the axis is tied to a weight but holds
    far more indices than the weights justify (refused)."""
    w = numpy_helper.from_array(np.ones((1, 4), np.float32), "w")

    def build(nodes):
        nodes.append(helper.make_node("Concat", ["x", "w"], ["c"], name="concat", axis=1))
        return "c"
    return _wide(width, build, [w])


def add1d_wide(width: int) -> onnx.ModelProto:
    """A 1-D input plus a scalar: ONNX's shape inference with data propagation treats the
    input as a possible shape vector (its cost is outside the channel analysis)."""
    c = numpy_helper.from_array(np.array([1.0], np.float32), "c")
    return _model([helper.make_node("Add", ["x", "c"], ["y"], name="add")],
                  [_vi("x", (width,))], [_vi("y", (width,))], [c])


def bias_wide(width: int) -> onnx.ModelProto:
    """A legitimately wide weight axis, fixed by the graph input: x [1, width] + b [width]
    -> MatMul W [width, 4]. Weights: 5 * width floats."""
    rng = np.random.default_rng(0)
    b = numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b")
    w = numpy_helper.from_array(rng.standard_normal((width, 4)).astype(np.float32), "w")
    nodes = [helper.make_node("Add", ["x", "b"], ["h"], name="add"),
             helper.make_node("MatMul", ["h", "w"], ["y"], name="matmul")]
    return _model(nodes, [_vi("x", (1, width))], [_vi("y", (1, 4))], [b, w])


def mlp_wide(width: int) -> onnx.ModelProto:
    """A prunable hidden layer ``width`` wide: x [1, 4] @ W1 [4, width] + b -> Relu -> @ W2."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((4, width)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(width).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((width, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["m"], name="mm1"),
             helper.make_node("Add", ["m", "b1"], ["a"], name="add1"),
             helper.make_node("Relu", ["a"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    return _model(nodes, [_vi("x", (1, 4))], [_vi("y", (1, 4))], [w1, b1, w2])


def conv_flatten(side: int) -> onnx.ModelProto:
    """A conv on a side x side image, flattened (C*H*W) into a Gemm: a wide product axis that
    IS a weight axis (the Gemm's input columns)."""
    rng = np.random.default_rng(0)
    c = 8
    w = numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "wc")
    g = numpy_helper.from_array(rng.standard_normal((4, c * side * side)).astype(np.float32), "wg")
    nodes = [helper.make_node("Conv", ["x", "wc"], ["c"], name="conv", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], name="flatten"),
             helper.make_node("Gemm", ["f", "wg"], ["y"], name="gemm", transB=1)]
    return _model(nodes, [_vi("x", (1, 3, side, side))], [_vi("y", (1, 4))], [w, g])


CASES = {
    "relu-2^20": lambda: relu_wide(1 << 20),
    "relu-2^24": lambda: relu_wide(1 << 24),
    "relu-2^27": lambda: relu_wide(1 << 27),
    "input-2^24": lambda: relu_input(1 << 24),
    "input-2^27": lambda: relu_input(1 << 27),
    "reshape-2^24": lambda: reshape_wide(1 << 24),
    "reshape-2^27": lambda: reshape_wide(1 << 27),
    "scaled-2^27": lambda: scaled_wide(1 << 27),
    "concat-2^24": lambda: concat_wide(1 << 24),
    "concat-2^27": lambda: concat_wide(1 << 27),
    "add1d-2^24": lambda: add1d_wide(1 << 24),
    "bias-2^20": lambda: bias_wide(1 << 20),
    "bias-2^24": lambda: bias_wide(1 << 24),
    "mlp-2^20": lambda: mlp_wide(1 << 20),
    "conv-flatten-256": lambda: conv_flatten(256),
    "demo_cnn": lambda: ROOT / "models" / "demo_cnn.onnx",
    "fashion_resnet": lambda: ROOT / "models" / "fashion_resnet.onnx",
}


def weight_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        total += int(np.prod(t.dims, dtype=np.int64)) * np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)).itemsize
    return total


# ---- one case, in a subprocess -----------------------------------------------------------------
def run_one(path: str, use_tracemalloc: bool, channel_peak: bool = False) -> dict:
    import spa  # noqa: F401  (imports count in the baseline, not in the analysis)
    from spa.errors import SpaError
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if use_tracemalloc:
        import tracemalloc
        tracemalloc.start()
    t0 = time.perf_counter()
    try:
        a = spa.analyze(path)
        result = f"{len(a.groups)} groups, {len(a.blocked)} blocked, {len(a.dep.root)} atoms"
    except SpaError as e:
        result = f"refused: {e}"
        a = None
    out = {"seconds": time.perf_counter() - t0, "result": result,
           "rss_delta": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base}
    if use_tracemalloc:
        out["tracemalloc_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    if channel_peak and a is not None:
        # the channel analysis alone (dependency + groups), on the loaded model and shapes
        import tracemalloc
        from spa.graph.dependency import build_dependency
        from spa.graph.groups import find_groups
        from spa.loading.model import opset_of
        model, shapes = a.model, a.shapes
        del a
        tracemalloc.start()
        find_groups(build_dependency(model, shapes, opset_of(model)))
        out["channel_peak"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return out


def _limit(gb: float | None):
    def set_limit():
        if gb:
            n = int(gb * 2**30)
            resource.setrlimit(resource.RLIMIT_AS, (n, n))
    return set_limit


def _fmt_bytes(n) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", nargs="*", default=list(CASES), help=f"from {list(CASES)}")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per case")
    ap.add_argument("--mem-limit-gb", type=float, default=None, help="address-space cap per case")
    ap.add_argument("--tracemalloc", action="store_true", help="also trace Python allocations (slow on the old code)")
    ap.add_argument("--channel-peak", action="store_true",
                    help="also measure the channel analysis alone (tracemalloc, in a second pass)")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    ap.add_argument("--one", nargs=1, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.one:
        print(json.dumps(run_one(args.one[0], args.tracemalloc, args.channel_peak)))
        return 0

    import spa
    print(f"spa from {Path(spa.__file__).parent}")
    rows = []
    header = (f"{'case':<18} {'file':>9} {'weights':>9} {'analysis RSS':>13} {'tracemalloc':>11} "
              f"{'channels':>9} {'seconds':>8}  result")
    print(header)
    print("-" * len(header))
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.cases:
            made = CASES[name]()
            if isinstance(made, Path):
                path, model = made, onnx.load(made)
            else:
                path, model = Path(tmp) / f"{name}.onnx", made
                onnx.save(model, path)
            row = {"case": name, "file_bytes": path.stat().st_size, "weight_bytes": weight_bytes(model)}
            del model, made
            cmd = [sys.executable, __file__, "--one", str(path)] + (["--tracemalloc"] if args.tracemalloc else []) \
                + (["--channel-peak"] if args.channel_peak else [])
            t0 = time.perf_counter()
            try:
                p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                                   preexec_fn=_limit(args.mem_limit_gb))
                lines = p.stdout.strip().splitlines()
                if p.returncode == 0 and lines:
                    row.update(json.loads(lines[-1]))
                else:
                    tail = (p.stderr.strip().splitlines() or ["?"])[-1]
                    cap = f" at {args.mem_limit_gb:g} GB" if args.mem_limit_gb else ""
                    row.update(seconds=time.perf_counter() - t0,
                               result=f"killed{cap} after {time.perf_counter() - t0:.0f} s ({tail[:80]})")
            except subprocess.TimeoutExpired:
                row.update(seconds=args.timeout, result=f"timed out after {args.timeout:.0f} s")
            rows.append(row)
            print(f"{name:<18} {_fmt_bytes(row['file_bytes']):>9} {_fmt_bytes(row['weight_bytes']):>9} "
                  f"{_fmt_bytes(row.get('rss_delta')):>13} {_fmt_bytes(row.get('tracemalloc_peak')):>11} "
                  f"{_fmt_bytes(row.get('channel_peak')):>9} "
                  f"{row['seconds']:>8.1f}  {row['result']}", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
