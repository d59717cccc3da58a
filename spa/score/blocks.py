"""A model run block by block: OBSPA's statistics of a large model come in parts (obspa.Part),
each reading the inputs of some layers; each part runs only the nodes no earlier part ran,
from the tensors earlier parts handed on (a decoder's residual stream). Over all parts every
node runs once per batch, and only one block's weights are read at a time, where running the
model to each part's tensors would run its first layers once per part and touch every weight
up to the last part's."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..loading.model import copy_fields, release_mapped, tensor_bytes
from ..runtime import any_session, node_reads, session, weight_bytes

log = logging.getLogger(__name__)

__all__ = ["BlockRunner", "NotBlockable", "PartwiseSession", "PART_BYTES", "PARTWISE_ABOVE", "in_parts"]


class NotBlockable(Exception):
    """A value that is no plain tensor (a sequence, strings) would cross from one part to the next."""


class BlockRunner:
    """``wanted``: per part, the tensors its statistics read. ``run(k, b, feeds)`` gives part
    ``k``'s tensors for batch ``b``; parts run in order, and for each part the batches in order."""

    def __init__(self, model: onnx.ModelProto, wanted: list[list[str]], optimize: bool = True):
        g = model.graph
        self.model, self.wanted, self.optimize = model, [list(dict.fromkeys(w)) for w in wanted], optimize
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
            self._session = session(self._part_model(k), outputs=tuple(self._fetch), optimize=self.optimize)

    def finish(self):
        """Let the running part's session go."""
        self._session = None

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


# A model with more than PARTWISE_ABOVE bytes of weights is run part by part where the whole
# of it need not be one session (the oracle's masked original, the second probe's original), in parts
# of about PART_BYTES. One session reads every weight: with the oracle's masked original in one
# session, pruning the 0.15B decoder of benchmarks/big_model.py peaked at 1.9x its size; in
# parts (and its pruned weights spilled, spa.loading.model.ScratchWeights), at 1.24x.
PARTWISE_ABOVE = 256 << 20
PART_BYTES = 128 << 20


def in_parts(model: onnx.ModelProto) -> bool:
    """Whether ``model`` is run in parts (``PARTWISE_ABOVE``)."""
    return weight_bytes(model) > PARTWISE_ABOVE


class PartwiseSession:
    """A model run as consecutive parts of its nodes, each of about ``part_bytes`` of weights,
    the pages of a part's mapped weights let go before the next part runs: the outputs of one
    session, with one part's weights resident instead of all of them. ``run`` takes the
    arguments of an onnxruntime session's; ``run_many`` runs every part over several feeds
    (one session per part instead of one per part and feed). Where a part fails (a value that
    is no plain tensor crosses parts, onnxruntime trips over a part, the feeds do not fit the
    model), the whole model's session runs instead, and raises what it raises: running in
    parts is only a way to run in less memory. Without ``whole``, the part's failure is raised
    (where a failure is an answer, not worth a whole session's memory: ``probe.second_probe``)."""

    def __init__(self, model: onnx.ModelProto, part_bytes: int | None = None, optimize: bool = True,
                 whole: bool = True):
        g = model.graph
        part_bytes = part_bytes or PART_BYTES
        self.names = [o.name for o in g.output]
        sizes = {t.name: tensor_bytes(t) for t in g.initializer}
        chunks, current, held = [], [], 0
        for i, node in enumerate(g.node):
            weight = sum(sizes.get(t, 0) for t in node_reads(node))
            if current and held + weight > part_bytes:
                chunks.append(current)
                current, held = [], 0
            current.append(i)
            held += weight
        chunks.append(current)
        chunk_of = {o: k for k, nodes in enumerate(chunks) for i in nodes for o in g.node[i].output if o}
        later = [set() for _ in chunks]   # per chunk: what later chunks (or the graph's outputs) read of it
        for k, nodes in enumerate(chunks):
            for i in nodes:
                for t in node_reads(g.node[i]):
                    if chunk_of.get(t, k) < k:
                        later[chunk_of[t]].add(t)
        for t in self.names:
            if t in chunk_of:
                later[chunk_of[t]].add(t)
        self.model, self.optimize, self.whole = model, optimize, whole
        self.blocks = BlockRunner(model, [sorted(w) for w in later], optimize=optimize) \
            if all(t in chunk_of for t in self.names) else None   # an output that is an input or a weight
        self.parts = len(chunks)

    def run(self, output_names, feeds: dict) -> list[np.ndarray]:
        return self.run_many([feeds], output_names)[0]

    def run_many(self, feeds_list: list[dict], output_names=None) -> list[list[np.ndarray]]:
        names = list(output_names or self.names)
        if self.blocks is not None:
            try:
                return self._by_parts(feeds_list, names)
            except Exception as e:   # noqa: BLE001 - the whole model's session says what is wrong, if anything
                if not self.whole:
                    raise
                log.info("running the model whole: a part failed (%s)", str(e).strip().splitlines()[0][:200]
                         if str(e).strip() else type(e).__name__)
        whole = any_session(self.model) if self.optimize else session(self.model, optimize=False)
        try:
            outputs = [whole.run(names, feeds) for feeds in feeds_list]
        finally:
            del whole
            release_mapped()
        self.blocks = None   # the model runs, its parts did not: whole from now on
        return outputs

    def _by_parts(self, feeds_list: list[dict], names: list[str]) -> list[list[np.ndarray]]:
        got: list[dict] = [{} for _ in feeds_list]
        try:
            for k in range(len(self.blocks.wanted)):
                self.blocks.start(k)
                for b, feeds in enumerate(feeds_list):
                    got[b].update((t, v) for t, v in self.blocks.run(k, b, feeds).items() if t in names)
                self.blocks.finish()
                release_mapped()
        finally:
            self.blocks.kept.clear()
            self.blocks.finish()
        return [[values[t] for t in names] for values in got]
