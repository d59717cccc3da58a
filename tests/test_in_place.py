"""A model whose weights are in its .onnx file is read without them: they stay in the file,
read where they lie (spa/loading/in_place.py), and a pruned one-file model is written as one
file again, a weight at a time."""

import os

import numpy as np
import onnx
import pytest

import spa
import spa.loading.model as model_io
from graphs import Graph
from spa.loading.in_place import IN_PLACE_MIN, parse_in_place
from spa.loading.tensors import IN_PLACE_FILES, _DATA_FILES, forget_files, tensor_array


def _mlp(seed=0):
    """Two prunable layers, and one of 8 KB that no pruning touches."""
    g = Graph(seed=seed)
    x = g.input([1, 64])
    h = g.op("Relu", [g.op("MatMul", [x, g.weight(64, 256)])])
    g.output(g.op("MatMul", [h, g.weight(256, 8)]))
    g.output(g.op("MatMul", [x, g.weight(64, 32)]))
    return g.model()


@pytest.fixture
def in_place(monkeypatch):
    """Every model file counts as large enough to be read in place."""
    monkeypatch.setattr(model_io, "IN_PLACE_ABOVE", 0)


def _read(path):
    """The model read in place, and the files it holds open (``analysis.Loaded`` keeps them)."""
    return model_io.read(path, in_place=True)


def _initializers(model):
    return {t.name: tensor_array(t) for t in model.graph.initializer}


def test_weights_stay_in_the_model_file_and_read_the_same(tmp_path, in_place):
    src = tmp_path / "m.onnx"
    onnx.save(_mlp(), src)
    before = src.read_bytes()
    model, files = _read(src)
    where = os.path.realpath(src)
    placed = [t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert sorted(tuple(t.dims) for t in placed) == [(64, 32), (64, 256), (256, 8)]    # the weights over 4 KB
    assert all({e.key: e.value for e in t.external_data}["location"] == where for t in placed)
    assert where in IN_PLACE_FILES and where in _DATA_FILES
    reference = onnx.load(src)
    got = _initializers(model)
    for t in reference.graph.initializer:
        np.testing.assert_array_equal(got[t.name], onnx.numpy_helper.to_array(t))
    small = [t for t in model.graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL]
    assert all(len(t.raw_data) < IN_PLACE_MIN for t in small if t.HasField("raw_data"))
    assert src.read_bytes() == before
    del files                                               # its reader gone, the file is let go
    assert where not in _DATA_FILES
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in spa.load(src).graph.initializer)


def test_a_pruned_one_file_model_is_written_as_one_file(tmp_path, in_place):
    src = tmp_path / "m.onnx"
    onnx.save(_mlp(), src)
    before = src.read_bytes()
    r = spa.prune(src, ratio=0.5, round_to=1, verify=True)
    assert r.report["verify"]["ok"]
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in r.model.graph.initializer)
    out = r.save(tmp_path / "out.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "out.onnx"]
    assert src.read_bytes() == before
    written = onnx.load(out)
    onnx.checker.check_model(written)
    assert sorted(tuple(t.dims) for t in written.graph.initializer) == [(64, 32), (64, 128), (128, 8)]
    # the same pruned model as from the model read whole
    model_io.IN_PLACE_ABOVE = 1 << 62
    whole = spa.prune(src, ratio=0.5, round_to=1)
    expected = _initializers(whole.model)
    for name, value in _initializers(written).items():
        np.testing.assert_array_equal(value, expected[name])


def test_the_one_file_writer_writes_what_onnx_save_writes(tmp_path, in_place):
    """Field for field the model onnx.save writes, with the weights read in place written in."""
    src = tmp_path / "m.onnx"
    original = _mlp(seed=3)
    original.doc_string = "kept"
    original.metadata_props.add(key="k", value="v")
    onnx.save(original, src)
    model, files = _read(src)
    assert any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)
    spa.save(model, tmp_path / "copy.onnx")
    assert not (tmp_path / "copy.onnx.data").exists()
    copy = onnx.load(tmp_path / "copy.onnx")
    assert copy == onnx.load(src) == original


def test_the_model_file_stays_open_for_its_weights_until_its_reader_goes(tmp_path, in_place):
    src = tmp_path / "m.onnx"
    onnx.save(_mlp(), src)
    r = spa.prune(src, ratio=0.5, round_to=1)
    where = os.path.realpath(src)
    forget_files(r.original)          # (a scratch model's forgetting never closes the input's file)
    assert where in _DATA_FILES
    np.testing.assert_array_equal(tensor_array(r.original.graph.initializer[0]),
                                  onnx.numpy_helper.to_array(onnx.load(src).graph.initializer[0]))


