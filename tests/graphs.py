"""A tiny builder for test graphs, and the oracle assertion every rule test uses."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import spa


class Graph:
    """Build an ONNX model node by node; weights are random, names are generated."""

    def __init__(self, opset: int = 17, seed: int = 0):
        self.opset = opset
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.inputs, self.outputs = [], [], [], []
        self.count = 0

    def _name(self, prefix):
        self.count += 1
        return f"{prefix}{self.count}"

    def input(self, shape, name="x", dtype=TensorProto.FLOAT):
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def const(self, value, name=None):
        name = name or self._name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def weight(self, *shape, scale=0.5):
        return self.const((self.rng.standard_normal(shape) * scale).astype(np.float32), self._name("w"))

    def op(self, op_type, inputs, n_out=1, **attrs):
        outs = [self._name(op_type.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=self._name("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, c_in, c_out, k=3, group=1, bias=True, dims=2, **attrs):
        w = self.weight(c_out, c_in // group, *([k] * dims))
        inputs = [x, w] + ([self.weight(c_out)] if bias else [])
        return self.op("Conv", inputs, group=group, pads=[k // 2] * (2 * dims), **attrs)

    def output(self, name):
        self.outputs.append(name)
        return name

    def model(self, ir_version: int = 8, domains=(), check: bool = True) -> onnx.ModelProto:
        """The model, with output types taken from shape inference (``check=False``: no
        checker, for ops it rejects that runtimes still run, such as GroupNormalization-18)."""
        opsets = [helper.make_opsetid("", self.opset)] + [helper.make_opsetid(d, 1) for d in domains]
        graph = helper.make_graph(self.nodes, "test", self.inputs, [], self.inits)
        graph.value_info.extend(helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in self.outputs)
        m = helper.make_model(graph, opset_imports=opsets, ir_version=ir_version)
        inferred = {vi.name: vi for vi in onnx.shape_inference.infer_shapes(m).graph.value_info}
        del m.graph.value_info[:]
        for name in self.outputs:
            vi = inferred.get(name)
            if vi is None or not vi.type.tensor_type.HasField("shape"):
                vi = helper.make_tensor_value_info(name, TensorProto.FLOAT, ["?"])
            m.graph.output.append(vi)
        if not domains and check:
            onnx.checker.check_model(m, full_check=True)
        return m


def assert_prunes(model, ratio=0.5, criterion="random", seed=0, expect_removed=True, **kw) -> spa.PruneResult:
    """Prune with the oracle on; the pruned model must also actually be smaller."""
    result = spa.prune(model, ratio=ratio, criterion=criterion, seed=seed, round_to=1, verify=True, **kw)
    rep = result.report
    assert rep["verify"]["ok"], rep["verify"]
    removed = sum(g["removed"] for g in rep["groups"])
    if expect_removed:
        assert removed > 0, "nothing was pruned"
        assert rep["after"]["params"] < rep["before"]["params"]
    onnx.checker.check_model(result.model, full_check=True)
    return result


def chain_model(nodes: int, kind: str = "conv", channels: int = 16, seed: int = 0,
                batch: int | str = 1) -> onnx.ModelProto:
    """A straight chain of ``nodes`` nodes on small tensors, built without shape inference
    or the checker (both are slow at 100k nodes, and spa does its own).
    ``conv``: Conv(1x1) -> Relu -> Conv -> ..., every Conv/Relu pair a prunable group;
    ``elementwise``: Add/Relu/Mul with [1, channels] constants, nothing prunable.
    ``batch`` may be a symbolic dim ("N"): spa then probes sizes for it."""
    rng = np.random.default_rng(seed)
    shape = [batch, channels, 2, 2] if kind == "conv" else [batch, channels]
    made, inits, x = [], [], "x"
    ops = ("Conv", "Relu") if kind == "conv" else ("Add", "Relu", "Mul")
    for i in range(nodes):
        op, out = ops[i % len(ops)], f"t{i}"
        inputs = [x]
        if op == "Conv":
            w = (rng.standard_normal((channels, channels, 1, 1)) * 0.3).astype(np.float32)
            inputs.append(f"w{i}")
            inits.append(numpy_helper.from_array(w, f"w{i}"))
        elif op in ("Add", "Mul"):
            c = rng.uniform(0.5, 1.5, (1, channels)).astype(np.float32)
            inputs.append(f"c{i}")
            inits.append(numpy_helper.from_array(c, f"c{i}"))
        made.append(helper.make_node(op, inputs, [out], name=f"n{i}"))
        x = out
    graph = helper.make_graph(made, f"{kind}_chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, shape)],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, shape)], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
