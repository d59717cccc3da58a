"""Attack corpus for issue 20's promises (run: python benchmarks/attack.py [NAME-SUBSTRING ...]).

Each case builds its inputs in a fresh temporary folder (nothing binary is committed), runs
``python -m spa ...`` (or a small Python driver for ``spa.torch.apply_plan``) in a subprocess
with a timeout, and checks the promises of issue 20: exit 2 with ONE line ``spa: error: ...``
on bad input (never a traceback, never exit 3), exit 0 only with a valid output (checker +
onnxruntime), inputs and bystanders byte-identical (modes too), nothing written outside what
the user named, no leftovers, no hang, bounded memory.

Prints one line per case: ``OK`` or ``BROKEN`` with the reason.
"""

from __future__ import annotations

import io
import os
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
import zipfile
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

REPO = Path(__file__).resolve().parent.parent
HERE = Path(__file__).resolve().parent
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
CASES = []


def case(name, cls):
    def deco(fn):
        CASES.append((name, cls, fn))
        return fn
    return deco


class Broken(Exception):
    pass


# ------------------------------------------------------------------ building models

def conv_model(c_in=3, mid=16, c_out=4, hw=8, opset=17, ir=8, seed=0, group=1):
    """x -> Conv(mid) -> Relu -> Conv(c_out) -> y."""
    rng = np.random.default_rng(seed)
    w1 = numpy_helper.from_array(rng.standard_normal((mid, c_in // group, 3, 3)).astype(np.float32), "w1")
    b1 = numpy_helper.from_array(rng.standard_normal(mid).astype(np.float32), "b1")
    w2 = numpy_helper.from_array(rng.standard_normal((c_out, mid, 3, 3)).astype(np.float32), "w2")
    b2 = numpy_helper.from_array(rng.standard_normal(c_out).astype(np.float32), "b2")
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], name="conv1", pads=[1] * 4, group=group),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("Conv", ["r", "w2", "b2"], ["y"], name="conv2", pads=[1] * 4)]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c_in, hw, hw])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, c_out, hw, hw])],
                          [w1, b1, w2, b2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir)


def mlp_model(n_in=8, hidden=32, n_out=4):
    """x[N, n_in] -> MatMul -> Relu -> MatMul -> y[N, n_out] (classifier for --eval)."""
    rng = np.random.default_rng(0)
    w1 = numpy_helper.from_array(rng.standard_normal((n_in, hidden)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((hidden, n_out)).astype(np.float32), "w2")
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", n_in])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", n_out])], [w1, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def save(model, path, check=False):
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path


def save_external(model, folder: Path, name="m.onnx", location="m.data"):
    path = folder / name
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True, location=location,
              size_threshold=0)
    return path


# ------------------------------------------------------------------ running and checking

def snapshot(root: Path) -> dict:
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath) / n
            st = os.lstat(p)
            if stat.S_ISREG(st.st_mode):
                out[p] = ("file", p.read_bytes(), stat.S_IMODE(st.st_mode))
            elif stat.S_ISLNK(st.st_mode):
                out[p] = ("link", os.readlink(p), None)
            else:
                out[p] = (stat.S_IFMT(st.st_mode), None, stat.S_IMODE(st.st_mode))
    return out


def run(argv, cwd, timeout=120, python=None, stdin=None):
    """(rc, stdout, stderr, peak RSS MiB, timed_out) of ``python -m spa argv`` (or ``python -c``)."""
    cmd = [sys.executable, "-c", python] if python is not None else [sys.executable, "-m", "spa", *map(str, argv)]
    p = subprocess.Popen(cmd, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, start_new_session=True)
    box = {}

    def reap():
        box["out"], box["err"] = p.stdout.read(), p.stderr.read()
    t = threading.Thread(target=reap)
    t.start()
    deadline, timed_out, rusage, status = time.time() + timeout, False, None, None
    while True:
        pid, status, rusage = os.wait4(p.pid, os.WNOHANG)
        if pid:
            break
        if time.time() > deadline:
            timed_out = True
            os.killpg(p.pid, signal.SIGKILL)
            pid, status, rusage = os.wait4(p.pid, 0)
            break
        time.sleep(0.05)
    p.returncode = os.waitstatus_to_exitcode(status)
    t.join()
    return p.returncode, box["out"].decode(errors="replace"), box["err"].decode(errors="replace"), \
        rusage.ru_maxrss / 1024, timed_out


