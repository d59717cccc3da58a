"""The plan goes back to PyTorch: export -> spa prune --plan -> spa.torch.apply_plan -> export
again; the re-exported model computes what spa's pruned ONNX computes."""

import json

import numpy as np
import onnxruntime as ort
import pytest

torch = pytest.importorskip("torch", reason="needs torch (test extras)")
zoo = pytest.importorskip("torchvision_zoo", reason="needs torchvision (test extras)")
import torchvision  # noqa: E402  (after torchvision_zoo defined its ops)

import spa  # noqa: E402
import spa.torch  # noqa: E402
from spa.cli.commands import main  # noqa: E402

RTOL = 1e-5


def _export(model, inputs: dict, path, optimize=True):
    torch.onnx.export(model, tuple(inputs.values()), str(path), dynamo=True, external_data=False,
                      optimize=optimize, input_names=list(inputs), output_names=["output"])
    return path


def _run(path, inputs: dict):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def round_trip(model, inputs, tmp_path, optimize=True, **prune_kw):
    """Prune the export with spa, apply the plan to ``model``, check torch and a re-export
    against spa's pruned ONNX."""
    src = _export(model, inputs, tmp_path / "model.onnx", optimize)
    result = spa.prune(src, **prune_kw)
    result.save(tmp_path / "pruned.onnx")
    result.save_plan(tmp_path / "plan.json")
    applied = spa.torch.apply_plan(model, tmp_path / "plan.json")
    want = _run(tmp_path / "pruned.onnx", inputs)
    with torch.no_grad():
        got = model(*inputs.values())
    got = (got if isinstance(got, torch.Tensor) else got[0]).numpy()
    assert got.shape == want.shape and _rel(got, want) < RTOL
    again = _run(_export(model, inputs, tmp_path / "again.onnx"), inputs)
    assert _rel(again, want) < RTOL
    return result, applied


def _params(model):
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name,optimize,criterion", [
    ("resnet18", True, "l1"),            # the exporter folds BatchNorm into the convs
    ("resnet18", False, "obspa"),        # every tensor kept as it is: OBSPA's value changes go back too
    ("mobilenet_v3_small", True, "l1"),  # depthwise groups, squeeze-excitation, zero biases dropped
    ("efficientnet_b0", True, "l1"),     # the same, with SiLU and stochastic-depth blocks
])
def test_torchvision_round_trip(tmp_path, name, optimize, criterion):
    torch.manual_seed(0)
    model = getattr(torchvision.models, name)().eval()
    before = _params(model)
    result, applied = round_trip(model, {"x": torch.randn(2, 3, 64, 64)}, tmp_path, optimize,
                                 ratio=0.3, criterion=criterion, calib_samples=8)
    assert _params(model) < 0.85 * before and applied.modules
    if criterion == "obspa":
        doc = json.loads((tmp_path / "plan.json").read_text())
        assert any("delta" in t for t in doc["tensors"].values()) and doc["arrays"] == "plan.json.npz"
    if optimize:
        assert applied.inferred            # the folded BatchNorms followed their convs


class SmallNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1, bias=False)
        self.bn1 = torch.nn.BatchNorm2d(16)
        self.conv2 = torch.nn.Conv2d(16, 24, 3, padding=1)
        self.fc = torch.nn.Linear(24, 10)

    def forward(self, x):
        y = torch.relu(self.conv2(torch.relu(self.bn1(self.conv1(x)))))
        return self.fc(y.mean(dim=(2, 3)))


@pytest.mark.parametrize("kw", [{"ratio": 0.5, "steps": 2, "criterion": "obspa"},
                                {"macs": 0.5, "criterion": "l1"}])
def test_passes_compose(tmp_path, kw):
    """Several passes (steps, a measured budget's three steps): kept indices and value
    changes are composed into one change per tensor of the original."""
    torch.manual_seed(0)
    model = SmallNet().eval()
    result, _ = round_trip(model, {"x": torch.randn(2, 3, 16, 16)}, tmp_path, optimize=False, round_to=1,
                           calib_samples=8, **kw)
    assert len(result.plans) > 1 and model.conv1.out_channels < 16
    if kw["criterion"] == "l1":     # only slicing: any value change would be a wrongly composed index
        doc = json.loads((tmp_path / "plan.json").read_text())
        assert not any("delta" in t for t in doc["tensors"].values())


def _transformer(family):
    tz = pytest.importorskip("transformers_zoo", reason="needs transformers (test extras)")
    return tz.build(family)


