"""A corpus of hostile and odd inputs, each built by code in a temporary folder.

Every case runs the ``spa`` command and asserts the promises of docs/options.md's "Bad input":
the exit code, one line on stderr naming the problem, no traceback, no file left behind,
and every input and bystander file byte-identical afterwards (modes included).
"""

from __future__ import annotations

import os
import select
import signal
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphs import Graph
import spa.loading.saving
from spa.cli.commands import main

SECRET = b"root:x:0:0:SPA-SECRET-MARKER"


def small_model() -> onnx.ModelProto:
    g = Graph()
    x = g.input([1, 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 16)]), 16, 4))
    return g.model()


def external(model: onnx.ModelProto, folder: Path, name="m.onnx", location="m.data") -> Path:
    """Save with every tensor in ``location`` (relative to ``folder``)."""
    path = folder / name
    onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
              location=location, size_threshold=0)
    return path


def point_at(path: Path, location: str, tensor: int = 0):
    """Rewrite the external location of one tensor of a saved model."""
    m = onnx.load(path, load_external_data=False)
    t = m.graph.initializer[tensor]
    for e in t.external_data:
        if e.key == "location":
            e.value = location
    onnx.save(m, path)


def set_external(path: Path, tensor: int = 0, **kv):
    m = onnx.load(path, load_external_data=False)
    t = m.graph.initializer[tensor]
    for e in t.external_data:
        if e.key in kv:
            e.value = str(kv[e.key])
    onnx.save(m, path)


@dataclass
class Case:
    argv: list
    code: int = 2                      # expected exit status
    words: tuple = ()                  # must appear in the one error line
    folder: Path | None = None
    bystanders: list[Path] = field(default_factory=list)   # must stay byte-identical
    may_create: list[Path] = field(default_factory=list)   # files the run may leave


def snapshot(paths):
    out = {}
    for p in paths:
        p = Path(p)
        if p.is_file():
            out[p] = (p.read_bytes(), stat.S_IMODE(p.stat().st_mode))
        elif os.path.lexists(p):
            out[p] = (stat.S_IFMT(os.lstat(p).st_mode), None)
    return out


def listing(folder: Path):
    return {p for p in folder.rglob("*")}


