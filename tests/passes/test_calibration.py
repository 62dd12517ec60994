"""--calib layout: [N, *input_shape] (documented) and [N, *input_shape[1:]] (batch dim added); mismatches are
user errors naming the input, the expected and the given shape."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from lmc.compiler.cli import main
from lmc.core.errors import LmcError
from lmc.models import build_llama
from lmc.passes.quantize.calibration import load_calibration


def run(args, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("calib")
    onnx.save(build_llama(), str(d / "llama.onnx"))
    return d / "llama.onnx"


def _calib(path, arr):
    np.savez(path, input_ids=arr)
    return str(path)


@pytest.mark.parametrize("layout", [(6, 1, 16), (6, 16)])
def test_documented_and_batchless_layouts_build(llama, tmp_path, capsys, layout):
    calib = _calib(tmp_path / "c.npz", np.random.default_rng(0).integers(0, 64, layout).astype(np.int64))
    code, out, err = run(["build", str(llama), "--input-shape", "input_ids=1x16", "--quantize", "int4",
                          "--calib", calib, "-o", str(tmp_path / "out"), "--no-verify"], capsys)
    assert code == 0, err
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_load_calibration_samples_have_the_input_shape(tmp_path):
    documented = _calib(tmp_path / "a.npz", np.arange(3 * 1 * 8).reshape(3, 1, 8))
    batchless = _calib(tmp_path / "b.npz", np.arange(3 * 8).reshape(3, 8))
    for path in (documented, batchless):
        samples = load_calibration(path, ["input_ids"], 2, shapes={"input_ids": (1, 8)},
                                   dtypes={"input_ids": np.int64})
        assert len(samples) == 2
        assert all(s["input_ids"].shape == (1, 8) and s["input_ids"].dtype == np.int64 for s in samples)
        np.testing.assert_array_equal(samples[1]["input_ids"][0], np.arange(8, 16))


def test_generation_call_without_shapes_keeps_token_rows(tmp_path):
    path = _calib(tmp_path / "g.npz", np.arange(4 * 16).reshape(4, 16))
    samples = load_calibration(path, ["input_ids"], 32)
    assert len(samples) == 4 and samples[0]["input_ids"].shape == (16,)


@pytest.mark.parametrize("arr, match", [
    (np.zeros((4, 1, 32), np.int64), r"input_ids.*\[1, 32\].*\[1, 16\]"),
    (np.zeros((4, 2, 16), np.int64), r"input_ids.*\[2, 16\].*\[1, 16\]"),
    (np.zeros((4, 1, 16), np.float32), r"input_ids.*float32.*int64"),
    (np.zeros((0, 1, 16), np.int64), r"input_ids.*N ≥ 1"),
])
def test_mismatches_are_user_errors(tmp_path, arr, match):
    path = _calib(tmp_path / "bad.npz", arr)
    with pytest.raises(LmcError, match=match):
        load_calibration(path, ["input_ids"], 8, shapes={"input_ids": (1, 16)}, dtypes={"input_ids": np.int64})


def test_cli_wrong_calibration_shape_is_exit_2_naming_the_input(llama, tmp_path, capsys):
    calib = _calib(tmp_path / "c.npz", np.zeros((4, 1, 32), np.int64))
    code, _, err = run(["build", str(llama), "--input-shape", "input_ids=1x16", "--quantize", "int8",
                        "--calib", calib, "-o", str(tmp_path / "out"), "--no-verify"], capsys)
    assert code == 2 and "input_ids" in err and "[1, 16]" in err and "[1, 32]" in err
    assert len(err.strip().splitlines()) == 1 and not (tmp_path / "out").exists()


def test_corrupt_calibration_file_is_exit_2(llama, tmp_path, capsys):
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"PK\x03\x04 not a zip at all")
    code, _, err = run(["build", str(llama), "--input-shape", "input_ids=1x16", "--quantize", "int8",
                        "--calib", str(bad), "-o", str(tmp_path / "out"), "--no-verify"], capsys)
    assert code == 2 and "bad.npz" in err
