"""A subgraph that reads an outer tensor keeps that tensor alive (and planned) through the node."""

import numpy as np
import onnx
from helpers import assert_close, independent_plan_check, run_ort
from onnx import TensorProto, helper

from lmc.compiler.build import BuildOptions, build


def test_if_branch_reading_outer_tensor(tmp_path):
    then_g = helper.make_graph([helper.make_node("Add", ["h", "h"], ["t_out"])], "then", [],
                               [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [4])])
    else_g = helper.make_graph([helper.make_node("Mul", ["h", "h"], ["e_out"])], "else", [],
                               [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [4])])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("ReduceSum", ["x"], ["s"], keepdims=0),
             helper.make_node("Greater", ["s", "zero"], ["c"]),
             helper.make_node("Exp", ["x"], ["big"]),
             helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Add", ["r", "big"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])],
                              [helper.make_tensor("zero", TensorProto.FLOAT, [], [0.0])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, str(tmp_path / "if.onnx"))
    build(tmp_path / "if.onnx", BuildOptions(target="x86-64"), tmp_path / "out")
    plan = independent_plan_check(tmp_path / "out")
    h = next(t for t in plan["tensors"] if t["name"] == "h")
    if_step = next(i for i, n in enumerate(plan["schedule"]) if "If" in n)
    assert h["last"] >= if_step
    for x in (np.array([1, 2, 3, 4], np.float32), np.array([-1, -2, -3, 0.5], np.float32)):
        assert_close(run_ort(model, {"x": x}), run_ort(tmp_path / "out" / "model.onnx", {"x": x}))
