"""Trust, round two: each class of hostile input, generated here, against the promises of
docs/options.md's "Bad input": exit code, one line, no traceback, nothing written outside what the user
named, inputs and bystanders byte-identical, no leftovers, bounded memory and time."""

from __future__ import annotations

import io
import os
import socket
import tempfile
import threading
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import helper

from spa.analysis import Loaded
from spa.pipeline import prune
from spa.errors import SpaError
from graphs import Graph
from test_hostile import Case, check, external, small_model

INPUT = small_model().graph.input[0].name


def _save(model, path: Path) -> Path:
    onnx.save(model, path)
    return path


# ---------------------------------------------------------------- nothing written outside -o

def test_sweep_never_writes_outside_o_whatever_the_model_is_called(tmp_path, capsys):
    """A model named '...onnx' has the stem '..': its folder would be the parent of -o."""
    models = tmp_path / "models"
    models.mkdir()
    dots, plain = _save(small_model(), models / "...onnx"), _save(small_model(), models / "b.onnx")
    out = tmp_path / "work" / "out"
    out.parent.mkdir()
    bystanders = [out.parent / "sweep.json", out.parent / "sweep.csv"]
    for b in bystanders:
        b.write_text("a user's file\n")
    check(Case(["sweep", dots, plain, "--ratios", "0.5", "--criteria", "l1", "-o", out, "--runs", "1",
                "--samples", "4", "--backend", "serial"], 2, ("...onnx", "rename the file"), tmp_path, bystanders),
          capsys)


def _obspa_case(tmp_path, *extra) -> Case:
    return Case(["prune", _save(small_model(), tmp_path / "m.onnx"), "-o", tmp_path / "out.onnx",
                 "--ratio", "0.5", "--round-to", "1", *extra], folder=tmp_path)


