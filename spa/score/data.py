"""Activations for data-aware criteria: calibration feeds (or synthetic ones), and per
consumer layer the statistics of its inputs, accumulated batch by batch with onnxruntime.

A *consumer* is a Conv (group 1), Gemm or MatMul whose weight is an initializer and whose
input holds a group's channels. Its input rows are what the layer multiplies with the weight
(a conv's im2col patches), with a constant 1 appended so a bias can absorb compensation.
"""

from __future__ import annotations

import logging
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import onnx
from onnx import helper
from numpy.lib.stride_tricks import sliding_window_view

from ..errors import SpaError
from ..progress import steps
from ..loading.shapes import compared_values, graph_inputs, is_open
from .selfgen import self_generated

__all__ = ["BatchLayout", "Calibration", "ConsumerSpec", "consumer_specs", "collect_stats", "feeds_from", "im2col"]

log = logging.getLogger(__name__)


class Calibration:
    """Where activations come from: user data (``.npz``, dict of arrays, or an iterable of
    feed dicts) or synthetic inputs drawn to match stated input statistics."""

    def __init__(self, data=None, input_stats: dict | None = None, samples: int = 64, batch: int = 16,
                 seed: int = 0, select: int | None = None):
        self.data, self.input_stats = data, input_stats or {}
        self.samples, self.batch, self.seed = samples, batch, seed
        self.select = select        # at most this many of the data's samples, chosen for diversity
        self.selected = None        # which ones (indices into the pool), once chosen
        self.generated = False      # the synthetic token ids were replaced by text the model wrote
        self.inverted = False       # ``data`` holds images inverted from the model (invert.py), not the user's
        self.inversion: dict = {}   # how the inversion went, or why it was skipped (for the report)
        # text written by the first model this calibration fed (the unpruned one), reused for
        # the pruned models of later steps and the data-free stand-in (without_data)
        self.written: dict = {}
        # () -> input shapes at which the model also runs (the second probe), or None: where the
        # model fixes its batch, synthetic token ids go in fewer runs of that length (_longer_runs)
        self.longer_shapes = None

    def without_data(self) -> "Calibration":
        """The same synthetic settings, no data: what data-free pruning would use."""
        stand_in = Calibration(None, self.input_stats, self.samples, self.batch, self.seed)
        stand_in.written, stand_in.longer_shapes = self.written, self.longer_shapes
        return stand_in

    @property
    def given(self) -> bool:
        """Whether the user gave data: its errors are theirs to hear of, not to fall back from."""
        return self.data is not None and not self.inverted

    def invert(self, model: onnx.ModelProto, input_shapes: dict, macs, samples: int, seed: int = 0,
               budget: float | None = None, announce=None) -> bool:
        """Without data: replace the synthetic images by ``samples`` images inverted from the
        model's classes where that applies within ``budget`` (invert.py; ``macs()``: the
        model's per sample); whether it did."""
        from .invert import inverted_images, why_not_invert
        if self.data is not None:
            return False
        layout = BatchLayout.of(model, input_shapes)
        why = why_not_invert(model, samples, macs, budget) if layout.free else "the model fixes its batch size"
        if why:
            self.inversion = {"inversion_skipped": why}
            return False
        start = next(_synthetic(model, input_shapes, self.input_stats, samples, samples, self.seed, layout))
        name = graph_inputs(model)[0].name
        images = inverted_images(model, start[name], seed, self.inversion, announce)
        if images is None:
            return False
        self.data, self.inverted = {name: images}, True
        return True

    @property
    def source(self) -> str:
        if self.inverted:
            return "images inverted from the model's own classes (data-free)"
        if self.data is not None:
            return "calibration data"
        return "text the model wrote itself (data-free)" if self.generated else "synthetic inputs (data-free)"

    def batches(self, model: onnx.ModelProto, input_shapes: dict) -> list[dict]:
        return list(self._feeds(model, input_shapes))

    def first_batch(self, model: onnx.ModelProto, input_shapes: dict) -> dict:
        """Only the first batch (the data is validated, not all cut into batches)."""
        return next(iter(self._feeds(model, input_shapes)))

    def split(self, model: onnx.ModelProto, input_shapes: dict, every: int = 4, least: int = 8):
        """(fit, held out): every ``every``-th sample held out of each batch (every
        ``every``-th batch where the model fixes the batch size), the rest as a Calibration of
        its own; None without data or with fewer than ``least`` samples."""
        if self.data is None:
            return None
        layout = BatchLayout.of(model, input_shapes)
        batches = self.batches(model, input_shapes)
        if sum(layout.count(b) for b in batches) < least:
            return None
        if not layout.free:
            held = batches[every - 1::every]
            fit = [b for i, b in enumerate(batches) if i % every != every - 1]
            return (Calibration(fit, self.input_stats, self.samples, self.batch, self.seed), held) if held else None
        fit, held = [], []
        for feeds in batches:
            n = layout.count(feeds)
            out = np.arange(n) % every == every - 1
            for keep, into in ((~out, fit), (out, held)):
                if keep.any():
                    into.append({k: v if layout.axes.get(k) is None else np.compress(keep, v, axis=layout.axes[k])
                                 for k, v in feeds.items()})
        return Calibration(fit, self.input_stats, self.samples, self.batch, self.seed), held

    def _feeds(self, model: onnx.ModelProto, input_shapes: dict) -> Iterator[dict]:
        layout = BatchLayout.of(model, input_shapes)
        batch = self.batch if layout.free else layout.size
        if self.data is not None:
            data = _load(self.data, model)
            if self.select and isinstance(data, dict) and layout.free:
                if self.selected is None:
                    pool = list(feeds_from(data, model, input_shapes, batch, layout))   # validates it, too
                    self.selected = np.arange(sum(layout.count(f) for f in pool))
                    if len(self.selected) > self.select:
                        from .select import select_feeds
                        self.selected = select_feeds(model, self.select, layout, pool, self.seed)
                data = {k: v if layout.axes.get(k) is None else np.take(v, self.selected, axis=layout.axes[k])
                        for k, v in data.items()}
            return feeds_from(data, model, input_shapes, batch, layout)
        batches = list(_synthetic(model, input_shapes, self.input_stats, self.samples, batch, self.seed, layout))
        vocab = _token_ranges(model)
        written = self_generated(model, batches, vocab, self.seed, layout.free, self.written) if vocab else None
        self.generated = written is not None
        if written is None and vocab and not layout.free:
            batches = self._longer_runs(model, input_shapes, layout, vocab) or batches
        return iter(written or batches)

    def _longer_runs(self, model: onnx.ModelProto, input_shapes: dict, layout: "BatchLayout",
                     vocab: dict) -> list[dict] | None:
        """Random token ids for a model that fixes its batch, as many positions as ``samples``
        sequences at ``input_shapes`` but in fewer, longer runs (at ``longer_shapes``), or None.
        Such a model runs one sample at a time, and a run of a few tokens costs little less
        than one of a hundred: each reads every weight, and a session fed its weights packs
        them again every run (runtime.session). A 1.1B decoder, 1024 positions: 42 s in 64
        runs of 16 tokens, 17 s in 8 of 128."""
        longer = self.longer_shapes() if self.longer_shapes is not None else None
        tokens = [name for name in vocab if name in input_shapes]
        if not longer or not tokens or set(longer) != set(input_shapes):
            return None
        factor = min(math.prod(longer[n]) / max(1, math.prod(input_shapes[n])) for n in tokens)
        if factor <= 1 or BatchLayout.of(model, longer).free:
            return None
        samples = max(1, math.ceil(self.samples / factor))
        return list(_synthetic(model, longer, self.input_stats, samples, layout.size, self.seed, layout))