def valid_output(path: Path):
    m = onnx.load(str(path))
    onnx.checker.check_model(m, full_check=True)
    import onnxruntime as ort
    ort.set_default_logger_severity(4)
    so = ort.SessionOptions()
    so.log_severity_level = 4
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def expect(root: Path, argv, code=2, cwd=None, words=(), may_create=(), outputs=(), timeout=120,
           max_rss_mib=None, watch=None, python=None):
    """Run and check the promises; raise Broken with the reason. ``may_create``: paths the run may
    add or change (on exit 0); ``outputs``: .onnx files that must be valid on exit 0; ``watch``: other
    roots whose content must not change (the parent of the case folder, a folder outside it)."""
    watch = [root] + list(watch or [])
    before = {w: snapshot(w) for w in watch}
    rc, out, err, rss, timed_out = run(argv, cwd or root, timeout, python)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    head = (lines[0] if lines else out.strip().splitlines()[-1] if out.strip() else "")[:300]
    if timed_out:
        raise Broken(f"hang: killed after {timeout}s")
    if "Traceback" in err + out:
        tb = [ln for ln in (err + out).splitlines() if ln.strip()][-1]
        raise Broken(f"exit {rc}, traceback: {tb[:300]}")
    if rc == 3 or "internal error" in err:
        raise Broken(f"exit {rc}: {head}")
    if max_rss_mib is not None and rss > max_rss_mib:
        raise Broken(f"peak memory {rss:.0f} MiB > {max_rss_mib} MiB (exit {rc}: {head})")
    after = {w: snapshot(w) for w in watch}
    allowed = {Path(p) for p in may_create} if rc == 0 else set()
    for w in watch:
        changed = [p for p in set(before[w]) | set(after[w]) if before[w].get(p) != after[w].get(p)
                   and p not in allowed]
        if changed:
            what = ", ".join(f"{'new' if p not in before[w] else 'gone' if p not in after[w] else 'changed'} "
                             f"{p.relative_to(w.parent) if w.parent in p.parents else p}" for p in sorted(changed)[:4])
            raise Broken(f"exit {rc}: files touched: {what} ({head})")
    if code is not None and rc != code:
        raise Broken(f"exit {rc} (expected {code}): {head}")
    if rc != 0:
        if len(lines) != 1 or not lines[0].startswith("spa: error:"):
            raise Broken(f"exit {rc}: stderr is not one 'spa: error:' line: {err.strip()[:300]!r}")
        for w in words:
            if w.lower() not in lines[0].lower():
                raise Broken(f"message lacks {w!r}: {lines[0][:300]}")
    else:
        for o in outputs:
            try:
                valid_output(Path(o))
            except Exception as e:
                raise Broken(f"exit 0 but output invalid: {type(e).__name__}: {str(e).splitlines()[0][:200]}")
    return rc, out, err, rss


PRUNE = ["prune"]
FAST = ["--criterion", "l1", "--ratio", "0.5", "--round-to", "1", "-q"]


_FOLDERS: list[Path] = []


def fresh() -> Path:
    """A new scratch folder (removed after its case)."""
    d = Path(tempfile.mkdtemp(prefix="spa-attack-"))
    _FOLDERS.append(d)
    return d


def _clean():
    import shutil
    while _FOLDERS:
        shutil.rmtree(_FOLDERS.pop(), ignore_errors=True)


def set_attr(m, node, **kw):
    n = next(x for x in m.graph.node if x.name == node)
    for k, v in kw.items():
        for a in list(n.attribute):
            if a.name == k:
                n.attribute.remove(a)
        n.attribute.append(helper.make_attribute(k, v))
    return m


def prune_model(m, code=None, extra=FAST, **kw):
    """Prune ``m`` (saved as m.onnx in a fresh folder) to o.onnx."""
    d = fresh()
    p = save(m, d / "m.onnx")
    return expect(d, PRUNE + [p, "-o", d / "o.onnx", *extra], code=code, may_create=[d / "o.onnx"],
                  outputs=[d / "o.onnx"], **kw)


def ext_model():
    """A model saved with external data whose large constant is never pruned, so the pruned
    model is still written with a .data file beside it."""
    m = conv_model(mid=16, hw=32)
    m.graph.node[-1].output[0] = "c2"
    m.graph.initializer.append(numpy_helper.from_array(np.ones((1, 4, 32, 32), np.float32), "bigc"))
    m.graph.node.append(helper.make_node("Add", ["c2", "bigc"], ["y"], name="add"))
    for k in (2, 3):
        m.graph.output[0].type.tensor_type.shape.dim[k].dim_value = 32
    return m


def header_bomb(path, size=300 << 20, name="x"):
    """An .npz whose member declares a 300 MB .npy header (v2.0: 4-byte length), deflated to ~300 KB."""
    import struct
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        with z.open(name + ".npy", "w", force_zip64=True) as f:
            f.write(b"\x93NUMPY\x02\x00" + struct.pack("<I", size))
            chunk = b" " * (1 << 20)
            for _ in range(size >> 20):
                f.write(chunk)


def with_data(model, flag, writer, code=2, criterion="obspa", **kw):
    d = fresh()
    p = save(model, d / "m.onnx")
    data = d / "d.npz"
    writer(data)
    return expect(d, PRUNE + [p, "-o", d / "o.onnx", flag, data, "--criterion", criterion, "--ratio", "0.5",
                              "--round-to", "1", "-q"], code=code, may_create=[d / "o.onnx"], outputs=[d / "o.onnx"],
                  **kw)


def two_input_model(second="b"):
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "w")
    w2 = numpy_helper.from_array(rng.standard_normal((16, 4)).astype(np.float32), "w2")
    nodes = [helper.make_node("Add", ["a", second], ["s"], name="add"),
             helper.make_node("MatMul", ["s", "w"], ["h"], name="mm"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 8]) for n in ("a", second)],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w, w2])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


RNG = np.random.default_rng(0)
X = RNG.standard_normal((16, 3, 8, 8)).astype(np.float32)
XM = RNG.standard_normal((16, 8)).astype(np.float32)
SW = ["--ratios", "0.5", "--criteria", "l1", "--runs", "1", "--samples", "4", "--backend", "serial", "-q"]
SWEEP_FILES = ("sweep.json", "sweep.csv", "sweep.png")


# ================================================================== paths and names

