"""Fusion rules on export-shaped graphs: each fused graph equals the original under onnxruntime, the
decomposed ops are gone, and a rule the target cannot run is reported, not applied."""

from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_pass_exact, op_count, token_feed
from onnx import TensorProto, helper, numpy_helper

from lmc.core.pass_manager import FixedPoint
from lmc.models import LlamaConfig, build_cnn, build_gpt2, build_llama
from lmc.passes.cleanup import Cleanup
from lmc.passes.fold_constants import FoldConstants
from lmc.passes.fold_matmul_scale import FoldMatMulScale
from lmc.passes.fuse.attention import AttentionRule
from lmc.passes.fuse.conv_activation import ConvActivationRule
from lmc.passes.fuse.conv_bn import ConvBatchNormRule
from lmc.passes.fuse.gelu import GeluRule
from lmc.passes.fuse.layer_norm import LayerNormRule
from lmc.passes.fuse.matmul_add import MatMulAddRule
from lmc.passes.fuse.rms_norm import RmsNormRule
from lmc.passes.fuse.rotary import RotaryRule
from lmc.passes.fuse.rule import FuseRules
from lmc.passes.fuse.silu import SiluRule
from lmc.passes.simplify_repeat import SimplifyRepeat
from lmc.passes.upgrade_opset import UpgradeOpset

FOLD = FixedPoint("fold", [FoldConstants(), Cleanup()])


def _stats(records, name):
    return next(r for r in records if r.name == name).stats


def test_llama_fuses_norms_silu_rotary_attention():
    cfg = LlamaConfig(heads=4, kv_heads=2)
    passes = [FOLD, SimplifyRepeat(), UpgradeOpset(),
              FuseRules("fuse", [RmsNormRule(), SiluRule(), RotaryRule()]), FoldMatMulScale(),
              FuseRules("late", [AttentionRule()]), Cleanup()]
    graph, records = assert_pass_exact(build_llama(cfg), passes, token_feed(2, 12), {"input_ids": (2, 12)}, rel=1e-4)
    for op in ("Pow", "ReduceMean", "Sqrt", "Softmax", "Sigmoid", "Neg", "Tile"):
        assert op_count(graph, op) == 0, op
    assert op_count(graph, "RMSNormalization") == 2 * cfg.layers + 1
    assert op_count(graph, "Attention") == cfg.layers
    assert op_count(graph, "RotaryEmbedding") == 2 * cfg.layers
    att = next(n for n in graph.nodes if n.op == "Attention")
    assert att.attrs["is_causal"] == 1 and att.inputs[1].shape[1] == cfg.kv_heads   # GQA kept un-repeated


def test_gpt2_fuses_layernorm_gelu_and_masked_attention():
    passes = [FOLD, UpgradeOpset(), FuseRules("fuse", [LayerNormRule(), GeluRule()]), FoldMatMulScale(),
              FuseRules("late", [AttentionRule()]), Cleanup()]
    graph, records = assert_pass_exact(build_gpt2(), passes, token_feed(1, 10), {"input_ids": (1, 10)}, rel=1e-4)
    for op in ("Erf", "ReduceMean", "Pow", "Sqrt", "Softmax", "Where"):
        assert op_count(graph, op) == 0, op
    assert op_count(graph, "LayerNormalization") == 5 and op_count(graph, "Gelu") == 2


def test_gpt2_with_runtime_attention_mask_stays_exact():
    from lmc.models import Gpt2Config

    passes = [FOLD, UpgradeOpset(), FuseRules("fuse", [LayerNormRule(), GeluRule()]), FoldMatMulScale(),
              FuseRules("late", [AttentionRule()]), Cleanup()]
    feeds = token_feed(2, 10)
    feeds["attention_mask"] = np.ones((2, 10), dtype=np.int64)
    feeds["attention_mask"][1, :3] = 0          # left padding on the second row
    graph, records = assert_pass_exact(build_gpt2(Gpt2Config(attention_mask=True)), passes, feeds,
                                 {"input_ids": (2, 10), "attention_mask": (2, 10)}, rel=1e-4)
    late = next(r for r in records if r.name == "late")
    assert op_count(graph, "Attention") == 0 and late.stats["attention.rejected"] == 2
    assert any("run-time attention mask" in n for n in late.notes)


def _elementwise_model(nodes, inits, shape=(2, 8, 16)):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, list(shape))
    return helper.make_model(helper.make_graph(nodes, "m", [x], [y], inits), opset_imports=[helper.make_opsetid("", 17)])


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value, dtype=np.float32), name)


