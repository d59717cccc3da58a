"""A small LLaMA-style decoder (GQA, RoPE, SwiGLU, RMSNorm) with real weights, trained here
on English text that ships with this machine, exported to ONNX for spa's language-model
benchmark (benchmarks/lm_perplexity.py).

    python models/tiny_llama.py                      # corpus, training, export: everything
    python models/tiny_llama.py --steps 200          # a quick, worse model
    python models/tiny_llama.py --export-only        # re-export models/tiny_llama.pt

Text: Debian manual pages (English sections /usr/share/man/man[1-8], a fixed sixth of them
picked by a hash of the file name, rendered to plain ASCII with groff) and the topics of
Python's own documentation (``pydoc_data.topics``). Nothing is downloaded.

Tokens are bytes (vocabulary 256): no tokenizer to ship, and the perplexity is per byte.
Documents are split by a hash of their name into training (90 %), calibration (5 %) and
held-out evaluation (5 %), so no page is in two splits.

Writes
  models/tiny_llama.onnx       input_ids int64 [batch, SEQ] -> logits float32 [batch, SEQ, 256]
  models/tiny_llama.pt         the torch state dict, for --export-only (not committed: from_onnx()
                               reads the same weights back from the ONNX file)
  models/tiny_llama_text.npz   eval / calib: uint8 [n, SEQ] byte sequences (cast to int64 to feed)
  models/tiny_llama.json       how it was trained: config, steps, losses, sources, seed, time
"""

from __future__ import annotations

import argparse
import glob
import json
import math
import os
import re
import subprocess
import sys
import time
import zlib
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import torchvision_zoo  # noqa: E402,F401  (defines the torchvision ops that importing transformers needs)

ONNX = HERE / "tiny_llama.onnx"
STATE = HERE / "tiny_llama.pt"
TEXT = HERE / "tiny_llama_text.npz"
META = HERE / "tiny_llama.json"

SEQ = 256            # tokens (bytes) per sequence, training and export alike
CONFIG = dict(hidden_size=256, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=2,
              intermediate_size=688, vocab_size=256, max_position_embeddings=SEQ,
              tie_word_embeddings=False, use_cache=False, attn_implementation="eager")
MAN_SHARE = 6        # one man page in MAN_SHARE (by crc32 of the file name): rendering all takes ~7 min
MAX_DOC = 64_000     # characters per document at most, so a few huge pages do not dominate
N_EVAL, N_CALIB = 256, 128


# ---------------------------------------------------------------------------- text
def _clean(text: str) -> str:
    # groff indents by 7 spaces and pads; a byte model would spend its capacity (and earn an
    # easy, flattering perplexity) on that whitespace, so strip it and collapse blank runs.
    lines = [ln.strip() for ln in text.splitlines()]
    text = "\n".join(lines)
    text = re.sub(r"[ \t]+", " ", text)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.encode("ascii", "ignore").decode().strip()[:MAX_DOC]


def man_pages() -> list[tuple[str, str]]:
    """(name, text) of the selected English man pages, rendered by groff (-Tascii, no hyphenation,
    left-adjusted, no bold/underline overstrikes)."""
    files = [f for d in range(1, 9) for f in sorted(glob.glob(f"/usr/share/man/man{d}/*.gz"))
             if not os.path.islink(f) and zlib.crc32(os.path.basename(f).encode()) % MAN_SHARE == 0]
    docs = []
    for f in files:
        # cwd = /usr/share/man so that ".so man7/foo.7" includes resolve
        r = subprocess.run(f"zcat '{f}' | groff -Tascii -man -rHY=0 -dAD=l -P-cbou", shell=True,
                           capture_output=True, cwd=os.path.dirname(os.path.dirname(f)))
        text = _clean(r.stdout.decode("ascii", "ignore"))
        if len(text) >= 200:       # .so redirects that did not resolve, empty stubs
            docs.append((os.path.relpath(f, "/usr/share/man"), text))
    return docs


def pydoc_topics() -> list[tuple[str, str]]:
    from pydoc_data.topics import topics
    return [(f"pydoc:{k}", _clean(v)) for k, v in sorted(topics.items()) if len(v) >= 200]


def split_of(name: str) -> str:
    h = zlib.crc32(("split:" + name).encode()) % 20
    return "eval" if h == 0 else "calib" if h == 1 else "train"