@case("o-inside-a-symlinked-dir-pointing-elsewhere", "paths")
def _():
    d, outside = fresh(), fresh()
    (d / "link").symlink_to(outside)
    p = save(conv_model(), d / "m.onnx")
    expect(d, PRUNE + [p, "-o", d / "link" / "o.onnx", *FAST], 0, may_create=[outside / "o.onnx"],
           outputs=[outside / "o.onnx"], watch=[outside])


@case("o-is-a-symlink-to-a-bystander (link replaced, target intact)", "paths")
def _():
    d, outside = fresh(), fresh()
    (outside / "victim.onnx").write_bytes(b"victim")
    (d / "o.onnx").symlink_to(outside / "victim.onnx")
    expect(d, PRUNE + [save(conv_model(), d / "m.onnx"), "-o", d / "o.onnx", *FAST], 0, may_create=[d / "o.onnx"],
           watch=[outside])


@case("report-is-a-symlink-to-a-bystander", "paths")
def _():
    d, outside = fresh(), fresh()
    (outside / "victim.json").write_bytes(b"victim")
    (d / "r.json").symlink_to(outside / "victim.json")
    expect(d, PRUNE + [save(conv_model(), d / "m.onnx"), "-o", d / "o.onnx", "--report", d / "r.json", *FAST], 0,
           may_create=[d / "o.onnx", d / "r.json"], watch=[outside])


@case("o-is-a-dangling-symlink", "paths")
def _():
    d = fresh()
    (d / "o.onnx").symlink_to(d / "nowhere" / "x.onnx")
    expect(d, PRUNE + [save(conv_model(), d / "m.onnx"), "-o", d / "o.onnx", *FAST], 2, words=("does not exist",))


@case("names-with-newline-and-ansi-escape", "paths")
def _():
    d = fresh()
    p = save(conv_model(), d / "m\nodel\x1b[31m.onnx")
    expect(d, PRUNE + [p, "-o", d / "o\n.onnx", *FAST], 0, may_create=[d / "o\n.onnx"], outputs=[d / "o\n.onnx"])


@case("o-name-of-255-bytes (refused after the work: temp name too long)", "paths")
def _():
    d = fresh()
    name = "o" * 250 + ".onnx"
    expect(d, PRUNE + [save(conv_model(), d / "m.onnx"), "-o", d / name, *FAST], None, may_create=[d / name],
           outputs=[d / name])


@case("foreign-o.onnx.data-left-alone-when-output-is-small", "paths")
def _():
    d = fresh()
    (d / "o.onnx.data").write_bytes(b"foreign")
    expect(d, PRUNE + [save(conv_model(), d / "m.onnx"), "-o", d / "o.onnx", *FAST], 0, may_create=[d / "o.onnx"],
           outputs=[d / "o.onnx"])


@case("foreign-o.onnx.data-replaced-when-old-o-merely-mentions-its-name", "paths")
def _():
    d = fresh()
    p = save_external(ext_model(), d)
    (d / "o.onnx.data").write_bytes(b"foreign weights")
    (d / "o.onnx").write_text("notes: remember to back up o.onnx.data\n")
    expect(d, PRUNE + [p, "-o", d / "o.onnx", *FAST], 2, words=("spa did not write",), may_create=[d / "o.onnx"])


@case("foreign-plan.json.npz-replaced-when-old-plan.json-mentions-its-name", "paths")
def _():
    d = fresh()
    (d / "plan.json").write_text('{"mine": "see plan.json.npz"}')
    (d / "plan.json.npz").write_bytes(b"foreign archive")
    expect(d, PRUNE + [save(conv_model(), d / "m.onnx"), "-o", d / "o.onnx", "--plan", d / "plan.json",
                       "--criterion", "obspa", "--ratio", "0.5", "--round-to", "1", "-q"], 2,
           words=("spa did not write",), may_create=[d / "o.onnx", d / "plan.json"])


@case("refused-plan-side-file-deletes-the-users-previous-o", "paths")
def _():
    d = fresh()
    (d / "o.onnx").write_bytes(b"the user's previous model")
    (d / "plan.json.npz").write_bytes(b"foreign archive")
    expect(d, PRUNE + [save(conv_model(), d / "m.onnx"), "-o", d / "o.onnx", "--plan", d / "plan.json",
                       "--criterion", "obspa", "--ratio", "0.5", "--round-to", "1", "-q"], 2)


@case("report-name-too-long-deletes-the-users-previous-o", "paths")
def _():
    d = fresh()
    (d / "o.onnx").write_bytes(b"the user's previous model")
    expect(d, PRUNE + [save(conv_model(), d / "m.onnx"), "-o", d / "o.onnx", "--report", d / ("r" * 251 + ".json"),
                       *FAST], 2)


@case("plan-side-file-is-the-inputs-external-data", "paths")
def _():
    d = fresh()
    p = save_external(conv_model(mid=64), d)
    m = onnx.load(str(p), load_external_data=False)
    (d / "plan.json.npz").write_bytes((d / "m.data").read_bytes())
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "plan.json.npz"
    save(m, p)
    expect(d, PRUNE + [p, "-o", d / "o.onnx", "--plan", d / "plan.json", *FAST], 2, words=("external data",))


@case("o.onnx.data-is-a-symlink-to-a-bystander", "paths")
def _():
    d, outside = fresh(), fresh()
    (outside / "victim").write_bytes(b"victim")
    p = save_external(ext_model(), d)
    (d / "o.onnx.data").symlink_to(outside / "victim")
    expect(d, PRUNE + [p, "-o", d / "o.onnx", *FAST], 2, watch=[outside])


