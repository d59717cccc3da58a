"""The spa command end to end: prune (table, JSON report, accuracy), inspect, bench."""

import json

import numpy as np
import onnx
import pytest

from graphs import Graph
from spa.cli import main


@pytest.fixture
def model_path(tmp_path):
    g = Graph()
    x = g.input(["N", 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 16)])
    y = g.op("Add", [g.conv(y, 16, 16), y])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [y])])
    g.output(g.op("Gemm", [f, g.weight(10, 16), g.weight(10)], transB=1))
    path = tmp_path / "m.onnx"
    onnx.save(g.model(), path)
    return path


def test_prune_writes_model_report_and_table(tmp_path, capsys, model_path):
    out, report = tmp_path / "out.onnx", tmp_path / "report.json"
    data = tmp_path / "data.npz"
    rng = np.random.default_rng(0)
    np.savez(data, x=rng.standard_normal((20, 3, 8, 8)).astype(np.float32), label=rng.integers(0, 10, 20))
    code = main(["prune", str(model_path), "-o", str(out), "--ratio", "0.5", "--round-to", "1",
                 "--report", str(report), "--eval", str(data), "--latency", "--runs", "3"])
    assert code == 0
    stdout = capsys.readouterr().out
    for word in ("params", "MACs", "file size", "latency", "accuracy", "verified"):
        assert word in stdout
    rep = json.loads(report.read_text())
    group = next(g for g in rep["groups"] if g["channels"] == 16)
    assert group["removed"] == 8 and group["kept"] == 8 and len(group["scores"]) == 16
    assert any("w1[0]" == m for m in group["members"])
    assert rep["verify"]["ok"] and rep["after"]["macs"] < rep["before"]["macs"]
    reasons = {b["reason"] for b in rep["blocked"]}
    assert "graph input 'x'" in reasons and any(r.startswith("graph output") for r in reasons)
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "N"


def test_round_to_keeps_multiples(tmp_path, capsys, model_path):
    report = tmp_path / "r.json"
    assert main(["prune", str(model_path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3",
                 "--round-to", "4", "--report", str(report), "-q"]) == 0
    rep = json.loads(report.read_text())
    assert all(g["kept"] % 4 == 0 for g in rep["groups"])


def test_global_ranking_respects_cap(tmp_path, model_path):
    report = tmp_path / "r.json"
    assert main(["prune", str(model_path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.5", "--global",
                 "--max-ratio", "0.6", "--round-to", "1", "--report", str(report), "-q"]) == 0
    rep = json.loads(report.read_text())
    assert sum(g["removed"] for g in rep["groups"]) == int(0.5 * sum(g["channels"] for g in rep["groups"]))
    assert all(g["removed"] <= int(0.6 * g["channels"]) for g in rep["groups"])


def test_exclude_pattern(tmp_path, model_path):
    report = tmp_path / "r.json"
    assert main(["prune", str(model_path), "-o", str(tmp_path / "o.onnx"), "--exclude", "w1",
                 "--report", str(report), "-q"]) == 0
    rep = json.loads(report.read_text())
    assert all(g["removed"] == 0 for g in rep["groups"] if "w1[0]" in g["members"])
    assert any("excluded" in b["reason"] for b in rep["blocked"])


@pytest.mark.parametrize("criterion", ["l1", "l2", "random", "bn-scale"])
def test_criteria(tmp_path, model_path, criterion):
    assert main(["prune", str(model_path), "-o", str(tmp_path / "o.onnx"), "--criterion", criterion, "-q"]) == 0


def test_l1_removes_the_smallest_filters(tmp_path):
    g = Graph()
    x = g.input([1, 3, 8, 8])
    w = np.ones((8, 3, 3, 3), np.float32) * np.arange(1, 9, dtype=np.float32)[:, None, None, None]
    y = g.op("Relu", [g.op("Conv", [x, g.const(w, "w")], pads=[1, 1, 1, 1])])
    g.output(g.conv(y, 8, 2))
    path = tmp_path / "m.onnx"
    onnx.save(g.model(), path)
    import spa
    r = spa.prune(path, ratio=0.5, round_to=1, aggregate="max")
    assert r.report["groups"][0]["removed_channels"] == [0, 1, 2, 3]


def test_inspect(capsys, model_path):
    assert main(["inspect", str(model_path)]) == 0
    out = capsys.readouterr().out
    assert "prunable groups" in out and "graph output" in out
    assert main(["inspect", str(model_path), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert [g["channels"] for g in summary["groups"]] == [16]


def test_bench(tmp_path, capsys, model_path):
    out = tmp_path / "o.onnx"
    assert main(["prune", str(model_path), "-o", str(out), "-q"]) == 0
    assert main(["bench", str(model_path), str(out), "--runs", "3"]) == 0
    table = capsys.readouterr().out
    assert "latency" in table and "MACs" in table


@pytest.mark.parametrize("options", [{}, {"ratio": 0.3}, {"mlp": 0.25}, {"heads": 0.25}, {"macs": 0.6},
                                     {"ratio": 0.3, "global_rank": True}])
def test_api_and_cli_mean_the_same(tmp_path, model_path, options):
    """Defaults live in one place: every option gives the same pruning from both."""
    import spa
    flags = {"ratio": "--ratio", "mlp": "--mlp", "heads": "--heads", "macs": "--macs", "global_rank": "--global"}
    argv = ["prune", str(model_path), "-o", str(tmp_path / "o.onnx"), "-q", "--report", str(tmp_path / "r.json")]
    for k, v in options.items():
        argv += [flags[k]] if v is True else [flags[k], str(v)]
    assert main(argv) == 0
    cli = json.loads((tmp_path / "r.json").read_text())
    api = spa.prune(str(model_path), **options).report
    assert [g["removed_channels"] for g in cli["groups"]] == [g["removed_channels"] for g in api["groups"]]
    assert cli["after"]["params"] == api["after"]["params"]
    if "heads" in options:  # a structure named alone leaves the others whole
        assert all(g["removed"] == 0 for g in api["groups"] if g["kind"] == "channels")
