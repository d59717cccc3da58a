"""A model run block by block: OBSPA's statistics of a large model come in parts (obspa.Part),
each reading the inputs of some layers; each part runs only the nodes no earlier part ran,
from the tensors earlier parts handed on (a decoder's residual stream). Over all parts every
node runs once per batch, and only one block's weights are read at a time, where running the
model to each part's tensors would run its first layers once per part and touch every weight
up to the last part's."""

from __future__ import annotations

import numpy as np
import onnx

from ..loading.model import copy_fields
from ..runtime import node_reads, session

__all__ = ["BlockRunner", "NotBlockable"]


class NotBlockable(Exception):
    """A value that is no plain tensor (a sequence, strings) would cross from one part to the next."""


class BlockRunner:
    """``wanted``: per part, the tensors its statistics read. ``run(k, b, feeds)`` gives part
    ``k``'s tensors for batch ``b``; parts run in order, and for each part the batches in order."""

    def __init__(self, model: onnx.ModelProto, wanted: list[list[str]]):
        g = model.graph
        self.model, self.wanted = model, [list(dict.fromkeys(w)) for w in wanted]
        producer = {o: i for i, n in enumerate(g.node) for o in n.output if o}
        reads = [node_reads(n) for n in g.node]
        done: set[int] = set()
        self.nodes: list[list[int]] = []
        for outs in self.wanted:
            need, stack = set(), [producer[t] for t in outs if t in producer]
            while stack:
                i = stack.pop()
                if i in need or i in done:
                    continue
                need.add(i)
                stack.extend(producer[t] for t in reads[i] if t in producer)
            self.nodes.append(sorted(need))
            done |= need
        part_of = {i: k for k, nodes in enumerate(self.nodes) for i in nodes}
        # what each part reads from earlier parts, and how long each handed-on tensor is kept
        self.inputs: list[set[str]] = [set() for _ in self.nodes]
        for k, nodes in enumerate(self.nodes):
            names = {t for i in nodes for t in reads[i]} | set(self.wanted[k])
            self.inputs[k] = {t for t in names if t in producer and part_of.get(producer[t], k) < k}
        self.hand_on = [set() for _ in self.nodes]
        self.last_use: dict[str, int] = {}
        for k, names in enumerate(self.inputs):
            for t in names:
                self.hand_on[part_of[producer[t]]].add(t)
                self.last_use[t] = k
        self.kept: dict[tuple[int, str], np.ndarray] = {}
        self._session = None

    def start(self, k: int):
        """Build part ``k``'s session (after part ``k - 1`` ran every batch)."""
        self._session = None
        fetch = [t for t in self.wanted[k] if t not in self.inputs[k]] + sorted(self.hand_on[k])
        self._fetch = list(dict.fromkeys(fetch))
        if self._fetch:
            self._session = session(self._part_model(k), outputs=tuple(self._fetch))

    def run(self, k: int, b: int, feeds: dict) -> dict[str, np.ndarray]:
        values = {t: self.kept[(b, t)] for t in self.inputs[k]}
        if self._session is not None:
            got = self._session.run(self._fetch, {**{n: feeds[n] for n in self._graph_inputs if n in feeds}, **values})
            values.update(zip(self._fetch, got))
        for t in self.hand_on[k]:
            self.kept[(b, t)] = values[t]
        for t in self.inputs[k]:
            if self.last_use[t] == k:
                del self.kept[(b, t)]
        return {t: values[t] for t in self.wanted[k]}

    def _part_model(self, k: int) -> onnx.ModelProto:
        """The model of part ``k``'s nodes: what earlier parts handed on are graph inputs, and
        only the initializers those nodes read are in it."""
        g = self.model.graph
        m = onnx.ModelProto()
        copy_fields(self.model, m, skip={"graph"})
        copy_fields(g, m.graph, skip={"node", "initializer", "output", "value_info", "input"})
        nodes = [g.node[i] for i in self.nodes[k]]
        m.graph.node.extend(nodes)
        read = {t for n in nodes for t in node_reads(n)} | set(self.wanted[k])
        m.graph.input.extend(vi for vi in g.input if vi.name in read)
        self._graph_inputs = [vi.name for vi in m.graph.input]
        m.graph.initializer.extend(t for t in g.initializer if t.name in read)
        for t in sorted(self.inputs[k]):
            example = next(v for (_, name), v in self.kept.items() if name == t)
            if not isinstance(example, np.ndarray) or example.dtype.kind in "OSU":
                raise NotBlockable(t)
            vi = m.graph.input.add()
            vi.name = t
            vi.type.tensor_type.elem_type = onnx.helper.np_dtype_to_tensor_dtype(example.dtype)
        m.graph.output.extend(onnx.ValueInfoProto(name=t) for t in self.wanted[k])
        return m