@case("o.onnx.data-is-a-fifo", "paths")
def _():
    d = fresh()
    p = save_external(ext_model(), d)
    os.mkfifo(d / "o.onnx.data")
    expect(d, PRUNE + [p, "-o", d / "o.onnx", *FAST], 2, words=("FIFO",), timeout=60)


@case("sweep-stems-'.'-and-'sweep.csv'-collide-inside-o", "paths")
def _():
    d = fresh()
    a, b = save(mlp_model(), d / "..onnx"), save(mlp_model(), d / "sweep.csv.onnx")
    expect(d, ["sweep", a, b, "-o", d / "out", *SW], 2)


@case("sweep-stem-'.'-beside-another-model-is-refused", "paths")
def _():
    d = fresh()
    a, b = save(mlp_model(), d / "..onnx"), save(mlp_model(), d / "b.onnx")
    expect(d, ["sweep", a, b, "-o", d / "out", *SW], 2)   # its folder would be -o itself


@case("sweep-odd-stems-(unicode-slash, newline)", "paths")
def _():
    d = fresh()
    a, b = save(mlp_model(), d / "a\u2215b.onnx"), save(mlp_model(), d / "c\nd.onnx")
    out = d / "out"
    expect(d, ["sweep", a, b, "-o", out, *SW], 0,
           may_create=[out] + [out / s / n for s in ("a\u2215b", "c\nd") for n in ("",) + SWEEP_FILES])


@case("sweep-o-is-a-dangling-symlink", "paths")
def _():
    d = fresh()
    p = save(mlp_model(), d / "a.onnx")
    (d / "out").symlink_to(d / "gone")
    expect(d, ["sweep", p, "-o", d / "out", *SW], None, may_create=[d / "gone"] + [d / "gone" / n for n in SWEEP_FILES])


@case("sweep-keep-name-is-the-input-model", "paths")
def _():
    d = fresh()
    p = save(mlp_model(), d / "best-macs-0.9.onnx")
    expect(d, ["sweep", p, "-o", d, "--keep", "best:macs<=0.9", *SW], 2, words=("input model",))


@case("inspect---graph-is-a-fifo", "paths")
def _():
    d = fresh()
    os.mkfifo(d / "g.graphml")
    expect(d, ["inspect", save(conv_model(), d / "m.onnx"), "--graph", d / "g.graphml"], 2, words=("FIFO",),
           timeout=60)


# ================================================================== hostile external data

@case("string-tensor-with-external-data", "external data")
def _():
    d = fresh()
    m = conv_model()
    t = TensorProto(name="s", data_type=TensorProto.STRING, dims=[2])
    t.data_location = TensorProto.EXTERNAL
    t.external_data.add(key="location", value="s.bin")
    m.graph.initializer.append(t)
    m.graph.node.append(helper.make_node("Identity", ["s"], ["s_out"], name="id"))
    m.graph.output.append(helper.make_tensor_value_info("s_out", TensorProto.STRING, [2]))
    (d / "s.bin").write_bytes(bytes(64))
    expect(d, PRUNE + [save(m, d / "m.onnx"), "-o", d / "o.onnx", *FAST], 2)


def _point_all(p, location):
    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    save(m, p)


@case("location-'.'-(the-folder-itself)", "external data")
def _():
    d = fresh()
    p = save_external(ext_model(), d)
    _point_all(p, ".")
    expect(d, PRUNE + [p, "-o", d / "o.onnx", *FAST], 2, words=("directory",))


@case("data-file-is-a-unix-socket", "external data")
def _():
    import socket
    d = fresh()
    p = save_external(ext_model(), d)
    (d / "m.data").unlink()
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(d / "m.data"))
    try:
        expect(d, PRUNE + [p, "-o", d / "o.onnx", *FAST], 2, timeout=60)
    finally:
        s.close()


@case("data-file-is-a-symlink-chain-to-/proc", "external data")
def _():
    d = fresh()
    p = save_external(ext_model(), d)
    (d / "m.data").unlink()
    (d / "sub").mkdir()
    (d / "sub" / "x").symlink_to("/proc/self/environ")
    (d / "m.data").symlink_to("sub/x")
    expect(d, PRUNE + [p, "-o", d / "o.onnx", *FAST], 2, words=("outside",))


@case("offset-'_0_0_'-with-spaces (python int() syntax)", "external data")
def _():
    d = fresh()
    p = save_external(ext_model(), d)
    m = onnx.load(str(p), load_external_data=False)
    for t in m.graph.initializer:
        for e in t.external_data:
            if e.key == "offset":
                e.value = " 0_0 "
    save(m, p)
    expect(d, PRUNE + [p, "-o", d / "o.onnx", *FAST], None, may_create=[d / "o.onnx", d / "o.onnx.data"],
           outputs=[d / "o.onnx"])


FD_LEAK = r"""
import os, sys, tempfile, shutil
sys.path.insert(0, {repo!r})
sys.path.insert(0, {here!r})
from pathlib import Path
from attack import conv_model, save_external
import spa
start = len(os.listdir("/proc/self/fd"))
for i in range(10):
    d = Path(tempfile.mkdtemp(prefix="spa-attack-"))
    spa.prune(str(save_external(conv_model(mid=64), d)), ratio=0.5, criterion="l1", round_to=1, verify=False)
    shutil.rmtree(d)
print("LEAKED", len(os.listdir("/proc/self/fd")) - start)
"""


