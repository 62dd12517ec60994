"""quantize-integer-matmuls (passes/quantize/integer_matmul.py): w8a8's QDQ products become integer products,
int8 travels through Split / Sigmoid / Mul, QuantizeLinear in the same code disappears; without calibration only
the float-output products are made; the C bundle computes the result bit for bit as onnxruntime does."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmc.core import ir, shapes
from lmc.core.pass_manager import PassContext
from lmc.passes.quantize.integer_matmul import IntegerMatMuls, match_qdq_matmul

F = TensorProto.FLOAT
SHAPE = (1, 4, 16)


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def swiglu_qdq() -> onnx.ModelProto:
    """w8a8's form of a SwiGLU MLP: Q/DQ(x) · DQ(W1) -> Split -> g · sigmoid(g) · u -> Q/DQ · DQ(W2) (the same
    weights on every call)."""
    RNG = np.random.default_rng(11)
    w1 = RNG.integers(-127, 128, (16, 32)).astype(np.int8)
    w2 = RNG.integers(-127, 128, (16, 8)).astype(np.int8)
    inits = [_c("w1", w1), _c("s1", (RNG.random(32) * 0.01 + 0.001).astype(np.float32)),
             _c("w2", w2), _c("s2", (RNG.random(8) * 0.01 + 0.001).astype(np.float32)),
             _c("sx", np.float32(3.0 / 127)), _c("zx", np.int8(0)), _c("sm", np.float32(0.02)), _c("zm", np.int8(0)),
             _c("sizes", np.array([16, 16], np.int64))]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "sx", "zx"], ["xq"]),
        helper.make_node("DequantizeLinear", ["xq", "sx", "zx"], ["xd"]),
        helper.make_node("DequantizeLinear", ["w1", "s1"], ["w1d"], axis=1),
        helper.make_node("MatMul", ["xd", "w1d"], ["h"]),
        helper.make_node("Split", ["h", "sizes"], ["g", "u"], axis=-1),
        helper.make_node("Sigmoid", ["g"], ["sg"]),
        helper.make_node("Mul", ["g", "sg"], ["a"]),
        helper.make_node("Mul", ["a", "u"], ["m"]),
        helper.make_node("QuantizeLinear", ["m", "sm", "zm"], ["mq"]),
        helper.make_node("DequantizeLinear", ["mq", "sm", "zm"], ["md"]),
        helper.make_node("DequantizeLinear", ["w2", "s2"], ["w2d"], axis=1),
        helper.make_node("MatMul", ["md", "w2d"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "swiglu", [helper.make_tensor_value_info("x", F, list(SHAPE))],
                              [helper.make_tensor_value_info("y", F, [1, 4, 8])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])


def _graph(model):
    graph = ir.to_graph(model)
    shapes.infer_shapes(graph)
    return graph


def _feeds(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.standard_normal(SHAPE).astype(np.float32)} for _ in range(n)]


def run(model: onnx.ModelProto, feed: dict) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"]).run(None, feed)[0]


def integer_swiglu(calibrate: bool = True):
    graph = _graph(swiglu_qdq())
    result = IntegerMatMuls(_feeds(8, 0) if calibrate else None).run(graph, PassContext())
    assert result.modified
    return graph, result


def test_matches_only_qdq_products():
    graph = _graph(swiglu_qdq())
    assert sum(match_qdq_matmul(n) is not None for n in graph.nodes) == 2
    model = swiglu_qdq()
    model.graph.node[3].input[0] = "x"          # float activations: not a QDQ product
    assert sum(match_qdq_matmul(n) is not None for n in _graph(model).nodes) == 1


def test_int8_between_products_and_close_to_qdq():
    graph, result = integer_swiglu()
    ops = sorted(n.op for n in graph.nodes)
    assert ops == ["MatMulIntegerToFloat", "QLinearMatMul", "QLinearMul", "QLinearMul", "QLinearSigmoid",
                   "QuantizeLinear", "Split"], ops
    assert result.approximation and result.stats["integer_matmuls"] == 2
    for node in graph.nodes:
        if node.op != "MatMulIntegerToFloat":
            assert all(t.dtype == np.int8 for t in node.outputs), node.op
    mul = next(n for n in graph.nodes if n.op == "QLinearMul" and n.outputs[0].outputs[0].op == "MatMulIntegerToFloat")
    assert ir.scalar_value(mul.inputs[6]) == np.float32(0.02)      # written in the down product's own code
    feed = _feeds(1, 5)[0]
    ref, got = run(swiglu_qdq(), feed), run(ir.to_model(graph), feed)
    assert np.corrcoef(ref.ravel(), got.ravel())[0, 1] > 0.99


def test_without_calibration_products_only_and_exact_to_the_rounding():
    graph, result = integer_swiglu(calibrate=False)
    ops = [n.op for n in graph.nodes]
    assert ops.count("MatMulIntegerToFloat") == 2 and "MatMul" not in ops and "QLinearMul" not in ops
    assert result.approximation is None
    feed = _feeds(1, 5)[0]
    ref, got = run(swiglu_qdq(), feed), run(ir.to_model(graph), feed)
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max()


def test_nothing_to_do_without_qdq_products():
    model = swiglu_qdq()
    model.graph.node[3].input[0] = "x"
    model.graph.node[11].input[0] = "m"
    result = IntegerMatMuls(None).run(_graph(model), PassContext())
    assert not result.modified