@pytest.mark.parametrize("damage", ["truncated", "raw size", "garbage"])
def test_a_broken_file_gets_the_errors_of_a_whole_read(tmp_path, in_place, damage):
    """Where the file is not what the in-place reader expects, it is read whole, and a broken
    file is refused with the same message as before."""
    src = tmp_path / "m.onnx"
    model = _mlp()
    if damage == "raw size":
        t = model.graph.initializer[0]
        t.raw_data = t.raw_data[:-4]
    data = model.SerializeToString()
    if damage == "truncated":
        data = data[:len(data) // 2]
    elif damage == "garbage":
        data = data[:100] + b"\xff" * 64 + data[164:]
    src.write_bytes(data)
    assert parse_in_place(data) is None
    with pytest.raises(spa.ModelLoadError) as read_in_place:
        _read(src)
    with pytest.raises(spa.ModelLoadError) as read_whole:
        model_io.read(src)
    assert str(read_in_place.value) == str(read_whole.value)


def test_a_refused_model_read_in_place_holds_no_file(tmp_path, in_place):
    model = _mlp()
    model.graph.node[0].op_type = "NoSuchOp"               # passes the reader, fails the checker
    src = tmp_path / "m.onnx"
    onnx.save(model, src)
    with pytest.raises(spa.ModelLoadError, match="invalid ONNX model"):
        _read(src)
    assert os.path.realpath(src) not in _DATA_FILES


def test_what_protobuf_refuses_or_spa_cannot_leave_is_parsed_whole(monkeypatch):
    """Keys and lengths longer than protobuf's 5 bytes, weights in segments, and more fields
    than the reader walks in Python get None: the file is parsed whole."""
    import spa.loading.in_place as in_place_io
    data = _mlp().SerializeToString()
    assert parse_in_place(data) is not None
    assert data[0] == 0x08                                  # ModelProto.ir_version's key, one byte
    assert parse_in_place(b"\x88\x80\x80\x80\x80\x00" + data[1:]) is None        # the same key in 6 bytes
    segmented = _mlp()
    segmented.graph.initializer[0].segment.begin = 0
    placed = parse_in_place(segmented.SerializeToString())[1]
    assert 0 not in placed and placed
    monkeypatch.setattr(in_place_io, "_FIELDS", 3)
    assert parse_in_place(data) is None


def test_tensors_already_external_or_small_stay_as_they_are():
    model = _mlp()
    t = model.graph.initializer[0]
    t.data_location = onnx.TensorProto.DEFAULT     # written out, as onnx's own converters do
    parsed, placed = parse_in_place(model.SerializeToString())
    assert [parsed.graph.initializer[i].name for i in placed] == [t.name for t in model.graph.initializer
                                                                 if len(t.raw_data) >= IN_PLACE_MIN]
    tiny = Graph()
    x = tiny.input([1, 4])
    tiny.output(tiny.op("MatMul", [x, tiny.weight(4, 4)]))
    assert parse_in_place(tiny.model().SerializeToString()) is None          # nothing worth leaving


def test_the_reader_takes_keys_and_lengths_of_at_most_5_bytes():
    """As protobuf: a length in 6 bytes is refused, even where protobuf never sees it (the raw
    data's length, which the in-place reader alone reads)."""
    from spa.loading.in_place import _fields, _Malformed
    assert [f[:2] for f in _fields(b"\x4a\x80\x80\x80\x80\x00", 0, 6)] == [(9, 2)]      # 0 in 5 bytes
    with pytest.raises(_Malformed):
        list(_fields(b"\x4a\x80\x80\x80\x80\x80\x00", 0, 7))                           # 0 in 6 bytes
    with pytest.raises(_Malformed):
        list(_fields(b"\x4a\xff\xff\xff\xff\x0f", 0, 6))                               # 2^32 - 1: over 2 GB


def test_weights_read_in_place_are_fed_to_sessions_where_they_lie(tmp_path, in_place, monkeypatch):
    """Mostly at offsets that are no multiple of their item size: fed as they lie all the
    same (no copy), and the oracle's runs on them agree."""
    from spa import runtime
    from spa.loading.tensors import weight_view
    src = tmp_path / "m.onnx"
    onnx.save(_mlp(), src)
    model, files = _read(src)
    views = [weight_view(t) for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert all(not v.flags.owndata for v in views) and any(not v.flags.aligned for v in views)
    reference = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(src).graph.initializer}
    for t, v in zip([t for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL], views):
        np.testing.assert_array_equal(v, reference[t.name])
    monkeypatch.setattr(runtime, "FED_ABOVE", 0)
    feeds = {"x": np.ones((1, 64), np.float32)}
    fed = runtime.session(model)
    assert fed.fed
    for got, want in zip(fed.run(None, feeds), runtime.session(onnx.load(src)).run(None, feeds)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert spa.prune(src, ratio=0.5, round_to=1, verify=True).report["verify"]["ok"]