@case("library: descriptors of external data files are never closed", "external data")
def _():
    d = fresh()
    rc, out, err, _, _ = run(None, d, 120, python=FD_LEAK.format(repo=str(REPO), here=str(HERE)))
    leaked = [int(line.split()[1]) for line in out.splitlines() if line.startswith("LEAKED")]
    if not leaked:
        raise Broken(f"driver failed: {err.strip()[-200:]}")
    if leaked[0] > 0:
        raise Broken(f"{leaked[0]} descriptors stay open after 10 spa.prune() calls on external-data models "
                     "(their folders deleted: the space is held too)")


# ================================================================== hostile .npz

@case("calib-npy-header-of-300MB-(deflated-to-300KB)", "npz")
def _():
    with_data(conv_model(), "--calib", header_bomb, 2, max_rss_mib=250)


@case("eval-npy-header-of-300MB-(deflated-to-300KB)", "npz")
def _():
    with_data(mlp_model(), "--eval", lambda p: header_bomb(p, name="label"), 2, criterion="l1", max_rss_mib=250)


for _name, _arr, _code in [("big-endian", X.astype(">f4"), 0), ("fortran-order", np.asfortranarray(X), 0),
                           ("float64", X.astype(np.float64), 0), ("int64", X.astype(np.int64), 0),
                           ("bool", X > 0, 0), ("float16", X.astype(np.float16), 0),
                           ("zero-samples", X[:0], 2), ("0-d", np.float32(1), 2), ("1-d", X.reshape(-1), 2)]:
    case(f"calib-{_name}", "npz")(lambda a=_arr, c=_code: with_data(conv_model(), "--calib",
                                                                     lambda p: np.savez(p, x=a), c))

for _name, _arrs, _code in [("label-2d", {"x": XM, "label": np.zeros((16, 2), np.int64)}, 2),
                            # integers for a float input are cast, as onnxruntime users expect
                            ("input-int32-for-float", {"x": XM.astype(np.int32), "label": np.zeros(16, np.int64)}, 0),
                            ("input-wrong-width", {"x": XM[:, :5], "label": np.zeros(16, np.int64)}, 2),
                            ("input-wrong-rank", {"x": XM[:, None, :], "label": np.zeros(16, np.int64)}, 2)]:
    case(f"eval-{_name}", "npz")(lambda a=_arrs, c=_code: with_data(mlp_model(), "--eval",
                                                                    lambda p: np.savez(p, **a), c, criterion="l1"))


@case("calib-uint64-max-values (numpy warnings on stderr)", "npz")
def _():
    with_data(mlp_model(), "--calib", lambda p: np.savez(p, x=np.full((16, 8), 2**64 - 1, np.uint64)), None)


@case("calib-two-inputs-different-sample-counts", "npz")
def _():
    with_data(two_input_model(), "--calib", lambda p: np.savez(p, a=XM, b=XM[:5]), 2)


@case("eval-model-whose-input-is-named-label", "npz")
def _():
    with_data(two_input_model("label"), "--eval", lambda p: np.savez(p, a=XM, label=XM), None, criterion="l1")


def _npz_header(shape, descr="<f4", payload=b""):
    def write(p):
        with zipfile.ZipFile(p, "w") as z:
            b = io.BytesIO()
            np.lib.format.write_array_header_1_0(b, {"descr": descr, "fortran_order": False, "shape": shape})
            z.writestr("x.npy", b.getvalue() + payload)
    return write


for _name, _writer in [
        ("negative-declared-shape", _npz_header((-16, -8), payload=bytes(512))),
        ("zero-times-2^62-shape", _npz_header((0, 2**62))),
        ("pickle-member", lambda p: zipfile.ZipFile(p, "w").writestr("x.npy", __import__("pickle").dumps(XM))),
        ("gzip-of-an-npy", lambda p: p.write_bytes(__import__("gzip").compress(b"\x93NUMPY" + bytes(100)))),
        ("structured-dtype", lambda p: np.savez(p, x=np.zeros(16, dtype=[("a", "<f4", (8,))]))),
        ("datetime", lambda p: np.savez(p, x=np.zeros((16, 8), "datetime64[s]"))),
        ("fifo", lambda p: os.mkfifo(p)),
        ("the-model-file", lambda p: p.write_bytes(mlp_model().SerializeToString()))]:
    case(f"calib-{_name}", "npz")(lambda w=_writer: with_data(mlp_model(), "--calib", w, 2, timeout=60))


# ================================================================== hostile plans for spa.torch.apply_plan

