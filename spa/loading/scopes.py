"""Control-flow bodies (the graphs of If, Loop and Scan nodes) as parts of one name space.

A body reads the tensors of the scopes around it by name, so once every name is unique in the
whole model, a tensor axis is one *space* wherever it is read, and the analysis, the rewrite
and the oracle can treat the nodes of every body like those of the main graph:

- ``walk`` yields every node with the graph that holds it, bodies after the node that owns them;
- ``hoist_bodies`` (a step of ``normalize``) gives each body's tensors and nodes names unique in
  the whole model and moves the bodies' weights (their initializers and Constant nodes) into
  the main graph, which every body sees: every weight is then a main-graph initializer, sliced
  and scored like any other;
- ``outer_reads`` lists the names a body reads from the scopes around it.
"""

from __future__ import annotations

from collections.abc import Iterator

import onnx
from onnx import numpy_helper

__all__ = ["bodies", "walk", "all_nodes", "body_graphs", "outer_reads", "local_names", "hoist_bodies", "unique_name",
           "value_infos", "rename_inputs", "tensor_names"]


def bodies(node: onnx.NodeProto) -> list[tuple[str, onnx.GraphProto]]:
    """(attribute name, graph) of every graph a node holds (If's branches, Loop's and Scan's body)."""
    return [(a.name, g) for a in node.attribute for g in ([a.g] if a.HasField("g") else []) + list(a.graphs)]


def walk(graph: onnx.GraphProto) -> Iterator[tuple[onnx.GraphProto, onnx.NodeProto]]:
    """Every node of ``graph`` and of the bodies it holds, with the graph it belongs to; a
    node's bodies come right after it (their outer reads are defined by then)."""
    for node in graph.node:
        yield graph, node
        for _, body in bodies(node):
            yield from walk(body)


def all_nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    return (node for _, node in walk(graph))


def body_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every body graph nested in ``graph`` (not ``graph`` itself)."""
    for node in graph.node:
        for _, body in bodies(node):
            yield body
            yield from body_graphs(body)


def local_names(graph: onnx.GraphProto) -> set[str]:
    """Names a graph defines itself: its inputs, initializers and node outputs."""
    out = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    out.update(o for n in graph.node for o in n.output if o)
    return out


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names that ``graph`` (or a body nested in it) reads but does not define: tensors of the
    scopes around it."""
    local = local_names(graph)
    used = {o.name for o in graph.output}
    for node in graph.node:
        used.update(i for i in node.input if i)
        for _, body in bodies(node):
            used |= outer_reads(body)
    return used - local


def rename_inputs(g: onnx.GraphProto, rename: dict):
    """Every node input (in subgraphs too, which read the outer scope) renamed. In place."""
    for node in g.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
        for _, sub in bodies(node):
            rename_inputs(sub, rename)


def tensor_names(model: onnx.ModelProto) -> set[str]:
    """Every name a tensor has anywhere in the model, subgraphs included."""
    names: set[str] = set()

    def visit(g: onnx.GraphProto):
        names.update(t.name for t in g.initializer)
        names.update(v.name for v in list(g.input) + list(g.output) + list(g.value_info))
        for node in g.node:
            names.update(node.input)
            names.update(node.output)
            for _, sub in bodies(node):
                visit(sub)
    visit(model.graph)
    return names


def value_infos(graph: onnx.GraphProto) -> Iterator[onnx.ValueInfoProto]:
    yield from graph.input
    yield from graph.output
    yield from graph.value_info


def _rename_in(graph: onnx.GraphProto, rename: dict[str, str]):
    """Every mention of a renamed name in ``graph`` and its bodies. In place."""
    for vi in value_infos(graph):
        vi.name = rename.get(vi.name, vi.name)
    for t in graph.initializer:
        t.name = rename.get(t.name, t.name)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in rename:
                node.input[k] = rename[name]
        for k, name in enumerate(node.output):
            if name in rename:
                node.output[k] = rename[name]
        for _, body in bodies(node):
            _rename_in(body, rename)


def unique_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_2``, ``base_3``...: the first not in ``taken`` (which it joins)."""
    name, i = base, 1
    while name in taken:
        i += 1
        name = f"{base}_{i}"
    taken.add(name)
    return name


def hoist_bodies(model: onnx.ModelProto) -> bool:
    """Make every name a body defines unique in the model (sibling branches may reuse names)
    and move each body's
    initializers and Constant nodes (their values) into the main graph's initializers.
    Returns whether the model has bodies. In place.

    A Constant that is itself a body's output stays (a body output must be made in the body)."""
    g = model.graph
    if not any(bodies(n) for n in g.node):
        return False
    taken: set[str] = set()
    for vi in value_infos(g):
        taken.add(vi.name)
    taken.update(t.name for t in g.initializer)
    taken.update(o for n in g.node for o in n.output if o)
    all_taken = set(taken)
    for _, node in walk(g):
        all_taken.update(node.input)
        all_taken.update(node.output)

    def visit(graph: onnx.GraphProto):
        for node in graph.node:
            for _, body in bodies(node):
                own = local_names(body)
                rename = {}
                for name in sorted(own):
                    if name in taken:
                        rename[name] = unique_name(name, all_taken)
                    taken.add(rename.get(name, name))
                if rename:
                    _rename_in(body, rename)
                _hoist(body, g)
                visit(body)

    visit(g)
    model.ir_version = max(model.ir_version, 4)   # initializers that are no graph inputs
    return True


def _hoist(body: onnx.GraphProto, main: onnx.GraphProto):
    """Move the body's initializers and Constant values into ``main``. In place."""
    from .model import _constant_value
    outputs = {o.name for o in body.output}
    kept = []
    for node in body.node:
        value = (_constant_value(node) if node.op_type == "Constant" and node.domain in ("", "ai.onnx")
                 and node.output[0] not in outputs else None)
        if value is not None:
            main.initializer.append(numpy_helper.from_array(value, node.output[0]))
        else:
            kept.append(node)
    if len(kept) != len(body.node):
        del body.node[:]
        body.node.extend(kept)
    if len(body.initializer):
        listed = {i.name for i in body.input}
        main.initializer.extend(t for t in body.initializer if t.name not in outputs and t.name not in listed)
        stay = [t for t in body.initializer if t.name in outputs or t.name in listed]
        del body.initializer[:]
        body.initializer.extend(stay)
