"""Data-aware pruning end to end: OBSPA compensation, dead channels, bias correction."""

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import spa
from graphs import Graph
from spa.cli.commands import main
from spa.runtime import session


def mlp(dead: int = 0, seed: int = 0):
    """x(16) -> Gemm(32) -> Relu -> Gemm(10); ``dead`` hidden units never fire."""
    g = Graph(seed=seed)
    x = g.input(["N", 16])
    b1 = g.rng.standard_normal(32).astype(np.float32) * 0.1
    b1[:dead] = -1e4
    h = g.op("Relu", [g.op("Gemm", [x, g.weight(32, 16), g.const(b1, "b1")], transB=1)])
    g.output(g.op("Gemm", [h, g.weight(10, 32), g.weight(10)], transB=1))
    return g.model()


def calib(n=256, seed=1):
    rng = np.random.default_rng(seed)
    base = rng.standard_normal((n, 4))
    x = base @ rng.standard_normal((4, 16)) + 0.1 * rng.standard_normal((n, 16))  # correlated inputs
    return {"x": x.astype(np.float32)}


def hidden(model, x):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    relu = next(n for n in m.graph.node if n.op_type == "Relu")
    m.graph.output.append(onnx.ValueInfoProto(name=relu.output[0]))
    return session(m).run(None, {"x": x})


def test_obspa_compensation_beats_plain_removal_on_calibration_data():
    model, data = mlp(), calib()
    obspa = spa.prune(model, ratio=0.5, criterion="obspa", calib=data, round_to=1, verify=True)
    assert obspa.report["verify"]["ok"]
    removed = obspa.report["groups"][0]["removed_channels"]
    want = session(model).run(None, data)[0]
    got = session(obspa.model).run(None, data)[0]
    # the same channels removed without compensation
    plain = onnx.ModelProto()
    plain.CopyFrom(model)
    w2 = next(t for t in plain.graph.initializer if list(t.dims) == [10, 32])
    arr = numpy_helper.to_array(w2).copy()
    arr[:, removed] = 0
    w2.CopyFrom(numpy_helper.from_array(arr, w2.name))
    uncompensated = session(plain).run(None, data)[0]
    assert np.linalg.norm(got - want) < np.linalg.norm(uncompensated - want)
    assert obspa.report["data"]["hessian_source"] == "calibration data"


def test_obspa_second_layer_is_least_squares_fit():
    """With calibration data, the kept second-layer weights are the (damped) least-squares
    fit of the original layer's output, bias included."""
    model, data = mlp(), calib(n=512)
    r = spa.prune(model, ratio=0.5, criterion="obspa", calib=data, round_to=1, damping=1e-9)
    removed = r.report["groups"][0]["removed_channels"]
    kept = np.setdiff1d(np.arange(32), removed)
    h = hidden(model, data["x"])[1].astype(np.float64)
    by_dims = lambda m, dims: numpy_helper.to_array(  # noqa: E731
        next(t for t in m.graph.initializer if list(t.dims) == dims)).astype(np.float64)
    w2, b2 = by_dims(model, [10, 32]), by_dims(model, [10])
    target = h @ w2.T + b2
    feats = np.hstack([h[:, kept], np.ones((len(h), 1))])
    fit, *_ = np.linalg.lstsq(feats, target, rcond=None)
    got_w, got_b = by_dims(r.model, [10, 16]), by_dims(r.model, [10])
    err_fit = np.linalg.norm(feats @ fit - target)
    err_obspa = np.linalg.norm(h[:, kept] @ got_w.T + got_b - target)
    assert abs(err_obspa - err_fit) <= 1e-4 * err_fit


def test_dead_channels_removed_losslessly():
    model, data = mlp(dead=6), calib()
    r = spa.prune(model, criterion="dead", calib=data, round_to=1, verify=True)
    group = r.report["groups"][0]
    assert sorted(group["removed_channels"])[:6] == list(range(6)) and group["removed"] >= 6
    np.testing.assert_allclose(session(r.model).run(None, data)[0], session(model).run(None, data)[0],
                               rtol=1e-5, atol=1e-5)
    assert r.report["data"]["dead_rate"][group["id"]] == group["removed"] / 32