@dataclass
class BatchLayout:
    """Which axis of each graph input carries the batch, and whether its size may be chosen.

    An input's first axis carries it when the model leaves that axis open; another axis does
    when it bears the same symbolic name as an open first axis (a recurrent state
    ``[layers, batch, hidden]``). Scalars (a sample rate) and inputs whose batch axis cannot
    be told have none: they are fed at their analysed shape. The batch size is free only when
    every input that is not a scalar has a batch axis; otherwise every batch has the analysed
    shapes, which are known to run (a fixed-batch export, a state of static shape)."""

    axes: dict[str, int | None]
    free: bool
    size: int                       # the batch size when not free

    @classmethod
    def of(cls, model: onnx.ModelProto, input_shapes: dict) -> "BatchLayout":
        inputs = graph_inputs(model)
        declared = {vi.name: list(vi.type.tensor_type.shape.dim) for vi in inputs}
        symbols = {dims[0].dim_param for dims in declared.values()
                   if dims and is_open(dims[0]) and dims[0].dim_param}
        axes: dict[str, int | None] = {}
        for vi in inputs:
            dims, rank = declared[vi.name], len(input_shapes[vi.name])
            axis = None
            if rank and len(dims) == rank:
                if is_open(dims[0]):
                    axis = 0
                else:
                    axis = next((a for a, d in enumerate(dims) if d.dim_param and d.dim_param in symbols), None)
            axes[vi.name] = axis
        shaped = [vi.name for vi in inputs if input_shapes[vi.name]]
        if not any(axes[n] is not None for n in shaped):
            # no open batch axis: a static-batch export, whose first axis carries the batch
            # in every input where it has that size
            first = input_shapes[shaped[0]][0] if shaped else 1
            axes = {n: 0 if input_shapes[n] and input_shapes[n][0] == first else None for n in axes}
            return cls(axes, False, max(int(first), 1))
        batched = next(n for n in shaped if axes[n] is not None)
        size = max(int(input_shapes[batched][axes[batched]]), 1)
        return cls(axes, all(axes[n] is not None for n in shaped), size)

    def count(self, feeds: dict) -> int:
        """The number of samples in one feed dict."""
        for name, axis in self.axes.items():
            if axis is not None and name in feeds and np.ndim(feeds[name]) > axis:
                return int(np.shape(feeds[name])[axis])
        return 1