def check(case: Case, capsys):
    folder = case.folder
    protected = case.bystanders + [Path(a) for a in case.argv if isinstance(a, Path) and os.path.lexists(a)]
    before, files_before = snapshot(protected), listing(folder)
    code = main([str(a) for a in case.argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    assert code == case.code, (code, err)
    if case.code != 0:
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        assert lines[0].startswith("spa: error:"), err
        for w in case.words:
            assert w in lines[0], (w, lines[0])
        assert listing(folder) - files_before == set(), "a failed run left files behind"
    else:
        assert listing(folder) - files_before <= set(case.may_create)
    assert snapshot(protected) == before, "an input or bystander file changed"
    return out, err


# ---------------------------------------------------------------- reading outside the folder

def _outside_secret(tmp_path) -> tuple[Path, Path]:
    folder = tmp_path / "model"
    folder.mkdir()
    secret = tmp_path / "passwd"
    secret.write_bytes(SECRET * 400)
    return folder, secret


@pytest.mark.parametrize("how", ["dotdot", "absolute", "symlink-file", "symlink-dir"])
def test_external_data_outside_the_folder_is_refused(tmp_path, capsys, how):
    folder, secret = _outside_secret(tmp_path)
    path = external(small_model(), folder)
    if how == "dotdot":
        location = "../../../../../../../../" + str(secret).lstrip("/")
    elif how == "absolute":
        location = str(secret)
    elif how == "symlink-file":
        (folder / "link.data").symlink_to(secret)
        location = "link.data"
    else:
        (folder / "up").symlink_to(tmp_path)
        location = "up/passwd"
    point_at(path, location)
    out = folder / "out.onnx"
    check(Case(["prune", path, "-o", out], 2, ("external data", location), folder, [secret]), capsys)
    assert not out.exists()


def test_external_data_in_a_subfolder_is_fine_and_output_holds_no_outside_bytes(tmp_path, capsys):
    folder, secret = _outside_secret(tmp_path)
    (folder / "weights").mkdir()
    path = external(small_model(), folder, location="weights/w.bin")
    out = folder / "out.onnx"
    check(Case(["prune", path, "-o", out, "-q", "--round-to", "1"], 0, (), folder, [secret],
               [out, folder / "out.onnx.data"]), capsys)
    for f in (out, folder / "out.onnx.data"):
        assert not f.exists() or SECRET not in f.read_bytes()


@pytest.mark.parametrize("change,words", [
    ({"offset": 10 ** 9}, ("truncated",)),
    ({"offset": -4}, ("offset",)),
    ({"length": 4}, ("length",)),
    ({"offset": "abc"}, ("integers",)),
])
def test_external_data_reads_stay_within_the_file(tmp_path, capsys, change, words):
    folder = tmp_path / "m"
    folder.mkdir()
    path = external(small_model(), folder)
    set_external(path, 0, **change)
    check(Case(["prune", path, "-o", folder / "o.onnx"], 2, words, folder, [folder / "m.data"]), capsys)


def test_external_data_that_is_a_directory_or_fifo(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    path = external(small_model(), folder)
    (folder / "adir").mkdir()
    point_at(path, "adir")
    check(Case(["prune", path, "-o", folder / "o.onnx"], 2, ("not a regular file",), folder), capsys)
    os.mkfifo(folder / "fifo")
    point_at(path, "fifo")
    check(Case(["prune", path, "-o", folder / "o.onnx"], 2, ("not a regular file",), folder), capsys)


def test_declared_dims_larger_than_the_stored_bytes(tmp_path, capsys):
    m = small_model()
    t = m.graph.initializer[0]
    t.dims[0] = 1 << 40
    path = tmp_path / "liar.onnx"
    onnx.save(m, path)
    check(Case(["prune", path, "-o", tmp_path / "o.onnx"], 2, ("declares dims",), tmp_path), capsys)


# ---------------------------------------------------------------- never harming a file

@pytest.fixture
def ext_model(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    return external(small_model(), folder, name="a.onnx", location="b.onnx.data")


def test_report_is_the_input(tmp_path, capsys, ext_model):
    check(Case(["prune", ext_model, "-o", tmp_path / "o.onnx", "--report", ext_model], 2, ("input",),
               tmp_path, [ext_model.parent / "b.onnx.data"]), capsys)


def test_report_is_the_output(tmp_path, capsys, ext_model):
    out = tmp_path / "o.onnx"
    check(Case(["prune", ext_model, "-o", out, "--report", out], 2, ("same file",), tmp_path), capsys)


def test_output_is_the_inputs_data_file(tmp_path, capsys, ext_model):
    data = ext_model.parent / "b.onnx.data"
    check(Case(["prune", ext_model, "-o", data], 2, ("external data",), tmp_path, [data]), capsys)


def test_outputs_data_file_would_be_the_inputs(tmp_path, capsys, ext_model):
    data = ext_model.parent / "b.onnx.data"
    check(Case(["prune", ext_model, "-o", ext_model.parent / "b.onnx"], 2, ("external data",), tmp_path, [data]),
          capsys)


def test_output_through_a_symlink_to_the_input(tmp_path, capsys, ext_model):
    link = tmp_path / "link.onnx"
    link.symlink_to(ext_model)
    check(Case(["prune", ext_model, "-o", link], 2, ("input",), tmp_path, [ext_model]), capsys)


def test_output_hard_link_to_the_input(tmp_path, capsys, ext_model):
    link = tmp_path / "hard.onnx"
    os.link(ext_model, link)
    check(Case(["prune", ext_model, "-o", link], 2, ("input",), tmp_path, [ext_model]), capsys)


def test_report_is_the_calibration_file(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    calib = tmp_path / "c.npz"
    np.savez(calib, x=np.zeros((2, 3, 8, 8), np.float32))
    check(Case(["prune", path, "-o", tmp_path / "o.onnx", "--calib", calib, "--criterion", "obspa",
                "--report", calib], 2, ("--calib",), tmp_path, [calib]), capsys)


def test_output_is_a_fifo_or_device(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    check(Case(["prune", path, "-o", fifo], 2, ("not a regular file",), tmp_path), capsys)
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    check(Case(["prune", path, "-o", tmp_path / "o.onnx", "--report", fifo], 2, ("not a regular file",),
               tmp_path), capsys)
    dev = tmp_path / "null"  # a character device like /dev/null, made where it harms nothing
    try:
        os.mknod(dev, 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    except OSError:  # not root, or a container without CAP_MKNOD: the FIFO above stands in
        return
    check(Case(["prune", path, "-o", dev], 2, ("character device",), tmp_path), capsys)
    assert stat.S_ISCHR(os.lstat(dev).st_mode)


def test_output_is_a_directory(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    (tmp_path / "d").mkdir()
    check(Case(["prune", path, "-o", tmp_path / "d"], 2, ("directory",), tmp_path), capsys)
    check(Case(["prune", path, "-o", tmp_path / "o.onnx", "--report", tmp_path / "d"], 2, ("directory",),
               tmp_path), capsys)


def test_outputs_get_the_permissions_of_a_plain_write(tmp_path, capsys):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    old = os.umask(0o022)
    try:
        out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
        check(Case(["prune", path, "-o", out, "--report", rep, "-q"], 0, (), tmp_path, [], [out, rep]), capsys)
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        assert stat.S_IMODE(rep.stat().st_mode) == 0o644
        os.umask(0o077)
        out.chmod(0o640)  # an existing output keeps its bits, as with open(path, "w")
        check(Case(["prune", path, "-o", out, "-q"], 0, (), tmp_path, [], [out]), capsys)
        assert stat.S_IMODE(out.stat().st_mode) == 0o640
    finally:
        os.umask(old)


@pytest.mark.parametrize("extra,words", [
    (lambda d: ["--eval", d / "nolabel.npz"], ("label",)),
    (lambda d: ["--report", d / "missing" / "r.json"], ("does not exist",)),
    (lambda d: ["--calib", d / "nope.npz", "--criterion", "obspa"], ("no such file",)),
    (lambda d: ["--eval", d / "garbage.npz"], (".npz",)),
])
def test_failures_are_found_before_anything_is_written(tmp_path, capsys, extra, words):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    np.savez(tmp_path / "nolabel.npz", x=np.zeros((2, 3, 8, 8), np.float32))
    (tmp_path / "garbage.npz").write_bytes(b"not a zip")
    out = tmp_path / "o.onnx"
    check(Case(["prune", path, "-o", out, *extra(tmp_path)], 2, words, tmp_path), capsys)
    assert not out.exists()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP])
def test_signal_during_save_leaves_no_temporary_file(tmp_path, capsys, monkeypatch, signum):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    real_save = spa.loading.saving._write_one_file

    def save_then_signal(proto, target, *a, **k):
        real_save(proto, target, *a, **k)  # the temporary file is complete...
        os.kill(os.getpid(), signum)        # ...when the signal arrives

    monkeypatch.setattr(spa.loading.saving, "_write_one_file", save_then_signal)
    before = listing(tmp_path)
    code = main(["prune", str(path), "-o", str(tmp_path / "o.onnx"), "-q"])
    err = capsys.readouterr().err
    assert code == 128 + signum and "terminated" in err and "Traceback" not in err
    assert listing(tmp_path) == before


# A child ``spa`` that, once ``where`` is reached, says "busy" on stdout and stays there:
# "analysis" in Python code, "session" and "run" inside onnxruntime's C++ (a Loop of 10^15
# steps that never returns to Python), as a 100k-node graph keeps it for minutes.
BUSY = """
import sys
import onnxruntime as ort
from onnx import TensorProto, helper

def say_busy():
    print("busy", flush=True)

body = helper.make_graph(
    [helper.make_node("Identity", ["cond"], ["cond_out"]), helper.make_node("Add", ["v", "v"], ["v_out"])],
    "body", [helper.make_tensor_value_info("i", TensorProto.INT64, []),
             helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
             helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
    [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
     helper.make_tensor_value_info("v_out", TensorProto.FLOAT, [1])])
graph = helper.make_graph(
    [helper.make_node("Loop", ["n", "go", "v0"], ["v"], body=body)], "forever", [],
    [helper.make_tensor_value_info("v", TensorProto.FLOAT, [1])],
    [helper.make_tensor("n", TensorProto.INT64, [], [10 ** 15]), helper.make_tensor("go", TensorProto.BOOL, [], [True]),
     helper.make_tensor("v0", TensorProto.FLOAT, [1], [0.0])])
model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
forever = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
real_init, real_run = ort.InferenceSession.__init__, ort.InferenceSession.run

def stuck():
    say_busy()
    real_run(forever, None, {})

def init(self, *args, **kwargs):
    stuck()
    real_init(self, *args, **kwargs)

def run(self, *args, **kwargs):
    stuck()
    return real_run(self, *args, **kwargs)

where = sys.argv[1]
if where == "session":
    ort.InferenceSession.__init__ = init
elif where == "run":
    ort.InferenceSession.run = run
import spa.analysis
if where == "analysis":
    def analyze_forever(*args, **kwargs):
        say_busy()
        while True:
            sum(range(1000))
    spa.analysis.build_dependency = analyze_forever
from spa.cli import main
sys.exit(main(sys.argv[2:]))
"""
# How long a stopped child may take to exit (it does in well under a second).
STOP_S = 10


def _busy_child(argv: list, where: str, folder: Path) -> subprocess.Popen:
    root = Path(__file__).resolve().parent.parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    child = subprocess.Popen([sys.executable, "-c", BUSY, where, *map(str, argv)], cwd=folder, env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([child.stdout], [], [], 120)
    if not ready or child.stdout.readline().strip() != "busy":
        child.kill()
        pytest.fail(f"the child never got busy: {child.communicate()[1]}")
    return child


@pytest.mark.parametrize("where", ["analysis", "session", "run"])
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_spa_at_once_even_inside_onnxruntime(tmp_path, where, signum):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    before = listing(tmp_path)
    child = _busy_child(["prune", path, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json", "-q"],
                        where, tmp_path)
    time.sleep(0.3)                       # well inside the busy call
    child.send_signal(signum)
    start = time.monotonic()
    try:
        _, err = child.communicate(timeout=STOP_S)
    except subprocess.TimeoutExpired:
        child.kill()
        child.communicate()
        pytest.fail(f"{signal.Signals(signum).name} did not stop spa within {STOP_S}s ({where})")
    assert time.monotonic() - start < STOP_S
    lines = err.strip().splitlines()
    assert child.returncode == 128 + signum, err
    assert len(lines) == 1 and lines[0].startswith("spa: ") and "Traceback" not in err, err
    assert listing(tmp_path) == before


# ---------------------------------------------------------------- inputs that are not files

def test_input_is_a_directory_or_fifo(tmp_path, capsys):
    (tmp_path / "d.onnx").mkdir()
    check(Case(["prune", tmp_path / "d.onnx", "-o", tmp_path / "o.onnx"], 2, ("is a directory",), tmp_path),
          capsys)
    os.mkfifo(tmp_path / "f.onnx")
    check(Case(["prune", tmp_path / "f.onnx", "-o", tmp_path / "o.onnx"], 2, ("not a regular file",),
               tmp_path), capsys)


# ---------------------------------------------------------------- option values

@pytest.mark.parametrize("argv,words", [
    (["--ratio", "-0.1"], ("--ratio",)),
    (["--ratio", "abc"], ("--ratio",)),
    (["--ratio", "nan"], ("--ratio",)),
    (["--round-to", "0"], ("--round-to",)),
    (["--runs", "0", "--latency"], ("--runs",)),
    (["--criterion", "nope"], ("--criterion",)),
    (["--input-shape", "x=1,-3,8,8"], ("at least 1",)),
    (["--input-shape", "x=0,3,8,8"], ("at least 1",)),
    (["--input-shape", "x=1,3"], ("dims",)),
])
def test_bad_option_values_get_one_line(tmp_path, capsys, argv, words):
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    check(Case(["prune", path, "-o", tmp_path / "o.onnx", *argv], 2, words, tmp_path), capsys)


def test_bench_on_models_with_different_inputs(tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(small_model(), a)
    g = Graph()
    g.output(g.op("Relu", [g.input([1, 4], name="other")]))
    onnx.save(g.model(), b)
    check(Case(["bench", a, b, "--runs", "2"], 2, ("different inputs",), tmp_path), capsys)
    check(Case(["bench", a, a, "--runs", "0"], 2, ("--runs",), tmp_path), capsys)


def test_unknown_criterion_from_python_lists_all():
    import spa
    from spa.score import CRITERIA
    with pytest.raises(spa.SpaError) as e:
        spa.prune(small_model(), criterion="nope")
    for c in CRITERIA:
        assert c in str(e.value)


# ---------------------------------------------------------------- models that must work, or say why

def test_names_like_spas_internal_ones(tmp_path, capsys):
    """A tensor already called W__use1 (spa's name for a shared weight's second use)."""
    g = Graph()
    x = g.input([1, 3, 8, 8])
    w = g.weight(16, 3, 3, 3)
    a = g.op("Conv", [x, w], pads=[1, 1, 1, 1])
    b = g.op("Conv", [x, w], pads=[1, 1, 1, 1])  # w shared: spa copies it as w__use1
    clash = g.const(np.ones((16, 1, 1), np.float32), f"{w}__use1")
    y = g.op("Relu", [g.op("Add", [g.op("Mul", [a, clash]), b])])
    g.output(g.conv(y, 16, 4))
    path = tmp_path / "m.onnx"
    onnx.save(g.model(), path)
    out = tmp_path / "o.onnx"
    stdout, _ = check(Case(["prune", path, "-o", out, "--round-to", "1"], 0, (), tmp_path, [], [out]), capsys)
    assert "verified" in stdout


def test_external_data_model_with_untouched_large_tensors_verifies(tmp_path, capsys):
    """The default verify on a model whose unsliced tensors (> 4 KB) stay in external data,
    as torch's dynamo exporter writes them."""
    g = Graph()
    x = g.input([1, 3, 8, 8])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 16)]), 16, 4))
    g.output(g.conv(x, 3, 64))  # 64x3x3x3 floats = 6.9 KB, neither axis prunable
    path = external(g.model(), tmp_path, name="m.onnx", location="m.onnx.data")
    out, rep = tmp_path / "o.onnx", tmp_path / "r.json"
    stdout, _ = check(Case(["prune", path, "-o", out, "--round-to", "1", "--report", rep], 0, (), tmp_path, [],
                           [out, tmp_path / "o.onnx.data", rep]), capsys)
    assert "verified" in stdout
    import json
    report = json.loads(rep.read_text())
    assert report["before"]["file_bytes"] == path.stat().st_size + (tmp_path / "m.onnx.data").stat().st_size
    assert report["after"]["file_bytes"] == out.stat().st_size + (tmp_path / "o.onnx.data").stat().st_size
    import onnxruntime as ort
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])


def test_non_finite_weights_are_named(tmp_path, capsys):
    m = small_model()
    w = numpy_helper.to_array(m.graph.initializer[0]).copy()
    w[0, 0, 0, 0] = np.nan
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, m.graph.initializer[0].name))
    path = tmp_path / "nan.onnx"
    onnx.save(m, path)
    check(Case(["prune", path, "-o", tmp_path / "o.onnx", "--verify"], 2,
               ("non-finite weights", m.graph.initializer[0].name), tmp_path), capsys)


