"""Data-free statistics from images inverted from a classifier whose BatchNorms were folded away
(spa/score/invert.py): what it applies to, that inverted images carry the classes they were
inverted to, that pruning on them passes the oracle, and that they beat dead-leaves noise on
a real folded CNN."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import spa
from spa.errors import SpaError
from spa.score import invert
from spa.score.invert import inversion_target, inverted_images

from graphs import Graph

if isinstance(invert._torch_modules(), str):
    pytest.skip("torch and onnx2torch are not installed", allow_module_level=True)

MODELS = Path(__file__).resolve().parents[1] / "models"


def classifier(batch_norm: bool = False, seed: int = 0):
    """Conv-Relu-Conv-Relu-GlobalAveragePool-Flatten-Gemm: an image classifier of 5 classes."""
    g = Graph(seed=seed)
    x = g.input(["N", 1, 12, 12], "image")
    h = g.op("Relu", [g.conv(x, 1, 8)])
    h = g.conv(h, 8, 12)
    if batch_norm:
        h = g.op("BatchNormalization", [h, g.const(np.ones(12, np.float32)), g.const(np.zeros(12, np.float32)),
                                        g.const(np.zeros(12, np.float32)), g.const(np.ones(12, np.float32))])
    h = g.op("Flatten", [g.op("GlobalAveragePool", [g.op("Relu", [h])])])
    g.output(g.op("Gemm", [h, g.weight(5, 12), g.weight(5)], transB=1))
    return g.model()


def _run(model, images):
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"image": images.astype(np.float32)})[0]


def test_inverted_images_are_the_classes_they_were_inverted_to():
    model = classifier()
    start = np.random.default_rng(0).standard_normal((40, 1, 12, 12)).astype(np.float32)
    info = {}
    images = inverted_images(model, start, info=info)
    labels = np.arange(40) % 5
    hit = (_run(model, images).argmax(1) == labels).mean()
    assert hit >= 0.6 and info["inverted_hit_rate"] == pytest.approx(hit) and info["classes"] == 5
    assert (_run(model, start).argmax(1) == labels).mean() <= 0.4     # not so from the start


def test_prune_inverts_a_folded_classifier_and_the_oracle_passes():
    result = spa.prune(classifier(), ratio=0.4, round_to=1, verify=True)
    data = result.report["data"]
    assert data["hessian_source"] == "images inverted from the model's own classes (data-free)"
    assert data["inverted_images"] == 256 and data["inverted_hit_rate"] >= 0.6
    assert result.report["verify"]["ok"]
    assert sum(g["removed"] for g in result.report["groups"]) > 0


def test_a_classifier_with_more_outputs_inverts_its_scores_and_says_so():
    model = classifier()
    g = model.graph
    g.node.append(onnx.helper.make_node("Relu", [g.node[0].output[0]], ["features"], name="extra_output"))
    g.output.insert(0, onnx.helper.make_tensor_value_info("features", onnx.TensorProto.FLOAT, ["N", 8, 12, 12]))
    stages = []
    result = spa.prune(model, ratio=0.4, round_to=1, on_stage=stages.append)
    assert result.report["data"]["inverted_hit_rate"] >= 0.6
    assert stages[:3] == ["analyze", "invert", "score"]


def test_where_inversion_does_not_apply_the_noise_stays():
    assert "BatchNorm" in inversion_target(classifier(batch_norm=True))
    g = Graph()
    x = g.input(["N", 6], "x")
    g.output(g.op("Gemm", [g.op("Relu", [g.op("Gemm", [x, g.weight(8, 6)], transB=1)]), g.weight(3, 8)], transB=1))
    assert inversion_target(g.model()) == "not one float image input"
    noise = spa.prune(classifier(), ratio=0.4, round_to=1, synthetic="noise")
    assert noise.report["data"]["hessian_source"] == "synthetic inputs (data-free)"
    with pytest.raises(SpaError, match="--synthetic invert: BatchNorm statistics steer"):
        spa.prune(classifier(batch_norm=True), ratio=0.4, synthetic="invert")


def test_over_budget_or_without_torch_the_noise_stays(monkeypatch):
    default = invert.INVERSION_BUDGET
    monkeypatch.setattr(invert, "INVERSION_BUDGET", 1.0)
    result = spa.prune(classifier(), ratio=0.4, round_to=1)
    assert "over the budget" in result.report["data"]["inversion_skipped"]
    assert result.report["data"]["hessian_source"] == "synthetic inputs (data-free)"
    asked = spa.prune(classifier(), ratio=0.4, round_to=1, synthetic="invert")     # asked for: inverted anyway
    assert asked.report["data"]["hessian_source"].startswith("images inverted")
    monkeypatch.setattr(invert, "INVERSION_BUDGET", default)
    monkeypatch.setattr(invert, "_torch_modules", lambda: 'torch and onnx2torch are not installed (pip install "spa[invert]")')
    result = spa.prune(classifier(), ratio=0.4, round_to=1)
    assert 'pip install "spa[invert]"' in result.report["data"]["inversion_skipped"]
    with pytest.raises(SpaError, match="torch and onnx2torch are not installed"):
        spa.prune(classifier(), ratio=0.4, synthetic="invert")


def test_a_conversion_failure_falls_back_to_noise(monkeypatch):
    def broken(*a, **k):
        raise ValueError("no converter for op Foo")
    monkeypatch.setattr(invert, "_invert", broken)
    result = spa.prune(classifier(), ratio=0.4, round_to=1)
    assert result.report["data"]["inversion_skipped"] == "could not invert: no converter for op Foo"


def test_inverted_statistics_beat_noise_on_the_folded_fashion_resnet():
    """The real case: a trained CNN exported with its BatchNorms folded, half its MACs, no data."""
    path = MODELS / "fashion_resnet_folded.onnx"
    ev = np.load(MODELS / "fashion_eval.npz")
    x, y = ev["image"][:1000], ev["label"][:1000]

    def accuracy(**kw):
        r = spa.prune(str(path), macs=0.5, verify=False, **kw)
        return float((_run(r.model, x).argmax(1) == y).mean())
    inverted, noise = accuracy(), accuracy(synthetic="noise")
    assert inverted >= noise + 0.05, (inverted, noise)


def test_an_obspa_failure_on_inverted_images_falls_back_to_l1(monkeypatch):
    """Inverted images are not the user's data: OBSPA failing on them falls back as on noise."""
    import spa.pipeline

    def fails(*a, **k):
        raise SpaError("calibration data does not fit the model")
    monkeypatch.setattr(spa.pipeline, "data_aware_plan", fails)
    result = spa.prune(classifier(), ratio=0.4, round_to=1)
    assert result.report["data"]["fallback"] == "l1"
    with pytest.raises(SpaError, match="does not fit"):     # the user's data: their error to hear of
        spa.prune(classifier(), ratio=0.4, round_to=1, calib={"image": np.zeros((8, 1, 12, 12), np.float32)})
