"""Real torchvision models, exported in the test run with both exporters, pruned with the oracle."""

import pytest

import spa

pytestmark = pytest.mark.zoo

MODELS = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "shufflenet_v2_x1_0",
          "squeezenet1_1", "googlenet", "regnet_y_400mf", "convnext_tiny", "mnasnet0_5"]
IMAGE_SIZE = 96  # small inputs keep the oracle runs quick; the graphs are the same


@pytest.fixture(scope="module")
def zoo():
    return pytest.importorskip("torchvision_zoo", reason="needs torch and torchvision (test extras)")


@pytest.mark.parametrize("exporter", ["legacy", "dynamo"])
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model(zoo, zoo_dir, name, exporter):
    path = zoo.export(name, exporter, zoo_dir, image_size=IMAGE_SIZE)
    for ratio in (0.3, 0.5):
        result = spa.prune(path, ratio=ratio, criterion="l1", verify=True)
        rep = result.report
        assert rep["verify"]["ok"], rep["verify"]
        assert not rep["blocked_nodes"], rep["blocked_nodes"]
        # every model here has a CNN body: pruning must remove a real share of its compute
        assert rep["after"]["macs"] < (0.85 if ratio == 0.3 else 0.75) * rep["before"]["macs"], (name, ratio)


def test_dynamo_export_with_external_data_as_users_get_it(zoo, tmp_path, capsys):
    """torch.onnx.export(dynamo=True) writes the weights to model.onnx.data by default:
    default options must prune it, verify it, write a loadable model and leave the input
    and its data file untouched."""
    import hashlib

    import onnxruntime as ort
    import torch

    from spa.cli.commands import main
    model, x = zoo.build("resnet18", IMAGE_SIZE)
    path = tmp_path / "model.onnx"
    with zoo._quiet():
        torch.onnx.export(model.eval(), (x,), str(path), dynamo=True)
    data = tmp_path / "model.onnx.data"
    assert data.exists()
    digest = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (path, data)}
    out = tmp_path / "small.onnx"
    assert main(["prune", str(path), "-o", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "verified" in stdout
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    assert {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (path, data)} == digest