def test_opset_onnxruntime_cannot_run_is_never_called_verified(tmp_path, capsys):
    m = small_model()
    m.opset_import[0].version = 99
    path = tmp_path / "future.onnx"
    onnx.save(m, path)
    out = tmp_path / "o.onnx"
    code = main(["prune", str(path), "-o", str(out), "--ratio", "0.5"])
    stdout, err = capsys.readouterr()
    assert "Traceback" not in err
    assert "verified:" not in stdout
    # written (it is no worse than its input), with one warning line that says why
    assert code == 0 and out.exists()
    lines = [line for line in err.strip().splitlines() if not line.startswith("spa: note: OBSPA could not run")]
    assert len(lines) == 1 and lines[0].startswith("spa: warning: not verified: onnxruntime cannot run"), err


def test_float64_model(tmp_path, capsys):
    g = Graph()
    x = g.input([1, 8], dtype=TensorProto.DOUBLE)
    w1 = g.const(np.random.default_rng(0).standard_normal((8, 16)))
    w2 = g.const(np.random.default_rng(1).standard_normal((16, 4)))
    g.output(g.op("MatMul", [g.op("Relu", [g.op("MatMul", [x, w1])]), w2]))
    graph = helper.make_graph(g.nodes, "f64", g.inputs, [helper.make_tensor_value_info(g.outputs[0],
                              TensorProto.DOUBLE, [1, 4])], g.inits)
    path = tmp_path / "f64.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out = tmp_path / "o.onnx"
    code = main(["prune", str(path), "-o", str(out), "--round-to", "1"])
    stdout, err = capsys.readouterr()
    assert code == 0 and "Traceback" not in err
    assert "verified:" in stdout  # onnxruntime runs float64 MatMul: the oracle checks it


