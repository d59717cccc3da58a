"""spa sweep: option parsing, Pareto front, fidelity, and the command end to end on the demo."""

import csv
import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from spa.cli.commands import main
from spa.errors import SpaError
from spa.options import PruneOptions
from spa.sweep import Cell, Sweep, best_under, cells_of, fidelity, pareto, parse_keep, parse_ratios, parse_targets

MODELS = Path(__file__).resolve().parent.parent / "models"
DEMO = str(MODELS / "demo_cnn.onnx")


def test_ratio_ranges_include_their_stop():
    assert parse_ratios("0.1:0.7:0.1") == [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7]
    assert parse_ratios("0.5,0.2,0.5") == [0.2, 0.5]


@pytest.mark.parametrize("spec", ["0.1:0.7", "0.5:0.1:0.1", "0.1:0.5:0", "0.2,1.0", "a,b", "nan", ""])
def test_bad_ratios_are_refused(spec):
    with pytest.raises(SpaError):
        parse_ratios(spec)


def test_targets_and_keep():
    assert parse_targets("macs=0.4,0.8") == [("macs", 0.8), ("macs", 0.4)]
    assert parse_keep("best:macs<=0.5") == ("macs", 0.5)
    for bad in ("flops=0.5", "macs=0", "macs=1.5", "macs="):
        with pytest.raises(SpaError):
            parse_targets(bad)
    for bad in ("best:macs<0.5", "worst:macs<=0.5", "best:flops<=0.5", "best:macs<=-1"):
        with pytest.raises(SpaError):
            parse_keep(bad)


def test_cells_cross_criteria_with_settings():
    cells = cells_of(["l1", "obspa"], [0.2, 0.4], [("macs", 0.5)])
    assert cells == [Cell("l1", "ratio", 0.2), Cell("l1", "ratio", 0.4), Cell("obspa", "ratio", 0.2),
                     Cell("obspa", "ratio", 0.4), Cell("l1", "macs", 0.5), Cell("obspa", "macs", 0.5)]
    shared = PruneOptions(max_ratio=0.5, heads=0.25, steps=2, round_to=4)   # every option reaches a cell
    opts = cells[-1].options(shared)
    assert (opts.criterion, opts.macs, opts.ratio) == ("obspa", 0.5, None)
    assert (opts.max_ratio, opts.heads, opts.steps, opts.round_to) == (0.5, 0.25, 2, 4)
    assert cells[0].options(opts).criterion == "l1" and cells[0].options(opts).macs is None
    with pytest.raises(SpaError, match="unknown criterion"):
        cells_of(["l3"], [0.2], [])


def _row(macs, acc, **kw):
    return {"macs": macs, "macs_ratio": macs / 100, "accuracy": acc, **kw}


def test_pareto_front_keeps_only_undominated_cells():
    rows = [_row(50, 0.9), _row(60, 0.85), _row(30, 0.7), _row(30, 0.6), _row(80, 0.95), {"error": "x"}]
    assert pareto(rows, "accuracy") == [0, 2, 4]


def test_best_under_a_budget():
    rows = [_row(50, 0.9), _row(40, 0.8), _row(45, 0.8), _row(30, 0.7)]
    sweep = Sweep({}, rows, "accuracy", {"model": "m"})
    assert best_under(sweep, "macs", 0.5) == 0
    assert best_under(sweep, "macs", 0.45) == 1     # equal quality: fewer MACs
    assert best_under(sweep, "macs", 0.2) is None


def test_fidelity():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((20, 10)).astype(np.float32)
    same = fidelity(y, y.copy())
    assert same["agreement"] == 1.0 and same["cosine"] == pytest.approx(1.0) and same["rel_error"] == 0
    flipped = fidelity(y, -y)
    assert flipped["agreement"] < 0.5 and flipped["cosine"] == pytest.approx(-1.0)
    maps = fidelity(y.reshape(20, 1, 10), y.reshape(20, 1, 10) * 2)   # not a classifier: no agreement
    assert "agreement" not in maps and maps["rel_error"] == pytest.approx(1.0)


