"""fold_constants: shape chains fold once shapes are bound; blow-ups are refused; failures are reported."""

from __future__ import annotations

import numpy as np
import onnx
from helpers import apply_passes, assert_pass_exact, op_count, token_feed
from onnx import TensorProto, helper

from lmc.core.pass_manager import FixedPoint
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
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    c = helper.make_node("Constant", [], ["c"], value=helper.make_tensor("c", TensorProto.FLOAT, [4], [1, 2, 3, 4]))
    two = helper.make_node("Constant", [], ["two"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [2.0]))
    index = helper.make_node("Constant", [], ["index"], value=helper.make_tensor("i", TensorProto.INT64, [1], [10]))
    doubled = helper.make_node("Mul", ["c", "two"], ["c2"], name="double")
    broken = helper.make_node("Gather", ["c2", "index"], ["m"], name="out_of_bounds")     # index 10 of 4
    add = helper.make_node("Add", ["x", "m"], ["y"])
    graph = helper.make_graph([c, two, index, doubled, broken, add], "fail", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    graph, records = apply_passes(model, [FoldConstants()])
    assert [n.name for n in graph.nodes if n.op == "Gather"] == ["out_of_bounds"]
    assert op_count(graph, "Mul") == 0                 # what could fold, did
    assert records[0].stats["eval_failures"] == 1
    assert any("out_of_bounds" in n and "failed to evaluate" in n for n in records[0].notes)
    folded_input = next(n for n in graph.nodes if n.op == "Gather").inputs[0]
    assert np.allclose(folded_input.values, [2, 4, 6, 8])


def _quantized_model(opset: int = 17) -> onnx.ModelProto:
    """A model that arrives quantized: y = x · DequantizeLinear(int8 W [64, 96], per-column scales) + b."""
    rng = np.random.default_rng(0)
    w = rng.integers(-127, 128, (64, 96)).astype(np.int8)
    scale = ((rng.random(96) + 0.5) / 127).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(w, "w_q"), onnx.numpy_helper.from_array(scale, "w_scale"),
             onnx.numpy_helper.from_array(rng.standard_normal(96).astype(np.float32), "b")]
    nodes = [helper.make_node("DequantizeLinear", ["w_q", "w_scale"], ["w"], axis=1),
             helper.make_node("MatMul", ["x", "w"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16, 64])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 16, 96])
    return helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], inits),
                             opset_imports=[helper.make_opsetid("", opset)])


def test_quantize_dequantize_and_custom_domain_ops_are_not_folded():
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 16, 64)).astype(np.float32)}
    graph, _ = assert_pass_exact(_quantized_model(), [FoldConstants(), Cleanup()], feeds)
    assert op_count(graph, "DequantizeLinear") == 1
    assert [c.dtype for c in graph.nodes[0].inputs[:1]] == [np.int8]
    # a float weight quantized in the graph (Q -> DQ) stays so, and a contrib op of constants stays an op
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8])
    inits = [onnx.numpy_helper.from_array(np.linspace(-1, 1, 8).astype(np.float32), "w"),
             onnx.numpy_helper.from_array(np.float32(1 / 64), "s"), onnx.numpy_helper.from_array(np.int8(0), "z")]
    nodes = [helper.make_node("QuantizeLinear", ["w", "s", "z"], ["q"]),
             helper.make_node("DequantizeLinear", ["q", "s", "z"], ["dq"]),
             helper.make_node("QuickGelu", ["dq"], ["g"], domain="com.microsoft", alpha=1.702),
             helper.make_node("Add", ["x", "g"], ["y"])]
    model = helper.make_model(helper.make_graph(nodes, "qdq", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    graph, _ = assert_pass_exact(model, [FoldConstants(), Cleanup()], {"x": np.ones(8, np.float32)})
    assert [n.op for n in graph.nodes] == ["QuantizeLinear", "DequantizeLinear", "QuickGelu", "Add"]


def test_model_that_arrives_quantized_stays_quantized_through_build(tmp_path):
    from helpers import assert_close, run_ort

    from lmc.compiler.build import BuildOptions, build

    path = tmp_path / "qdq.onnx"
    onnx.save(_quantized_model(), str(path))
    out = tmp_path / "out"
    result = build(path, BuildOptions(target="cortex-a55"), out)
    bundle = onnx.load(str(out / "model.onnx"))
    int8 = [t for t in bundle.graph.initializer if t.data_type == TensorProto.INT8 and list(t.dims) == [64, 96]]
    assert len(int8) == 1 and sum(n.op_type == "DequantizeLinear" for n in bundle.graph.node) == 1
    assert result.weight_bytes_after <= result.weight_bytes_before
    assert not any(t.data_type == TensorProto.FLOAT and list(t.dims) == [64, 96] for t in bundle.graph.initializer)
    feeds = {"x": np.random.default_rng(2).standard_normal((2, 16, 64)).astype(np.float32)}
    assert_close(run_ort(path, feeds), run_ort(out / "model.onnx", feeds), rel=1e-5)
    assert result.verification.passed
