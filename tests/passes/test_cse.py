"""cse: repeated computations from the same inputs are computed once."""

import numpy as np
from helpers import assert_pass_exact, op_count
from onnx import TensorProto, helper

from lmc.passes.cleanup import Cleanup
from lmc.passes.cse import EliminateCommonSubexpressions


def test_duplicate_chains_merge_and_outputs_stay():
    nodes = [helper.make_node("Relu", ["x"], ["a1"]), helper.make_node("Relu", ["x"], ["a2"]),
             helper.make_node("Exp", ["a1"], ["b1"]), helper.make_node("Exp", ["a2"], ["b2"]),
             helper.make_node("Add", ["b1", "b2"], ["y"]),
             helper.make_node("Softmax", ["x"], ["s1"], axis=0), helper.make_node("Softmax", ["x"], ["s2"], axis=1),
             helper.make_node("Add", ["s1", "s2"], ["z"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [4, 4]) for n in ("y", "z")]
    model = helper.make_model(helper.make_graph(nodes, "g", [x], outs), opset_imports=[helper.make_opsetid("", 17)])
    graph, records = assert_pass_exact(model, [EliminateCommonSubexpressions(), Cleanup()],
                                       {"x": np.random.default_rng(0).standard_normal((4, 4)).astype(np.float32)})
    assert op_count(graph, "Relu") == 1 and op_count(graph, "Exp") == 1
    assert op_count(graph, "Softmax") == 2            # different attributes: not the same computation
