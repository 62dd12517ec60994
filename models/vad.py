"""A voice-activity-detector-shaped model (as silero-vad exports are): a scalar sample-rate input ``sr``
picks an If branch, and the two branches reshape differently, so the output's shape is known only once
``sr`` is (``lmc build --input-value sr=16000`` folds the If).

Inputs ``x`` float32 [1, 512], ``sr`` int64 scalar; output ``y`` float32 [4] (sr = 16000) or [8].

``build_vad_stateful`` is shaped as silero-vad's opset-18 export: inputs ``input`` [batch, samples],
``state`` [2, batch, 128] and ``sr``; each If branch holds its own weights as initializers, under the same
names in both branches (``model.stft.forward_basis_buffer``, …), so the branch is chosen at run time.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


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


def build_vad_stateful(samples: int = 512, seed: int = 0) -> onnx.ModelProto:
    """See the module docstring: outputs ``output`` [batch, 1] and ``stateN`` [2, batch, 128]."""
    rng = np.random.default_rng(seed)

    def branch(tag: str) -> onnx.GraphProto:
        weights = [numpy_helper.from_array((rng.standard_normal(shape) / np.sqrt(shape[0])).astype(np.float32), name)
                   for name, shape in (("model.stft.forward_basis_buffer", (samples, 256)),
                                       ("model.decoder.weight", (256, 128)), ("model.head.weight", (128, 1)))]
        nodes = [helper.make_node("MatMul", ["input", "model.stft.forward_basis_buffer"], [f"{tag}_spec"]),
                 helper.make_node("Abs", [f"{tag}_spec"], [f"{tag}_mag"]),
                 helper.make_node("MatMul", [f"{tag}_mag", "model.decoder.weight"], [f"{tag}_dec"]),
                 helper.make_node("Add", [f"{tag}_dec", "h"], [f"{tag}_state"]),
                 helper.make_node("Tanh", [f"{tag}_state"], [f"{tag}_act"]),
                 helper.make_node("MatMul", [f"{tag}_act", "model.head.weight"], [f"{tag}_logit"]),
                 helper.make_node("Sigmoid", [f"{tag}_logit"], [f"{tag}_out"]),
                 helper.make_node("Unsqueeze", [f"{tag}_act", "axis0"], [f"{tag}_h1"]),
                 helper.make_node("Concat", [f"{tag}_h1", f"{tag}_h1"], [f"{tag}_stateN"], axis=0)]
        return helper.make_graph(nodes, tag, [], [_vi(f"{tag}_out", ["batch", 1]),
                                                  _vi(f"{tag}_stateN", [2, "batch", 128])], weights)

    nodes = [helper.make_node("Equal", ["sr", "rate16k"], ["c"]),
             helper.make_node("ReduceMean", ["state", "axis0"], ["h"], keepdims=0),
             helper.make_node("If", ["c"], ["output", "stateN"], then_branch=branch("then16k"),
                              else_branch=branch("else8k"))]
    inits = [helper.make_tensor("rate16k", TensorProto.INT64, [], [16000]),
             helper.make_tensor("axis0", TensorProto.INT64, [1], [0])]
    graph = helper.make_graph(nodes, "vad_stateful",
                              [_vi("input", ["batch", "samples"]), _vi("state", [2, "batch", 128]),
                               _vi("sr", [], TensorProto.INT64)],
                              [_vi("output", ["batch", 1]), _vi("stateN", [2, "batch", 128])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    onnx.checker.check_model(model)
    return model
