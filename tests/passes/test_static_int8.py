"""Static int8 (passes/quantize/static_int8.py): convolutional graphs become integer operators whose
activations are int8, close to the float model; graphs without convolutions are left alone."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from lmc.compiler.build import BuildOptions
from lmc.compiler.compilation import Compilation
from lmc.compiler.pipeline import default_pipeline
from lmc.core import ir, shapes
from lmc.core.errors import LmcError
from lmc.models import build_cnn, build_ds_cnn, build_llama
from lmc.passes.quantize.static_int8 import Code, QuantizeStaticInt8
from lmc.targets.target import load_target


def _compiled(model: onnx.ModelProto, input_shapes: dict):
    graph = ir.to_graph(model)
    shapes.bind_input_shapes(graph, input_shapes)
    shapes.infer_shapes(graph)
    options = BuildOptions(target="cortex-m55", input_shapes=input_shapes)
    compilation = Compilation(options, load_target("cortex-m55"))
    graph, _ = compilation.run(graph, default_pipeline(options, compilation.target, [t.name for t in graph.inputs]))
    return graph, compilation


def _run(graph, feed: dict) -> np.ndarray:
    sess = ort.InferenceSession(ir.to_model(graph).SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feed)[0]


def _feeds(name: str, shape, n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{name: rng.standard_normal(shape).astype(np.float32)} for _ in range(n)]


def test_code_covers_the_range_and_zero_exactly():
    code = Code.of_range(0.0, 5.1)
    assert code.zero == -128 and abs(code.scale - 5.1 / 255) < 1e-7       # a ReLU range: 0 is the lowest code
    code = Code.of_range(-1.0, 3.0)
    assert -128 <= code.zero <= 127 and abs(code.scale * (127 - code.zero) - 3.0) < 2 * code.scale


def test_ds_cnn_becomes_integer_operators_close_to_float():
    graph, compilation = _compiled(build_ds_cnn(), {"input": (1, 1, 49, 10)})
    feed = _feeds("input", (1, 1, 49, 10), 1, seed=9)[0]
    reference = _run(graph, feed)
    result = QuantizeStaticInt8(_feeds("input", (1, 1, 49, 10), 8)).run(graph, compilation.context())
    ops = [n.op for n in graph.nodes]
    assert result.modified and result.approximation
    assert ops.count("QLinearConv") == 9 and "Relu" not in ops and "Conv" not in ops   # every ReLU folded
    assert ops[0] == "QuantizeLinear" and ops[-1] == "QGemm"                           # float in, float out
    for node in graph.nodes[1:]:
        for t in node.outputs:
            if t.name not in ir.graph_outputs(graph):
                assert t.dtype == np.int8, (node.op, t.name)
    for node in graph.nodes:
        if node.op == "QLinearConv":
            assert ir.const_value(node.inputs[7]).item() == -128                       # ReLU's output code
    got = _run(graph, feed)
    cosine = float(np.dot(got.ravel(), reference.ravel()) / np.linalg.norm(got) / np.linalg.norm(reference))
    assert cosine > 0.999


def test_concat_inputs_share_one_code_and_residual_add_is_integer():
    graph, compilation = _compiled(build_cnn(), {"image": (1, 3, 32, 32)})
    QuantizeStaticInt8(_feeds("image", (1, 3, 32, 32), 4)).run(graph, compilation.context())
    concat = next(n for n in graph.nodes if n.op == "Concat")
    codes = set()
    for t in concat.inputs:
        producer = ir.producer(t)
        codes.add((float(ir.const_value(producer.inputs[6])), int(ir.const_value(producer.inputs[7]))))
    assert len(codes) == 1 and all(t.dtype == np.int8 for t in concat.inputs)
    assert any(n.op == "QLinearAdd" for n in graph.nodes) and any(n.op == "QLinearGlobalAveragePool" for n in graph.nodes)


def test_graphs_without_convolutions_are_left_alone_and_calibration_is_required():
    graph, compilation = _compiled(build_llama(), {"input_ids": (1, 8)})
    before = [n.op for n in graph.nodes]
    result = QuantizeStaticInt8(None).run(graph, compilation.context())
    assert not result.modified and [n.op for n in graph.nodes] == before
    graph, compilation = _compiled(build_ds_cnn(), {"input": (1, 1, 49, 10)})
    with pytest.raises(LmcError, match="--calib"):
        QuantizeStaticInt8(None).run(graph, compilation.context())
