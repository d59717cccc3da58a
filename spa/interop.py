"""onnx-graphsurgeon interop (optional extra ``graphsurgeon``): TensorRT workflows hold their
models as ``gs.Graph``. spa works on ``onnx.ModelProto``; a graph is exported on the way in and
imported on the way out, so the engine never sees graph-surgeon objects (whose ``Node`` and
``Tensor`` define ``__eq__`` without ``__hash__``, see STYLE.md)."""

from __future__ import annotations

import onnx

from .errors import SpaError

__all__ = ["is_graphsurgeon_graph", "from_graphsurgeon", "to_graphsurgeon"]

INSTALL_HINT = "onnx-graphsurgeon is not installed (pip install 'spa-prune[graphsurgeon]')"


def is_graphsurgeon_graph(obj) -> bool:
    """True for an ``onnx_graphsurgeon.Graph``, without importing onnx_graphsurgeon (spa runs
    without it)."""
    cls = type(obj)
    return cls.__name__ == "Graph" and cls.__module__.split(".")[0] == "onnx_graphsurgeon"


def _gs():
    try:
        import onnx_graphsurgeon as gs
    except ImportError:
        raise SpaError(INSTALL_HINT) from None
    return gs


def from_graphsurgeon(graph) -> onnx.ModelProto:
    """The graph as a model; the graph itself is left as it was."""
    try:
        return _gs().export_onnx(graph)
    except SpaError:
        raise
    except Exception as e:
        raise SpaError(f"onnx-graphsurgeon cannot export this graph to ONNX: {type(e).__name__}: "
                       f"{str(e).splitlines()[0] if str(e) else ''}") from None


def to_graphsurgeon(model: onnx.ModelProto):
    """The model as an ``onnx_graphsurgeon.Graph``."""
    return _gs().import_onnx(model)