def _load(data, model: onnx.ModelProto):
    if isinstance(data, (str, Path)):
        from ..loading.data_files import calibration_data
        return calibration_data(data, model)
    return data


def _take(arr: np.ndarray, axis: int, start: int, stop: int) -> np.ndarray:
    return arr[(slice(None),) * axis + (slice(start, stop),)]


def feeds_from(data, model: onnx.ModelProto, input_shapes: dict, batch: int,
               layout: BatchLayout | None = None) -> Iterator[dict]:
    """Validate calibration data against the model's inputs and cut it into batches.

    An input with a batch axis takes its samples along that axis. One without (a scalar
    such as a sample rate, a state of static shape) takes either one array of its exact
    shape, fed to every batch, or one such value per sample (a leading sample axis), of
    which each batch gets its first."""
    data = _load(data, model)
    layout = layout or BatchLayout.of(model, input_shapes)
    inputs = {i.name: i for i in graph_inputs(model)}
    if isinstance(data, dict):
        missing = sorted(set(inputs) - set(data))
        if missing:
            raise SpaError(f"calibration data lacks input(s) {missing}; it has {sorted(data)} "
                           f"(arrays must be named after the model's inputs)")
        arrays = {k: np.asarray(data[k]) for k in inputs}
        counts, per_sample = {}, {}
        for name, vi in inputs.items():
            arr, want, axis = arrays[name], tuple(input_shapes[name]), layout.axes[name]
            if axis is None:
                if arr.shape == want:
                    continue                   # the same value for every batch
                if arr.shape[1:] != want:
                    per_sample_shape = "(" + ", ".join(["S"] + [str(d) for d in want]) + ")"
                    raise SpaError(f"calibration input {name!r} has shape {arr.shape}; the model expects "
                                   f"{want}, or one such value per sample {per_sample_shape}")
                counts[name], per_sample[name] = len(arr), True
                continue
            dims = vi.type.tensor_type.shape.dim
            rest = [a for a in range(len(want)) if a != axis]
            have = tuple(arr.shape[a] for a in rest) if arr.ndim == len(want) else arr.shape
            if arr.ndim != len(want) or any(
                    not is_open(dims[a]) and arr.shape[a] != want[a] for a in rest if a < len(dims)):
                raise SpaError(f"calibration input {name!r} has per-sample shape {have}, "
                               f"the model expects {tuple(want[a] for a in rest)}")
            counts[name] = arr.shape[axis]
        if len(set(counts.values())) > 1:
            raise SpaError(f"calibration arrays have different sample counts: {sorted(set(counts.values()))}")
        n = counts.popitem()[1] if counts else 1
        if n < 2:
            raise SpaError(f"calibration data has {n} sample(s); at least 2 are needed")
        if not layout.free and n < batch:
            raise SpaError(f"the model takes batches of exactly {batch} samples; calibration data has {n}")
        for start in range(0, n if layout.free else n - batch + 1, batch):
            feeds = {}
            for k in inputs:
                axis = layout.axes[k]
                if axis is not None:
                    value = _take(arrays[k], axis, start, start + batch)
                else:
                    value = arrays[k][start] if per_sample.get(k) else arrays[k]
                feeds[k] = _cast(value, inputs[k])
            yield feeds
        return
    count = 0
    for feeds in data:
        missing = sorted(set(inputs) - set(feeds))
        if missing:
            raise SpaError(f"calibration feed lacks input(s) {missing}")
        count += layout.count(feeds)
        yield {k: _cast(np.asarray(feeds[k]), inputs[k]) for k in inputs}
    if count < 2:
        raise SpaError(f"calibration data has {count} sample(s); at least 2 are needed")


