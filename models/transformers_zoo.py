"""Export small, randomly initialized transformer models to ONNX (eval mode).

Families (``FAMILIES``):

=================  ==========================================================
``bert``           HF ``BertModel`` (no pooler) -> last_hidden_state
``distilbert``     HF ``DistilBertModel`` -> last_hidden_state
``roberta``        HF ``RobertaModel`` (no pooler) -> last_hidden_state
``vit``            HF ``ViTModel`` (no pooler, 32x32 image, patch 8) -> last_hidden_state
``gpt2``           HF ``GPT2LMHeadModel`` -> logits
``llama``          HF ``LlamaForCausalLM`` (GQA 4 query / 2 kv heads, RoPE) -> logits
``qwen2``          HF ``Qwen2ForCausalLM`` (GQA 4 query / 2 kv heads) -> logits
``tv_vit_b_16``    ``torchvision.models.VisionTransformer`` (32x32 image, patch 16,
                   2 layers, 4 heads, width 64, MLP 128) -> 1000 class logits
``timm_vit_tiny``  timm ``vit_tiny_patch16_224`` (img_size=32, depth=2) -> logits
``timm_deit_tiny`` timm ``deit_tiny_patch16_224`` (img_size=32, depth=2) -> logits
=================  ==========================================================

"tiny" HF configs: hidden 64, 4 heads (LLaMA/Qwen2: 2 kv heads), 2 layers,
intermediate 128, vocab 100, 64 positions, batch 1, sequence 8.  Size "base"
(``bert`` only) is BERT-base shaped: hidden 768, 12 heads, 12 layers,
intermediate 3072, vocab 30522, sequence 128 (~440 MB, still one file).

Every HF model uses ``attn_implementation="eager"`` (attention as plain
MatMul/Softmax) and ``use_cache=False``; timm attention has its fused SDPA path
switched off for the same reason.  Each model is wrapped so the ONNX graph has
exactly one output, ``"output"``.  Inputs: ``input_ids`` (int64, [1, seq]) and,
for the encoders bert/distilbert/roberta, ``attention_mask`` (int64, all ones);
vision models take ``pixel_values`` (float32, [1, 3, 32, 32]).  Shapes are static.

Files are cached: ``export(family, exporter, out_dir)`` writes
``out_dir/f"{family}-{exporter}-{size}.onnx"`` once (atomically) and afterwards
just returns the path.  ``torch.manual_seed(0)`` is set before each model is
built, so exports are deterministic.  Weights are never downloaded.

By default a fresh export is checked in onnxruntime against the torch output
(``check=True``); an exporter that crashes *or* produces wrong numbers raises
``RuntimeError(f"{family}/{exporter}: <reason>")`` and leaves no file behind.

CLI::

    python models/transformers_zoo.py --out /tmp/tfzoo                     # all families, both exporters
    python models/transformers_zoo.py --out /tmp/tfzoo --exporter dynamo bert llama
    python models/transformers_zoo.py --out /tmp/tfzoo --size base bert
"""

from __future__ import annotations

import argparse
import inspect
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

__all__ = [
    "FAMILIES",
    "EXPORTERS",
    "SIZES",
    "build",
    "input_names",
    "output_path",
    "export",
    "max_abs_diff",
]

FAMILIES = (
    "bert",
    "distilbert",
    "roberta",
    "vit",
    "gpt2",
    "llama",
    "qwen2",
    "tv_vit_b_16",
    "timm_vit_tiny",
    "timm_deit_tiny",
)
EXPORTERS = ("dynamo", "legacy")
SIZES = ("tiny", "base")
_DEFAULT_OPSET = {"legacy": 17, "dynamo": 18}
_BASE_FAMILIES = ("bert",)
_ENCODERS = ("bert", "distilbert", "roberta")
_CAUSAL = ("gpt2", "llama", "qwen2")
_VISION = ("vit", "tv_vit_b_16", "timm_vit_tiny", "timm_deit_tiny")
_IMAGE_SIZE = 32
_FIRST_TOKEN = 3  # input ids avoid the low (pad / special) token ids
# onnxruntime vs torch: |ort - torch| <= _ATOL + _RTOL * max|torch|
_ATOL, _RTOL = 1e-3, 1e-4

_DIMS = {
    "tiny": dict(hidden=64, heads=4, kv_heads=2, layers=2, inter=128, vocab=100, max_pos=64, seq=8),
    "base": dict(hidden=768, heads=12, kv_heads=12, layers=12, inter=3072, vocab=30522, max_pos=512, seq=128),
}