def test_bfloat16_weights(tmp_path, capsys):
    g = Graph()
    g.input([1, 8], dtype=TensorProto.BFLOAT16)
    rng = np.random.default_rng(0)
    w1 = helper.make_tensor("w1", TensorProto.BFLOAT16, [8, 16], rng.standard_normal(128).astype(np.float32))
    w2 = helper.make_tensor("w2", TensorProto.BFLOAT16, [16, 4], rng.standard_normal(64).astype(np.float32))
    h = helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1")
    r = helper.make_node("Relu", ["h"], ["r"], name="relu")
    y = helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")
    graph = helper.make_graph([h, r, y], "bf16", g.inputs,
                              [helper.make_tensor_value_info("y", TensorProto.BFLOAT16, [1, 4])], [w1, w2])
    path = tmp_path / "bf16.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    out = tmp_path / "o.onnx"
    code = main(["prune", str(path), "-o", str(out), "--round-to", "1", "--no-verify"])
    _, err = capsys.readouterr()
    assert code == 0, err
    pruned = onnx.load(out)
    assert [list(t.dims) for t in pruned.graph.initializer] == [[8, 8], [8, 4]]
    assert all(t.data_type == TensorProto.BFLOAT16 for t in pruned.graph.initializer)


# ---------------------------------------------------------------- "verified" means it runs

