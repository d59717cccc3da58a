"""Diffusion UNets (diffusers, random init, models/diffusion_unets.py) from both exporters,
pruned with the oracle: resnet blocks through GroupNorm (whole groups), skip concats,
self- and cross-attention heads, the timestep-embedding MLP."""

import numpy as np
import onnx
import pytest

import spa

pytestmark = pytest.mark.zoo

MODELS = ["unet2d", "unet2d_cond"]
EXPORTERS = ["dynamo", "legacy"]


@pytest.fixture(scope="module")
def unets():
    pytest.importorskip("diffusers")
    return pytest.importorskip("diffusion_unets")


@pytest.fixture(scope="module")
def export(unets, zoo_dir):
    """Export on first use, once per run (the file is the cache)."""
    return lambda name, exporter: unets.export(name, exporter, zoo_dir)


def _inits(model):
    return {t.name: list(t.dims) for t in model.graph.initializer}


def _removed(rep, pattern):
    """Channels removed from the groups whose members name ``pattern``."""
    return sum(g["removed"] for g in rep["groups"] if any(pattern in m for m in g["members"]))


def _run(model, feeds):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)[0]


@pytest.mark.parametrize("exporter", EXPORTERS)
@pytest.mark.parametrize("name", MODELS)
def test_every_structure_prunes(unets, export, name, exporter):
    """Half of every group, no rounding: each structure of the UNet loses channels and
    nothing but the graph's inputs and outputs (and, for the cross-attention UNet, the
    transformer blocks' LayerNorm-mixed width) stays whole."""
    path = export(name, exporter)
    original = onnx.load(path)
    r = spa.prune(path, ratio=0.5, criterion="l1", round_to=1, verify=True)
    rep = r.report
    assert rep["verify"]["ok"], rep["verify"]
    assert not rep["blocked_nodes"], rep["blocked_nodes"]
    kept_whole = [g["members"][:2] for g in rep["groups"] if not g["removed"]]
    assert not kept_whole, kept_whole
    for b in rep["blocked"]:
        assert {x["kind"] for x in b["reasons"]} <= {"graph-input", "graph-output", "mixing"}, b
        if name == "unet2d":
            assert "mixing" not in {x["kind"] for x in b["reasons"]}, b
    before, after = _inits(original), _inits(r.model)

    # resnet blocks: both convs lose filters; the time projection loses the matching rows
    assert _removed(rep, "resnets.0.conv1.weight[0]") > 0
    assert _removed(rep, "resnets.0.time_emb_proj.weight[0]") > 0
    assert _removed(rep, "resnets.0.conv2.weight[0]") > 0
    # GroupNorm (exported as Reshape [N, 8, -1] -> InstanceNormalization -> Reshape): whole
    # groups go, so the per-group scale vectors shrink below 8 and stay whole vectors
    norms = [n for n in r.model.graph.node if n.op_type == "InstanceNormalization"]
    sizes = [after[n.input[1]][0] for n in norms]
    assert min(sizes) < 8 and max(sizes) <= 8, sizes
    # skip concats: every conv that reads a Concat of [h, skip] (up blocks) reads fewer channels
    producer = {o: n for n in original.graph.node for o in n.output}
    skip_convs = [n.input[1] for n in original.graph.node
                  if n.op_type == "Conv" and producer.get(n.input[0]) is not None
                  and producer[n.input[0]].op_type == "Concat"]
    assert len(skip_convs) >= 4
    for w in skip_convs:
        assert after[w][1] < before[w][1], w
    # the timestep-embedding MLP: its hidden neurons and its output width (read by every
    # resnet's time projection); the sinusoidal frequencies (cos and sin halves together)
    assert _removed(rep, "time_embedding.linear_1.weight[0]") > 0
    assert _removed(rep, "time_embedding.linear_2.weight[0]") > 0
    assert _removed(rep, "time_embedding.linear_1.weight[1]") > 0
    # attention: whole heads, self-attention and (conditional UNet) cross-attention
    heads = [g for g in rep["groups"] if g["kind"] == "heads"]
    assert len(heads) == (4 if name == "unet2d" else 8) and all(g["removed"] == 1 for g in heads)
    if name == "unet2d_cond":
        cross_k = {n.input[1] for n in original.graph.node
                   if n.op_type == "MatMul" and n.input[0] == "encoder_hidden_states"}
        assert len(cross_k) >= 6     # K and V of at least three cross-attentions
        cross = [g for g in heads if any(m.split("[")[0] in cross_k for m in g["members"])]
        assert len(cross) >= 3
        for w in cross_k:   # [cross_attention_dim, heads x head_dim]: one of two heads left
            assert after[w] == [before[w][0], before[w][1] // 2], w

    # the pruned model runs on its own, and costs less
    feeds = {k: v.numpy() for k, v in unets.example_inputs(name).items()}
    out = _run(r.model, feeds)
    assert out.shape == _run(original, feeds).shape and np.isfinite(out).all()
    assert rep["after"]["macs"] < 0.45 * rep["before"]["macs"]
    assert rep["after"]["params"] < 0.45 * rep["before"]["params"]


@pytest.mark.parametrize("name", MODELS)
def test_default_rounding_prunes_groupnorm_blocks(export, name):
    """At the default rounding (a multiple of 8 filters) the resnet blocks still lose whole
    GroupNorm groups: 8 groups of 4 or 8 filters are 8 channels of their group."""
    path = export(name, "dynamo")
    for ratio in (0.3, 0.5):
        rep = spa.prune(path, ratio=ratio, criterion="l1", verify=True).report
        assert rep["verify"]["ok"], rep["verify"]
        assert _removed(rep, "resnets.0.conv1.weight[0]") > 0
        assert rep["after"]["macs"] < (0.8 if ratio == 0.3 else 0.6) * rep["before"]["macs"], ratio


def test_default_criterion(export):
    """OBSPA (data-free, the default) compensates through the UNet and the oracle holds."""
    r = spa.prune(export("unet2d_cond", "legacy"), ratio=0.3, verify=True)
    rep = r.report
    assert rep["verify"]["ok"], rep["verify"]
    assert rep["data"]["hessian_source"].startswith("synthetic")
    assert rep["after"]["macs"] < 0.8 * rep["before"]["macs"]