def _cast(arr, vi):
    return np.asarray(arr).astype(helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type), copy=False)


# OBS's damping (a share of the mean of H's diagonal) where none is asked for. Models that read
# token ids get more. SmolLM2-135M, 20 % of its parameters removed (benchmarks/lm_smollm2.py):
# without data, perplexity x3.03 / x2.77 / x2.64 / x3.14 at 0.01 / 0.1 / 0.3 / 1; calibrated, x1.46
# at 0.3 against x1.61 at 0.01. Image models lose a little with more (folded Fashion mobile net at
# half its MACs, no data: 0.637 at 0.01, 0.591 at 0.1).
DAMPING, TOKEN_DAMPING = 0.01, 0.3


def default_damping(model: onnx.ModelProto) -> float:
    """OBS's damping for ``model`` when the caller asks for none: TOKEN_DAMPING where a graph
    input is token ids, else DAMPING."""
    inputs = {vi.name for vi in graph_inputs(model)}
    return TOKEN_DAMPING if inputs & set(_token_ranges(model)) else DAMPING


def _token_ranges(model) -> dict[str, int]:
    """Integer inputs used as Gather indices (token ids) and the size of the table they index."""
    inits = {t.name: t for t in model.graph.initializer}
    out = {}
    for node in model.graph.node:
        if node.op_type == "Gather" and len(node.input) > 1 and node.input[0] in inits:
            out.setdefault(node.input[1], int(inits[node.input[0]].dims[0]))
    return out