@pytest.mark.parametrize("variant", ["reciprocal", "div", "mul-square", "weight-left"])
def test_rms_norm_variants(variant):
    w = _c("w", np.linspace(0.5, 1.5, 16))
    n = [helper.make_node("Mul", ["x", "x"], ["sq"]) if variant == "mul-square" else
         helper.make_node("Pow", ["x", "two"], ["sq"]),
         helper.make_node("ReduceMean", ["sq"], ["m"], axes=[-1], keepdims=1),
         helper.make_node("Add", ["eps", "m"], ["a"]), helper.make_node("Sqrt", ["a"], ["s"])]
    if variant == "reciprocal":
        n += [helper.make_node("Reciprocal", ["s"], ["inv"]), helper.make_node("Mul", ["inv", "x"], ["nrm"])]
    elif variant == "div":
        n += [helper.make_node("Div", ["x", "s"], ["nrm"])]
    else:
        n += [helper.make_node("Div", ["one", "s"], ["inv"]), helper.make_node("Mul", ["x", "inv"], ["nrm"])]
    n += [helper.make_node("Mul", ["w", "nrm"] if variant == "weight-left" else ["nrm", "w"], ["y"])]
    model = _elementwise_model(n, [w, _c("two", 2.0), _c("eps", 1e-6), _c("one", 1.0)])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8, 16)).astype(np.float32)}
    graph, records = assert_pass_exact(model, [FuseRules("fuse", [RmsNormRule()]), Cleanup()], feeds, rel=1e-5)
    assert [n.op for n in graph.nodes] == ["SimplifiedLayerNormalization"]   # opset 17: the contrib kernel
    assert graph.nodes[0].attrs["epsilon"] == pytest.approx(1e-6)


def test_gelu_tanh_form():
    n = [helper.make_node("Pow", ["x", "three"], ["cube"]), helper.make_node("Mul", ["cube", "k"], ["kc"]),
         helper.make_node("Add", ["x", "kc"], ["inner"]), helper.make_node("Mul", ["inner", "s2pi"], ["arg"]),
         helper.make_node("Tanh", ["arg"], ["t"]), helper.make_node("Add", ["t", "one"], ["t1"]),
         helper.make_node("Mul", ["x", "half"], ["hx"]), helper.make_node("Mul", ["hx", "t1"], ["y"])]
    inits = [_c("three", 3.0), _c("k", 0.044715), _c("s2pi", np.sqrt(2 / np.pi)), _c("one", 1.0), _c("half", 0.5)]
    feeds = {"x": np.random.default_rng(1).standard_normal((2, 8, 16)).astype(np.float32) * 3}
    graph, _ = assert_pass_exact(_elementwise_model(n, inits), [UpgradeOpset(), FuseRules("f", [GeluRule()]), Cleanup()],
                                 feeds, rel=1e-5)
    assert [(n.op, n.attrs.get("approximate")) for n in graph.nodes] == [("Gelu", "tanh")]


def test_cnn_conv_bn_and_activation_fold():
    passes = [FOLD, FuseRules("fuse", [ConvBatchNormRule()]), FuseRules("late", [ConvActivationRule()]), Cleanup()]
    feeds = {"image": np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)}
    graph, _ = assert_pass_exact(build_cnn(), passes, feeds, {"image": (2, 3, 32, 32)}, rel=1e-4)
    assert op_count(graph, "BatchNormalization") == 0
    assert op_count(graph, "FusedConv") == 5


def test_matmul_add_to_gemm_only_for_2d():
    rng = np.random.default_rng(0)
    inits = [_c("w", rng.standard_normal((16, 4))), _c("b", rng.standard_normal(4))]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [8, 16])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [8, 4])
    model = helper.make_model(helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["m"]),
                                                 helper.make_node("Add", ["b", "m"], ["y"])], "g", [x], [y], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    graph, _ = assert_pass_exact(model, [FuseRules("f", [MatMulAddRule()]), Cleanup()],
                                 {"x": rng.standard_normal((8, 16)).astype(np.float32)})
    assert [n.op for n in graph.nodes] == ["Gemm"]


