"""Microcontroller targets: weights in flash, the arena in SRAM."""

from __future__ import annotations

import numpy as np
import onnx

from lmc.compiler.build import BuildOptions, QuantizeMode, build
from lmc.models import build_cnn
from lmc.targets.target import load_target


def test_cortex_m7_int8_cnn_fits_its_sram_with_weights_in_flash(tmp_path):
    target = load_target("cortex-m7")
    assert target.memory.ram_bytes == 512 * 1024 and target.memory.weights_placement.value == "flash"
    onnx.save(build_cnn(), str(tmp_path / "cnn.onnx"))
    calib = tmp_path / "calib.npz"
    np.savez(calib, image=np.random.default_rng(0).standard_normal((8, 1, 3, 32, 32)).astype(np.float32))
    result = build(tmp_path / "cnn.onnx", BuildOptions(target="cortex-m7", input_shapes={"image": (1, 3, 32, 32)},
                                                       quantize=QuantizeMode.W8A8, calib=str(calib)), tmp_path / "out")
    plan = result.plan
    assert plan.peak_ram_bytes <= 512 * 1024                   # the build's own budget check passed, and the plan says so
    assert plan.weights_bytes["flash"] > 0 and plan.weights_bytes["ram"] == 0
    assert result.weights_by_dtype.get("int8", 0) > result.weights_by_dtype.get("float32", 0)
    assert result.verification.outputs[0].cosine > 0.999
