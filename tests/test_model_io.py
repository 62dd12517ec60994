"""Loading: external data inside the model's folder only; the input is never modified."""

from __future__ import annotations

import onnx
import pytest
from onnx import external_data_helper

from lmc.compiler.errors import ModelLoadError
from lmc.compiler.model_io import load_model
from lmc.models import build_cnn


def _save_external(model, folder, location):
    external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True, location=location,
                                                        size_threshold=0)
    path = folder / "m.onnx"
    onnx.save(model, str(path))
    return path


def test_external_data_loads(tmp_path):
    path = _save_external(build_cnn(), tmp_path, "weights.bin")
    model = load_model(path)
    assert all(not external_data_helper.uses_external_data(t) for t in model.graph.initializer)


@pytest.mark.parametrize("location", ["../escape.bin", "/etc/passwd", "sub/../../x.bin"])
def test_escaping_locations_are_refused(tmp_path, location):
    path = _save_external(build_cnn(), tmp_path, "weights.bin")
    model = onnx.load(str(path), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = location
    onnx.save(model, str(path))
    with pytest.raises(ModelLoadError, match="location|escapes|absolute"):
        load_model(path)


def test_external_data_past_end_is_refused(tmp_path):
    path = _save_external(build_cnn(), tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(b"\0" * 16)
    with pytest.raises(ModelLoadError, match="beyond the end"):
        load_model(path)


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="no such file"):
        load_model(tmp_path / "nope.onnx")