def _synthetic(model, input_shapes, stats, samples, batch, seed, layout: BatchLayout):
    rng = np.random.default_rng(seed)
    vocab, compared = _token_ranges(model), compared_values(model)
    for start in range(0, samples, batch):
        n = min(batch, samples - start) if layout.free else batch
        feeds = {}
        for vi in graph_inputs(model):
            shape = list(input_shapes[vi.name])
            if layout.axes[vi.name] is not None:
                shape[layout.axes[vi.name]] = n
            shape = tuple(shape)
            dtype = helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
            if np.issubdtype(dtype, np.floating):
                mean, std = stats.get(vi.name, stats.get("*", (0.0, 1.0)))
                x = _natural_noise(rng, shape)
                if len(shape) > 1 and np.ndim(mean) == 1 and len(mean) == shape[1]:
                    bshape = (1, -1) + (1,) * (len(shape) - 2)
                    x = x * np.reshape(std, bshape) + np.reshape(mean, bshape)
                else:
                    x = x * std + mean
                feeds[vi.name] = x.astype(dtype)
            elif vi.name in vocab:  # token ids: uniform over the embedding table
                feeds[vi.name] = rng.integers(0, vocab[vi.name], shape).astype(dtype)
            elif vi.name in compared:  # a scalar the graph compares (a sample rate): that value
                feeds[vi.name] = np.full(shape, compared[vi.name], dtype)
            else:  # masks attend everywhere; other integer inputs (token types) take 0
                feeds[vi.name] = (np.ones if "mask" in vi.name.lower() else np.zeros)(shape, dtype=dtype)
        yield feeds


def _natural_noise(rng, shape) -> np.ndarray:
    """Unit-variance noise; on image-like inputs (N, C, H, W) a dead-leaves image: opaque discs
    and rectangles of random colour, radii drawn with density r^-3 (scale invariant), each
    occluding those before it. Such images share natural images' edges and 1/f-like spectrum
    (Baradad et al. 2021, "Learning to see by looking at noise"), and their statistics
    compensate better than 1/f Gaussian noise: data-free OBSPA at ratio 0.2 / 0.3 / 0.5,
    Fashion ResNet 0.865 / 0.534 / 0.242 -> 0.893 / 0.691 / 0.337, Fashion VGG
    0.900 / 0.886 / 0.654 -> 0.895 / 0.880 / 0.666 (top-1, 2000 test images)."""
    x = rng.standard_normal(shape)
    if len(shape) != 4 or min(shape[2:]) < 8:
        return x
    n, c, h, w = shape
    yy, xx = np.mgrid[0:h, 0:w]
    rmin, rmax = max(h, w) / 40, max(h, w) / 2
    for i in range(n):
        img = np.broadcast_to(rng.uniform(-1, 1, (c, 1, 1)), (c, h, w)).copy()
        for _ in range(int(rng.integers(10, 60))):
            u = rng.uniform()
            r = 1 / np.sqrt(1 / rmin ** 2 - u * (1 / rmin ** 2 - 1 / rmax ** 2))   # inverse CDF of r^-3
            cy, cx = rng.uniform(0, h), rng.uniform(0, w)
            if rng.uniform() < 0.5:
                leaf = (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
            else:
                leaf = (np.abs(yy - cy) < r) & (np.abs(xx - cx) < r * rng.uniform(0.3, 1))
            img[:, leaf] = rng.uniform(-1, 1, (c, 1))
        x[i] = img
    x -= x.mean(axis=(2, 3), keepdims=True)
    return x / (x.std(axis=(2, 3), keepdims=True) + 1e-12)


@dataclass
class ConsumerSpec:
    node: onnx.NodeProto
    kind: str                       # conv, gemm, matmul
    data: str                       # the input tensor holding the channels
    weight: str                     # initializer name
    taps: int = 1                   # columns per input index (conv kernel size)
    bias: str | None = None         # initializer holding the bias, if any


def _attr(node, name, default=None):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def consumer_specs(model: onnx.ModelProto, contractions) -> dict[str, ConsumerSpec]:
    """Layers with an initializer weight that contract a data input, by node name."""
    inits = {t.name: t for t in model.graph.initializer}
    nodes = {n.name: n for n in model.graph.node}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            readers.setdefault(i, []).append(n)
    # Only tensors of the main graph can be fetched from onnxruntime (a tensor inside an
    # If/Loop/Scan body is no graph value): a layer reading anything else is left out, and
    # its groups fall back to the data-free choice.
    values = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.input}
    specs = {}
    for node_name, k, axis in contractions:
        node = nodes.get(node_name)
        if node is None or node.input[0] not in values:
            continue
        if k != 0 or len(node.input) < 2 or node.input[1] not in inits or node.input[0] in inits:
            continue
        w = inits[node.input[1]]
        if node.op_type == "Conv" and _attr(node, "group", 1) == 1:
            bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
            specs[node_name] = ConsumerSpec(node, "conv", node.input[0], w.name, int(np.prod(w.dims[2:])), bias)
        elif node.op_type == "Gemm" and not _attr(node, "transA", 0) and len(w.dims) == 2:
            bias = node.input[2] if len(node.input) > 2 and node.input[2] in inits else None
            if bias is not None and list(inits[bias].dims) not in ([w.dims[0 if _attr(node, "transB", 0) else 1]],):
                bias = None  # a broadcast scalar or matrix C is not a per-output bias
            specs[node_name] = ConsumerSpec(node, "gemm", node.input[0], w.name, 1, bias)
        elif node.op_type == "MatMul" and len(w.dims) == 2:
            adds = [r for r in readers.get(node.output[0], []) if r.op_type == "Add"]
            bias = None
            if len(adds) == 1:
                other = [i for i in adds[0].input if i != node.output[0]]
                if other and other[0] in inits and list(inits[other[0]].dims) == [w.dims[1]]:
                    bias = other[0]
            specs[node_name] = ConsumerSpec(node, "matmul", node.input[0], w.name, 1, bias)
    return specs