def _fail_optimized(which):
    """A stand-in for onnxruntime whose default (optimized) session fails on some models."""
    from spa import runtime
    real = runtime._try_session

    def fake(model, optimize):
        if optimize and which(model):
            return None, "Attempt to replace the existing tensor (simulated)"
        return real(model, optimize)
    return fake


def _params(model):
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer)


def test_pruned_model_that_default_onnxruntime_cannot_load_is_never_written(tmp_path, capsys, monkeypatch):
    from spa import runtime
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    full = _params(small_model())
    monkeypatch.setattr(runtime, "_try_session", _fail_optimized(lambda m: _params(m) < full))
    check(Case(["prune", path, "-o", tmp_path / "o.onnx"], 2, ("default options", "please report"), tmp_path),
          capsys)


def test_original_that_loads_only_unoptimized_is_said_and_not_written(tmp_path, capsys, monkeypatch):
    from spa import runtime
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)
    monkeypatch.setattr(runtime, "_try_session", _fail_optimized(lambda m: True))
    check(Case(["prune", path, "-o", tmp_path / "o.onnx"], 2, ("only without graph optimizations",), tmp_path),
          capsys)
    out = tmp_path / "o.onnx"  # the user may still ask for it, unchecked
    check(Case(["prune", path, "-o", out, "--no-verify", "-q"], 0, (), tmp_path, [], [out]), capsys)