def test_recalibrate_keeps_mean_output():
    model, data = mlp(), calib()
    plain = spa.prune(model, ratio=0.5, criterion="l1", round_to=1)
    fixed = spa.prune(model, ratio=0.5, criterion="l1", round_to=1, recalibrate=True, calib=data, verify=True)
    assert fixed.report["verify"]["ok"]
    want = session(model).run(None, data)[0].mean(0)
    assert np.abs(session(fixed.model).run(None, data)[0].mean(0) - want).max() < 1e-3
    assert np.abs(session(plain.model).run(None, data)[0].mean(0) - want).max() > 1e-2


def test_obspa_data_free_on_cnn_verifies():
    g = Graph()
    x = g.input([1, 3, 16, 16])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    y = g.op("Relu", [g.conv(y, 16, 16, bias=False)])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [y])])
    g.output(g.op("Gemm", [f, g.weight(5, 16), g.weight(5)], transB=1))
    r = spa.prune(g.model(), ratio=0.5, criterion="obspa", round_to=1, verify=True, calib_samples=16)
    assert r.report["verify"]["ok"] and r.report["data"]["hessian_source"].startswith("synthetic")
    assert any(t.name.endswith("__spa_bias") for t in r.model.graph.initializer)  # a bias was added


@pytest.mark.parametrize("arrays,word", [({"image": np.zeros((8, 16), np.float32)}, "named after the model's inputs"),
                                         ({"x": np.zeros((8, 15), np.float32)}, "per-sample shape"),
                                         ({"x": np.zeros((1, 16), np.float32)}, "at least 2")])
def test_bad_calibration_file(tmp_path, capsys, arrays, word):
    path = tmp_path / "m.onnx"
    onnx.save(mlp(), path)
    np.savez(tmp_path / "c.npz", **arrays)
    code = main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "--criterion", "obspa",
                 "--calib", str(tmp_path / "c.npz")])
    err = capsys.readouterr().err
    assert code != 0 and word in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o.onnx").exists()


def test_sequential_obspa_refits_downstream_layers():
    """Two pruned layers in a row: the second is refit on the first's pruned outputs."""
    g = Graph(seed=4)
    x = g.input(["N", 16])
    h = g.op("Relu", [g.op("Gemm", [x, g.weight(32, 16), g.weight(32)], transB=1)])
    h = g.op("Relu", [g.op("Gemm", [h, g.weight(24, 32), g.weight(24)], transB=1)])
    g.output(g.op("Gemm", [h, g.weight(10, 24), g.weight(10)], transB=1))
    model, data = g.model(), calib(n=300)
    r = spa.prune(model, ratio=0.5, criterion="obspa", calib=data, round_to=1, verify=True)
    assert r.report["data"]["mode"].startswith("sequential") and r.report["verify"]["ok"]
    want = session(model).run(None, data)[0]
    l1 = spa.prune(model, ratio=0.5, criterion="l1", round_to=1)
    err = np.linalg.norm(session(r.model).run(None, data)[0] - want)
    assert err < 0.5 * np.linalg.norm(session(l1.model).run(None, data)[0] - want)


def test_data_free_obspa_on_images_keeps_l1_choice_and_compensates():
    g = Graph(seed=5)
    x = g.input([1, 3, 16, 16])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    y = g.op("Relu", [g.conv(y, 16, 16)])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [y])])
    g.output(g.op("Gemm", [f, g.weight(5, 16), g.weight(5)], transB=1))
    model = g.model()
    free = spa.prune(model, ratio=0.5, criterion="obspa", round_to=1, verify=True, calib_samples=32)
    l1 = spa.prune(model, ratio=0.5, criterion="l1", round_to=1)
    assert free.report["data"]["mode"].startswith("data-free")
    assert [gr["removed_channels"] for gr in free.report["groups"]] == \
        [gr["removed_channels"] for gr in l1.report["groups"]]
    data = {"x": np.random.default_rng(2).standard_normal((16, 3, 16, 16)).astype(np.float32)}
    want = np.concatenate([session(model).run(None, {"x": data["x"][i:i + 1]})[0] for i in range(16)])
    err = lambda m: np.linalg.norm(np.concatenate(  # noqa: E731
        [session(m).run(None, {"x": data["x"][i:i + 1]})[0] for i in range(16)]) - want)
    assert err(free.model) < err(l1.model)


