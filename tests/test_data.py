"""im2col against onnxruntime's Conv, and calibration data validation."""

import numpy as np
import onnx
import pytest

import spa
from graphs import Graph
from spa.importance.data import Calibration, im2col
from spa.runtime import session


@pytest.mark.parametrize("attrs", [
    {"pads": [1, 1, 1, 1]}, {"strides": [2, 2], "pads": [0, 1, 1, 0]}, {"dilations": [2, 1]},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2]},
])
def test_im2col_reproduces_conv(attrs):
    g = Graph()
    x = g.input([2, 3, 7, 6])
    w = g.weight(4, 3, 3, 2)
    y = g.op("Conv", [x, w], **attrs)
    g.output(y)
    model = g.model()
    xv = np.random.default_rng(0).standard_normal((2, 3, 7, 6)).astype(np.float32)
    want = session(model).run(None, {"x": xv})[0]
    wv = onnx.numpy_helper.to_array(model.graph.initializer[0])
    rows = im2col(xv.astype(np.float64), model.graph.node[0], wv.shape)
    got = rows @ wv.reshape(4, -1).T                          # (n*positions, out)
    got = got.reshape(2, *want.shape[2:], 4).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(got, want, atol=1e-4)


def _model():
    g = Graph()
    x = g.input(["N", 3, 6, 6])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 8)]), 8, 4))
    return g.model()


def test_calibration_errors():
    model = _model()
    shapes = {"x": (1, 3, 6, 6)}
    rng = np.random.default_rng(0)
    with pytest.raises(spa.SpaError, match="lacks input"):
        Calibration({"image": rng.standard_normal((4, 3, 6, 6))}).batches(model, shapes)
    with pytest.raises(spa.SpaError, match="per-sample shape"):
        Calibration({"x": rng.standard_normal((4, 3, 5, 6))}).batches(model, shapes)
    with pytest.raises(spa.SpaError, match="at least 2"):
        Calibration({"x": rng.standard_normal((1, 3, 6, 6))}).batches(model, shapes)
    batches = Calibration({"x": rng.standard_normal((10, 3, 6, 6))}, batch=4).batches(model, shapes)
    assert [len(b["x"]) for b in batches] == [4, 4, 2] and batches[0]["x"].dtype == np.float32


def test_synthetic_images_are_dead_leaves():
    """Image-like synthetic inputs are opaque shapes with edges (mostly flat, some jumps), of
    unit variance per image; other inputs stay Gaussian."""
    from spa.importance.data import _natural_noise
    rng = np.random.default_rng(0)
    x = _natural_noise(rng, (4, 3, 32, 32))
    step = np.abs(np.diff(x, axis=3))
    assert (step < 1e-9).mean() > 0.6 and (step > 0.1).mean() > 0.02
    np.testing.assert_allclose(x.std(axis=(2, 3)), 1.0, rtol=1e-6)
    flat = _natural_noise(rng, (4, 16))
    assert (np.abs(np.diff(flat, axis=1)) < 1e-9).mean() == 0
