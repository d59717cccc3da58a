"""Export torchvision classification models to ONNX (random init, eval mode).

Files are cached: ``export(name, exporter, out_dir)`` writes
``out_dir/f"{name}-{exporter}.onnx"`` once and afterwards just returns the
path.  Non-default ``opset`` / ``image_size`` values get a suffix
(``-opset18``, ``-s64``) so differently shaped exports never collide with the
default cache entry.

Weights are never downloaded (``weights=None``); ``torch.manual_seed(0)`` is
set before each model is built, so exports are deterministic.

CLI::

    python models/torchvision_zoo.py --exporter legacy --out /tmp/zoo resnet18 mobilenet_v3_small
    python models/torchvision_zoo.py --exporter dynamo --out /tmp/zoo --all
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import logging
import os
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

__all__ = ["classification_models", "export", "default_image_size", "EXPORTERS"]

EXPORTERS = ("legacy", "dynamo")
_DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}
_TWO_GB = 2**31

# ---------------------------------------------------------------------------
# torchvision 0.28.0 here is a CUDA build whose C++ ops do not load on this
# CPU-only torch; its meta registrations then fail on import because
# torchvision::nms / torchvision::qnms are not defined.  Define the schemas
# (no kernels) before importing torchvision.  Guarded so that a second import
# of this module (e.g. as __main__ and as models.torchvision_zoo) or a working
# torchvision build does not try to redefine them.
# ---------------------------------------------------------------------------
_TV_OP_SCHEMAS = {
    "nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
}
_lib = None  # keep the Library alive for the life of the process


def _has_op(qualname: str) -> bool:
    try:
        torch._C._get_schema(qualname, "")
        return True
    except RuntimeError:
        return False


def _ensure_torchvision_ops() -> None:
    global _lib
    for op, schema in _TV_OP_SCHEMAS.items():
        if _has_op(f"torchvision::{op}"):
            continue
        if _lib is None:
            try:
                _lib = torch.library.Library("torchvision", "DEF")
            except RuntimeError:  # namespace already owned by someone else
                _lib = torch.library.Library("torchvision", "FRAGMENT")
        _lib.define(schema)


_ensure_torchvision_ops()

import torchvision  # noqa: E402  (must come after the op definitions)

# ---------------------------------------------------------------------------
# Model catalogue
# ---------------------------------------------------------------------------
_PARAM_CACHE_NAME = "torchvision_param_counts.json"


def _all_classification_names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _count_params(name: str) -> int:
    """Exact parameter count of the 1000-class model.

    Built on the meta device (no memory, no init cost); models whose
    constructor computes with tensors (RegNet) fall back to the count recorded
    in their weights metadata, and only then to a real instantiation.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = torchvision.models.get_model(name, weights=None)
            return sum(p.numel() for p in model.parameters())
        except Exception:
            pass
        try:
            weights = torchvision.models.get_model_weights(name)
            return int(next(iter(weights)).meta["num_params"])
        except Exception:
            pass
        model = torchvision.models.get_model(name, weights=None)
        return sum(p.numel() for p in model.parameters())


def _param_cache_path() -> Path:
    base = os.environ.get("SPA_ZOO_CACHE") or os.path.join(tempfile.gettempdir(), "zoo")
    return Path(base) / _PARAM_CACHE_NAME


def param_counts() -> dict[str, int]:
    """{model name: parameter count} for every torchvision classification model.

    Cached in a small JSON (``$SPA_ZOO_CACHE`` or ``/tmp/zoo``), keyed by the
    torchvision version.
    """
    names = _all_classification_names()
    path = _param_cache_path()
    key = torchvision.__version__
    try:
        cached = json.loads(path.read_text())
        counts = cached.get(key, {})
    except (OSError, ValueError):
        cached, counts = {}, {}
    missing = [n for n in names if n not in counts]
    if missing:
        for n in missing:
            counts[n] = _count_params(n)
        cached = {key: counts}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".json.tmp")
            with os.fdopen(fd, "w") as fh:
                json.dump(cached, fh, indent=1, sort_keys=True)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
        except OSError:
            pass  # caching is best effort
    return {n: counts[n] for n in names}