def test_layers_too_wide_for_a_hessian_fall_back(monkeypatch):
    import spa.score.obspa as ob
    monkeypatch.setattr(ob, "MAX_HESSIAN_DIM", 16)        # the second Gemm reads 32 features
    r = spa.prune(mlp(), ratio=0.5, criterion="obspa", round_to=1, verify=True, calib=calib())
    assert r.report["verify"]["ok"] and r.report["data"]["too_wide_for_a_hessian"]
    assert any("chosen by l1" in g.get("note", "") for g in r.report["groups"])


def _same_pruning(a, b, rtol):
    """Same channels removed, same weights (to float32 sums of products: the dense path forms
    the Gram matrix in float32)."""
    assert [g["removed_channels"] for g in a.report["groups"]] == [g["removed_channels"] for g in b.report["groups"]]
    wa = {t.name: numpy_helper.to_array(t) for t in a.model.graph.initializer}
    for t in b.model.graph.initializer:
        np.testing.assert_allclose(wa[t.name], numpy_helper.to_array(t), rtol=rtol, atol=1e-4 * np.abs(wa[t.name]).max())


def test_wide_layers_work_from_their_rows_with_the_same_result(monkeypatch):
    """A layer wider than its sampled rows keeps the rows, not their Gram matrix; OBS then
    chooses (tokens) or refits (images) through Woodbury: same channels, same weights."""
    import spa.score.data as data
    few = dict(calib_samples=12)                              # 12 rows < 33 features of the 2nd Gemm
    dense = spa.prune(mlp(), ratio=0.5, criterion="obspa", round_to=1, verify=False, **few)
    g = Graph(seed=6)
    x = g.input([1, 3, 6, 6])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    y = g.op("Relu", [g.conv(y, 16, 8, k=5)])                 # 16 x 5 x 5 = 400 features, 72 rows
    g.output(g.op("Gemm", [g.op("Flatten", [g.op("GlobalAveragePool", [y])]), g.weight(5, 8)], transB=1))
    cnn = g.model()
    dense_cnn = spa.prune(cnn, ratio=0.5, criterion="obspa", round_to=1, verify=False, calib_samples=2)
    monkeypatch.setattr(data, "WIDE", 8)
    import spa.score.obspa as ob
    removals = []

    class Spy(ob.LowRankConsumer):
        def remove(self, channels, last=False):
            removals.append(self.rows.shape)
            super().remove(channels, last)
    monkeypatch.setattr(ob, "LowRankConsumer", Spy)
    low = spa.prune(mlp(), ratio=0.5, criterion="obspa", round_to=1, verify=True, **few)
    low_cnn = spa.prune(cnn, ratio=0.5, criterion="obspa", round_to=1, verify=True, calib_samples=2)
    assert low.report["verify"]["ok"] and low_cnn.report["verify"]["ok"]
    assert low_cnn.report["data"]["mode"].startswith("data-free")
    assert (12, 33) in removals and (72, 401) in removals      # both paths went through the rows
    _same_pruning(low, dense, rtol=1e-4)
    _same_pruning(low_cnn, dense_cnn, rtol=1e-4)


def test_default_criterion_is_data_free_obspa(tmp_path, capsys):
    model = mlp()
    r = spa.prune(model, ratio=0.5, round_to=1, verify=True)
    explicit = spa.prune(model, ratio=0.5, criterion="obspa", round_to=1)
    assert r.report["options"]["criterion"] == "obspa" and r.report["verify"]["ok"]
    assert r.report["data"]["hessian_source"].startswith("synthetic")
    _same_pruning(r, explicit, rtol=0)
    onnx.save(model, tmp_path / "m.onnx")
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s.onnx"), "--ratio", "0.5",
                 "--report", str(tmp_path / "r.json"), "-q"]) == 0
    import json
    assert json.loads((tmp_path / "r.json").read_text())["options"]["criterion"] == "obspa"