@pytest.mark.parametrize("family,kw", [
    ("bert", {"heads": 0.5, "mlp": 0.5}),
    ("llama", {"heads": 0.5, "mlp": 0.5}),     # GQA: a key/value head goes with its query heads
    ("tv_vit_b_16", {"mlp": 0.5}),
])
def test_transformer_round_trip(tmp_path, family, kw):
    model, inputs = _transformer(family)
    before = _params(model)
    result, applied = round_trip(model, inputs, tmp_path, criterion="l1", **kw)
    assert _params(model) < before
    if "heads" in kw:
        removed = [g for g in result.report["groups"] if g["kind"] == "heads" and g["removed"]]
        assert removed, "no heads were removed: the test would not test them"


def test_multihead_attention_heads_are_refused_by_name(tmp_path):
    """torch.nn.MultiheadAttention ties its heads to the model width: removing heads cannot be
    expressed in it, and apply_plan says so, naming the module."""
    model, inputs = _transformer("tv_vit_b_16")
    src = _export(model, inputs, tmp_path / "model.onnx")
    result = spa.prune(src, heads=0.5)
    assert any(g["kind"] == "heads" and g["removed"] for g in result.report["groups"])
    result.save_plan(tmp_path / "plan.json")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(spa.SpaError, match="MultiheadAttention"):
        spa.torch.apply_plan(model, tmp_path / "plan.json")
    after = model.state_dict()        # a refused plan leaves the module as it was
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.in_features == m.weight.shape[1] for m in model.modules() if isinstance(m, torch.nn.Linear))


def test_folded_batchnorm_takes_value_changes(tmp_path):
    """BatchNorm folded into the convs (trained statistics; the exporter's defaults) and OBSPA's
    value changes (the default criterion): each change goes back through its BatchNorm
    (tests/test_torch_plan_folded.py has the cases one by one)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):       # statistics a trained model would have
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.uniform_(-0.5, 0.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    result, applied = round_trip(model, {"x": torch.randn(1, 3, 64, 64)}, tmp_path, ratio=0.3, calib_samples=8)
    assert applied.folded and applied.inferred and len(applied.through_bn) == 40     # 20 convs, weight and bias
    assert {"layer1.0.conv1.weight", "layer1.0.conv1.weight_bias"} <= set(applied.through_bn)
    assert applied.through_bn["layer1.0.conv1.weight_bias"] == "layer1.0.bn1"
    applied = spa.torch.apply_plan(torchvision.models.resnet18().eval(), tmp_path / "plan.json", updates=False)
    assert applied.folded and applied.inferred     # the slicing alone: the values of another module do not matter


def test_cli_writes_the_plan_and_a_wrong_module_is_refused(tmp_path, capsys):
    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    src = _export(model, {"x": torch.randn(1, 3, 32, 32)}, tmp_path / "model.onnx")
    plan = tmp_path / "plan.json"
    assert main(["prune", str(src), "-o", str(tmp_path / "o.onnx"), "--ratio", "0.3", "--plan", str(plan),
                 "--criterion", "l1", "-q"]) == 0
    doc = json.loads(plan.read_text())
    assert doc["format"] == "spa-plan" and doc["version"] == 1 and doc["source"]
    assert all(len(v["new_shape"]) == len(v["shape"]) for v in doc["tensors"].values())
    with pytest.raises(spa.SpaError, match="no counterpart"):
        spa.torch.apply_plan(torchvision.models.mobilenet_v3_small(), plan)
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--plan", str(src)]) == 2
    assert "never overwrites" in capsys.readouterr().err


def test_per_reader_changes_of_one_module_tensor_are_refused_by_what_they_are(tmp_path):
    """OBSPA changes a tensor several layers read (a LayerNorm bias in the legacy export)
    differently for each reader: apply_plan says so instead of guessing at folded BatchNorms,
    and applies the slicing alone when asked."""
    model, inputs = _transformer("bert")
    src = _export(model, inputs, tmp_path / "model.onnx")
    spa.prune(src, heads=0.5, mlp=0.5).save_plan(tmp_path / "plan.json")      # default: OBSPA
    with pytest.raises(spa.SpaError, match="read by several layers") as refused:
        spa.torch.apply_plan(model, tmp_path / "plan.json")
    assert "BatchNorm" not in str(refused.value)
    before = _params(model)
    spa.torch.apply_plan(model, tmp_path / "plan.json", updates=False)
    assert _params(model) < before
    with torch.no_grad():
        model(*inputs.values())