def test_a_foreign_plan_side_file_is_never_replaced(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    foreign = tmp_path / "plan.json.npz"
    foreign.write_bytes(b"somebody else's archive")
    case = _obspa_case(tmp_path, "--plan", plan)
    case.code, case.words, case.bystanders = 2, ("plan.json.npz", "did not write", "--plan"), [foreign]
    check(case, capsys)


def test_spas_own_plan_side_file_is_replaced_on_a_rerun(tmp_path, capsys):
    plan = tmp_path / "plan.json"
    case = _obspa_case(tmp_path, "--plan", plan)
    case.code, case.may_create = 0, [tmp_path / "out.onnx", plan, tmp_path / "plan.json.npz"]
    check(case, capsys)
    assert (tmp_path / "plan.json.npz").is_file(), "OBSPA changed no values: the test needs a side file"
    (tmp_path / "out.onnx").unlink()
    check(case, capsys)


def wide_model() -> onnx.ModelProto:
    """A constant over 4 KB that pruning leaves alone: it stays in the external data file, so
    the output has one too."""
    g = Graph()
    x = g.input([1, 3, 32, 32])
    y = g.conv(g.op("Relu", [g.conv(x, 3, 16)]), 16, 4)
    g.output(g.op("Add", [y, g.const(np.ones((1, 4, 32, 32), np.float32))]))
    return g.model()


def test_a_foreign_weight_file_beside_o_is_never_replaced(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    path = external(wide_model(), folder)
    foreign = tmp_path / "out.onnx.data"
    foreign.write_bytes(b"a stranger's weights")
    argv = ["prune", path, "-o", tmp_path / "out.onnx", "--ratio", "0.5", "--criterion", "l1"]
    check(Case(argv, 2, ("out.onnx.data", "did not write"), tmp_path, [foreign]), capsys)
    foreign.unlink()
    made = [tmp_path / "out.onnx", foreign]
    check(Case(argv, 0, (), tmp_path, may_create=made), capsys)
    assert foreign.is_file(), "the output kept no external data: the test needs a side file"
    check(Case(argv, 0, (), tmp_path, may_create=made), capsys)   # spa's own: replaced


def test_ray_workers_keep_no_copy_of_the_users_files(tmp_path, monkeypatch):
    """The task function itself, without Ray: Ray kills its workers without atexit, so the
    files must be gone as soon as the worker has read them."""
    from spa.sweep import Cell, SweepConfig
    from spa.sweep.ray_backend import _cell_task, _files_of
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    folder = tmp_path / "m"
    folder.mkdir()
    path = external(small_model(), folder)
    blobs, config = _files_of(SweepConfig(str(path), runs=1, samples=4))
    row = _cell_task("sweep-1", blobs, config, Cell("l1", "ratio", 0.5))
    assert "error" not in row, row
    row = _cell_task("sweep-1", blobs, config, Cell("l1", "ratio", 0.25))   # later cells: from memory
    assert "error" not in row, row
    assert [p for p in tmp_path.iterdir() if p.name.startswith("spa-ray-")] == []


def test_a_ray_address_where_nothing_listens_fails_fast():
    from spa.sweep.ray_backend import _check_reachable
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SpaError, match="nothing answers"):
        _check_reachable(f"127.0.0.1:{port}", timeout=5)
    with pytest.raises(SpaError, match="HOST:PORT"):
        _check_reachable("no-port-here")


# ---------------------------------------------------------------- nothing hangs, nothing blows up

def test_external_data_swapped_for_a_fifo_after_the_checks_does_not_block(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    path = external(wide_model(), folder)   # its 16 KB constant stays on disk, read when saving
    loaded = Loaded.read(path)
    (folder / "m.data").unlink()
    os.mkfifo(folder / "m.data")
    done = {}

    def run():
        done["result"] = prune(loaded, ratio=0.5, criterion="l1", round_to=1)
        done["files"] = done["result"].save(tmp_path / "out.onnx")
    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "spa opened the FIFO by path and blocked"
    assert "result" in done
    out = onnx.load(tmp_path / "out.onnx")
    onnx.checker.check_model(out)


def _npz_declaring(path: Path, arrays: dict, declared: dict):
    """An .npz holding ``arrays`` and, for each of ``declared`` (name -> shape), a header that
    declares a huge float32 array followed by a few bytes only: the header is all a careful
    reader looks at."""
    with zipfile.ZipFile(path, "w") as z:
        for name, value in arrays.items():
            buf = io.BytesIO()
            np.save(buf, value)
            z.writestr(name + ".npy", buf.getvalue())
        for name, shape in declared.items():
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
            z.writestr(name + ".npy", buf.getvalue() + bytes(64))
    return path


def _calib(n=8):
    return np.random.default_rng(0).standard_normal((n, 3, 8, 8)).astype(np.float32)


def test_arrays_no_input_names_are_never_decompressed(tmp_path, capsys):
    data = _npz_declaring(tmp_path / "c.npz", {INPUT: _calib()}, {"unused": (3 * 2**28,)})
    case = _obspa_case(tmp_path, "--calib", data)
    case.code, case.may_create = 0, [tmp_path / "out.onnx"]
    tracemalloc.start()
    try:
        check(case, capsys)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 200 << 20, f"{peak / 2**20:.0f} MiB traced: an unused array was read"


@pytest.mark.parametrize("flag", ["--calib", "--eval"])
def test_a_used_array_declaring_gigabytes_is_refused_from_its_header(tmp_path, capsys, flag):
    extra = {"label": np.zeros(8, np.int64)} if flag == "--eval" else {}
    data = _npz_declaring(tmp_path / "c.npz", extra, {INPUT: (2**30, 3, 8, 8)})
    case = _obspa_case(tmp_path, flag, data)
    case.code, case.words = 2, ("GiB", repr(INPUT))
    check(case, capsys)


@pytest.mark.parametrize("flag,value,words", [
    ("--calib", np.array(["a", "b"]), ("<U1",)),
    ("--calib", np.zeros((4, 3, 8, 8), np.complex64), ("complex64",)),
    ("--calib", np.array([[1, 2]], dtype=object), ("object",)),
    ("--eval", np.zeros((4, 3, 8, 8), np.complex128), ("complex128",)),
    ("--eval", np.float32(1.0), ("0-d",)),
])
def test_data_arrays_that_are_not_numbers_per_sample(tmp_path, capsys, flag, value, words):
    arrays = {INPUT: value}
    if flag == "--eval":
        arrays["label"] = np.zeros(4, np.int64)
    path = tmp_path / "d.npz"
    if value.dtype == object:   # np.savez would pickle it; write the header it would have
        _npz_declaring(path, {}, {})
        with zipfile.ZipFile(path, "w") as z:
            buf = io.BytesIO()
            np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": (1, 2)})
            z.writestr(INPUT + ".npy", buf.getvalue())
    else:
        np.savez(path, **arrays)
    case = _obspa_case(tmp_path, flag, path)
    case.code, case.words = 2, words
    check(case, capsys)


def test_calib_naming_no_input_is_an_error_not_a_silent_fallback(tmp_path, capsys):
    path = tmp_path / "d.npz"
    np.savez(path, images=_calib())
    case = _obspa_case(tmp_path, "--calib", path)
    case.code, case.words = 2, ("--calib", repr(INPUT), "images")
    check(case, capsys)


# ---------------------------------------------------------------- no internal errors

def test_conv_with_group_zero(tmp_path, capsys):
    model = small_model()
    conv = next(n for n in model.graph.node if n.op_type == "Conv")
    del conv.attribute[:]
    conv.attribute.append(helper.make_attribute("group", 0))
    path = _save(model, tmp_path / "g.onnx")
    check(Case(["prune", path, "-o", tmp_path / "out.onnx", "--ratio", "0.5"], 2, (), tmp_path), capsys)


@pytest.mark.parametrize("output", ["", "/", "./"])
def test_an_output_that_names_no_file(tmp_path, capsys, output):
    path = _save(small_model(), tmp_path / "m.onnx")
    check(Case(["prune", path, "-o", output, "--ratio", "0.5"], 2, ("names no file",), tmp_path), capsys)


def test_bench_of_a_model_against_its_float16_copy(tmp_path, capsys):
    from onnxruntime.transformers.float16 import convert_float_to_float16
    a = _save(small_model(), tmp_path / "a.onnx")
    b = _save(convert_float_to_float16(small_model(), keep_io_types=False), tmp_path / "b.onnx")
    out, _ = check(Case(["bench", a, b, "--runs", "2"], 0, (), tmp_path), capsys)
    assert "latency" in out


# ---------------------------------------------------------------- old and odd files

def _ir3(listed: bool) -> onnx.ModelProto:
    model = small_model()
    g = model.graph
    if listed:
        g.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in g.initializer)
    model.ir_version = 3
    del model.opset_import[:]
    model.opset_import.append(helper.make_opsetid("", 7))
    return model


def test_a_valid_ir3_model_with_initializers_as_inputs_is_pruned(tmp_path, capsys):
    model = _ir3(listed=True)
    onnx.checker.check_model(model)
    path = _save(model, tmp_path / "old.onnx")
    out = tmp_path / "out.onnx"
    check(Case(["prune", path, "-o", out, "--ratio", "0.5", "--round-to", "1"], 0, (), tmp_path,
               may_create=[out]), capsys)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned)
    assert sum(t.dims[0] for t in pruned.graph.initializer if len(t.dims) == 4) < \
        sum(t.dims[0] for t in model.graph.initializer if len(t.dims) == 4)