# Importing torchvision_zoo defines the torchvision ops that transformers and timm need
# (torchvision here is a CUDA build); its _quiet silences exporter chatter.
from torchvision_zoo import _quiet  # noqa: E402


# ---------------------------------------------------------------------------
# Single-output wrappers (stable input / output names)
# ---------------------------------------------------------------------------
class _Encoder(nn.Module):
    """HF text encoder -> last_hidden_state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _CausalLM(nn.Module):
    """HF *ForCausalLM / GPT2LMHeadModel -> logits.

    The all-ones attention mask made here changes no number, and the dynamo
    graph comes out the same, but without a mask transformers' causal-mask
    code checks position_ids for packed sequences with ``torch.diff``, which
    the legacy exporter cannot convert (aten::diff).
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


class _HFVision(nn.Module):
    """HF ViTModel -> last_hidden_state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).last_hidden_state


class _Plain(nn.Module):
    """A model that already returns one tensor (torchvision / timm classifiers)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values)


# ---------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------
def _hf_common(d: dict) -> dict:
    return dict(use_cache=False, attn_implementation="eager", vocab_size=d["vocab"])


def _build_bert(d):
    from transformers import BertConfig, BertModel

    cfg = BertConfig(
        hidden_size=d["hidden"], num_attention_heads=d["heads"], num_hidden_layers=d["layers"],
        intermediate_size=d["inter"], max_position_embeddings=d["max_pos"], **_hf_common(d),
    )
    return _Encoder(BertModel(cfg, add_pooling_layer=False))


def _build_distilbert(d):
    from transformers import DistilBertConfig, DistilBertModel

    cfg = DistilBertConfig(
        dim=d["hidden"], n_heads=d["heads"], n_layers=d["layers"], hidden_dim=d["inter"],
        max_position_embeddings=d["max_pos"], **_hf_common(d),
    )
    return _Encoder(DistilBertModel(cfg))


def _build_roberta(d):
    from transformers import RobertaConfig, RobertaModel

    # RoBERTa positions start after padding_idx (1): max_pos must exceed seq + 2.
    cfg = RobertaConfig(
        hidden_size=d["hidden"], num_attention_heads=d["heads"], num_hidden_layers=d["layers"],
        intermediate_size=d["inter"], max_position_embeddings=d["max_pos"] + 2, **_hf_common(d),
    )
    return _Encoder(RobertaModel(cfg, add_pooling_layer=False))


def _build_vit(d):
    from transformers import ViTConfig, ViTModel

    cfg = ViTConfig(
        hidden_size=d["hidden"], num_attention_heads=d["heads"], num_hidden_layers=d["layers"],
        intermediate_size=d["inter"], image_size=_IMAGE_SIZE, patch_size=8, num_channels=3,
        attn_implementation="eager",
    )
    return _HFVision(ViTModel(cfg, add_pooling_layer=False))


def _build_gpt2(d):
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(
        n_embd=d["hidden"], n_head=d["heads"], n_layer=d["layers"], n_inner=d["inter"],
        n_positions=d["max_pos"], **_hf_common(d),
    )
    return _CausalLM(GPT2LMHeadModel(cfg))


def _build_llama(d):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        hidden_size=d["hidden"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
        num_hidden_layers=d["layers"], intermediate_size=d["inter"],
        max_position_embeddings=d["max_pos"], **_hf_common(d),
    )
    return _CausalLM(LlamaForCausalLM(cfg))


def _build_qwen2(d):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(
        hidden_size=d["hidden"], num_attention_heads=d["heads"], num_key_value_heads=d["kv_heads"],
        num_hidden_layers=d["layers"], intermediate_size=d["inter"],
        max_position_embeddings=d["max_pos"], **_hf_common(d),
    )
    return _CausalLM(Qwen2ForCausalLM(cfg))


def _build_tv_vit(d):
    import torchvision

    vit = torchvision.models.VisionTransformer(
        image_size=_IMAGE_SIZE, patch_size=16, num_layers=d["layers"], num_heads=d["heads"],
        hidden_dim=d["hidden"], mlp_dim=d["inter"],
    )
    # torchvision zero-initializes the classifier: its output would be 0 whatever is pruned
    torch.nn.init.normal_(vit.heads.head.weight, std=0.02)
    return _Plain(vit)


def _build_timm(name: str):
    def build(d):
        import timm  # optional: ImportError here means "pip install timm --no-deps"

        model = timm.create_model(name, pretrained=False, img_size=_IMAGE_SIZE, depth=d["layers"])
        # Plain q@k^T / softmax / @v instead of F.scaled_dot_product_attention.
        for mod in model.modules():
            if hasattr(mod, "fused_attn"):
                mod.fused_attn = False
        return _Plain(model)

    return build