def weight_matrix(spec: ConsumerSpec, w: np.ndarray) -> np.ndarray:
    """The weight as (out, in*taps), columns in the order of the input rows."""
    if spec.kind == "conv":
        return w.reshape(w.shape[0], -1)
    if spec.kind == "gemm" and _attr(spec.node, "transB", 0):
        return w
    return w.T


def from_weight_matrix(spec: ConsumerSpec, m: np.ndarray, shape) -> np.ndarray:
    if spec.kind == "conv" or (spec.kind == "gemm" and _attr(spec.node, "transB", 0)):
        return m.reshape(shape)
    return np.ascontiguousarray(m.T)


def im2col(x: np.ndarray, node: onnx.NodeProto, w_shape, rows: np.ndarray | None = None) -> np.ndarray:
    """Patches of a Conv input as rows (positions x in_channels*taps); ``rows`` picks positions."""
    nd = x.ndim - 2
    kernel = list(w_shape[2:])
    strides = _attr(node, "strides", [1] * nd)
    dil = _attr(node, "dilations", [1] * nd)
    pads = list(_attr(node, "pads", [0] * 2 * nd))
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        for i in range(nd):
            out = -(-x.shape[2 + i] // strides[i])
            total = max((out - 1) * strides[i] + (kernel[i] - 1) * dil[i] + 1 - x.shape[2 + i], 0)
            small, big = total // 2, total - total // 2
            pads[i], pads[i + nd] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0] * 2 * nd
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pads[i], pads[i + nd]) for i in range(nd)])
    extent = [(k - 1) * d + 1 for k, d in zip(kernel, dil)]
    win = sliding_window_view(xp, extent, axis=tuple(range(2, 2 + nd)))
    win = win[(slice(None), slice(None)) + tuple(slice(None, None, s) for s in strides)
              + tuple(slice(None, None, d) for d in dil)]
    out_shape = (x.shape[0],) + win.shape[2:2 + nd]
    if rows is None:
        rows = np.arange(int(np.prod(out_shape)))
    idx = np.unravel_index(rows, out_shape)
    patches = win[(idx[0], slice(None)) + tuple(idx[1:])]          # (m, C, *kernel)
    return patches.reshape(len(rows), -1)