def classification_models(max_params: int = 100_000_000) -> list[str]:
    """Names of torchvision classification models with fewer than ``max_params`` parameters."""
    return [n for n, c in param_counts().items() if c < max_params]


# ---------------------------------------------------------------------------
# Input sizes
# ---------------------------------------------------------------------------
# Smallest input side (pixels) a model accepts; others work at 32+.
_MIN_SIZE = {"inception_v3": 75}


def _fixed_size(name: str) -> bool:
    """Models that only export at their default size.

    AlexNet/VGG end in AdaptiveAvgPool2d to 6x6/7x7, which the legacy exporter
    only handles when the feature map is a multiple of it; MaxViT's 7x7
    window partitions need the side to be a multiple of 224.
    """
    return name == "alexnet" or name.startswith("vgg") or name.startswith("maxvit")


def default_image_size(name: str) -> int:
    return 299 if name == "inception_v3" else 224


def _build_kwargs_and_size(name: str, image_size: int | None) -> tuple[dict, int]:
    """Constructor kwargs and the actual input side for ``image_size``."""
    if image_size is None or image_size == default_image_size(name) or _fixed_size(name):
        return {}, default_image_size(name)
    size = int(image_size)
    if name.startswith("vit_"):
        # ViT has a fixed positional embedding sized by the constructor.
        patch = int(name.rsplit("_", 1)[1])
        size = max(patch, size - size % patch)
        return {"image_size": size}, size
    if name.startswith("swin"):
        size = max(32, size - size % 32)
        return {}, size
    return {}, max(size, _MIN_SIZE.get(name, 32))


def _build_model(name: str, kwargs: dict) -> torch.nn.Module:
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = torchvision.models.get_model(name, weights=None, **kwargs)
    return model.eval()


def _example_input(size: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, 3, size, size, generator=g)


def build(name: str, image_size: int | None = None) -> tuple[torch.nn.Module, torch.Tensor]:
    """The eval-mode model (seed 0) and a deterministic example input, as exported."""
    kwargs, size = _build_kwargs_and_size(name, image_size)
    return _build_model(name, kwargs), _example_input(size)


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------
def output_path(
    name: str, exporter: str, out_dir: str | Path, opset: int | None = None, image_size: int | None = None
) -> Path:
    suffix = ""
    if opset is not None and opset != _DEFAULT_OPSET[exporter]:
        suffix += f"-opset{opset}"
    size = _build_kwargs_and_size(name, image_size)[1]  # the size actually used
    if size != default_image_size(name):
        suffix += f"-s{size}"
    return Path(out_dir) / f"{name}-{exporter}{suffix}.onnx"


@contextlib.contextmanager
def _redirect_fds():
    """Send OS-level stdout/stderr to a temp file (the legacy exporter's C++
    side prints whole TorchScript graphs there on failure)."""
    try:
        sys.stdout.flush()
        sys.stderr.flush()
    except Exception:
        pass
    saved = []
    try:
        with tempfile.TemporaryFile() as sink:
            try:
                for fd in (1, 2):
                    saved.append((fd, os.dup(fd)))
                    os.dup2(sink.fileno(), fd)
            except OSError:
                pass  # no usable fds (embedded interpreter); just don't redirect
            yield
    finally:
        for fd, dup in saved:
            os.dup2(dup, fd)
            os.close(dup)


@contextlib.contextmanager
def _quiet():
    """Silence exporter warnings, logging and stdout/stderr progress chatter."""
    sink = io.StringIO()
    prev_disable = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            with _redirect_fds():
                yield sink
    finally:
        logging.disable(prev_disable)


def _export_legacy(model, x, path: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        (x,),
        str(path),
        dynamo=False,
        opset_version=opset,
        do_constant_folding=True,
        input_names=["input"],
        output_names=["output"],
    )


def _export_dynamo(model, x, path: Path, opset: int, large: bool) -> None:
    kwargs = dict(
        dynamo=True,
        external_data=large,
        opset_version=opset,
        input_names=["input"],
        output_names=["output"],
        verbose=False,
    )
    if "optimize" in inspect.signature(torch.onnx.export).parameters:
        kwargs["optimize"] = True
    torch.onnx.export(model, (x,), str(path), **kwargs)


