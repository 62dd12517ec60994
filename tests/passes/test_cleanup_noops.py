"""cleanup and eliminate-noops: dead code and identity ops go, outputs and their names stay."""

from __future__ import annotations

import numpy as np
from helpers import assert_pass_exact, op_count
from onnx import TensorProto, helper, numpy_helper

from lmc.passes.cleanup import Cleanup
from lmc.passes.eliminate_noops import EliminateNoops


def test_noops_removed_and_output_names_kept():
    nodes = [helper.make_node("Identity", ["x"], ["a"]),
             helper.make_node("Dropout", ["a"], ["b"]),
             helper.make_node("Cast", ["b"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["c", "shape"], ["d"]),
             helper.make_node("Transpose", ["d"], ["e"], perm=[0, 1]),
             helper.make_node("Relu", ["e"], ["f"]),
             helper.make_node("Identity", ["f"], ["y"]),                  # graph output: its name must stay
             helper.make_node("Exp", ["x"], ["dead"])]                     # reaches no output
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y],
                                                [numpy_helper.from_array(np.array([2, 3], np.int64), "shape")]),
                              opset_imports=[helper.make_opsetid("", 17)])
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 3)).astype(np.float32)}
    graph, records = assert_pass_exact(model, [Cleanup(), EliminateNoops(), Cleanup()], feeds)
    assert [n.op for n in graph.nodes] == ["Relu"]
    assert graph.outputs[0].name == "y" and graph.nodes[0].outputs[0].name == "y"
    assert records[0].stats["nodes_removed"] == 1                         # the dead Exp


def test_input_passed_straight_to_output_keeps_its_identity():
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y]), opset_imports=[helper.make_opsetid("", 17)])
    graph, _ = assert_pass_exact(model, [EliminateNoops()], {"x": np.arange(4, dtype=np.float32)})
    assert op_count(graph, "Identity") == 1                              # renaming a graph input is not allowed