def test_an_invalid_ir3_model_is_refused_not_written(tmp_path, capsys):
    model = _ir3(listed=False)
    with pytest.raises(onnx.checker.ValidationError):
        onnx.checker.check_model(model)
    path = _save(model, tmp_path / "old.onnx")
    check(Case(["prune", path, "-o", tmp_path / "out.onnx", "--ratio", "0.5"], 2, ("IR version 3",), tmp_path),
          capsys)


@pytest.mark.parametrize("value,words", [
    (np.zeros((8, 3, 16, 16), np.float32), ("per-sample shape", "(3, 16, 16)")),
    (np.zeros((1, 3, 8, 8), np.float32), ("1 sample",)),
])
def test_calib_that_does_not_fit_the_model_is_an_error(tmp_path, capsys, value, words):
    path = tmp_path / "d.npz"
    np.savez(path, **{INPUT: value})
    case = _obspa_case(tmp_path, "--calib", path)
    case.code, case.words = 2, words
    check(case, capsys)


# ---------------------------------------------------------------- found by the second attack

def test_a_foreign_side_file_stays_even_where_the_named_file_mentions_it(tmp_path, capsys):
    """Only an ONNX file that reads its weights from the side file (or an spa plan naming its
    arrays) makes it spa's: a file that merely holds the name does not."""
    folder = tmp_path / "m"
    folder.mkdir()
    path = external(wide_model(), folder)
    (tmp_path / "out.onnx").write_text("notes about out.onnx.data")
    foreign = tmp_path / "out.onnx.data"
    foreign.write_bytes(b"a stranger's weights")
    check(Case(["prune", path, "-o", tmp_path / "out.onnx", "--ratio", "0.5", "--criterion", "l1"], 2,
               ("did not write",), tmp_path, [foreign, tmp_path / "out.onnx"]), capsys)
    plan = tmp_path / "plan.json"
    plan.write_text('{"note": "plan.json.npz"}')
    (tmp_path / "plan.json.npz").write_bytes(b"a stranger's arrays")
    case = _obspa_case(tmp_path, "--plan", plan)
    case.code, case.words = 2, ("plan.json.npz", "did not write")
    case.bystanders = [plan, tmp_path / "plan.json.npz"]
    check(case, capsys)


