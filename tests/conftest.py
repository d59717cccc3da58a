import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "models"))


@pytest.fixture(scope="session")
def zoo_dir(tmp_path_factory):
    """Where exported models are cached for the whole run (or across runs: $SPA_ZOO_CACHE)."""
    cache = os.environ.get("SPA_ZOO_CACHE")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        return Path(cache)
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(autouse=True)
def _inversion_only_where_tested(request, monkeypatch):
    """Without data, spa inverts a folded classifier for its statistics (spa/score/invert.py):
    seconds to a minute of torch per pruning. Only the tests of it pay that; elsewhere the
    classifiers keep the dead-leaves images, as where torch is not installed."""
    if request.module.__name__.rsplit(".", 1)[-1] != "test_invert":
        from spa.score import invert
        monkeypatch.setattr(invert, "INVERSION_BUDGET", 0.0)