PLAN_DRIVER = r"""
import sys, json, os
sys.path.insert(0, {repo!r})
import numpy as np, onnx, torch
from onnx import helper, numpy_helper, TensorProto
import spa, spa.torch
from spa.errors import SpaError
torch.manual_seed(0)
class Net(torch.nn.Module):
    def __init__(s):
        super().__init__()
        s.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        s.conv2 = torch.nn.Conv2d(16, 4, 3, padding=1)
    def forward(s, x):
        return s.conv2(torch.relu(s.conv1(x)))
net = Net().eval()
sd = {{k: v.detach().numpy() for k, v in net.state_dict().items()}}
nodes = [helper.make_node("Conv", ["x", "conv1.weight", "conv1.bias"], ["h"], name="conv1", pads=[1] * 4),
         helper.make_node("Relu", ["h"], ["r"], name="relu"),
         helper.make_node("Conv", ["r", "conv2.weight", "conv2.bias"], ["y"], name="conv2", pads=[1] * 4)]
g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 8, 8])],
                      [numpy_helper.from_array(v, k) for k, v in sd.items()])
model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
r = spa.prune(model, ratio=0.5, criterion="obspa", calib_samples=8, round_to=1)
plan_path = "plan.json"
npz = plan_path + ".npz"
r.save_plan(plan_path)
doc = json.load(open(plan_path))
arrays = dict(np.load(npz))
write_doc = True
{mutation}
if write_doc:
    json.dump(doc, open(plan_path, "w"))
before = {{k: v.clone() for k, v in net.state_dict().items()}}
rep = repr(net)
x = torch.randn(1, 3, 8, 8)
try:
    spa.torch.apply_plan(net, plan_path)
except SpaError as e:
    same = rep == repr(net) and all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    print("RESULT", "refused" if same and "\n" not in str(e) else "refused-module-changed", str(e)[:200])
    sys.exit(0)
except Exception as e:
    print("RESULT", "bare-exception", type(e).__name__, str(e)[:200])
    sys.exit(0)
import onnxruntime as ort
want = ort.InferenceSession(r.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {{"x": x.numpy()}})[0]
try:
    with torch.no_grad():
        got = net(x).numpy()
except Exception as e:
    print("RESULT", "applied-module-broken", type(e).__name__, str(e)[:160])
    sys.exit(0)
finite = bool(np.isfinite(np.concatenate([p.detach().numpy().ravel() for p in net.parameters()])).all())
err = float(np.abs(got - want).max())
print("RESULT", "applied-matches" if err < 1e-3 and finite else "applied-silently-wrong",
      f"max error vs spa's pruned ONNX {{err:.3g}}, parameters finite: {{finite}}")
"""

_FLIP = """
kept = doc["tensors"]["conv2.weight"]["kept"]["1"]
doc["tensors"]["conv2.weight"]["kept"]["1"] = sorted(set(range(16)) - set(kept))[:len(kept)]
doc["tensors"]["conv2.weight"].pop("delta", None)
"""

PLAN_CASES = {
    # name: (mutation, what is acceptable)
    "unchanged-plan-applies": ("pass", "applied-matches"),
    "delta-float64-1e300-overflows-float32": (
        'k = doc["tensors"]["conv2.weight"]["delta"]; arrays[k] = np.full(arrays[k].shape, 1e300); np.savez(npz, **arrays)',
        "refused"),
    "ties-key-removed-then-next-layer-keeps-other-inputs": ('doc.pop("ties")' + _FLIP, "refused"),
    "ties-emptied-then-next-layer-keeps-other-inputs": ('doc["ties"] = []' + _FLIP, "refused"),
    "next-layer-entry-dropped": (
        'del doc["tensors"]["conv2.weight"]; doc["ties"] = [t for t in doc["ties"] if all(m[0] != "conv2.weight" for m in t)]',
        "refused"),
    "group-2-divides-out-channels-not-input-channels": (
        'doc["nodes"]["conv2"] = {"op": "Conv", "attributes": {"group": 2}, "weights": ["conv2.weight", "conv2.bias"]}',
        "refused"),
    "plan-json-is-a-fifo": ('os.unlink(plan_path); os.mkfifo(plan_path); write_doc = False', "refused"),
    "plan-npz-is-a-fifo": ('os.unlink(npz); os.mkfifo(npz)', "refused"),
    "npz-member-with-300MB-header": ("""
import zipfile, struct
with zipfile.ZipFile(npz, "a", zipfile.ZIP_DEFLATED) as z:
    with z.open("bomb.npy", "w", force_zip64=True) as f:
        f.write(b"\\x93NUMPY\\x02\\x00" + struct.pack("<I", 300 << 20))
        for _ in range(300): f.write(b" " * (1 << 20))
""", "refused"),
    "arrays-named-'..'": ('doc["arrays"] = ".."', "refused"),
    "kept-indices-as-strings": (
        'doc["tensors"]["conv1.weight"]["kept"]["0"] = [str(i) for i in doc["tensors"]["conv1.weight"]["kept"]["0"]]',
        "refused"),
    "bias-keeps-other-channels-than-weight-no-ties": (
        'doc["ties"] = []; k = doc["tensors"]["conv1.bias"]["kept"]["0"]; '
        'doc["tensors"]["conv1.bias"]["kept"]["0"] = sorted(set(range(16)) - set(k))[:len(k)]; '
        'doc["tensors"]["conv1.bias"].pop("delta", None)', "refused"),
    "fingerprint-overflowing-to-inf": ('doc["tensors"]["conv1.weight"]["fingerprint"] = [1, 2, 1e308 * 10]', "refused"),
    "delta-float16-and-fortran-order": (
        'k = doc["tensors"]["conv2.weight"]["delta"]; arrays[k] = np.asfortranarray(arrays[k].astype(np.float16)); '
        'np.savez(npz, **arrays)', "applied-matches"),
}


