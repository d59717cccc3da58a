"""Time that follows the graph's size: a long chain is analyzed in time near-linear in its
nodes, and onnxruntime's costly optimizations are kept off the sessions that do not need them."""

from __future__ import annotations

import time

import onnxruntime as ort
import pytest

import spa
import spa.pipeline
import spa.runtime
from graphs import chain_model


def _analysis_seconds(model) -> float:
    """CPU seconds of one analysis (other processes' load does not count), the best of two."""
    best = float("inf")
    for _ in range(2):
        start = time.process_time()
        spa.analyze(model)
        best = min(best, time.process_time() - start)
    return best


@pytest.mark.parametrize("kind", ["conv", "elementwise"])
def test_analysis_time_grows_near_linearly_with_a_chain(kind):
    small, large = chain_model(2_000, kind), chain_model(20_000, kind)
    ratio = _analysis_seconds(large) / _analysis_seconds(small)
    # 10x the nodes: about 10x the time (measured 10-12); a pass over the graph per node is 100x
    assert ratio < 20, f"{kind} chain: 20k nodes took {ratio:.1f}x the time of 2k"


def test_the_whole_l1_prune_grows_near_linearly_with_a_chain():
    """Every stage after the analysis too (score, plan, rewrite, report): a report that looked
    the model over once per group took 109 s of a 10k-node chain."""
    def seconds(model):
        start = time.process_time()
        spa.prune(model, ratio=0.3, criterion="l1", verify=False)
        return time.process_time() - start
    small, large = chain_model(1_000, "conv"), chain_model(8_000, "conv")
    seconds(small)   # warm up imports and onnxruntime
    ratio = seconds(large) / seconds(small)
    assert ratio < 20, f"8k nodes took {ratio:.1f}x the time of 1k"


def test_sessions_of_a_large_graph_skip_the_costly_optimizations(monkeypatch):
    monkeypatch.setattr(spa.runtime, "LARGE_GRAPH_NODES", 10)
    model = chain_model(40, "conv")

    def level(**kwargs):
        return spa.runtime.session(model, **kwargs).get_session_options().graph_optimization_level

    assert level() == ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    assert level(defaults=True) == ort.GraphOptimizationLevel.ORT_ENABLE_ALL   # what users get
    assert level(timed=True) == ort.GraphOptimizationLevel.ORT_ENABLE_ALL      # what latency means
    assert level(optimize=False) == ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    monkeypatch.setattr(spa.runtime, "LARGE_GRAPH_NODES", 100)
    assert level() == ort.GraphOptimizationLevel.ORT_ENABLE_ALL


def test_the_oracle_is_off_by_default_on_a_large_graph(monkeypatch):
    monkeypatch.setattr(spa.pipeline, "VERIFY_AUTO_MAX_NODES", 10)
    model = chain_model(40, "conv")
    assert "verify" not in spa.prune(model, ratio=0.5, criterion="l1", round_to=1).report
    assert spa.prune(model, ratio=0.5, criterion="l1", round_to=1, verify=True).report["verify"]["ok"]
