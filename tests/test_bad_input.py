"""Bad input: one line on stderr, non-zero exit, no traceback, no file left behind."""

import os
import stat

import onnx
import pytest

from graphs import Graph
import spa.loading.saving
from spa.cli.commands import main


@pytest.fixture
def good_model(tmp_path):
    g = Graph()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    g.output(g.conv(y, 16, 4))
    path = tmp_path / "good.onnx"
    onnx.save(g.model(), path)
    return path


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *words):
    assert code != 0
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1, err
    assert lines[0].startswith("spa: error:"), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, lines[0])


def leftovers(directory, before):
    return sorted(set(os.listdir(directory)) - set(before))


@pytest.mark.parametrize("content,word", [
    (b"", "empty"),
    (b"hello, this is a text file\nnot a model\n", "ONNX"),
    (bytes(range(256)) * 10, "ONNX"),
])
def test_not_a_model(tmp_path, capsys, content, word):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(content)
    before = os.listdir(tmp_path)
    code, _, err = run(capsys, "prune", bad, "-o", tmp_path / "out.onnx")
    assert_one_line_error(code, err, word)
    assert leftovers(tmp_path, before) == []


def test_truncated_model(tmp_path, capsys, good_model):
    data = good_model.read_bytes()
    bad = tmp_path / "truncated.onnx"
    bad.write_bytes(data[: len(data) // 2])
    before = os.listdir(tmp_path)
    code, _, err = run(capsys, "prune", bad, "-o", tmp_path / "out.onnx")
    assert_one_line_error(code, err)
    assert leftovers(tmp_path, before) == []


def test_missing_file(tmp_path, capsys):
    code, _, err = run(capsys, "prune", tmp_path / "nope.onnx", "-o", tmp_path / "out.onnx")
    assert_one_line_error(code, err, "no such file")


def test_output_is_input(tmp_path, capsys, good_model):
    original = good_model.read_bytes()
    code, _, err = run(capsys, "prune", good_model, "-o", good_model)
    assert_one_line_error(code, err, "input")
    assert good_model.read_bytes() == original


def test_unwritable_output_dir(tmp_path, capsys, good_model):
    if os.geteuid() == 0:
        target = "/proc/spa-test-out.onnx"  # not writable even for root
    else:
        ro = tmp_path / "ro"
        ro.mkdir()
        ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
        target = ro / "out.onnx"
    code, _, err = run(capsys, "prune", good_model, "-o", target)
    assert_one_line_error(code, err, "writ")
    assert not os.path.exists(target)


def test_output_dir_missing(tmp_path, capsys, good_model):
    code, _, err = run(capsys, "prune", good_model, "-o", tmp_path / "no" / "dir" / "out.onnx")
    assert_one_line_error(code, err, "does not exist")


def test_output_write_failure_leaves_nothing(tmp_path, good_model, monkeypatch):
    """If writing fails half-way, neither the output nor a temporary file remains."""
    import spa
    result = spa.prune(good_model, ratio=0.5, verify=False)

    def boom(*a, **k):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(spa.loading.saving, "_write_one_file", boom)
    before = os.listdir(tmp_path)
    with pytest.raises(spa.OutputPathError, match="No space left"):
        result.save(tmp_path / "out.onnx")
    assert leftovers(tmp_path, before) == []


@pytest.mark.parametrize("ratio", ["1.0", "-0.1", "1.5", "abc"])
def test_ratio_out_of_range(tmp_path, capsys, good_model, ratio):
    code, _, err = run(capsys, "prune", good_model, "-o", tmp_path / "o.onnx", "--ratio", ratio)
    assert_one_line_error(code, err, "ratio")
    assert not (tmp_path / "o.onnx").exists()


def test_ratio_out_of_range_from_python(good_model):
    import spa
    with pytest.raises(spa.SpaError, match="ratio"):
        spa.prune(good_model, ratio=1.0)


def test_everything_blocked_gives_unchanged_model_and_reasons(tmp_path, capsys):
    """A single conv between input and output has nothing to prune: same model, report says why."""
    g = Graph()
    g.output(g.conv(g.input([1, 3, 8, 8]), 3, 8))
    path = tmp_path / "one.onnx"
    onnx.save(g.model(), path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, _ = run(capsys, "prune", path, "-o", out, "--report", report)
    assert code == 0
    import json
    rep = json.loads(report.read_text())
    assert rep["before"]["params"] == rep["after"]["params"]
    assert {b["reason"] for b in rep["blocked"]} == {f"graph output '{g.outputs[0]}'", "graph input 'x'"}
    assert "blocked" in stdout


def test_custom_op_is_reported_and_rest_pruned(tmp_path, capsys):
    g = Graph()
    x = g.input([1, 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    y = g.conv(y, 16, 16)
    g.nodes.append(onnx.helper.make_node("Mystery", [y], ["z"], domain="acme", name="mystery"))
    g.output("z")
    path = tmp_path / "custom.onnx"
    onnx.save(g.model(domains=["acme"]), path)
    out, report = tmp_path / "out.onnx", tmp_path / "r.json"
    code, stdout, _ = run(capsys, "prune", path, "-o", out, "--report", report)
    assert code == 0
    import json
    rep = json.loads(report.read_text())
    assert any("acme.Mystery" in b["reason"] for b in rep["blocked_nodes"])
    assert rep["after"]["params"] < rep["before"]["params"]
    assert "acme.Mystery" in stdout
    code, _, err = run(capsys, "prune", path, "-o", tmp_path / "strict.onnx", "--strict")
    assert_one_line_error(code, err, "acme.Mystery")
    assert not (tmp_path / "strict.onnx").exists()


def test_symbolic_spatial_dims_need_no_input_shape(tmp_path, capsys):
    """spa probes symbolic H/W itself (tests/test_probe.py); --input-shape still chooses."""
    g = Graph()
    x = g.input(["N", 3, "H", "W"])
    g.output(g.conv(g.op("Relu", [g.conv(x, 3, 16)]), 16, 4))
    path = tmp_path / "dyn.onnx"
    onnx.save(g.model(), path)
    code, _, err = run(capsys, "prune", path, "-o", tmp_path / "o.onnx")
    assert code == 0, err
    assert [line for line in err.splitlines() if line.startswith("spa: note:")], err
    code, out, err = run(capsys, "prune", path, "-o", tmp_path / "p.onnx", "--input-shape", "x=2,3,16,16")
    assert code == 0, err
    for out in ("o.onnx", "p.onnx"):
        pruned = onnx.load(tmp_path / out)
        dims = [d.dim_param or d.dim_value for d in pruned.graph.input[0].type.tensor_type.shape.dim]
        assert dims == ["N", 3, "H", "W"]  # the model stays dynamic


def test_bad_input_shape_spec(tmp_path, capsys, good_model):
    code, _, err = run(capsys, "prune", good_model, "-o", tmp_path / "o.onnx", "--input-shape", "nope=1,2")
    assert_one_line_error(code, err, "nope")


def test_broken_rewrite_is_caught_without_verify(monkeypatch, tmp_path):
    """Even with --no-verify, a pruned model whose shapes don't add up is never written."""
    import numpy as np
    import spa
    from spa.graph import fixups
    g = Graph()
    x = g.input([1, 3, 6, 6])
    y = g.op("Relu", [g.conv(x, 3, 8)])
    r = g.op("Reshape", [y, g.const(np.array([1, 8, 36], np.int64))])
    g.output(g.op("MatMul", [g.op("Transpose", [r], perm=[0, 2, 1]), g.weight(8, 4)]))
    monkeypatch.setattr(fixups, "_vector_edits", lambda *a, **k: [])   # forget the Reshape target
    with pytest.raises(spa.VerificationError, match="inconsistent shapes"):
        spa.prune(g.model(), ratio=0.5, round_to=1, verify=False)
