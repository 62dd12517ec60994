import sys
from pathlib import Path

import onnx
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from lmc.models import build_cnn, build_gpt2, build_llama  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared"
LLAMA_CODE = SHARED / "models" / "llama-code.onnx"


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("models")
    onnx.save(build_llama(), str(d / "tiny-llama.onnx"))
    onnx.save(build_gpt2(), str(d / "tiny-gpt2.onnx"))
    onnx.save(build_cnn(), str(d / "small-cnn.onnx"))
    return d


@pytest.fixture(scope="session")
def llama_code() -> Path:
    if not LLAMA_CODE.is_file():
        pytest.skip("shared/models/llama-code.onnx is not present")
    return LLAMA_CODE


def pytest_configure(config):
    config.addinivalue_line("markers", "packaging: builds the wheel with pip (a few seconds; under 60 s)")