def test_default_criterion_falls_back_to_l1_when_the_model_cannot_run(monkeypatch, tmp_path, capsys):
    import spa.score.obspa as ob

    def cannot_run(*a, **k):
        raise RuntimeError("[ONNXRuntimeError] : 1 : FAIL : no kernel for this op\nmore")
    monkeypatch.setattr(ob, "collect_stats", cannot_run)
    r = spa.prune(mlp(), ratio=0.5, round_to=1, verify=True)
    l1 = spa.prune(mlp(), ratio=0.5, criterion="l1", round_to=1)
    assert r.report["verify"]["ok"] and r.report["data"] == {
        "fallback": "l1", "reason": "[ONNXRuntimeError] : 1 : FAIL : no kernel for this op"}
    _same_pruning(r, l1, rtol=0)
    onnx.save(mlp(), tmp_path / "m.onnx")
    assert main(["prune", str(tmp_path / "m.onnx"), "-o", str(tmp_path / "s.onnx"), "--ratio", "0.5", "-q"]) == 0
    assert capsys.readouterr().err == ("spa: note: OBSPA could not run this model on synthetic inputs ([ONNXRuntimeError]"
                                       " : 1 : FAIL : no kernel for this op): channels chosen by l1\n")
    with pytest.raises(RuntimeError):                      # asked for by name: no silent substitute
        spa.prune(mlp(), ratio=0.5, criterion="obspa", round_to=1)


def _fake_errors(monkeypatch, table):
    """Held-out errors by use, instead of pruning and measuring; records the uses tried."""
    import spa.score.calibrated as cal
    tried = []

    def fake(a, removals, source, refit, *rest):
        name = "data-free" if source.data is None else ("refit" if refit else "one pass")
        tried.append(name)
        return table[name]
    monkeypatch.setattr(cal, "_held_out_error", fake)
    return tried


@pytest.mark.parametrize("table,chosen,tried", [
    ({"refit": 0.2, "data-free": 0.3, "one pass": 0.0}, "refit", ["refit", "data-free"]),
    ({"refit": 0.6, "data-free": 0.1, "one pass": 0.05}, "one pass", ["refit", "data-free", "one pass"]),
    ({"refit": 0.6, "data-free": 0.1, "one pass": 0.2}, "data-free", ["refit", "data-free", "one pass"]),
])
def test_calibration_never_does_worse_than_no_data_on_held_out_samples(monkeypatch, table, chosen, tried):
    """The default use of the data (refit) stays unless it moves held-out outputs more than
    pruning without data; then the better of one pass and no data runs on all samples."""
    got = _fake_errors(monkeypatch, table)
    r = spa.prune(mlp(), ratio=0.5, criterion="obspa", round_to=1, verify=True, calib=calib(32))
    held = r.report["data"]["held_out"]
    assert held["chosen"] == chosen and got == tried and held["held_out_samples"] == 8
    assert held["relative_error"] == {k: table[k] for k in tried}
    assert r.report["data"]["hessian_source"] == ("synthetic inputs (data-free)" if chosen == "data-free"
                                                  else "calibration data")
    assert r.report["data"]["mode"].startswith({"refit": "sequential", "one pass": "one pass",
                                                "data-free": "one pass"}[chosen])
    assert r.report["verify"]["ok"]


def test_held_out_errors_are_measured():
    r = spa.prune(mlp(), ratio=0.5, criterion="obspa", round_to=1, calib=calib(32))
    errors = r.report["data"]["held_out"]["relative_error"]
    assert set(errors) >= {"refit", "data-free"} and all(0 < e < 1 for e in errors.values())
    few = spa.prune(mlp(), ratio=0.5, criterion="obspa", round_to=1, calib=calib(6))
    assert "skipped" in few.report["data"]["held_out"]


@pytest.mark.parametrize("batch_dim,held_shapes", [("N", [(4, 16)]), (2, [(2, 16), (2, 16)])])
def test_split_holds_out_every_fourth_sample_or_batch(batch_dim, held_shapes):
    from spa.score.data import Calibration
    g = Graph()
    x = g.input([batch_dim, 16])
    g.output(g.op("Gemm", [x, g.weight(4, 16)], transB=1))
    model = g.model()
    data = calib(16)
    fit, held = Calibration(data, batch=16).split(model, {"x": [2, 16]})
    assert [h["x"].shape for h in held] == held_shapes
    kept = np.concatenate([b["x"] for b in fit.batches(model, {"x": [2, 16]})])
    gone = np.concatenate([h["x"] for h in held])
    assert len(kept) + len(gone) == 16 and not set(map(bytes, kept)) & set(map(bytes, gone))


