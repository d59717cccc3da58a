"""A LLaMA-shaped decoder of ~3 GB (random weights, external data) against spa's memory and
time targets: `spa prune` wall time vs onnx.load + onnx.save of the same model, and peak RSS.

    python benchmarks/big_model.py [--dir /tmp/spa-big] [--layers 12] [--hidden 2048]

The model is written straight to disk tensor by tensor (no framework, never 3 GB in memory):
embedding Gather, per layer RMSNorm (Pow/ReduceMean/Add/Sqrt/Div/Mul), q/k/v/o projections
with heads split by Reshape/Transpose, softmax attention, SwiGLU MLP (gate, up, down), a final
RMSNorm and the LM head. Both measurements run as child processes; peak memory is their
maximum resident set size.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

sys.path.insert(0, str(Path(__file__).resolve().parent))
from round_to import update_readme  # noqa: E402


def build(path: Path, layers: int, hidden: int, inter: int, heads: int, vocab: int, seq: int):
    rng = np.random.default_rng(0)
    data_name = path.name + ".data"
    nodes, inits = [], []
    with open(path.parent / data_name, "wb") as f:
        def weight(name, *shape, scale=0.02):
            arr = (rng.standard_normal(shape, dtype=np.float32) * scale)
            ref = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=shape)
            ref.data_location = TensorProto.EXTERNAL
            for k, v in (("location", data_name), ("offset", str(f.tell())), ("length", str(arr.nbytes))):
                ref.external_data.add(key=k, value=v)
            f.write(arr.tobytes())
            inits.append(ref)
            return name

        def const(name, value):
            inits.append(onnx.numpy_helper.from_array(np.asarray(value), name))
            return name

        def op(kind, ins, out, **attrs):
            nodes.append(helper.make_node(kind, ins, [out], name=out, **attrs))
            return out

        def rmsnorm(x, tag):
            sq = op("Pow", [x, const(f"{tag}.two", np.float32(2))], f"{tag}.sq")
            mean = op("ReduceMean", [sq, const(f"{tag}.axes", np.array([-1], np.int64))], f"{tag}.mean", keepdims=1)
            std = op("Sqrt", [op("Add", [mean, const(f"{tag}.eps", np.float32(1e-6))], f"{tag}.var")], f"{tag}.std")
            return op("Mul", [op("Div", [x, std], f"{tag}.norm"), weight(f"{tag}.weight", hidden, scale=1.0)], f"{tag}.out")

        d = hidden // heads
        split = const("heads_shape", np.array([1, seq, heads, d], np.int64))
        merge = const("merge_shape", np.array([1, seq, hidden], np.int64))
        x = op("Gather", [weight("embed", vocab, hidden), "input_ids"], "embedded")
        for i in range(layers):
            t = f"l{i}"
            h = rmsnorm(x, f"{t}.attn_norm")
            q, k, v = (op("Transpose", [op("Reshape", [op("MatMul", [h, weight(f"{t}.{n}", hidden, hidden)], f"{t}.{n}.mm"),
                                                       split], f"{t}.{n}.split")], f"{t}.{n}.heads", perm=[0, 2, 1, 3])
                       for n in ("q", "k", "v"))
            kt = op("Transpose", [k], f"{t}.kt", perm=[0, 1, 3, 2])
            scores = op("Mul", [op("MatMul", [q, kt], f"{t}.qk"), const(f"{t}.scale", np.float32(d ** -0.5))], f"{t}.scores")
            ctx = op("MatMul", [op("Softmax", [scores], f"{t}.probs", axis=-1), v], f"{t}.ctx")
            ctx = op("Reshape", [op("Transpose", [ctx], f"{t}.ctx_t", perm=[0, 2, 1, 3]), merge], f"{t}.ctx_m")
            x = op("Add", [x, op("MatMul", [ctx, weight(f"{t}.o", hidden, hidden)], f"{t}.o.mm")], f"{t}.res1")
            h = rmsnorm(x, f"{t}.mlp_norm")
            gate = op("MatMul", [h, weight(f"{t}.gate", hidden, inter)], f"{t}.gate.mm")
            act = op("Mul", [gate, op("Sigmoid", [gate], f"{t}.gate.sig")], f"{t}.gate.silu")
            up = op("Mul", [act, op("MatMul", [h, weight(f"{t}.up", hidden, inter)], f"{t}.up.mm")], f"{t}.swiglu")
            x = op("Add", [x, op("MatMul", [up, weight(f"{t}.down", inter, hidden)], f"{t}.down.mm")], f"{t}.res2")
        logits = op("MatMul", [rmsnorm(x, "final_norm"), weight("lm_head", hidden, vocab)], "logits")
    graph = helper.make_graph(nodes, "llama_shaped", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, seq])],
                              [helper.make_tensor_value_info(logits, TensorProto.FLOAT, [1, seq, vocab])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9), path)


def timed(cmd: list[str]) -> tuple[float, float, int]:
    """Wall seconds and peak RSS (MB) of a child process."""
    start = time.perf_counter()
    proc = subprocess.Popen(["/usr/bin/time", "-f", "%M"] + cmd, stderr=subprocess.PIPE, text=True)
    _, err = proc.communicate()
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {err.strip().splitlines()[-2:]}")
    return wall, int(err.strip().splitlines()[-1]) / 1024, proc.returncode


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dir", default="/tmp/spa-big")
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--inter", type=int, default=5504)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seq", type=int, default=16)
    args = p.parse_args()
    out = Path(args.dir)
    out.mkdir(parents=True, exist_ok=True)
    src = out / "llama_shaped.onnx"
    if not src.exists():
        build(src, args.layers, args.hidden, args.inter, args.heads, args.vocab, args.seq)
    size_mb = (src.stat().st_size + (out / (src.name + ".data")).stat().st_size) / 2**20
    for f in out.glob("copy.onnx*"):
        f.unlink()
    for f in out.glob("pruned.onnx*"):
        f.unlink()
    baseline = [sys.executable, "-c", "import onnx, sys; m = onnx.load(sys.argv[1]); "
                "onnx.save(m, sys.argv[2], save_as_external_data=True, location='copy.onnx.data')",
                str(src), str(out / "copy.onnx")]
    prune = ["spa", "prune", str(src), "-o", str(out / "pruned.onnx"), "--heads", "0.25", "--mlp", "0.3",
             "--no-verify", "-q", "--report", str(out / "report.json")]
    base_wall, base_rss, _ = timed(baseline)
    spa_wall, spa_rss, _ = timed(prune)
    rep = json.loads((out / "report.json").read_text())
    rows = [
        "| | wall (s) | peak RSS (MB) | RSS / model size |", "|---|---:|---:|---:|",
        f"| `onnx.load` + `onnx.save` (external data) | {base_wall:.1f} | {base_rss:.0f} | {base_rss / size_mb:.2f} |",
        f"| `spa prune --heads 0.25 --mlp 0.3 --no-verify` | {spa_wall:.1f} | {spa_rss:.0f} | {spa_rss / size_mb:.2f} |",
    ]
    text = "\n".join([
        "## Models over 2 GB", "",
        f"`python benchmarks/big_model.py` — a LLaMA-shaped decoder ({args.layers} layers, hidden {args.hidden}, "
        f"MLP {args.inter}, {args.heads} heads, vocab {args.vocab}; random weights) of {size_mb / 1024:.2f} GiB "
        f"in external data; {os.cpu_count()} cores. Params {rep['before']['params'] / 1e6:.0f}M -> "
        f"{rep['after']['params'] / 1e6:.0f}M, MACs ratio {rep['after']['macs'] / rep['before']['macs']:.3f}.", "",
        *rows, "",
        f"Targets: wall time <= 2x load+save (measured {spa_wall / base_wall:.2f}x); peak memory <= 1.5x the model's "
        f"size (measured {spa_rss / size_mb:.2f}x).",
    ])
    print(text)
    update_readme("big_model", text)


if __name__ == "__main__":
    main()
