"""Opset upgrade: never to an op version the runtime has no kernel for (asked of onnxruntime itself)."""

import numpy as np
import onnx
from helpers import apply_passes, assert_close, run_ort
from onnx import TensorProto, helper

from lmc.core import ir, shapes
from lmc.compiler.build import BuildOptions, build
from lmc.core.pass_manager import PassContext
from lmc.passes import upgrade_opset
from lmc.passes.upgrade_opset import UpgradeOpset, runtime_blockers


def _roi_align_model(opset=13):
    rois = np.array([[0, 0, 4, 4], [2, 2, 7, 7]], np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("RoiAlign", ["h", "rois", "batch"], ["r"], output_height=2, output_width=2,
                              sampling_ratio=2),
             helper.make_node("Sigmoid", ["r"], ["y"])]
    graph = helper.make_graph(nodes, "roi", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 2, 2])],
                              [onnx.numpy_helper.from_array(rois, "rois"),
                               onnx.numpy_helper.from_array(np.zeros(2, np.int64), "batch")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def test_roi_align_keeps_its_opset_and_the_build_verifies(tmp_path):
    model = _roi_align_model()
    onnx.save(model, str(tmp_path / "roi.onnx"))
    result = build(tmp_path / "roi.onnx", BuildOptions(target="x86-64"), tmp_path / "out")
    assert result.verification.passed
    out = onnx.load(str(tmp_path / "out" / "model.onnx"))
    assert {o.domain: o.version for o in out.opset_import}[""] == 13
    record = next(r for r in result.records if r.name == "upgrade-opset")
    assert not record.modified and any("RoiAlign" in n for n in record.notes)
    x = np.random.default_rng(0).standard_normal((1, 3, 8, 8)).astype(np.float32)
    assert_close(run_ort(model, {"x": x}), run_ort(tmp_path / "out" / "model.onnx", {"x": x}))


def test_runtime_probe_blocks_an_op_without_a_kernel_even_when_the_hand_list_allows_it(monkeypatch):
    """Were RoiAlign listed as unchanged again, onnxruntime itself still refuses RoiAlign-22."""
    monkeypatch.setattr(upgrade_opset, "UNCHANGED_MEANING", upgrade_opset.UNCHANGED_MEANING | {"RoiAlign"})
    graph = ir.to_graph(_roi_align_model())
    shapes.infer_shapes(graph)
    assert upgrade_opset.blockers(graph, 23) == []
    missing = runtime_blockers(graph, 23)
    assert list(missing) == ["RoiAlign"] and "RoiAlign" in missing["RoiAlign"]
    result = UpgradeOpset(23).run(graph, PassContext())
    assert not result.modified and int(graph.opset) == 13
    assert "no kernel" in result.notes[0] and "RoiAlign" in result.notes[0]


def test_probes_are_cached_and_only_for_ops_whose_version_changes(monkeypatch):
    import lmc.core.runtime as runtime

    calls = []
    real = runtime.session

    def counting(model, *args, **kwargs):
        calls.append(model.graph.node[0].op_type)
        return real(model, *args, **kwargs)

    monkeypatch.setattr(runtime, "session", counting)
    monkeypatch.setattr(upgrade_opset, "_PROBE_CACHE", {})
    nodes = [helper.make_node("Exp", ["x"], ["e"]),                       # Exp-13 is still current at 23
             helper.make_node("ReduceMean", ["e"], ["m"], axes=[1]),       # axes become an input at 18
             helper.make_node("Relu", ["m"], ["r1"]),
             helper.make_node("Relu", ["r1"], ["y"])]                      # Relu-14: probed once
    model = helper.make_model(helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 1])]),
                              opset_imports=[helper.make_opsetid("", 13)])
    graph, records = apply_passes(model, [UpgradeOpset(23)])
    assert int(graph.opset) == 23
    assert "Exp" not in calls and calls.count("Relu") == 1 and calls.count("ReduceMean") == 1
    apply_passes(model, [UpgradeOpset(23)])
    assert len(calls) == 2                                                 # second run: all from the cache
    x = np.random.default_rng(1).standard_normal((2, 8)).astype(np.float32)
    assert_close(run_ort(model, {"x": x}), run_ort(ir.to_model(graph), {"x": x}))