def test_target_without_kernels_rejects_with_reason():
    passes = [FOLD, SimplifyRepeat(), UpgradeOpset(), FuseRules("fuse", [RmsNormRule(), SiluRule()]), FoldMatMulScale(),
              FuseRules("late", [AttentionRule()]), Cleanup()]
    graph, records = assert_pass_exact(build_llama(), passes, token_feed(1, 8), {"input_ids": (1, 8)},
                                       target="cortex-m55", rel=1e-4)
    assert op_count(graph, "Attention") == 0 and op_count(graph, "QuickGelu") == 0
    late = next(r for r in records if r.name == "late")
    assert late.stats["attention.matched"] > 0 and late.stats["attention.applied"] == 0
    assert any("Attention" in n and "opset" in n for n in late.notes)


def test_older_opset_export_is_upgraded_then_fused():
    model = build_gpt2()
    model.opset_import[0].version = 14
    passes = [FOLD, UpgradeOpset(), FuseRules("fuse", [LayerNormRule(), GeluRule()]), FoldMatMulScale(),
              FuseRules("late", [AttentionRule()]), Cleanup()]
    graph, records = assert_pass_exact(model, passes, token_feed(1, 8), {"input_ids": (1, 8)}, rel=1e-4)
    assert int(graph.opset) == 23
    assert op_count(graph, "LayerNormalization") == 5 and op_count(graph, "Attention") == 2


def test_layer_norm_without_an_upgrade_uses_the_runtime_schema():
    model = build_gpt2()
    model.opset_import[0].version = 14
    graph, _ = assert_pass_exact(model, [FOLD, FuseRules("fuse", [LayerNormRule()]), Cleanup()], token_feed(1, 8),
                                 {"input_ids": (1, 8)}, rel=1e-4)
    assert int(graph.opset) == 14 and op_count(graph, "LayerNormalization") == 5


def _residual_model(second_reader: bool, skip_shape=(2, 8, 16), opset=23):
    """y = RMSNorm(x + r)·w [, z = (x + r) + y]: the residual stream a decoder layer writes."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8, 16])
    r = helper.make_tensor_value_info("r", TensorProto.FLOAT, list(skip_shape))
    out = "z" if second_reader else "y"
    nodes = [helper.make_node("Add", ["x", "r"], ["s"]),
             helper.make_node("RMSNormalization", ["s", "w"], ["y"], axis=-1, epsilon=1e-5)]
    if second_reader:
        nodes.append(helper.make_node("Add", ["s", "y"], ["z"]))
    graph = helper.make_graph(nodes, "m", [x, r], [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              [_c("w", np.linspace(0.5, 1.5, 16))])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("second_reader", [True, False])
def test_residual_add_and_rms_norm_become_one_skip_norm(second_reader):
    from lmc.passes.fuse.skip_norm import SkipNormRule

    rng = np.random.default_rng(1)
    feeds = {k: rng.standard_normal((2, 8, 16)).astype(np.float32) for k in ("x", "r")}
    graph, _ = assert_pass_exact(_residual_model(second_reader), [FuseRules("rt", [SkipNormRule()]), Cleanup()],
                                 feeds, rel=1e-5)
    fused = [n for n in graph.nodes if n.op == "SkipSimplifiedLayerNormalization"]
    assert len(fused) == 1 and fused[0].domain == "com.microsoft" and op_count(graph, "RMSNormalization") == 0
    # the sum leaves as the fourth output only when the next residual reads it
    assert (len(fused[0].outputs) == 4 and fused[0].outputs[3].name == "s") if second_reader else \
        len(fused[0].outputs) == 1
    assert op_count(graph, "Add") == (1 if second_reader else 0)


def test_skip_norm_needs_operands_of_one_shape_and_the_target_kernel():
    from lmc.passes.fuse.skip_norm import SkipNormRule

    rng = np.random.default_rng(2)
    feeds = {"x": rng.standard_normal((2, 8, 16)).astype(np.float32),
             "r": rng.standard_normal((1, 8, 16)).astype(np.float32)}
    graph, records = assert_pass_exact(_residual_model(True, skip_shape=(1, 8, 16)),
                                       [FuseRules("rt", [SkipNormRule()]), Cleanup()], feeds, rel=1e-5)
    assert op_count(graph, "SkipSimplifiedLayerNormalization") == 0 and records[0].stats["skip-norm.rejected"] == 1
    feeds["r"] = rng.standard_normal((2, 8, 16)).astype(np.float32)
    graph, records = assert_pass_exact(_residual_model(True), [FuseRules("rt", [SkipNormRule()]), Cleanup()], feeds,
                                       target="cortex-m7", rel=1e-5)
    assert op_count(graph, "SkipSimplifiedLayerNormalization") == 0 and "no kernel" in " ".join(records[0].notes)