_BUILDERS = {
    "bert": _build_bert,
    "distilbert": _build_distilbert,
    "roberta": _build_roberta,
    "vit": _build_vit,
    "gpt2": _build_gpt2,
    "llama": _build_llama,
    "qwen2": _build_qwen2,
    "tv_vit_b_16": _build_tv_vit,
    "timm_vit_tiny": _build_timm("vit_tiny_patch16_224"),
    "timm_deit_tiny": _build_timm("deit_tiny_patch16_224"),
}
assert set(_BUILDERS) == set(FAMILIES)


def _validate(family: str, size: str, exporter: str | None = None) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {SIZES}")
    if size != "tiny" and family not in _BASE_FAMILIES:
        raise ValueError(f"size {size!r} is only available for {_BASE_FAMILIES}, not {family!r}")
    if exporter is not None and exporter not in EXPORTERS:
        raise ValueError(f"exporter must be one of {EXPORTERS}, got {exporter!r}")


def input_names(family: str) -> list[str]:
    """ONNX input names of ``family``, in order."""
    if family in _ENCODERS:
        return ["input_ids", "attention_mask"]
    if family in _CAUSAL:
        return ["input_ids"]
    if family in _VISION:
        return ["pixel_values"]
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _example_inputs(family: str, size: str) -> dict[str, torch.Tensor]:
    d = _DIMS[size]
    g = torch.Generator().manual_seed(0)
    if family in _VISION:
        return {"pixel_values": torch.randn(1, 3, _IMAGE_SIZE, _IMAGE_SIZE, generator=g)}
    ids = torch.randint(_FIRST_TOKEN, d["vocab"], (1, d["seq"]), generator=g, dtype=torch.int64)
    if family in _ENCODERS:
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


def build(family: str, size: str = "tiny") -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The eval-mode wrapped model (seed 0) and its example inputs ``{name: tensor}``, as exported."""
    _validate(family, size)
    torch.manual_seed(0)
    with _quiet():
        model = _BUILDERS[family](_DIMS[size])
    return model.eval(), _example_inputs(family, size)


# ---------------------------------------------------------------------------
# Export
# ---------------------------------------------------------------------------
def output_path(family: str, exporter: str, out_dir: str | Path, size: str = "tiny") -> Path:
    return Path(out_dir) / f"{family}-{exporter}-{size}.onnx"


def _first_line(e: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(e))  # ANSI colours of the dynamo exporter
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return f"{type(e).__name__}: {lines[0] if lines else ''}".rstrip(": ")


def _one_line(e: BaseException, limit: int = 300) -> str:
    """First line of ``e``'s root cause (the dynamo exporter wraps the real
    error in a generic "Failed to export ..." one), naming the wrapper."""
    root, seen = e, {id(e)}
    while root.__cause__ is not None and id(root.__cause__) not in seen:
        root = root.__cause__
        seen.add(id(root))
    msg = _first_line(root)
    if root is not e:
        msg += f" (in {type(e).__name__})"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


def _export_legacy(model, args, names, path: Path, opset: int) -> None:
    torch.onnx.export(
        model,
        args,
        str(path),
        dynamo=False,
        opset_version=opset,
        do_constant_folding=True,
        input_names=names,
        output_names=["output"],
    )


def _export_dynamo(model, args, names, path: Path, opset: int) -> None:
    kwargs = dict(
        dynamo=True,
        external_data=False,  # every model here is < 2 GB: one self-contained file
        opset_version=opset,
        input_names=names,
        output_names=["output"],
        verbose=False,
    )
    if "optimize" in inspect.signature(torch.onnx.export).parameters:
        kwargs["optimize"] = True
    torch.onnx.export(model, args, str(path), **kwargs)


def _torch_output(model: nn.Module, inputs: dict[str, torch.Tensor]):
    with torch.no_grad():
        return model(*inputs.values()).detach().numpy()


def _ort_output(path: Path, inputs: dict[str, torch.Tensor]):
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {k: v.numpy() for k, v in inputs.items()}
    return sess.run(["output"], feed)[0]


def _diff(path: Path, model: nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max |ort - torch|, tolerance)."""
    import numpy as np

    ref = _torch_output(model, inputs)
    got = _ort_output(path, inputs)
    if got.shape != ref.shape:
        raise RuntimeError(f"onnxruntime output shape {got.shape} != torch {ref.shape}")
    diff = float(np.max(np.abs(got.astype(np.float64) - ref.astype(np.float64))))
    return diff, _ATOL + _RTOL * float(np.max(np.abs(ref)))


