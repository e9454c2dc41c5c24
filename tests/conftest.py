import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from helpers import SHIPPED, model_path  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(scope="session")
def shipped_models():
    """{name: ModelProto} of every shipped model (read-only: copy before editing)."""
    return {name: onnx.load(str(model_path(name))) for name in SHIPPED}


@pytest.fixture(params=SHIPPED)
def shipped(request):
    return request.param