def test_a_refused_plan_leaves_the_previous_output_in_place(tmp_path, capsys):
    out = tmp_path / "out.onnx"
    out.write_bytes(b"the user's previous model")
    (tmp_path / "plan.json.npz").write_bytes(b"a stranger's arrays")
    case = _obspa_case(tmp_path, "--plan", tmp_path / "plan.json")
    case.code, case.words, case.bystanders = 2, ("did not write",), [out, tmp_path / "plan.json.npz"]
    check(case, capsys)


def test_names_too_long_for_the_file_system_are_refused_before_the_work(tmp_path, capsys):
    path = _save(small_model(), tmp_path / "m.onnx")
    check(Case(["prune", path, "-o", tmp_path / ("o" * 250 + ".onnx"), "--ratio", "0.5"], 2, ("too long",),
               tmp_path), capsys)
    check(Case(["prune", path, "-o", tmp_path / "o.onnx", "--report", tmp_path / ("r" * 250), "--ratio", "0.5"],
               2, ("too long",), tmp_path), capsys)


@pytest.mark.parametrize("name", ["..onnx", "...onnx"])
def test_sweep_of_a_model_whose_name_makes_no_folder(tmp_path, capsys, name):
    models = tmp_path / "models"
    models.mkdir()
    odd, other = _save(small_model(), models / name), _save(small_model(), models / "sweep.csv.onnx")
    check(Case(["sweep", odd, other, "--ratios", "0.5", "--criteria", "l1", "-o", tmp_path / "out", "--runs", "1",
                "--samples", "4", "--backend", "serial"], 2, ("rename the file",), tmp_path), capsys)


def test_sweep_into_a_dangling_link(tmp_path, capsys):
    path = _save(small_model(), tmp_path / "m.onnx")
    (tmp_path / "out").symlink_to(tmp_path / "nowhere")
    check(Case(["sweep", path, "--ratios", "0.5", "--criteria", "l1", "-o", tmp_path / "out", "--runs", "1",
                "--samples", "4", "--backend", "serial"], 2, ("broken symbolic link",), tmp_path), capsys)