# Above this many features a layer whose sampled rows are fewer than its features keeps the
# rows instead of their (D+1)^2 Gram matrix (obs.LowRankConsumer works from them), and without
# a reference model it samples at most WIDE_ROWS of them: OBS on those costs rows^2 x D, and
# halving them halved crepe tiny's data-free time (3.5 -> 1.7 s) at no measured loss
# (pitch accuracy at ratio 0.3 / 0.5: 0.712 / 0.484 with 2048 rows, 0.746 / 0.464 with 1024).
WIDE = 2048
WIDE_ROWS = 1024


@dataclass
class InputStats:
    """A layer's sampled input rows, each with a constant 1 appended: either their Gram matrix
    ``h`` = X^T X (D+1, D+1), or, for a wide layer with fewer rows than features, the rows X."""

    gram: np.ndarray | None = None
    n: int = 0
    channel_max: np.ndarray | None = None  # max |x| per index of the contracted axis
    cross: np.ndarray | None = None  # (D+1, D+1) reference rows x these rows, when asked
    rows: np.ndarray | None = None   # (n, D+1) float32, kept instead of gram for wide layers

    @property
    def h(self) -> np.ndarray:
        if self.gram is None:
            self.gram = (self.rows.T @ self.rows).astype(np.float64)
        return self.gram

    @property
    def diag(self) -> np.ndarray:
        if self.rows is not None:
            return np.einsum("nd,nd->d", self.rows, self.rows, dtype=np.float64)
        return np.diag(self.gram).copy()

    @property
    def mean(self) -> np.ndarray:
        if self.rows is not None:
            return self.rows[:, :-1].mean(axis=0, dtype=np.float64) if self.n else np.zeros(self.rows.shape[1] - 1)
        return self.h[-1, :-1] / max(self.n, 1)


def _session_with_outputs(model: onnx.ModelProto, tensors: list[str], optimize: bool = True):
    """A session that also returns ``tensors``; ``optimize=False`` where onnxruntime would fuse
    a producer away (a BatchNormalization folded into its Conv has no output left to return)."""
    from ..runtime import session
    return session(model, optimize=optimize, outputs=tuple(tensors))


