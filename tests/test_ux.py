"""What a user meets first (issue 24): latency figures that can be trusted, progress inside
long stages, one default criterion, and a note when spa chose the amount to prune."""

import io
from pathlib import Path

import numpy as np
import onnx
import pytest

import spa.verify.bench
import spa.progress
from spa.verify.bench import Timing
from spa.cli.commands import build_parser, main
from spa.progress import StageProgress, phase, steps, track
from spa.sweep import Cell, Sweep, SweepConfig, Worker, best_under, latency_noisy
from spa.sweep.report import format_sweep

MODELS = Path(__file__).resolve().parent.parent / "models"
DEMO = str(MODELS / "demo_cnn.onnx")


# ---------------------------------------------------------------- latency


class _FakeSession:
    """Each run takes ``seconds`` on the fake clock, the runs numbered in ``slow`` 100 times that."""

    def __init__(self, clock, seconds, log, name, slow=()):
        self.clock, self.seconds, self.log, self.name, self.slow = clock, seconds, log, name, slow
        self.runs = 0

    def run(self, outputs, feeds):
        self.runs += 1
        self.log.append(self.name)
        self.clock[0] += self.seconds * (100 if self.runs in self.slow else 1)


def test_rounds_alternate_the_order_and_the_fastest_median_counts(monkeypatch):
    clock, log = [0.0], []
    model = onnx.load(DEMO)
    made = iter([_FakeSession(clock, 2.0, log, "a"), _FakeSession(clock, 1.0, log, "b", slow=(4, 6))])
    monkeypatch.setattr(spa.verify.bench, "session", lambda m, threads=1, timed=False: next(made))
    monkeypatch.setattr(spa.verify.bench, "_clock", lambda: clock[0])
    t = spa.verify.bench.timings([model, model], {"image": (1, 1, 28, 28)}, runs=6, warmup=1, repeats=3)
    timed = log[2:]                                  # after one warm-up run each
    assert timed[:4] == ["a", "b", "a", "b"] and timed[4:8] == ["b", "a", "b", "a"]
    assert len(t.rounds) == 3 and t.seconds == [2.0, 1.0]
    assert t.rounds[1][1] == t.rounds[2][1] == pytest.approx((1.0 + 100.0) / 2)   # bursts stay in their rounds
    assert t.spread() > 0.5 and Timing([[2.0, 1.0], [4.0, 2.0]]).spread() == 0.0


@pytest.mark.parametrize("ratio, macs, spread, noisy", [
    (0.056, 0.4, 0.01, True),      # issue 24's cell: far below its MACs share
    (0.35, 0.4, 0.01, False),
    (0.35, 0.4, 0.6, True),        # the rounds disagree
    (0.9, None, 0.0, False),
])
def test_latency_noisy(ratio, macs, spread, noisy):
    assert latency_noisy(ratio, macs, spread) is noisy


def _fake_timings(monkeypatch, rounds_of_call):
    calls = []

    def fake(models, input_shapes, runs=30, warmup=3, threads=1, seed=0, provider="", repeats=3):
        calls.append((runs, repeats))
        return Timing(rounds_of_call(len(calls)))
    monkeypatch.setattr(spa.verify.bench, "timings", fake)
    return calls


def test_an_implausible_cell_is_measured_again_then_flagged(monkeypatch):
    worker = Worker(SweepConfig(DEMO, runs=4, samples=4))
    calls = _fake_timings(monkeypatch, lambda n: [[1e-3, 5e-5]] * 3)     # 0.05 of the original
    row = worker.run(Cell("l1", "ratio", 0.5))
    assert calls == [(4, 3), (8, 6)]                  # once more, with twice the rounds
    assert row["latency_noisy"] is True and row["latency_ratio"] == pytest.approx(0.05)
    assert row["macs_ratio"] > 0.1