def test_a_string_tensor_with_external_data(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    model = small_model()
    model.graph.initializer.append(onnx.helper.make_tensor("names", onnx.TensorProto.STRING, [2], [b"a", b"b"]))
    path = external(model, folder)
    m = onnx.load(path, load_external_data=False)
    t = next(t for t in m.graph.initializer if t.name == "names")
    if t.data_location != onnx.TensorProto.EXTERNAL:   # onnx keeps strings inline: point it outside by hand
        del t.string_data[:]
        t.data_location = onnx.TensorProto.EXTERNAL
        t.external_data.add(key="location", value="m.data")
        onnx.save(m, path)
    check(Case(["prune", path, "-o", tmp_path / "out.onnx", "--ratio", "0.5"], 2, ("string",), tmp_path), capsys)


def test_the_library_keeps_no_descriptor_of_a_result_it_no_longer_holds(tmp_path):
    import gc
    from spa.loading import model as loading
    for i in range(3):
        folder = tmp_path / f"m{i}"
        folder.mkdir()
        result = prune(external(wide_model(), folder), ratio=0.5, criterion="l1")
        result.save(tmp_path / f"out{i}.onnx")    # the input's untouched weights are read again here
        assert any(str(folder) in p for p in loading._DATA_FILES)
        del result
    gc.collect()
    assert not [p for p in loading._DATA_FILES if str(tmp_path) in p]


@pytest.mark.parametrize("label,value,words", [
    (np.zeros((4, 2), np.int64), np.zeros((4, 3, 8, 8), np.float32), ("'label'", "one integer class")),
    (np.zeros(4, np.int64), np.zeros((4, 3, 9, 8), np.float32), ("(4, 3, 9, 8)",)),
    (np.zeros(4, np.int64), np.zeros((4, 3, 8), np.float32), ("(4, 3, 8)",)),
    (np.zeros(4, np.float32), np.zeros((4, 3, 8, 8), np.float32), ("'label'",)),
])
def test_eval_arrays_that_do_not_fit_the_model(tmp_path, capsys, label, value, words):
    path = tmp_path / "e.npz"
    np.savez(path, **{INPUT: value, "label": label})
    case = _obspa_case(tmp_path, "--eval", path)
    case.code, case.words = 2, words
    check(case, capsys)


def test_eval_integers_for_a_float_input_are_cast(tmp_path, capsys):
    path = tmp_path / "e.npz"
    np.savez(path, **{INPUT: np.ones((4, 3, 8, 8), np.int32), "label": np.zeros(4, np.int64)})
    g = Graph()
    x = g.input([1, 3, 8, 8])
    h = g.op("Relu", [g.conv(x, 3, 16)])
    g.output(g.op("Flatten", [g.op("GlobalAveragePool", [g.conv(h, 16, 4)])]))
    model = _save(g.model(), tmp_path / "cls.onnx")
    out = tmp_path / "out.onnx"
    check(Case(["prune", model, "-o", out, "--ratio", "0.5", "--eval", path], 0, (), tmp_path, may_create=[out]),
          capsys)


@pytest.mark.parametrize("how", ["channels", "batch"])
def test_bench_of_models_with_other_input_shapes(tmp_path, capsys, how):
    a = _save(small_model(), tmp_path / "a.onnx")
    g = Graph()
    x = g.input([1, 5, 8, 8] if how == "channels" else [3, 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(x, 5 if how == "channels" else 3, 16)]), 16, 4))
    b = _save(g.model(), tmp_path / "b.onnx")
    check(Case(["bench", a, b, "--runs", "2"], 2, ("different shapes",), tmp_path), capsys)


def test_calib_that_overflows_prints_one_line_at_most(tmp_path, capsys):
    path = tmp_path / "c.npz"
    np.savez(path, **{INPUT: np.full((8, 3, 8, 8), np.iinfo(np.uint64).max, np.uint64)})
    case = _obspa_case(tmp_path, "--calib", path)
    case.code, case.may_create = None, [tmp_path / "out.onnx"]
    from spa.cli.commands import main
    code = main([str(a) for a in case.argv])
    err = capsys.readouterr().err
    assert "Warning" not in err and len([x for x in err.splitlines() if x.strip()]) <= 1, err
    assert code in (0, 2)


def test_a_sparse_initializer_is_not_called_invalid(tmp_path, capsys):
    model = small_model()
    weight = model.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight).reshape(-1)
    nz = np.nonzero(values)[0]
    sparse = onnx.helper.make_sparse_tensor(onnx.numpy_helper.from_array(values[nz], weight.name),
                                            onnx.numpy_helper.from_array(nz.astype(np.int64), weight.name + "_i"),
                                            list(weight.dims))
    del model.graph.initializer[0]
    model.graph.sparse_initializer.append(sparse)
    path = _save(model, tmp_path / "s.onnx")
    out = tmp_path / "out.onnx"
    code_case = Case(["prune", path, "-o", out, "--ratio", "0.5", "--criterion", "l1"], 0, (), tmp_path,
                     may_create=[out])
    from spa.cli.commands import main
    code = main([str(a) for a in code_case.argv])
    err = capsys.readouterr().err
    assert "invalid ONNX model" not in err and "Traceback" not in err
    assert code == 0 or len(err.strip().splitlines()) == 1