def _pack_external_data(path: Path, dest_dir: Path) -> Path:
    """Re-save ``path`` with all external tensors in one ``<name>.onnx.data`` file."""
    import onnx

    data_name = path.name + ".data"
    if sorted(f.name for f in path.parent.iterdir() if f.is_file()) == sorted([path.name, data_name]):
        return path  # already a single data file (dynamo exporter)
    dest_dir.mkdir()
    model = onnx.load(str(path))  # pulls in the external tensors
    out = dest_dir / path.name
    onnx.save_model(model, str(out), save_as_external_data=True, all_tensors_to_one_file=True, location=data_name)
    return out


def export(
    name: str,
    exporter: str,
    out_dir: str | Path,
    opset: int | None = None,
    image_size: int | None = None,
) -> Path:
    """Export torchvision model ``name`` with ``exporter`` ("legacy" | "dynamo").

    Returns the path of the .onnx file; if it already exists it is returned
    without re-exporting.  The file is written atomically (temporary directory
    in ``out_dir`` + ``os.replace``) and is self-contained unless the weights
    exceed 2 GB (then external data files sit next to it).
    """
    if exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")
    if name not in _all_classification_names():
        raise ValueError(f"unknown torchvision classification model {name!r}")
    out_dir = Path(out_dir)
    final = output_path(name, exporter, out_dir, opset, image_size)
    if final.exists():
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    opset = opset or _DEFAULT_OPSET[exporter]

    model, x = build(name, image_size)
    large = sum(p.numel() * p.element_size() for p in model.parameters()) >= _TWO_GB

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.stem}.", dir=out_dir))
    try:
        tmp = tmp_dir / final.name
        # No torch.no_grad(): under no_grad nn.MultiheadAttention takes its fused
        # fast path (aten::_native_multi_head_attention), which the legacy
        # exporter cannot convert.
        with _quiet():
            if exporter == "legacy":
                _export_legacy(model, x, tmp, opset)
            else:
                _export_dynamo(model, x, tmp, opset, large)
        if not tmp.exists():
            raise RuntimeError(f"{exporter} exporter produced no file for {name}")
        if any(f != tmp for f in tmp_dir.iterdir()):
            # >2 GB: the legacy exporter writes one file per tensor, named after
            # the parameter (these would collide between models in out_dir);
            # pack everything into a single f"{final.name}.data".
            tmp = _pack_external_data(tmp, tmp_dir / "packed")
        # The external data file (only for >2 GB models) first, the .onnx last,
        # so a visible .onnx always has its data in place.
        for extra in sorted(tmp.parent.iterdir()):
            if extra != tmp and extra.is_file():
                os.chmod(extra, 0o644)
                os.replace(extra, out_dir / extra.name)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*", help="torchvision model names")
    ap.add_argument("--all", action="store_true", help="all classification models under --max-params")
    ap.add_argument("--max-params", type=int, default=100_000_000)
    ap.add_argument("--exporter", choices=EXPORTERS + ("both",), default="legacy")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "zoo"))
    ap.add_argument("--opset", type=int, default=None)
    ap.add_argument("--image-size", type=int, default=None)
    ap.add_argument("--list", action="store_true", help="print model names and parameter counts, then exit")
    args = ap.parse_args(argv)

    if args.list:
        counts = param_counts()
        for n in classification_models(args.max_params):
            print(f"{n:24s} {counts[n]:>12,d}")
        return 0
    names = classification_models(args.max_params) if args.all else args.models
    if not names:
        ap.error("give model names or --all")
    exporters = EXPORTERS if args.exporter == "both" else (args.exporter,)

    failures = 0
    print(f"{'model':24s} {'exporter':8s} {'seconds':>8s} {'MB':>9s}  file")
    for name in names:
        for exp in exporters:
            t0 = time.perf_counter()
            try:
                path = export(name, exp, args.out, opset=args.opset, image_size=args.image_size)
            except Exception as e:  # report and keep going
                failures += 1
                msg = str(e).strip().splitlines()
                print(f"{name:24s} {exp:8s} FAILED {type(e).__name__}: {msg[0] if msg else ''}", flush=True)
                continue
            dt = time.perf_counter() - t0
            size = path.stat().st_size / 1e6
            print(f"{name:24s} {exp:8s} {dt:8.1f} {size:9.2f}  {path}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_main())
