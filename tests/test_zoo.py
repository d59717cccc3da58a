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
