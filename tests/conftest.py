import sys
from pathlib import Path

import pytest

# tests import their small shared builders (tiny.py, zoo.py, engines.py) by module name
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def mlp_path(tmp_path_factory) -> Path:
    """A small baked MLP: 64 -> 128 -> 128 -> 10 (the reliability tests: hostile bytes, threads, memory)."""
    torch = pytest.importorskip("torch")
    from stn_edge.host import bake

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 128), torch.nn.ReLU(),
                                torch.nn.Linear(128, 10))
    path = tmp_path_factory.mktemp("rel") / "mlp.stn"
    bake(model, torch.randn(2, 64), path, calibration=torch.randn(16, 64), importance="spectral", progress=False)
    return path
