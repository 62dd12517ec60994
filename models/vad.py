"""A voice-activity-detector-shaped model (as silero-vad exports are): a scalar sample-rate input ``sr``
picks an If branch, and the two branches reshape differently, so the output's shape is known only once
``sr`` is (``lmc build --input-value sr=16000`` folds the If).

Inputs ``x`` float32 [1, 512], ``sr`` int64 scalar; output ``y`` float32 [4] (sr = 16000) or [8].
"""

from __future__ import annotations

import onnx
from onnx import TensorProto, helper


def _vi(name, shape, dtype=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, dtype, shape)


def build_vad() -> onnx.ModelProto:
    then_g = helper.make_graph([helper.make_node("Reshape", ["h", "shape16k"], ["t_r"]),
                                helper.make_node("ReduceSum", ["t_r", "axis1"], ["t_out"], keepdims=0)],
                               "then16k", [], [_vi("t_out", [None])])
    else_g = helper.make_graph([helper.make_node("Reshape", ["h", "shape8k"], ["e_r"]),
                                helper.make_node("ReduceMax", ["e_r", "axis1"], ["e_out"], keepdims=0)],
                               "else8k", [], [_vi("e_out", [None])])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("Equal", ["sr", "rate16k"], ["c"]),
             helper.make_node("If", ["c"], ["r"], then_branch=then_g, else_branch=else_g),
             helper.make_node("Sigmoid", ["r"], ["y"])]
    inits = [helper.make_tensor("rate16k", TensorProto.INT64, [], [16000]),
             helper.make_tensor("shape16k", TensorProto.INT64, [2], [4, 128]),
             helper.make_tensor("shape8k", TensorProto.INT64, [2], [8, 64]),
             helper.make_tensor("axis1", TensorProto.INT64, [1], [1])]
    graph = helper.make_graph(nodes, "vad", [_vi("x", [1, 512]), _vi("sr", [], TensorProto.INT64)],
                              [_vi("y", [None])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model