def test_keep_says_when_only_noisy_cells_fit(monkeypatch, tmp_path, capsys):
    _fake_timings(monkeypatch, lambda n: [[1e-3, 5e-5]] * 3)
    out = tmp_path / "s"
    assert main(["sweep", DEMO, "--ratios", "0.5", "--criteria", "l1", "--backend", "serial", "-o", str(out),
                 "--samples", "4", "--keep", "best:latency<=0.9", "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 cell(s) would, but their latency is noisy" in err[0] and not out.exists()


def test_a_second_measurement_that_agrees_is_kept(monkeypatch):
    worker = Worker(SweepConfig(DEMO, runs=4, samples=4))
    calls = _fake_timings(monkeypatch, lambda n: [[1e-3, 5e-5], [1e-3, 9e-4]] if n == 1 else [[1e-3, 4e-4]] * 6)
    got = worker.latency(worker.model, 0.5)
    assert len(calls) == 2 and got["latency_noisy"] is False and got["latency_ratio"] == pytest.approx(0.4)


def test_noisy_cells_are_marked_and_never_kept_for_a_latency_bound():
    def row(criterion, lat, quality, noisy):
        return {"criterion": criterion, "kind": "ratio", "value": 0.6, "macs": 40, "macs_ratio": 0.4,
                "params": 10, "params_ratio": 0.4, "file_bytes": 100, "latency_s": lat * 1e-3,
                "latency_ratio": lat, "agreement": quality, "latency_noisy": noisy}
    rows = [row("l1", 0.5, 0.8, False), row("obspa", 0.056, 0.9, True)]
    sweep = Sweep({"macs": 100, "params": 25, "file_bytes": 200, "latency_s": 1e-3, "agreement": 1.0,
                   "fidelity_inputs": "4 synthetic samples"}, rows, "agreement", {"model": "m"})
    assert best_under(sweep, "latency", 0.6) == 0
    assert best_under(sweep, "macs", 0.6) == 1           # its MACs are what they are
    table = format_sweep(sweep)
    assert "0.056?" in table and "0.500?" not in table and "not used by --keep best:latency" in table


# ---------------------------------------------------------------- progress


def test_pipe_lines_come_at_most_every_n_seconds_with_percent_and_eta():
    now = [0.0]
    stream = io.StringIO()
    with StageProgress(stream, every_s=10, clock=lambda: now[0]) as p:
        p.stage("calibrate")
        with steps(35, "groups") as step:
            for _ in range(35):
                now[0] += 1.0
                step()
                p.poll()      # the background thread does this too: a second poll adds nothing
                p.poll()
    lines = stream.getvalue().splitlines()
    assert len(lines) == 4 and lines[-1].startswith("spa: calibrate 35.00s")
    for line, done in zip(lines, (10, 20, 30)):
        assert line.startswith(f"spa: calibrate {done}s so far, {done / 35:.0%} ({done}/35 groups), ETA ")


def test_a_terminal_line_shows_percent_and_eta(monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True
    now = [0.0]
    p = StageProgress(Terminal(), clock=lambda: now[0])
    p.stage("allocate")
    p.step(0, 4, "groups")
    now[0] = 3.0
    p.step(1, 4, "groups")
    assert p._counted(now[0]) == ", 25% (1/4 groups), ETA 9s"
    p.step(None, None)
    assert p._counted(now[0]) == ""


def test_only_the_outer_count_reports_and_nothing_without_a_listener():
    seen = []

    class Recorder(StageProgress):
        def step(self, done, total, unit=""):
            seen.append((done, total, unit))
    for _ in track(range(3), unit="ignored"):      # nobody listens: a plain loop
        pass
    with Recorder(io.StringIO(), enabled=False):
        with phase("trying"):
            for _ in track(range(2), unit="groups"):
                for _ in track(range(5), unit="batches"):
                    pass
    assert seen == [(0, 2, "groups"), (1, 2, "groups"), (2, 2, "groups"), (None, None, "")]


def test_pruning_counts_its_groups_and_statistics(monkeypatch):
    seen = []
    monkeypatch.setattr(StageProgress, "step", lambda self, done, total, unit="": seen.append((done, total, unit)))
    with StageProgress(io.StringIO(), enabled=False) as p:
        spa.prune(DEMO, ratio=0.5, criterion="obspa", verify=False, on_stage=p)
    # data-free on images l1 chooses (no OBS choice to count per group) and OBS refits each layer
    for unit in ("layers refit", "layer statistics"):
        counts = [(done, total) for done, total, u in seen if u == unit]
        assert counts[0][0] == 0 and counts[-1][0] == counts[-1][1] > 0, unit


# ---------------------------------------------------------------- defaults


def test_sweep_and_prune_share_the_default_criterion():
    from spa.options import DEFAULT_CRITERION
    args = build_parser().parse_args(["sweep", DEMO, "-o", "x"])
    assert args.criteria == DEFAULT_CRITERION


@pytest.mark.parametrize("flags, note", [([], True), (["--ratio", "0.5"], False), (["--macs", "0.8"], False),
                                         (["--latency"], True)])
def test_a_prune_without_a_target_says_what_it_chose(tmp_path, capsys, flags, note):
    assert main(["prune", DEMO, "-o", str(tmp_path / "o.onnx"), "--criterion", "l1", "-q"] + flags) == 0
    err = capsys.readouterr().err
    assert ("spa: note: no --ratio or budget given: removed 50% of every group's channels" in err) is note


# ---------------------------------------------------------------- README and docs

ROOT = Path(__file__).resolve().parent.parent


def _slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    import re
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_readme_fits_a_page_keeps_its_two_commands_and_its_links_resolve():
    import re
    readme = (ROOT / "README.md").read_text()
    assert len(readme.splitlines()) <= 150
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert f"```bash\n{ci}\n```" in readme
    assert "```bash\npip install . && spa prune models/demo_cnn.onnx -o demo.pruned.onnx" in readme
    for page in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
            if target.startswith("http"):
                continue
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            assert file.exists(), f"{page.name}: {target}"
            if anchor and file.suffix == ".md":
                headings = {_slug(h) for h in re.findall(r"^#+ (.*)$", file.read_text(), re.M)}
                assert anchor in headings, f"{page.name}: {target}"