def _plan_case(mutation, want, bomb):
    def fn():
        d = fresh()
        rc, out, err, rss, timed_out = run(None, d, 40, python=PLAN_DRIVER.format(repo=str(REPO), mutation=mutation))
        if timed_out:
            raise Broken("hang: apply_plan still blocked after 40 s")
        res = [line for line in out.splitlines() if line.startswith("RESULT")]
        if not res:
            raise Broken(f"driver failed (rc {rc}): {err.strip().splitlines()[-1][:200] if err.strip() else ''}")
        kind = res[0].split()[1]
        if kind != want:
            raise Broken(res[0][7:])
        # torch + onnxruntime + spa: ~300 MiB; the bomb adds its header (300 MB) and its decoded copy
        if bomb and rss > 450:
            raise Broken(f"refused, but peak memory {rss:.0f} MiB (~300 MiB without the bomb)")
    return fn


for _name, (_mutation, _want) in PLAN_CASES.items():
    case(f"apply_plan: {_name}", "plan")(_plan_case(_mutation, _want, "300MB" in _name))


# ================================================================== old and odd ONNX files

@case("ir3-initializers-listed-with-a-wrong-declared-shape", "odd onnx")
def _():
    m = conv_model(opset=7, ir=3)
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type,
                                                           list(t.dims) if t.name != "w2" else [4, 99, 3, 3]))
    prune_model(m)


@case("ir3-initializer-inputs-listed-before-x", "odd onnx")
def _():
    m = conv_model(opset=7, ir=3)
    x = m.graph.input[0]
    ins = [helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in m.graph.initializer]
    del m.graph.input[:]
    m.graph.input.extend(ins + [x])
    prune_model(m, 0)


@case("opset7-batchnorm-with-spatial", "odd onnx")
def _():
    m = conv_model(opset=7, ir=3)
    bn = [numpy_helper.from_array(np.linspace(0.1, 2, 16).astype(np.float32), n) for n in ("s", "bb", "mu", "var")]
    m.graph.initializer.extend(bn)
    for t in m.graph.initializer:
        m.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    m.graph.node.insert(1, helper.make_node("BatchNormalization", ["h", "s", "bb", "mu", "var"], ["hb"], name="bn",
                                            spatial=1))
    m.graph.node[2].input[0] = "hb"
    prune_model(m, 0)


@case("only-a-custom-domain-opset", "odd onnx")
def _():
    m = conv_model()
    del m.opset_import[:]
    m.opset_import.append(helper.make_opsetid("com.example", 1))
    prune_model(m, 2)


@case("model-local-function-holding-the-next-conv", "odd onnx")
def _():
    m = conv_model()
    f = helper.make_function("local", "MyConv", ["a", "w", "b"], ["c"],
                             [helper.make_node("Conv", ["a", "w", "b"], ["c"], pads=[1, 1, 1, 1])],
                             [helper.make_opsetid("", 17)])
    m.functions.append(f)
    m.opset_import.append(helper.make_opsetid("local", 1))
    m.graph.node[2].CopyFrom(helper.make_node("MyConv", ["r", "w2", "b2"], ["y"], name="conv2", domain="local"))
    prune_model(m, 0)


@case("if-branches-read-outer-weights-and-activation", "odd onnx")
def _():
    m = conv_model()
    t = helper.make_graph([helper.make_node("Conv", ["r", "w2", "b2"], ["ty"], pads=[1] * 4)], "then", [],
                          [helper.make_tensor_value_info("ty", TensorProto.FLOAT, [1, 4, 8, 8])])
    e = helper.make_graph([helper.make_node("Conv", ["r", "w2", "b2"], ["ey"], pads=[1] * 4),
                           helper.make_node("Neg", ["ey"], ["ey2"])], "else", [],
                          [helper.make_tensor_value_info("ey2", TensorProto.FLOAT, [1, 4, 8, 8])])
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "cond"))
    m.graph.node[2].CopyFrom(helper.make_node("If", ["cond"], ["y"], name="if", then_branch=t, else_branch=e))
    prune_model(m, 0)


@case("loop-body-initializer-shadows-an-outer-weight-name", "odd onnx")
def _():
    m = conv_model()
    body = helper.make_graph(
        [helper.make_node("Identity", ["w2"], ["wo"]), helper.make_node("Identity", ["cin"], ["cout"])], "body",
        [helper.make_tensor_value_info("i", TensorProto.INT64, []), helper.make_tensor_value_info("cin", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("cout", TensorProto.BOOL, []),
         helper.make_tensor_value_info("wo", TensorProto.FLOAT, [4, 16, 3, 3])],
        [numpy_helper.from_array(np.full((4, 16, 3, 3), 7, np.float32), "w2")])
    m.graph.initializer.append(numpy_helper.from_array(np.array(1, np.int64), "trip"))
    m.graph.initializer.append(numpy_helper.from_array(np.array(True), "c0"))
    m.graph.node.append(helper.make_node("Loop", ["trip", "c0"], ["wseq"], name="loop", body=body))
    m.graph.output.append(helper.make_tensor_value_info("wseq", TensorProto.FLOAT, [1, 4, 16, 3, 3]))
    onnx.checker.check_model(m)
    prune_model(m, 0)


@case("sparse-initializer-as-conv-weight (checker and onnxruntime accept it)", "odd onnx")
def _():
    m = conv_model()
    w2 = next(t for t in m.graph.initializer if t.name == "w2")
    arr = numpy_helper.to_array(w2).reshape(-1)
    m.graph.initializer.remove(w2)
    idx = np.nonzero(arr)[0]
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(
        numpy_helper.from_array(arr[idx], "w2"), numpy_helper.from_array(idx.astype(np.int64), "w2_i"), [4, 16, 3, 3]))
    onnx.checker.check_model(m)
    prune_model(m, 0)


