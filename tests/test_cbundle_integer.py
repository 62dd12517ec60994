"""The C bundle's integer transformer kernels against onnxruntime, bit for bit: QLinearMul over every pair of
int8 codes, QLinearSigmoid over every code (its table is onnxruntime's), the integer SwiGLU the
quantize-integer-matmuls pass writes (QLinearMatMul, Split, QLinearSigmoid, QLinearMul, MatMulIntegerToFloat),
and the RMS norm's float steps (Pow 2, ReduceMean in onnxruntime's order)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from lmc.compiler.backend import plan_memory
from lmc.core import ir, shapes
from lmc.targets.cbundle.emit import emit_c
from lmc.targets.cbundle.host import HostBuild, find_cc
from lmc.targets.target import load_target
from tests.passes.test_integer_matmul import integer_swiglu

pytestmark = pytest.mark.skipif(find_cc() is None, reason="no host C compiler (cc, gcc or clang) on PATH")
I8 = TensorProto.INT8


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value), name)


def c_and_onnxruntime(model: onnx.ModelProto, folder: Path, feeds: list[dict]) -> list[tuple[list, list]]:
    graph = ir.to_graph(model)
    shapes.infer_shapes(graph)
    target = load_target("cortex-m7")
    plan = plan_memory(graph, target)
    folder.mkdir(parents=True)
    onnx.save(ir.to_model(graph), str(folder / "model.onnx"))
    emit_c(graph, plan, target, folder)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    with HostBuild(folder) as build:
        return [(build.run(feed), session.run(None, feed)) for feed in feeds]


def _ms(nodes, inputs, outputs, inits) -> onnx.ModelProto:
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])


def test_qlinear_mul_and_sigmoid_every_code(tmp_path):
    codes = [_c(k, v) for k, v in dict(sa=np.float32(0.0371), za=np.int8(5), sb=np.float32(0.0113), zb=np.int8(-7),
                                        sy=np.float32(0.0291), zy=np.int8(3), ss=np.float32(0.0041),
                                        zs=np.int8(-128)).items()]
    n = 256 * 256
    model = _ms([helper.make_node("QLinearMul", ["a", "sa", "za", "b", "sb", "zb", "sy", "zy"], ["y"],
                                  domain="com.microsoft"),
                 helper.make_node("QLinearSigmoid", ["s", "sa", "za", "ss", "zs"], ["z"], domain="com.microsoft")],
                [helper.make_tensor_value_info("a", I8, [n]), helper.make_tensor_value_info("b", I8, [n]),
                 helper.make_tensor_value_info("s", I8, [256])],
                [helper.make_tensor_value_info("y", I8, [n]), helper.make_tensor_value_info("z", I8, [256])], codes)
    feed = {"a": np.repeat(np.arange(-128, 128), 256).astype(np.int8),
            "b": np.tile(np.arange(-128, 128), 256).astype(np.int8), "s": np.arange(-128, 128).astype(np.int8)}
    [(c, r)] = c_and_onnxruntime(model, tmp_path / "b", [feed])
    assert np.array_equal(c[0], r[0]) and np.array_equal(c[1], r[1])
    assert len(np.unique(r[1])) > 100              # the sigmoid table is not degenerate


def test_integer_swiglu_bit_exact(tmp_path):
    graph, _ = integer_swiglu()
    rng = np.random.default_rng(4)
    feeds = [{"x": (rng.standard_normal((1, 4, 16)) * 1.5).astype(np.float32)} for _ in range(6)]
    for c, r in c_and_onnxruntime(ir.to_model(graph), tmp_path / "b", feeds):
        assert np.array_equal(c[0], r[0])


def test_rms_norm_steps_bit_exact(tmp_path):
    """x², its mean over 64 (onnxruntime's summation order; a plain left-to-right sum differs on ~15% of rows)."""
    model = _ms([helper.make_node("Pow", ["x", "two"], ["p"]),
                 helper.make_node("ReduceMean", ["p", "axes"], ["m"], keepdims=1)],
                [helper.make_tensor_value_info("x", TensorProto.FLOAT, [64, 64])],
                [helper.make_tensor_value_info("p", TensorProto.FLOAT, [64, 64]),
                 helper.make_tensor_value_info("m", TensorProto.FLOAT, [64, 1])],
                [_c("two", np.float32(2.0)), _c("axes", np.array([-1], np.int64))])
    rng = np.random.default_rng(2)
    feeds = [{"x": rng.standard_normal((64, 64)).astype(np.float32)} for _ in range(4)]
    results = c_and_onnxruntime(model, tmp_path / "b", feeds)
    for c, r in results:
        assert np.array_equal(c[0], r[0]) and np.array_equal(c[1], r[1])
    plain = [np.float32(sum(np.float32(v) for v in row)) for row in results[0][1][0]]   # left to right, float32
    sequential = np.array([np.float32(s / np.float32(64)) for s in plain], np.float32)
    assert not np.array_equal(sequential, results[0][1][1][:, 0])
