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