def corpus(cache: Path | None = None) -> dict[str, list[tuple[str, str]]]:
    """{split: [(name, text)]}; rendering is cached in ``cache`` (a .json) when given."""
    if cache is not None and cache.exists():
        docs = [tuple(d) for d in json.loads(cache.read_text())]
    else:
        t = time.time()
        docs = man_pages() + pydoc_topics()
        print(f"rendered {len(docs)} documents in {time.time() - t:.0f} s", flush=True)
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps(docs))
    out = {"train": [], "calib": [], "eval": []}
    for name, text in docs:
        out[split_of(name)].append((name, text))
    return out


def stream(docs: list[tuple[str, str]]) -> np.ndarray:
    """All documents' bytes, one blank line between documents."""
    return np.frombuffer("\n\n".join(t for _, t in docs).encode(), dtype=np.uint8).copy()


def windows(data: np.ndarray, n: int) -> np.ndarray:
    """n non-overlapping SEQ-byte windows spread evenly over ``data``."""
    count = len(data) // SEQ
    if count < n:
        raise SystemExit(f"only {count} windows of {SEQ} bytes, {n} wanted")
    idx = np.linspace(0, count - 1, n).round().astype(int)
    return np.stack([data[i * SEQ:(i + 1) * SEQ] for i in idx])


# ---------------------------------------------------------------------------- model
def build(config: dict | None = None):
    from transformers import LlamaConfig, LlamaForCausalLM
    return LlamaForCausalLM(LlamaConfig(**(config or CONFIG)))


def from_onnx(path: Path = ONNX, config: dict | None = None):
    """The torch model with the weights of an exported file, so that the ONNX file is the one
    artifact to keep. The dynamo exporter keeps the names of norm and embedding weights but
    folds each Linear's weight into a transposed, renamed MatMul operand; the node's
    ``pkg.torch.onnx.name_scopes`` metadata names its module. Every parameter must be found
    (no guessing), and the result is checked against onnxruntime."""
    import ast
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    proto = onnx.load(str(path))
    inits = {t.name: t for t in proto.graph.initializer}
    model = build(config)
    wanted = dict(model.state_dict())
    state = {}
    for name in wanted:
        if "model." + name in inits:            # the wrapper Logits adds "model."
            state[name] = numpy_helper.to_array(inits["model." + name])
    for node in proto.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        meta = {p.key: p.value for p in node.metadata_props}
        scopes = ast.literal_eval(meta.get("pkg.torch.onnx.name_scopes", "[]"))
        module = next((s for s in reversed(scopes) if s.endswith("_proj") or s.endswith("lm_head")), None)
        if module is None:
            continue
        key = module.removeprefix("model.") + ".weight"
        state[key] = numpy_helper.to_array(inits[node.input[1]]).T
    missing = sorted(set(wanted) - set(state))
    if missing:
        raise SystemExit(f"{path}: no weight found for {missing[:5]} ({len(missing)} in all)")
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()})
    model.eval()
    x = torch.randint(0, 256, (1, SEQ), generator=torch.Generator().manual_seed(1))
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    got = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"]).run(None, {"input_ids": x.numpy()})[0]
    with torch.no_grad():
        ref = model(input_ids=x).logits.numpy()
    if not np.abs(got - ref).max() <= 1e-3:
        raise SystemExit(f"{path}: the weights read back differ from the file's output by {np.abs(got - ref).max():.3g}")
    return model