def collect_stats(model: onnx.ModelProto, specs: dict[str, ConsumerSpec], batches: list[dict],
                  axis_of: dict[str, int], max_rows: int = 2048, seed: int = 0,
                  reference: onnx.ModelProto | None = None, run=None) -> dict[str, InputStats]:
    """Run the model once over the batches (or ``run(batch index, feeds)``, which gives the
    layers' input tensors by name: a part of a model run block by block); per consumer,
    accumulate its input statistics from at most ``max_rows`` rows (positions x samples) in
    all. With a ``reference`` model (the unpruned original), also the cross moments of its
    inputs with the model's, on the same rows: what lets a layer be refit to reproduce the
    reference's output."""
    if not specs:
        return {}
    tensors = sorted({s.data for s in specs.values()})
    sess = None if run is not None else _session_with_outputs(model, tensors)
    ref = _session_with_outputs(reference, tensors) if reference is not None else None
    inits = {t.name: t for t in model.graph.initializer}
    # one stream a consumer: its rows do not depend on which others are collected with it
    # (OBSPA collects a large model's consumers in parts)
    rngs = {name: np.random.default_rng([seed, zlib.crc32(name.encode())]) for name in specs}
    rows_of: dict[str, list] = {}
    ref_rows_of: dict[str, list] = {}
    cmax_of: dict[str, np.ndarray] = {}
    per_batch = max(1, -(-max_rows // max(1, len(batches))))
    wide_per_batch = max(1, -(-min(max_rows, WIDE_ROWS) // max(1, len(batches))))
    # one count over the batches' layer inputs and the products at the end: ResNet-50 spends
    # minutes here with nothing else to show
    with steps((len(batches) + 1) * len(specs), "layer statistics") as step:
        for index, feeds in enumerate(batches):
            values = run(index, feeds) if run is not None else dict(zip(tensors, sess.run(tensors, feeds)))
            ref_values = dict(zip(tensors, ref.run(tensors, feeds))) if ref is not None else None
            mask = _token_mask(feeds)
            for name, spec in specs.items():
                x = values[spec.data]
                axis = axis_of[name]
                other = tuple(i for i in range(x.ndim) if i != axis)
                cmax = np.abs(x).max(axis=other)
                if spec.kind == "conv":
                    w_shape = list(inits[spec.weight].dims)
                    width = int(np.prod(w_shape[1:]))
                    limit = wide_per_batch if width >= WIDE and ref is None else per_batch
                    rows = _pick(rngs[name], _conv_positions(x, spec.node, w_shape), limit)
                else:
                    limit = wide_per_batch if x.shape[axis] >= WIDE and ref is None else per_batch
                    if mask is not None and x.ndim == 3 and axis == 2 and x.shape[:2] == mask.shape:
                        real = np.flatnonzero(mask)    # padding's rows are no input the layer must serve
                        rows = real[_pick(rngs[name], len(real), limit)]
                    else:
                        rows = _pick(rngs[name], x.size // x.shape[axis], limit)
                # keep the (few thousand) sampled rows; one product per consumer at the end
                rows_of.setdefault(name, []).append(_features(x, spec, axis, rows, inits))
                if ref_values is not None:
                    ref_rows_of.setdefault(name, []).append(
                        _features(ref_values[spec.data], spec, axis, rows, inits))
                cmax_of[name] = np.maximum(cmax_of[name], cmax) if name in cmax_of else cmax
                step()
        stats = {}
        for name, parts in rows_of.items():
            feats = np.concatenate(parts)
            del parts[:]
            if feats.shape[1] > WIDE and len(feats) < feats.shape[1] and name not in ref_rows_of:
                stats[name] = InputStats(None, len(feats), cmax_of[name], rows=feats)
            else:
                st = stats[name] = InputStats((feats.T @ feats).astype(np.float64), len(feats), cmax_of[name])
                if name in ref_rows_of:
                    st.cross = (np.concatenate(ref_rows_of.pop(name)).T @ feats).astype(np.float64)
            step()
    return stats


def _token_mask(feeds: dict) -> np.ndarray | None:
    """The (batch, seq) attention mask among the feeds, when there is exactly one: a 2-D
    integer or boolean input named like a mask, holding only 0 and 1, with some zeros."""
    masks = [v for k, v in feeds.items() if "mask" in k.lower() and isinstance(v, np.ndarray) and v.ndim == 2
             and (v.dtype == bool or np.issubdtype(v.dtype, np.integer))]
    if len(masks) != 1 or not np.isin(masks[0], (0, 1)).all() or masks[0].all() or not masks[0].any():
        return None
    return masks[0].astype(bool)


def _features(x, spec: ConsumerSpec, axis: int, rows, inits) -> np.ndarray:
    """The rows a layer multiplies with its weight, plus a constant 1 (float32)."""
    if spec.kind == "conv":
        feats = im2col(x, spec.node, list(inits[spec.weight].dims), rows)
    else:
        feats = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])[rows]
    return np.concatenate([feats, np.ones((len(feats), 1), feats.dtype)], axis=1).astype(np.float32)


def _conv_positions(x, node, w_shape) -> int:
    nd = x.ndim - 2
    strides = _attr(node, "strides", [1] * nd)
    dil = _attr(node, "dilations", [1] * nd)
    pads = _attr(node, "pads", [0] * 2 * nd)
    auto = _attr(node, "auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    out = []
    for i in range(nd):
        n = x.shape[2 + i]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out.append(-(-n // strides[i]))
        else:
            p = 0 if auto == "VALID" else pads[i] + pads[i + nd]
            out.append((n + p - (w_shape[2 + i] - 1) * dil[i] - 1) // strides[i] + 1)
    return x.shape[0] * int(np.prod(out))


def _pick(rng, total, limit):
    return np.arange(total) if total <= limit else np.sort(rng.choice(total, limit, replace=False))