@pytest.mark.parametrize("criterion", ["l1", "obspa"])
def test_names_like_spas_new_tensors(tmp_path, capsys, criterion):
    """User tensors named like the constants and biases spa adds (a Reshape target it
    rewrites, a bias OBSPA adds to a bias-free conv) are never replaced."""
    g = Graph()
    x = g.input([1, 3, 6, 6])
    y = g.op("Conv", [x, g.weight(8, 3, 3, 3)], pads=[1, 1, 1, 1])
    g.nodes[-1].name = "c1"
    y = g.op("Conv", [g.op("Relu", [y]), g.weight(8, 8, 3, 3)], pads=[1, 1, 1, 1])
    g.nodes[-1].name = "c2"
    shape = g.const(np.array([1, 8, 36], np.int64))
    g.nodes.append(helper.make_node("Reshape", [y, shape], ["r"], name="rs"))
    decoy = [g.const(np.full((8,), 7.0, np.float32), n) for n in ("c2__spa_bias", "rs__spa_const", "c1__spa_bias")]
    z = g.op("Add", [g.op("Transpose", ["r"], perm=[0, 2, 1]), g.op("Add", [decoy[0], g.op("Add", decoy[1:])])])
    g.output(g.op("MatMul", [z, g.weight(8, 4)]))
    path = tmp_path / "m.onnx"
    onnx.save(g.model(), path)
    out = tmp_path / "o.onnx"
    stdout, _ = check(Case(["prune", path, "-o", out, "--round-to", "1", "--criterion", criterion], 0, (),
                           tmp_path, [], [out]), capsys)
    assert "verified" in stdout
    kept = {t.name: numpy_helper.to_array(t) for t in onnx.load(out).graph.initializer}
    for name in ("c2__spa_bias", "rs__spa_const", "c1__spa_bias"):
        assert np.all(kept[name] == 7.0), name


