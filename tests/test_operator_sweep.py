"""Robustness: every 6th model of onnx's operator test cases that onnxruntime can load builds into a
bundle equal to the original, or fails with a user error (exit 2) — never an internal error."""

from __future__ import annotations

import warnings

import onnx
import onnxruntime as ort
import pytest

from lmc.compiler.build import BuildOptions, build
from lmc.core.errors import LmcError
from lmc.compiler.verify import VerificationFailed


def _cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from onnx.backend.test.case.node import collect_testcases

        return collect_testcases("")[::6]     # all of them: bench/bench_operators.py


@pytest.mark.parametrize("case", _cases(), ids=lambda c: c.name)
def test_operator_model_builds_or_is_refused_cleanly(case, tmp_path):
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(case.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    except Exception:
        pytest.skip("onnxruntime itself cannot load this model")
    path = tmp_path / "model.onnx"
    onnx.save(case.model, str(path))
    try:
        result = build(path, BuildOptions(target="x86-64"), tmp_path / "out")
    except VerificationFailed as exc:      # a miscompile, not a refusal
        pytest.fail(f"the bundle differs from the original: {exc}")
    except LmcError:
        assert not (tmp_path / "out").exists()
        return
    assert result.verification is not None and result.verification.passed