@case("zero-size-input-dim", "odd onnx")
def _():
    m = conv_model()
    m.graph.input[0].type.tensor_type.shape.dim[2].dim_value = 0
    m.graph.output[0].type.tensor_type.shape.dim[2].dim_value = 0
    prune_model(m, 2)


@case("negative-dim-in-value_info", "odd onnx")
def _():
    m = conv_model()
    m.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, -16, 8, 8]))
    prune_model(m)


@case("2^62-dim-in-value_info", "odd onnx")
def _():
    m = conv_model()
    m.graph.value_info.append(helper.make_tensor_value_info("h", TensorProto.FLOAT, [1, 2**62, 8, 8]))
    prune_model(m, None, max_rss_mib=400)


@case("string-initializer-declaring-1e8-elements-with-no-data", "odd onnx")
def _():
    m = conv_model()
    m.graph.initializer.append(TensorProto(name="s", data_type=TensorProto.STRING, dims=[100000000]))
    m.graph.node.append(helper.make_node("Identity", ["s"], ["s_out"], name="id"))
    m.graph.output.append(helper.make_tensor_value_info("s_out", TensorProto.STRING, [100000000]))
    prune_model(m, None, max_rss_mib=400)


# ================================================================== attribute values the checker accepts

@case("conv-auto_pad='FOO'", "attributes")
def _():
    prune_model(set_attr(conv_model(), "conv1", auto_pad="FOO"))


@case("lrn-size=0", "attributes")
def _():
    m = conv_model()
    m.graph.node[1].CopyFrom(helper.make_node("LRN", ["h"], ["r"], name="relu", size=0))
    prune_model(m)


@case("conv-group=-1", "attributes")
def _():
    prune_model(set_attr(conv_model(), "conv1", group=-1), 2)


@case("conv-group=2^40", "attributes")
def _():
    prune_model(set_attr(conv_model(), "conv1", group=2**40), 2)


@case("conv-dilations=[-2,-2]", "attributes")
def _():
    prune_model(set_attr(conv_model(), "conv1", dilations=[-2, -2]), 2)


@case("batchnorm-epsilon=-1", "attributes")
def _():
    m = conv_model()
    m.graph.initializer.extend(numpy_helper.from_array(np.ones(16, np.float32), n) for n in ("s", "bb", "mu", "var"))
    m.graph.node.insert(1, helper.make_node("BatchNormalization", ["h", "s", "bb", "mu", "var"], ["hb"], name="bn",
                                            epsilon=-1.0))
    m.graph.node[2].input[0] = "hb"
    prune_model(m, 2)


@case("split-sizes-not-summing-to-the-axis", "attributes")
def _():
    m = conv_model(opset=11)
    m.graph.node.insert(2, helper.make_node("Split", ["r"], ["r1", "r2"], name="sp", axis=1, split=[10, 10]))
    m.graph.node[-1].input[0] = "r1"
    m.graph.initializer[2].CopyFrom(numpy_helper.from_array(np.ones((4, 10, 3, 3), np.float32), "w2"))
    prune_model(m, 2)


# ================================================================== spa bench with mismatched models

def bench(a, b, code=2, extra=()):
    d = fresh()
    return expect(d, ["bench", save(a, d / "a.onnx"), save(b, d / "b.onnx"), "--runs", "2", *extra], code)


@case("bench-models-of-different-input-channels", "bench")
def _():
    bench(conv_model(c_in=3), conv_model(c_in=5))


@case("bench-symbolic-batch-vs-fixed-batch-3", "bench")
def _():
    m2 = mlp_model()
    m2.graph.input[0].type.tensor_type.shape.dim[0].dim_value = 3
    bench(mlp_model(), m2, None)


@case("bench---input-shape-contradicting-a-fixed-dim", "bench")
def _():
    bench(mlp_model(), mlp_model(), 2, ["--input-shape", "x=2,9"])


@case("bench-int64-input-vs-float-input", "bench")
def _():
    mm = mlp_model()
    mm.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    mm.graph.node.insert(0, helper.make_node("Cast", ["x"], ["xf"], to=TensorProto.FLOAT))
    mm.graph.node[1].input[0] = "xf"
    bench(mlp_model(), mm, 0)


@case("bench-models-without-inputs", "bench")
def _():
    g = helper.make_graph([helper.make_node("Constant", [], ["y"], value=numpy_helper.from_array(np.ones((1, 4), np.float32)))],
                          "g", [], [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])])
    const = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    bench(const, const, 0)


# ================================================================== main

def main(argv):
    chosen = [c for c in CASES if not argv or any(a in c[0] for a in argv)]
    broken = 0
    for name, cls, fn in chosen:
        start = time.time()
        try:
            fn()
            verdict = "OK"
        except Broken as e:
            verdict, broken = f"BROKEN {e}", broken + 1
        except Exception as e:   # a bug of this script, not of spa
            verdict, broken = f"BROKEN (harness) {type(e).__name__}: {e}", broken + 1
        _clean()
        print(f"[{cls}] {name}: {verdict} ({time.time() - start:.0f}s)", flush=True)
    print(f"{len(chosen)} cases, {broken} broken")
    return 1 if broken else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
