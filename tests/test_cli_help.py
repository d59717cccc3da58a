"""The CLI explains itself: help on every option, --version, examples, what was removed,
progress that says what it is doing."""

import argparse
import io
import json
import time

import onnx
import pytest

import spa
import spa.progress
from graphs import Graph
from spa.cli.commands import build_parser, format_table, main, removal_summary
from spa.progress import StageProgress


@pytest.fixture
def model_path(tmp_path):
    g = Graph()
    x = g.input(["N", 3, 8, 8])
    y = g.op("Relu", [g.conv(x, 3, 20)])
    f = g.op("Flatten", [g.op("GlobalAveragePool", [g.conv(y, 20, 16)])])
    g.output(g.op("Gemm", [f, g.weight(10, 16), g.weight(10)], transB=1))
    path = tmp_path / "m.onnx"
    onnx.save(g.model(), path)
    return path


def _subparsers(parser):
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_every_option_has_help():
    parser = build_parser()
    missing = [f"spa {a.dest}" for a in parser._actions if not a.help]
    for name, sub in _subparsers(parser).items():
        missing += [f"spa {name} {a.option_strings or a.dest}" for a in sub._actions if not a.help]
    assert not missing


def test_criterion_help_says_which_use_data():
    prune = _subparsers(build_parser())["prune"]
    text = next(a.help for a in prune._actions if a.dest == "criterion")
    for criterion in ("l1", "l2", "random", "bn-scale", "obspa", "activation", "dead"):
        assert criterion in text
    assert "--calib" in text and "weights alone" in text


def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"spa {spa.__version__}"


def test_prune_help_ends_with_three_examples(capsys):
    assert main(["prune", "--help"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if line.strip()]
    assert lines[-4] == "examples:" and all(line.lstrip().startswith("spa prune ") for line in lines[-3:])


def test_table_column_is_named_after_before():
    header = format_table([("params", 10, 5)], {"params": str}).splitlines()[0]
    assert "after/before" in header and " ratio" not in header


def test_summary_counts_removed_channels_and_heads():
    rep = {"groups": [{"kind": "channels", "channels": 32, "removed": 16},
                      {"kind": "channels", "channels": 32, "removed": 0},
                      {"kind": "heads", "channels": 12, "removed": 3}],
           "blocked": [{}], "options": {"round_to": 16}}
    removed, groups = removal_summary(rep, ratio=0.3)
    assert "16 of 64 channels (25.0%) in 1 of 2 groups" in removed
    assert "3 of 12 attention heads (25.0%) in 1 of 1 groups" in removed
    assert "--ratio 0.3 asked for 30%" in removed and "--round-to 16" in removed
    assert groups == "groups: 3 prunable, 2 cut, 1 left whole (blocked)"
    assert "asked for" not in removal_summary(rep, ratio=0.25)[0]


def test_prune_prints_what_it_removed(tmp_path, capsys, model_path):
    report = tmp_path / "r.json"
    assert main(["prune", str(model_path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--round-to", "8",
                 "--report", str(report)]) == 0
    rep = json.loads(report.read_text())
    removed = sum(g["removed"] for g in rep["groups"])
    total = sum(g["channels"] for g in rep["groups"])
    out = capsys.readouterr().out
    assert f"removed: {removed} of {total} channels ({removed / total:.1%})" in out
    assert "after/before" in out


def test_stage_lines_when_stderr_is_not_a_terminal(tmp_path, capsys, model_path, monkeypatch):
    monkeypatch.setattr(spa.progress, "QUIET_S", 0.0)
    assert main(["prune", str(model_path), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3"]) == 0
    stages = [line.split()[1] for line in capsys.readouterr().err.splitlines()]
    # the fixture is a folded classifier, not inverted here (conftest: only tests/test_invert.py does)
    assert stages[:2] == ["analyze", "score"] and "rewrite" in stages and stages[-1] == "save"


def test_quick_runs_print_no_stage_lines():
    stream = io.StringIO()
    with StageProgress(stream) as p:
        p.stage("analyze")
        p.stage("score")
    assert stream.getvalue() == ""
    stream = io.StringIO()
    with StageProgress(stream, quiet_s=0) as p:
        p.stage("analyze")
        p.stage("score")
    lines = stream.getvalue().splitlines()
    assert [line.split()[:2] for line in lines] == [["spa:", "analyze"], ["spa:", "score"]]
    assert all(line.endswith("s)") and "total" in line for line in lines)


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_line_counts_up_while_a_stage_runs():
    stream = _Terminal()
    with StageProgress(stream) as p:
        p.stage("calibrate")
        deadline = time.monotonic() + 10      # waits for the redraw thread; asserts no duration
        while "calibrate" not in stream.getvalue() and time.monotonic() < deadline:
            time.sleep(0.05)
    text = stream.getvalue()
    assert "\r\033[Kspa: calibrate" in text and "total" in text and text.endswith("\r\033[K")


def test_bench_provider(tmp_path, capsys, model_path):
    pruned = tmp_path / "p.onnx"
    assert main(["prune", str(model_path), "-o", str(pruned), "--ratio", "0.5", "-q"]) == 0
    assert main(["bench", str(model_path), str(pruned), "--runs", "2", "--provider", "CPUExecutionProvider"]) == 0
    assert "latency" in capsys.readouterr().out
    assert main(["bench", str(model_path), str(pruned), "--provider", "NoSuchExecutionProvider"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "available: " in err[0] and "CPUExecutionProvider" in err[0]
