"""scikit-learn MLPClassifier(hidden_layer_sizes=(256, 128)) on sklearn's 8x8 digits,
converted to ONNX with skl2onnx, for the accuracy benchmark (benchmarks/accuracy.py).

    python models/digits_mlp.py

Writes, next to this script:
  digits_mlp.onnx        input "X" (N x 64, float32, raw pixel values 0..16), outputs
                         "label" (N, int64, the predicted class) and "probabilities"
                         (N x 10, float32; ZipMap disabled so both are plain tensors)
  digits_calib.npz       256 samples of the *training* split ("X", "label")
  digits_eval.npz        the whole test split ("X", "label"; 450 samples)

Split: train_test_split(test_size=0.25, random_state=0, stratify=y); the MLP uses
random_state=0. Deterministic, CPU, a few seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

OUT_DIR = Path(__file__).resolve().parent
INPUT = "X"
PROBA, LABEL = "probabilities", "label"
N_CALIB = 256


def split():
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    x, y = load_digits(return_X_y=True)
    xtr, xte, ytr, yte = train_test_split(x.astype(np.float32), y.astype(np.int64), test_size=0.25,
                                          random_state=0, stratify=y)
    return xtr, xte, ytr, yte


def samples(which: str) -> dict[str, np.ndarray]:
    """"calib": N_CALIB training samples (seed-0 permutation); "eval": the test split."""
    xtr, xte, ytr, yte = split()
    if which == "calib":
        idx = np.random.default_rng(0).permutation(len(xtr))[:N_CALIB]
        return {INPUT: xtr[idx], "label": ytr[idx]}
    if which == "eval":
        return {INPUT: xte, "label": yte}
    raise ValueError(which)


def accuracy(model, data: dict[str, np.ndarray]) -> float:
    """Top-1 accuracy (argmax of the probabilities output) of an ONNX model on a samples() dict."""
    import onnx
    from spa.runtime import session
    sess = session(model if isinstance(model, onnx.ModelProto) else onnx.load(str(model)))
    proba = sess.run([PROBA], {INPUT: data[INPUT]})[0]
    return float((proba.argmax(1) == data["label"]).mean())


def train():
    from sklearn.neural_network import MLPClassifier
    xtr, xte, ytr, yte = split()
    clf = MLPClassifier(hidden_layer_sizes=(256, 128), random_state=0, max_iter=300)
    clf.fit(xtr, ytr)
    return clf, float(clf.score(xte, yte))


def convert(clf):
    import onnx
    from skl2onnx import to_onnx
    from skl2onnx.common.data_types import FloatTensorType
    onx = to_onnx(clf, initial_types=[(INPUT, FloatTensorType([None, 64]))],
                  options={id(clf): {"zipmap": False}}, target_opset={"": 17, "ai.onnx.ml": 3})
    # skl2onnx names the outputs "label" and "probabilities" already; make sure
    outs = [o.name for o in onx.graph.output]
    assert outs == [LABEL, PROBA], outs
    onnx.checker.check_model(onx, full_check=True)
    return onx


def main():
    import onnx
    clf, sk_acc = train()
    onx = convert(clf)
    path = OUT_DIR / "digits_mlp.onnx"
    onnx.save(onx, str(path))
    for which in ("calib", "eval"):
        np.savez_compressed(OUT_DIR / f"digits_{which}.npz", **samples(which))
    ev = samples("eval")
    acc = accuracy(path, ev)
    from spa.runtime import session
    p_onnx = session(onx).run([PROBA], {INPUT: ev[INPUT]})[0]
    err = float(np.abs(p_onnx - clf.predict_proba(ev[INPUT])).max())
    ops = sorted({f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in onx.graph.node})
    print(json.dumps({"onnx": path.name, "test_acc_sklearn": sk_acc, "test_acc_onnx": acc,
                      "n_test": len(ev["label"]), "max_abs_proba_diff": err, "outputs": [LABEL, PROBA],
                      "ops": ops, "params": int(sum(w.size for w in clf.coefs_) + sum(b.size for b in clf.intercepts_))},
                     indent=1))


if __name__ == "__main__":
    main()