def test_padding_is_left_out_of_the_statistics():
    """Rows at positions the attention mask marks as padding are no input the layer serves."""
    from spa.score.data import collect_stats, consumer_specs
    g = Graph()
    x = g.input(["N", 4, 8])
    g.input(["N", 4], name="attention_mask", dtype=onnx.TensorProto.INT64)
    g.output(g.op("MatMul", [x, g.weight(8, 3)]))
    model = g.model()
    node = model.graph.node[0].name
    specs = consumer_specs(model, [(node, 0, 2)])
    xs = np.ones((2, 4, 8), np.float32)
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0]])
    xs[mask == 0] = 1000.0
    stats = collect_stats(model, specs, [{"x": xs, "attention_mask": mask}], {node: 2})
    assert stats[node].n == 5 and np.allclose(stats[node].mean, 1.0)
    unmasked = collect_stats(model, specs, [{"x": xs, "attention_mask": np.ones_like(mask)}], {node: 2})
    assert unmasked[node].n == 8


def _bn_cnn():
    """conv -> BatchNorm -> Relu -> conv -> BatchNorm -> Relu -> pool -> Gemm, BN kept apart."""
    g = Graph(seed=7)
    x = g.input(["N", 3, 8, 8])
    y = x
    for c_in, c_out in ((3, 16), (16, 16)):
        conv = g.conv(y, c_in, c_out, bias=False)
        stats = [g.const(g.rng.uniform(0.5, 1.5, c_out).astype(np.float32)),
                 g.const(g.rng.standard_normal(c_out).astype(np.float32) * 0.1),
                 g.const(g.rng.standard_normal(c_out).astype(np.float32) * 0.1),
                 g.const(g.rng.uniform(0.5, 2.0, c_out).astype(np.float32))]
        y = g.op("Relu", [g.op("BatchNormalization", [conv] + stats)])
    g.output(g.op("Gemm", [g.op("Flatten", [g.op("GlobalAveragePool", [y])]), g.weight(4, 16)], transB=1))
    return g.model()