def max_abs_diff(path: str | Path, family: str, size: str = "tiny") -> float:
    """Max |onnxruntime - torch| of an exported file on the example inputs."""
    model, inputs = build(family, size)
    return _diff(Path(path), model, inputs)[0]


def export(
    family: str,
    exporter: str,
    out_dir: str | Path,
    *,
    size: str = "tiny",
    check: bool = True,
) -> Path:
    """Export ``family`` with ``exporter`` ("dynamo" | "legacy") to
    ``out_dir/f"{family}-{exporter}-{size}.onnx"`` and return the path.

    A file that already exists is returned as is.  Otherwise it is written
    atomically (temporary directory in ``out_dir`` + ``os.replace``) as one
    self-contained file.  With ``check`` the export is run in onnxruntime and
    compared with torch first.  Failures (exporter crash, no file, wrong
    numbers) raise ``RuntimeError(f"{family}/{exporter}: <reason>")``.
    """
    _validate(family, size, exporter)
    out_dir = Path(out_dir)
    final = output_path(family, exporter, out_dir, size)
    if final.exists():
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    opset = _DEFAULT_OPSET[exporter]

    try:
        model, inputs = build(family, size)
    except Exception as e:  # e.g. timm not installed
        raise RuntimeError(f"{family}/{exporter}: cannot build the model: {_one_line(e)}") from e
    args = tuple(inputs.values())
    names = list(inputs)

    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.stem}.", dir=out_dir))
    try:
        tmp = tmp_dir / final.name
        # No torch.no_grad(): under no_grad nn.MultiheadAttention (torchvision
        # ViT) takes its fused fast path, which the legacy exporter cannot convert.
        try:
            with _quiet():
                if exporter == "legacy":
                    _export_legacy(model, args, names, tmp, opset)
                else:
                    _export_dynamo(model, args, names, tmp, opset)
        except Exception as e:
            raise RuntimeError(f"{family}/{exporter}: {_one_line(e)}") from e
        if not tmp.exists():
            raise RuntimeError(f"{family}/{exporter}: exporter produced no file")
        extras = [p.name for p in tmp_dir.iterdir() if p != tmp]
        if extras:
            raise RuntimeError(f"{family}/{exporter}: unexpected external data files {extras}")
        if check:
            try:
                diff, tol = _diff(tmp, model, inputs)
            except Exception as e:
                raise RuntimeError(f"{family}/{exporter}: onnxruntime check failed: {_one_line(e)}") from e
            if not diff <= tol:  # also catches NaN
                raise RuntimeError(
                    f"{family}/{exporter}: onnxruntime output differs from torch "
                    f"(max abs diff {diff:.3g} > {tol:.3g})"
                )
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return final


# ---------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------
def _main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("families", nargs="*", help=f"default: all of {', '.join(FAMILIES)}")
    # nargs="+" would swallow the family names in "--exporter legacy bert";
    # anything after --exporter that is not an exporter is taken as a family.
    ap.add_argument("--exporter", nargs="+", metavar="{dynamo,legacy}", default=None,
                    help="one or both exporters (default: both)")
    ap.add_argument("--size", choices=SIZES, default="tiny")
    ap.add_argument("--out", default=os.path.join(tempfile.gettempdir(), "tfzoo"))
    ap.add_argument("--no-check", action="store_true", help="skip the onnxruntime vs torch comparison")
    args = ap.parse_args(argv)

    exporters = [e for e in (args.exporter or EXPORTERS) if e in EXPORTERS]
    args.families += [e for e in (args.exporter or ()) if e not in EXPORTERS]
    if not exporters:
        ap.error(f"--exporter needs one of {EXPORTERS}")
    families = args.families or (list(_BASE_FAMILIES) if args.size != "tiny" else list(FAMILIES))
    bad = [f for f in families if f not in FAMILIES]
    if bad:
        ap.error(f"unknown families {bad}; choose from {FAMILIES}")

    failures = 0
    print(f"{'family':16s} {'exporter':8s} {'seconds':>8s} {'MB':>9s}  result", flush=True)
    for family in families:
        for exp in exporters:
            t0 = time.perf_counter()
            try:
                path = export(family, exp, args.out, size=args.size, check=not args.no_check)
            except Exception as e:  # report and keep going
                failures += 1
                dt = time.perf_counter() - t0
                msg = str(e) if isinstance(e, RuntimeError) else _one_line(e)
                print(f"{family:16s} {exp:8s} {dt:8.1f} {'-':>9s}  error: {msg}", flush=True)
                continue
            dt = time.perf_counter() - t0
            mb = path.stat().st_size / 1e6
            print(f"{family:16s} {exp:8s} {dt:8.1f} {mb:9.2f}  ok {path}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(_main())
