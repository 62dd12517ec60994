"""fold_constants: shape chains fold once shapes are bound; blow-ups are refused; failures are reported."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import apply_passes, assert_pass_exact, op_count, token_feed
from onnx import TensorProto, helper

from lmc.compiler.pass_manager import FixedPoint
from lmc.models import build_gpt2, build_llama
from lmc.passes.cleanup import Cleanup
from lmc.passes.fold_constants import FoldConstants


def test_export_shape_chains_fold_on_llama():
    model = build_llama()
    graph, records = assert_pass_exact(model, [FixedPoint("fold", [FoldConstants(), Cleanup()])],
                                       token_feed(1, 16), {"input_ids": (1, 16)})
    for op in ("Shape", "Constant", "Trilu", "Equal", "Where", "Cast", "Unsqueeze", "Concat", "Expand"):
        remaining = op_count(graph, op)
        if op in ("Unsqueeze", "Concat"):
            continue  # RoPE's Concat and repeat_kv's Unsqueeze operate on activations
        assert remaining == 0, f"{remaining} {op} left"
    assert records[0].stats["nodes_folded"] > 100


def test_range_and_slice_on_constant_buffers_fold_on_gpt2():
    graph, _ = assert_pass_exact(build_gpt2(), [FixedPoint("fold", [FoldConstants(), Cleanup()])], token_feed(2, 8),
                                 {"input_ids": (2, 8)})
    assert op_count(graph, "Range") == 0 and op_count(graph, "Shape") == 0
    # the mask slices of the stored causal buffer became constants
    assert all(not (n.op == "Slice" and n.inputs[0].name == "attn.bias") for n in graph.nodes)


def _blowup_model() -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [512, 512])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [512, 512])
    shape = helper.make_node("Constant", [], ["shape"], value=helper.make_tensor("s", TensorProto.INT64, [2], [512, 512]))
    fill = helper.make_node("ConstantOfShape", ["shape"], ["ones"],
                            value=helper.make_tensor("v", TensorProto.FLOAT, [1], [2.0]))
    add = helper.make_node("Add", ["x", "ones"], ["y"])
    graph = helper.make_graph([shape, fill, add], "blowup", [x], [y])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_blowup_is_refused_and_reported():
    feeds = {"x": np.random.default_rng(0).standard_normal((512, 512)).astype(np.float32)}
    graph, records = assert_pass_exact(_blowup_model(), [FoldConstants(max_bytes=64 * 1024)], feeds)
    assert op_count(graph, "ConstantOfShape") == 1
    assert records[0].stats["refused_blowups"] == 1
    assert any("1048576-byte constant" in n for n in records[0].notes)


def test_blowup_within_limit_is_folded():
    feeds = {"x": np.ones((512, 512), dtype=np.float32)}
    graph, records = assert_pass_exact(_blowup_model(), [FoldConstants(max_bytes=2 << 20)], feeds)
    assert op_count(graph, "ConstantOfShape") == 0


def test_evaluation_failure_is_reported_not_hidden():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    c = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.FLOAT, [4], [1, 2, 3, 4]))
    two = helper.make_node("Constant", [], ["two"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [2.0]))
    doubled = helper.make_node("Mul", ["c", "two"], ["c2"], name="double")
    custom = helper.make_node("Mystery", ["c2"], ["m"], name="mystery", domain="com.example")
    add = helper.make_node("Add", ["x", "m"], ["y"])
    graph = helper.make_graph([c, two, doubled, custom, add], "fail", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    graph, records = apply_passes(model, [FoldConstants()])
    assert [n.name for n in graph.nodes if n.op == "Mystery"] == ["mystery"]
    assert op_count(graph, "Mul") == 0                 # what could fold, did
    assert records[0].stats["eval_failures"] == 1
    assert any("mystery" in n and "failed to evaluate" in n for n in records[0].notes)
    folded_input = next(n for n in graph.nodes if n.op == "Mystery").inputs[0]
    assert np.allclose(folded_input.values, [2, 4, 6, 8])
