"""share_transposed: a weight stored again transposed is stored once; near-transposes are not merged."""

from __future__ import annotations

import numpy as np
from helpers import apply_passes, assert_pass_exact, token_feed
from onnx import TensorProto, helper, numpy_helper

from lmc.core import ir
from lmc.models import build_gpt2, build_llama
from lmc.passes.cleanup import Cleanup
from lmc.passes.share_transposed import ShareTransposedWeights, is_transpose


def test_tied_embedding_is_stored_once_llama():
    model = build_llama()
    graph, records = assert_pass_exact(model, [ShareTransposedWeights(), Cleanup()], token_feed(1, 16),
                                       {"input_ids": (1, 16)})
    names = {c.name for c in ir.constants(graph)}
    assert "emb.weight" in names and "lm_head.weight_t" not in names
    assert records[0].stats["bytes_saved"] == 256 * 64 * 4
    assert any(n.op == "FusedMatMul" and n.domain == "com.microsoft" for n in graph.nodes)


def test_without_contrib_ops_the_gather_side_is_rewritten():
    graph, _ = assert_pass_exact(build_gpt2(), [ShareTransposedWeights(), Cleanup()], token_feed(1, 8),
                                 {"input_ids": (1, 8)}, target="cortex-m55")
    names = {c.name for c in ir.constants(graph)}
    assert "lm_head.weight_t" in names and "wte.weight" not in names
    assert not any(n.domain == "com.microsoft" for n in graph.nodes)


def test_gemm_transb_flip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(w.T.copy(), "wt")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])
    x2 = helper.make_tensor_value_info("x2", TensorProto.FLOAT, [4, 32])
    y1 = helper.make_tensor_value_info("y1", TensorProto.FLOAT, [4, 32])
    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4, 16])
    nodes = [helper.make_node("Gemm", ["x", "w"], ["y1"], transB=1), helper.make_node("Gemm", ["x2", "wt"], ["y2"], transB=1)]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, x2], [y1, y2], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": rng.standard_normal((4, 16)).astype(np.float32), "x2": rng.standard_normal((4, 32)).astype(np.float32)}
    graph, records = assert_pass_exact(model, [ShareTransposedWeights(min_bytes=0), Cleanup()], feeds)
    assert len(ir.constants(graph)) == 1


def test_inexact_transpose_is_not_merged():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((32, 16)).astype(np.float32)
    wt = w.T.copy()
    wt[7, 9] = np.nextafter(wt[7, 9], np.float32(np.inf))    # one ulp off
    assert not is_transpose(w, wt)
    inits = [numpy_helper.from_array(w, "w"), numpy_helper.from_array(wt, "wt")]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 16])
    ids = helper.make_tensor_value_info("ids", TensorProto.INT64, [4])
    y1 = helper.make_tensor_value_info("y1", TensorProto.FLOAT, [4, 32])
    y2 = helper.make_tensor_value_info("y2", TensorProto.FLOAT, [4, 16])
    nodes = [helper.make_node("MatMul", ["x", "wt"], ["y1"]), helper.make_node("Gather", ["w", "ids"], ["y2"])]
    model = helper.make_model(helper.make_graph(nodes, "g", [x, ids], [y1, y2], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    graph, records = apply_passes(model, [ShareTransposedWeights(min_bytes=0)])
    assert len(ir.constants(graph)) == 2 and not records[0].modified
