"""Plan vs linker (lmc.targets.cbundle.linker): ``lmc build`` for a cortex-m target links the C bundle's image
with arm-none-eabi-gcc and records the linker's figures in plan.json["linker"] and report.md; a bundle whose
image breaks the plan (model.h's arena patched away from the plan's) fails the build; without the cross
toolchain the build records ``"linker": null`` and the reason."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import lmc.compiler.build as build_module
from lmc.compiler.build import BuildOptions, build
from lmc.core.errors import VerificationFailed
from lmc.targets.cbundle import linker
from lmc.targets.cbundle.board import GCC
from lmc.targets.cbundle.linker import LinkerFigures, unavailable

needs_gcc = pytest.mark.skipif(shutil.which(GCC) is None, reason=f"{GCC} not on PATH (scripts/setup-mcu.sh)")


def _model(path: Path) -> Path:
    """y = relu(x · W1) · W2: [1, 16] -> [1, 8], one intermediate in the arena."""
    rng = np.random.default_rng(3)
    w1 = numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1")
    w2 = numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32), "w2")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "mlp",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], [w1, w2])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


def _figures(**changes) -> LinkerFigures:
    base = dict(board="mps2-an500", toolchain="arm-none-eabi-gcc 12.2.1", plan_arena_bytes=256,
                header_arena_bytes=256, arena_bytes=256, ram_bytes=20_000, data_bytes=100, bss_bytes=7_000,
                heap_bytes=4096, stack_bytes=8192, flash_bytes=9_000, target="cortex-m7", target_ram_bytes=524_288,
                flash_capacity_bytes=4 << 20)
    return LinkerFigures(**{**base, **changes})


def test_figures_failures():
    assert _figures().failures() == ()
    assert "arena sizes disagree" in _figures(arena_bytes=264).failures()[0]
    assert "arena sizes disagree" in _figures(header_arena_bytes=264, arena_bytes=264).failures()[0]
    assert "over target cortex-m7's ram_bytes" in _figures(ram_bytes=600_000).failures()[0]
    assert "flash" in _figures(flash_bytes=5 << 20).failures()[0]
    assert _figures(plan_arena_bytes=0, header_arena_bytes=0, arena_bytes=1).failures() == ()   # C's 1-byte arena


def test_unavailable_reasons(monkeypatch):
    assert unavailable("x86-64").startswith("no emulated board")
    monkeypatch.setattr(linker.shutil, "which", lambda name: None)
    assert GCC in unavailable("cortex-m7")


def test_no_toolchain_records_null(tmp_path, monkeypatch):
    monkeypatch.setattr(linker.shutil, "which", lambda name: None)
    result = build(_model(tmp_path / "m.onnx"), BuildOptions(target="cortex-m7"), tmp_path / "out")
    assert result.cbundle is not None and result.linker is None and GCC in result.linker_skipped
    assert json.loads((tmp_path / "out" / "plan.json").read_text())["linker"] is None
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Plan vs linker" in report and "Not linked" in report


def test_onnx_bundle_has_no_linker_key(tmp_path):
    build(_model(tmp_path / "m.onnx"), BuildOptions(target="x86-64"), tmp_path / "out")
    assert "linker" not in json.loads((tmp_path / "out" / "plan.json").read_text())


@needs_gcc
def test_build_records_plan_vs_linker(tmp_path):
    result = build(_model(tmp_path / "m.onnx"), BuildOptions(target="cortex-m7"), tmp_path / "out")
    plan = json.loads((tmp_path / "out" / "plan.json").read_text())
    k = plan["linker"]
    assert k["arena_bytes"] == plan["arena_bytes"] == result.plan.arena_bytes > 0
    assert k["board"] == "mps2-an500" and k["toolchain"].startswith(GCC) and k["failures"] == []
    assert k["ram_bytes"] >= k["data_bytes"] + k["bss_bytes"] + k["heap_bytes"] + k["stack_bytes"]
    assert k["ram_bytes"] <= k["target_ram_bytes"] == 524_288 and 0 < k["flash_bytes"] <= k["flash_capacity_bytes"]
    report = (tmp_path / "out" / "report.md").read_text()
    assert "## Plan vs linker" in report and f"| {k['arena_bytes']:,} | {k['arena_bytes']:,} | ✓ |" in report


@needs_gcc
def test_arena_mismatch_fails_the_build(tmp_path, monkeypatch):
    real = build_module.emit_c

    def broken(graph, plan, target, folder):          # model.h's arena 8 bytes larger than the plan's
        written = real(graph, plan, target, folder)
        header = Path(folder) / "model.h"
        header.write_text(re.sub(r"#define LMC_ARENA_BYTES (\d+)",
                                 lambda m: f"#define LMC_ARENA_BYTES {int(m[1]) + 8}", header.read_text()))
        return written

    monkeypatch.setattr(build_module, "emit_c", broken)
    with pytest.raises(VerificationFailed, match="arena sizes disagree"):
        build(_model(tmp_path / "m.onnx"), BuildOptions(target="cortex-m7"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_an_image_over_the_ram_budget_does_not_fit_unless_max_ram_allows_it(tmp_path, monkeypatch):
    """Over the target's RAM: a one-line 'does not fit' (exit 2), not a failed verification — unless
    --max-ram raises the budget; an arena unlike the plan's stays a failed verification (exit 3)."""
    from lmc.core.errors import LmcError
    from lmc.targets.cbundle.emit import CBundle
    from lmc.targets.target import load_target

    target = load_target("cortex-m7")
    bundle = CBundle(files=(), families=(), macs=0, weight_bytes=0, arena_bytes=256)
    monkeypatch.setattr(build_module, "unavailable", lambda t: "")
    monkeypatch.setattr(build_module, "link_figures", lambda *a: _figures(ram_bytes=600_000))
    with pytest.raises(LmcError, match="does not fit cortex-m7") as info:
        build_module.link_check(bundle, target, tmp_path)
    assert not isinstance(info.value, VerificationFailed)
    figures, _ = build_module.link_check(bundle, target, tmp_path, max_ram=1 << 20)
    assert figures.ram_bytes == 600_000
    with pytest.raises(LmcError, match="does not fit"):
        build_module.link_check(bundle, target, tmp_path, max_ram=500_000)
    monkeypatch.setattr(build_module, "link_figures", lambda *a: _figures(arena_bytes=264))
    with pytest.raises(VerificationFailed, match="arena sizes disagree"):
        build_module.link_check(bundle, target, tmp_path, max_ram=1 << 20)
