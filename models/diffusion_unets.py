"""Export two small, randomly initialized ``diffusers`` UNets to ONNX (eval mode).

Models (``MODELS``):

==============  ===============================================================
``unet2d``      ``UNet2DModel`` (DDPM-style): 3x32x32 sample, block_out_channels
                (32, 64, 64), down DownBlock2D / AttnDownBlock2D / DownBlock2D
                (self-attention, 2 heads of 32 at the 16x16 level) and the
                mirrored up blocks, GroupNorm(8) everywhere, 1 resnet a block.
``unet2d_cond`` ``UNet2DConditionModel`` (Stable-Diffusion-style): 4x16x16
                latent, block_out_channels (32, 64), CrossAttnDownBlock2D /
                DownBlock2D, UNetMidBlock2DCrossAttn, UpBlock2D /
                CrossAttnUpBlock2D; 2 heads in every transformer block (self-
                and cross-attention to 8 tokens of width 32), GEGLU feed-forward.
==============  ===============================================================

Inputs: ``sample`` (float32 [1, C, H, W]), ``timestep`` (int64 [1]) and, for
``unet2d_cond``, ``encoder_hidden_states`` (float32 [1, 8, 32]).  One output,
``"output"`` (the predicted noise, the sample's shape).  Shapes are static.

Exporters: ``dynamo`` (``torch.onnx.export(dynamo=True, external_data=False)``,
opset 18) and ``legacy`` (TorchScript, ``dynamo=False``, opset 17); both work
for both models with torch 2.13 / diffusers 0.42.  Every export is checked
against torch in onnxruntime before it is kept.

Files are cached: ``export(name, exporter, out_dir)`` writes
``out_dir/f"{name}-{exporter}.onnx"`` once (atomically) and afterwards just
returns the path.  ``torch.manual_seed(0)`` before each build makes the
weights deterministic; no weights are downloaded.

CLI::

    python models/diffusion_unets.py --out /tmp/unets              # both models, both exporters
    python models/diffusion_unets.py --out /tmp/unets unet2d --exporter dynamo
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

# torchvision_zoo defines the torchvision ops that diffusers' transformers imports need
# (torchvision here is a CUDA build on a CPU torch); transformers_zoo has the exporters.
sys.path.insert(0, str(Path(__file__).resolve().parent))
from torchvision_zoo import _quiet  # noqa: E402
from transformers_zoo import _export_dynamo, _export_legacy, _one_line  # noqa: E402

__all__ = ["MODELS", "EXPORTERS", "build", "export", "output_path", "example_inputs"]

MODELS = ("unet2d", "unet2d_cond")
EXPORTERS = ("dynamo", "legacy")
_OPSET = {"dynamo": 18, "legacy": 17}
_ATOL, _RTOL = 1e-4, 1e-4
_SEQ, _CROSS_DIM = 8, 32


def _unet2d() -> nn.Module:
    from diffusers import UNet2DModel
    return UNet2DModel(
        sample_size=32, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(32, 64, 64), norm_num_groups=8, attention_head_dim=32,
        down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))


def _unet2d_cond() -> nn.Module:
    from diffusers import UNet2DConditionModel
    # attention_head_dim is (for historical reasons) the number of heads in this class.
    return UNet2DConditionModel(
        sample_size=16, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, cross_attention_dim=_CROSS_DIM,
        attention_head_dim=2,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


class _Wrapped(nn.Module):
    """The UNet returning its ``sample`` tensor alone (one graph output)."""

    def __init__(self, unet: nn.Module):
        super().__init__()
        self.unet = unet

    def forward(self, sample, timestep, encoder_hidden_states=None):
        if encoder_hidden_states is None:
            return self.unet(sample, timestep, return_dict=False)[0]
        return self.unet(sample, timestep, encoder_hidden_states, return_dict=False)[0]


_BUILDERS = {"unet2d": _unet2d, "unet2d_cond": _unet2d_cond}


def example_inputs(name: str) -> dict[str, torch.Tensor]:
    """The inputs the model is exported with (seed 1), ``{input name: tensor}``."""
    g = torch.Generator().manual_seed(1)
    if name == "unet2d":
        feeds = {"sample": torch.randn(1, 3, 32, 32, generator=g)}
    else:
        feeds = {"sample": torch.randn(1, 4, 16, 16, generator=g)}
    feeds["timestep"] = torch.tensor([10], dtype=torch.int64)
    if name == "unet2d_cond":
        feeds["encoder_hidden_states"] = torch.randn(1, _SEQ, _CROSS_DIM, generator=g)
    return feeds


def build(name: str) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The eval-mode wrapped model (seed 0) and its example inputs."""
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    torch.manual_seed(0)
    with _quiet():
        model = _Wrapped(_BUILDERS[name]())
    return model.eval(), example_inputs(name)


def output_path(name: str, exporter: str, out_dir: str | Path) -> Path:
    return Path(out_dir) / f"{name}-{exporter}.onnx"


def _check(path: Path, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    got = sess.run(None, {k: v.numpy() for k, v in inputs.items()})[0]
    with torch.no_grad():
        ref = model(*inputs.values()).numpy()
    diff = float(np.max(np.abs(got.astype(np.float64) - ref)))
    tol = _ATOL + _RTOL * float(np.max(np.abs(ref)))
    if not diff <= tol:
        raise RuntimeError(f"onnxruntime output differs from torch (max abs diff {diff:.3g} > {tol:.3g})")


def export(name: str, exporter: str, out_dir: str | Path, *, check: bool = True) -> Path:
    """Export ``name`` with ``exporter`` to ``out_dir/f"{name}-{exporter}.onnx"`` (one
    self-contained file) and return the path; an existing file is returned as is.
    Failures raise ``RuntimeError(f"{name}/{exporter}: <reason>")``."""
    if exporter not in EXPORTERS:
        raise ValueError(f"unknown exporter {exporter!r}; choose from {EXPORTERS}")
    out_dir = Path(out_dir)
    final = output_path(name, exporter, out_dir)
    if final.exists():
        return final
    out_dir.mkdir(parents=True, exist_ok=True)
    model, inputs = build(name)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{final.stem}.", dir=out_dir))
    try:
        tmp = tmp_dir / final.name
        try:
            with _quiet(), torch.no_grad():
                fn = _export_legacy if exporter == "legacy" else _export_dynamo
                fn(model, tuple(inputs.values()), list(inputs), tmp, _OPSET[exporter])
            if check:
                _check(tmp, model, inputs)
        except Exception as e:
            raise RuntimeError(f"{name}/{exporter}: {_one_line(e)}") from e
        extras = [p.name for p in tmp_dir.iterdir() if p != tmp]
        if extras:
            raise RuntimeError(f"{name}/{exporter}: unexpected external data files {extras}")
        os.replace(tmp, final)
    finally:
        for p in tmp_dir.iterdir():
            p.unlink()
        tmp_dir.rmdir()
    return final


def _main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("models", nargs="*", help=f"some of {MODELS} (default: all)")
    ap.add_argument("--exporter", choices=EXPORTERS, action="append")
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)
    failed = 0
    for name in args.models or MODELS:
        for exporter in args.exporter or EXPORTERS:
            try:
                path = export(name, exporter, args.out)
                print(f"{name}/{exporter}: {path} ({path.stat().st_size / 1e6:.1f} MB)")
            except RuntimeError as e:
                print(f"FAILED {e}")
                failed += 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