def test_sweep_demo_writes_table_files_and_best_model(tmp_path, capsys):
    out = tmp_path / "sweep"
    code = main(["sweep", DEMO, "--ratios", "0.25,0.5", "--criteria", "l1", "--eval",
                 str(MODELS / "demo_sample.npz"), "-o", str(out), "--keep", "best:macs<=0.6", "--jobs", "2",
                 "--runs", "2"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    rep = json.loads((out / "sweep.json").read_text())
    assert rep["quality"] == "accuracy" and rep["backend"] == "pool" and len(rep["cells"]) == 2
    a, b = rep["cells"]
    assert (a["value"], b["value"]) == (0.25, 0.5) and a["macs"] > b["macs"]
    assert rep["original"]["accuracy"] > 0.9 and 0 <= b["accuracy"] <= 1
    assert all(0 < c["latency_s"] and 0 < c["file_bytes"] < rep["original"]["file_bytes"] for c in rep["cells"])
    assert rep["pareto"] == [i for i, c in enumerate(rep["cells"]) if c.get("pareto")] != []
    rows = list(csv.DictReader((out / "sweep.csv").open()))
    assert [r["value"] for r in rows] == ["0.25", "0.5"]
    assert float(rows[1]["macs_ratio"]) == pytest.approx(b["macs_ratio"])
    if (out / "sweep.png").exists() or "sweep.png skipped" not in captured.err:
        assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    best = max((c for c in rep["cells"] if c["macs_ratio"] <= 0.6), key=lambda c: c["accuracy"])
    kept = onnx.load(out / "best-macs-0.6.onnx")
    assert out.joinpath("best-macs-0.6.onnx").stat().st_size == best["file_bytes"]
    onnx.checker.check_model(kept)
    assert "ratio=0.25" in captured.out and "Pareto" in captured.out and "kept:" in captured.out
    lines = [line for line in captured.err.splitlines() if line.startswith("spa sweep:")]
    assert len(lines) == 2 and lines[-1].startswith("spa sweep: 2/2") and "ETA" in lines[0]


def test_sweep_without_labels_measures_agreement_serially(tmp_path, capsys, monkeypatch):
    import spa.sweep.report
    monkeypatch.setattr(spa.sweep.report, "have_matplotlib", lambda: False)
    out = tmp_path / "s"
    assert main(["sweep", DEMO, "--ratios", "0,0.5", "--backend", "serial", "-o", str(out), "--runs", "1",
                 "--samples", "8", "-q"]) == 0
    rep = json.loads((out / "sweep.json").read_text())
    assert rep["quality"] == "agreement" and rep["original"]["fidelity_inputs"] == "8 synthetic samples"
    zero, half = rep["cells"]
    assert zero["agreement"] == 1.0 and zero["cosine"] == pytest.approx(1.0, abs=1e-5)
    assert half["rel_error"] > 1e-3
    err = capsys.readouterr().err
    assert "sweep.png skipped" in err and not (out / "sweep.png").exists()


@pytest.mark.parametrize("argv, message", [
    (["--ratios", "0.2:0.1:0.1"], "STOP"),
    (["--ratios", "0.2,1.2"], "[0, 1)"),
    (["--criteria", "l1,nope"], "unknown criterion"),
    (["--keep", "best:macs<0.5"], "best:KEY<=V"),
    (["--targets", "flops=0.5"], "KIND"),
    (["--eval", str(MODELS / "demo_calib.npz")], "label"),
    (["--ratios", "0.25", "--keep", "best:macs<=0.01", "--backend", "serial", "--runs", "1"], "no cell"),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, capsys, argv, message):
    out = tmp_path / "sweep"
    assert main(["sweep", DEMO, "-o", str(out)] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("spa: error:") and message in err[-1] and not any("Traceback" in e for e in err)
    assert not out.exists()


def test_output_must_not_be_a_file_or_the_model(tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    assert main(["sweep", DEMO, "-o", str(f), "--ratios", "0.2"]) == 2
    assert f.read_text() == "x"
    missing = tmp_path / "no" / "such"
    assert main(["sweep", DEMO, "-o", str(missing), "--ratios", "0.2"]) == 2
    assert not missing.parent.exists()
    assert "does not exist" in capsys.readouterr().err


def test_a_failed_write_leaves_nothing(tmp_path, capsys, monkeypatch):
    import spa.sweep.report

    def broken_plot(sweep, path, title=None):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(spa.sweep.report, "have_matplotlib", lambda: True)
    monkeypatch.setattr(spa.sweep.report, "plot", broken_plot)
    out = tmp_path / "s"
    assert main(["sweep", DEMO, "--ratios", "0.5", "--backend", "serial", "-o", str(out), "--runs", "1",
                 "--samples", "4", "-q"]) == 2
    assert "No space left" in capsys.readouterr().err and not out.exists()


def test_pool_workers_get_a_share_of_the_blas_threads(monkeypatch):
    import os
    from spa.sweep.run import _blas_threads
    monkeypatch.delenv("OPENBLAS_NUM_THREADS", raising=False)
    monkeypatch.setenv("MKL_NUM_THREADS", "3")
    with _blas_threads(2):
        assert os.environ["OPENBLAS_NUM_THREADS"] == "2" and os.environ["MKL_NUM_THREADS"] == "3"
    assert "OPENBLAS_NUM_THREADS" not in os.environ and os.environ["MKL_NUM_THREADS"] == "3"


def test_several_models_share_one_pool(tmp_path, capsys):
    """spa sweep a.onnx b.onnx: the cells of both run in one pool, each model gets its folder
    and table, and the progress lines say which model a cell belongs to."""
    out = tmp_path / "out"
    digits = str(MODELS / "digits_mlp.onnx")
    assert main(["sweep", DEMO, digits, "--ratios", "0.25,0.5", "--criteria", "l1", "-o", str(out),
                 "--jobs", "2", "--runs", "1", "--samples", "8", "--keep", "best:macs<=0.9"]) == 0
    captured = capsys.readouterr()
    for stem in ("demo_cnn", "digits_mlp"):
        data = json.loads((out / stem / "sweep.json").read_text())
        assert data["model"].endswith(f"{stem}.onnx") and len(data["cells"]) == 2
        assert (out / stem / "best-macs-0.9.onnx").is_file()
        assert f"{stem}.onnx: l1 ratio=0.5" in captured.err
    assert captured.out.count("== ") == 2 and "4/4" in captured.err


def test_several_models_need_different_names(tmp_path, capsys):
    other = tmp_path / "x" / "demo_cnn.onnx"
    other.parent.mkdir()
    other.write_bytes(Path(DEMO).read_bytes())
    assert main(["sweep", DEMO, str(other), "--ratios", "0.5", "-o", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "different names" in err[0] and not (tmp_path / "out").exists()