def test_recalibrate_refits_normalizations_on_calibration_data():
    """The pruned model's normalized values map closer to the original's outputs; the oracle
    compares with the original carrying the same new scales and biases."""
    data = {"x": np.random.default_rng(3).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    plain = spa.prune(_bn_cnn(), ratio=0.5, criterion="l1", round_to=1, calib=data)
    r = spa.prune(_bn_cnn(), ratio=0.5, criterion="l1", round_to=1, calib=data, recalibrate=True, verify=True)
    refit = r.report["data"]["normalizations_refit"]
    assert r.report["verify"]["ok"] and refit["normalizations"] == 2
    assert refit["relative_error_after"] < refit["relative_error_before"]
    bn = [n for n in r.model.graph.node if n.op_type == "BatchNormalization"][1]
    old = {t.name: numpy_helper.to_array(t) for t in plain.model.graph.initializer}
    new = {t.name: numpy_helper.to_array(t) for t in r.model.graph.initializer}
    assert not np.allclose(new[bn.input[1]], old[bn.input[1]])      # the scale moved
    want = session(_bn_cnn()).run(None, data)[0]
    err = lambda m: np.linalg.norm(session(m).run(None, data)[0] - want)  # noqa: E731
    assert err(r.model) < 0.8 * err(plain.model)
    free = spa.prune(_bn_cnn(), ratio=0.5, criterion="l1", round_to=1, recalibrate=True)
    assert "skipped" in free.report["data"]["normalizations_refit"]


@pytest.mark.parametrize("rank", [2, 3, 4])
def test_steered_batch_norm_gives_each_channel_its_running_scale_and_bias(rank):
    """In the statistics copy, a BatchNormalization's output has per channel the mean of its
    bias and the standard deviation of its scale over the batch, whatever its input's
    statistics; names stay, and the model itself is untouched."""
    from spa.score.steer import steer_batch_norms
    g = Graph(seed=3)
    shape = ["N", 6, 5, 4][:rank]
    x = g.input(shape)
    scale = np.array([0.5, 1, 2, 3, 0.25, 1.5], np.float32)
    bias = np.array([-1, 0, 1, 2, 0.5, -0.5], np.float32)
    mean, var = np.full(6, 40, np.float32), np.full(6, 0.01, np.float32)   # far from the inputs'
    y = g.op("BatchNormalization", [x, g.const(scale), g.const(bias), g.const(mean), g.const(var)])
    g.output(g.op("Relu", [y]))
    model = g.model()
    before = model.SerializeToString()
    steered, count = steer_batch_norms(model)
    assert count == 1 and model.SerializeToString() == before
    assert steer_batch_norms(model, batch=1)[1] == (0 if rank == 2 else 1)   # one value per channel: noise
    xs = (np.random.default_rng(0).standard_normal([8, 6, 5, 4][:rank]) * 3 + 7).astype(np.float32)
    from spa.score.data import _session_with_outputs
    got = _session_with_outputs(steered, [y]).run([y], {"x": xs})[0]
    axes = tuple(a for a in range(rank) if a != 1)
    assert np.allclose(got.mean(axis=axes), bias, atol=1e-4)
    assert np.allclose(got.std(axis=axes), scale, rtol=1e-3)
    plain = session(model).run(None, {"x": xs})[0]
    assert plain.min() >= 0 and not np.allclose(plain, session(steered).run(None, {"x": xs})[0])


def test_data_free_obspa_steers_batch_norms_on_images_only(monkeypatch):
    """Image models with BatchNormalization collect data-free statistics on the steered copy
    (and OBS chooses); the plan still passes the oracle; calibration data is never steered."""
    r = spa.prune(_bn_cnn(), ratio=0.5, criterion="obspa", round_to=1, verify=True)
    assert r.report["verify"]["ok"] and r.report["data"]["batch_norms_steered"] == 2
    assert "chosen by l1" not in r.report["data"]["mode"]
    import spa.score.obspa as obspa
    monkeypatch.setattr(obspa, "steer_batch_norms", lambda m, batch=16: (m, 0))
    unsteered = spa.prune(_bn_cnn(), ratio=0.5, criterion="obspa", round_to=1)
    weights = lambda m: np.concatenate([numpy_helper.to_array(t).ravel() for t in m.graph.initializer])  # noqa: E731
    a, b = weights(r.model), weights(unsteered.model)
    assert a.shape != b.shape or not np.allclose(a, b)      # the statistics came from the steered copy
    monkeypatch.undo()
    data = {"x": np.random.default_rng(3).standard_normal((32, 3, 8, 8)).astype(np.float32)}
    calibrated = spa.prune(_bn_cnn(), ratio=0.5, criterion="obspa", round_to=1, calib=data)
    assert "batch_norms_steered" not in calibrated.report["data"]


def test_float16_conv_with_float32_batch_norm_keeps_data_free_obspa():
    """BatchNormalization (opset 15+) may hold float32 parameters for float16 data, which the
    steered copy's InstanceNormalization cannot: that layer is not steered, OBSPA still runs
    (no fallback to l1), and a bias it adds to a float16 conv is float16."""
    from onnx import TensorProto, helper, numpy_helper
    rng = np.random.default_rng(0)
    f16 = lambda *s: numpy_helper.from_array((rng.standard_normal(s) * 0.5).astype(np.float16))  # noqa: E731
    inits = []
    for name, t in (("w1", f16(8, 3, 3, 3)), ("w2", f16(4, 8, 3, 3))):
        t.name = name
        inits.append(t)
    for name, v in (("s", np.ones(8)), ("b", np.zeros(8)), ("m", np.zeros(8)), ("v", np.ones(8))):
        inits.append(numpy_helper.from_array(v.astype(np.float32), name))
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1] * 4),
             helper.make_node("BatchNormalization", ["c1", "s", "b", "m", "v"], ["n1"]),
             helper.make_node("Relu", ["n1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2"], ["y"], pads=[1] * 4)]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 4, 8, 8])], inits),
        opset_imports=[helper.make_opsetid("", 15)])
    r = spa.prune(model, ratio=0.5, criterion="obspa", round_to=1, verify=True)
    assert r.report["verify"]["ok"] and "fallback" not in r.report["data"]
    assert "batch_norms_steered" not in r.report["data"]
