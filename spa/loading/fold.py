"""Weights normalized at run time, computed once.

Weight standardization (timm's StdConv2d / ScaledStdConv2d in NF-ResNets: each output
channel's weights normalized over its inputs) and weight normalization (g * v / ||v||) export,
with torch's legacy exporter and others, as nodes that recompute the weight from initializers
on every run. Their reductions mix a weight's input axis, so no channel could be removed from
it exactly while the pruned model recomputes them, and every group such a layer reads stayed
whole. Computed once, the weight is a plain initializer: slicing it is exact, and the model does
what the dynamo exporter's constant folding writes for the same layer.

Only chains of nodes that read initializers alone, end in the weight input of a Conv,
ConvTranspose, Gemm or MatMul, and contain a reduction or a normalization are computed; a
dequantized, cast or transposed weight stays as it is (folding it would undo the quantization
or widen the stored type). So is a scatter of constants into a constant (torchvision's swin v2
zeroes the key third of its qkv bias, ``qkv_bias[C:2C].zero_()``, which the legacy exporter
writes as a ScatterND on the bias on every run): a scatter's written axes have no rule, so
the bias, and every head and width the qkv projection carries, stayed whole. The computed weight may be at most ``GROWTH`` times the
initializers it is computed from, every intermediate value included, so a declared shape
cannot make the fold allocate more than the weights do.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

log = logging.getLogger(__name__)

WEIGHT_SLOTS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}
SCATTERS = {"ScatterND", "ScatterElements", "Scatter"}
MIXING = {"BatchNormalization", "InstanceNormalization", "LayerNormalization", "GroupNormalization",
          "LpNormalization", "MeanVarianceNormalization"}
GROWTH = 4
# a chain through these is not folded: random values differ per run, and folding a dequantized
# or cast weight would undo its quantization or widen its stored type
KEPT = {"Bernoulli", "Multinomial", "DequantizeLinear", "DynamicQuantizeLinear", "Cast", "CastLike"}


def fold_normalized_weights(model: onnx.ModelProto) -> list[str]:
    """Replace, in place, each weight computed from initializers through a reduction or a
    normalization, and each scatter of constants into a constant, by its value; returns the
    tensors folded."""
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    producer = {o: n for n in g.node for o in n.output if o}
    position = {id(n): i for i, n in enumerate(g.node)}
    read = _read_names(g)
    folds = {}
    for node in g.node:
        slot = WEIGHT_SLOTS.get(node.op_type)
        if node.domain not in ("", "ai.onnx") or slot is None or len(node.input) <= slot:
            continue
        name = node.input[slot]
        chain = _constant_chain(name, producer, inits, position)
        if chain and any(n.op_type in MIXING or n.op_type.startswith("Reduce") for n in chain) and \
                not any(o in read for o in producer[name].output if o and o != name):
            folds[name] = chain
    for node in g.node:     # a constant written into a constant
        if node.op_type in SCATTERS and node.domain in ("", "ai.onnx") and node.output[0] not in folds:
            chain = _constant_chain(node.output[0], producer, inits, position)
            if chain:
                folds[node.output[0]] = chain
    if not folds:
        return []
    sizes = _inferred_sizes(model)
    done, folded, folded_sources = [], [], set()
    for name, chain in folds.items():
        sources = {i for n in chain for i in n.input if i in inits}
        budget = GROWTH * sum(_elements(inits[s]) for s in sources) + 1024
        sizes.update(_chain_sizes(chain, inits, sizes))
        if any(sizes.get(o) is None or sizes[o] > budget for n in chain for o in n.output if o):
            continue
        value = _evaluate(model, chain, [inits[s] for s in sources], name)
        if value is None:
            continue
        g.initializer.append(numpy_helper.from_array(value, name))
        inits[name] = g.initializer[-1]
        done.append(name)
        folded.append(chain)
        folded_sources |= sources
    if done:
        keep = [n for n in g.node if not set(n.output) & set(done)]
        del g.node[:]
        g.node.extend(keep)
        _drop_unused(model, folded, folded_sources - set(done))
        log.info("weights computed at run time computed once: %s", ", ".join(done))
    return done


def _constant_chain(name: str, producer: dict, inits: dict, position: dict) -> list[onnx.NodeProto] | None:
    """The nodes computing ``name`` from initializers only (graph order), or None when it
    depends on an input, a subgraph or a random op."""
    chain, seen, stack = {}, set(), [name]
    while stack:
        t = stack.pop()
        if t in seen or t in inits or t == "":
            continue
        seen.add(t)
        n = producer.get(t)
        if n is None or n.domain not in ("", "ai.onnx") or n.op_type.startswith("Random") or n.op_type in KEPT or \
                any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in n.attribute):
            return None
        chain[id(n)] = n
        stack.extend(n.input)
    return sorted(chain.values(), key=lambda n: position[id(n)]) if chain else None


def _inferred_sizes(model: onnx.ModelProto) -> dict[str, int]:
    """Element counts shape inference works out, on the weightless skeleton (the guarded data
    propagation of ``infer_skeleton``) and with the file's own value_info left out: a declared
    shape is a claim, not a measurement."""
    from .model import _weightless
    from .shapes import infer_skeleton
    skeleton = _weightless(model)
    del skeleton.graph.value_info[:]
    try:
        inferred = infer_skeleton(skeleton)
    except Exception:       # an unknown op or an inconsistent graph: nothing is folded
        return {}
    sizes = {}
    for vi in inferred.graph.value_info:
        tt = vi.type.tensor_type
        if tt.HasField("shape") and all(d.HasField("dim_value") and d.dim_value >= 0 for d in tt.shape.dim):
            sizes[vi.name] = math.prod(d.dim_value for d in tt.shape.dim)
    return sizes


def _chain_sizes(chain, inits: dict, sizes: dict) -> dict[str, int]:
    """Element counts that shape inference leaves unknown in a constant chain where a size
    is an initializer behind Identity nodes (the legacy exporter's deduplicated constants):
    Identity keeps its input's, Reshape too, Expand broadcasts its input to a known shape."""
    shapes = {n: tuple(t.dims) for n, t in inits.items()}
    values = {}
    found = {}
    for n in chain:
        ins = [shapes.get(i) for i in n.input]
        if n.op_type == "Identity" and ins[0] is not None:
            shapes[n.output[0]] = ins[0]
            if n.input[0] in inits and len(ins[0]) <= 1:
                values[n.output[0]] = numpy_helper.to_array(inits[n.input[0]])
        elif n.op_type == "Expand" and ins[0] is not None:
            target = values.get(n.input[1])
            if target is None and n.input[1] in inits:
                target = numpy_helper.to_array(inits[n.input[1]])
            try:
                if target is not None:
                    shapes[n.output[0]] = np.broadcast_shapes(ins[0], tuple(int(v) for v in np.ravel(target)))
            except ValueError:      # a target that cannot broadcast: its size stays unknown
                pass
        elif n.op_type == "Reshape" and ins[0] is not None:
            found[n.output[0]] = math.prod(ins[0])
        for o in n.output:
            if o in shapes and o not in found and all(d >= 0 for d in shapes[o]):
                found[o] = math.prod(shapes[o])
    return {o: v for o, v in found.items() if sizes.get(o) is None}


def _elements(t: onnx.TensorProto) -> int:
    return math.prod(t.dims)


def _evaluate(model, chain, sources, name) -> np.ndarray | None:
    from ..runtime import session
    sub = helper.make_model(helper.make_graph(chain, "fold", [], [onnx.ValueInfoProto(name=name)], list(sources)),
                            opset_imports=list(model.opset_import), ir_version=model.ir_version)
    try:
        return session(sub).run([name], {})[0]
    except Exception as e:   # onnxruntime cannot compute it: the layer stays as it was
        log.info("could not compute the weight %s once: %s", name, str(e).splitlines()[0])
        return None


def _drop_unused(model: onnx.ModelProto, chains: list, sources: set[str]):
    """The folded chains' nodes whose outputs nothing reads any more, then those of their
    source initializers nothing reads; the rest of the graph stays as it is (an unread
    initializer may be an input's default)."""
    g = model.graph
    outputs = {o for chain in chains for n in chain for o in n.output}
    while True:
        read = _read_names(g)
        dead = {i for i, n in enumerate(g.node) if set(n.output) <= outputs and not any(o in read for o in n.output if o)}
        if not dead:
            break
        keep = [n for i, n in enumerate(g.node) if i not in dead]
        del g.node[:]
        g.node.extend(keep)
    read = _read_names(g)
    from .model import remove_initializers
    remove_initializers(g, {t.name for t in g.initializer if t.name not in read and t.name in sources})


def _read_names(g: onnx.GraphProto) -> set[str]:
    """Tensors something reads: a node, a graph output, or a subgraph from the outer scope."""
    from .scopes import bodies, outer_reads
    return ({i for n in g.node for i in n.input} | {o.name for o in g.output}
            | {name for n in g.node for _, body in bodies(n) for name in outer_reads(body)})
