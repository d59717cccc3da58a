"""The spa command end to end: prune (table, JSON report, accuracy), inspect, bench."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphs import Graph
from spa.cli.commands import main


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


# ---- options change what they must (issue 13, item 6) ---------------------------------------

def _conv_model(tmp_path, widths, weights, bn=None, name="m.onnx"):
    """x -> conv -> [BatchNormalization] -> relu -> ... -> conv -> out, with given weights
    (a dict: layer index -> (c_out, c_in, 3, 3) array); other layers random."""
    g = Graph()
    y = g.input([1, 3, 8, 8])
    for i, (c_in, c_out) in enumerate(zip([3, *widths], [*widths, 4])):
        w = weights.get(i)
        w = g.const(w.astype(np.float32)) if w is not None else g.weight(c_out, c_in, 3, 3)
        y = g.op("Conv", [y, w], pads=[1, 1, 1, 1])
        if i < len(widths):
            if bn is not None and i == 0:
                ones, zeros = np.ones(c_out, np.float32), np.zeros(c_out, np.float32)
                y = g.op("BatchNormalization", [y, g.const(bn.astype(np.float32)), g.const(zeros),
                                                g.const(zeros), g.const(ones)])
            y = g.op("Relu", [y])
    g.output(y)
    path = tmp_path / name
    onnx.save(g.model(), path)
    return path


def _prune_report(tmp_path, path, *flags):
    out, report = tmp_path / "o.onnx", tmp_path / "r.json"
    assert main(["prune", str(path), "-o", str(out), "--report", str(report), "--verify", "-q", *flags]) == 0
    rep = json.loads(report.read_text())
    assert rep["verify"]["ok"]
    return rep, onnx.load(out)


def _init(model, node_index, k):
    name = model.graph.node[node_index].input[k]
    return onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == name))


@pytest.mark.parametrize("round_to,kept", [(8, 16), (1, 14), (4, 16), (3, 15)])
def test_round_to_changes_kept_count(tmp_path, round_to, kept):
    """20 channels at ratio 0.3 keep 14; rounded to multiples of 8, 16."""
    path = _conv_model(tmp_path, [20], {})
    rep, pruned = _prune_report(tmp_path, path, "--ratio", "0.3", "--round-to", str(round_to))
    assert [(g["channels"], g["kept"]) for g in rep["groups"]] == [(20, kept)]
    assert _init(pruned, 0, 1).shape[0] == kept


def test_removed_channels_are_the_ones_gone_from_the_model(tmp_path):
    """Every filter of the first conv is constant with its own value, and every column of the
    next conv too: the pruned weights tell which original channels are left."""
    c = 12
    perm = np.random.default_rng(3).permutation(c)           # l1 ranks the filters in this order
    filt = (0.1 * (perm + 1))[:, None, None, None] * np.ones((c, 3, 3, 3))
    cols = (1e-3 * (np.arange(c) + 1))[None, :, None, None] * np.ones((4, c, 3, 3))
    path = _conv_model(tmp_path, [c], {0: filt, 1: cols})
    rep, pruned = _prune_report(tmp_path, path, "--ratio", "0.5", "--round-to", "1", "--criterion", "l1")
    (group,) = rep["groups"]
    removed = group["removed_channels"]
    assert sorted(removed) == sorted(np.argsort(perm)[:6].tolist()) and removed != list(range(6))
    kept = [i for i in range(c) if i not in removed]
    w1, w2 = _init(pruned, 0, 1), _init(pruned, 2, 1)
    assert np.round(w1[:, 0, 0, 0] / 0.1).astype(int).tolist() == (perm[kept] + 1).tolist()
    assert np.round(w2[0, :, 0, 0] / 1e-3).astype(int).tolist() == [i + 1 for i in kept]


def test_bn_scale_chooses_by_the_batchnorm_scale(tmp_path):
    """Filters grow with the index, BatchNorm scales shrink with it: l1 removes the first half,
    bn-scale the second."""
    c = 8
    filt = (0.1 * (np.arange(c) + 1))[:, None, None, None] * np.ones((c, 3, 3, 3))
    gamma = 0.1 * (c - np.arange(c))
    path = _conv_model(tmp_path, [c], {0: filt}, bn=gamma)
    common = ["--ratio", "0.5", "--round-to", "1", "--criterion"]
    by_l1, _ = _prune_report(tmp_path, path, *common, "l1")
    by_bn, pruned = _prune_report(tmp_path, path, *common, "bn-scale")
    assert by_l1["groups"][0]["removed_channels"] == [0, 1, 2, 3]
    assert by_bn["groups"][0]["removed_channels"] == [4, 5, 6, 7]
    assert "note" not in by_bn["groups"][0]  # scored by the BatchNorm, not a fallback
    assert np.round(_init(pruned, 0, 1)[:, 0, 0, 0] / 0.1).astype(int).tolist() == [1, 2, 3, 4]


def test_global_takes_more_from_the_less_sensitive_group(tmp_path):
    """Layer 1 has 6 near-zero filters of 8, layer 2 eight alike: ranked globally, layer 1 loses
    6 and layer 2 2; ranked per layer, each loses 4."""
    c = 8
    filt1 = np.array([1e-3] * 6 + [1.0] * 2)[:, None, None, None] * np.ones((c, 3, 3, 3))
    filt2 = (1e-2 * (1 + 1e-2 * np.arange(c)))[:, None, None, None] * np.ones((c, c, 3, 3))
    path = _conv_model(tmp_path, [c, c], {0: filt1, 1: filt2, 2: np.full((4, c, 3, 3), 1e-2)})
    common = ["--ratio", "0.5", "--round-to", "1", "--criterion", "l1"]
    rep, _ = _prune_report(tmp_path, path, *common, "--global")
    assert [g["removed_channels"] for g in rep["groups"]] == [[0, 1, 2, 3, 4, 5], [0, 1]]
    rep, _ = _prune_report(tmp_path, path, *common)
    assert [g["removed"] for g in rep["groups"]] == [4, 4]


@pytest.mark.parametrize("heads_ratio", [0.5, 0.5000001, 0.25])
def test_global_ranks_within_a_kind_whatever_the_ratios(heads_ratio):
    """Channels and heads never share a budget: two kinds with the same ratio are ranked as
    apart as two with different ones (they used to merge when the ratio values were equal)."""
    from spa.graph.groups import Group
    from spa.plan.planner import PlanOptions, plan_removals

    def group(i, n, kind):
        return Group(i, np.arange(100 * i, 100 * i + n), [], kind=kind)

    groups = [group(0, 8, "channels"), group(1, 8, "channels"), group(2, 4, "heads")]
    scores = [np.array([1e-3] * 6 + [1.0] * 2), np.linspace(1, 1.1, 8), np.ones(4)]
    opts = PlanOptions(ratio=0.5, ratios=(("heads", heads_ratio),), global_rank=True, round_to=1)
    removed = [len(r) for r in plan_removals(groups, scores, opts)]
    assert removed == [6, 2, int(np.floor(4 * heads_ratio + 1e-9))]


def test_bench_counts_external_data(tmp_path, capsys, model_path):
    """The file size column counts every file a model is read from, small tensors read into
    memory included."""
    from spa.cli.commands import FORMATS
    m = onnx.load(model_path)
    ext = tmp_path / "ext.onnx"
    onnx.save(m, ext, save_as_external_data=True, location="ext.bin", size_threshold=0)
    total = ext.stat().st_size + (tmp_path / "ext.bin").stat().st_size
    assert main(["bench", str(ext), str(ext), "--runs", "2"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.startswith("file size"))
    assert line.split()[2] == FORMATS["file size"](total)


DEMO = Path(__file__).resolve().parent.parent / "models" / "demo_cnn.onnx"


@pytest.mark.parametrize("flags,expected", [({"avx512f", "avx2"}, 16), ({"avx2", "sse4_2"}, 8), ({"neon"}, 4)])
def test_round_to_auto_follows_the_vector_width(monkeypatch, tmp_path, capsys, flags, expected):
    from spa import runtime
    monkeypatch.setattr(runtime, "_cpu_flags", lambda: flags)
    report = tmp_path / "r.json"
    assert main(["prune", str(DEMO), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--round-to", "auto",
                 "--report", str(report), "-q"]) == 0
    rep = json.loads(report.read_text())
    assert rep["options"]["round_to"] == expected
    assert all(g["kept"] % expected == 0 or g["kept"] == g["channels"] for g in rep["groups"])
    assert main(["prune", str(DEMO), "-o", str(tmp_path / "p.onnx"), "--round-to", "fast"]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 1


def test_group_width_flags(tmp_path, capsys):
    """--group-width thins every group of a grouped conv (a pass of its own); inspect
    --conv-groups width shows those groups."""
    g = Graph()
    y = g.op("Relu", [g.conv(g.input([1, 3, 6, 6]), 3, 32, k=1)])
    y = g.op("Relu", [g.conv(y, 32, 32, group=8)])
    g.output(g.conv(y, 32, 4, k=1))
    path, out, report = tmp_path / "g.onnx", tmp_path / "out.onnx", tmp_path / "r.json"
    onnx.save(g.model(), path)
    assert main(["inspect", str(path), "--conv-groups", "width"]) == 0
    assert "group-width" in capsys.readouterr().out
    assert main(["prune", str(path), "-o", str(out), "--group-width", "0.5", "--report", str(report),
                 "--verify"]) == 0
    assert "verified" in capsys.readouterr().out
    rep = json.loads(report.read_text())
    assert rep["options"]["group_width"] == 0.5 and rep["verify"]["ok"]
    assert {grp["kind"] for grp in rep["groups"] if grp["removed"]} == {"group-width"}
    conv = [n for n in onnx.load(out).graph.node if n.op_type == "Conv"][1]
    assert [a.i for a in conv.attribute if a.name == "group"] == [8]