# ---------------------------------------------------------------- found by review

def _constant_from_file(folder: Path, location: str, nbytes: int = 16) -> Path:
    """A model whose Constant node (not an initializer) keeps its value in external data."""
    t = onnx.TensorProto(name="k", data_type=TensorProto.FLOAT, dims=[nbytes // 4])
    t.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", str(nbytes))):
        t.external_data.add(key=key, value=value)
    g = Graph()
    x = g.input([1, 4])
    g.nodes.append(helper.make_node("Constant", [], ["kc"], value=t, name="const"))
    h = g.op("Relu", [g.op("MatMul", [g.op("Add", [x, "kc"]), g.weight(4, 16)])])
    g.output(g.op("MatMul", [h, g.weight(16, 2)]))
    graph = helper.make_graph(g.nodes, "c", g.inputs, [helper.make_tensor_value_info(g.outputs[0], TensorProto.FLOAT,
                              [1, 2])], g.inits)
    path = folder / "model.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    return path


def test_constant_node_external_data_is_not_read_from_the_current_directory(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (tmp_path / "secret.txt").write_bytes(b"TOPSECRETPASSWD!")
    monkeypatch.chdir(tmp_path)
    path = _constant_from_file(folder, "secret.txt")
    check(Case(["prune", path, "-o", folder / "out.onnx"], 2, ("'secret.txt'", "missing"), tmp_path,
               [tmp_path / "secret.txt"]), capsys)
    path = _constant_from_file(folder, "../secret.txt")
    check(Case(["prune", path, "-o", folder / "out.onnx"], 2, ("outside",), tmp_path), capsys)


def test_constant_node_external_data_inside_the_folder_works(tmp_path, capsys, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "k.bin").write_bytes(np.arange(4, dtype=np.float32).tobytes())
    monkeypatch.chdir(tmp_path)  # not the model's folder
    path = _constant_from_file(folder, "k.bin")
    out = folder / "out.onnx"
    stdout, _ = check(Case(["prune", path, "-o", out, "--round-to", "1"], 0, (), tmp_path, [folder / "k.bin"],
                           [out]), capsys)
    assert "verified" in stdout


def test_two_data_files_with_the_same_name(tmp_path, capsys):
    """Weights split over w1/x.bin and w2/x.bin: neither may be an output."""
    folder = tmp_path / "m"
    folder.mkdir()
    path = external(small_model(), folder)
    m = onnx.load(path, load_external_data=False)
    (folder / "w1").mkdir()
    (folder / "w2").mkdir()
    data = (folder / "m.data").read_bytes()
    for i, t in enumerate(m.graph.initializer):
        sub = ("w1", "w2")[i % 2]
        info = {e.key: e.value for e in t.external_data}
        chunk = data[int(info.get("offset", 0)): int(info.get("offset", 0)) + int(info["length"])]
        target = folder / sub / "x.bin"
        offset = target.stat().st_size if target.exists() else 0
        with open(target, "ab") as f:
            f.write(chunk)
        del t.external_data[:]
        for key, value in (("location", f"{sub}/x.bin"), ("offset", str(offset)), ("length", str(len(chunk)))):
            t.external_data.add(key=key, value=value)
    onnx.save(m, path)
    (folder / "m.data").unlink()
    for victim in ("w1", "w2"):
        check(Case(["prune", path, "-o", folder / victim / "x.bin"], 2, ("external data",), tmp_path,
                   [folder / "w1" / "x.bin", folder / "w2" / "x.bin"]), capsys)


@pytest.mark.parametrize("location,words", [("a" * 300, ("name too long",)), ("w\x00.bin", ("relative path",))])
def test_odd_locations(tmp_path, capsys, location, words):
    folder = tmp_path / "m"
    folder.mkdir()
    path = external(small_model(), folder)
    point_at(path, location)
    code, _, err = (lambda c: (c, *capsys.readouterr()))(main(["prune", str(path), "-o", str(folder / "o.onnx")]))
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert any(w.lower() in err.lower() for w in words), err
    assert len(err) < 600


def test_unknown_data_type_of_external_tensor(tmp_path, capsys):
    folder = tmp_path / "m"
    folder.mkdir()
    path = external(small_model(), folder)
    m = onnx.load(path, load_external_data=False)
    m.graph.initializer[0].data_type = 999
    onnx.save(m, path)
    check(Case(["prune", path, "-o", folder / "o.onnx"], 2, ("data type",), tmp_path), capsys)


def test_report_is_the_inputs_data_file(tmp_path, capsys, ext_model):
    data = ext_model.parent / "b.onnx.data"
    check(Case(["prune", ext_model, "-o", tmp_path / "o.onnx", "--report", data], 2, ("external data",),
               tmp_path, [data]), capsys)


def test_report_write_failure_removes_the_model(tmp_path, capsys, monkeypatch):
    from spa.cli import commands as cli
    path = tmp_path / "m.onnx"
    onnx.save(small_model(), path)

    def full_disk(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(cli, "_dump_json", full_disk)
    check(Case(["prune", path, "-o", tmp_path / "o.onnx", "--report", tmp_path / "r.json"], 2, ("No space",),
               tmp_path), capsys)


def test_typed_values_fewer_than_declared(tmp_path, capsys):
    m = small_model()
    t = m.graph.initializer[0]
    values = numpy_helper.to_array(t).ravel()[:5].tolist()
    t.ClearField("raw_data")
    t.float_data.extend(values)
    path = tmp_path / "liar.onnx"
    onnx.save(m, path)
    check(Case(["prune", path, "-o", tmp_path / "o.onnx"], 2, ("declares dims",), tmp_path), capsys)


def test_huge_declared_input_dims(tmp_path, capsys):
    g = Graph()
    x = g.input([1 << 25, 4])
    g.output(g.op("MatMul", [g.op("Relu", [g.op("MatMul", [x, g.weight(4, 16)])]), g.weight(16, 2)]))
    path = tmp_path / "wide.onnx"
    onnx.save(g.model(), path)
    check(Case(["prune", path, "-o", tmp_path / "o.onnx"], 2, ("too large", "'x'"), tmp_path), capsys)
