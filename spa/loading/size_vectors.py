"""Size vectors shared by several shape readers, split so that each reader has its own.

Exporters compute a size vector once and let every layer read it: the dynamo exporter's
grouped-query attention writes one ``Concat(batch, kv_heads, n_rep, seq, head_dim)`` that the
key and value Expands of all layers read (SmolLM2-135M with batch and sequence open: 60
readers). Pruning gives layers different head counts, and a shared vector cannot hold them all:
each reader gets its own copy of the few nodes that compute it (its constant pieces are then
split per reader with the other shared initializers, and rewritten per layer)."""

from __future__ import annotations

import onnx

from .scopes import tensor_names, unique_name

__all__ = ["split_shared_size_vectors"]

# (op, input) pairs that read a size vector a pruned channel count may have to go into
_SIZE_READERS = {("Expand", 1), ("Reshape", 1)}
# ops a size vector is computed with from its pieces; Shape and the ops that cut shapes
# (Gather, Slice) read sizes from tensors and follow the pruned ones by themselves
_COMPUTES = {"Concat", "Reshape", "Unsqueeze", "Squeeze", "Cast", "Identity", "Where", "Equal", "Mul", "Add",
             "Sub", "Max", "Min", "Abs", "ConstantOfShape"}
MAX_CHAIN = 16      # nodes copied per reader at most: a longer computation is left shared


def split_shared_size_vectors(model: onnx.ModelProto) -> int:
    """Give every further reader of a shared size vector its own copy of the nodes computing
    it (main graph; in place); how many readers were given one."""
    g = model.graph
    producers = {o: n for n in g.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in g.node:
        for k, name in enumerate(node.input):
            if (node.op_type, k) in _SIZE_READERS and node.domain in ("", "ai.onnx") and name in producers:
                readers.setdefault(name, []).append(node)
    shared = {name: nodes for name, nodes in readers.items() if len(nodes) > 1}
    if not shared:
        return 0
    taken = tensor_names(model) | {n.name for n in g.node}
    copies: dict[int, list[onnx.NodeProto]] = {}     # id(reader) -> nodes to insert before it
    count = 0
    for name, nodes in shared.items():
        chain = _chain(name, producers)
        if chain is None:
            continue
        for reader in nodes[1:]:
            renamed = {}
            made = []
            for node in chain:         # producers first
                copy = onnx.NodeProto()
                copy.CopyFrom(node)
                copy.name = unique_name(f"{node.name}__for_{reader.name}", taken)
                del copy.input[:]
                copy.input.extend(renamed.get(i, i) for i in node.input)
                del copy.output[:]
                for o in node.output:
                    renamed[o] = unique_name(f"{o}__for_{reader.name}", taken)
                    copy.output.append(renamed[o])
                made.append(copy)
            for k, i in enumerate(reader.input):
                if (reader.op_type, k) in _SIZE_READERS and i == name:
                    reader.input[k] = renamed[name]
            copies.setdefault(id(reader), []).extend(made)
            count += 1
    if copies:
        ordered = []
        for node in g.node:
            ordered.extend(copies.get(id(node), ()))
            ordered.append(node)
        del g.node[:]
        g.node.extend(ordered)
    return count


def _chain(name: str, producers: dict) -> list[onnx.NodeProto] | None:
    """The nodes computing ``name`` from shapes, graph inputs and constants, producers first;
    None where they are not all size computations or are too many to copy."""
    seen: dict[str, onnx.NodeProto] = {}
    order: list[onnx.NodeProto] = []

    def visit(tensor: str) -> bool:
        node = producers.get(tensor)
        if node is None or node.op_type not in _COMPUTES or node.domain not in ("", "ai.onnx"):
            return True       # a constant, a graph input or a shape read: shared as it is
        if node.name in seen:
            return True
        if len(seen) >= MAX_CHAIN or any(a.type == onnx.AttributeProto.GRAPH for a in node.attribute):
            return False
        seen[node.name] = node
        if not all(visit(i) for i in node.input if i):
            return False
        order.append(node)
        return True
    return order if visit(name) and order else None

