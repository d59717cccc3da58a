"""The plan back onto a module whose BatchNorms the exporter folded into the convs (the defaults
of both exporters in eval mode), pruned with the defaults (OBSPA: value changes of the folded
weights and biases, new biases): ``apply_plan`` maps each change through its BatchNorm and the
module computes what spa's pruned ONNX computes. A small CNN with the cases of torchvision's
MobileNetV3 / EfficientNet / ResNet; ``benchmarks/folded_bn.py`` runs those models themselves."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs torch (test extras)")
nn = torch.nn

import onnxruntime as ort  # noqa: E402

import spa  # noqa: E402
import spa.torch  # noqa: E402

RTOL = 1e-5       # max |torch - spa's ONNX| / max |spa's ONNX|, as tests/test_torch_plan.py


def _run(path, inputs: dict):
    s = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return s.run(None, {k: v.numpy() for k, v in inputs.items()})[0]


def _rel(a, b):
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


class SE(nn.Module):
    def __init__(self, c, r):
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, r, 1), nn.Conv2d(r, c, 1)

    def forward(self, x):
        return x * torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean((2, 3), keepdim=True)))))


def cna(i, o, k=1, s=1, g=1, act=nn.Hardswish, bias=False, eps=1e-3, affine=True):
    """torchvision's Conv2dNormActivation: conv, BatchNorm, activation in an nn.Sequential."""
    return nn.Sequential(nn.Conv2d(i, o, k, s, k // 2, groups=g, bias=bias),
                         nn.BatchNorm2d(o, eps=eps, affine=affine), act())


class Block(nn.Module):
    """Inverted residual: expand, depthwise, squeeze-excitation, project (BatchNorm, no activation)."""

    def __init__(self, i, e, o, s):
        super().__init__()
        self.expand = cna(i, e)
        self.dw = cna(e, e, 3, s, e, act=nn.SiLU)
        self.se = SE(e, 4)
        self.project = nn.Sequential(nn.Conv2d(e, o, 1, bias=False), nn.BatchNorm2d(o))
        self.res = s == 1 and i == o

    def forward(self, x):
        y = self.project(self.se(self.dw(self.expand(x))))
        return x + y if self.res else y


class FoldNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = cna(3, 8, 3, act=nn.ReLU, bias=True)        # a conv with a bias of its own, then BN
        self.b1 = Block(8, 16, 8, 1)
        self.b2 = Block(8, 24, 12, 2)
        self.head = cna(12, 32, affine=False)                    # a BatchNorm without γ and β
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(self.head(self.b2(self.b1(self.stem(x)))).mean((2, 3)))


def trained_like(model, seed=0):
    """BatchNorm statistics, scales and shifts a trained model would have (folding is not the
    identity), and biases; kept at torchvision's init: the squeeze-excitation biases (zero: the
    dynamo exporter drops them, spa adds its own; the legacy one merges both fc1 biases into one
    tensor) and b2.project's BatchNorm shift and mean (a folded bias of zero: dropped, spa adds
    one to a folded conv)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
                if name != "b2.project.1":
                    m.running_mean.copy_(torch.rand(n, generator=g) - 0.5)
                if m.affine:
                    m.weight.copy_(torch.rand(n, generator=g) + 0.5)
                    if name != "b2.project.1":
                        m.bias.copy_(torch.rand(n, generator=g) - 0.5)
            elif isinstance(m, (nn.Conv2d, nn.Linear)) and m.bias is not None:
                m.bias.copy_(torch.rand(m.bias.shape, generator=g) - 0.5) if ".se." not in name else m.bias.zero_()
        if isinstance(model, FoldNet):
            # b1.project folds into the bias stem folds into (not zero): the legacy exporter
            # writes it as an Identity of stem's, and spa gives b1.project a bias of its own
            model.stem[0].bias.zero_()
            model.b1.project[1].load_state_dict(model.stem[1].state_dict())
            model.b1.project[1].eps = model.stem[1].eps
    return model


def _model():
    torch.manual_seed(0)
    return trained_like(FoldNet().eval())


INPUTS = {"x": torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))}


def _export(model, path, dynamo: bool):
    """The defaults: dynamo with optimize=True, or the legacy exporter in eval mode."""
    torch.onnx.export(model, tuple(INPUTS.values()), str(path), dynamo=dynamo, external_data=False,
                      input_names=list(INPUTS), output_names=["output"])
    return path


@pytest.fixture(scope="module", params=["dynamo", "legacy"])
def pruned(request, tmp_path_factory):
    """(folder, exporter): the exported FoldNet pruned with the defaults, its plan and pruned ONNX."""
    folder = tmp_path_factory.mktemp(request.param)
    src = _export(_model(), folder / "model.onnx", request.param == "dynamo")
    result = spa.prune(src, ratio=0.4, round_to=1, calib_samples=8)     # the default criterion: OBSPA
    result.save(folder / "pruned.onnx")
    result.save_plan(folder / "plan.json")
    return folder, request.param


def _plan(folder):
    doc = json.loads((folder / "plan.json").read_text())
    with np.load(folder / "plan.json.npz") as z:
        return doc, {k: z[k] for k in z.files}


def _write(folder, doc, arrays):
    np.savez(folder / "plan.json.npz", **arrays)
    (folder / "plan.json").write_text(json.dumps(doc))
    return folder / "plan.json"


def _forward(model):
    with torch.no_grad():
        return model(*INPUTS.values()).numpy()


def test_folded_round_trip(pruned, tmp_path):
    folder, exporter = pruned
    model = _model()
    applied = spa.torch.apply_plan(model, folder / "plan.json")
    want = _run(folder / "pruned.onnx", INPUTS)
    assert _rel(_forward(model), want) < RTOL
    again = _run(_export(model, tmp_path / "again.onnx", dynamo=True), INPUTS)
    assert _rel(again, want) < RTOL
    # the test tests something: changes of folded weights and biases, mapped through their BatchNorms
    doc, _ = _plan(folder)
    changed = {n for n, e in doc["tensors"].items() if "delta" in e}
    through = set(applied.through_bn)
    assert {"b1.expand.1", "b1.dw.1", "b2.dw.1", "head.1"} <= set(applied.through_bn.values())
    assert len(changed & through) >= 8 and not applied.exporter_only
    assert model.b1.dw[0].out_channels == model.b1.dw[1].num_features < 16
    assert model.head[0].bias is not None             # the change of head's folded bias, times σ
    # dynamo: the zero bias the exporter dropped (b2.project); legacy: the bias it wrote as an
    # Identity of another (b1.project): spa added its own, the whole new folded bias
    assert set(doc["added"]) & through, "no bias was added to a folded conv: that case is not tested"
    if exporter == "dynamo":
        assert model.b1.se.fc1.bias.abs().sum() > 0     # added where the module's bias was zero
    else:                         # the zero biases of b1.se.fc1 and b2.se.fc1 were one tensor
        assert set(applied.by_reader.values()) >= {"b1.se.fc1.bias", "b2.se.fc1.bias"} - set(applied.by_name)
        assert applied.by_reader


def test_a_batchnorm_close_to_the_identity_is_still_undone(tmp_path):
    """torchvision's init (γ = 1, β = μ = 0, var = 1, eps = 1e-5) folds into values within the
    matching tolerance of the conv's own: the closer of the two tells, the change goes through
    the BatchNorm (before, the conv's own values took it, off by σ)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()
    with torch.no_grad():
        model[4].running_var.fill_(1.5)         # σ far enough from 1 for an error to show
        model[1].running_var.fill_(1 - 1e-5 + 1e-6)
    src = _export(model, tmp_path / "m.onnx", dynamo=True)
    result = spa.prune(src, ratio=0.5, round_to=1, calib_samples=8)
    result.save(tmp_path / "p.onnx")
    result.save_plan(tmp_path / "plan.json")
    applied = spa.torch.apply_plan(model, tmp_path / "plan.json")
    assert "0.weight" in applied.by_name and applied.through_bn.get("0.weight") == "1"
    assert _rel(_forward(model), _run(tmp_path / "p.onnx", INPUTS)) < RTOL


def test_a_zero_batchnorm_scale_takes_no_filter_change(tmp_path):
    """Where γ = 0 a channel's output is its constant β: OBSPA leaves its folded filter (zero)
    unchanged, up to float noise, and the plan applies; a change there cannot be represented and
    is refused, naming the layer, its BatchNorm and the channel, before anything changes."""
    src = _export(_model_with_dead_channel(), tmp_path / "m.onnx", dynamo=True)
    result = spa.prune(src, ratio=0.4, round_to=1, calib_samples=8)
    result.save_plan(tmp_path / "plan.json")
    doc, arrays = _plan(tmp_path)
    entry = doc["tensors"]["b1.expand.0.weight"]
    kept = entry["kept"].get("0", list(range(16)))
    assert 3 in kept and "delta" in entry
    assert np.abs(arrays[entry["delta"]][kept.index(3)]).max() < 1e-12      # float noise at most
    spa.torch.apply_plan(_model_with_dead_channel(), tmp_path / "plan.json")

    arrays[entry["delta"]][kept.index(3)] += 0.5
    model = _model_with_dead_channel()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(spa.SpaError, match=r"output channel\(s\) \[3\] of b1.expand.0, whose BatchNorm b1.expand.1 "
                                           r"has weight 0"):
        spa.torch.apply_plan(model, _write(tmp_path, doc, arrays))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def _model_with_dead_channel():
    model = _model()
    with torch.no_grad():
        model.b1.expand[1].weight[3] = 0
    return model


def test_a_module_unlike_the_exported_one_is_refused(pruned):
    """A BatchNorm changed since the export: its folded values are not the plan's, so the conv's
    changes have nowhere exact to go; refused as before, nothing changed."""
    folder, _ = pruned
    model = _model()
    with torch.no_grad():
        model.b1.project[1].running_var.mul_(1.1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(spa.SpaError, match="does not hold as exported"):
        spa.torch.apply_plan(model, folder / "plan.json")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_a_plan_without_readers_says_to_write_it_again(pruned, tmp_path):
    """A plan from an older spa does not say which node reads which tensor: a folded bias is
    not found, and the refusal says what to do."""
    folder, _ = pruned
    doc, arrays = _plan(folder)
    for entry in doc["tensors"].values():
        entry.pop("readers", None)
    with pytest.raises(spa.SpaError, match="write it again"):
        spa.torch.apply_plan(_model(), _write(tmp_path, doc, arrays))


class TwoConvs(nn.Module):
    """conv2's output is the graph's output (never pruned): bn2 must not take conv1's channels."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)

    def forward(self, x):
        return self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x)))))


def test_a_batchnorm_follows_only_the_layer_right_before_it(tmp_path):
    """bn2 is registered after conv2, whose outputs are not cut; conv1's are. It used to take
    conv1's channels (the last layer cut before it) and the forward failed."""
    torch.manual_seed(0)
    model = trained_like(TwoConvs().eval())
    src = _export(model, tmp_path / "m.onnx", dynamo=True)
    result = spa.prune(src, ratio=0.5, round_to=1, calib_samples=8)
    result.save(tmp_path / "p.onnx")
    result.save_plan(tmp_path / "plan.json")
    applied = spa.torch.apply_plan(model, tmp_path / "plan.json")
    assert model.conv1.out_channels == model.bn1.num_features < 16 == model.bn2.num_features
    assert "bn2.running_mean" not in applied.inferred and applied.through_bn.get("conv2.weight") == "bn2"
    assert _rel(_forward(model), _run(tmp_path / "p.onnx", INPUTS)) < RTOL


def _mlp():
    return nn.Sequential(nn.Linear(12, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 24), nn.BatchNorm1d(24),
                         nn.ReLU(), nn.Linear(24, 5)), torch.randn(4, 12)


def _upsampler():
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.ConvTranspose2d(16, 12, 2, stride=2, bias=False), nn.BatchNorm2d(12), nn.ReLU(),
                         nn.Conv2d(12, 4, 1)), torch.randn(2, 3, 8, 8)


@pytest.mark.parametrize("build,folded", [(_mlp, {"0.weight": "1", "0.bias": "1", "3.bias": "4"}),
                                          (_upsampler, {"3.weight": "4", "3.weight_bias": "4"})])
def test_linear_and_transposed_conv_folds(tmp_path, build, folded):
    """The dynamo exporter folds BatchNorm into Gemm (a Linear's output features, axis 0) and
    ConvTranspose (its output channels are axis 1 of its weight) too."""
    torch.manual_seed(0)
    model, x = build()
    model = trained_like(model.eval())
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_var.uniform_(0.5, 2)
                m.running_mean.uniform_(-0.5, 0.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    torch.onnx.export(model, (x,), str(tmp_path / "m.onnx"), dynamo=True, external_data=False, input_names=["x"],
                      output_names=["y"])
    result = spa.prune(tmp_path / "m.onnx", ratio=0.4, round_to=1, calib_samples=8)
    result.save(tmp_path / "p.onnx")
    result.save_plan(tmp_path / "plan.json")
    applied = spa.torch.apply_plan(model, tmp_path / "plan.json")
    assert folded.items() <= applied.through_bn.items()
    with torch.no_grad():
        assert _rel(model(x).numpy(), _run(tmp_path / "p.onnx", {"x": x})) < RTOL