class Logits(torch.nn.Module):
    """input_ids -> logits, one output. The all-ones mask changes no number; without it
    transformers checks position_ids for packed sequences (see models/transformers_zoo.py)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids)).logits


def loss_on(model, seqs: np.ndarray, batch: int = 32) -> float:
    """Mean next-byte cross entropy (nats) over ``seqs`` [n, SEQ] (predicting bytes 1..SEQ-1)."""
    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for i in range(0, len(seqs), batch):
            x = torch.from_numpy(seqs[i:i + batch].astype(np.int64))
            logits = model(input_ids=x).logits
            ce = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 256), x[:, 1:].reshape(-1),
                                                   reduction="sum")
            total, count = total + float(ce), count + x[:, 1:].numel()
    return total / count


def train(model, data: np.ndarray, held: np.ndarray, *, steps: int, batch: int, lr: float, seed: int,
          log_every: int = 50) -> dict:
    g = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warm = max(steps // 20, 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(s / steps, 1)))))
    t0, recent, history = time.time(), [], []
    for step in range(1, steps + 1):
        model.train()
        starts = g.integers(0, len(data) - SEQ - 1, batch)
        x = torch.from_numpy(np.stack([data[s:s + SEQ + 1] for s in starts]).astype(np.int64))
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        recent.append(loss.item())
        if step % log_every == 0 or step == steps:
            row = {"step": step, "train_loss": round(float(np.mean(recent)), 4),
                   "seconds": round(time.time() - t0, 1)}
            if step % (log_every * 10) == 0 or step == steps:
                # a cheap progress signal on the first 32 held-out sequences only (the first
                # eval documents); the held_out_loss of the .json is over all of them
                row["held_out_loss"] = round(loss_on(model, held[:32]), 4)
            history.append(row)
            print(json.dumps(row), flush=True)
            recent = []
    return {"seconds": round(time.time() - t0, 1), "history": history}


def export(model, path: Path = ONNX) -> Path:
    """Dynamo export, batch open, sequence fixed at SEQ; checked against torch in onnxruntime."""
    import onnxruntime as ort
    model = Logits(model.eval())
    x = torch.randint(0, 256, (2, SEQ), generator=torch.Generator().manual_seed(0))
    tmp = path.with_suffix(".onnx.tmp")
    with torchvision_zoo._quiet():
        torch.onnx.export(model, (x,), str(tmp), dynamo=True, external_data=False, input_names=["input_ids"],
                          output_names=["logits"], dynamic_shapes={"input_ids": {0: torch.export.Dim("batch")}},
                          optimize=True, verbose=False)
    so = ort.SessionOptions()
    so.intra_op_num_threads = so.inter_op_num_threads = 1
    got = ort.InferenceSession(str(tmp), so, providers=["CPUExecutionProvider"]).run(
        None, {"input_ids": x.numpy()})[0]
    with torch.no_grad():
        ref = model(x).numpy()
    diff = float(np.abs(got - ref).max())
    if not diff <= 1e-3 + 1e-4 * float(np.abs(ref).max()):
        raise SystemExit(f"onnxruntime output differs from torch by {diff:.3g}")
    os.replace(tmp, path)
    print(f"exported {path} ({path.stat().st_size / 1e6:.1f} MB), |ort - torch| <= {diff:.2g}", flush=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=500)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--layers", type=int, default=CONFIG["num_hidden_layers"])
    ap.add_argument("--cache", default="/tmp/tiny_llama_corpus.json",
                    help="rendered corpus cache (re-rendering takes about a minute)")
    ap.add_argument("--export-only", action="store_true", help="re-export models/tiny_llama.pt")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    config = dict(CONFIG, num_hidden_layers=args.layers)

    splits = corpus(Path(args.cache) if args.cache else None)
    data = {k: stream(v) for k, v in splits.items()}
    for k, v in splits.items():
        print(f"{k}: {len(v)} documents, {len(data[k]):,} bytes", flush=True)
    held, calib = windows(data["eval"], N_EVAL), windows(data["calib"], N_CALIB)

    model = build(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters", flush=True)
    if args.export_only:
        model.load_state_dict(torch.load(STATE))
        export(model)
        return 0

    run = train(model, data["train"], held, steps=args.steps, batch=args.batch, lr=args.lr, seed=args.seed)
    torch.save(model.state_dict(), STATE)
    held_loss = loss_on(model, held)
    export(model)
    np.savez_compressed(TEXT, eval=held, calib=calib)
    last = run["history"][-1]
    META.write_text(json.dumps({
        "config": config, "parameters": n_params, "seq": SEQ, "seed": args.seed, "steps": args.steps,
        "batch": args.batch, "lr": args.lr, "schedule": "AdamW (0.9, 0.95), wd 0.1, linear warmup, cosine to 0.1 lr",
        "tokens_seen": args.steps * args.batch * SEQ, "train_seconds": run["seconds"], "threads": 1,
        "final_train_loss": last["train_loss"], "held_out_loss": round(held_loss, 4),
        "held_out_perplexity": round(math.exp(held_loss), 3),
        "held_out": f"{N_EVAL} x {SEQ} bytes from the eval documents (all of tiny_llama_text.npz 'eval')",
        "sources": {"man": f"/usr/share/man/man[1-8]/*.gz, crc32(file name) % {MAN_SHARE} == 0, groff -Tascii",
                    "pydoc": "pydoc_data.topics.topics"},
        "documents": {k: len(v) for k, v in splits.items()},
        "bytes": {k: int(len(v)) for k, v in data.items()},
        "calibration": f"{N_CALIB} x {SEQ} bytes from the calib documents",
        "history": run["history"], "torch": torch.__version__,
    }, indent=1) + "\n")
    print(f"held-out loss {held_loss:.4f} nats/byte, perplexity {math.exp(held_loss):.3f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
